"""Scoring an exported file (ONNX, ExecuTorch, TorchScript; float or int8) on its run's
test or held-out split through the file's own runtime: the accuracy of what ships."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch

from ..config import merge, nest_overrides
from ..data import build_run_data
from ..errors import DataError
from .formats import metadata_path
from .load import normalize, open_model


def evaluate_exported(path: str | Path, split: str = "test", overrides: List[str] | None = None,
                      threads: int = 0, max_inputs: int = 0, batch: int = 256) -> Dict:
    """Top-1 / top-5 (%) of the exported file at ``path`` on its run's ``split``, the run's
    data rebuilt from the config in the file's metadata sidecar (``overrides`` such as
    ``data.root=PATH`` applied over it). ``max_inputs`` > 0 scores that many evenly spaced
    inputs instead of the whole split."""
    runner, meta = open_model(model=path, threads=threads)
    if not meta.get("config"):
        raise DataError(f"evaluating {path} needs its run's config, which is in the metadata sidecar "
                        f"{metadata_path(path)} written by `lsskd export`")
    cfg = merge(meta["config"])
    if overrides:
        cfg = merge(nest_overrides(overrides), base=cfg)
    bundle = build_run_data(cfg)
    ds = bundle.val if split == "val" else bundle.test
    if ds is None:
        raise DataError(f"split '{split}' is not available for {path}: its run has no held-out split "
                        "(data.val_fraction)")
    if list(ds.x.shape[1:]) != list(meta["input_shape"]):
        raise DataError(f"{split} inputs under data.root={cfg['data']['root']} have shape "
                        f"{list(ds.x.shape[1:])} but {path} expects {meta['input_shape']}")
    rows = torch.arange(len(ds))
    if 0 < max_inputs < len(ds):
        rows = torch.linspace(0, len(ds) - 1, max_inputs).round().long()
    top1 = top5 = 0
    with torch.no_grad():
        for s in range(0, len(rows), batch):
            r = rows[s:s + batch]
            logits = runner(normalize(ds.x[r], meta["mean"], meta["std"])).float()
            y = ds.y[r]
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            # argmax, as `accuracy` and `lsskd export` count: int8 logits are quantised, and
            # among tied classes argmax takes the first while topk's order is unspecified.
            top1 += int((logits.argmax(1) == y).sum())
            top5 += int((top == y[:, None]).any(1).sum())
    n = len(rows)
    return {"model": str(path), "backend": runner.kind, "format": meta.get("model_format", runner.kind),
            "quantization": (meta.get("quantization") or {}).get("type"), "split": split, "n": n,
            "method": cfg["method"]["name"], "model_name": cfg["model"]["name"],
            f"{split}_top1": 100.0 * top1 / max(1, n), f"{split}_top5": 100.0 * top5 / max(1, n)}
