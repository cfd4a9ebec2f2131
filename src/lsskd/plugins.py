"""User code named by the ``plugins`` config key.

A model, method or dataset registered in the user's own module (``@MODELS.register``,
``register_method``, ``@DATASETS.register``) exists only once that module is imported. The
``plugins`` key lists such modules, by dotted name (importable from ``sys.path``) or as a
``.py`` file, and every command that builds a run from a config imports them first: train
(also ``--resume``), sweep, tune, eval, export and predict. The key is stored in the run's
``config.yaml`` and checkpoints, so the run can be rebuilt later from those alone.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, List

from .errors import ConfigError


def import_plugins(names: Any) -> List[ModuleType]:
    """Import each entry of ``plugins`` once (a second call is a no-op) and return the modules."""
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(f"config key 'plugins' must be a list of module names or .py files, got {names!r}")
    return [_import_file(n) if n.endswith(".py") else _import_module(n) for n in names]


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise ConfigError(f"plugins: cannot import {name!r} ({e}); install it, add its folder "
                              "to PYTHONPATH, or give the path of a .py file") from None
        raise  # the plugin itself imports something missing: its own traceback says what


def _import_file(name: str) -> ModuleType:
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"plugins: {name}: no such file (relative paths are read from {Path.cwd()})")
    # One module per file path, so a second import does not register everything twice.
    key = f"lsskd_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[key]
        raise
    return module
