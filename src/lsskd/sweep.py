"""Sweeps: many runs (configs x grid x seeds), resumable and skippable; the library
behind ``lsskd sweep`` and ``lsskd tune`` (the commands themselves are thin, in
``lsskd/commands/``).

Each run goes to ``<out_root>/<config-stem>[-<grid tag>]/seed<k>``. A run whose
directory holds ``summary.json`` is finished and skipped; one with ``last.pt`` but
no ``summary.json`` was interrupted and is resumed from its checkpoint; one with
neither is trained from scratch. Runs execute one after another in this process
(the same code path as ``lsskd train``), or as ``--jobs N`` parallel
``python -m lsskd train`` subprocesses. A failing run is reported and the sweep
goes on; the exit status is 1 when any run failed.

Plan file (``--plan FILE``, all keys optional except ``configs``)::

    configs: [configs/cpu/c100_resnet8_ce.yaml, configs/cpu/c100_resnet8_lsskd.yaml]
    seeds: [0, 1, 2]
    overrides: [train.epochs=15]        # or a mapping {train.epochs: 15}
    grid: {data.train_fraction: [0.25, 0.5, 0.75]}
    out_root: results/table3_cpu
    only: ["*lsskd*"]

Command-line values replace the plan's ``configs``/``seeds``/``out_root``/``only``;
command-line overrides and ``--grid`` entries are added to the plan's.
"""
from __future__ import annotations

import fnmatch
import glob
import itertools
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from .config import ConfigError, build_config, flatten, is_execution_key, merge, parse_override, run_config
from .errors import USER_ERRORS

PLAN_KEYS = {"configs", "seeds", "overrides", "grid", "out_root", "only"}
# Keys the sweep sets itself for every run.
RESERVED = {"seed", "out_dir"}
# A difference in config.EXECUTION_KEYS (how a run executes, not its result) between the
# plan and a run's config.yaml is not reported.


# --- planning -------------------------------------------------------------------------
@dataclass
class RunSpec:
    name: str  # "<group>/seed<k>"
    group: str  # "<config-stem>[-<grid tag>]"
    config: str
    seed: int
    overrides: List[str]  # without seed/out_dir
    out_dir: Path

    def train_overrides(self) -> List[str]:
        return [*self.overrides, f"seed={self.seed}", f"out_dir={self.out_dir}"]

    def state(self) -> str:
        """``done`` | ``resume`` | ``restart`` (files but no checkpoint) | ``new``."""
        d = self.out_dir
        if (d / "summary.json").is_file():
            return "done"
        if (d / "last.pt").is_file():
            return "resume"
        if any((d / f).exists() for f in ("config.yaml", "metrics.jsonl")):
            return "restart"
        return "new"


@dataclass
class RunResult:
    spec: RunSpec
    action: str  # train | resume | skip
    status: str = "planned"  # planned | ok | skipped | failed
    top1: Optional[float] = None
    seconds: Optional[float] = None
    note: str = ""


def _override_str(key: str, value: Any) -> str:
    # JSON is valid YAML flow syntax, so parse_override reads the value back exactly.
    return f"{key}={json.dumps(value)}"


def _normalize_overrides(raw: Any, where: str) -> List[str]:
    if raw is None:
        return []
    if isinstance(raw, dict):
        return [_override_str(k, v) for k, v in raw.items()]
    if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        for x in raw:
            parse_override(x)
        return list(raw)
    raise ConfigError(f"{where}: 'overrides' must be a list of key=value strings or a mapping, got {raw!r}")


