"""CIFAR ResNets (He et al. 2016, Sec. 4.2) as used in the distillation literature
(CRD/HSAKD naming): resnet{8,14,20,32,44,56,110} with widths 16-32-64 and the
4x-wide resnet8x4 / resnet32x4 (32-64-128-256, three stages used)."""
from __future__ import annotations

from torch import nn

from ..registry import MODELS
from .staged import StagedBackbone, stack_stages


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(StagedBackbone):
    def __init__(self, depth: int, num_classes: int = 100, widths=(16, 16, 32, 64), in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        plan = [(w, n, 1 if i == 0 else 2) for i, w in enumerate(widths[1:])]
        self.stages, cin = stack_stages(widths[0], plan, BasicBlock)
        self.final = nn.Identity()
        self.classifier = nn.Linear(cin, num_classes)
        self._finish((in_channels, 32, 32))

    def extra_block(self) -> nn.Module:
        # With one block per stage (resnet8) the last block changes width and stride.
        c = self.stage_channels[-1]
        return self.fresh_copy(BasicBlock(c, c, 1))


def _register(depth: int, widths, name: str):
    @MODELS.register(name)
    def build(num_classes: int = 100, **kw):
        return CifarResNet(depth, num_classes, widths, **kw)

    build.__doc__ = f"CIFAR ResNet-{depth}, widths {widths}."
    return build


for _d in (8, 14, 20, 32, 44, 56, 110):
    _register(_d, (16, 16, 32, 64), f"resnet{_d}")
_register(8, (32, 64, 128, 256), "resnet8x4")
_register(32, (32, 64, 128, 256), "resnet32x4")
