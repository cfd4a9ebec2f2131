"""MobileNetV2 for 32x32 inputs (Sandler et al., CVPR 2018) in the CIFAR layout of
the distillation literature (CRD/HSAKD).

Differences from the ImageNet network, kept for comparability with published
CIFAR numbers: the second bottleneck group (24 channels) keeps stride 1, every
inverted residual has its 1x1 expansion conv (also when t = 1), activations are
ReLU, and the 1x1 head conv keeps 1280 channels for width multipliers <= 1.

Registered names:
  ``mobilenetv2`` = ``mobilenetv2_w05``: width 0.5, expansion t = 6 -- the
      "MobileNetV2" student of CRD/HSAKD tables (0.81M parameters at 100 classes).
  ``mobilenetv2_w10``: the same layout at width 1.0 (2.35M parameters).

Stages, one per resolution (32x32 input): stem = 3x3 conv stride 2 (16x16);
stage 0 = groups 1-2 (16x16), stage 1 = group 3 (8x8), stage 2 = groups 4-5
(4x4), stage 3 = groups 6-7 (2x2). ``final`` is the 1x1 head conv + BN + ReLU,
so every branch ends with its own head conv.
"""
from __future__ import annotations

import math

from torch import nn

from ..registry import MODELS
from .staged import StagedBackbone

# (expansion, channels, blocks, stride) per group; expansion None = use t.
_GROUPS = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)
# Which groups make up each stage (a stage ends where the resolution drops next).
_STAGE_GROUPS = ((0, 1), (2,), (3, 4), (5, 6))


def _conv_bn(cin, cout, k, stride=1, groups=1, relu=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise (stride) -> 1x1 linear projection; identity
    skip when the shape is unchanged."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        mid = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            _conv_bn(cin, mid, 1),
            _conv_bn(mid, mid, 3, stride, groups=mid),
            _conv_bn(mid, cout, 1, relu=False),
        )

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.residual else out


class MobileNetV2(StagedBackbone):
    def __init__(self, num_classes: int = 100, width: float = 0.5, expansion: int = 6,
                 in_channels: int = 3):
        super().__init__()
        if width <= 0:
            raise ValueError(f"MobileNetV2 width must be > 0, got {width}")
        self._expansion = expansion
        self._width = width
        cin = int(32 * width)
        self.stem = _conv_bn(in_channels, cin, 3, stride=2)
        groups = []
        for t, c, n, s in _GROUPS:
            cout = int(c * width)
            blocks = []
            for b in range(n):
                blocks.append(InvertedResidual(cin, cout, s if b == 0 else 1, t or expansion))
                cin = cout
            groups.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(
            nn.Sequential(*(groups[g] for g in idx)) for idx in _STAGE_GROUPS
        )
        head = int(1280 * width) if width > 1.0 else 1280
        self.final = _conv_bn(cin, head, 1)
        self.classifier = nn.Linear(head, num_classes)
        # A stage's output: its last group's width; its stride: the product of its groups'.
        channels = [int(_GROUPS[idx[-1]][1] * width) for idx in _STAGE_GROUPS]
        strides = [math.prod(_GROUPS[g][3] for g in idx) for idx in _STAGE_GROUPS]
        self._finish((in_channels, 32, 32), channels, strides)

    def extra_block(self) -> nn.Module:
        # The last stage ends with a width-changing block, so build a C -> C one.
        c = self.stage_channels[-1]
        return self.fresh_copy(InvertedResidual(c, c, 1, self._expansion))

    def last_stage_blocks(self):
        # HSAKD's block_extractor4: the last stage's groups (6-7) rebuilt with stride 1 on
        # the stage's own output width: C_S -> c6 (no skip), c6 -> c6 ..., c6 -> c7.
        cin, blocks = self.stage_channels[-1], []
        for g in _STAGE_GROUPS[-1]:
            t, c, n, _ = _GROUPS[g]
            cout = int(c * self._width)
            for _ in range(n):
                blocks.append(self.fresh_copy(InvertedResidual(cin, cout, 1, t or self._expansion)))
                cin = cout
        return blocks


@MODELS.register("mobilenetv2_w05", "mobilenetv2")
def mobilenetv2_w05(num_classes: int = 100, **kw):
    """CIFAR MobileNetV2, width 0.5, t = 6 (the CRD/HSAKD student)."""
    return MobileNetV2(num_classes, width=0.5, **kw)


@MODELS.register("mobilenetv2_w10")
def mobilenetv2_w10(num_classes: int = 100, **kw):
    """CIFAR MobileNetV2 (CRD layout), width 1.0, t = 6."""
    return MobileNetV2(num_classes, width=1.0, **kw)
