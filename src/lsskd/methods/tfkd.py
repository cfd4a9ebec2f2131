"""Teacher-free KD with a manually designed (virtual) teacher, Tf-KD_reg
(Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing
Regularization", CVPR 2020, Sec. 5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import Method, register_method
from .losses import kl_div_probs, mix_targets, soft_cross_entropy


def virtual_teacher(y: torch.Tensor, num_classes: int, correct_prob: float) -> torch.Tensor:
    """p_c = a for the true class, (1 - a) / (C - 1) for every other class."""
    other = (1.0 - correct_prob) / (num_classes - 1)
    p = torch.full((len(y), num_classes), other, device=y.device)
    return p.scatter_(1, y[:, None], correct_prob)


def soften(p: torch.Tensor, T: float) -> torch.Tensor:
    """Temperature-soften a distribution given as probabilities: p^T ∝ p^(1/T),
    i.e. softmax(log p / T), the same softening KD applies to a teacher's logits."""
    return F.softmax(torch.log(p) / T, dim=-1)


@register_method("tfkd")
class TeacherFreeKD(Method):
    """Tf-KD_reg: distil from a virtual teacher that is 100% accurate.

    p_c = a if c = y else (1 - a) / (C - 1)
    L = (1 - alpha) * CE(z, y) + alpha * T^2 * KL(p^T || softmax(z / T)),
    p^T = softmax(log p / T)

    Paper: Yuan et al., CVPR 2020 (Eq. 9). Defaults: ``method.correct_prob`` (a) = 0.9,
    ``method.alpha`` = 0.1, ``method.T`` = 20 -- alpha and T are the authors' CIFAR-100
    ResNet-18 settings (reg_alpha 0.1, reg_temperature 20 in their released configs).
    Their released code differs from the paper's equation (it uses a = 0.99, softens by
    softmax(p / T) instead of p^(1/T), leaves the student unsoftened and rescales by a
    per-model multiplier); we implement the equation as written, so T^2 keeps the
    gradient scale independent of T. With CutMix both the one-hot targets and the
    virtual teachers of the two images are mixed (weight lambda) before softening.
    """

    defaults = {"correct_prob": 0.9, "alpha": 0.1, "T": 20.0}
    ranges = {"correct_prob": "(0, 1]", "alpha": "[0, 1]", "T": "> 0"}

    def __init__(self, backbone, cfg=None, context=None, **context_fields):
        super().__init__(backbone, cfg, context, **context_fields)
        if self.num_classes < 2:
            raise ConfigError(f"tfkd needs at least 2 classes, the model has {self.num_classes}")

    def train_forward(self, x, y, idx, mix):
        a, alpha, T = self.cfg["correct_prob"], self.cfg["alpha"], self.cfg["T"]
        logits = self.backbone(x)
        onehot = mix_targets(F.one_hot(y, self.num_classes).float(), mix)
        teacher = soften(mix_targets(virtual_teacher(y, self.num_classes, a), mix), T)
        return logits, {
            "ce": (1.0 - alpha) * soft_cross_entropy(logits, onehot),
            "reg": alpha * kl_div_probs(logits, teacher, T),
        }
