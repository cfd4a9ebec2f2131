"""What a checkpoint holds, and how a trainer is put back into it.

:func:`capture` gathers everything an exact resume needs (weights, optimiser and
scaler state, epoch and step, the epoch's sample order, every RNG, the best score,
running sums); :func:`restore` loads the newest usable file (``last.pt``, else
``last.prev.pt``) and puts it back. The files themselves are written and verified by
:mod:`lsskd.engine.checkpoint`.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict

import torch

from .. import __version__
from .checkpoint import load_latest
from ..errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import Trainer

FORMAT = "lsskd-checkpoint-1"
# Checkpoint keys resume needs; a file without them is not one of ours.
RESUME_KEYS = ("method", "optimizer", "scaler", "epoch", "step", "order", "rng", "best",
               "train_seconds", "skipped_steps", "accum")


def capture(tr: "Trainer", epoch_done: int, step: int) -> Dict:
    """The trainer's full state after ``epoch_done`` epochs and ``step`` steps of the next."""
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
        "epoch": epoch_done,
        "step": step,
        "order": tr.order if step else None,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "data": tr.data_gen.get_state(),
            "aug": tr.aug_gen.get_state(),
        },
        "best": dict(tr.best),
        "train_seconds": tr.train_seconds,
        "skipped_steps": tr.skipped_steps,
        "accum": dict(tr.accum),
    }


def restore(tr: "Trainer", path: Path, weights_only: bool = True) -> Path:
    """Load the newest usable checkpoint at ``path`` into ``tr``; returns the file used."""
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
    tr.start_epoch, tr.start_step = st["epoch"], st["step"]
    tr.order = st["order"]
    tr.best = st["best"]
    tr.train_seconds = st["train_seconds"]
    tr.skipped_steps = st["skipped_steps"]
    tr.accum = st["accum"]
    return used
