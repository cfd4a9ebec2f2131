"""Scores of a method on a split: top-1/top-5 accuracy and loss of the deployed
backbone plus each extra head's top-1, and batch-norm recalibration before them."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..data import BatchAugment


def topk_correct(logits: torch.Tensor, y: torch.Tensor, ks=(1, 5)) -> Dict[int, int]:
    k = min(max(ks), logits.shape[1])
    pred = logits.topk(k, dim=1).indices
    hit = pred == y[:, None]
    return {kk: int(hit[:, : min(kk, k)].any(1).sum()) for kk in ks}


@torch.no_grad()
def evaluate(method, ds, aug: BatchAugment, batch_size: int, device, channels_last=False,
             autocast=nullcontext) -> Dict[str, float]:
    """Top-1/top-5 and loss of the deployed backbone, plus any extra heads'
    top-1 (``<head>_top1``), both from ``method.eval_forward`` (one backbone pass)."""
    was = method.training
    method.eval()
    n, loss_sum, c1, c5 = 0, 0.0, 0, 0
    extra: Dict[str, int] = {}
    for start in range(0, len(ds), batch_size):
        x = ds.x[start : start + batch_size].to(device, non_blocking=True)
        y = ds.y[start : start + batch_size].to(device, non_blocking=True)
        x, _ = aug(x, None, train=False)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits, outs = method.eval_forward(x)
            logits = logits.float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        hits = topk_correct(logits, y)
        c1 += hits[1]
        c5 += hits[5]
        for name, lg in outs.items():
            extra[name] = extra.get(name, 0) + topk_correct(lg.float(), y, ks=(1,))[1]
        n += len(y)
    method.train(was)
    out = {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss_sum / n}
    out.update({f"{k}_top1": 100.0 * v / n for k, v in extra.items()})
    return out


@torch.no_grad()
def recalibrate_bn(backbone: nn.Module, ds, aug: BatchAugment, batch_size: int, device,
                   max_batches: int = 50) -> None:
    """Re-estimate batch-norm running statistics on untransformed training images
    (the eval-time distribution), as a cumulative average over ``max_batches``."""
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was = backbone.training
    backbone.train()
    for b, start in enumerate(range(0, len(ds), batch_size)):
        if b >= max_batches:
            break
        x, _ = aug(ds.x[start : start + batch_size].to(device), None, train=False)
        backbone(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    backbone.train(was)
