"""The method contract (one small class per method).

``method(x, y, idx, mix)`` in training mode returns ``(logits, losses)``: the main
classifier's logits on the untransformed batch and a dict of named, already
weighted loss terms whose sum is optimised. In eval mode ``method(x)`` returns
the deployed backbone's logits only, and :meth:`Method.eval_forward` returns them
together with any auxiliary heads' scores from one backbone pass. ``deploy()``
returns the bare backbone.

A method is built as ``cls(backbone, cfg, context)``: ``cfg`` is its ``method.``
config section, ``context`` a :class:`MethodContext` describing the run's data (built
in one place, ``MethodContext.from_bundle``, by :func:`lsskd.methods.build_method`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import check_declared, validate_section
from ..data.augment import MixInfo
from ..models.staged import StagedBackbone


@dataclass(frozen=True)
class MethodContext:
    """What a method may know about the run it trains in (everything optional).

    ``num_train``: training samples (per-sample stores need it; 0 = unknown/none);
    ``classes``: class names in label order (KD compares its teacher's);
    ``input_shape``: one input's shape, e.g. (3, 32, 32); ``modality``: ``image`` |
    ``signal``; ``train_labels``: the training labels (CS-KD's pair sampler);
    ``has_val``: the run holds out a validation split (``data.val_fraction`` > 0);
    ``cutmix_prob``: probability that a training batch is mixed, by CutMix
    (``data.augment.cutmix_prob``) or Mixup (1 when ``data.augment.mixup_alpha`` > 0)."""

    num_train: int = 0
    classes: Optional[Tuple[str, ...]] = None
    input_shape: Optional[Tuple[int, ...]] = None
    modality: str = "image"
    train_labels: Optional[torch.Tensor] = field(default=None, compare=False)  # a tensor: no ==
    has_val: bool = False
    cutmix_prob: float = 0.0

    def __post_init__(self):
        # Normalise sequences to tuples (lists from configs or bundles compare equal).
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))

    @classmethod
    def from_bundle(cls, bundle, cutmix_prob: float = 0.0) -> "MethodContext":
        """The context of a run on ``bundle`` (a :class:`lsskd.data.DataBundle`)."""
        return cls(num_train=len(bundle.train), classes=tuple(bundle.classes),
                   input_shape=tuple(bundle.input_shape), modality=bundle.modality,
                   train_labels=bundle.train.y, has_val=bundle.val is not None,
                   cutmix_prob=float(cutmix_prob))

    @classmethod
    def of(cls, context: "MethodContext | None" = None, **fields_) -> "MethodContext":
        """``context`` with ``fields_`` replaced (keywords must be field names)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(fields_) - names)
        if unknown:
            raise TypeError(f"unknown method context field(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(names))}")
        base = context or cls()
        return cls(**{**{n: getattr(base, n) for n in names}, **fields_})


class Method(nn.Module):
    """Base class. Subclasses set ``defaults`` (their config keys) and implement
    :meth:`train_forward`.

    Construction: ``cls(backbone, cfg, context)`` with a :class:`MethodContext`. For
    tests and scripts the context's fields may be given as keywords instead
    (``cls(backbone, cfg, num_train=8)``); both end up in ``self.context``.

    One training step, as the trainer drives it::

        logits, losses = method(x, y, idx, mix)   # train_forward
        sum(losses.values()).backward(); optimizer.step()
        method.after_step()

    ``train_forward`` must not change per-sample state (e.g. a soft-target store)
    itself: the step may still be skipped (a non-finite loss with
    ``train.nonfinite=skip``), and stored predictions must describe the model that
    produced them. It keeps what it wants to write as pending (LSSKD: the batch's
    indices and detached predictions) and :meth:`after_step`, called only after the
    optimiser step succeeded, commits it (under DDP, gathering every rank's rows so
    all ranks hold the same state). A skipped step never reaches ``after_step``; the
    next ``train_forward`` overwrites the pending rows.
    """

    defaults: Dict = {}
    #: Allowed values of the method's keys, beside ``defaults``: intervals (``"[0, 1)"``,
    #: ``"> 0"``) and fixed sets; checked with the rest of the config before any data is read
    #: (:func:`lsskd.config.check_config`) and again when the method is built.
    ranges: Dict[str, str] = {}
    choices: Dict[str, tuple] = {}

    @classmethod
    def check_settings(cls, cfg: Dict, has_val: bool = False, cutmix_prob: float = 0.0) -> None:
        """Raise ConfigError for a bad ``method.`` section (filled with defaults): declared
        ranges and choices, then :meth:`check_rules` (keys that constrain each other or the run)."""
        check_declared(cfg, cls.ranges, cls.choices, "method.")
        cls.check_rules(cfg, has_val=has_val, cutmix_prob=cutmix_prob)

    @classmethod
    def check_rules(cls, cfg: Dict, has_val: bool, cutmix_prob: float) -> None:
        """Cross-key rules (override): ``has_val`` the run holds out a split
        (``data.val_fraction`` > 0), ``cutmix_prob`` its ``data.augment.cutmix_prob``."""

    def __init__(self, backbone: StagedBackbone, cfg: Dict | None = None,
                 context: MethodContext | None = None, **context_fields):
        super().__init__()
        self.cfg = validate_section(cfg or {}, self.defaults, "method.")
        self.backbone = backbone
        self.num_classes = backbone.num_classes
        self.context = MethodContext.of(context, **context_fields) if context_fields else (
            context or MethodContext())
        self.check_settings(self.cfg, has_val=self.context.has_val, cutmix_prob=self.context.cutmix_prob)
        self.num_train = self.context.num_train
        self.epoch, self.total_epochs = 1, 1

    # --- contract ----------------------------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, idx: torch.Tensor | None = None,
                mix: MixInfo | None = None):
        if self.training and y is not None:
            return self.train_forward(x, y, idx, mix)
        return self.backbone(x)

    def train_forward(self, x, y, idx, mix) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``(logits, {name: weighted loss term})`` for a training batch (class docstring)."""
        raise NotImplementedError

    # --- hooks the trainer calls ------------------------------------------
    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        """``epoch`` is 1-based."""
        self.epoch, self.total_epochs = epoch, total_epochs

    def after_step(self) -> None:
        """Called after a successful optimiser step: commit what ``train_forward`` left
        pending (class docstring)."""

    def on_epoch_end(self, train_stats: Dict[str, float]) -> None:
        """Sees the epoch's mean training stats (e.g. train accuracy)."""

    #: True when some training steps leave parameters without a gradient (LSSKD's branches
    #: with ``branches_when_shut=skip``): DDP then has to look for unused parameters.
    may_leave_params_unused: bool = False

    #: True when the method needs the held-out split's scores after every epoch
    #: (the trainer then evaluates ``data.val_fraction``'s split and calls on_validation).
    wants_val: bool = False

    def on_validation(self, val_stats: Dict[str, float]) -> None:
        """Sees the held-out split's scores after each epoch (only if ``wants_val``)."""

    def schedule_stats(self) -> Dict[str, float]:
        """Schedule values of the current epoch worth logging (e.g. ``alpha``), as floats."""
        return {}

    #: sample_extra reads the training labels (the API then finds them in the dataset).
    extra_needs_labels = False

    def sample_extra(self, idx: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> Optional[torch.Tensor]:
        """Optional extra sample indices to load with the batch (e.g. CS-KD pairs)."""
        return None

    @torch.no_grad()
    def eval_forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Evaluation in eval mode: (the deployed backbone's logits, extra heads' class
        scores such as ``{'branch1': logits}``). Methods with extra heads override this
        to get both from one backbone pass; the default has none."""
        return self(x), {}

    def summary_notes(self, summary: Dict) -> List[str]:
        """One-line notes for the user about the finished run (``summary`` is the run's
        summary.json content); the trainer prints each on stderr as ``note: ...``."""
        return []

    def deploy(self) -> StagedBackbone:
        """The model to ship: exactly the backbone, no auxiliary parts."""
        return self.backbone

    def training_macs(self, input_shape: Sequence[int]) -> int:
        """Multiply-accumulates of one training sample's forward pass (every network the
        method runs: branches, a teacher, extra views). Default: the backbone alone."""
        from ..engine.profile import count_macs

        return count_macs(self.backbone, input_shape)


def register_method(name: str):
    from ..registry import METHODS

    return METHODS.register(name)
