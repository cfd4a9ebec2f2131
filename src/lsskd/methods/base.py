"""The method contract (one small class per method).

``method(x, y, idx)`` in training mode returns ``(logits, losses)``: the main
classifier's logits on the untransformed batch and a dict of named, already
weighted loss terms whose sum is optimised. In eval mode ``method(x)`` returns
the deployed backbone's logits only. ``deploy()`` returns the bare backbone.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import validate_section
from ..data.augment import MixInfo
from ..models.staged import StagedBackbone


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE(logits, q) = -sum_c q_c log softmax(logits)_c, averaged over rows."""
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def mix_targets(target: torch.Tensor, mix: Optional[MixInfo], group: int = 1) -> torch.Tensor:
    """CutMix: row i's target becomes lam*t_i + (1-lam)*t_perm(i). With ``group`` > 1 the
    rows are ``group`` stacked copies of the batch (views), each mixed the same way."""
    if mix is None:
        return target
    b = len(mix.perm)
    t = target.view(group, b, -1)
    return (mix.lam * t + (1 - mix.lam) * t[:, mix.perm]).view_as(target)


class Method(nn.Module):
    """Base class. Subclasses set ``defaults`` (their config keys) and implement
    :meth:`train_forward`."""

    defaults: Dict = {}

    def __init__(self, backbone: StagedBackbone, cfg: Dict | None = None, num_train: int = 0,
                 **context):
        super().__init__()
        self.cfg = validate_section(cfg or {}, self.defaults, "method.")
        self.backbone = backbone
        self.num_classes = backbone.num_classes
        self.num_train = num_train
        self.context = context
        self.epoch, self.total_epochs = 1, 1

    # --- contract ----------------------------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, idx: torch.Tensor | None = None,
                mix: MixInfo | None = None):
        if self.training and y is not None:
            return self.train_forward(x, y, idx, mix)
        return self.backbone(x)

    def train_forward(self, x, y, idx, mix) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        raise NotImplementedError

    # --- hooks the trainer calls ------------------------------------------
    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        """``epoch`` is 1-based."""
        self.epoch, self.total_epochs = epoch, total_epochs

    def after_step(self) -> None:
        """Called after the optimiser step (e.g. to commit stored predictions)."""

    def on_epoch_end(self, train_stats: Dict[str, float]) -> None:
        """Sees the epoch's mean training stats (e.g. train accuracy)."""

    #: True when the method needs the held-out split's scores after every epoch
    #: (the trainer then evaluates ``data.val_fraction``'s split and calls on_validation).
    wants_val: bool = False

    def on_validation(self, val_stats: Dict[str, float]) -> None:
        """Sees the held-out split's scores after each epoch (only if ``wants_val``)."""

    def schedule_stats(self) -> Dict[str, float]:
        """Schedule values of the current epoch worth logging (e.g. ``alpha``), as floats."""
        return {}

    def sample_extra(self, idx: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> Optional[torch.Tensor]:
        """Optional extra sample indices to load with the batch (e.g. CS-KD pairs)."""
        return None

    @torch.no_grad()
    def eval_outputs(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Extra per-head class scores for evaluation, e.g. ``{'branch1': logits}``."""
        return {}

    def summary_notes(self, summary: Dict) -> List[str]:
        """One-line notes for the user about the finished run (``summary`` is the run's
        summary.json content); the trainer prints each on stderr as ``note: ...``."""
        return []

    def deploy(self) -> StagedBackbone:
        """The model to ship: exactly the backbone, no auxiliary parts."""
        return self.backbone

    def sync_state(self, world_size: int) -> None:
        """DDP: make per-sample state identical across ranks (no-op when stateless)."""


def register_method(name: str):
    from ..registry import METHODS

    return METHODS.register(name)
