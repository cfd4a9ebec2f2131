"""Executing a planned sweep: one run after another in this process (the same code path
as ``lsskd train``, with decoded data shared between consecutive runs and torch's global
settings restored after each), or ``jobs`` parallel ``python -m lsskd train``
subprocesses; and the results table."""
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
from ..errors import USER_ERRORS
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


def run_in_process(res: RunResult, bundles: Dict[str, Any]) -> None:
    """Train/resume one run with the same code as ``lsskd train``.

    ``bundles`` caches decoded datasets by their ``data`` config so consecutive
    runs of the same data (the seeds of one config) decode it once; data loading
    does not depend on the run's seed, so this changes no result."""
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
    failed, the rest stay ``planned``, and KeyboardInterrupt propagates."""
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
            r.status = "ok"
        except KeyboardInterrupt:
            r.status, r.note = "failed", "interrupted (Ctrl-C); rerun the sweep to resume"
            r.seconds = time.time() - t0
            raise
        except Exception as e:  # one bad run must not stop the sweep
            r.status, r.note = "failed", _short_error(e)
            log(f"[sweep] {r.spec.name} failed: {r.note}")
            if not isinstance(e, USER_ERRORS):
                traceback.print_exc()
        r.seconds = time.time() - t0


def _run_parallel(todo: List[RunResult], jobs: int, log) -> None:
    env = dict(os.environ)
    # N concurrent torch processes each using every core would oversubscribe the CPU.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    env["PYTHONUNBUFFERED"] = "1"
    pending = list(todo)
    running: List[tuple[RunResult, subprocess.Popen, float, Any]] = []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                r = pending.pop(0)
                if r.action == "train":
                    _clear_partial(r.spec)
                r.spec.out_dir.mkdir(parents=True, exist_ok=True)
                logf = open(r.spec.out_dir / "sweep.log", "a")
                cmd = train_command(r)
                logf.write(f"$ {' '.join(cmd)}\n")
                logf.flush()
                log(f"[sweep] start {r.action} {r.spec.name} (log: {r.spec.out_dir / 'sweep.log'})")
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
                running.append((r, proc, time.time(), logf))
            time.sleep(0.2)
            still = []
            for r, proc, t0, logf in running:
                rc = proc.poll()
                if rc is None:
                    still.append((r, proc, t0, logf))
                    continue
                logf.close()
                r.seconds = time.time() - t0
                if rc == 0 and (r.spec.out_dir / "summary.json").is_file():
                    r.status, r.top1 = "ok", r.spec.finished_top1()
                else:
                    r.status = "failed"
                    r.note = f"exit {rc}: {_last_error_line(r.spec.out_dir / 'sweep.log')}"
                log(f"[sweep] {r.status} {r.spec.name}" + (f": {r.note}" if r.status == "failed" else ""))
            running = still
    except KeyboardInterrupt:
        for r, proc, t0, logf in running:
            proc.terminate()
        for r, proc, t0, logf in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            logf.close()
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
