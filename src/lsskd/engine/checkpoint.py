"""Atomic, verifiable writes and safe loading of checkpoints and JSON files.

Guarantees (docs/reliability.md lists the tests that prove them):

* A file is written to a temporary name in the same folder, flushed, fsynced and
  renamed over the target, so readers see either the old or the new file, never
  a partial one; the folder entry is fsynced after the rename.
* A checkpoint gets a ``.sha256`` sidecar, so a truncated or altered file is
  detected on load instead of failing deep inside ``torch.load``.
* ``save_checkpoint(..., keep_previous=True)`` first hard-links the current file
  and its sidecar to ``<name>.prev.pt`` (again via temp name + rename), so at
  every instant at least one of the two holds a complete, verified checkpoint.
* A write that fails for lack of space (ENOSPC, EDQUOT, EFBIG) removes its temporary
  file and raises :class:`StorageError` naming the file, which is left as it was.
* ``torch.load`` runs with ``weights_only=True`` (tensors, numbers, strings and
  plain containers only, no arbitrary code) unless the caller opts out.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from ..data.download import file_digest
from ..errors import CheckpointError, StorageError, is_out_of_space


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform can open a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, write) -> str:
    """Write via ``write(fileobj)`` to a temp file, fsync, rename over ``path``.
    Returns the SHA-256 of what was written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        digest = file_digest(tmp, "sha256")
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if is_out_of_space(e):
            raise out_of_space(path, e) from None
        raise
    _fsync_dir(path.parent)
    return digest


def out_of_space(path: Path, e: OSError) -> StorageError:
    """The :class:`StorageError` of a write to ``path`` that ran out of space; the file
    itself is unchanged (the partial temporary file has been removed)."""
    err = StorageError(f"no space left to write {path} ({e.strerror or e}); the file was left as it was")
    err.errno = e.errno
    return err


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _write_atomic(Path(path), lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sidecar(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def previous_path(path: str | Path) -> Path:
    """``run/last.pt`` -> ``run/last.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _link_atomic(src: Path, dst: Path) -> None:
    """Make ``dst`` a copy of ``src`` (hard link when possible) without a moment
    in which ``dst`` is missing or partial."""
    if dst.exists() and os.path.samefile(src, dst):
        return  # already the same file (rename would silently do nothing)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:  # file systems without hard links
        try:
            shutil.copy2(src, tmp)
        except OSError as e:
            if tmp.exists():
                tmp.unlink()
            if is_out_of_space(e):
                raise out_of_space(dst, e) from None
            raise
    os.replace(tmp, dst)


def save_checkpoint(state: Dict[str, Any], path: str | Path, keep_previous: bool = False) -> None:
    """``torch.save`` to a temp file + fsync + rename, then a SHA-256 sidecar.

    With ``keep_previous`` the current checkpoint and its sidecar are first kept
    as ``<stem>.prev<suffix>``. A crash at any point leaves a loadable checkpoint:
    before the rename ``path`` is the old, intact file; between the rename and the
    sidecar write ``path`` fails verification and :func:`load_latest` falls back
    to the kept previous one."""
    path = Path(path)
    if keep_previous and path.is_file():
        prev = previous_path(path)
        _link_atomic(path, prev)
        if sidecar(path).is_file():
            _link_atomic(sidecar(path), sidecar(prev))
        elif sidecar(prev).exists():
            sidecar(prev).unlink()
    digest = _write_atomic(path, lambda f: torch.save(state, f))
    atomic_write_text(sidecar(path), digest + "\n")


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module, name):  # never import anything while sniffing
        raise pickle.UnpicklingError(f"global {module}.{name}")


def is_torch_file(path: str | Path) -> bool:
    """False when ``path`` was certainly not written by ``torch.save``: a readable zip
    archive without a ``<name>/data.pkl`` entry, or a file that is neither a zip archive
    nor the legacy format (a pickle that starts with torch's magic number). A damaged zip
    (e.g. a truncated checkpoint) counts as a torch file, so that its loading error says
    truncated. Reads only the header; nothing is unpickled beyond plain numbers."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                try:
                    with zipfile.ZipFile(path) as z:
                        return any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist())
                except zipfile.BadZipFile:
                    return True  # a zip cut short: damaged, perhaps a truncated checkpoint
            f.seek(0)
            return _NoGlobals(f).load() == 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
    except Exception:  # noqa: BLE001 - any other failure to read the header means "not torch"
        return False


def load_checkpoint(path: str | Path, weights_only: bool = True, map_location="cpu") -> Dict[str, Any]:
    """Load with ``weights_only=True`` (no arbitrary code) unless the caller opts out;
    verify the SHA-256 sidecar when present. Every failure is a :class:`CheckpointError`
    naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    side = sidecar(path)
    if side.is_file():
        want = side.read_text().strip()
        if want and file_digest(path, "sha256") != want:
            raise CheckpointError(
                f"checkpoint {path} is corrupt or truncated: its SHA-256 does not match {side.name}")
    if not is_torch_file(path):
        empty = " (the file is empty)" if path.stat().st_size == 0 else ""
        raise CheckpointError(f"{path} is not a checkpoint{empty}: it was not written by torch.save "
                              "(lsskd writes checkpoints as <run>/last.pt and <run>/best.pt)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if weights_only:
            # torch's message lists the offending global (e.g. 'os.system').
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"refusing to load checkpoint {path}: it contains objects other than tensors and "
                f"plain containers, which could run code when unpickled ({first}). Pass "
                "--unsafe-load (weights_only=False) only for a file you trust") from None
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds here (zip, EOF, runtime)
        raise CheckpointError(f"cannot load checkpoint {path} (truncated or not a checkpoint): "
                              f"{type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def load_latest(path: str | Path, weights_only: bool = True, map_location="cpu") -> Tuple[Dict[str, Any], Path]:
    """Load ``path`` (e.g. ``run/last.pt``); if it is missing or damaged, fall back to
    the kept previous checkpoint with a warning on stderr. Returns (state, file used)."""
    path = Path(path)
    try:
        return load_checkpoint(path, weights_only, map_location), path
    except CheckpointError as first:
        prev = previous_path(path)
        if not prev.is_file():
            raise
        print(f"warning: {first}; resuming from the previous checkpoint {prev}", file=sys.stderr)
        try:
            return load_checkpoint(prev, weights_only, map_location), prev
        except CheckpointError as second:
            raise CheckpointError(f"no usable checkpoint: {first}; and {second}") from None
