"""ImageNet ResNets (He et al., CVPR 2016) -- ``resnet18``, ``resnet34``,
``resnet50``: 7x7 stride-2 conv + BN + ReLU + 3x3 stride-2 max-pool stem, four
stages (widths 64/128/256/512, x4 for bottlenecks, strides 1/2/2/2), global
average pooling, linear classifier. Bottlenecks stride in their 3x3 conv (the
"v1.5" variant most public ImageNet checkpoints use); projection shortcuts are
1x1 conv + BN. Probe shape 3x224x224; any input of at least 32x32 works because
pooling is global.

The same networks with a CIFAR stem (3x3 stride-1 conv, no max-pool) are
available with ``ResNet(..., cifar_stem=True)``; ``resnet18_cifar`` is registered:
the post-activation "ResNet-18" of many CIFAR papers (11,220,132 parameters at
100 classes). For the pre-activation versions see :mod:`lsskd.models.preact_resnet`.
"""
from __future__ import annotations

from torch import nn

from .staged import StagedBackbone, plan_layout, register_variant, stack_stages


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, planes, 3, stride, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, 1, 1, bias=False),
            nn.BatchNorm2d(planes),
        )
        self.shortcut = _shortcut(cin, planes, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(cin, planes, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = _shortcut(cin, cout, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(StagedBackbone):
    def __init__(self, block, num_blocks, num_classes: int = 1000, cifar_stem: bool = False,
                 in_channels: int = 3):
        super().__init__()
        self._block = block
        if cifar_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
            )
            probe = (in_channels, 32, 32)
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
            probe = (in_channels, 224, 224)
        plan = [(p, n, 1 if i == 0 else 2) for i, (p, n) in enumerate(zip((64, 128, 256, 512), num_blocks))]
        self.stages, cin = stack_stages(64, plan, block, block.expansion)
        self.final = nn.Identity()
        self.classifier = nn.Linear(cin, num_classes)
        self._finish(probe, *plan_layout(plan, block.expansion))

    def extra_block(self) -> nn.Module:
        c = self.stage_channels[-1]
        return self.fresh_copy(self._block(c, c // self._block.expansion, 1))


_CONFIGS = {18: (Basic, (2, 2, 2, 2)), 34: (Basic, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}


resnet18 = register_variant("resnet18", ResNet, *_CONFIGS[18], num_classes=1000,
                            doc="ResNet-18 with the ImageNet stem.")
resnet34 = register_variant("resnet34", ResNet, *_CONFIGS[34], num_classes=1000,
                            doc="ResNet-34 with the ImageNet stem.")
resnet50 = register_variant("resnet50", ResNet, *_CONFIGS[50], num_classes=1000,
                            doc="ResNet-50 with the ImageNet stem.")
resnet18_cifar = register_variant("resnet18_cifar", ResNet, *_CONFIGS[18], cifar_stem=True,
                                  doc="ResNet-18 with a CIFAR stem.")
