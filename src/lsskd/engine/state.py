"""What a checkpoint holds, and how a trainer is put back into it.

:class:`Progress` is where training stands (epoch and step, the epoch's sample order,
the best score, the time trained, skipped steps, the epoch's running sums): one object
the trainer reads and advances. :func:`capture` gathers everything an exact resume
needs (weights, optimiser and scaler state, the progress, every RNG); :func:`restore`
loads the newest usable file (``last.pt``, else ``last.prev.pt``) and puts it back. The
files themselves are written and verified by :mod:`lsskd.engine.checkpoint`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch

from ..errors import CheckpointError
from ..version import __version__
from .checkpoint import load_latest

FORMAT = "lsskd-checkpoint-1"
# Checkpoint keys resume needs; a file without them is not one of ours.
RESUME_KEYS = ("method", "optimizer", "scaler", "epoch", "step", "order", "rng", "best",
               "train_seconds", "skipped_steps", "accum")


@dataclass
class Progress:
    """Where a run stands.

    ``epoch``: epochs finished; ``step``: optimiser steps taken in the next one (0 at an
    epoch boundary, > 0 in a mid-epoch checkpoint); ``order``: that epoch's sample order
    (drawn when it starts; a checkpoint keeps it only mid-epoch); ``best``: the best
    evaluation so far (``top1``, ``top5``, ``epoch``); ``train_seconds``: time spent in
    training epochs, over every session of the run; ``skipped_steps``: steps skipped for
    a non-finite loss; ``sums``: the epoch's running sums of the training stats (``n``
    samples, each loss term x n, ``correct``)."""

    epoch: int = 0
    step: int = 0
    order: Optional[torch.Tensor] = None
    best: Dict[str, float] = field(default_factory=lambda: {"top1": -1.0, "epoch": 0})
    train_seconds: float = 0.0
    skipped_steps: int = 0
    sums: Dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> Dict:
        """The checkpoint's entries (top-level keys of the file; ``sums`` is ``accum``)."""
        return {"epoch": self.epoch, "step": self.step, "order": self.order if self.step else None,
                "best": dict(self.best), "train_seconds": self.train_seconds,
                "skipped_steps": self.skipped_steps, "accum": dict(self.sums)}

    @classmethod
    def from_state_dict(cls, st: Dict) -> "Progress":
        return cls(epoch=st["epoch"], step=st["step"], order=st["order"], best=dict(st["best"]),
                   train_seconds=st["train_seconds"], skipped_steps=st["skipped_steps"],
                   sums=dict(st["accum"]))


def capture(tr) -> Dict:
    """The full state of the trainer ``tr`` (a :class:`lsskd.engine.trainer.Trainer`) at
    its ``progress``."""
    return {
        "format": FORMAT,
        "version": __version__,
        "config": tr.cfg,
        "classes": list(tr.bundle.classes),
        "mean": list(tr.bundle.mean),
        "std": list(tr.bundle.std),
        "input_shape": list(tr.bundle.input_shape),
        "modality": tr.bundle.modality,
        "method": tr.method.state_dict(),
        "optimizer": tr.optimizer.state_dict(),
        "scaler": tr.scaler.state_dict(),
        **tr.progress.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "data": tr.data_gen.get_state(),
            "aug": tr.aug_gen.get_state(),
        },
    }


def restore(tr, path: Path, weights_only: bool = True) -> Path:
    """Load the newest usable checkpoint at ``path`` into the trainer ``tr`` (weights,
    optimiser, scaler, RNGs, ``tr.progress``); returns the file used."""
    st, used = load_latest(path, weights_only=weights_only)
    missing = [k for k in RESUME_KEYS if k not in st]
    if missing:
        raise CheckpointError(f"checkpoint {used} cannot be resumed: missing {', '.join(missing)}")
    if st.get("config", {}).get("method", {}).get("name") not in (None, tr.cfg["method"]["name"]):
        raise CheckpointError(f"checkpoint {used} was written by method "
                              f"{st['config']['method']['name']!r}, the run's config says "
                              f"{tr.cfg['method']['name']!r}")
    try:
        tr.method.load_state_dict(st["method"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {used} does not fit the configured model: {e}") from None
    tr.optimizer.load_state_dict(st["optimizer"])
    tr.scaler.load_state_dict(st["scaler"])
    torch.set_rng_state(st["rng"]["torch"])
    if st["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["rng"]["cuda"])
    tr.data_gen.set_state(st["rng"]["data"])
    tr.aug_gen.set_state(st["rng"]["aug"])
    tr.progress = Progress.from_state_dict(st)
    return used
