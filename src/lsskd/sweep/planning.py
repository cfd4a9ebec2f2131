"""Planning a sweep: plan files, the grid, the list of runs (:class:`RunSpec`) and what
each needs (:func:`plan_actions`: skip a finished run, resume an interrupted one, train
a new one; a finished or resumed run whose saved config differs from the plan, or a run
another process holds the lock of, is noted).
Nothing here trains; :mod:`lsskd.sweep.execution` runs the plan."""
from __future__ import annotations

import fnmatch
import glob
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ..config import build_config, flatten, is_execution_key, merge, parse_override
from ..engine.runlock import describe, holder
from ..errors import ConfigError

PLAN_KEYS = {"configs", "seeds", "overrides", "grid", "out_root", "only"}
# Keys the sweep sets itself for every run.
RESERVED = {"seed", "out_dir"}
# A difference in config.EXECUTION_KEYS (how a run executes, not its result) between the
# plan and a run's config.yaml is not reported.


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

    def finished_top1(self) -> Optional[float]:
        """The last-epoch top-1 in this run's ``summary.json``; None if unreadable or absent."""
        try:
            return json.loads((self.out_dir / "summary.json").read_text()).get("test_top1")
        except (OSError, ValueError):
            return None


@dataclass
class RunResult:
    spec: RunSpec
    action: str  # train | resume | skip
    status: str = "planned"  # planned | ok | skipped | elsewhere (another process has it) | failed
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
            res.status, res.top1 = "skipped", spec.finished_top1()
        drift = config_drift(spec) if st in ("done", "resume") else []
        if drift:
            shown = ", ".join(drift[:4]) + (" ..." if len(drift) > 4 else "")
            res.note = f"its config.yaml differs from the plan in {shown}; kept as is (delete the dir to rerun)"
        if st == "restart":
            res.note = "no checkpoint yet: restarted from scratch"
        if st != "done":
            # Decided again when the run's turn comes (execution.claim); shown for --dry-run.
            who = holder(spec.out_dir)
            if who is not None:
                res.note = f"running elsewhere now ({describe(who)})"
        results.append(res)
    return results
