"""Statistics over each group's seeds and the tables written from them.

:func:`compute_stats` gives mean and sample standard deviation (n - 1) per group;
:func:`add_deltas` the difference to a baseline method's group with its standard error;
:func:`csv_rows` and :func:`markdown` write ``report.csv`` and ``report.md``. The headline
is the last-epoch accuracy; the best epoch's is shown beside it, labelled.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .runs import Group, Run, dataset_name, fmt_setting, freeze, identity, left_out_reason, method_name

BEST_LABEL = "best epoch (not the headline)"


def mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (n - 1); std is None for a single value."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    m = statistics.fmean(vals)
    return m, (statistics.stdev(vals) if len(vals) > 1 else None)


def _same(values: Sequence[Any]) -> Any:
    vals = {(freeze(v)) for v in values}
    return values[0] if len(vals) == 1 else None


def compute_stats(groups: Sequence[Group]) -> None:
    for g in groups:
        s = [r.summary for r in g.runs]
        st: Dict[str, Any] = {"n": len(g.runs), "seeds": [r.seed for r in g.runs]}
        st["top1"] = mean_std([x["test_top1"] for x in s])
        st["top5"] = mean_std([x.get("test_top5") for x in s])
        st["best"] = mean_std([x.get("test_top1_best") for x in s])
        st["best_epoch"] = mean_std([x.get("best_epoch") for x in s])
        st["train_seconds"] = mean_std([x.get("train_seconds") for x in s])
        for k in ("params_deployed", "params_train", "macs_deployed", "train_size", "epochs"):
            st[k] = _same([x.get(k) for x in s])
        branches = [x.get("branch_top1") for x in s if x.get("branch_top1")]
        if branches and len({len(b) for b in branches}) == 1:
            st["branches"] = [mean_std([b[i] for b in branches]) for i in range(len(branches[0]))]
        aggs = [x.get("agg_top1") for x in s if x.get("agg_top1")]
        if aggs and len(aggs) == len(s) and len({len(a) for a in aggs}) == 1:
            st["aggs"] = [mean_std([a[i] for a in aggs]) for i in range(len(aggs[0]))]
            st["ensemble"] = mean_std([x.get("ensemble_top1") for x in s])
            # What the deployed head leaves behind: deepest branch (upright) minus the head, per seed.
            if st.get("branches"):
                st["head_gap"] = mean_std([x["branch_top1"][-1] - x["test_top1"] for x in s])
        g.stats = st


def _baseline_key(g: Group, strict: bool, by_fields: bool) -> str:
    if by_fields:
        return freeze({k: v for k, v in g.fields.items() if k not in ("method", "method.name")})
    ident = identity(g.first)
    if strict:
        return freeze({k: v for k, v in ident.items() if not k.startswith("method.")})
    loose = ("model.name", "data.name", "data.root", "data.train_fraction", "data.per_class", "train.epochs")
    return freeze({k: ident.get(k) for k in loose})


def baseline_groups(groups: Sequence[Group], baseline: str) -> List[Group]:
    """The groups ``baseline`` names: the one labelled exactly so, else every group of that method."""
    return [g for g in groups if g.label == baseline] or [g for g in groups if method_name(g) == baseline]


def add_deltas(groups: Sequence[Group], baseline: Optional[str], by_fields: bool = False) -> None:
    """``delta`` = group's mean last-epoch top-1 minus that of the ``baseline`` group (the
    group labelled exactly ``baseline``, else the ``baseline`` method's groups) with the same
    config apart from the method section (or, failing that, a
    unique one with the same model, data, training fraction and epochs). ``delta_se`` =
    its standard error sqrt(s^2/n + s0^2/n0), when both groups have two or more seeds.
    ``paired`` = (mean, standard error, n) of the per-seed differences over the seeds both
    groups ran, when there are two or more: runs at one seed share their initialisation
    and data order, so the paired difference removes the seed's own share of the noise."""
    for g in groups:
        g.stats["delta"] = g.stats["delta_se"] = g.stats["paired"] = None
    if not baseline:
        return
    # A group labelled exactly ``baseline`` (e.g. "lsskd" beside "lsskd (gamma=0)") is the
    # baseline itself, so that variants of one method compare with its plain config.
    base = baseline_groups(groups, baseline)
    for g in groups:
        if any(g is b for b in base):  # the group itself, not an equal-looking one
            continue
        for strict in (True, False):
            cands = [b for b in base if _baseline_key(b, strict, by_fields) == _baseline_key(g, strict, by_fields)]
            if len(cands) == 1:
                pair_with(g, cands[0])
                break
            if len(cands) > 1 or by_fields:
                break


