"""``lsskd sweep``: configs x grid x seeds into one results tree (the library is
:mod:`lsskd.sweep`; its module docstring describes plans, run states and ``--jobs``)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from ..config import parse_override
from ..errors import ConfigError
from ..sweep import (RunSpec, check_seeds, execute, expand, format_table, load_plan, plan_actions,
                     resolve_config, train_command)


def add_parser(sub):
    p = sub.add_parser(
        "sweep", help="run configs x seeds (x grid) into one results tree; skips finished runs, resumes interrupted ones",
        description="Run every config x grid point x seed into <out_root>/<config-stem>[-<grid tag>]/seed<k>. "
                    "Finished runs (summary.json) are skipped, interrupted ones (last.pt) resumed, and runs "
                    "another process is training are left to it: start the same sweep on several GPUs or "
                    "machines to split the runs between them.")
    p.add_argument("--plan", help="sweep YAML: {configs, seeds, overrides, grid, out_root, only}")
    p.add_argument("--configs", nargs="+", default=None, metavar="YAML", help="training configs")
    p.add_argument("--seeds", nargs="+", default=None, metavar="K", help="seeds (default: 0)")
    p.add_argument("--out-root", default=None, help="root folder of the run directories")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=[V1,V2]",
                   help="sweep a config key over a list of values (repeatable; runs = product)")
    p.add_argument("--only", nargs="+", default=None, metavar="PATTERN",
                   help="run only runs whose name (e.g. 'c100_resnet8_ce/seed1') or group matches a glob")
    p.add_argument("--jobs", type=int, default=1,
                   help="parallel runs as `python -m lsskd train` subprocesses (default 1: sequential, in-process)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and what would happen, run nothing")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. train.epochs=2")
    return p


# --- command line ----------------------------------------------------------------------------
def _split_tokens(values: Optional[List[str]], overrides: List[str]) -> Optional[List[str]]:
    """argparse's ``nargs='+'`` swallows trailing ``key=value`` overrides; give them back."""
    if values is None:
        return None
    keep = []
    for v in values:
        if "=" in v and not Path(v).is_file():
            overrides.append(v)
        else:
            keep.append(v)
    return keep


def specs_from_args(args) -> List[RunSpec]:
    overrides = list(args.overrides or [])
    cli_configs = _split_tokens(args.configs, overrides)
    cli_seeds = _split_tokens(args.seeds, overrides)
    cli_only = _split_tokens(args.only, overrides)
    plan = load_plan(args.plan) if args.plan else {"overrides": [], "grid": {}}
    configs = plan.get("configs", [])
    if cli_configs:
        configs = [c for entry in cli_configs for c in resolve_config(entry, Path("."), "--configs")]
    seeds = check_seeds(cli_seeds, "--seeds") if cli_seeds else plan.get("seeds", [0])
    out_root = args.out_root or plan.get("out_root")
    grid = dict(plan.get("grid", {}))
    for item in args.grid:
        path, values = parse_override(item)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"--grid '{item}': give a non-empty list, e.g. {'.'.join(path)}=[0.25,0.5]")
        grid[".".join(path)] = values
    return expand(configs, seeds, out_root, [*plan.get("overrides", []), *overrides], grid,
                  cli_only or plan.get("only"))


def run(args) -> int:
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    specs = specs_from_args(args)
    results = plan_actions(specs)
    if args.dry_run:
        print(format_table(results))
        todo = [r for r in results if r.action != "skip"]
        if todo:
            print("\ncommands:")
        for r in todo:
            print("  lsskd " + " ".join(train_command(r)[3:]))
        return 0
    try:
        execute(results, jobs=args.jobs)
    except KeyboardInterrupt:
        print(format_table(results))
        print("\nsweep interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(format_table(results))
    failed = [r for r in results if r.status == "failed"]
    n_ok = sum(r.status == "ok" for r in results)
    n_skip = sum(r.status == "skipped" for r in results)
    n_else = sum(r.status == "elsewhere" for r in results)
    n_left = sum(r.status == "planned" for r in results)
    print(f"\n{len(results)} runs: {n_ok} trained/resumed, {n_skip} already finished, "
          + (f"{n_else} running elsewhere, " if n_else else "")
          + (f"{n_left} not started, " if n_left else "") + f"{len(failed)} failed")
    return 1 if failed else 0
