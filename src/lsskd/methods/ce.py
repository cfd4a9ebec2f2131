"""Plain cross-entropy training (the baseline every table compares against)."""
from __future__ import annotations

import torch.nn.functional as F

from .base import Method, register_method
from .losses import mix_targets, soft_cross_entropy


@register_method("ce")
class CrossEntropy(Method):
    """L = CE(z, onehot(y)); with CutMix the one-hot targets of both images are mixed."""

    defaults = {}

    def train_forward(self, x, y, idx, mix):
        logits = self.backbone(x)
        if mix is None:
            loss = F.cross_entropy(logits.float(), y)
        else:
            target = mix_targets(F.one_hot(y, self.num_classes).float(), mix)
            loss = soft_cross_entropy(logits, target)
        return logits, {"ce": loss}
