"""Wearable sensor datasets (modality ``signal``): windows of a waist-worn smartphone's
tri-axial accelerometer and gyroscope, as float32 tensors (N, C, T), channels first.

``hapt``: the UCI HAPT windows as one ``.npz`` (``x`` (N, T, C) float32, ``y`` 0..11,
``subject`` 1..30, optional ``channels``); ``data.root`` is the file or its folder.
``data.activities``: ``basic`` keeps the six activities (labels 0..5, as most published
results), ``all`` adds the six postural transitions (labels 6..11).

``uci_har``: the official "UCI HAR Dataset" folder (``train/Inertial Signals/
total_acc_x_train.txt`` ...); channels total_acc_{x,y,z} (g) + body_gyro_{x,y,z} (rad/s),
the same units and order as ``hapt``.

Both use the standard UCI HAR subject split (test subjects 2, 4, 9, 10, 12, 13, 18, 20,
24) and fit the per-channel normalisation on the training subjects only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..registry import DATASETS
from .base import ArrayDataset, DataBundle, channel_stats

TEST_SUBJECTS = (2, 4, 9, 10, 12, 13, 18, 20, 24)
HAPT_FILE = "hapt_windows.npz"
HAPT_CLASSES = [
    "walking", "walking_upstairs", "walking_downstairs", "sitting", "standing", "laying",
    "stand_to_sit", "sit_to_stand", "sit_to_lie", "lie_to_sit", "stand_to_lie", "lie_to_stand",
]
NUM_BASIC = 6
UCI_HAR_SIGNALS = ("total_acc_x", "total_acc_y", "total_acc_z", "body_gyro_x", "body_gyro_y", "body_gyro_z")
UCI_HAR_FOLDER = "UCI HAR Dataset"


def _root(cfg: Dict) -> Path:
    root = cfg.get("root") or ""
    if not root:
        raise DataError(f"data.root must be set for dataset '{cfg.get('name')}'")
    return Path(root).expanduser()


def _check_finite(x: np.ndarray, where: str) -> None:
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise DataError(f"{where}: {bad} non-finite sensor value(s) (NaN/inf); clean or drop those windows")


def _train_subjects(cfg: Dict) -> List[int]:
    keep = cfg.get("train_subjects", []) or []
    if not isinstance(keep, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in keep):
        raise DataError(f"data.train_subjects must be a list of subject ids (integers), got {keep!r}")
    return sorted(set(keep))


def _bundle(x: np.ndarray, y: np.ndarray, subject: np.ndarray, classes: List[str], name: str,
            channels: Sequence[str], info: Dict, train_subjects: Sequence[int] = ()) -> DataBundle:
    """Subject split, channels-first float32 tensors, train-only normalisation statistics.
    ``train_subjects`` (non-empty) keeps only those training subjects; the test subjects
    stay the standard ones, so fewer training subjects means a model that sees fewer
    people and over-fits them (issue 18's sensor cell)."""
    test_mask = np.isin(subject, TEST_SUBJECTS)
    tr, te = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    if len(train_subjects):
        present = set(subject[tr].tolist())
        bad = [s for s in train_subjects if s not in present]
        if bad:
            why = "test subjects of the standard split" if set(bad) <= set(TEST_SUBJECTS) else "not training subjects here"
            raise DataError(f"{name}: data.train_subjects {bad} are {why} (training subjects: {sorted(present)})")
        tr = tr[np.isin(subject[tr], list(train_subjects))]
    if not len(tr) or not len(te):
        raise DataError(f"{name}: the standard subject split leaves an empty "
                        f"{'train' if not len(tr) else 'test'} set (subjects {sorted(set(subject.tolist()))})")

    def part(idx, split):
        xs = torch.from_numpy(np.ascontiguousarray(x[idx].transpose(0, 2, 1), dtype=np.float32))
        return ArrayDataset(xs, torch.from_numpy(y[idx].astype(np.int64)), list(classes), f"{name}[{split}]",
                            source_index=torch.from_numpy(idx.astype(np.int64)),
                            groups=torch.from_numpy(subject[idx].astype(np.int64)))

    train, test = part(tr, "train"), part(te, "test")
    mean, std = channel_stats(train.x)
    info = dict(info, channels=list(channels),
                train_subjects=sorted(set(subject[tr].tolist())),
                test_subjects=sorted(set(subject[te].tolist())))
    return DataBundle(train, test, mean=mean, std=std, modality="signal", info=info,
                      subjects_applied=bool(len(train_subjects)))


def _activities(cfg: Dict) -> str:
    mode = cfg.get("activities", "basic")
    if mode not in ("basic", "all"):
        raise ConfigError(f"data.activities must be 'basic' or 'all', got {mode!r}")
    return mode


@DATASETS.register("hapt")
def hapt_dataset(cfg: Dict) -> DataBundle:
    """UCI HAPT windows (128 samples at 50 Hz, 6 channels) from ``hapt_windows.npz``."""
    root = _root(cfg)
    path = root / HAPT_FILE if root.is_dir() else root
    if not path.is_file():
        raise DataError(f"data.root: HAPT windows not found: {path} (expected {HAPT_FILE} or its folder)")
    mode = _activities(cfg)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz file: {e}") from None
    for key in ("x", "y", "subject"):
        if key not in arrays:
            raise DataError(f"{path}: missing array '{key}' (found: {', '.join(sorted(arrays))})")
    x, y, subject = arrays["x"], arrays["y"].astype(np.int64), arrays["subject"].astype(np.int64)
    if x.ndim != 3:
        raise DataError(f"{path}: 'x' must be (N, T, C) windows, got shape {x.shape}")
    if not (len(x) == len(y) == len(subject)):
        raise DataError(f"{path}: 'x', 'y', 'subject' have {len(x)}, {len(y)}, {len(subject)} rows")
    if len(y) and (y.min() < 0 or y.max() >= len(HAPT_CLASSES)):
        raise DataError(f"{path}: label {int(y.min() if y.min() < 0 else y.max())} outside 0..{len(HAPT_CLASSES) - 1}")
    _check_finite(x, str(path))
    channels = [str(c) for c in arrays["channels"]] if "channels" in arrays else [f"ch{i}" for i in range(x.shape[2])]
    classes = HAPT_CLASSES
    if mode == "basic":
        keep = y < NUM_BASIC
        x, y, subject = x[keep], y[keep], subject[keep]
        classes = HAPT_CLASSES[:NUM_BASIC]
    bundle = _bundle(x, y, subject, classes, str(path), channels, {"file": str(path), "activities": mode},
                     _train_subjects(cfg))
    if mode == "basic":
        # Row provenance in the .npz, not in the filtered arrays.
        rows = torch.from_numpy(np.flatnonzero(keep))
        bundle.train.source_index = rows[bundle.train.source_index]
        bundle.test.source_index = rows[bundle.test.source_index]
    return bundle


def _read_matrix(path: Path, dtype=np.float64) -> np.ndarray:
    """A whitespace-separated text matrix (one row per line); clear errors on ragged rows."""
    if not path.is_file():
        raise DataError(f"missing file {path}")
    text = path.read_text()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{path}: file is empty")
    width = len(lines[0].split())
    try:
        flat = np.array(text.split(), dtype=dtype)
    except ValueError as e:
        raise DataError(f"{path}: non-numeric value ({e})") from None
    if flat.size != len(lines) * width:
        lens = [len(ln.split()) for ln in lines]
        row = next(i for i, n in enumerate(lens) if n != width)
        raise DataError(f"{path}: line {row + 1} has {lens[row]} values, line 1 has {width}")
    return flat.reshape(len(lines), width)


def _uci_har_folder(root: Path) -> Path:
    if (root / UCI_HAR_FOLDER).is_dir():
        root = root / UCI_HAR_FOLDER
    if not root.is_dir():
        hint = " (extract the archive first)" if root.suffix == ".zip" else ""
        raise DataError(f"data.root: UCI HAR folder not found: {root}{hint}")
    if not (root / "train").is_dir():
        raise DataError(f"data.root: {root} has no train/ folder (expected the 'UCI HAR Dataset' layout)")
    return root


def _uci_har_split(root: Path, split: str, num_classes: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    folder = root / split
    sig = []
    for s in UCI_HAR_SIGNALS:
        path = folder / "Inertial Signals" / f"{s}_{split}.txt"
        m = _read_matrix(path, np.float32)
        _check_finite(m, str(path))
        if sig and m.shape != sig[0].shape:
            raise DataError(f"{path}: shape {m.shape} differs from {UCI_HAR_SIGNALS[0]}_{split}.txt {sig[0].shape}")
        sig.append(m)
    x = np.stack(sig, axis=2)  # (N, T, C)
    ypath = folder / f"y_{split}.txt"
    y = _read_matrix(ypath).ravel()
    if len(y) != len(x):
        raise DataError(f"{ypath}: {len(y)} labels but {len(x)} windows in Inertial Signals/")
    if y.size and (y.min() < 1 or y.max() > num_classes or np.any(y != np.round(y))):
        bad = y[(y < 1) | (y > num_classes) | (y != np.round(y))][0]
        raise DataError(f"{ypath}: label {bad:g} outside 1..{num_classes} (activity_labels.txt)")
    spath = folder / f"subject_{split}.txt"
    subject = _read_matrix(spath).ravel().astype(np.int64)
    if len(subject) != len(x):
        raise DataError(f"{spath}: {len(subject)} subject ids but {len(x)} windows")
    return x, y.astype(np.int64) - 1, subject


@DATASETS.register("uci_har")
def uci_har_dataset(cfg: Dict) -> DataBundle:
    """The official UCI HAR Dataset (Anguita et al. 2013), 6 activities, 6 raw channels.

    The official train/test folders already follow the standard subject split; they
    are concatenated and re-split by subject, which checks that they do."""
    root = _uci_har_folder(_root(cfg))
    lpath = root / "activity_labels.txt"
    if not lpath.is_file():
        raise DataError(f"missing file {lpath}")
    names: Dict[int, str] = {}
    for i, ln in enumerate(lpath.read_text().splitlines()):
        parts = ln.split()
        if not parts:
            continue
        if len(parts) < 2 or not parts[0].isdigit():
            raise DataError(f"{lpath}: line {i + 1} is not '<id> <NAME>': {ln!r}")
        names[int(parts[0])] = parts[1].lower()
    if sorted(names) != list(range(1, len(names) + 1)):
        raise DataError(f"{lpath}: activity ids must be 1..K, got {sorted(names)}")
    classes = [names[i] for i in range(1, len(names) + 1)]
    parts = [_uci_har_split(root, s, len(classes)) for s in ("train", "test")]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    subject = np.concatenate([p[2] for p in parts])
    bundle = _bundle(x, y, subject, classes, str(root), UCI_HAR_SIGNALS, {"root": str(root)},
                     _train_subjects(cfg))
    official_test = set(parts[1][2].tolist())
    if set(bundle.info["test_subjects"]) != official_test:
        raise DataError(f"{root}: test/ holds subjects {sorted(official_test)}, not the standard "
                        f"test subjects {list(TEST_SUBJECTS)}")
    return bundle
