"""Pre-activation ResNets for 32x32 inputs (He et al., "Identity Mappings in Deep
Residual Networks", ECCV 2016), the ResNet-18/34/50/101 used by the
self-distillation literature on CIFAR (CS-KD, TF-KD, PS-KD, LSSKD Table III).

CIFAR stem (one 3x3 conv, stride 1, 64 channels, no max-pool), four stages of
pre-activation blocks with widths 64/128/256/512 (x4 for bottlenecks) and strides
1, 2, 2, 2, then the final BN + ReLU that a pre-activation network needs before
pooling, global average pooling and a linear classifier.
"""
from __future__ import annotations

from torch import nn

from .staged import StagedBackbone, plan_layout, register_variant, stack_stages


class PreActBasic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.project = None
        if stride != 1 or cin != planes:
            self.project = nn.Conv2d(cin, planes, 1, stride, bias=False)

    def forward(self, x):
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        # The projection reads the pre-activated input (He et al. 2016b, Fig. 4e).
        return out + (x if self.project is None else self.project(pre))


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.project = None
        if stride != 1 or cin != cout:
            self.project = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + (x if self.project is None else self.project(pre))


class PreActResNet(StagedBackbone):
    def __init__(self, block, num_blocks, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self._block = block
        self.stem = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        plan = [(p, n, 1 if i == 0 else 2) for i, (p, n) in enumerate(zip((64, 128, 256, 512), num_blocks))]
        self.stages, cin = stack_stages(64, plan, block, block.expansion)
        self.final = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(cin, num_classes)
        self._finish((in_channels, 32, 32), *plan_layout(plan, block.expansion))

    def extra_block(self) -> nn.Module:
        c = self.stage_channels[-1]
        return self.fresh_copy(self._block(c, c // self._block.expansion, 1))


_CONFIGS = {
    18: (PreActBasic, (2, 2, 2, 2)),
    34: (PreActBasic, (3, 4, 6, 3)),
    50: (PreActBottleneck, (3, 4, 6, 3)),
    101: (PreActBottleneck, (3, 4, 23, 3)),
}


preact_resnet18 = register_variant("preact_resnet18", PreActResNet, *_CONFIGS[18],
                                   doc="Pre-activation ResNet-18 with a CIFAR stem (32x32 inputs).")
preact_resnet34 = register_variant("preact_resnet34", PreActResNet, *_CONFIGS[34],
                                   doc="Pre-activation ResNet-34 with a CIFAR stem (32x32 inputs).")
preact_resnet50 = register_variant("preact_resnet50", PreActResNet, *_CONFIGS[50],
                                   doc="Pre-activation ResNet-50 with a CIFAR stem (32x32 inputs).")
preact_resnet101 = register_variant("preact_resnet101", PreActResNet, *_CONFIGS[101],
                                   doc="Pre-activation ResNet-101 with a CIFAR stem (32x32 inputs).")
