"""Configuration: nested defaults, YAML files, dotted ``key=value`` overrides.

Every key a user may set exists in :data:`DEFAULTS` (or, under ``method.``, in the
chosen method's ``defaults``). Unknown keys and values of the wrong type are
rejected with an error naming the key; values are parsed as YAML scalars, never
evaluated as code.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List

import yaml

from .errors import ConfigError


DEFAULTS: Dict[str, Any] = {
    "seed": 0,  # model initialisation, data order and augmentation (not the data subset: data.subset_seed)
    "out_dir": "runs/default",  # the run directory (never overwritten; resume with --resume)
    "plugins": [],  # your modules (dotted names or .py files) that register models/methods/data
    "model": {
        "name": "resnet20",  # a registered backbone (docs/models.md), or one of your own via plugins
        "kwargs": {},  # extra constructor arguments of the model, e.g. {width: 12}
    },
    "method": {"name": "ce"},  # method-specific keys come from the method's defaults (below)
    "data": {
        "name": "folder",  # folder | cifar10 | cifar100 | tiny_imagenet | digits | hapt ...
        "root": "",  # dataset folder (folder: ROOT/train/<class>/*, ROOT/test/<class>/*; docs/data.md)
        "download": False,  # fetch the dataset into data.root if missing (datasets with a download)
        "classes": [],  # keep only these classes (names, or N = the first N; [] = all)
        "train_fraction": 1.0,  # stratified subset of the training set (paper Fig. 5)
        "per_class": 0,  # exact images per class instead of a fraction (0 = off)
        "val_fraction": 0.0,  # stratified held-out split of the training data (0 = none)
        "val_split": "stratified",  # stratified (by class) | group (whole subjects; sensor data)
        "eval_on": "test",  # test | val: which split the per-epoch evaluation uses
        "subset_seed": 0,  # seed of the train_fraction / per_class / val_fraction draws
        "cache_dir": "",  # decoded-image cache ('' = ~/.cache/lsskd, 'none' = off)
        "image_size": 0,  # resize images to this square size (0 = native; digits: 8 or 16)
        "url": "",  # download URL override (https:// or file://; '' = the official one)
        "checksum": "",  # 'md5:<hex>' or 'sha256:<hex>' for data.url ('' = official)
        "mean": [],  # per-channel normalisation mean ([] = the dataset's own statistics)
        "std": [],  # per-channel normalisation std ([] = the dataset's own statistics)
        "activities": "basic",  # hapt: basic (6 activities, labels 0..5) | all (12, with transitions)
        "train_subjects": [],  # hapt/uci_har: keep only these training subjects ([] = all 21)
        "augment": {
            "crop_padding": 4,  # random crop after zero-padding by this many pixels (0 = off)
            "flip": True,  # random horizontal flip; set false where flipping changes the label
            "cutout": 0,  # Cutout square side in pixels (0 = off)
            "cutmix_prob": 0.0,  # probability a batch is CutMixed (0 = off)
            "cutmix_alpha": 1.0,  # CutMix: the mixing ratio is drawn from Beta(alpha, alpha)
            "mixup_alpha": 0.0,  # Mixup's Beta(alpha, alpha) on every batch CutMix left unmixed (0 = off)
            "jitter": 0.0,  # signals: additive Gaussian noise std (0 = off)
            "scaling": 0.0,  # signals: per-channel scale noise std (0 = off)
        },
    },
    "train": {
        "epochs": 240,  # training epochs (the learning-rate schedule spans them)
        "batch_size": 64,  # images per optimiser step (split over DDP ranks)
        "eval_batch_size": 256,  # images per evaluation batch
        "device": "auto",  # auto | cpu | cuda | cuda:N
        "amp": "off",  # mixed precision: off | bf16 | fp16 (fp16 with a gradient scaler)
        "channels_last": False,  # channels-last memory format (faster convolutions on some GPUs)
        "compile": False,  # torch.compile the backbone and branches
        "threads": 0,  # torch intra-op threads on CPU (0 = torch default)
        "progress": True,  # progress on stderr: a bar per epoch, and while image files are decoded
        "tensorboard": True,  # TensorBoard events in <out_dir>/tb (if tensorboard is installed)
        "ckpt_every_steps": 0,  # extra mid-epoch checkpoints (0 = epoch ends only)
        "nonfinite": "stop",  # stop | skip: what a non-finite loss/gradient does
        "max_skipped_steps": 10,  # nonfinite=skip: stop after skipping this many steps
        "max_steps_per_epoch": 0,  # cap steps per epoch (0 = full epoch); for smoke runs
        "deterministic": False,  # torch deterministic algorithms (warn where none exists)
        "bn_recalibrate": False,  # re-estimate BN stats on upright train images before eval
        "sync_bn": False,  # DDP on CUDA: synchronised batch norm across ranks
        "drop_last": True,  # drop the short last batch of each epoch (true keeps earlier results
        # bit-identical); false: it trains too, and every sample's stored prediction is
        # rewritten every epoch (docs/method.md)
    },
    "optim": {
        "name": "sgd",  # the optimiser (SGD only)
        "lr": 0.05,  # base learning rate
        "momentum": 0.9,  # SGD momentum
        "nesterov": False,  # Nesterov momentum
        "weight_decay": 5e-4,  # L2 weight decay (on every parameter, as in the paper)
        "schedule": "step",  # step (x lr_decay at each milestone) | cosine (to 0 over train.epochs)
        "milestones": [150, 210],  # schedule=step: epochs after which lr is multiplied by lr_decay
        "lr_decay": 0.1,  # schedule=step: the factor at each milestone
        "warmup_epochs": 0,  # linear warm-up from ~0 to lr over these epochs (0 = off)
    },
}

# Keys whose value is a free-form mapping (not validated key by key).
FREE_KEYS = {"model.kwargs", "data.classes"}  # data.classes: int N or a list of names

# Keys that change how a run executes but not its result: runs that differ only in these
# (and in their provenance) are the same experiment, for ``lsskd report``'s grouping and
# ``lsskd sweep``'s check of finished runs against the plan. ``seed`` is not one of them:
# it changes the result, and the report groups seeds on purpose.
EXECUTION_KEYS = frozenset({
    "out_dir", "train.progress", "train.tensorboard", "train.threads", "train.ckpt_every_steps",
    "train.eval_batch_size", "train.device", "train.compile", "train.channels_last", "data.cache_dir",
    # What evaluation logs beside the head (the view-aggregated ceiling), not what is trained:
    # tests/test_golden_trajectory.py checks the weights are bit-identical with it off.
    "method.eval_aggregate",
})
# A run's config.yaml also records the code that made it (git commit, torch version) under
# this key; it is not a setting, so loading a config file ignores it.
PROVENANCE_KEY = "provenance"


def is_execution_key(key: str) -> bool:
    """True for a dotted key in :data:`EXECUTION_KEYS` or under ``provenance.``."""
    return key in EXECUTION_KEYS or key == PROVENANCE_KEY or key.startswith(PROVENANCE_KEY + ".")


# Documented ranges of the numeric keys (interval notation: ``(0, 1]``, or ``>= 0``) and
# the allowed values of the keys with a fixed set; :func:`check_config` enforces both
# before any data is loaded, and docs/config.md lists them.
RANGES: Dict[str, str] = {
    "data.train_fraction": "(0, 1]",
    "data.val_fraction": "[0, 1)",
    "data.per_class": ">= 0",
    "data.image_size": ">= 0",
    "data.augment.crop_padding": ">= 0",
    "data.augment.cutout": ">= 0",
    "data.augment.cutmix_prob": "[0, 1]",
    "data.augment.cutmix_alpha": "> 0",
    "data.augment.mixup_alpha": ">= 0",
    "data.augment.jitter": ">= 0",
    "data.augment.scaling": ">= 0",
    "train.epochs": ">= 1",
    "train.batch_size": ">= 1",
    "train.eval_batch_size": ">= 1",
    "train.threads": ">= 0",
    "train.ckpt_every_steps": ">= 0",
    "train.max_skipped_steps": ">= 0",
    "train.max_steps_per_epoch": ">= 0",
    "optim.lr": ">= 0",
    "optim.momentum": "[0, 1]",
    "optim.weight_decay": ">= 0",
    "optim.lr_decay": "(0, 1]",
    "optim.warmup_epochs": ">= 0",
}
CHOICES: Dict[str, tuple] = {
    "data.val_split": ("stratified", "group"),
    "data.eval_on": ("test", "val"),
    "data.activities": ("basic", "all"),
    "train.amp": ("off", "bf16", "fp16"),
    "train.nonfinite": ("stop", "skip"),
    "optim.name": ("sgd",),
    "optim.schedule": ("step", "cosine"),
}


def in_range(value: float, spec: str) -> bool:
    """``value`` lies in ``spec`` (``(lo, hi]``-style interval or ``>= x`` / ``> x``); NaN never does."""
    import math

    if not math.isfinite(value):
        return False
    if spec.startswith((">=", ">")):
        lo = float(spec.lstrip(">= "))
        return value >= lo if spec.startswith(">=") else value > lo
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    return ((value >= lo) if spec[0] == "[" else (value > lo)) and ((value <= hi) if spec[-1] == "]" else (value < hi))


def check_values(cfg: Dict) -> None:
    """Every key of :data:`RANGES` and :data:`CHOICES` against its documented values; the
    error names the key, the value and what is allowed."""
    check_declared(flatten(cfg), RANGES, CHOICES)
    for m in cfg.get("optim", {}).get("milestones", []):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ConfigError(f"config key 'optim.milestones' must be a list of epochs >= 0, got {m!r}")


def check_declared(flat: Dict[str, Any], ranges: Dict[str, str], choices: Dict[str, tuple],
                   prefix: str = "") -> None:
    """``flat`` (dotted keys without ``prefix``) against declared ranges and choices; the
    error names ``prefix + key``, the value and what is allowed."""
    for key, spec in ranges.items():
        v = flat.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not in_range(v, spec):
            shown = f"in {spec}" if spec[0] in "([" else spec
            finite = "" if v == v and abs(v) != float("inf") else "a finite number "
            raise ConfigError(f"config key '{prefix}{key}' must be {finite}{shown}, got {v}")
    for key, allowed in choices.items():
        if key in flat and flat[key] not in allowed:
            raise ConfigError(f"config key '{prefix}{key}' must be {' or '.join(map(str, allowed))}, "
                              f"got {flat[key]!r}")


def check_config(cfg: Dict) -> None:
    """Cheap checks run before any data is loaded, so a bad config fails in milliseconds
    with the key named: ranges and choices, the device, the registered names (after
    importing ``plugins``), ``model.kwargs`` against the model's signature, and the
    method's own keys against its defaults."""
    import inspect

    from .plugins import import_plugins
    from .registry import DATASETS, METHODS, MODELS

    import_plugins(cfg.get("plugins", []))
    check_values(cfg)
    device = cfg["train"]["device"]
    if device != "auto":
        import torch

        try:
            torch.device(device)
        except RuntimeError:
            raise ConfigError(f"config key 'train.device' must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    for section, reg in (("model", MODELS), ("method", METHODS), ("data", DATASETS)):
        name = cfg[section].get("name")
        if name not in reg:
            raise ConfigError(f"{section}.name: unknown {reg.kind} {name!r}; "
                              f"registered: {', '.join(reg.names())} (one of your own: name the "
                              f"module that registers it in plugins=[...])")
    kwargs = cfg["model"].get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ConfigError(f"config key 'model.kwargs' must be a mapping, got {kwargs!r}")
    try:
        inspect.signature(MODELS.get(cfg["model"]["name"])).bind(num_classes=2, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model.kwargs do not fit model {cfg['model']['name']!r}: {e}") from None
    except ValueError:  # no introspectable signature: leave it to the constructor
        pass
    method_cls = METHODS.get(cfg["method"]["name"])
    mcfg = validate_section({k: v for k, v in cfg["method"].items() if k != "name"},
                            method_cls.defaults, "method.")
    # The method's declared ranges/choices and its cross-key rules, before any data is read.
    aug = cfg["data"].get("augment", {})
    mixed = 1.0 if aug.get("mixup_alpha", 0.0) > 0 else aug.get("cutmix_prob", 0.0)  # share of mixed batches
    method_cls.check_settings(mcfg, has_val=cfg["data"].get("val_fraction", 0) > 0, cutmix_prob=mixed)


def _merge(base: Dict, update: Dict, prefix: str, strict: bool) -> Dict:
    out = copy.deepcopy(base)
    for k, v in (update or {}).items():
        key = f"{prefix}{k}"
        if strict and k not in base:
            if key.startswith("method.") or key in FREE_KEYS or prefix.rstrip(".") in FREE_KEYS:
                out[k] = v
                continue
            raise ConfigError(f"unknown config key '{key}'")
        if isinstance(base.get(k), dict) and key not in FREE_KEYS:
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{key}' must be a mapping, got {v!r}")
            out[k] = _merge(base[k], v, key + ".", strict)
        else:
            out[k] = _check_type(key, base.get(k), v) if k in base else v
    return out


def _check_type(key: str, default: Any, value: Any) -> Any:
    if default is None or key in FREE_KEYS:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true/false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            # YAML reads a bare off/on (also no/yes) as a boolean: for a string key that is the
            # word the user typed (method.eval_aggregate=off); the key's choices check the rest.
            if isinstance(value, bool):
                return "on" if value else "off"
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return value
    return value


def parse_override(item: str) -> tuple[List[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{key}': cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def _nest(path: List[str], value: Any) -> Dict:
    d: Dict[str, Any] = {}
    cur = d
    for p in path[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[path[-1]] = value
    return d


def nest_overrides(items: List[str]) -> Dict:
    """``key.path=value`` overrides as one nested mapping (later items win), e.g. to write
    them into a config file."""
    out: Dict[str, Any] = {}
    for item in items:
        out = _deep_update(out, _nest(*parse_override(item)))
    return out


def load_yaml(path: str | Path, _seen: tuple = ()) -> Dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"config file {path}: _base_ chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: invalid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    data.pop(PROVENANCE_KEY, None)  # a run's record of its code, not a setting
    base = data.pop("_base_", None)
    if base:
        if not isinstance(base, str):
            raise ConfigError(f"config file {path}: _base_ must be a file name, got {base!r}")
        parent = load_yaml((path.parent / base).resolve(), _seen + (path.resolve(),))
        data = _deep_update(parent, data)
    return data


def _deep_update(a: Dict, b: Dict) -> Dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = v
    return out


def build_config(file: str | Path | None = None, overrides: List[str] | None = None) -> Dict:
    """Defaults <- YAML file (with optional ``_base_`` inheritance) <- overrides."""
    cfg = copy.deepcopy(DEFAULTS)
    if file:
        try:
            cfg = _merge(cfg, load_yaml(file), "", strict=True)
        except ConfigError as e:
            # load_yaml's own errors already name the file; say it once.
            raise ConfigError(str(e) if str(file) in str(e) else f"{file}: {e}") from None
    for item in overrides or []:
        path, value = parse_override(item)
        cfg = _merge(cfg, _nest(path, value), "", strict=True)
    return cfg


def merge(update: Dict, strict: bool = True, base: Dict | None = None) -> Dict:
    """``update`` (a nested config, e.g. read from a file) over ``base`` (default:
    :data:`DEFAULTS`), type-checked. ``strict=False`` keeps unknown keys instead of failing."""
    return _merge(DEFAULTS if base is None else base, update, "", strict)


def run_config(run_dir: str | Path) -> Dict:
    """The config a run directory was trained with, to resume it: its ``config.yaml`` over
    this version's defaults (a key added since keeps its default), ``out_dir`` = the directory."""
    cfg = _merge(DEFAULTS, load_yaml(Path(run_dir) / "config.yaml"), "", strict=True)
    cfg["out_dir"] = str(run_dir)
    return cfg


def validate_section(section: Dict, defaults: Dict, prefix: str) -> Dict:
    """Fill and check a component's own section (e.g. ``method.``) against its defaults."""
    out = copy.deepcopy(defaults)
    for k, v in section.items():
        if k == "name":
            out[k] = v
            continue
        if k not in defaults:
            raise ConfigError(
                f"unknown config key '{prefix}{k}' (known: {', '.join(sorted(defaults))})"
            )
        out[k] = _check_type(prefix + k, defaults[k], v)
    return out


def flatten(d: Dict, prefix: str = "") -> Dict[str, Any]:
    """Nested config -> {dotted key: value}; an empty mapping stays a value (``{}``)."""
    out: Dict[str, Any] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def dump(cfg: Dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
