"""Executing a planned sweep: one run after another in this process (the same code path
as ``lsskd train``, with decoded data shared between consecutive runs and torch's global
settings restored after each), or ``jobs`` parallel ``python -m lsskd train``
subprocesses; and the results table.

Each run is claimed (:func:`claim`) before anything touches its directory: its lock is
taken and its state read again under the lock, so that several sweeps over one plan
(other terminals, GPUs or machines sharing the results folder) split the runs between
them: a run another process holds is left to it ("running elsewhere"), one it has
finished counts as finished."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..config import build_config, run_config
from ..engine.runlock import INHERIT_ENV, RunLock, RunLockedError, describe, holder
from ..errors import USER_ERRORS, StorageError
from .planning import RunResult, RunSpec, plan_actions


def data_key(cfg: Dict) -> str:
    """Cache key of a run's decoded dataset (see :func:`run_in_process`)."""
    return json.dumps(cfg["data"], sort_keys=True, default=str)


def _clear_partial(spec: RunSpec) -> None:
    # A run that died before its first checkpoint has no progress worth keeping.
    for f in ("config.yaml", "metrics.jsonl"):
        p = spec.out_dir / f
        if p.is_file():
            p.unlink()

def _short_error(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = " ".join(str(msg).split())
    return f"{type(e).__name__}: {msg}"[:300]


class torch_globals_restored:
    """Process-wide torch settings a run may change (threads, deterministic algorithms,
    matmul precision, cuDNN flags, the global RNG), restored on exit so that one in-process
    sweep run does not leak its settings into the next."""

    def __enter__(self):
        import torch

        self.saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_float32_matmul_precision(),
                      torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.get_rng_state())
        return self

    def __exit__(self, *exc):
        import torch

        threads, det, warn_only, precision, bench, cudnn_det, rng = self.saved
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = bench, cudnn_det
        torch.set_rng_state(rng)
        return False


def claim(res: RunResult) -> Optional[RunLock]:
    """Take ``res``'s run lock and decide its action again under it: None (with ``res``
    marked) when another live process holds the run (status ``elsewhere``) or has finished
    it since the plan was made (``skipped``); otherwise the held lock, and ``res.action``
    is ``resume`` or ``train`` as the directory now says."""
    spec = res.spec
    who = holder(spec.out_dir)  # cheap first look: no waiting on a lock that is surely held
    if who is not None:
        res.status, res.note = "elsewhere", f"running elsewhere ({describe(who)})"
        return None
    try:
        lock = RunLock.acquire(spec.out_dir)
    except RunLockedError as e:
        res.status, res.note = "elsewhere", f"running elsewhere ({describe(e.info)})"
        return None
    state = spec.state()
    if state == "done":
        lock.release()
        res.action, res.status, res.top1 = "skip", "skipped", spec.finished_top1()
        res.note = "finished by another process"
        return None
    res.action = "resume" if state == "resume" else "train"
    return lock


def run_in_process(res: RunResult, bundles: Dict[str, Any]) -> None:
    """Train/resume one run with the same code as ``lsskd train``, holding its lock
    (:func:`claim`; nothing happens when another process has the run).

    ``bundles`` caches decoded datasets by their ``data`` config so consecutive
    runs of the same data (the seeds of one config) decode it once; data loading
    does not depend on the run's seed, so this changes no result."""
    lock = claim(res)
    if lock is None:
        return
    with lock:
        _run_claimed(res, bundles)


def _run_claimed(res: RunResult, bundles: Dict[str, Any]) -> None:
    from ..engine.trainer import Trainer

    spec = res.spec
    if res.action == "resume":
        cfg = run_config(spec.out_dir)
    else:
        _clear_partial(spec)
        cfg = build_config(spec.config, spec.train_overrides())
    key = data_key(cfg)
    bundle = bundles.get(key)
    if bundle is None:
        from ..data import build_run_data

        bundle = build_run_data(cfg)  # quiet with train.progress=false, as in lsskd train
        bundles.clear()  # keep one dataset in memory at a time
        bundles[key] = bundle
    with torch_globals_restored():
        trainer = Trainer(cfg, resume=res.action == "resume", bundle=bundle)
        try:
            summary = trainer.fit()
        finally:
            if trainer.writer is not None:
                trainer.writer.close()
    res.top1 = summary.get("test_top1")


def train_command(res: RunResult) -> List[str]:
    """The ``python -m lsskd train ...`` command line that trains (or resumes) one run."""
    spec = res.spec
    if res.action == "resume":
        return [sys.executable, "-m", "lsskd", "train", "--resume", str(spec.out_dir)]
    return [sys.executable, "-m", "lsskd", "train", "--config", spec.config, *spec.train_overrides()]


def _last_error_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if "error" in ln.lower() or ln.startswith(("Traceback", "RuntimeError", "ValueError")):
            return ln[:300]
    return lines[-1][:300] if lines else ""


