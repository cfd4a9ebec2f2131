"""Building the configured method: ``cfg.model`` as its backbone, ``cfg.method`` on top,
with the run's data described by a :class:`~lsskd.methods.base.MethodContext`."""
from __future__ import annotations

from typing import Dict

from ..data.base import DataBundle
from ..errors import ConfigError
from ..models import build_model
from ..registry import METHODS
from .base import Method, MethodContext


def build_method(cfg: Dict, bundle: DataBundle) -> Method:
    """The method of a full config (``model``, ``method``, ``data.augment``'s CutMix/Mixup settings)
    for a run on ``bundle``, freshly initialised (seed the RNG first)."""
    backbone = build_model(cfg["model"]["name"], len(bundle.classes), **cfg["model"].get("kwargs", {}))
    cls = METHODS.get(cfg["method"]["name"])
    acfg = cfg["data"]["augment"]
    # The share of mixed batches: Mixup mixes every batch CutMix leaves unmixed.
    mix_prob = 1.0 if acfg.get("mixup_alpha", 0.0) > 0 else acfg["cutmix_prob"]
    method = cls(backbone, cfg["method"], MethodContext.from_bundle(bundle, mix_prob))
    if method.wants_val and bundle.val is None:
        # Built-in methods refuse this themselves; a third-party one would otherwise fail
        # mid-run on a missing split.
        raise ConfigError(f"method {cfg['method']['name']!r} reads the held-out split after every "
                          f"epoch (wants_val): set data.val_fraction > 0 (e.g. 0.1)")
    return method
