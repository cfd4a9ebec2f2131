"""Tiny-ImageNet-200 in its official layout (200 classes, 64x64, 100k train images).

::

    tiny-imagenet-200/
      wnids.txt                      one WordNet id per line (the 200 classes)
      words.txt                      optional: "<wnid>\\t<description>" lines
      train/<wnid>/images/*.JPEG     500 images per class
      val/images/*.JPEG              10,000 images
      val/val_annotations.txt        "<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>" lines

The official validation set is the test split (the official test set has no
labels). Class index = position of the wnid in sorted order. Images are decoded
and cached by :func:`lsskd.data.folder.load_items`, after ``data.classes`` and
``data.per_class`` have chosen the files. Annotation lines of classes missing from
``wnids.txt`` (a few-class copy that kept the full annotation file) are skipped and
counted in one line on stderr.

The official download (``http://cs231n.stanford.edu/tiny-imagenet-200.zip``) is
plain http, which :func:`lsskd.data.download.download` refuses, so nothing is
fetched by default: point ``data.root`` at the zip or the extracted folder, or
set ``data.download=true`` with ``data.url`` (an https:// mirror or file:// path)
*and* ``data.checksum`` -- there is no trusted channel to the official file, so
the checksum must come from you.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..registry import DATASETS
from .base import DataBundle
from ..errors import DataError
from .download import download, extract_folder, parse_checksum
from .folder import IMAGE_EXTENSIONS, load_selected

FOLDER = "tiny-imagenet-200"
ARCHIVE = "tiny-imagenet-200.zip"
OFFICIAL_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
# md5 of the official zip as published by several dataset loaders (e.g. torchvision-style
# TinyImageNet classes); only suggested in messages, never trusted implicitly.
COMMON_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


def _locate(root: Path) -> Tuple[Optional[Path], Optional[Path]]:
    """(extracted folder, zip to extract) for ``data.root``."""
    if root.is_file():
        beside = root.parent / FOLDER
        return (beside, None) if (beside / "wnids.txt").is_file() else (None, root)
    if root.is_dir():
        if (root / "wnids.txt").is_file():
            return root, None
        if (root / FOLDER / "wnids.txt").is_file():
            return root / FOLDER, None
        if (root / ARCHIVE).is_file():
            return None, root / ARCHIVE
    return None, None


def _download(root: Path, cfg: Dict) -> Path:
    url = cfg.get("url") or ""
    if not url:
        raise DataError(
            f"no Tiny-ImageNet data at data.root={root}, and the official {OFFICIAL_URL} is "
            "http-only, which is not downloaded automatically. Download and verify it yourself "
            "and set data.root to the zip or the extracted folder, or set data.url to an "
            "https:// (or file://) copy together with data.checksum"
        )
    md5, sha256 = parse_checksum(cfg.get("checksum", ""))
    if not (md5 or sha256):
        raise DataError(
            f"data.url={url} needs data.checksum ('md5:<hex>' or 'sha256:<hex>'); the md5 "
            f"commonly published for the official zip is md5:{COMMON_MD5}"
        )
    if root.suffix == ".zip":
        raise DataError(f"data.root={root} names a zip that does not exist; with data.download=true "
                        "set data.root to the folder to download into")
    archive = download(url, root / ARCHIVE, md5=md5, sha256=sha256,
                       progress=bool(cfg.get("progress", True)))
    return extract_folder(archive, root, FOLDER)


def _read_lines(path: Path) -> List[str]:
    if not path.is_file():
        raise DataError(f"Tiny-ImageNet file missing: {path}")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _images(folder: Path) -> List[Path]:
    if not folder.is_dir():
        raise DataError(f"Tiny-ImageNet folder missing: {folder}")
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"Tiny-ImageNet folder {folder} contains no image files")
    return files


def list_tiny_imagenet(folder: Path):
    """(classes, descriptions, train items, val items) for an extracted dataset folder;
    items are ``[(path, label)]``. Errors name the file (and line) at fault."""
    wnids = [ln.strip() for ln in _read_lines(folder / "wnids.txt") if ln.strip()]
    if not wnids:
        raise DataError(f"{folder / 'wnids.txt'} lists no classes")
    if len(set(wnids)) != len(wnids):
        dup = sorted({w for w in wnids if wnids.count(w) > 1})[:5]
        raise DataError(f"{folder / 'wnids.txt'} lists classes more than once: {dup}")
    classes = sorted(wnids)
    index = {w: i for i, w in enumerate(classes)}

    words = read_words(folder, classes)
    descriptions = [words.get(w, w) for w in classes]

    train = []
    for w in classes:
        train.extend((f, index[w]) for f in _images(folder / "train" / w / "images"))

    ann = folder / "val" / "val_annotations.txt"
    val_dir = folder / "val" / "images"
    val, seen = [], set()
    absent: Dict[str, int] = {}  # annotation lines of classes not in wnids.txt, per class
    for lineno, ln in enumerate(_read_lines(ann), 1):
        if not ln.strip():
            continue
        fields = ln.split("\t")
        if len(fields) < 2:
            raise DataError(f"{ann}:{lineno}: expected '<file>\\t<wnid>\\t...', got {ln!r}")
        fname, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            # A few-class copy keeps the full annotation file: its other classes' lines
            # (and their images, present or not) are skipped, counted and reported below.
            absent[wnid] = absent.get(wnid, 0) + 1
            continue
        if "/" in fname or "\\" in fname or fname in ("", ".", ".."):
            raise DataError(f"{ann}:{lineno}: bad image file name {fname!r}")
        if fname in seen:
            raise DataError(f"{ann}:{lineno}: image {fname} is listed twice")
        seen.add(fname)
        path = val_dir / fname
        if not path.is_file():
            raise DataError(f"{ann}:{lineno}: image file missing: {path}")
        val.append((path, index[wnid]))
    if absent:
        names = sorted(absent)
        print(f"note: {ann}: ignored {sum(absent.values()):,} lines of {len(names)} classes not in "
              f"wnids.txt ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})", file=sys.stderr)
    if not val:
        raise DataError(f"{ann} lists no validation images of the classes in wnids.txt")
    return classes, descriptions, train, val


def read_words(folder: Path, classes: List[str]) -> Dict[str, str]:
    """``{wnid: description}`` from ``words.txt`` for ``classes`` (empty when the file is absent)."""
    words: Dict[str, str] = {}
    wanted = set(classes)
    if (folder / "words.txt").is_file():
        for ln in _read_lines(folder / "words.txt"):
            wnid, _, text = ln.partition("\t")
            if wnid in wanted:
                words[wnid] = text.strip()
    return words


def class_words(data_cfg: Dict, classes: List[str]) -> Optional[List[str]]:
    """The ``words.txt`` description of each of ``classes`` for a run whose data is
    Tiny-ImageNet (``data_cfg`` = its ``data`` config section), or None when the dataset
    is another one or its extracted folder (with ``words.txt``) is not at ``data.root``.
    Classes without a line get their wnid. Reads only the text file; never extracts."""
    if str(data_cfg.get("name", "")) not in ("tiny_imagenet", "tinyimagenet") or not data_cfg.get("root"):
        return None
    folder, _ = _locate(Path(str(data_cfg["root"])).expanduser())
    if folder is None or not (folder / "words.txt").is_file():
        return None
    try:
        words = read_words(folder, list(classes))
    except DataError:
        return None
    return [words.get(c, c) for c in classes] if words else None


@DATASETS.register("tiny_imagenet", "tinyimagenet")
def tiny_imagenet_dataset(cfg: Dict) -> DataBundle:
    """Tiny-ImageNet-200: train = official train, test = official val."""
    root_s = cfg.get("root") or ""
    if not root_s:
        raise DataError("data.root must be set for dataset 'tiny_imagenet' (the zip, the "
                        f"extracted {FOLDER}/ folder, or a folder holding either)")
    root = Path(root_s).expanduser()
    folder, archive = _locate(root)
    if folder is None and archive is not None:
        folder = extract_folder(archive, archive.parent, FOLDER)
    if folder is None:
        if not cfg.get("download", False):
            raise DataError(f"no Tiny-ImageNet data at data.root={root} (expected {ARCHIVE}, "
                            f"{FOLDER}/ or a folder with wnids.txt); download {OFFICIAL_URL} "
                            "yourself, or set data.download=true with data.url and data.checksum")
        folder = _download(root, cfg)
    classes, descriptions, train_items, val_items = list_tiny_imagenet(folder)
    size = int(cfg.get("image_size", 0) or 0)
    image_size = (size, size) if size else None
    # data.classes / data.per_class pick the files before any is decoded
    train = load_selected(train_items, classes, cfg, True, image_size, f"tiny_imagenet:{folder}/train")
    test = load_selected(val_items, classes, cfg, False, image_size, f"tiny_imagenet:{folder}/val")
    descriptions = [descriptions[classes.index(c)] for c in train.classes]
    if train.x.shape[1:] != test.x.shape[1:]:
        raise DataError(f"train images {tuple(train.x.shape[1:])} and val images "
                        f"{tuple(test.x.shape[1:])} under {folder} differ in size; set data.image_size")
    # no official normalisation statistics: build_data computes them from the train split
    return DataBundle(train, test, info={"dataset": "tiny_imagenet", "source": str(folder),
                                         "class_descriptions": descriptions}, subset_applied=True)
