"""The run directory: which files a run owns and how they are written.

A run directory holds ``config.yaml`` (the resolved config plus the provenance of the
code that made it), ``metrics.jsonl`` (one JSON line per finished epoch),
``summary.json``, ``last.pt`` / ``best.pt`` (see :mod:`lsskd.engine.state`) and
TensorBoard events under ``tb/``. Every file is written atomically. While a process
writes the run it holds ``run.lock`` (:mod:`lsskd.engine.runlock`): one writer per run.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

from ..config import PROVENANCE_KEY, dump
from .checkpoint import atomic_write_json, atomic_write_text, previous_path
from .runlock import RunLock, holder


from ..errors import RunDirError  # noqa: E402,F401 - re-exported


# Files whose presence means a folder already holds a run.
RUN_FILES = ("config.yaml", "last.pt", "metrics.jsonl", "summary.json")


def _git(*args: str) -> Optional[str]:
    """``git -C <the lsskd package folder> ARGS`` output, or None without git or a repository."""
    try:
        done = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), *args],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def provenance() -> Dict:
    """The code that makes a run: ``git_commit`` of the repository this lsskd is imported
    from and ``git_dirty`` (tracked files modified), both None when lsskd is not running
    from a git checkout (an installed wheel) or git is missing; ``lsskd`` and ``torch``
    versions. Recorded in config.yaml (at the start) and summary.json (at the end)."""
    import torch

    from .. import __version__

    commit = dirty = None
    # Only when the package's own files are tracked: a wheel installed inside some other
    # repository (a virtualenv in a project folder) must not report that repository.
    if _git("ls-files", "--error-unmatch", "__init__.py") is not None:
        commit = _git("rev-parse", "HEAD")
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = None if status is None or commit is None else bool(status)
    return {"git_commit": commit, "git_dirty": dirty, "lsskd": __version__, "torch": str(torch.__version__)}


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    def lock(self) -> RunLock:
        """Take the run's exclusive lock (creating the folder); :class:`RunLockedError`
        (a :class:`RunDirError`) names the holder when another process has it."""
        return RunLock.acquire(self.path)

    def holder(self):
        """What is known of the live process that holds this run's lock; None if none."""
        return holder(self.path)

    def check(self, resume: bool) -> None:
        """A fresh run needs a folder without a run in it; a resumed one needs a checkpoint."""
        if resume:
            if not self.last.is_file() and not previous_path(self.last).is_file():
                raise RunDirError(f"cannot resume: no checkpoint {self.last} "
                                  f"(nor {previous_path(self.last).name})")
            return
        if self.path.exists() and any((self.path / f).exists() for f in RUN_FILES):
            raise RunDirError(
                f"run directory {self.path} already holds a run; resume it with "
                f"`lsskd train --resume {self.path}` or choose another out_dir"
            )

    def start(self, cfg: Dict, resume: bool, epochs_done: int) -> None:
        """Create the folder; a new run writes its config and an empty metrics file, a
        resumed one keeps only the metric rows of the epochs its checkpoint finished."""
        self.path.mkdir(parents=True, exist_ok=True)
        if resume:
            self.truncate_metrics(epochs_done)
        else:
            # The provenance is a record, not a setting: loading the file ignores it.
            atomic_write_text(self.path / "config.yaml", dump({**cfg, PROVENANCE_KEY: provenance()}))
            atomic_write_text(self.metrics, "")

    def metric_lines(self) -> List[str]:
        """metrics.jsonl's complete rows; an unparsable line (a file written by a
        crashed older version) is dropped rather than failing the resume."""
        if not self.metrics.is_file():
            return []
        keep = []
        for ln in self.metrics.read_text().splitlines():
            try:
                if isinstance(json.loads(ln), dict):
                    keep.append(ln)
            except ValueError:
                continue
        return keep

    def metric_rows(self) -> List[Dict]:
        return [json.loads(ln) for ln in self.metric_lines()]

    def append_metrics(self, row: Dict) -> None:
        # Rewritten whole and atomically (it is small): a crash never leaves half a line.
        self._write_metrics(self.metric_lines() + [json.dumps(row)])

    def truncate_metrics(self, epochs_done: int) -> None:
        """On resume: keep only the rows of epochs the checkpoint has finished."""
        self._write_metrics([ln for ln in self.metric_lines() if json.loads(ln).get("epoch", 0) <= epochs_done])

    def _write_metrics(self, lines: List[str]) -> None:
        atomic_write_text(self.metrics, "".join(ln + "\n" for ln in lines))

    def write_summary(self, summary: Dict) -> None:
        atomic_write_json(self.path / "summary.json", summary)

    def tensorboard(self, purge_step: Optional[int] = None):
        """A SummaryWriter on ``tb/`` (None when tensorboard is not installed). On resume,
        ``purge_step`` drops the events of epochs the checkpoint had not finished."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is an optional extra
            return None
        return SummaryWriter(str(self.path / "tb"), purge_step=purge_step)
