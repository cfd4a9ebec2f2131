"""VGG with batch norm for 32x32 inputs (Simonyan & Zisserman, ICLR 2015), in the
CIFAR layout of the distillation literature (CRD's ``vgg8``/``vgg13``): five conv
groups (3x3 conv with bias + BN + ReLU), 2x2 max-pooling between the first four
groups, no pooling before the fifth, global average pooling and a single linear
classifier on 512 channels (no fully connected stack).

Stages, one per resolution: ``stem`` is empty, stage 0 is group 1 (32x32),
stages 1 and 2 are pool + group 2 / group 3 (16x16, 8x8) and stage 3 is
pool + groups 4 and 5 (4x4), since groups 4 and 5 share a resolution.
"""
from __future__ import annotations

from torch import nn

from .staged import StagedBackbone, register_variant

# Convs per group for groups 1..5 (channels 64, 128, 256, 512, 512).
_DEPTHS = {
    "vgg8": (1, 1, 1, 1, 1),
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2, 2, 2, 2, 2),
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}
_WIDTHS = (64, 128, 256, 512, 512)


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class VGG(StagedBackbone):
    def __init__(self, depths, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        groups, cin = [], in_channels
        for n, w in zip(depths, _WIDTHS):
            layers = []
            for _ in range(n):
                layers.append(conv_bn_relu(cin, w))
                cin = w
            groups.append(layers)
        pool = lambda: nn.MaxPool2d(2, 2)  # noqa: E731
        self.stem = nn.Identity()
        self.stages = nn.ModuleList([
            nn.Sequential(*groups[0]),
            nn.Sequential(pool(), *groups[1]),
            nn.Sequential(pool(), *groups[2]),
            nn.Sequential(pool(), *groups[3], *groups[4]),
        ])
        self.final = nn.Identity()
        self.classifier = nn.Linear(cin, num_classes)
        self._finish((in_channels, 32, 32), [_WIDTHS[0], _WIDTHS[1], _WIDTHS[2], _WIDTHS[4]], [1, 2, 2, 2])

    def extra_block(self) -> nn.Module:
        c = self.stage_channels[-1]
        return self.fresh_copy(conv_bn_relu(c, c))

    def last_stage_blocks(self):
        # HSAKD's deepest VGG branch: the last stage's conv groups (4 and 5) on C_S
        # channels, no max-pool: one C_S -> C_S conv-BN-ReLU per conv of the stage.
        n = sum(isinstance(m, nn.Conv2d) for m in self.stages[-1].modules())
        return [self.extra_block() for _ in range(n)]


def build_vgg(name: str, num_classes: int = 100, **kw) -> VGG:
    """Any configuration in ``_DEPTHS`` (vgg8/11/13/16/19); only the ones the
    distillation tables use are registered, to keep the registry (and its tests) lean."""
    if name not in _DEPTHS:
        raise ValueError(f"unknown VGG configuration '{name}'; known: {', '.join(_DEPTHS)}")
    return VGG(_DEPTHS[name], num_classes, **kw)


vgg8 = register_variant("vgg8", VGG, _DEPTHS["vgg8"],
                        doc="VGG8-BN for 32x32 inputs, conv groups (1, 1, 1, 1, 1).")
vgg11 = register_variant("vgg11", VGG, _DEPTHS["vgg11"],
                         doc="VGG11-BN for 32x32 inputs, conv groups (1, 1, 2, 2, 2).")
vgg13 = register_variant("vgg13", VGG, _DEPTHS["vgg13"],
                         doc="VGG13-BN for 32x32 inputs, conv groups (2, 2, 2, 2, 2).")
