"""Dataset factories and :func:`build_data`, which applies the config's subsetting."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

from ..registry import DATASETS
from .base import (DataBundle, channel_stats, group_split, resolve_classes, stratified_indices, stratified_split)
from ..errors import DataError
from .folder import list_class_folder, load_selected

CIFAR100_MEAN = [0.5071, 0.4865, 0.4409]
CIFAR100_STD = [0.2673, 0.2564, 0.2762]


def _root(cfg: Dict) -> Path:
    root = cfg.get("root") or ""
    if not root:
        raise DataError(f"data.root must be set for dataset '{cfg['name']}'")
    return Path(root).expanduser()


@DATASETS.register("folder")
def folder_dataset(cfg: Dict) -> DataBundle:
    """A class-folder tree with ``train/`` and ``test/`` under ``data.root``. The config's
    class subset and per-class draw pick files before anything is decoded."""
    root = _root(cfg)
    if not root.is_dir():
        raise DataError(f"data.root does not exist: {root}")
    size = int(cfg.get("image_size", 0) or 0)
    image_size = (size, size) if size else None
    classes, train_items = list_class_folder(root / "train")
    _, test_items = list_class_folder(root / "test", classes)
    train = load_selected(train_items, classes, cfg, True, image_size, f"{root}/train")
    test = load_selected(test_items, classes, cfg, False, image_size, f"{root}/test")
    if train.x.shape[1:] != test.x.shape[1:]:
        raise DataError(f"train images {tuple(train.x.shape[1:])} and test images "
                        f"{tuple(test.x.shape[1:])} under {root} differ in size")
    return DataBundle(train, test, subset_applied=True)


def build_run_data(cfg: Dict, main: bool = True) -> DataBundle:
    """A run's data from its whole config: :func:`build_data` on ``cfg["data"]``, with
    decoding's progress bar and cache lines following ``train.progress`` (and shown on the
    first rank only, ``main``). Training, ``lsskd eval`` and the deploy commands all build
    data this way. The flag goes into a copy of the data section; it is no config key of its
    own, and ``cfg`` (saved as config.yaml) is left unchanged."""
    progress = bool(cfg.get("train", {}).get("progress", True)) and main
    return build_data({**cfg["data"], "progress": progress})


def build_data(cfg: Dict) -> DataBundle:
    """Build the dataset named by ``data.name`` and apply, in order: the class subset
    (``data.classes``, train and test alike), the stratified training fraction /
    per-class count, the held-out validation split (by class, or by group with
    ``data.val_split=group``), and normalisation statistics
    (the dataset's own unless given)."""
    bundle: DataBundle = DATASETS.build(cfg["name"], cfg)
    if cfg.get("train_subjects") and not bundle.subjects_applied:
        raise DataError(f"data.train_subjects={cfg['train_subjects']!r}: dataset '{cfg['name']}' has no "
                        f"subjects to select (the sensor datasets hapt and uci_har do); remove the key")
    # Image-file datasets apply the first two steps to their file lists before decoding
    # (bundle.subset_applied); for the others they are applied to the decoded tensors here.
    if cfg.get("classes", []) != [] and not bundle.subset_applied:
        keep = resolve_classes(cfg["classes"], bundle.train.classes)
        bundle.train, bundle.test = bundle.train.select_classes(keep), bundle.test.select_classes(keep)
        if bundle.val is not None:
            bundle.val = bundle.val.select_classes(keep)
    train = bundle.train
    if (cfg.get("per_class", 0) or cfg.get("train_fraction", 1.0) < 1.0) and not bundle.subset_applied:
        idx = stratified_indices(train.y, cfg.get("train_fraction", 1.0), cfg.get("per_class", 0),
                                 cfg.get("subset_seed", 0))
        train = train.subset(idx)
    how = cfg.get("val_split", "stratified")
    if how not in ("stratified", "group"):
        raise DataError(f"data.val_split must be 'stratified' or 'group', got {how!r}")
    if cfg.get("val_fraction", 0.0) > 0:
        if how == "group":
            if train.groups is None:
                raise DataError(f"data.val_split=group: dataset '{cfg['name']}' has no groups "
                                f"(subjects); use data.val_split=stratified")
            tr, va = group_split(train.groups, cfg["val_fraction"], cfg.get("subset_seed", 0))
        else:
            tr, va = stratified_split(train.y, cfg["val_fraction"], cfg.get("subset_seed", 0))
        bundle.val = train.subset(va, name=f"{train.name}[val]")
        train = train.subset(tr)
    bundle.train = train
    if cfg.get("mean"):
        bundle.mean, bundle.std = list(cfg["mean"]), list(cfg["std"])
        if len(bundle.mean) != train.x.shape[1] or len(bundle.std) != train.x.shape[1]:
            raise DataError(f"data.mean/data.std need {train.x.shape[1]} values each")
    elif not bundle.mean:
        bundle.mean, bundle.std = channel_stats(train.x)
    if cfg.get("eval_on", "test") == "val" and bundle.val is None:
        raise DataError("data.eval_on=val needs data.val_fraction > 0")
    return bundle
