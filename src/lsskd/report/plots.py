"""Figures (matplotlib, imported only when plots are asked for): accuracy per epoch,
accuracy against the training fraction and the epoch budget, per-branch accuracy, and the paired
differences of ``report --cells``."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import ConfigError
from .runs import Group, current_defaults, fmt_setting, identity, method_name, short_names, varying_keys
from .tables import mean_std


def pyplot():
    """matplotlib.pyplot on the Agg backend; a ConfigError naming the fix when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plots need matplotlib (pip install 'lsskd[plot]'), "
                          "or pass --no-plots for tables only") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int):
    plt = pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _legend(ax, n: int) -> None:
    if n > 4:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:
        ax.legend(fontsize=9, loc="best")


def plot_curves(groups: Sequence[Group], path: Path) -> bool:
    """Test top-1 per epoch: mean over seeds, shaded ± one sample std."""
    series = []
    for g in groups:
        curves = [r.curve() for r in g.runs]
        epochs = sorted(set().union(*curves))
        if not epochs:
            continue
        means, lo, hi = [], [], []
        for e in epochs:
            m, s = mean_std([c[e] for c in curves if e in c])
            means.append(m)
            lo.append(m - (s or 0.0))
            hi.append(m + (s or 0.0))
        series.append((g.label, epochs, means, lo, hi, len(g.runs)))
    if not series:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for (label, ep, m, lo, hi, n), c in zip(series, _colors(len(series))):
        ax.plot(ep, m, color=c, lw=1.6, marker="o" if len(ep) < 15 else None, ms=3,
                label=f"{label} (n={n})")
        if n > 1:
            ax.fill_between(ep, lo, hi, color=c, alpha=0.18, lw=0)
    split = groups[0].first.eval_on
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{split} top-1 (%)")
    ax.set_title(f"{split.capitalize()} top-1 per epoch (mean over seeds, band = ± 1 std)")
    ax.grid(alpha=0.3)
    if max(len(s[1]) for s in series) < 12:
        ax.set_xticks(sorted(set().union(*(s[1] for s in series))))
    _legend(ax, len(series))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def points_against(groups: Sequence[Group], key: str, default: Any = None
                   ) -> Dict[str, List[Tuple[float, float, Optional[float], int]]]:
    """Last-epoch top-1 (mean, std, number of seeds) against one setting ``key``, as
    {line label: [(x, mean, std, n), ...]} sorted by x: one line per method, split further
    where another setting (model, data, ...) differs between that method's groups."""
    short = key.split(".")[-1]
    lines: Dict[str, List[Tuple[float, float, Optional[float], int]]] = {}
    # per method, the settings (besides ``key``) that differ between its groups
    differs = {m: [k for k in varying_keys([o for o in groups if method_name(o) == m]) if k != key]
               for m in {method_name(g) for g in groups}}
    for g in groups:
        ident = identity(g.first)
        # a key at its default is absent from the identity; the run itself still records it
        x = float(ident.get(key, g.first.config.get(key, g.first.summary.get(short, default))))
        name = method_name(g)
        differ = differs[name]
        if differ:
            full = {**current_defaults(g.first.config.get("method.name")), **g.first.config}
            names = {k: (k.split(".")[0] if k.endswith(".name") else v) for k, v in short_names(differ).items()}
            name += " (" + ", ".join(f"{names[k]}={fmt_setting(full.get(k, '<unset>'))}"
                                     for k in differ) + ")"
        lines.setdefault(name, []).append((x, *g.stats["top1"], g.stats["n"]))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in sorted(lines.items())}