def load_plan(path: str | Path) -> Dict[str, Any]:
    """Read and check a sweep plan file; returns a dict with the PLAN_KEYS present."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep plan not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep plan {path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep plan {path}: top level must be a mapping")
    unknown = sorted(set(data) - PLAN_KEYS)
    if unknown:
        raise ConfigError(f"sweep plan {path}: unknown key '{unknown[0]}' (known: {', '.join(sorted(PLAN_KEYS))})")
    plan: Dict[str, Any] = {}
    configs = data.get("configs")
    if configs is not None:
        if isinstance(configs, str):
            configs = [configs]
        if not isinstance(configs, list) or not all(isinstance(c, str) for c in configs):
            raise ConfigError(f"sweep plan {path}: 'configs' must be a list of YAML paths, got {configs!r}")
        plan["configs"] = [resolve_config(c, path.parent, f"sweep plan {path}") for c in configs]
        plan["configs"] = [c for group in plan["configs"] for c in group]
    if "seeds" in data:
        plan["seeds"] = check_seeds(data["seeds"], f"sweep plan {path}: 'seeds'")
    plan["overrides"] = _normalize_overrides(data.get("overrides"), f"sweep plan {path}")
    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"sweep plan {path}: 'grid' must be a mapping key -> list of values, got {grid!r}")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"sweep plan {path}: grid key '{k}' needs a non-empty list of values, got {v!r}")
    plan["grid"] = dict(grid)
    if data.get("out_root") is not None:
        plan["out_root"] = str(data["out_root"])
    if data.get("only") is not None:
        only = data["only"]
        plan["only"] = [only] if isinstance(only, str) else list(only)
    return plan


def resolve_config(entry: str, plan_dir: Path, where: str) -> List[str]:
    """Config paths are relative to the current directory (as for ``lsskd train``),
    falling back to the plan file's folder; glob patterns are expanded."""
    for base in (Path("."), plan_dir):
        cand = str(base / entry) if not Path(entry).is_absolute() else entry
        if any(ch in entry for ch in "*?["):
            hits = sorted(glob.glob(cand))
            if hits:
                return hits
        elif Path(cand).is_file():
            return [cand]
    raise ConfigError(f"{where}: config '{entry}' not found (relative to . or {plan_dir})")


