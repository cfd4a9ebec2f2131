"""Rebuild a trained method from a checkpoint and evaluate it (``lsskd eval``)."""
from __future__ import annotations

from typing import Dict

from ..data import BatchAugment
from ..deploy.load import load_training_method, read_run
from .distributed import DistInfo
from ..errors import DataError
from .metrics import evaluate
from .profile import count_params
from .trainer import resolve_device


def evaluate_checkpoint(path, split="test", device="auto", overrides=None, weights_only=True) -> Dict:
    """The checkpoint's method rebuilt on the run's data (read by
    :func:`lsskd.deploy.load.read_run`) and scored on ``split`` (test | val)."""
    run = read_run(path, overrides, weights_only)
    dev = resolve_device(device, DistInfo())
    method, cfg, bundle = load_training_method(run)
    ds = bundle.val if split == "val" else bundle.test
    if ds is None:
        raise DataError(f"split 'val' of {path} needs data.val_fraction > 0 in the run's config "
                        "(or override it: data.val_fraction=0.1)")
    st = run.state
    aug = BatchAugment(st["mean"], st["std"], st.get("modality", "image"))
    res = evaluate(method.to(dev), ds, aug, cfg["train"]["eval_batch_size"], dev)
    out = {"checkpoint": str(path), "epoch": st["epoch"], "split": split,
           "method": cfg["method"]["name"], "model": cfg["model"]["name"],
           f"{split}_top1": res["top1"], f"{split}_top5": res["top5"], f"{split}_loss": res["loss"],
           "params_deployed": count_params(method.deploy())}
    for k, v in res.items():  # extra heads: branches, SLA's joint-head readings, a self-teacher
        if k not in ("top1", "top5", "loss"):
            out[k] = v
    return out