def run_sweep(specs: Sequence[RunSpec], jobs: int = 1, dry_run: bool = False,
              bundles: Optional[Dict[str, Any]] = None, log=print) -> List[RunResult]:
    """Plan and execute a sweep; returns one :class:`RunResult` per run (failed ones included)."""
    results = plan_actions(specs)
    if not dry_run:
        execute(results, jobs, bundles, log)
    return results


def execute(results: Sequence[RunResult], jobs: int = 1, bundles: Optional[Dict[str, Any]] = None,
            log=print) -> None:
    """Run the planned results in place. On Ctrl-C the current run(s) are marked
    failed, the rest stay ``planned``, and KeyboardInterrupt propagates. A run that
    fails for lack of disk space stops the sweep (the runs after it stay ``planned``)."""
    todo = [r for r in results if r.action != "skip"]
    if jobs > 1:
        _run_parallel(todo, jobs, log)
        return
    bundles = {} if bundles is None else bundles
    for i, r in enumerate(todo, 1):
        log(f"[sweep {i}/{len(todo)}] {r.action} {r.spec.name} -> {r.spec.out_dir}")
        t0 = time.time()
        try:
            run_in_process(r, bundles)
        except KeyboardInterrupt:
            r.status, r.note = "failed", "interrupted (Ctrl-C); rerun the sweep to resume"
            r.seconds = time.time() - t0
            raise
        except Exception as e:  # one bad run must not stop the sweep
            r.status, r.note = "failed", _short_error(e)
            r.seconds = time.time() - t0
            log(f"[sweep] {r.spec.name} failed: {r.note}")
            if isinstance(e, StorageError):
                log("[sweep] stopping: out of disk space; free some, then rerun the sweep to resume")
                return
            if not isinstance(e, USER_ERRORS):
                traceback.print_exc()
            continue
        if r.status == "planned":
            r.status, r.seconds = "ok", time.time() - t0
        else:  # claimed by another process, or finished by it since the plan was made
            log(f"[sweep] {r.spec.name}: {r.note}")


def _run_parallel(todo: List[RunResult], jobs: int, log) -> None:
    """``jobs`` runs at a time as ``python -m lsskd train`` subprocesses. This process
    claims each run (:func:`claim`) and hands its held lock down to the child (the lock
    is released only when both have let go of it), so no other sweep can slip in
    between the claim and the child's start."""
    env = dict(os.environ)
    # N concurrent torch processes each using every core would oversubscribe the CPU.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    env["PYTHONUNBUFFERED"] = "1"
    pending = list(todo)
    running: List[tuple[RunResult, subprocess.Popen, float, Any, RunLock]] = []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                r = pending.pop(0)
                lock = claim(r)
                if lock is None:
                    log(f"[sweep] {r.spec.name}: {r.note}")
                    continue
                if r.action == "train":
                    _clear_partial(r.spec)
                logf = open(r.spec.out_dir / "sweep.log", "a")
                cmd = train_command(r)
                logf.write(f"$ {' '.join(cmd)}\n")
                logf.flush()
                log(f"[sweep] start {r.action} {r.spec.name} (log: {r.spec.out_dir / 'sweep.log'})")
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                        env={**env, INHERIT_ENV: lock.handoff()}, pass_fds=(lock.fd,))
                running.append((r, proc, time.time(), logf, lock))
            time.sleep(0.2)
            still = []
            for r, proc, t0, logf, lock in running:
                rc = proc.poll()
                if rc is None:
                    still.append((r, proc, t0, logf, lock))
                    continue
                logf.close()
                lock.release()
                r.seconds = time.time() - t0
                if rc == 0 and (r.spec.out_dir / "summary.json").is_file():
                    r.status, r.top1 = "ok", r.spec.finished_top1()
                else:
                    r.status = "failed"
                    r.note = f"exit {rc}: {_last_error_line(r.spec.out_dir / 'sweep.log')}"
                log(f"[sweep] {r.status} {r.spec.name}" + (f": {r.note}" if r.status == "failed" else ""))
            running = still
    except KeyboardInterrupt:
        for r, proc, t0, logf, lock in running:
            proc.terminate()
        for r, proc, t0, logf, lock in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            logf.close()
            lock.release()
            r.status, r.note = "failed", "interrupted (Ctrl-C); rerun the sweep to resume"
        raise


def format_table(results: Sequence[RunResult]) -> str:
    rows = [("run", "action", "status", "top1(last)", "time", "note")]
    for r in results:
        rows.append((r.spec.name, r.action, r.status,
                     "" if r.top1 is None else f"{r.top1:.2f}",
                     "" if r.seconds is None else f"{r.seconds:.0f}s", r.note))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5])
        if n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  ----")
    return "\n".join(ln.rstrip() for ln in lines)
