"""In-memory datasets that return sample indices, plus stratified subsetting.

Training data lives in memory as one tensor (uint8 N x C x H x W for images,
float32 N x C x T for signals). Batches are index tensors into it, so every
sample keeps its index i, which per-sample state (the soft-target store) needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..errors import DataError


@dataclass
class ArrayDataset:
    x: torch.Tensor
    y: torch.Tensor
    classes: List[str]
    name: str = ""
    # Index of each sample in the dataset it was cut from (for provenance).
    source_index: Optional[torch.Tensor] = None
    # Group of each sample (e.g. the subject a sensor window came from), for group-wise
    # held-out splits; None when the dataset has no groups.
    groups: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.y.dtype != torch.int64:
            self.y = self.y.long()
        if len(self.x) != len(self.y):
            raise DataError(f"{self.name}: {len(self.x)} inputs but {len(self.y)} labels")
        if len(self.y) and (int(self.y.min()) < 0 or int(self.y.max()) >= len(self.classes)):
            bad = int(self.y.max()) if int(self.y.max()) >= len(self.classes) else int(self.y.min())
            raise DataError(
                f"{self.name}: label {bad} out of range for {len(self.classes)} classes"
            )
        if self.source_index is None:
            self.source_index = torch.arange(len(self.y))
        if self.groups is not None and len(self.groups) != len(self.y):
            raise DataError(f"{self.name}: {len(self.groups)} group ids but {len(self.y)} samples")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, idx: torch.Tensor | Sequence[int], name: str | None = None) -> "ArrayDataset":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ArrayDataset(self.x[idx], self.y[idx], list(self.classes), name or self.name,
                            self.source_index[idx], None if self.groups is None else self.groups[idx])

    def select_classes(self, keep: Sequence[int]) -> "ArrayDataset":
        """Only the samples of classes ``keep`` (old indices), relabelled 0..len(keep)-1
        in the order given."""
        idx, new = class_selection(self.y, len(self.classes), keep)
        return ArrayDataset(self.x[idx], new, [self.classes[k] for k in keep], self.name,
                            self.source_index[idx], None if self.groups is None else self.groups[idx])


@dataclass
class DataBundle:
    train: ArrayDataset
    test: ArrayDataset
    val: Optional[ArrayDataset] = None
    mean: List[float] = field(default_factory=list)
    std: List[float] = field(default_factory=list)
    modality: str = "image"  # image | signal
    info: Dict = field(default_factory=dict)
    # True when the factory already applied data.classes and data.train_fraction /
    # data.per_class (to its file list, before decoding), so build_data must not again.
    subset_applied: bool = False
    # True when the factory kept only data.train_subjects; build_data refuses the key for
    # datasets that do not, rather than train on every subject unannounced.
    subjects_applied: bool = False

    @property
    def classes(self) -> List[str]:
        return self.train.classes

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


def resolve_classes(spec, classes: List[str]) -> List[int]:
    """Indices of the classes named by ``data.classes``: an int N (the first N classes)
    or a list of class names (kept in the order given). Errors name the bad value."""
    if isinstance(spec, bool) or not isinstance(spec, (int, list, tuple)):
        raise DataError(f"data.classes must be a number of classes or a list of class names, got {spec!r}")
    if isinstance(spec, int):
        if not 1 <= spec <= len(classes):
            raise DataError(f"data.classes={spec} but the dataset has {len(classes)} classes")
        return list(range(spec))
    names = [str(c) for c in spec]
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise DataError(f"data.classes names unknown classes {unknown[:5]}; the dataset has "
                        f"{classes[:5]}{'...' if len(classes) > 5 else ''}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"data.classes lists {dup} more than once")
    if not names:
        raise DataError("data.classes is an empty list (leave it out to keep every class)")
    return [classes.index(n) for n in names]


def class_selection(labels: torch.Tensor, num_classes: int, keep: Sequence[int]):
    """(positions, new labels): the samples whose label is in ``keep`` (old indices), in
    their original order, relabelled 0..len(keep)-1 in the order of ``keep``."""
    remap = torch.full((num_classes,), -1, dtype=torch.long)
    remap[torch.as_tensor(list(keep), dtype=torch.long)] = torch.arange(len(keep))
    new = remap[torch.as_tensor(labels, dtype=torch.long)]
    idx = torch.nonzero(new >= 0).flatten()
    return idx, new[idx]


@dataclass
class SubsetPlan:
    """Which samples of a labelled list :func:`build_data` keeps, worked out from the labels
    alone so image files can be chosen *before* they are decoded. ``positions`` index
    the full list (ascending); ``labels`` are the new labels; ``classes`` the kept names."""

    positions: torch.Tensor
    labels: torch.Tensor
    classes: List[str]


def plan_subset(labels: Sequence[int] | torch.Tensor, classes: List[str], cfg: Dict,
                train: bool = True) -> SubsetPlan:
    """The ``data.classes`` selection and, for the training split (``train=True``), the
    ``data.train_fraction``/``data.per_class`` draw of :func:`build_data`, applied to
    labels only. Gives exactly the samples, order and labels that ``build_data`` gets by
    subsetting the decoded dataset (``select_classes`` then ``stratified_indices``)."""
    y = torch.as_tensor(labels, dtype=torch.long)
    pos, names = torch.arange(len(y)), list(classes)
    if cfg.get("classes", []) != []:
        keep = resolve_classes(cfg["classes"], names)
        pos, y = class_selection(y, len(names), keep)
        names = [names[k] for k in keep]
    if train and (cfg.get("per_class", 0) or cfg.get("train_fraction", 1.0) < 1.0):
        idx = stratified_indices(y, cfg.get("train_fraction", 1.0), cfg.get("per_class", 0),
                                 cfg.get("subset_seed", 0))
        pos, y = pos[idx], y[idx]
    return SubsetPlan(pos, y, names)


def stratified_indices(
    labels: torch.Tensor,
    fraction: float = 1.0,
    per_class: int = 0,
    seed: int = 0,
) -> torch.Tensor:
    """Indices of a class-stratified subset: ``per_class`` samples of each class, or
    ``round(fraction * n_c)`` of each class c (at least one). Sorted, reproducible."""
    if per_class < 0:
        raise DataError(f"data.per_class must be >= 0, got {per_class}")
    if not (0.0 < fraction <= 1.0):
        raise DataError(f"data.train_fraction must be in (0, 1], got {fraction}")
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        if per_class:
            if per_class > len(members):
                raise DataError(
                    f"data.per_class={per_class} but class {c} has only {len(members)} samples"
                )
            k = per_class
        else:
            k = max(1, int(round(fraction * len(members))))
        perm = members[torch.randperm(len(members), generator=g)]
        keep.append(perm[:k])
    return torch.sort(torch.cat(keep)).values


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int = 0):
    """(train_idx, val_idx): a class-stratified held-out split of ``val_fraction``."""
    if not (0.0 < val_fraction < 1.0):
        raise DataError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed + 7919)
    tr, va = [], []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        k = max(1, int(round(val_fraction * len(members)))) if len(members) > 1 else 0
        va.append(members[:k])
        tr.append(members[k:])
    return torch.sort(torch.cat(tr)).values, torch.sort(torch.cat(va)).values


def group_split(groups: torch.Tensor, val_fraction: float, seed: int = 0):
    """(train_idx, val_idx): hold out whole groups (e.g. subjects), ``round(val_fraction * G)``
    of the G groups (at least one, and at least one left to train on), chosen at random.
    Samples of one group never straddle the split, so overlapping windows of one recording
    cannot leak into the held-out score."""
    if not (0.0 < val_fraction < 1.0):
        raise DataError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    groups = torch.as_tensor(groups)
    ids = torch.unique(groups)
    if len(ids) < 2:
        raise DataError(f"data.val_split=group needs at least 2 groups in the training data, got {len(ids)}")
    k = min(max(1, int(round(val_fraction * len(ids)))), len(ids) - 1)
    g = torch.Generator().manual_seed(seed + 7919)
    held = ids[torch.randperm(len(ids), generator=g)[:k]]
    mask = torch.isin(groups, held)
    return torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()


def channel_stats(x: torch.Tensor) -> Tuple[List[float], List[float]]:
    """Per-channel mean/std over a dataset tensor (uint8 images scaled to [0, 1]).

    Accumulates float64 sums over chunks of samples: a float copy of the whole
    tensor would need 4x its memory (about 5 GB for Tiny-ImageNet's train set)."""
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    c = x.shape[1]
    s1 = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    n = 0
    dims = [0] + list(range(2, x.dim()))
    for i in range(0, len(x), 1024):
        xc = x[i:i + 1024].float()
        s1 += xc.sum(dims).double()
        s2 += (xc * xc).sum(dims).double()
        n += xc.numel() // c
    s1, s2 = s1 / scale, s2 / (scale * scale)
    mean = s1 / max(n, 1)
    # unbiased, like torch.std
    var = (s2 - n * mean * mean) / max(n - 1, 1)
    return mean.tolist(), var.clamp_min(0).sqrt().clamp_min(1e-8).tolist()


class BatchIterator:
    """Yields ``(idx, x, y)`` batches over an :class:`ArrayDataset`.

    The order comes from a seeded generator owned by the caller, so it is exactly
    reproducible and resumable (``start`` skips batches already done). With
    ``world_size > 1`` each rank takes a disjoint, equal slice of every global batch.
    """

    def __init__(self, ds: ArrayDataset, batch_size: int, shuffle: bool, drop_last: bool,
                 rank: int = 0, world_size: int = 1):
        if batch_size <= 0:
            raise DataError(f"batch size must be positive, got {batch_size}")
        self.ds, self.bs, self.shuffle, self.drop_last = ds, batch_size, shuffle, drop_last
        self.rank, self.world = rank, world_size
        if drop_last and len(ds) < batch_size:
            raise DataError(
                f"{ds.name or 'dataset'} has {len(ds)} samples, fewer than one batch of "
                f"{batch_size}; lower train.batch_size"
            )

    def __len__(self) -> int:
        # Without drop_last the short last batch counts if every rank gets a row of it:
        # each rank takes len // world_size of its rows (equal shapes for DDP's
        # collectives), so under DDP up to world_size - 1 samples are still skipped.
        full, rest = divmod(len(self.ds), self.bs)
        return full + (1 if not self.drop_last and rest >= self.world else 0)

    def order(self, generator: torch.Generator | None) -> torch.Tensor:
        n = len(self.ds)
        return torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)

    def batches(self, order: torch.Tensor, start: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for b in range(start, len(self)):
            idx = order[b * self.bs : (b + 1) * self.bs]
            if self.world > 1:
                per = len(idx) // self.world
                idx = idx[self.rank * per : (self.rank + 1) * per]
            yield idx, self.ds.x[idx], self.ds.y[idx]