def check_seeds(seeds: Any, where: str) -> List[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds:
        raise ConfigError(f"{where} must be a non-empty list of integers, got {seeds!r}")
    out = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            try:
                s = int(str(s))
            except ValueError:
                raise ConfigError(f"{where}: seed {s!r} is not an integer") from None
        out.append(s)
    if len(set(out)) != len(out):
        raise ConfigError(f"{where}: repeated seed in {out}")
    return out


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "_".join(_fmt_value(x) for x in v)
    s = str(v)
    return "".join(ch if ch.isalnum() or ch in "._+" else "_" for ch in s)


def grid_points(grid: Dict[str, List[Any]]) -> List[tuple[str, List[str]]]:
    """``[(tag, overrides)]`` for the cartesian product of the grid, in order.
    The tag names each key by its last component (``lr0.1``) unless two keys
    share it, then by the full key with dots as underscores."""
    if not grid:
        return [("", [])]
    keys = list(grid)
    last = [k.split(".")[-1] for k in keys]
    short = [s if last.count(s) == 1 else k.replace(".", "_") for k, s in zip(keys, last)]
    points = []
    for values in itertools.product(*(grid[k] for k in keys)):
        tag = "-".join(f"{s}{_fmt_value(v)}" for s, v in zip(short, values))
        points.append((tag, [_override_str(k, v) for k, v in zip(keys, values)]))
    return points


def expand(configs: Sequence[str], seeds: Sequence[int], out_root: str | Path,
           overrides: Sequence[str] = (), grid: Optional[Dict[str, List[Any]]] = None,
           only: Optional[Sequence[str]] = None) -> List[RunSpec]:
    """All runs of a sweep, each config checked (``build_config``) before anything runs."""
    if not configs:
        raise ConfigError("sweep: no configs (give --configs or a plan with 'configs')")
    if not out_root:
        raise ConfigError("sweep: no output root (give --out-root or 'out_root' in the plan)")
    for item in overrides:
        key = ".".join(parse_override(item)[0])
        if key in RESERVED:
            raise ConfigError(f"sweep: override '{item}' is not allowed; the sweep sets {key} for each run "
                              "(use --seeds / --out-root)")
    for key in grid or {}:
        if key in RESERVED:
            raise ConfigError(f"sweep: grid key '{key}' is not allowed; use --seeds / --out-root")
    stems: Dict[str, str] = {}
    for c in configs:
        stem = Path(c).stem
        if stem in stems and Path(stems[stem]).resolve() != Path(c).resolve():
            raise ConfigError(f"sweep: configs {stems[stem]} and {c} share the name '{stem}'; "
                              "their runs would share a directory")
        stems[stem] = c
    specs: List[RunSpec] = []
    seen = set()
    for c in configs:
        if Path(c).resolve() in seen:
            continue
        seen.add(Path(c).resolve())
        for tag, grid_over in grid_points(grid or {}):
            group = Path(c).stem + (f"-{tag}" if tag else "")
            for s in seeds:
                spec = RunSpec(f"{group}/seed{s}", group, str(c), int(s), [*overrides, *grid_over],
                               Path(out_root) / group / f"seed{s}")
                build_config(spec.config, spec.train_overrides())  # fail fast on a bad key
                specs.append(spec)
    if only:
        picked = [s for s in specs if any(fnmatch.fnmatchcase(s.name, p) or fnmatch.fnmatchcase(s.group, p)
                                          for p in only)]
        if not picked:
            names = ", ".join(s.name for s in specs[:8]) + (" ..." if len(specs) > 8 else "")
            raise ConfigError(f"sweep: --only {' '.join(only)} matched none of the runs ({names})")
        specs = picked
    return specs


def config_drift(spec: RunSpec) -> List[str]:
    """Result-relevant keys whose value in the run's config.yaml differs from the plan."""
    saved_file = spec.out_dir / "config.yaml"
    if not saved_file.is_file():
        return []
    try:
        # A key added to the library after the run was written counts as its default.
        saved = flatten(merge(yaml.safe_load(saved_file.read_text()) or {}, strict=False))
    except (yaml.YAMLError, ConfigError, AttributeError):
        return ["config.yaml unreadable"]
    planned = flatten(build_config(spec.config, spec.train_overrides()))
    keys = sorted(k for k in set(saved) | set(planned) if not is_execution_key(k))
    return [k for k in keys if saved.get(k) != planned.get(k)]


def plan_actions(specs: Sequence[RunSpec]) -> List[RunResult]:
    results = []
    for spec in specs:
        st = spec.state()
        action = {"done": "skip", "resume": "resume", "restart": "train", "new": "train"}[st]
        res = RunResult(spec, action)
        if st == "done":
            res.status, res.top1 = "skipped", _read_top1(spec)
        drift = config_drift(spec) if st in ("done", "resume") else []
        if drift:
            shown = ", ".join(drift[:4]) + (" ..." if len(drift) > 4 else "")
            res.note = f"its config.yaml differs from the plan in {shown}; kept as is (delete the dir to rerun)"
        if st == "restart":
            res.note = "no checkpoint yet: restarted from scratch"
        results.append(res)
    return results


# --- execution ------------------------------------------------------------------------
def data_key(cfg: Dict) -> str:
    """Cache key of a run's decoded dataset (see :func:`run_in_process`)."""
    return json.dumps(cfg["data"], sort_keys=True, default=str)


def _clear_partial(spec: RunSpec) -> None:
    # A run that died before its first checkpoint has no progress worth keeping.
    for f in ("config.yaml", "metrics.jsonl"):
        p = spec.out_dir / f
        if p.is_file():
            p.unlink()


def _read_top1(spec: RunSpec) -> Optional[float]:
    try:
        return json.loads((spec.out_dir / "summary.json").read_text()).get("test_top1")
    except (OSError, ValueError):
        return None


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
    from .engine.trainer import Trainer

    spec = res.spec
    if res.action == "resume":
        cfg = run_config(spec.out_dir)
    else:
        _clear_partial(spec)
        cfg = build_config(spec.config, spec.train_overrides())
    key = data_key(cfg)
    bundle = bundles.get(key)
    if bundle is None:
        from .data import build_data

        bundle = build_data(cfg["data"])
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
                    r.status, r.top1 = "ok", _read_top1(r.spec)
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