def pair_with(g: Group, b: Group) -> None:
    """Set ``g``'s ``delta``, ``delta_vs``, ``paired`` and ``delta_se`` against baseline group ``b``."""
    g.stats["delta"] = g.stats["top1"][0] - b.stats["top1"][0]
    g.stats["delta_vs"] = b.label
    g.stats["paired"] = paired_difference(g, b)
    if g.stats["top1"][1] is not None and b.stats["top1"][1] is not None:
        g.stats["delta_se"] = math.sqrt(g.stats["top1"][1] ** 2 / g.stats["n"]
                                        + b.stats["top1"][1] ** 2 / b.stats["n"])


def paired_difference(g: Group, base: Group) -> Optional[Tuple[float, float, int]]:
    """Mean and standard error (sd / sqrt(n)) of ``g``'s last-epoch top-1 minus ``base``'s
    at each seed both ran; None with fewer than two such seeds."""
    mine = {freeze(r.seed): r.summary["test_top1"] for r in g.runs}
    theirs = {freeze(r.seed): r.summary["test_top1"] for r in base.runs}
    diffs = [mine[k] - theirs[k] for k in mine if k in theirs]
    if len(diffs) < 2:
        return None
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs)), len(diffs)


CSV_COLUMNS = [
    "group", "method", "model", "dataset", "settings", "eval_on", "epochs", "n_seeds", "seeds",
    "top1_last_mean", "top1_last_std", "top5_last_mean", "top5_last_std", "delta_top1_vs_baseline",
    "delta_top1_se", "paired_delta_top1", "paired_delta_se", "paired_n", "baseline", "top1_best_epoch_mean",
    "top1_best_epoch_std", "best_epoch_mean",
    "params_deployed", "params_train", "macs_deployed", "train_size", "train_seconds_mean",
    "branch_top1_mean", "agg_top1_mean", "ensemble_top1_mean", "run_dirs",
]


def _num(x: Optional[float], nd: int = 6) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(round(float(x), nd))


def csv_rows(groups: Sequence[Group], baseline: Optional[str]) -> List[Dict[str, str]]:
    rows = []
    for g in groups:
        st, r0 = g.stats, g.first
        paired = st.get("paired") or (None, None, None)
        rows.append({
            "group": g.label, "method": method_name(g), "model": str(r0.summary.get("model", "")),
            "dataset": dataset_name(r0), "settings": g.settings, "eval_on": r0.eval_on,
            "epochs": "" if st["epochs"] is None else str(st["epochs"]), "n_seeds": str(st["n"]),
            "seeds": " ".join(str(s) for s in st["seeds"]),
            "top1_last_mean": _num(st["top1"][0]), "top1_last_std": _num(st["top1"][1]),
            "top5_last_mean": _num(st["top5"][0]), "top5_last_std": _num(st["top5"][1]),
            "delta_top1_vs_baseline": _num(st.get("delta")),
            "delta_top1_se": _num(st.get("delta_se")),
            "paired_delta_top1": _num(paired[0]), "paired_delta_se": _num(paired[1]),
            "paired_n": "" if paired[2] is None else str(paired[2]),
            "baseline": st.get("delta_vs", "") if st.get("delta") is not None else "",
            "top1_best_epoch_mean": _num(st["best"][0]), "top1_best_epoch_std": _num(st["best"][1]),
            "best_epoch_mean": _num(st["best_epoch"][0]),
            "params_deployed": "" if st["params_deployed"] is None else str(st["params_deployed"]),
            "params_train": "" if st["params_train"] is None else str(st["params_train"]),
            "macs_deployed": "" if st["macs_deployed"] is None else str(st["macs_deployed"]),
            "train_size": "" if st["train_size"] is None else str(st["train_size"]),
            "train_seconds_mean": _num(st["train_seconds"][0], 1),
            "branch_top1_mean": " ".join(_num(m, 4) for m, _ in st.get("branches", [])),
            "agg_top1_mean": " ".join(_num(m, 4) for m, _ in st.get("aggs", [])),
            "ensemble_top1_mean": _num(st.get("ensemble", (None, None))[0], 4),
            "run_dirs": " ".join(str(r.path) for r in g.runs),
        })
    return rows


