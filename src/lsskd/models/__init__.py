"""Backbone zoo. Every model is a :class:`StagedBackbone` registered by name."""
from .staged import GlobalPool, StagedAdapter, StagedBackbone, describe_stages  # noqa: F401
from . import cifar_resnet  # noqa: F401
from . import conv1d  # noqa: F401  (1D backbones for sensor signals)
from . import wrn, preact_resnet, vgg, mobilenetv2, shufflenet, resnext, imagenet_resnet  # noqa: F401

from ..registry import MODELS


def build_model(name: str, num_classes: int, **kwargs) -> StagedBackbone:
    return MODELS.build(name, num_classes=num_classes, **kwargs)