def _plot_against(groups: Sequence[Group], path: Path, key: str, default: Any, scale: float,
                  xlabel: str, title: str) -> bool:
    """Plot :func:`points_against`; False (nothing written) unless some line has two points.
    Where the points have different numbers of seeds, those with fewer than the most are
    hollow and labelled ``n=K``, so a one-seed point is not read as a mean."""
    lines = points_against(groups, key, default)
    xs_all = {p[0] for pts in lines.values() for p in pts}
    if max(len({p[0] for p in pts}) for pts in lines.values()) < 2:
        return False
    n_most = max(p[3] for pts in lines.values() for p in pts)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for (label, pts), c in zip(lines.items(), _colors(len(lines))):
        xs, ys = [scale * p[0] for p in pts], [p[1] for p in pts]
        ax.errorbar(xs, ys, yerr=[math.nan if p[2] is None else p[2] for p in pts], color=c, marker="o",
                    ms=5, lw=1.6, capsize=3, label=label)
        for x, y, p in zip(xs, ys, pts):
            if p[3] < n_most:
                ax.plot([x], [y], marker="o", ms=7, color="white", markeredgecolor=c, zorder=3)
                ax.annotate(f"n={p[3]}", (x, y), textcoords="offset points", xytext=(5, -11),
                            fontsize=7, color=c)
    ax.set_xticks([scale * x for x in sorted(xs_all)])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{groups[0].first.eval_on} top-1 at last epoch (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(ax, len(lines))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_fraction(groups: Sequence[Group], path: Path) -> bool:
    """Last-epoch top-1 vs ``data.train_fraction`` (paper Fig. 5)."""
    return _plot_against(groups, path, "data.train_fraction", 1.0, 100,
                         "training data used (% of the training set, stratified)",
                         "Accuracy vs training-set fraction (mean ± std over seeds)")


def plot_epochs(groups: Sequence[Group], path: Path) -> bool:
    """Last-epoch top-1 vs the epoch budget ``train.epochs`` (each point is a run
    trained, with its own schedule, for that many epochs, not an earlier epoch of a
    longer run)."""
    return _plot_against(groups, path, "train.epochs", None, 1, "training budget (epochs)",
                         "Accuracy vs epoch budget (mean ± std over seeds)")


def plot_branches(groups: Sequence[Group], path: Path) -> bool:
    """Per-branch top-1 (paper Fig. 6): bars per branch, shallow to deep, then the
    final (deployed) classifier; one bar colour per group, error bars ± one std."""
    gs = [g for g in groups if "branches" in g.stats]
    if not gs:
        return False
    width_n = max(len(g.stats["branches"]) for g in gs)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * (width_n + 1) + 1), 4.5))
    w = 0.8 / len(gs)
    for j, (g, c) in enumerate(zip(gs, _colors(len(gs)))):
        vals = list(g.stats["branches"]) + [g.stats["top1"]]
        xs = [i if i < len(vals) - 1 else width_n for i in range(len(vals))]
        xs = [x - 0.4 + w * (j + 0.5) for x in xs]
        ax.bar(xs, [v[0] for v in vals], w, color=c, label=g.label, edgecolor="white", lw=0.5)
        err = [(x, v) for x, v in zip(xs, vals) if v[1] is not None]
        if err:  # single-seed groups get no error bar
            ax.errorbar([x for x, _ in err], [v[0] for _, v in err], yerr=[v[1] for _, v in err],
                        fmt="none", ecolor="black", elinewidth=1, capsize=2)
    ax.set_xticks(range(width_n + 1))
    ax.set_xticklabels([f"branch {i + 1}" for i in range(width_n)] + ["final\n(deployed)"])
    ax.set_ylabel(f"{gs[0].first.eval_on} top-1 at last epoch (%)")
    ax.set_title("Per-branch accuracy, shallow → deep (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, len(gs))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_cells(rows: Sequence[Dict[str, Any]], cells: Sequence[str], baseline: str, path: Path) -> bool:
    """Paired differences against each cell's baseline (``cells.csv``'s rows): one panel per cell,
    one line per group, the mean of the per-seed differences with a bar of ± two standard errors.
    Filled where the bar clears zero (ahead or behind at 2 SE), hollow where it does not (level),
    so that the reading rule of the comparisons is what the eye sees. False when nothing paired."""
    paired = [r for r in rows if r["paired_delta"] != ""]
    if not paired:
        return False
    groups = list(dict.fromkeys(r["group"] for r in paired))
    flops = {}
    for r in paired:
        if r["flops_vs_baseline"] != "":
            flops.setdefault(r["group"], []).append(float(r["flops_vs_baseline"]))
    names = [c for c in cells if any(r["cell"] == c for r in paired)]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(names), sharey=True, squeeze=False,
                             figsize=(1.2 + 2.8 * len(names), 0.9 + 0.42 * len(groups)))
    ys = {g: len(groups) - 1 - i for i, g in enumerate(groups)}  # first group on top
    colors = dict(zip(groups, _colors(len(groups))))
    for ax, cell in zip(axes[0], names):
        for r in (r for r in paired if r["cell"] == cell):
            m, se = float(r["paired_delta"]), float(r["paired_se"])
            clear = r["at_2se"] != "level"  # the CSV's verdict (cells.at_two_se), not a second reading
            color, y = colors[r["group"]], ys[r["group"]]
            ax.plot([m - 2 * se, m + 2 * se], [y, y], color=color, lw=2)
            ax.plot([m], [y], marker="o", ms=7, color=color if clear else "white", markeredgecolor=color,
                    zorder=3)
        ax.axvline(0.0, color="black", lw=1)
        ax.set_title(cell)
        ax.set_xlabel(f"top-1 − {baseline} (points)")
        ax.grid(axis="x", alpha=0.3)
    ticks = [g + (f"  [{mean_std(flops[g])[0]:.1f}x FLOPs]" if g in flops else "") for g in groups]
    axes[0][0].set_yticks([ys[g] for g in groups])
    axes[0][0].set_yticklabels(ticks, fontsize=8)
    axes[0][0].set_ylim(-0.7, len(groups) - 0.3)
    fig.suptitle(f"Paired difference from {baseline} per cell, mean ± 2 SE over seeds "
                 "(filled: beyond 2 SE; hollow: level)", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True
