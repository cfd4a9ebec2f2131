"""Self-supervised transformation families t_0..t_{M-1} (t_0 = identity).

A family maps a batch x (B, ...) to the stacked views ``[t_0(x); ...; t_{M-1}(x)]``
of shape (M*B, ...), view-major, so rows ``k*B : (k+1)*B`` hold view k. The joint
label of sample (x, y) under t_k is ``y * M + k`` (METHOD.md). New modalities add
a family here (``@TRANSFORMS.register``) without touching any method.
"""
from __future__ import annotations

import torch

from ..registry import TRANSFORMS


class ViewFamily:
    num_views: int = 1
    modality: str = "image"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def joint_labels(y: torch.Tensor, num_views: int) -> torch.Tensor:
        """(M*B,) joint labels y*M + k in the view-major order of the stacked batch."""
        k = torch.arange(num_views, device=y.device).repeat_interleave(len(y))
        return y.repeat(num_views) * num_views + k


@TRANSFORMS.register("rotation")
class Rotations(ViewFamily):
    """Image rotations by 0, 90, 180, 270 degrees (M = 4), counter-clockwise."""

    num_views = 4
    modality = "image"

    def __call__(self, x):
        return torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)])


@TRANSFORMS.register("identity")
class Identity(ViewFamily):
    """M = 1: no self-supervised task (joint labels = class labels)."""

    num_views = 1
    modality = "any"

    def __call__(self, x):
        return x


def build_views(name: str) -> ViewFamily:
    return TRANSFORMS.build(name)
