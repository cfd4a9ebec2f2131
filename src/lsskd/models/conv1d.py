"""Staged 1D backbones for wearable sensor time series, input (B, C_in, T).

``resnet1d``: a small 1D ResNet (He et al. 2016, basic blocks with 1D convs), widths
32-64-128 over three stages, stem conv k=7; the usual strong baseline for HAR windows.

``tinycnn1d``: three conv-BN-ReLU stages of stride 2 (about 14k parameters with the
default widths 16-32-64), sized for microcontroller-class devices.

Both fill the :class:`StagedBackbone` contract, so LSSKD branches, BYOT exits and the
profiler work on them unchanged. Any T works (global average pooling); the stage
strides are probed with T = 128, the HAPT / UCI HAR window length.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..errors import ConfigError
from ..registry import MODELS
from .staged import StagedBackbone, plan_layout, stack_stages


class BasicBlock1d(nn.Module):
    """Two k-tap convs with BN/ReLU and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1, kernel_size: int = 5):
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv1d(cin, cout, kernel_size, stride, pad, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = nn.Conv1d(cout, cout, kernel_size, 1, pad, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv1d(cin, cout, 1, stride, bias=False), nn.BatchNorm1d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ConvBNReLU1d(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1, kernel_size: int = 5):
        super().__init__(
            nn.Conv1d(cin, cout, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm1d(cout),
            nn.ReLU(inplace=True),
        )


def _check_positive(name: str, values: Sequence[int]) -> None:
    if not values or any(int(v) <= 0 for v in values):
        raise ConfigError(f"model.kwargs.{name} must be positive integers, got {list(values)!r}")


class ResNet1d(StagedBackbone):
    """stem (conv k=7, BN, ReLU) -> stages of ``blocks[i]`` BasicBlock1d (stride 1, 2, 2)."""

    def __init__(self, num_classes: int = 6, in_channels: int = 6, widths: Sequence[int] = (32, 64, 128),
                 blocks: Sequence[int] = (2, 2, 2), kernel_size: int = 5, stem_width: int | None = None):
        super().__init__()
        _check_positive("widths", widths)
        _check_positive("blocks", blocks)
        if len(blocks) != len(widths):
            raise ConfigError(f"model.kwargs.blocks has {len(blocks)} entries but widths has {len(widths)}")
        stem_width = stem_width or widths[0]
        self.kernel_size = kernel_size
        self.stem = nn.Sequential(
            nn.Conv1d(in_channels, stem_width, 7, 1, 3, bias=False),
            nn.BatchNorm1d(stem_width),
            nn.ReLU(inplace=True),
        )
        plan = [(w, n, 1 if i == 0 else 2) for i, (w, n) in enumerate(zip(widths, blocks))]
        self.stages, cin = stack_stages(stem_width, plan, lambda c, w, s: BasicBlock1d(c, w, s, kernel_size))
        self.final = nn.Identity()
        self.classifier = nn.Linear(cin, num_classes)
        self._finish((in_channels, 128), *plan_layout(plan))

    def extra_block(self) -> nn.Module:
        # With one block per stage the last block changes width/stride; build a C_S -> C_S one.
        c = self.stage_channels[-1]
        return self.fresh_copy(BasicBlock1d(c, c, 1, self.kernel_size))


class TinyCNN1d(StagedBackbone):
    """Three stages, each one conv-BN-ReLU of stride 2; no stem, no extra head layers."""

    def __init__(self, num_classes: int = 6, in_channels: int = 6, widths: Sequence[int] = (16, 32, 64),
                 kernel_size: int = 5):
        super().__init__()
        _check_positive("widths", widths)
        self.kernel_size = kernel_size
        self.stem = nn.Identity()
        stages, cin = [], in_channels
        for w in widths:
            stages.append(ConvBNReLU1d(cin, w, 2, kernel_size))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.final = nn.Identity()
        self.classifier = nn.Linear(cin, num_classes)
        self._finish((in_channels, 128), list(widths), [2] * len(widths))

    def extra_block(self) -> nn.Module:
        # The last child of a stage is its ReLU, so the default rule does not apply.
        c = self.stage_channels[-1]
        return self.fresh_copy(ConvBNReLU1d(c, c, 1, self.kernel_size))

    def last_stage_blocks(self):
        # Each stage is one conv unit, so the last stage at stride 1 is the extra block.
        return [self.extra_block()]


@MODELS.register("resnet1d")
def resnet1d(num_classes: int = 6, **kw) -> ResNet1d:
    """1D ResNet, widths 32-64-128, two BasicBlock1d per stage (kwargs: in_channels,
    widths, blocks, kernel_size, stem_width)."""
    return ResNet1d(num_classes, **kw)


@MODELS.register("tinycnn1d")
def tinycnn1d(num_classes: int = 6, **kw) -> TinyCNN1d:
    """Microcontroller-sized 1D CNN, widths 16-32-64 (kwargs: in_channels, widths, kernel_size)."""
    return TinyCNN1d(num_classes, **kw)
