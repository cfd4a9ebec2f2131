"""One writer per run directory: an exclusive operating-system lock on ``<run>/run.lock``.

The lock is ``flock(LOCK_EX)`` on the open file, so the kernel drops it when the
holder exits for any reason (a SIGKILLed run leaves no stale lock; the file it leaves
behind is only a record). The file holds the holder's PID, host and start time, for
the error message of a second process that finds the run locked; it is removed when
the holder releases the lock normally.

* :meth:`RunLock.acquire` takes the lock or raises :class:`RunLockedError` naming the
  directory and the holder. A process that finds the lock taken writes nothing into
  the directory (the lock file already exists; it is opened, not written).
* Within one process the lock is re-entrant (a sweep holds it around the trainer that
  takes it again); it is released when every holder has released it.
* A child process can be handed a held lock: ``pass_fds=[lock.fd]`` and
  ``env[INHERIT_ENV] = lock.handoff()``; the child's acquire then adopts it instead of
  waiting for itself (``lsskd sweep --jobs N``).
* :func:`holder` tells readers (report, tune, sweep) whether a live process holds the
  lock, without taking it for longer than a moment.

Not every file system honours ``flock`` between machines: see docs/reliability.md.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Optional

from ..errors import RunDirError

try:
    import fcntl
except ImportError:  # not a POSIX system: no run locks (docs/reliability.md)
    fcntl = None

LOCK_NAME = "run.lock"
INHERIT_ENV = "LSSKD_RUN_LOCK"  # "<fd>:<run directory>", set by a parent that holds the lock
# A reader probes with a shared lock for a moment; a writer that meets only such a probe
# gets the lock by trying again a few times.
RETRIES, RETRY_SLEEP = 20, 0.05

# flock errors of file systems that do not support it (some FUSE and network mounts):
# the run goes on without the lock, with a warning.
UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}

_held: Dict[str, "_Held"] = {}
_guard = threading.Lock()


class RunLockedError(RunDirError):
    """Another live process holds the run directory's lock."""

    def __init__(self, folder: Path, info: Optional[Dict]):
        self.folder, self.info = folder, info
        super().__init__(f"run directory {folder} is locked by another process "
                         f"({describe(info)}); wait for it to finish, or use another out_dir")


def describe(info: Optional[Dict]) -> str:
    """'pid 123 on host-a since 2026-12-07T06:00:00Z', or what is known of it."""
    if not info:
        return "holder unknown"
    parts = [f"pid {info.get('pid', '?')}"]
    if info.get("host"):
        parts.append(f"on {info['host']}")
    if info.get("started"):
        parts.append(f"since {info['started']}")
    return " ".join(parts)


def _read_info(fd: int) -> Optional[Dict]:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
        info = json.loads(text)
    except (OSError, ValueError):
        return None  # being written this instant, or not a record
    return info if isinstance(info, dict) else None


class _Held:
    def __init__(self, fd: int, path: Path, made_dir: bool, owner: bool):
        self.fd, self.path, self.made_dir, self.owner, self.count = fd, path, made_dir, owner, 0


class RunLock:
    """A held lock on one run directory (see the module docstring)."""

    def __init__(self, key: str, held: _Held):
        self._key, self._held, self.released = key, held, False

    @property
    def fd(self) -> int:
        return self._held.fd

    @property
    def folder(self) -> Path:
        return self._held.path.parent

    def handoff(self) -> str:
        """The value of :data:`INHERIT_ENV` for a child given ``pass_fds=[self.fd]``."""
        return f"{self.fd}:{self._key}"

    @classmethod
    def acquire(cls, folder: str | Path) -> "RunLock":
        """Create ``folder`` if needed and take its lock; :class:`RunLockedError` if another
        process holds it."""
        folder = Path(folder)
        made_dir = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot create run directory {folder}: {e.strerror or e}") from None
        key = os.path.realpath(folder)
        with _guard:
            held = _held.get(key) or _adopt(key) or _take(folder, made_dir)
            _held[key] = held
            held.count += 1
            return cls(key, held)

    def release(self) -> None:
        """Give this holder's share back; the last one removes the lock file (and the
        folder, if this lock created it and it is still empty) and drops the lock."""
        if self.released:
            return
        self.released = True
        with _guard:
            h = self._held
            h.count -= 1
            if h.count > 0:
                return
            _held.pop(self._key, None)
            try:
                # Unlink only our own file, while we hold it: a newer lock file at the same
                # name (made after ours was removed) belongs to someone else.
                if h.owner and _same_file(os.stat(h.path), os.fstat(h.fd)):
                    os.unlink(h.path)
            except OSError:
                pass
            os.close(h.fd)
            if h.made_dir:
                try:
                    h.path.parent.rmdir()  # only when empty: a run that wrote nothing
                except OSError:
                    pass

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _warn_unlocked(folder: Path, e: OSError) -> None:
    print(f"warning: the file system of {folder} does not support file locks ({e.strerror}); "
          "this run is not protected from a second process writing into it (docs/reliability.md)",
          file=sys.stderr, flush=True)


def _adopt(key: str) -> Optional[_Held]:
    """The lock a parent process handed down (:meth:`RunLock.handoff`), if it is this one."""
    fd_text, _, where = os.environ.get(INHERIT_ENV, "").partition(":")
    if where != key or not fd_text.isdigit():
        return None
    fd, path = int(fd_text), Path(key) / LOCK_NAME
    try:
        if not _same_file(os.fstat(fd), os.stat(path)):
            return None
    except OSError:
        return None
    # The parent owns the file and removes it; this process only holds the lock with it.
    return _Held(fd, path, made_dir=False, owner=False)


def _write_record(fd: int) -> None:
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (record + "\n").encode(), 0)
    except OSError:
        pass  # the record only names the holder in messages (e.g. on a full disk)


def _take(folder: Path, made_dir: bool) -> _Held:
    path = folder / LOCK_NAME
    for attempt in range(RETRIES):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except FileNotFoundError:  # the folder was removed by a holder that created it
            folder.mkdir(parents=True, exist_ok=True)
            continue
        except OSError as e:  # a read-only folder, a full disk, ...
            raise RunDirError(f"cannot create the lock file {path}: {e.strerror or e}") from None
        if fcntl is None:  # no flock on this platform: a record, but no protection
            _write_record(fd)
            return _Held(fd, path, made_dir, owner=True)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in UNSUPPORTED:
                _warn_unlocked(folder, e)
                _write_record(fd)
                return _Held(fd, path, made_dir, owner=True)
            info = _read_info(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(f"cannot lock run directory {folder}: {e.strerror}") from None
            if attempt + 1 < RETRIES:
                time.sleep(RETRY_SLEEP)  # perhaps a reader's momentary probe
                continue
            raise RunLockedError(folder, info) from None
        try:
            same = _same_file(os.stat(path), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if not same:  # the file was removed (by its releasing holder) before we locked it
            os.close(fd)
            continue
        _write_record(fd)
        return _Held(fd, path, made_dir, owner=True)
    raise RunDirError(f"cannot lock run directory {folder}: its lock file kept changing")


def holder(folder: str | Path) -> Optional[Dict]:
    """None when no process holds ``folder``'s lock (or it has none); otherwise what is
    known of the holder (``{}`` when its record cannot be read). A lock this process
    holds counts as held. Writes nothing."""
    folder = Path(folder)
    with _guard:
        h = _held.get(os.path.realpath(folder))
    if h is not None:
        return _read_info(h.fd) or {}
    if fcntl is None:
        return None
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return _read_info(fd) or {}
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
