"""Aggregate finished run directories into tables (Markdown + CSV) and plots.

A run directory is any folder holding ``summary.json`` (written by ``lsskd train``
at the end of a run), usually with ``config.yaml`` and ``metrics.jsonl``. Runs that
share their whole config apart from the seed (and keys that only affect how a run
executes, :func:`lsskd.config.is_execution_key`) form one group; each group is reported as mean and
sample standard deviation (n - 1 denominator) over its seeds.

The headline number is the test top-1 accuracy **at the last epoch**. The best
epoch's accuracy is picked by looking at the test set, so it is optimistic; it is
reported beside the headline, labelled as such, never instead of it.

The package, by concern: :mod:`.runs` (finding run directories, their identity,
grouping and labels, repeated seeds), :mod:`.tables` (statistics, the delta column
and its standard error, CSV and Markdown), :mod:`.plots` (matplotlib figures); this
module holds the entry point :func:`build_report`.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..errors import ConfigError, DataError
from .plots import plot_branches, plot_curves, plot_epochs, plot_fraction, points_against, pyplot
from .runs import (ALIASES, OWN_COLUMNS, Group, Run, dataset_name, describe_repeats, find_runs, group_runs,
                   ignored_key, load_run, method_name, pooled_seeds, repeated_seeds)
from .tables import BEST_LABEL, CSV_COLUMNS, add_deltas, compute_stats, csv_rows, markdown, mean_std

__all__ = ["ALIASES", "BEST_LABEL", "CSV_COLUMNS", "OWN_COLUMNS", "Group", "Report", "Run", "add_deltas",
           "build_report", "compute_stats", "csv_rows", "dataset_name", "describe_repeats", "find_runs",
           "group_runs", "ignored_key", "load_run", "markdown", "mean_std", "plot_branches", "plot_curves",
           "plot_epochs", "plot_fraction", "points_against", "pooled_seeds", "pyplot", "repeated_seeds"]


@dataclass
class Report:
    groups: List[Group]
    runs: List[Run]
    unfinished: List[Path]
    files: List[Path]
    repeats: List[List[Run]] = field(default_factory=list)  # counted anyway (allow_repeats)
    pooled: List[str] = field(default_factory=list)  # --group-by groups holding one seed twice


def build_report(paths: Sequence[str | Path], out: str | Path, group_by: Optional[Sequence[str]] = None,
                 baseline: Optional[str] = "ce", plots: bool = True, allow_repeats: bool = False,
                 require_baseline: bool = False) -> Report:
    """Find runs under ``paths``, aggregate them, write ``report.md``, ``report.csv``
    and (with ``plots``) PNG figures into ``out``. Two folders holding the same seed of
    the same config (:func:`repeated_seeds`, e.g. a run copied elsewhere) are refused
    unless ``allow_repeats``; then they are counted and listed in ``Report.repeats``.
    With ``require_baseline``, a ``baseline`` that is neither a run's method nor a group's
    label is refused (before anything is written) instead of leaving the delta columns out."""
    runs, unfinished = find_runs(paths)
    if not runs:
        hint = f" ({len(unfinished)} unfinished run(s) found)" if unfinished else ""
        raise DataError(f"no finished runs (summary.json) under {', '.join(map(str, paths))}{hint}")
    repeats = repeated_seeds(runs)
    if repeats and not allow_repeats:
        raise DataError(f"{len(repeats)} seed(s) appear in more than one run folder with the same config "
                        f"({describe_repeats(repeats)}); each would count as another seed. Remove the "
                        "copies, or pass --allow-repeated-seeds to count them anyway")
    groups = group_runs(runs, group_by)
    pooled = pooled_seeds(groups) if group_by else []
    if require_baseline and baseline and not any(baseline in (method_name(g), g.label) for g in groups):
        have = sorted({method_name(g) for g in groups})
        raise ConfigError(f"--compare-to {baseline}: no run under {', '.join(map(str, paths))} has that method "
                          f"or group label (methods: {', '.join(have)}); name one of these, or 'none'")
    compute_stats(groups)
    add_deltas(groups, baseline, by_fields=bool(group_by))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    figs: List[Tuple[str, str]] = []
    if plots:
        pyplot()  # fail before writing anything when matplotlib is missing
        for title, fname, fn in (("Accuracy per epoch", "accuracy_per_epoch.png", plot_curves),
                                 ("Accuracy vs training fraction", "accuracy_vs_fraction.png", plot_fraction),
                                 ("Accuracy vs epoch budget", "accuracy_vs_epochs.png", plot_epochs),
                                 ("Per-branch accuracy", "branch_accuracy.png", plot_branches)):
            if fn(groups, out / fname):
                figs.append((title, fname))
                files.append(out / fname)
    rows = csv_rows(groups, baseline)
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    md = markdown(groups, runs, unfinished, baseline, figs, [str(p) for p in paths])
    if repeats:
        md += ("\n## Repeated seeds (counted, --allow-repeated-seeds)\n\n"
               + "".join(f"- {describe_repeats([rs])}\n" for rs in repeats))
    if pooled:
        md += ("\n## Groups that hold a seed more than once (--group-by pooled different settings)\n\n"
               + "".join(f"- {line}\n" for line in pooled))
    (out / "report.md").write_text(md)
    files = [out / "report.md", out / "report.csv", *files]
    return Report(groups, runs, unfinished, files, repeats, pooled)
