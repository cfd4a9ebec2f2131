"""Self-supervised transformation families t_0..t_{M-1} (t_0 = identity).

A family maps a batch x (B, ...) to the stacked views ``[t_0(x); ...; t_{M-1}(x)]``
of shape (M*B, ...), view-major, so rows ``k*B : (k+1)*B`` hold view k. The joint
label of sample (x, y) under t_k is ``y * M + k`` (METHOD.md). New modalities add
a family here (``@TRANSFORMS.register``) without touching any method.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import TRANSFORMS
from .losses import joint_labels


class ViewFamily:
    num_views: int = 1
    modality: str = "image"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def joint_labels(y: torch.Tensor, num_views: int) -> torch.Tensor:
        """(M*B,) joint labels y*M + k in the view-major order of the stacked batch
        (:func:`lsskd.methods.losses.joint_labels`)."""
        return joint_labels(y, num_views)


@TRANSFORMS.register("rotation")
class Rotations(ViewFamily):
    """Image rotations by 0, 90, 180, 270 degrees (M = 4), counter-clockwise."""

    num_views = 4
    modality = "image"

    def __call__(self, x):
        return torch.cat([rotate90(x, k) for k in range(4)])


def rotate90(x: torch.Tensor, k: int) -> torch.Tensor:
    """``torch.rot90(x, k, dims=(-2, -1))`` (counter-clockwise) written with flip and transpose,
    bit-identical, because ONNX has no rot90 operator: a model that rotates its input (the
    view-aggregated branch of ``lsskd export --head aggregated``) then exports."""
    k %= 4
    if k == 1:
        return x.flip(-1).transpose(-2, -1)
    if k == 2:
        return x.flip(-2).flip(-1)
    if k == 3:
        return x.transpose(-2, -1).flip(-1)
    return x


@TRANSFORMS.register("identity")
class Identity(ViewFamily):
    """M = 1: no self-supervised task (joint labels = class labels)."""

    num_views = 1
    modality = "any"

    def __call__(self, x):
        return x


@TRANSFORMS.register("time_flip")
class TimeFlips(ViewFamily):
    """Signals (B, C, T): the group {identity, time reversal, sign flip, both} (M = 4).

    View k applies time reversal if bit 0 of k is set and negation if bit 1 is set:
    t_0(x) = x, t_1(x) = x[..., ::-1], t_2(x) = -x, t_3(x) = -x[..., ::-1]. Every view
    is an involution (the group is Z2 x Z2). Telling the views apart is learnable because
    gravity biases the accelerometer's sign and gait is not time-symmetric; time reversal
    and negation are standard pretext transformations for wearables (Saeed et al., "Multi-task
    Self-Supervised Learning for Human Activity Detection", IMWUT 2019).
    """

    num_views = 4
    modality = "signal"

    @staticmethod
    def view(x: torch.Tensor, k: int) -> torch.Tensor:
        if k & 1:
            x = x.flip(-1)
        if k & 2:
            x = -x
        return x

    def __call__(self, x):
        return torch.cat([self.view(x, k) for k in range(4)])


@TRANSFORMS.register("axis_perm")
class AxisPermutations(ViewFamily):
    """Signals (B, C, T) whose channels are 3-axis sensors (C = 3g: acc xyz, gyro xyz, ...):
    cyclic permutations of the axes inside every sensor group (M = 3).

    View k maps channel 3g + j to channel 3g + (j + k) mod 3, i.e. output axis j of each
    sensor reads input axis (j + k) mod 3: t_0 = identity, t_1 = (y, z, x), t_2 = (z, x, y).
    The views form the cyclic group Z3 (t_1 applied three times is the identity). The
    pretext task asks which axis carries gravity/motion, which depends on the device's
    orientation on the body.
    """

    num_views = 3
    modality = "signal"

    @staticmethod
    def view(x: torch.Tensor, k: int) -> torch.Tensor:
        c = x.shape[1]
        if c % 3:
            raise ConfigError(f"method.views=axis_perm needs channels in 3-axis groups, got {c} channels")
        j = torch.arange(c, device=x.device)
        src = (j // 3) * 3 + (j % 3 + k) % 3
        return x.index_select(1, src)

    def __call__(self, x):
        return torch.cat([self.view(x, k) for k in range(3)])


# Default self-supervised family per data modality (``method.views=auto``).
AUTO_VIEWS = {"image": "rotation", "signal": "time_flip"}


def resolve_views(name: str, modality: str) -> str:
    """The view family a ``method.views`` value names (``auto``: by the data's modality)."""
    return AUTO_VIEWS.get(modality, "rotation") if name == "auto" else name


def build_views(name: str) -> ViewFamily:
    return TRANSFORMS.build(name)