def _pm(ms: Tuple[Optional[float], Optional[float]], nd: int = 2) -> str:
    m, s = ms
    if m is None:
        return "–"
    return f"{m:.{nd}f} ± {s:.{nd}f}" if s is not None else f"{m:.{nd}f}"


def _human(n: Optional[int]) -> str:
    if n is None:
        return "–"
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{suf}"
    return str(n)


def markdown(groups: Sequence[Group], runs: Sequence[Run], unfinished: Sequence[Path],
             baseline: Optional[str], plots: Sequence[Tuple[str, str]], sources: Sequence[str]) -> str:
    from ..version import __version__

    evals = sorted({r.eval_on for r in runs})
    split = evals[0] if len(evals) == 1 else "/".join(evals)
    L = ["# lsskd report", "",
         f"{len(runs)} finished run(s) in {len(groups)} group(s), from {', '.join(sources)} (lsskd {__version__}).", "",
         f"**Headline: {split} top-1 (%) at the last epoch**, mean ± sample standard deviation (n − 1) "
         "over seeds (no ± with a single seed). The *best epoch* column is the highest "
         f"{split} top-1 seen during training; it is chosen by looking at the {split} set, so it is "
         "optimistic and is **not the headline**.", ""]
    show_delta = baseline and any(g.stats.get("delta") is not None for g in groups)
    head = ["Group", "Seeds", "Top-1 last epoch (headline)"]
    show_paired = show_delta and any(g.stats.get("paired") for g in groups)
    if show_delta:
        head.append(f"Δ top-1 vs {baseline}")
    if show_paired:
        head.append("Paired Δ (seeds)")
    head += ["Top-5 last epoch", f"Top-1 {BEST_LABEL}", "Params (deployed)", "MACs (deployed)"]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for g in groups:
        st = g.stats
        row = [g.label, str(st["n"]), _pm(st["top1"])]
        if show_delta:
            d = st.get("delta")
            se = st.get("delta_se")
            row.append("–" if d is None else f"{d:+.2f}" + ("" if se is None else f" ± {se:.2f}"))
        if show_paired:
            pd = st.get("paired")
            row.append("–" if pd is None else f"{pd[0]:+.2f} ± {pd[1]:.2f} ({pd[2]})")
        best = _pm(st["best"])
        if st["best_epoch"][0] is not None:
            best += f" (ep {st['best_epoch'][0]:.0f})" if st["n"] == 1 else f" (mean ep {st['best_epoch'][0]:.1f})"
        row += [_pm(st["top5"]), best, _human(st["params_deployed"]), _human(st["macs_deployed"])]
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    if show_delta and any(g.stats.get("delta_se") is not None for g in groups):
        L += ["Δ ± its standard error, sqrt(s²/n + s₀²/n₀) over the two groups' seeds (shown when both "
              "have two or more). A Δ smaller than about two standard errors is within seed noise; "
              "with two or three seeds the standard error itself is rough.", ""]
    if show_paired:
        L += ["Paired Δ: the mean of the per-seed differences to the baseline over the seeds both ran "
              "(their number in brackets) ± its standard error, sd/√n. Runs at one seed start from the "
              "same weights and see the data in the same order, so this removes the seed's own share of "
              "the noise.", ""]
    common = _common_settings(groups)
    if common:
        L += ["Common to all groups: " + ", ".join(common) + ".", ""]
    if any("branches" in g.stats for g in groups):
        L += ["## Per-branch top-1 (last epoch, shallow → deep)", ""]
        width = max(len(g.stats.get("branches", [])) for g in groups)
        L.append("| Group | " + " | ".join(f"Branch {i + 1}" for i in range(width)) + " | Final |")
        L.append("|---|" + "---:|" * (width + 1))
        for g in groups:
            if "branches" in g.stats:
                cells = [_pm(b) for b in g.stats["branches"]] + ["–"] * (width - len(g.stats["branches"]))
                L.append(f"| {g.label} | " + " | ".join(cells) + f" | {_pm(g.stats['top1'])} |")
        L.append("")
    if any("aggs" in g.stats for g in groups):
        L += ["## The ceiling: branches aggregated over all views, and the ensemble (last epoch)", "",
              "Branch l aggregated: its joint logits averaged over the M views at each class's slot "
              "(M forward passes). Ensemble: the mean softmax of the final head and every aggregated "
              "branch. Neither ships; they are what the deployed head could learn. Deepest − head: "
              "the deepest branch's upright top-1 minus the deployed head's, per seed.", ""]
        width = max(len(g.stats.get("aggs", [])) for g in groups)
        L.append("| Group | " + " | ".join(f"Branch {i + 1} agg." for i in range(width))
                 + " | Ensemble | Final (deployed) | Deepest − head |")
        L.append("|---|" + "---:|" * (width + 3))
        for g in groups:
            if "aggs" in g.stats:
                cells = [_pm(a) for a in g.stats["aggs"]] + ["–"] * (width - len(g.stats["aggs"]))
                gap = _pm(g.stats["head_gap"]) if "head_gap" in g.stats else "–"
                L.append(f"| {g.label} | " + " | ".join(cells)
                         + f" | {_pm(g.stats['ensemble'])} | {_pm(g.stats['top1'])} | {gap} |")
        L.append("")
    if plots:
        L += ["## Plots", ""]
        for title, fname in plots:
            L += [f"### {title}", "", f"![{title}]({fname})", ""]
    L += ["## Runs", "", f"| Group | Seed | Top-1 last | Top-1 {BEST_LABEL} | Best epoch | Train time (s) | Directory |",
          "|---|---:|---:|---:|---:|---:|---|"]
    for g in groups:
        for r in g.runs:
            s = r.summary
            L.append(f"| {g.label} | {r.seed} | {s['test_top1']:.2f} | "
                     f"{_num(s.get('test_top1_best'), 2) or '–'} | {s.get('best_epoch', '–')} | "
                     f"{_num(s.get('train_seconds'), 1) or '–'} | `{r.path}` |")
    L.append("")
    if unfinished:
        L += ["## Unfinished runs (not included)", ""]
        L += [f"- `{d}`: {left_out_reason(d)}" for d in unfinished]
        L.append("")
    return "\n".join(L)


def _common_settings(groups: Sequence[Group]) -> List[str]:
    idents = [identity(g.first) for g in groups]
    if not idents:
        return []
    keys = ["model.name", "data.name", "data.root", "data.classes", "data.train_fraction", "data.per_class",
            "data.val_fraction", "data.val_split", "train.epochs", "train.batch_size", "optim.lr", "optim.schedule"]
    out = []
    for k in keys:
        vals = {freeze(i.get(k, "<unset>")) for i in idents}
        if len(vals) == 1 and k in idents[0]:
            out.append(f"{k}={fmt_setting(idents[0][k])}")
    return out
