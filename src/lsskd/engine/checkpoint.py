"""Atomic, verifiable writes and safe loading of checkpoints and JSON files."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or unsafe; the message names it."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_checkpoint(state: Dict[str, Any], path: str | Path) -> None:
    """torch.save to a temp file + fsync + rename, with a SHA-256 sidecar so a
    truncated or altered file is detected on load. A crash mid-write leaves the
    previous checkpoint untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        digest = _sha256(tmp)
        os.replace(tmp, path)
        atomic_write_text(path.with_name(path.name + ".sha256"), digest + "\n")
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(path: str | Path, weights_only: bool = True, map_location="cpu") -> Dict[str, Any]:
    """Load with ``weights_only=True`` (no arbitrary code) unless the caller opts out;
    verify the SHA-256 sidecar when present."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    side = path.with_name(path.name + ".sha256")
    if side.is_file():
        want = side.read_text().strip()
        if want and _sha256(path) != want:
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated (checksum mismatch)")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds here
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from None
