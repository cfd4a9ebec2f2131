"""Class-folder image datasets: ``ROOT/{train,test}/<class_name>/<image files>``.

Class index = position of the folder name in sorted order. Only the files the
config's subset keeps are decoded, with Pillow, in parallel threads, into a uint8
tensor, which is cached (keyed by the file list, labels, sizes and modification
times) so later runs start in well under a second.
"""
from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .base import ArrayDataset, plan_subset
from ..errors import DataError, StorageError, is_out_of_space

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("LSSKD_CACHE", Path.home() / ".cache" / "lsskd"))


def list_class_folder(split_dir: Path, classes: Optional[List[str]] = None):
    """Return (classes, [(path, label)]) for a class-folder tree; errors name the path."""
    if not split_dir.is_dir():
        raise DataError(f"data folder not found: {split_dir}")
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DataError(f"data folder {split_dir} has no class sub-folders")
    if classes is not None and found != classes:
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        raise DataError(
            f"classes in {split_dir} differ from the training classes: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    items = []
    for label, name in enumerate(found):
        files = sorted(
            f for f in (split_dir / name).iterdir()
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise DataError(f"class folder {split_dir / name} contains no image files")
        items.extend((f, label) for f in files)
    return found, items


def decode_image(path: Path, size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Decode one image to HxWx3 uint8 RGB; a clear error names a corrupt file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def _cache_key(items, size) -> str:
    h = hashlib.sha1()
    h.update(repr(size).encode())
    for path, label in items:
        st = path.stat()
        h.update(f"{path.resolve()}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def load_class_folder(
    split_dir: str | Path,
    classes: Optional[List[str]] = None,
    image_size: Optional[Tuple[int, int]] = None,
    cache_dir: str | Path | None = "",
    name: str = "",
) -> ArrayDataset:
    split_dir = Path(split_dir)
    classes, items = list_class_folder(split_dir, classes)
    return load_items(items, classes, image_size, cache_dir, name or str(split_dir))


def decode_workers(n_items: int) -> int:
    """Threads used to decode ``n_items`` images: one per usable core (at most 8), or 1 for
    small sets; ``$LSSKD_DECODE_WORKERS`` overrides. Pillow releases the GIL while it
    decompresses, so threads overlap most of the work without copying arrays between
    processes."""
    env = os.environ.get("LSSKD_DECODE_WORKERS", "")
    if env.strip():
        try:
            return max(1, int(env))
        except ValueError:
            raise DataError(f"LSSKD_DECODE_WORKERS must be a whole number, got {env!r}") from None
    if n_items < PARALLEL_MIN_ITEMS:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


PARALLEL_MIN_ITEMS = 512
_CHUNK = 256


def _decode_chunk(paths: List[Path], size) -> List[np.ndarray]:
    return [decode_image(p, size) for p in paths]


def decode_images(paths: Sequence[Path], size: Optional[Tuple[int, int]] = None, progress: bool = False,
                  desc: str = "decoding", workers: Optional[int] = None) -> List[np.ndarray]:
    """Decode ``paths`` in order (same arrays as :func:`decode_image` one by one), in chunks
    spread over ``workers`` threads, with a progress bar when ``progress`` and stderr is a
    terminal (in a log file or a pipe a bar is noise, and it would split a one-line error)."""
    paths = list(paths)
    workers = decode_workers(len(paths)) if workers is None else max(1, workers)
    bar = None
    if progress and _stderr_is_terminal():
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc=desc, unit="img", leave=False, dynamic_ncols=True, file=sys.stderr)
    chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    out: List[np.ndarray] = []
    try:
        if workers == 1:
            results = (_decode_chunk(c, size) for c in chunks)
        else:
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lsskd-decode")
            results = pool.map(_decode_chunk, chunks, [size] * len(chunks))
        try:
            for arrays in results:  # map yields in submission order
                out.extend(arrays)
                if bar is not None:
                    bar.update(len(arrays))
        finally:
            if workers != 1:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if bar is not None:
            bar.close()
    return out


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def cache_path_for(items: List[Tuple[Path, int]], image_size: Optional[Tuple[int, int]] = None,
                   cache_dir: str | Path | None = "") -> Optional[Path]:
    """The decoded-image cache file for exactly these ``(path, label)`` items (None when
    caching is off). The key covers every path, label, size and modification time, so a
    class subset or per-class draw gets its own file and never collides with the full set."""
    if cache_dir == "none" or cache_dir is None:
        return None
    cdir = Path(cache_dir) if cache_dir else default_cache_dir()
    return cdir / f"folder-{_cache_key(items, image_size)}.npz"


def load_items(
    items: List[Tuple[Path, int]],
    classes: List[str],
    image_size: Optional[Tuple[int, int]] = None,
    cache_dir: str | Path | None = "",
    name: str = "",
    progress: bool = False,
    source_index: Optional[torch.Tensor] = None,
) -> ArrayDataset:
    """Decode ``[(image path, label)]`` into an :class:`ArrayDataset`, with the same
    on-disk cache as :func:`load_class_folder` (for layouts that are not class folders).

    With ``progress`` a bar shows the decoding and one stderr line says where the
    decoded cache is and how big it is. ``source_index`` (default 0..N-1) records each
    item's position in the list it was chosen from."""
    if not items:
        raise DataError(f"{name or 'dataset'}: no image files to load")
    cache_path = cache_path_for(items, image_size, cache_dir)
    if cache_path is not None and cache_path.is_file():
        try:
            with np.load(cache_path) as z:
                ds = ArrayDataset(torch.from_numpy(z["x"]), torch.from_numpy(z["y"]), classes, name,
                                  source_index)
            if progress:
                print(f"{name or 'dataset'}: {len(ds):,} decoded images from cache {cache_path} "
                      f"({_human_bytes(cache_path.stat().st_size)})", file=sys.stderr)
            return ds
        except Exception:
            pass  # a damaged cache is rebuilt below
    arrays = decode_images([p for p, _ in items], image_size, progress,
                           f"decoding {name}" if name else "decoding")
    first_shape = arrays[0].shape
    for (path, _), a in zip(items, arrays):
        if a.shape != first_shape:
            raise DataError(
                f"image {path} is {a.shape[1]}x{a.shape[0]} but earlier images are "
                f"{first_shape[1]}x{first_shape[0]}; set data.image_size to resize"
            )
    x = np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))
    del arrays
    y = np.array([label for _, label in items], dtype=np.int64)
    if cache_path is not None:
        tmp = cache_path.with_suffix(f".tmp{os.getpid()}.npz")
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, x=x, y=y)
            os.replace(tmp, cache_path)
            if progress:
                print(f"{name or 'dataset'}: decoded {len(y):,} images; cache written to {cache_path} "
                      f"({_human_bytes(cache_path.stat().st_size)})", file=sys.stderr)
        except OSError as e:
            if tmp.exists():
                tmp.unlink()  # never leave a partial cache behind
            if is_out_of_space(e):
                # The run's own checkpoints would fail next: stop now, saying why.
                raise StorageError(f"no space left to write the decoded cache {cache_path} ({e.strerror}); "
                                   "free space, or set data.cache_dir=none to decode without a cache") from None
            if progress:
                print(f"{name or 'dataset'}: could not write the decoded cache {cache_path}: {e}",
                      file=sys.stderr)  # caching is an optimisation only
    return ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), classes, name, source_index)


def load_selected(
    items: List[Tuple[Path, int]],
    classes: List[str],
    cfg: dict,
    train: bool,
    image_size: Optional[Tuple[int, int]] = None,
    name: str = "",
) -> ArrayDataset:
    """Apply the config's class subset (and, for ``train``, the per-class / fraction draw)
    to the file list, then decode only the chosen files: the result equals decoding
    every file and subsetting afterwards (see :func:`lsskd.data.base.plan_subset`)."""
    plan = plan_subset([label for _, label in items], classes, cfg, train)
    pos = plan.positions.tolist()
    chosen = [(items[p][0], label) for p, label in zip(pos, plan.labels.tolist())]
    if not chosen:
        raise DataError(f"{name or 'dataset'}: no images of the selected classes {plan.classes[:5]}")
    source = None if len(pos) == len(items) else plan.positions
    return load_items(chosen, plan.classes, image_size, cfg.get("cache_dir", ""), name,
                      bool(cfg.get("progress", True)), source)
