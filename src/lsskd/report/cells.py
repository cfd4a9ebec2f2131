"""One table across several cells: every method on every cell, paired with the baseline, with cost.

A *cell* is one folder of runs made by one plan (one dataset, model and budget; every method at
the same seeds, by the same code on the same machine). Each cell is grouped and compared with its
own baseline exactly as ``report.md`` does (:func:`.tables.add_deltas`); this module only lays the
cells side by side, one row per group label, and adds two cost columns:

- FLOPs / baseline: training MACs per sample over the whole run (``summary.json``'s ``macs_train``,
  analytic, all views and extra passes included, times its ``epochs``) over the baseline's. Exact,
  and the same on every machine; a CE run at twice the epochs costs 2.00.

- time / baseline: the group's mean ``train_seconds`` over the baseline's in the same cell,
  averaged over cells. Measured, so as noisy as the machine was while the runs shared it.

Inside a cell every group pairs with the cell's baseline: by :func:`.tables.add_deltas`' rule
(same config apart from the method) where one matches, else with the cell's only baseline group,
so that a budget control (CE at twice the epochs, its own sweep name) pairs with CE too.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import ConfigError, DataError
from .runs import Group, describe_repeats, find_runs, group_runs, repeated_seeds
from .tables import add_deltas, baseline_groups, compute_stats, mean_std, pair_with

CELL_COLUMNS = ["group", "cell", "label", "n_seeds", "top1_last_mean", "top1_last_std", "paired_delta", "paired_se",
                "paired_n", "at_2se", "baseline", "flops_vs_baseline", "time_vs_baseline", "deploys", "run_dirs"]


def at_two_se(paired) -> str:
    """'ahead' or 'behind' the baseline when the paired mean difference is beyond two standard
    errors of it, 'level' otherwise; '' without a paired difference. The reading rule of the
    comparisons in results/ (written in their plans before the runs ended)."""
    if not paired:
        return ""
    m, se, _ = paired
    return "ahead" if m > 2 * se else "behind" if m < -2 * se else "level"


def parse_cells(specs: Sequence[str]) -> List[Tuple[str, Path]]:
    """``NAME=DIR`` or ``DIR`` (named after the folder); names must be distinct."""
    cells: List[Tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name or spec, spec
        if not name or not path:
            raise ConfigError(f"--cells: '{spec}' is neither NAME=DIR nor DIR")
        if any(name == n for n, _ in cells):
            raise ConfigError(f"--cells: two cells named '{name}'; name them with NAME=DIR")
        cells.append((name, Path(path)))
    return cells


def _base_group(groups: Sequence[Group], baseline: Optional[str]) -> Optional[Group]:
    if not baseline:
        return None
    exact = baseline_groups(groups, baseline)
    return exact[0] if len(exact) == 1 else None


def row_key(g: Group) -> str:
    """The name a sweep gave the group's runs (the folder above ``seedN``, e.g. ``ce_cutmix``),
    stable across cells; the report's label when the runs' folders disagree."""
    parents = {r.path.parent.name for r in g.runs}
    return parents.pop() if len(parents) == 1 and all(r.path.name.startswith("seed") for r in g.runs) else g.label


def _macs_train(g: Group) -> Optional[float]:
    """Training MACs per sample over the whole run (per-sample MACs x epochs), if all runs agree."""
    vals = [r.summary.get("macs_train", 0) * r.summary.get("epochs", 0) for r in g.runs]
    return float(vals[0]) if vals and vals[0] and len(set(vals)) == 1 else None


def _deploys_other(g: Group, base: Optional[Group]) -> str:
    """'' when ``g`` deploys the baseline's network; else what it deploys (a teacher row, a
    model of another size), so that its accuracy is not read as the same network's."""
    if base is None or g is base:
        return ""
    model, base_model = g.first.summary.get("model"), base.first.summary.get("model")
    macs, base_macs = g.stats.get("macs_deployed"), base.stats.get("macs_deployed")
    if model == base_model and macs == base_macs:
        return ""
    ratio = f", {macs / base_macs:.1f}x its MACs" if macs and base_macs else ""
    return f"deploys {model or 'another network'}{ratio}"


