"""Self-distillation from the last mini-batch, DLB (Shen, Xu, Ding, Wang & Wen,
"Self-Distillation from the Last Mini-Batch for Consistency Regularization", CVPR 2022)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import Method, register_method
from .losses import kl_div, mix_targets, soft_cross_entropy


@register_method("dlb")
class LastMiniBatchDistillation(Method):
    """DLB: every step re-trains on the previous step's samples, under a fresh augmentation,
    against the soft predictions the model made for them one step earlier.

    Step t loads its own B_t samples plus the B_{t-1} samples of step t-1 (through
    :meth:`sample_extra`, so the trainer loads and augments them again: the second view
    of the official code). With z the logits of the new rows, z' those of the previous
    rows, and z'' the (detached) logits step t-1 produced for those samples:

    L = CE([z; z'], [y; y'])  (mean over all B_t + B_{t-1} rows)
        + alpha * T^2 * KL(softmax(z'' / T) || softmax(z' / T))

    The first step of a run has no previous batch and is a CE step. Paper: Shen et al.,
    CVPR 2022 (Eq. 3-4); checked against the official code (Meta-knowledge-Lab/DLB,
    ``dlb.py``: each image comes with two augmentations, the current batch's first view
    and the previous batch's second view; the previous predictions are those of the first
    view, kept across epoch boundaries). Defaults: ``method.T`` = 3, ``method.alpha`` = 1,
    the paper's settings for every experiment.

    The previous batch (its indices and detached logits) is per-step state: ``train_forward``
    leaves the current rows pending, :meth:`after_step` commits them (so a skipped step keeps
    the older batch), and the state travels in checkpoints (``get_extra_state``), so a resumed
    run continues the chain exactly. Under DDP each rank chains its own batches. The
    reported training accuracy covers the new rows only. Under CutMix/Mixup the CE targets
    are mixed over all rows; the KL compares predictions and is not mixed.
    """

    defaults = {
        "T": 3.0,  # temperature of the last-mini-batch term (paper: 3)
        "alpha": 1.0,  # weight of the last-mini-batch term (paper: 1)
    }
    ranges = {"T": "> 0", "alpha": ">= 0"}

    def __init__(self, backbone, cfg=None, context=None, **context_fields):
        super().__init__(backbone, cfg, context, **context_fields)
        self.prev_idx: Optional[torch.Tensor] = None  # committed: the last step's samples
        self.prev_logits: Optional[torch.Tensor] = None  # and its detached logits on them
        self._pending = None

    def sample_extra(self, idx, labels, g):
        return None if self.prev_idx is None else self.prev_idx.cpu()

    def train_forward(self, x, y, idx, mix):
        n_prev = 0 if self.prev_idx is None else len(self.prev_idx)
        if len(x) <= n_prev:
            raise RuntimeError(f"dlb expects its batch plus the previous {n_prev} samples, got {len(x)} rows")
        b = len(x) - n_prev
        all_logits = self.backbone(x)
        logits = all_logits[:b]
        self._pending = (idx[:b].detach().clone(), logits.detach().float().clone())
        target = mix_targets(F.one_hot(y, self.num_classes).float(), mix)
        losses = {"ce": soft_cross_entropy(all_logits, target)}
        if n_prev:
            losses["dlb"] = self.cfg["alpha"] * kl_div(all_logits[b:], self.prev_logits, self.cfg["T"])
        else:
            losses["dlb"] = all_logits.new_zeros((), dtype=torch.float32)
        return logits, losses

    def after_step(self) -> None:
        if self._pending is not None:
            self.prev_idx, self.prev_logits = self._pending
            self._pending = None

    def get_extra_state(self):
        if self.prev_idx is None:
            return {}
        return {"prev_idx": self.prev_idx.cpu(), "prev_logits": self.prev_logits.cpu()}

    def set_extra_state(self, state):
        dev = next(self.parameters()).device
        if state:
            self.prev_idx = state["prev_idx"].to(dev)
            self.prev_logits = state["prev_logits"].to(dev)
        else:
            self.prev_idx = self.prev_logits = None
        self._pending = None

    def training_macs(self, input_shape) -> int:
        """MACs of one training sample: its forward pass now and again (re-augmented) in the next step."""
        return 2 * super().training_macs(input_shape)
