"""Class-wise self-knowledge distillation, CS-KD (Yun et al., "Regularizing
Class-wise Predictions via Self-knowledge Distillation", CVPR 2020)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import Method, register_method
from .losses import kl_div_probs, mix_targets, soft_cross_entropy


class ClassPairSampler:
    """Draws, for each index i, a uniformly random *other* training sample of i's
    class (i itself only when its class has a single member)."""

    def __init__(self, labels: torch.Tensor):
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        n = len(labels)
        # Members of each class are contiguous in ``order``: class c occupies
        # order[start[c] : start[c] + count[c]]; rank[i] is i's position inside its class.
        self.order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=int(labels.max()) + 1 if n else 0)
        starts = torch.cumsum(counts, 0) - counts
        self.labels, self.counts, self.starts = labels, counts, starts
        self.rank = torch.empty(n, dtype=torch.long)
        self.rank[self.order] = torch.arange(n) - starts[labels[self.order]]

    def __call__(self, idx: torch.Tensor, g: Optional[torch.Generator] = None) -> torch.Tensor:
        idx = idx.cpu().long()
        c = self.labels[idx]
        cnt, rank = self.counts[c], self.rank[idx]
        others = (cnt - 1).clamp_min(1)
        r = (torch.rand(len(idx), generator=g) * others).long().clamp_max(others - 1)
        r = torch.where(r >= rank, r + 1, r)  # skip i itself
        r = torch.where(cnt > 1, r, rank)
        return self.order[self.starts[c] + r]


@register_method("cskd")
class ClassWiseSelfKD(Method):
    """CS-KD: match the predictions of two different samples of the same class.

    For each batch sample i a random other sample j(i) with y_j = y_i is loaded too
    (:meth:`sample_extra`); with p = softmax(z / T):

    L = CE(z_i, y_i) + lambda * T^2 * KL(p(z_j).detach() || p(z_i))

    Paper: Yun et al., CVPR 2020 (Eq. 2-3). Defaults: ``method.T`` = 4,
    ``method.lambda`` = 1 (the paper's CIFAR-100 settings). As in the authors' code the
    pair rows go through a separate, gradient-free forward pass (which still updates
    batch-norm statistics). With CutMix the CE targets are mixed; the pair's prediction
    (on its own, possibly mixed, image) stays the KD target.
    """

    defaults = {"T": 4.0, "lambda": 1.0}
    ranges = {"T": "> 0", "lambda": ">= 0"}

    def __init__(self, backbone, cfg=None, context=None, **context_fields):
        super().__init__(backbone, cfg, context, **context_fields)
        labels = self.context.train_labels
        self.sampler = ClassPairSampler(labels) if labels is not None else None

    extra_needs_labels = True

    def sample_extra(self, idx, labels, g):
        if self.sampler is None:
            self.sampler = ClassPairSampler(labels)
        return self.sampler(idx, g)

    def train_forward(self, x, y, idx, mix):
        T = self.cfg["T"]
        b = len(x) // 2
        if len(x) != 2 * b:
            raise RuntimeError(f"cskd expects the batch plus one pair per sample, got {len(x)} rows")
        logits = self.backbone(x[:b])
        with torch.no_grad():
            pair_prob = F.softmax(self.backbone(x[b:]).float() / T, dim=-1)
        # Mix over all 2b rows (CutMix may paste from a pair row), keep the batch rows.
        target = mix_targets(F.one_hot(y, self.num_classes).float(), mix)[:b]
        return logits, {
            "ce": soft_cross_entropy(logits, target),
            "cls": self.cfg["lambda"] * kl_div_probs(logits, pair_prob, T),
        }

    def training_macs(self, input_shape) -> int:
        """MACs of one training sample: its own forward pass and its pair's (gradient-free)."""
        return 2 * super().training_macs(input_shape)
