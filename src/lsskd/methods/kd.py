"""Classic knowledge distillation from a trained teacher (Hinton, Vinyals & Dean,
"Distilling the Knowledge in a Neural Network", NIPS DL Workshop 2015)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..deploy.load import extract_backbone, read_run
from ..engine import runlock
from ..engine.checkpoint import load_checkpoint
from ..engine.profile import count_macs
from ..errors import CheckpointError, ConfigError
from .base import Method, register_method
from .losses import kl_div_probs, mix_targets, soft_cross_entropy


def teacher_state(path: str | Path, num_classes: int, input_shape: Sequence[int] | None = None,
                  classes: Sequence[str] | None = None, key: str = "method.teacher_checkpoint",
                  method: str = "kd"):
    """(stored config, checkpoint state) of a teacher run trained by this tool, read by
    :func:`~lsskd.deploy.load.read_run` after checking that it exists and predicts the
    student's classes (count and names, in label order) on the student's input shape.
    The checkpoint is read with ``weights_only``."""
    if not path:
        raise ConfigError(f"{key} must name a checkpoint (e.g. runs/teacher/best.pt) for method '{method}'")
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}: teacher checkpoint not found: {path}")
    run = read_run(path)  # weights_only load
    require_finished(path, run.state, run.config, key)
    st = run.state
    t_classes = list(st.get("classes", []))
    if len(t_classes) != num_classes:
        raise ConfigError(f"{key}: teacher {path} predicts {len(t_classes)} classes, "
                          f"the student {num_classes}")
    if classes is not None and list(classes) != t_classes:
        diff = next(i for i, (a, b) in enumerate(zip(classes, t_classes)) if a != b)
        raise ConfigError(f"{key}: teacher {path} has different classes (index {diff}: "
                          f"teacher '{t_classes[diff]}', student '{classes[diff]}')")
    if input_shape is not None and list(st.get("input_shape", input_shape)) != list(input_shape):
        raise ConfigError(f"{key}: teacher {path} was trained on inputs {tuple(st['input_shape'])}, "
                          f"the student's are {tuple(input_shape)}")
    return run.config, st


def stopped_early(st: dict, total: int) -> str | None:
    """Where a checkpoint of a ``total``-epoch run was written, if not after its last epoch
    ("during epoch 3", "after epoch 2"); None for a finished run's checkpoint."""
    epoch = st.get("epoch", total)
    if st.get("step", 0) > 0:
        return f"during epoch {epoch + 1}"
    return f"after epoch {epoch}" if epoch < total else None


def require_finished(path: Path, st: dict, cfg: dict, key: str) -> None:
    """Refuse a teacher that is not a finished run's: a run directory another process is still
    training, a mid-epoch snapshot, or a ``last.pt`` written before the run's last epoch (an
    interrupted run). A best-epoch snapshot (``best.pt``) of a finished run may come from any
    epoch. Without these checks a half-trained teacher would be distilled without a word."""
    held = runlock.holder(path.parent)
    if held is not None:
        raise ConfigError(f"{key}: teacher {path} is still being trained ({runlock.describe(held)}); "
                          f"wait for that run to finish")
    total = cfg.get("train", {}).get("epochs")
    if st.get("epoch") is None or total is None:
        return
    where = stopped_early(st, total)
    if where is None:
        return
    best_snapshot = (path.name != "last.pt" and st.get("step", 0) == 0
                     and (st.get("best") or {}).get("epoch") == st["epoch"])
    if not best_snapshot:
        raise ConfigError(f"{key}: teacher {path} was saved {where} of {total}: its run did not "
                          f"finish; resume it (lsskd train --resume {path.parent}) or name a "
                          f"finished run's checkpoint")
    last = path.parent / "last.pt"  # a best epoch before the last: was that run's end reached?
    if not last.is_file():
        return
    try:
        last_where = stopped_early(load_checkpoint(last), total)
    except CheckpointError:
        return  # only the best snapshot was kept intact; nothing more to know
    if last_where is not None:
        raise ConfigError(f"{key}: teacher {path} is the best epoch so far of a run that did not "
                          f"finish ({last} stopped {last_where} of {total}); "
                          f"resume it (lsskd train --resume {path.parent}) first")


def freeze(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with every parameter frozen."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_teacher(path: str | Path, num_classes: int, input_shape: Sequence[int] | None = None,
                 classes: Sequence[str] | None = None, key: str = "method.teacher_checkpoint") -> nn.Module:
    """The deployed backbone of a run trained by this tool, frozen and in eval mode.

    The architecture comes from the checkpoint's own stored config; only the
    ``backbone.*`` weights are used, so the teacher may have been trained by any method.
    """
    cfg, st = teacher_state(path, num_classes, input_shape, classes, key)
    return freeze(extract_backbone(cfg, st["method"], num_classes, f"teacher {Path(path).expanduser()}"))


class FrozenTeacherMethod(Method):
    """A method with a frozen teacher network kept outside the module tree (``self._teacher``,
    a plain list, set by the subclass): not in ``state_dict()`` or ``parameters()``, yet moved
    with the method (``.to()``/``.cuda()``) and always in eval mode."""

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self


@register_method("kd")
class KnowledgeDistillation(FrozenTeacherMethod):
    """Hinton KD from a frozen teacher checkpoint.

    L = (1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

    Paper: Hinton et al. 2015. Defaults: ``method.T`` = 4, ``method.alpha`` = 0.9 (the
    CIFAR-100 settings of the CRD/HSAKD benchmark code), ``method.teacher_checkpoint``
    = '' (required: a ``last.pt``/``best.pt`` written by ``lsskd train``).

    The teacher is held outside the module tree: it is not in ``state_dict()`` (so
    checkpoints hold only the student), not in ``parameters()`` (not optimised or
    counted), always in eval mode, and follows ``.to(device)``. ``deploy()`` returns
    the student backbone. The teacher sees the batch as normalised for the student,
    so train it on the same data (same normalisation statistics). With CutMix the
    one-hot targets are mixed; the teacher labels the mixed image itself.
    """

    defaults = {"teacher_checkpoint": "", "T": 4.0, "alpha": 0.9}
    ranges = {"T": "> 0", "alpha": "[0, 1]"}

    @classmethod
    def check_rules(cls, cfg, has_val: bool, cutmix_prob: float) -> None:
        if not cfg["teacher_checkpoint"]:
            raise ConfigError("method.teacher_checkpoint must name a checkpoint (e.g. runs/teacher/best.pt) "
                              "for method 'kd'")

    def __init__(self, backbone, cfg=None, context=None, **context_fields):
        super().__init__(backbone, cfg, context, **context_fields)
        teacher = load_teacher(self.cfg["teacher_checkpoint"], self.num_classes,
                               self.context.input_shape, self.context.classes)
        # A plain list hides the teacher from nn.Module's registration.
        self._teacher = [teacher]

    def train_forward(self, x, y, idx, mix):
        T, alpha = self.cfg["T"], self.cfg["alpha"]
        logits = self.backbone(x)
        with torch.no_grad():
            t_prob = F.softmax(self.teacher(x).float() / T, dim=-1)
        onehot = mix_targets(F.one_hot(y, self.num_classes).float(), mix)
        return logits, {
            "ce": (1.0 - alpha) * soft_cross_entropy(logits, onehot),
            "kd": alpha * kl_div_probs(logits, t_prob, T),
        }

    def training_macs(self, input_shape) -> int:
        """MACs of one training sample: the student's forward pass and the teacher's."""
        return super().training_macs(input_shape) + count_macs(self.teacher, input_shape)
