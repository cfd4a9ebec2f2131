"""Every error a user can cause, in one place.

Each is raised with a one-line message that names the file, key or value at fault.
:data:`USER_ERRORS` are the ones the command line prints as ``lsskd CMD: error: ...``
(exit status 2) and a sweep reports without a traceback; anything else is a bug and
keeps its traceback. Import them from here (``from lsskd.errors import ConfigError``),
not through a module that raises them (tests/test_layering.py checks).
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class DataError(ValueError):
    """Bad or missing data; the message names the file, folder or value."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or unsafe; the message names it."""


class RunDirError(RuntimeError):
    """The run directory would be overwritten, or cannot be resumed."""


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/inf; the message names epoch, step and term."""


class ResourceError(MemoryError):
    """Out of (GPU or host) memory; the message says where and what to lower.
    A ``MemoryError`` so callers that catch that still see it."""


class StorageError(OSError):
    """A write failed for lack of disk space (or quota, or a file-size limit); the message
    names the file and says what was kept. An ``OSError`` so callers that catch that still
    see it."""


def is_out_of_space(e: BaseException) -> bool:
    """True for the ``OSError`` of a full disk (ENOSPC), an exceeded quota (EDQUOT) or a
    file-size limit (EFBIG)."""
    import errno

    codes = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
    return isinstance(e, OSError) and e.errno in codes


class CLIError(Exception):
    """A user-facing error of a command's arguments."""


class UsageError(RuntimeError):
    """The library API (:mod:`lsskd.api`) was called out of order or with data it cannot
    use; the message says which call or argument to change."""


USER_ERRORS = (CLIError, ConfigError, DataError, CheckpointError, RunDirError, NonFiniteError)


def oom_errors() -> tuple:
    """The exception types of running out of memory: torch's OutOfMemoryError (where this
    torch has it) and MemoryError (which :class:`ResourceError` is)."""
    import torch

    return (torch.OutOfMemoryError, MemoryError) if hasattr(torch, "OutOfMemoryError") else (MemoryError,)
