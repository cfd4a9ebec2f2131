"""``lsskd tune``: choose hyper-parameters on a held-out split of the training data.

The paper tuned alpha_T, beta and gamma on a 10% held-out split; this command does the
same and never touches the test set: every candidate trains on the remaining 90% with
``data.val_fraction`` set and ``data.eval_on=val``. The winner (highest mean last-epoch
validation top-1 over the seeds) is written to ``<out-root>/chosen.yaml``, a config file
that trains it on the whole training set (``lsskd train --config <out-root>/chosen.yaml``),
with every candidate's score in ``<out-root>/tune.json``. Runs are those of ``lsskd sweep``:
finished candidates are skipped, interrupted ones resumed, ``--jobs N`` trains N at once.

    lsskd tune --config configs/cpu/c100_resnet8_lsskd.yaml --out-root results/tune \\
        --grid method.gamma=[0,0.1] --grid method.beta=[0.5,1.0] train.epochs=15
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from math import sqrt
from statistics import mean, stdev

from ..config import dump, nest_overrides, parse_override
from ..errors import ConfigError
from ..engine.checkpoint import atomic_write_json, atomic_write_text
from ..engine.runlock import holder
from ..report.runs import left_out_reason
from ..sweep import expand, format_table, grid_points, run_sweep


def add_parser(sub):
    p = sub.add_parser("tune", help="grid-search hyper-parameters on a held-out training split (never the test set)")
    p.add_argument("--config", required=True, help="the training config whose keys are tuned (see configs/)")
    p.add_argument("--out-root", required=True,
                   help="folder for the candidates' runs (<out-root>/<config-stem>-<grid tag>/seed<k>), "
                        "tune.json and chosen.yaml")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=[V1,V2,...]",
                   help="a key and its candidate values; repeat for a product grid")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="seeds every candidate trains with (default 0); with two or more, each candidate's "
                        "deficit to the winner is paired by seed and given ± its standard error")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="stratified share of the training data held out to score candidates (default 0.1); "
                        "the test set is never read")
    p.add_argument("--jobs", type=int, default=1,
                   help="candidates trained at once, as `python -m lsskd train` subprocesses (as in sweep)")
    p.add_argument("--dry-run", action="store_true", help="list the candidate runs and what would happen; train nothing")
    p.add_argument("overrides", nargs="*", help="fixed overrides for every candidate")
    return p


def parse_grid(items) -> dict:
    grid = {}
    for item in items:
        path, values = parse_override(item)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"tune: --grid '{item}' needs a non-empty list of values, e.g. {path[-1]}=[0,0.1]")
        grid[".".join(path)] = values
    if not grid:
        raise ConfigError("tune: give at least one --grid KEY=[values]")
    return grid


def behind_best(candidates: list, best: dict) -> list:
    """Sets ``behind_best`` = {mean, se} on each other candidate: its per-seed deficit to the
    winner, paired by seed (se = std / sqrt(seeds), None with one seed). Every candidate is
    scored on the same held-out images, so what separates two of them is training noise,
    which only the seeds measure. Returns the groups the seeds cannot tell from the winner
    (deficit within two standard errors, or one seed only)."""
    close = []
    for c in candidates:
        if c is best:
            continue
        d = [b - x for b, x in zip(best["val_top1"], c["val_top1"])]
        se = stdev(d) / sqrt(len(d)) if len(d) > 1 else None
        c["behind_best"] = {"mean": mean(d), "se": se}
        if se is None or mean(d) <= 2 * se:
            close.append(c["group"])
    return close


def chosen_config(args, best: dict, out: Path) -> str:
    """The winner as a config file of its own: the tuned config as ``_base_``, then the fixed
    overrides and the chosen values, without the held-out split (the final model trains on
    all of its training data, and is then evaluated on the test set once)."""
    cfg = nest_overrides([*args.overrides, *best["overrides"]])
    try:
        base = os.path.relpath(Path(args.config).resolve(), out.resolve())
    except ValueError:  # another drive (Windows)
        base = str(Path(args.config).resolve())
    seeds = " ".join(map(str, args.seeds))
    head = (f"# chosen by lsskd tune on a {args.val_fraction:.0%} held-out split of the training data:\n"
            f"# mean last-epoch val top-1 {best['mean_val_top1']:.2f} over seeds {seeds} (tune.json has every candidate)\n")
    return head + dump({"_base_": base, **cfg})


def run(args) -> int:
    if args.jobs < 1:
        raise ConfigError(f"tune: --jobs must be >= 1, got {args.jobs}")
    if not 0.0 < args.val_fraction < 1.0:
        raise ConfigError(f"tune: --val-fraction must be in (0, 1), got {args.val_fraction}")
    for item in args.overrides:
        if item.split("=", 1)[0] in ("data.val_fraction", "data.eval_on"):
            raise ConfigError(f"tune: '{item}' is set by tune itself (use --val-fraction)")
    grid = parse_grid(args.grid)
    fixed = [*args.overrides, f"data.val_fraction={args.val_fraction}", "data.eval_on=val"]
    specs = expand([args.config], args.seeds, args.out_root, fixed, grid)
    results = run_sweep(specs, jobs=args.jobs, dry_run=args.dry_run)
    print(format_table(results))
    if args.dry_run:
        return 0
    stem = Path(args.config).stem
    candidates, left_out = [], []
    for tag, over in grid_points(grid):
        group = stem + (f"-{tag}" if tag else "")
        scores = []
        for s in args.seeds:
            run = Path(args.out_root) / group / f"seed{s}"
            # Only finished runs: one another process is writing (a tune or sweep beside
            # this one) is left out, as is one without a summary.
            if (run / "summary.json").is_file() and holder(run) is None:
                scores.append(json.loads((run / "summary.json").read_text())["val_top1"])
            else:
                left_out.append(f"{run}: {left_out_reason(run)}")
        candidates.append({"group": group, "overrides": over, "val_top1": scores,
                           "mean_val_top1": mean(scores) if len(scores) == len(args.seeds) else None})
    for line in left_out:
        print(f"tune: left out {line}")
    done = [c for c in candidates if c["mean_val_top1"] is not None]
    if not done:
        print("tune: no candidate finished; nothing chosen")
        return 1
    best = max(done, key=lambda c: c["mean_val_top1"])  # ties: the first in grid order
    close = behind_best(done, best)
    out = Path(args.out_root)
    atomic_write_json(out / "tune.json", {"config": args.config, "seeds": args.seeds,
                                          "val_fraction": args.val_fraction, "selection": "mean last-epoch val top-1",
                                          "candidates": candidates, "chosen": best,
                                          "within_noise_of_chosen": close})
    for c in done:
        if c is not best:
            b = c["behind_best"]
            se = f" ± {b['se']:.2f}" if b["se"] is not None else " (one seed: no noise estimate)"
            print(f"  {c['group']}: {b['mean']:.2f}{se} below the winner, paired by seed")
    if close:
        print(f"tune: the seeds cannot tell {', '.join(close)} from the winner (within two standard "
              "errors): add --seeds (or a larger --val-fraction) before trusting the choice")
    atomic_write_text(out / "chosen.yaml", chosen_config(args, best, out))
    print(f"tune: chose {best['group']} (mean val top-1 {best['mean_val_top1']:.2f}); "
          f"train it on the whole training set with: lsskd train --config {out / 'chosen.yaml'}")
    return 0 if len(done) == len(candidates) else 1
