"""Data-distortion guided self-distillation, DDGSD (Xu & Liu, "Data-Distortion Guided
Self-Distillation for Deep Neural Networks", AAAI 2019)."""
from __future__ import annotations

import torch.nn.functional as F

from .base import Method, register_method
from .losses import kl_div, mix_targets, soft_cross_entropy


@register_method("ddgsd")
class DataDistortionSelfDistillation(Method):
    """DDGSD: two independently distorted (augmented) views of every image teach each other.

    Every sample is loaded twice (:meth:`sample_extra` returns the batch's own indices, so
    the trainer augments each copy independently). With z1, z2 the logits and h1, h2 the
    pooled features of the two views (rows 1..B and B+1..2B):

    L = 1/2 * CE([z1; z2], [y; y])  (mean over the 2B rows, halved)
        + lambda * T^2 * [ KL(softmax(z2 / T).detach() || softmax(z1 / T))
                           + KL(softmax(z1 / T).detach() || softmax(z2 / T)) ]
        + mmd_weight * (mean(h1) - mean(h2))^2

    Paper: Xu & Liu, AAAI 2019 (Sec. 3: the two views' mutual KL and a maximum-mean-
    discrepancy term between their features). No official code was released; checked against
    the implementation behind the CIFAR-100 row usually quoted (winycg/Self-KD-Lib,
    ``methods/ddsgd.py`` with ``main.py``'s defaults): T = 4, lambda = 1, the halved CE, and
    the MMD term as the squared difference of the two views' scalar feature means (over the
    batch and all feature dimensions) weighted 5e-4, where the paper writes a kernel MMD.
    Defaults: ``method.T`` = 4, ``method.lambda`` = 1, ``method.mmd_weight`` = 5e-4.
    Returns the first view's logits (training accuracy counts B rows). Under CutMix/Mixup
    the CE targets are mixed over all 2B rows.
    """

    defaults = {
        "T": 4.0,  # temperature of the mutual KL (Self-KD-Lib: 4)
        "lambda": 1.0,  # weight of the mutual KL terms
        "mmd_weight": 5.0e-4,  # weight of the feature-mean discrepancy term (Self-KD-Lib: 5e-4)
    }
    ranges = {"T": "> 0", "lambda": ">= 0", "mmd_weight": ">= 0"}

    def __init__(self, backbone, cfg=None, context=None, **context_fields):
        super().__init__(backbone, cfg, context, **context_fields)

    def sample_extra(self, idx, labels, g):
        return idx.clone()

    def train_forward(self, x, y, idx, mix):
        T, lam = self.cfg["T"], self.cfg["lambda"]
        b = len(x) // 2
        if len(x) != 2 * b:
            raise RuntimeError(f"ddgsd expects two views of each sample, got {len(x)} rows")
        _, h, logits = self.backbone.forward_features(x)
        z1, z2 = logits[:b], logits[b:]
        target = mix_targets(F.one_hot(y, self.num_classes).float(), mix)
        mmd = (h[:b].float().mean() - h[b:].float().mean()) ** 2
        return z1, {
            "ce": 0.5 * soft_cross_entropy(logits, target),
            "kl": lam * (kl_div(z1, z2, T) + kl_div(z2, z1, T)),
            "mmd": self.cfg["mmd_weight"] * mmd,
        }

    def training_macs(self, input_shape) -> int:
        """MACs of one training sample: two views through the backbone."""
        return 2 * super().training_macs(input_shape)
