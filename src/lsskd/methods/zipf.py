"""Zipf's label smoothing (Liang, Li, Wu, Zhang, Liu & Jiang, "Efficient One Pass
Self-distillation with Zipf's Label Smoothing", ECCV 2022)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import Method, register_method
from .losses import kl_div_probs, mix_targets, soft_cross_entropy

RANK_BY = ("dense", "logits")


def min_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry of each row, highest score first, ties sharing their best rank
    (scipy's ``rankdata(-s, method='min')``): ``rank_c = 1 + #{c' : s_c' > s_c}``, counted by a
    binary search in the sorted row (O(C) memory per row, not O(C^2))."""
    neg = (-scores).contiguous()
    return 1 + torch.searchsorted(neg.sort(-1).values, neg)  # #{c' : -s_c' < -s_c}


def zipf_targets(scores: torch.Tensor, y: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Zipf soft labels of the non-target classes, shape (B, C-1): ``p_c ∝ rank_c^-power`` for
    c != y, ranks from :func:`min_ranks` over all C classes (target included), renormalised over
    the C-1 non-target classes, which keep their order."""
    p = min_ranks(scores).float().pow(-power)
    p = drop_target(p, y)
    return p / p.sum(-1, keepdim=True)


def drop_target(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row i of ``t`` (B, C) without column y_i: (B, C-1), the other columns in order."""
    keep = torch.ones_like(t, dtype=torch.bool).scatter_(1, y[:, None], False)
    return t[keep].view(len(t), -1)


def dense_votes(backbone, last: torch.Tensor) -> torch.Tensor:
    """(B, C) counts of the positions of the final feature map (before pooling) whose
    per-position prediction, the backbone's classifier applied at that position, is class c."""
    fmap = backbone.final(last).flatten(2).transpose(1, 2)  # (B, P, D)
    pred = backbone.classifier(fmap).argmax(-1)  # (B, P)
    votes = torch.zeros(len(last), backbone.num_classes, device=last.device)
    return votes.scatter_add_(1, pred, torch.ones_like(pred, dtype=votes.dtype))


@register_method("zipf_ls")
class ZipfLabelSmoothing(Method):
    """Zipf's label smoothing: the non-target classes learn a Zipf distribution ranked by the
    model's own current prediction, in the same single forward pass.

    With r_c the rank of class c (1 = most voted/highest; ties share their best rank) and
    z_{-y} the logits without the target's entry:

    p_c = r_c^-power / sum_{c' != y} r_c'^-power      (c != y)
    L = CE(z, y) + lambda * KL(p || softmax(z_{-y}))

    Ranks (``method.rank_by``): ``dense`` (the official CIFAR setting, ``--dense``): the
    backbone's classifier applied at every position of the final feature map, each position
    voting for its argmax class; ``logits``: the ranks of z itself.

    Paper: Liang et al., ECCV 2022 (Sec. 3); checked against the official PyTorch code
    (megvii-research/zipfls, ``pytorch_zipfls/losses.py``: ``gen_pdf`` with ``rank='hard'``,
    ``distribution='rank_zipf'``, ``kl_loss`` without its loss mask; the README's CIFAR-100
    ResNet-18 command ``--loss_lambda 0.1 --dense``). Defaults: ``method.lambda`` = 0.1,
    ``method.rank_by`` = dense, ``method.power`` = 1. Votes and targets are computed without
    gradient. Under CutMix/Mixup the CE target is mixed; the Zipf term uses the batch row's
    own label (the paper defines no mixed case).
    """

    defaults = {
        "lambda": 0.1,  # weight of the Zipf KL term (official CIFAR-100 command: 0.1)
        "rank_by": "dense",  # dense (per-position votes of the final feature map) | logits
        "power": 1.0,  # Zipf exponent: p_c ∝ rank_c^-power
    }
    ranges = {"lambda": ">= 0", "power": "> 0"}
    choices = {"rank_by": RANK_BY}

    def __init__(self, backbone, cfg=None, context=None, **context_fields):
        super().__init__(backbone, cfg, context, **context_fields)
        if self.num_classes < 3:
            raise ConfigError(f"zipf_ls needs at least 3 classes, the model has {self.num_classes}")

    def train_forward(self, x, y, idx, mix):
        last = self.backbone.forward_stages(x)[-1]
        _, logits = self.backbone.head(last)
        with torch.no_grad():
            scores = dense_votes(self.backbone, last) if self.cfg["rank_by"] == "dense" else logits
            p = zipf_targets(scores.float(), y, self.cfg["power"])
        target = mix_targets(F.one_hot(y, self.num_classes).float(), mix)
        return logits, {
            "ce": soft_cross_entropy(logits, target),
            "zipf": self.cfg["lambda"] * kl_div_probs(drop_target(logits, y), p, 1.0),
        }

    def training_macs(self, input_shape) -> int:
        """MACs of one training sample: the backbone, plus (``dense``) its classifier at every
        position of the final feature map."""
        from ..engine.profile import count_macs

        def forward(x):
            last = self.backbone.forward_stages(x)[-1]
            out = self.backbone.head(last)
            return dense_votes(self.backbone, last) if self.cfg["rank_by"] == "dense" else out

        return count_macs(self, input_shape, forward=forward)
