"""Label smoothing (Szegedy et al., "Rethinking the Inception Architecture for
Computer Vision", CVPR 2016, Sec. 7)."""
from __future__ import annotations

import torch.nn.functional as F

from ..errors import ConfigError
from .base import Method, register_method
from .losses import mix_targets, soft_cross_entropy


def smoothed_targets(y, num_classes: int, epsilon: float):
    """q = (1 - eps) * onehot(y) + eps / C (the uniform prior gets mass eps)."""
    return (1.0 - epsilon) * F.one_hot(y, num_classes).float() + epsilon / num_classes


@register_method("ls")
class LabelSmoothing(Method):
    """Label-smoothing regularisation.

    L = CE(z, q),  q_c = (1 - eps) * [c = y] + eps / C

    Paper: Szegedy et al. 2016 (label-smoothing regularisation, eps = 0.1 on ImageNet).
    Defaults: ``method.epsilon = 0.1``. With CutMix the smoothed targets of the two
    mixed images are combined with the box-area weight lambda.
    """

    defaults = {"epsilon": 0.1}

    def __init__(self, backbone, cfg=None, context=None, **context_fields):
        super().__init__(backbone, cfg, context, **context_fields)
        eps = self.cfg["epsilon"]
        if not 0.0 <= eps < 1.0:
            raise ConfigError(f"method.epsilon must be in [0, 1), got {eps}")

    def train_forward(self, x, y, idx, mix):
        logits = self.backbone(x)
        target = mix_targets(smoothed_targets(y, self.num_classes, self.cfg["epsilon"]), mix)
        return logits, {"ce": soft_cross_entropy(logits, target)}
