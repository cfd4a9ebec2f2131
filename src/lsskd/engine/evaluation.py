"""Rebuild a trained method from a checkpoint and evaluate it."""
from __future__ import annotations

from typing import Dict, List

import torch

from ..config import build_config, merge
from ..data import BatchAugment, build_run_data
from ..plugins import import_plugins
from .checkpoint import load_checkpoint
from .distributed import DistInfo
from .profile import count_params
from .metrics import evaluate
from .trainer import build_method, resolve_device


def load_trained(path, overrides: List[str] | None = None, weights_only: bool = True, device="cpu"):
    """(cfg, checkpoint dict): the run's stored config merged over today's defaults, with
    ``overrides`` applied, and the verified checkpoint. Builds no method and restores no
    weights (``lsskd.deploy.load_training_method`` does)."""
    st = load_checkpoint(path, weights_only=weights_only)
    missing = [k for k in ("config", "method") if k not in st]
    if missing:
        from ..errors import CheckpointError

        raise CheckpointError(f"{path} is not an lsskd checkpoint: a torch file without "
                              f"{', '.join(repr(k) for k in missing)} (lsskd writes <run>/last.pt and <run>/best.pt)")
    cfg = merge(st["config"])
    import_plugins(cfg["plugins"])  # a model or method of the user's own
    if overrides:
        over = build_config(None, overrides)
        for item in overrides:
            key = item.split("=", 1)[0].split(".")
            src, dst = over, cfg
            for k in key[:-1]:
                src, dst = src[k], dst[k]
            dst[key[-1]] = src[key[-1]]
    return cfg, st


def evaluate_checkpoint(path, split="test", device="auto", overrides=None, weights_only=True) -> Dict:
    cfg, st = load_trained(path, overrides, weights_only)
    dev = resolve_device(device, DistInfo())
    bundle = build_run_data(cfg)
    method = build_method(cfg, bundle)
    method.load_state_dict(st["method"])
    method.to(dev)
    ds = bundle.val if split == "val" else bundle.test
    if ds is None:
        raise ValueError("split 'val' needs data.val_fraction > 0 in the run's config")
    aug = BatchAugment(st["mean"], st["std"], st.get("modality", "image"))
    res = evaluate(method, ds, aug, cfg["train"]["eval_batch_size"], dev)
    out = {"checkpoint": str(path), "epoch": st["epoch"], "split": split,
           "method": cfg["method"]["name"], "model": cfg["model"]["name"],
           f"{split}_top1": res["top1"], f"{split}_top5": res["top5"], f"{split}_loss": res["loss"],
           "params_deployed": count_params(method.deploy())}
    for k, v in res.items():
        if k.startswith(("branch", "agg", "ensemble")):
            out[k] = v
    return out
