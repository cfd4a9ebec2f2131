"""``lsskd report RUN_DIR... [--out DIR]``: tables and plots over finished runs."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import ConfigError


def add_parser(sub):
    p = sub.add_parser(
        "report", help="aggregate run directories (mean ± std over seeds) into report.md/.csv and plots",
        description="Collect every finished run (summary.json) under the given folders, group the seeds "
                    "(runs still being written, whose lock a live process holds, are left out and listed), "
                    "of each config, and write report.md, report.csv and PNG plots. The headline is the "
                    "last-epoch test top-1; the best-epoch number is reported beside it, labelled.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or folders of them (searched recursively)")
    p.add_argument("--out", help="output folder (default: the first RUN_DIR)")
    p.add_argument("--group-by", default="",
                   help="comma-separated fields to group by instead of the whole config, "
                        "e.g. method,model or method,data.train_fraction")
    p.add_argument("--compare-to", default=None, metavar="METHOD|GROUP",
                   help="baseline for the 'delta vs baseline' columns: a method (summary.json's "
                        "'method', e.g. ce or lsskd_selfsup) or a group's label as the report prints it "
                        "(e.g. lsskd, beside variants such as 'lsskd (gamma=0)'); default: ce, where "
                        "present; 'none' to omit. A baseline that no run has is an error")
    p.add_argument("--cells", action="store_true",
                   help="treat each RUN_DIR as one cell (NAME=DIR names it; default: the folder's name) "
                        "and write cells.md/cells.csv: every group on every cell with its paired delta vs "
                        "the baseline in that cell (ahead/level/behind at two standard errors), training "
                        "FLOPs and training time relative to it; cells.png plots the deltas ± 2 SE")
    p.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    p.add_argument("--allow-repeated-seeds", action="store_true",
                   help="count two run folders with the same config and seed as two seeds (by default "
                        "the report refuses: one is usually a copy of the other)")
    return p


def run(args) -> int:
    from ..report import build_report, describe_repeats
    from ..report.runs import left_out_reason

    if args.cells:
        return _run_cells(args)
    group_by = [g.strip() for g in args.group_by.split(",") if g.strip()] or None
    out = _out_folder(args.out or args.runs[0])
    named = args.compare_to is not None
    baseline = _baseline(args.compare_to)
    rep = build_report(args.runs, out, group_by=group_by, baseline=baseline, plots=not args.no_plots,
                       allow_repeats=args.allow_repeated_seeds, require_baseline=named)
    if rep.repeats:
        print(f"warning: repeated seeds counted as separate seeds: {describe_repeats(rep.repeats)}",
              file=sys.stderr)
    for line in rep.pooled:
        print(f"warning: {line}; add one of these to --group-by to keep them apart", file=sys.stderr)
    print(f"{len(rep.runs)} run(s) in {len(rep.groups)} group(s)"
          + (f"; {len(rep.unfinished)} unfinished run(s) left out" if rep.unfinished else ""))
    for d in rep.unfinished:
        print(f"  left out {d}: {left_out_reason(d)}")
    for g in rep.groups:
        m, s = g.stats["top1"]
        print(f"  {g.label}: top-1 (last epoch) {m:.2f}" + (f" ± {s:.2f}" if s is not None else "")
              + f"  [n={g.stats['n']}]")
    for f in rep.files:
        print(f"wrote {f}")
    return 0


def _run_cells(args) -> int:
    from ..report.cells import parse_cells, write_cells

    if args.group_by:
        raise ConfigError("--cells groups each cell by its whole config; --group-by does not apply")
    cells = parse_cells(args.runs)
    out = _out_folder(args.out or cells[0][1])
    files, unfinished = write_cells(cells, out, baseline=_baseline(args.compare_to),
                                    allow_repeats=args.allow_repeated_seeds, plots=not args.no_plots)
    for d in unfinished:
        print(f"  left out {d}: unfinished")
    for f in files:
        print(f"wrote {f}")
    return 0


def _out_folder(out):
    if Path(out).is_file():
        raise ConfigError(f"--out {out} is a file; give a folder")
    return out


def _baseline(compare_to):
    """--compare-to: default ce; 'none' (or empty) for no baseline."""
    if compare_to is None:
        return "ce"
    return None if compare_to.lower() in ("", "none") else compare_to