def cell_rows(cells: Sequence[Tuple[str, Path]], baseline: Optional[str],
              allow_repeats: bool = False) -> Tuple[List[str], Dict[str, Dict[str, dict]], List[Path]]:
    """Group each cell's runs and compare them with the cell's baseline. Returns the row labels
    (in order of first appearance), ``{label: {cell: entry}}`` and the unfinished run folders."""
    labels: List[str] = []
    table: Dict[str, Dict[str, dict]] = {}
    unfinished_all: List[Path] = []
    for name, path in cells:
        runs, unfinished = find_runs([path])
        unfinished_all += unfinished
        if not runs:
            raise DataError(f"cell '{name}': no finished runs (summary.json) under {path}")
        repeats = repeated_seeds(runs)
        if repeats and not allow_repeats:
            raise DataError(f"cell '{name}': seeds in more than one folder with the same config "
                            f"({describe_repeats(repeats)}); remove the copies or pass --allow-repeated-seeds")
        groups = group_runs(runs)
        compute_stats(groups)
        # The baseline may be named by its sweep name (the folder, e.g. sad_ce_gated) too.
        by_key = [g for g in groups if row_key(g) == baseline]
        cell_base = by_key[0].label if len(by_key) == 1 else baseline
        add_deltas(groups, cell_base)
        base = _base_group(groups, cell_base)
        if base is not None:
            for g in groups:
                if g is not base and g.stats.get("delta") is None:
                    pair_with(g, base)
        base_macs = _macs_train(base) if base else None
        base_time = base.stats["train_seconds"][0] if base else None
        for g in groups:
            key = row_key(g)
            if key not in table:
                labels.append(key)
                table[key] = {}
            if name in table[key]:
                raise DataError(f"cell '{name}': two groups named '{key}' ({table[key][name]['label']}; "
                                f"{g.label})")
            macs = _macs_train(g)
            t = g.stats["train_seconds"][0]
            table[key][name] = {"label": g.label,
                "n": g.stats["n"], "top1": g.stats["top1"], "paired": g.stats.get("paired"),
                "is_base": base is g, "baseline": base.label if base else "",
                "flops": macs / base_macs if macs and base_macs else None,
                "time": t / base_time if t and base_time else None,
                "deploys": _deploys_other(g, base),
                "dirs": [str(r.path) for r in g.runs],
            }
    if baseline and not any(e["is_base"] for row in table.values() for e in row.values()):
        raise ConfigError(f"--compare-to {baseline}: no cell has a group with that name, method or label "
                          f"(groups: {', '.join(labels)})")
    return labels, table, unfinished_all



def write_cells(cells: Sequence[Tuple[str, Path]], out: str | Path, baseline: Optional[str] = "ce",
                allow_repeats: bool = False, plots: bool = True) -> Tuple[List[Path], List[Path]]:
    """Write ``cells.md``, ``cells.csv`` and (with ``plots`` and a baseline) ``cells.png``, the
    paired differences with their 2-SE bars, into ``out``; returns (files, unfinished runs)."""
    if plots:
        from .plots import pyplot

        pyplot()  # fail before writing anything when matplotlib is missing
    labels, table, unfinished = cell_rows(cells, baseline, allow_repeats)
    names = [n for n, _ in cells]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label in labels:
        for name in names:
            e = table[label].get(name)
            if e is None:
                continue
            p = e["paired"] or (None, None, None)
            rows.append({"group": label, "cell": name, "label": e["label"], "n_seeds": e["n"],
                         "top1_last_mean": _r(e["top1"][0]), "top1_last_std": _r(e["top1"][1]),
                         "paired_delta": _r(p[0]), "paired_se": _r(p[1]), "paired_n": p[2] or "",
                         "at_2se": at_two_se(e["paired"]),
                         "baseline": e["baseline"], "flops_vs_baseline": _r(e["flops"]),
                         "time_vs_baseline": _r(e["time"]), "deploys": e["deploys"],
                         "run_dirs": " ".join(e["dirs"])})
    with open(out / "cells.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CELL_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    base_txt = baseline or "none"
    files = [out / "cells.md", out / "cells.csv"]
    if plots and baseline:
        from .plots import plot_cells

        if plot_cells(rows, names, baseline, out / "cells.png"):
            files.append(out / "cells.png")
    L = ["# lsskd report across cells", "",
         f"Cells: {', '.join(f'{n} (`{p}`)' for n, p in cells)}.", "",
         "Each entry: last-epoch top-1 (%), mean ± sample std over seeds, and below it the paired Δ "
         f"vs {base_txt} in the same cell (mean of the per-seed differences ± its standard error, "
         "seeds in brackets). FLOPs: training MACs per sample over the whole run (x epochs) over the baseline's (exact). Time: "
         "training seconds over the baseline's in the same cell, averaged over cells (measured; as "
         "noisy as the machine). Every row deploys the baseline's network unless it says otherwise.", ""]
    L.append("| Group | " + " | ".join(names) + " | FLOPs / base | Time / base |")
    L.append("|---|" + "---:|" * (len(names) + 2))
    for label in labels:
        cells_txt = []
        for name in names:
            e = table[label].get(name)
            if e is None:
                cells_txt.append("–")
                continue
            m, s = e["top1"]
            txt = f"{m:.2f}" + (f" ± {s:.2f}" if s is not None else "") + f" (n={e['n']})"
            if e["is_base"]:
                txt += "<br>baseline"
            elif e["paired"]:
                pd, se, n = e["paired"]
                txt += f"<br>{pd:+.2f} ± {se:.2f} ({n})"
            cells_txt.append(txt)
        flops = mean_std([e["flops"] for e in table[label].values()])[0]
        time = mean_std([e["time"] for e in table[label].values()])[0]
        notes = sorted({e["deploys"] for e in table[label].values() if e["deploys"]})
        shown = label + "".join(f"<br>({n})" for n in notes)
        L.append(f"| {shown} | " + " | ".join(cells_txt)
                 + f" | {'–' if flops is None else f'{flops:.2f}'} | {'–' if time is None else f'{time:.2f}'} |")
    L.append("")
    if out / "cells.png" in files:
        L += [f"![Paired difference from {baseline} per cell, ± 2 SE](cells.png)", ""]
    if unfinished:
        L += ["Unfinished runs (left out): " + ", ".join(f"`{d}`" for d in unfinished), ""]
    (out / "cells.md").write_text("\n".join(L))
    return files, unfinished


def _r(x: Optional[float], nd: int = 4):
    return "" if x is None else round(float(x), nd)
