"""ShuffleNet V1 (Zhang et al., CVPR 2018) and V2 (Ma et al., ECCV 2018) for 32x32
inputs, in the CIFAR layout of the distillation literature (CRD/HSAKD
``ShuffleV1`` / ``ShuffleV2``): a 1x1 conv stem with 24 channels at stride 1 (no
max-pool), three stages each opening with a stride-2 unit (16x16, 8x8, 4x4).

``shufflev1``: groups g = 3, stage widths 240/480/960, 4/8/4 units; a stride-2 unit
concatenates a 3x3 average-pooled shortcut to its grouped-conv branch. Its first
unit's 1x1 conv is ungrouped (24 input channels). ``final`` is Identity.

``shufflev2``: width 1x, stage widths 116/232/464 with 1 + 3/7/3 units (each stage
opens with a down-sampling unit that processes both halves); channel split 1/2;
``final`` is the 1x1 conv to 1024 + BN + ReLU.
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import MODELS
from .staged import StagedBackbone, plan_layout, stack_stages


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, *rest = x.shape
    return x.view(b, groups, c // groups, *rest).transpose(1, 2).reshape(b, c, *rest)


# ---------------------------------------------------------------- V1
class ShuffleV1Unit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        # A stride-2 unit concatenates the pooled input, so its branch makes the rest.
        branch_out = cout - cin if stride == 2 else cout
        if branch_out <= 0 or (stride == 1 and cin != cout):
            raise ValueError(f"ShuffleV1 unit cannot map {cin} -> {cout} channels at stride {stride}")
        mid = branch_out // 4
        g1 = 1 if cin == 24 else groups  # the stem's 24 channels are not grouped
        self.g1 = g1
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, branch_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_out)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AvgPool2d(3, 2, 1) if stride == 2 else None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.g1)
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.pool is not None:
            return self.relu(torch.cat([out, self.pool(x)], 1))
        return self.relu(out + x)


class ShuffleNetV1(StagedBackbone):
    def __init__(self, num_classes: int = 100, widths=(240, 480, 960), units=(4, 8, 4),
                 groups: int = 3, in_channels: int = 3):
        super().__init__()
        self._groups = groups
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True)
        )
        plan = [(w, n, 2) for w, n in zip(widths, units)]
        self.stages, cin = stack_stages(24, plan, lambda c, w, s: ShuffleV1Unit(c, w, s, groups))
        self.final = nn.Identity()
        self.classifier = nn.Linear(cin, num_classes)
        self._finish((in_channels, 32, 32), *plan_layout(plan))

    def extra_block(self) -> nn.Module:
        c = self.stage_channels[-1]
        return self.fresh_copy(ShuffleV1Unit(c, c, 1, self._groups))


# ---------------------------------------------------------------- V2
def _cbr(cin, cout, k, stride=1, groups=1, relu=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ShuffleV2Unit(nn.Module):
    """Stride 1: split channels in half, transform one half (1x1, 3x3 dw, 1x1),
    concatenate, shuffle. Stride 2 (or ``two_path=True``): both halves see the full
    input (and are down-sampled at stride 2); the output has ``cout`` channels."""

    def __init__(self, cin: int, cout: int, stride: int, two_path: bool | None = None):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if two_path is None:
            two_path = stride != 1
        if not two_path:
            if cin != cout or cout % 2:
                raise ValueError(f"ShuffleV2 stride-1 unit needs cin == cout (even), got {cin} -> {cout}")
            self.left = None
            src = half
        else:
            self.left = nn.Sequential(_cbr(cin, cin, 3, stride, groups=cin, relu=False), _cbr(cin, half, 1))
            src = cin
        self.right = nn.Sequential(
            _cbr(src, half, 1),
            _cbr(half, half, 3, stride, groups=half, relu=False),
            _cbr(half, half, 1),
        )

    def forward(self, x):
        if self.left is None:
            keep, move = x.chunk(2, dim=1)
            out = torch.cat([keep, self.right(move)], 1)
        else:
            out = torch.cat([self.left(x), self.right(x)], 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(StagedBackbone):
    def __init__(self, num_classes: int = 100, widths=(116, 232, 464), units=(3, 7, 3),
                 head: int = 1024, in_channels: int = 3):
        super().__init__()
        self.stem = _cbr(in_channels, 24, 1)
        stages, cin = [], 24
        for w, n in zip(widths, units):
            blocks = [ShuffleV2Unit(cin, w, 2)] + [ShuffleV2Unit(w, w, 1) for _ in range(n)]
            cin = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.final = _cbr(cin, head, 1)
        self.classifier = nn.Linear(head, num_classes)
        self._finish((in_channels, 32, 32), list(widths), [2] * len(widths))

    def extra_block(self) -> nn.Module:
        c = self.stage_channels[-1]
        return self.fresh_copy(ShuffleV2Unit(c, c, 1))

    def last_stage_blocks(self):
        # HSAKD's deepest ShuffleV2 branch: the stage's opening two-path unit at stride 1
        # (its DownBlock(C, C, stride=1)), then fresh copies of the stage's split units.
        c = self.stage_channels[-1]
        units = list(self.stages[-1].children())
        return [self.fresh_copy(ShuffleV2Unit(c, c, 1, two_path=True))] + [self.fresh_copy(u) for u in units[1:]]


@MODELS.register("shufflev1", "shufflenetv1")
def shufflev1(num_classes: int = 100, **kw):
    """CIFAR ShuffleNetV1, g = 3 (CRD/HSAKD ``ShuffleV1``)."""
    return ShuffleNetV1(num_classes, **kw)


@MODELS.register("shufflev2", "shufflenetv2")
def shufflev2(num_classes: int = 100, **kw):
    """CIFAR ShuffleNetV2 1x (CRD/HSAKD ``ShuffleV2``)."""
    return ShuffleNetV2(num_classes, **kw)
