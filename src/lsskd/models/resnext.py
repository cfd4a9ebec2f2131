"""ResNeXt-29 for 32x32 inputs (Xie et al., "Aggregated Residual Transformations",
CVPR 2017, Sec. 5.3): a 3x3 conv stem (64 channels, BN, ReLU), three stages of
three bottleneck blocks with output widths 256/512/1024 and strides 1/2/2, where
stage i's grouped 3x3 conv has cardinality C and C * d * 2^i channels.

Registered: ``resnext29_8x64d`` (alias ``resnext29``; 34.4M parameters at 10
classes, as in the paper's Table 7) and ``resnext29_2x64d``, a lighter variant of
the same design (9.2M). Any C x d (e.g. the paper's 16x64d, 68M) via
:func:`build_resnext29`.
"""
from __future__ import annotations

from torch import nn

from .staged import StagedBackbone, plan_layout, register_variant, stack_stages


class ResNeXtBlock(nn.Module):
    def __init__(self, cin: int, cout: int, group_width: int, cardinality: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, group_width, 1, bias=False),
            nn.BatchNorm2d(group_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(group_width, group_width, 3, stride, 1, groups=cardinality, bias=False),
            nn.BatchNorm2d(group_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(group_width, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class ResNeXt29(StagedBackbone):
    def __init__(self, cardinality: int = 8, base_width: int = 64, num_classes: int = 100,
                 in_channels: int = 3):
        super().__init__()
        self._cardinality = cardinality
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        )
        outs = (256, 512, 1024)
        self._group_widths = [cardinality * base_width * 2 ** i for i in range(len(outs))]
        group_width = dict(zip(outs, self._group_widths))
        plan = [(cout, 3, 1 if i == 0 else 2) for i, cout in enumerate(outs)]
        self.stages, cin = stack_stages(
            64, plan, lambda c, w, s: ResNeXtBlock(c, w, group_width[w], cardinality, s))
        self.final = nn.Identity()
        self.classifier = nn.Linear(cin, num_classes)
        self._finish((in_channels, 32, 32), *plan_layout(plan))

    def extra_block(self) -> nn.Module:
        c = self.stage_channels[-1]
        return self.fresh_copy(ResNeXtBlock(c, c, self._group_widths[-1], self._cardinality, 1))


def build_resnext29(cardinality: int, base_width: int, num_classes: int = 100, **kw) -> ResNeXt29:
    """Generic ResNeXt-29 (C x d) builder."""
    return ResNeXt29(cardinality, base_width, num_classes, **kw)


resnext29_8x64d = register_variant("resnext29_8x64d", ResNeXt29, 8, 64, aliases=("resnext29",),
                                   doc="ResNeXt-29 (8x64d) for 32x32 inputs.")
resnext29_2x64d = register_variant("resnext29_2x64d", ResNeXt29, 2, 64,
                                   doc="ResNeXt-29 (2x64d) for 32x32 inputs.")
