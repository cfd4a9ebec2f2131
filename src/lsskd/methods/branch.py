"""The auxiliary classifier every branch-based method attaches after a stage.

LSSKD/SAD-CE (HSAKD's branch design) and BYOT (its "shallow classifiers") build the
same module: ``backbone.branch_trunk(level, last)`` (fresh copies of the deeper stages, or
for the deepest a stride-1 copy of the last stage or one extra block, then of ``final``), the backbone's global pool and a
new linear head. It returns the pooled feature h_l (for feature losses) and the
head's logits (class logits for BYOT, joint class x view logits for LSSKD).

Also here: how a branch may attach to the backbone (``scale_grad``: the share of the
branch's gradient that reaches the backbone) and ``frozen_bn_stats`` (run the backbone
on extra views without moving its batch-norm running statistics).
"""
from __future__ import annotations

import copy
from typing import Tuple

import torch
from torch import nn


class Branch(nn.Module):
    """Auxiliary classifier reading stage ``level`` (0-based): trunk -> pool -> Linear(feature_dim, out_dim)."""

    def __init__(self, backbone, level: int, out_dim: int, last: str = "stage"):
        super().__init__()
        # ``last`` (method.last_branch) only matters for the deepest level: HSAKD's full
        # stride-1 copy of the last stage (``stage``) or one extra block (``block``).
        self.trunk = backbone.branch_trunk(level, last)
        self.pool = copy.deepcopy(backbone.pool)  # parameter-free (global average pooling)
        self.head = nn.Linear(backbone.feature_dim, out_dim)

    def forward(self, feat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.pool(self.trunk(feat))
        return h, self.head(h)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # BYOT checkpoints written before the merge call the head ``fc``.
        for name in ("weight", "bias"):
            old = f"{prefix}fc.{name}"
            if old in state_dict and f"{prefix}head.{name}" not in state_dict:
                state_dict[f"{prefix}head.{name}"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return x
    if scale == 0.0:
        return x.detach()
    return _ScaleGrad.apply(x, scale)


class frozen_bn_stats:
    """Within the block, batch-norm layers in training mode normalise with the batch's
    statistics but leave their running statistics (and batch counters) untouched."""

    def __init__(self, module: nn.Module):
        self.bns = [m for m in module.modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]

    def __enter__(self):
        for m in self.bns:
            m.track_running_stats = False
        return self

    def __exit__(self, *exc):
        for m in self.bns:
            m.track_running_stats = True
        return False
