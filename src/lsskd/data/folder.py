"""Class-folder image datasets: ``ROOT/{train,test}/<class_name>/<image files>``.

Class index = position of the folder name in sorted order. Images are decoded
once with Pillow into a uint8 tensor and cached (keyed by the file list, sizes
and modification times) so later runs start in well under a second.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from .base import ArrayDataset, DataError

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


def load_items(
    items: List[Tuple[Path, int]],
    classes: List[str],
    image_size: Optional[Tuple[int, int]] = None,
    cache_dir: str | Path | None = "",
    name: str = "",
) -> ArrayDataset:
    """Decode ``[(image path, label)]`` into an :class:`ArrayDataset`, with the same
    on-disk cache as :func:`load_class_folder` (for layouts that are not class folders)."""
    if not items:
        raise DataError(f"{name or 'dataset'}: no image files to load")
    cache_path = None
    if cache_dir != "none" and cache_dir is not None:
        cdir = Path(cache_dir) if cache_dir else default_cache_dir()
        cache_path = cdir / f"folder-{_cache_key(items, image_size)}.npz"
        if cache_path.is_file():
            try:
                with np.load(cache_path) as z:
                    return ArrayDataset(torch.from_numpy(z["x"]), torch.from_numpy(z["y"]),
                                        classes, name)
            except Exception:
                pass  # a damaged cache is rebuilt below
    arrays = []
    first_shape = None
    for path, _ in items:
        a = decode_image(path, image_size)
        if first_shape is None:
            first_shape = a.shape
        elif a.shape != first_shape:
            raise DataError(
                f"image {path} is {a.shape[1]}x{a.shape[0]} but earlier images are "
                f"{first_shape[1]}x{first_shape[0]}; set data.image_size to resize"
            )
        arrays.append(a)
    x = np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))
    y = np.array([label for _, label in items], dtype=np.int64)
    if cache_path is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, x=x, y=y)
            os.replace(tmp, cache_path)
        except OSError:
            pass  # caching is an optimisation only
    return ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), classes, name)
