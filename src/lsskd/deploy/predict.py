"""Top-k predictions for image (or ``.npy`` signal) files; unreadable files can be
skipped and listed instead of ending the batch."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import DataError
from .load import normalize
from .runners import Runner


def collect_files(paths: Sequence[str | Path], modality: str = "image") -> List[Path]:
    """Files named directly, plus (recursively, sorted) the image / ``.npy`` files in folders."""
    from ..data.folder import IMAGE_EXTENSIONS

    exts = IMAGE_EXTENSIONS if modality == "image" else {".npy"}
    out: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts)
            if not found:
                raise DataError(f"folder {p} contains no {'image' if modality == 'image' else '.npy'} files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"input not found: {p}")
    return out


def read_input(f: Path, input_shape: Sequence[int], modality: str) -> np.ndarray:
    """One raw input: a uint8 3 x H x W image resized to the model's size (bilinear, as
    ``data/folder.decode_image``), or a float signal from a ``.npy`` file. A file that
    cannot be used raises a :class:`DataError` naming it."""
    from ..data.folder import decode_image

    if modality == "image":
        if input_shape[0] != 3:
            raise DataError(f"model expects {input_shape[0]}-channel images; only RGB is supported")
        return decode_image(f, (int(input_shape[1]), int(input_shape[2]))).transpose(2, 0, 1)
    if f.suffix.lower() != ".npy":
        raise DataError(f"{f}: a {modality} model takes .npy arrays of shape {list(input_shape)}")
    try:
        a = np.load(f, allow_pickle=False).astype(np.float32)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {f}: {e}") from None
    if list(a.shape) != list(input_shape):
        raise DataError(f"{f} has shape {list(a.shape)}, the model expects {list(input_shape)}")
    return a


def load_inputs(files: Sequence[Path], input_shape: Sequence[int], modality: str) -> torch.Tensor:
    """Raw inputs stacked (see :func:`read_input`); the first bad file raises."""
    arrs = [read_input(Path(f), input_shape, modality) for f in files]
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrs)))


def class_descriptions(meta: Dict) -> Optional[List[str]]:
    """Human-readable names of the classes (Tiny-ImageNet's ``words.txt``), from the
    metadata, else from the run's dataset folder named in its config; None if none."""
    if meta.get("class_descriptions"):
        return list(meta["class_descriptions"])
    from ..data.tiny_imagenet import class_words

    return class_words((meta.get("config") or {}).get("data") or {}, list(meta["classes"]))


def predict(runner: Runner, meta: Dict, files: Sequence[Path], topk: int = 5, batch: int = 64,
            skipped: Optional[List[Tuple[str, str]]] = None) -> List[Dict]:
    """Per file: the ``topk`` classes by softmax probability, most likely first (with the
    class's ``description`` where the dataset has one). With a ``skipped`` list, a file
    that cannot be read is appended to it as ``(file, reason)`` and the others are still
    predicted; without one, the first such file raises its :class:`DataError`."""
    classes = meta["classes"]
    words = class_descriptions(meta)
    k = max(1, min(int(topk), len(classes)))
    shape, modality = meta["input_shape"], meta.get("modality", "image")
    if modality == "image" and shape[0] != 3:  # the model's fault, not a file's
        raise DataError(f"model expects {shape[0]}-channel images; only RGB is supported")
    out = []
    for s in range(0, len(files), batch):
        chunk, arrs = [], []
        for f in files[s:s + batch]:
            try:
                arrs.append(read_input(Path(f), shape, modality))
            except DataError as e:
                if skipped is None:
                    raise
                skipped.append((str(f), str(e)))
                continue
            chunk.append(f)
        if not chunk:
            continue
        x = normalize(torch.from_numpy(np.ascontiguousarray(np.stack(arrs))), meta["mean"], meta["std"])
        prob = torch.softmax(runner(x).float(), dim=-1)
        p, i = prob.topk(k, dim=-1)
        for f, pr, ix in zip(chunk, p.tolist(), i.tolist()):
            top = []
            for q, c in zip(pr, ix):
                entry = {"class": classes[c], "index": c, "prob": q}
                if words:
                    entry["description"] = words[c]
                top.append(entry)
            out.append({"file": str(f), "topk": top})
    return out
