"""Wide Residual Networks for CIFAR (Zagoruyko & Komodakis, BMVC 2016), in the
layout used by the distillation literature (CRD/HSAKD ``wrn_40_2`` etc.).

WRN-d-k: a 3x3 conv stem (16 channels), three stages of n = (d - 4) / 6
pre-activation basic blocks with widths 16k, 32k, 64k (strides 1, 2, 2), then
the final BN + ReLU, global average pooling and a linear classifier.
"""
from __future__ import annotations

from torch import nn

from .staged import StagedBackbone, plan_layout, register_variant, stack_stages


class WideBlock(nn.Module):
    """Pre-activation basic block (BN-ReLU-conv x2). When the width or stride
    changes, the 1x1 projection shortcut reads the *pre-activated* input, as in
    the original WRN, so the raw input never bypasses a BN-ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.project = None
        if stride != 1 or cin != cout:
            self.project = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.drop(self.relu(self.bn2(out))))
        skip = x if self.project is None else self.project(pre)
        return out + skip


class WideResNet(StagedBackbone):
    def __init__(self, depth: int, widen: int, num_classes: int = 100, drop_rate: float = 0.0,
                 in_channels: int = 3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        if widen < 1:
            raise ValueError(f"WRN widen factor must be >= 1, got {widen}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        plan = [(w, n, 1 if i == 0 else 2) for i, w in enumerate(widths[1:])]
        self.stages, cin = stack_stages(widths[0], plan, lambda c, w, s: WideBlock(c, w, s, drop_rate))
        self.final = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(cin, num_classes)
        self._drop_rate = drop_rate
        self._finish((in_channels, 32, 32), *plan_layout(plan))

    def extra_block(self) -> nn.Module:
        c = self.stage_channels[-1]
        return self.fresh_copy(WideBlock(c, c, 1, self._drop_rate))


def build_wrn(depth: int, widen: int, num_classes: int = 100, **kw) -> WideResNet:
    """Generic WRN-depth-widen builder (any depth = 6n + 4)."""
    return WideResNet(depth, widen, num_classes, **kw)


wrn_16_1 = register_variant("wrn_16_1", WideResNet, 16, 1, doc="WRN-16-1 for 32x32 inputs.")
wrn_16_2 = register_variant("wrn_16_2", WideResNet, 16, 2, doc="WRN-16-2 for 32x32 inputs.")
wrn_16_4 = register_variant("wrn_16_4", WideResNet, 16, 4, doc="WRN-16-4 for 32x32 inputs.")
wrn_28_10 = register_variant("wrn_28_10", WideResNet, 28, 10, doc="WRN-28-10 for 32x32 inputs.")
wrn_40_1 = register_variant("wrn_40_1", WideResNet, 40, 1, doc="WRN-40-1 for 32x32 inputs.")
wrn_40_2 = register_variant("wrn_40_2", WideResNet, 40, 2, doc="WRN-40-2 for 32x32 inputs.")
wrn_40_4 = register_variant("wrn_40_4", WideResNet, 40, 4, doc="WRN-40-4 for 32x32 inputs.")
