"""CIFAR ResNets (He et al. 2016, Sec. 4.2) as used in the distillation literature
(CRD/HSAKD naming): resnet{8,14,20,32,44,56,110} with widths 16-32-64 and the
4x-wide resnet8x4 / resnet32x4 (32-64-128-256, three stages used)."""
from __future__ import annotations

from torch import nn

from .staged import StagedBackbone, plan_layout, register_variant, stack_stages


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
        self._finish((in_channels, 32, 32), *plan_layout(plan))

    def extra_block(self) -> nn.Module:
        # With one block per stage (resnet8) the last block changes width and stride.
        c = self.stage_channels[-1]
        return self.fresh_copy(BasicBlock(c, c, 1))


THIN, WIDE = (16, 16, 32, 64), (32, 64, 128, 256)
resnet8 = register_variant("resnet8", CifarResNet, 8, doc=f"CIFAR ResNet-8, widths {THIN}.")
resnet14 = register_variant("resnet14", CifarResNet, 14, doc=f"CIFAR ResNet-14, widths {THIN}.")
resnet20 = register_variant("resnet20", CifarResNet, 20, doc=f"CIFAR ResNet-20, widths {THIN}.")
resnet32 = register_variant("resnet32", CifarResNet, 32, doc=f"CIFAR ResNet-32, widths {THIN}.")
resnet44 = register_variant("resnet44", CifarResNet, 44, doc=f"CIFAR ResNet-44, widths {THIN}.")
resnet56 = register_variant("resnet56", CifarResNet, 56, doc=f"CIFAR ResNet-56, widths {THIN}.")
resnet110 = register_variant("resnet110", CifarResNet, 110, doc=f"CIFAR ResNet-110, widths {THIN}.")
resnet8x4 = register_variant("resnet8x4", CifarResNet, 8, widths=WIDE, doc=f"CIFAR ResNet-8, widths {WIDE}.")
resnet32x4 = register_variant("resnet32x4", CifarResNet, 32, widths=WIDE,
                              doc=f"CIFAR ResNet-32, widths {WIDE}.")
