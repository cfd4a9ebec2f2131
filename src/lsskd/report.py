"""Aggregate finished run directories into tables (Markdown + CSV) and plots.

A run directory is any folder holding ``summary.json`` (written by ``lsskd train``
at the end of a run), usually with ``config.yaml`` and ``metrics.jsonl``. Runs that
share their whole config apart from the seed (and keys that only affect how a run
executes, :func:`lsskd.config.is_execution_key`) form one group; each group is reported as mean and
sample standard deviation (n - 1 denominator) over its seeds.

The headline number is the test top-1 accuracy **at the last epoch**. The best
epoch's accuracy is picked by looking at the test set, so it is optimistic; it is
reported beside the headline, labelled as such, never instead of it.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .config import ConfigError, flatten, is_execution_key
from .errors import DataError


def ignored_key(key: str) -> bool:
    """Keys left out of a run's identity: the seed (a group's runs differ in it) and the
    execution-only keys and provenance (config.EXECUTION_KEYS)."""
    return key == "seed" or is_execution_key(key)

# Keys with their own column; not repeated in the "settings" column.
OWN_COLUMNS = {"method.name", "model.name", "data.name", "data.root", "train.epochs"}
# --group-by aliases for summary fields.
ALIASES = {"method": "method.name", "model": "model.name", "dataset": "data.name",
           "epochs": "train.epochs", "train_fraction": "data.train_fraction"}
BEST_LABEL = "best epoch (not the headline)"


@dataclass
class Run:
    path: Path
    summary: Dict[str, Any]
    config: Dict[str, Any]  # flattened dotted keys; {} when config.yaml is missing
    metrics: List[Dict[str, Any]]

    @property
    def seed(self) -> Any:
        return self.summary.get("seed", self.config.get("seed"))

    @property
    def eval_on(self) -> str:
        return self.summary.get("eval_on") or self.config.get("data.eval_on") or "test"

    def field(self, name: str) -> Any:
        key = ALIASES.get(name, name)
        if key in self.config:
            return self.config[key]
        if name in self.summary:
            return self.summary[name]
        raise ConfigError(f"--group-by: unknown field '{name}' (not in {self.path / 'summary.json'} "
                          f"nor {self.path / 'config.yaml'})")

    def curve(self) -> Dict[int, float]:
        key = f"{self.eval_on}_top1"
        return {int(r["epoch"]): float(r[key]) for r in self.metrics if key in r and "epoch" in r}


@dataclass
class Group:
    runs: List[Run]
    key: Tuple
    fields: Dict[str, Any] = field(default_factory=dict)  # the --group-by values, if any
    label: str = ""
    settings: str = ""  # key=value pairs that distinguish this group from the others
    stats: Dict[str, Any] = field(default_factory=dict)

    @property
    def first(self) -> Run:
        return self.runs[0]


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def load_run(path: str | Path) -> Run:
    path = Path(path)
    summary = _read_json(path / "summary.json")
    cfg: Dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        try:
            cfg = flatten(yaml.safe_load((path / "config.yaml").read_text()) or {})
        except yaml.YAMLError as e:
            raise DataError(f"{path / 'config.yaml'}: invalid YAML ({e})") from None
    metrics = []
    mfile = path / "metrics.jsonl"
    if mfile.is_file():
        for n, line in enumerate(mfile.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                metrics.append(json.loads(line))
            except ValueError:
                raise DataError(f"{mfile}: line {n} is not valid JSON") from None
    return Run(path, summary, cfg, metrics)


def find_runs(paths: Sequence[str | Path]) -> Tuple[List[Run], List[Path]]:
    """Finished runs under ``paths`` (searched recursively), and the directories of
    unfinished ones (``metrics.jsonl`` or ``last.pt`` without ``summary.json``, or a
    summary without ``test_top1``)."""
    runs, unfinished, seen = [], [], set()
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise DataError(f"run directory not found: {p}")
        for s in sorted(p.rglob("summary.json")) if p.is_dir() else []:
            d = s.parent.resolve()
            if d not in seen:
                seen.add(d)
                run = load_run(s.parent)
                # A summary without a last-epoch accuracy has nothing to average.
                (runs.append(run) if run.summary.get("test_top1") is not None else unfinished.append(s.parent))
        for marker in ("metrics.jsonl", "last.pt"):
            for m in sorted(p.rglob(marker)) if p.is_dir() else []:
                d = m.parent
                if not (d / "summary.json").is_file() and d.resolve() not in seen:
                    seen.add(d.resolve())
                    unfinished.append(d)
    return runs, unfinished


def _freeze(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _current_defaults(method: Any) -> Dict[str, Any]:
    """This version's default value of every config key (method keys for ``method``)."""
    from .config import DEFAULTS
    from .registry import METHODS

    out = flatten(DEFAULTS)
    if isinstance(method, str) and method in METHODS:
        out.update({f"method.{k}": v for k, v in flatten(METHODS.get(method).defaults).items()})
    return out


def _identity(run: Run) -> Dict[str, Any]:
    """The settings that define a run's experiment. A key equal to this version's default is
    left out, so that runs written before the key existed (which lack it) group with runs
    that carry its default."""
    if run.config:
        defaults = _current_defaults(run.config.get("method.name"))
        return {k: v for k, v in run.config.items()
                if not ignored_key(k) and not (k in defaults and _freeze(defaults[k]) == _freeze(v))}
    s = run.summary
    return {"method.name": s.get("method"), "model.name": s.get("model"),
            "data.name": s.get("dataset"), "train.epochs": s.get("epochs")}


def repeated_seeds(runs: Sequence[Run]) -> List[List[Run]]:
    """Runs that repeat another run's seed of the same experiment (the same config, execution
    keys and provenance aside): each list holds the folders of one (config, seed). Averaging
    them would count one training run as several seeds. Runs without config.yaml are left
    out (their summary alone cannot tell two experiments apart)."""
    by: Dict[Tuple, List[Run]] = {}
    for r in runs:
        if r.config:
            key = (tuple(sorted((k, _freeze(v)) for k, v in _identity(r).items())), _freeze(r.seed))
            by.setdefault(key, []).append(r)
    return [rs for rs in by.values() if len(rs) > 1]


def describe_repeats(repeats: Sequence[Sequence[Run]]) -> str:
    return "; ".join(f"seed {rs[0].seed} of {rs[0].summary.get('method', '?')} in "
                     + " and ".join(str(r.path) for r in rs) for rs in repeats)


def dataset_name(run: Run) -> str:
    name = run.summary.get("dataset") or run.config.get("data.name", "?")
    root = run.config.get("data.root")
    if name == "folder" and root:
        return f"folder:{Path(str(root)).name}"
    return str(name)


def group_runs(runs: Sequence[Run], group_by: Optional[Sequence[str]] = None) -> List[Group]:
    """Group seeds of one experiment: by whole config (minus :func:`ignored_key`), or
    by the named fields (summary keys such as ``method`` or dotted config keys)."""
    groups: Dict[Tuple, Group] = {}
    for r in runs:
        if group_by:
            vals = {g: r.field(g) for g in group_by}
            key = tuple(_freeze(vals[g]) for g in group_by)
        else:
            vals = {}
            key = tuple(sorted((k, _freeze(v)) for k, v in _identity(r).items()))
        if key not in groups:
            groups[key] = Group([], key, vals)
        groups[key].runs.append(r)
    out = list(groups.values())
    for g in out:
        g.runs.sort(key=lambda r: (str(r.seed), str(r.path)))
    _label(out, bool(group_by))
    out.sort(key=lambda g: (str(g.first.summary.get("model")), dataset_name(g.first), g.settings,
                            str(g.first.summary.get("method"))))
    return out


def _varying(groups: Sequence[Group]) -> List[str]:
    idents = [_identity(g.first) for g in groups]
    keys = sorted(set().union(*idents)) if idents else []
    return [k for k in keys if len({_freeze(i.get(k, "<unset>")) for i in idents}) > 1]


def _short(keys: Sequence[str]) -> Dict[str, str]:
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _fmt_setting(v: Any) -> str:
    return _freeze(v).strip('"') if not isinstance(v, float) else f"{v:g}"


def _label(groups: Sequence[Group], by_fields: bool) -> None:
    if by_fields:
        for g in groups:
            g.settings = " ".join(f"{k}={_fmt_setting(v)}" for k, v in g.fields.items())
            g.label = ", ".join(_fmt_setting(v) for v in g.fields.values())
        return
    varying = [k for k in _varying(groups) if k not in OWN_COLUMNS and not k.startswith("method.")]
    method_keys = [k for k in _varying(groups) if k.startswith("method.") and k != "method.name"]
    short = _short(varying + method_keys)
    multi_model = len({g.first.summary.get("model") for g in groups}) > 1
    multi_data = len({dataset_name(g.first) for g in groups}) > 1
    multi_epochs = len({g.first.summary.get("epochs") for g in groups}) > 1
    for g in groups:
        ident = _identity(g.first)
        full = {**_current_defaults(g.first.config.get("method.name")), **g.first.config}
        # A setting at its default is named only for data keys (e.g. train_fraction=1 beside
        # 0.25 and 0.5); elsewhere only the groups that change it name it.
        parts = [f"{short[k]}={_fmt_setting(full[k])}" for k in varying + method_keys
                 if k in ident or (k in full and k.startswith("data."))]
        g.settings = " ".join(parts)
        head = [str(g.first.summary.get("method", ident.get("method.name", "?")))]
        if multi_model:
            head.append(str(g.first.summary.get("model")))
        if multi_data:
            head.append(dataset_name(g.first))
        if multi_epochs:
            head.append(f"{g.first.summary.get('epochs')} ep")
        g.label = " / ".join(head) + (f" ({', '.join(parts)})" if parts else "")


# --- statistics -------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (n - 1); std is None for a single value."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    m = statistics.fmean(vals)
    return m, (statistics.stdev(vals) if len(vals) > 1 else None)


def _same(values: Sequence[Any]) -> Any:
    vals = {(_freeze(v)) for v in values}
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
        g.stats = st


def _baseline_key(g: Group, strict: bool, by_fields: bool) -> str:
    if by_fields:
        return _freeze({k: v for k, v in g.fields.items() if k not in ("method", "method.name")})
    ident = _identity(g.first)
    if strict:
        return _freeze({k: v for k, v in ident.items() if not k.startswith("method.")})
    loose = ("model.name", "data.name", "data.root", "data.train_fraction", "data.per_class", "train.epochs")
    return _freeze({k: ident.get(k) for k in loose})


def _method(g: Group) -> str:
    return str(g.first.summary.get("method", g.first.config.get("method.name")))


def add_deltas(groups: Sequence[Group], baseline: Optional[str], by_fields: bool = False) -> None:
    """``delta`` = group's mean last-epoch top-1 minus that of the ``baseline`` method's
    group with the same config apart from the method section (or, failing that, a
    unique one with the same model, data, training fraction and epochs). ``delta_se`` =
    its standard error sqrt(s^2/n + s0^2/n0), when both groups have two or more seeds."""
    for g in groups:
        g.stats["delta"] = g.stats["delta_se"] = None
    if not baseline:
        return
    base = [g for g in groups if _method(g) == baseline]
    for g in groups:
        if _method(g) == baseline:
            continue
        for strict in (True, False):
            cands = [b for b in base if _baseline_key(b, strict, by_fields) == _baseline_key(g, strict, by_fields)]
            if len(cands) == 1:
                b = cands[0]
                g.stats["delta"] = g.stats["top1"][0] - b.stats["top1"][0]
                g.stats["delta_vs"] = b.label
                if g.stats["top1"][1] is not None and b.stats["top1"][1] is not None:
                    g.stats["delta_se"] = math.sqrt(g.stats["top1"][1] ** 2 / g.stats["n"]
                                                    + b.stats["top1"][1] ** 2 / b.stats["n"])
                break
            if len(cands) > 1 or by_fields:
                break


# --- writing ------------------------------------------------------------------------------
CSV_COLUMNS = [
    "group", "method", "model", "dataset", "settings", "eval_on", "epochs", "n_seeds", "seeds",
    "top1_last_mean", "top1_last_std", "top5_last_mean", "top5_last_std", "delta_top1_vs_baseline",
    "delta_top1_se", "baseline", "top1_best_epoch_mean", "top1_best_epoch_std", "best_epoch_mean",
    "params_deployed", "params_train", "macs_deployed", "train_size", "train_seconds_mean",
    "branch_top1_mean", "run_dirs",
]


def _num(x: Optional[float], nd: int = 6) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(round(float(x), nd))


def csv_rows(groups: Sequence[Group], baseline: Optional[str]) -> List[Dict[str, str]]:
    rows = []
    for g in groups:
        st, r0 = g.stats, g.first
        rows.append({
            "group": g.label, "method": _method(g), "model": str(r0.summary.get("model", "")),
            "dataset": dataset_name(r0), "settings": g.settings, "eval_on": r0.eval_on,
            "epochs": "" if st["epochs"] is None else str(st["epochs"]), "n_seeds": str(st["n"]),
            "seeds": " ".join(str(s) for s in st["seeds"]),
            "top1_last_mean": _num(st["top1"][0]), "top1_last_std": _num(st["top1"][1]),
            "top5_last_mean": _num(st["top5"][0]), "top5_last_std": _num(st["top5"][1]),
            "delta_top1_vs_baseline": _num(st.get("delta")),
            "delta_top1_se": _num(st.get("delta_se")),
            "baseline": st.get("delta_vs", "") if st.get("delta") is not None else "",
            "top1_best_epoch_mean": _num(st["best"][0]), "top1_best_epoch_std": _num(st["best"][1]),
            "best_epoch_mean": _num(st["best_epoch"][0]),
            "params_deployed": "" if st["params_deployed"] is None else str(st["params_deployed"]),
            "params_train": "" if st["params_train"] is None else str(st["params_train"]),
            "macs_deployed": "" if st["macs_deployed"] is None else str(st["macs_deployed"]),
            "train_size": "" if st["train_size"] is None else str(st["train_size"]),
            "train_seconds_mean": _num(st["train_seconds"][0], 1),
            "branch_top1_mean": " ".join(_num(m, 4) for m, _ in st.get("branches", [])),
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
    from . import __version__

    evals = sorted({r.eval_on for r in runs})
    split = evals[0] if len(evals) == 1 else "/".join(evals)
    L = [f"# lsskd report", "",
         f"{len(runs)} finished run(s) in {len(groups)} group(s), from {', '.join(sources)} (lsskd {__version__}).", "",
         f"**Headline: {split} top-1 (%) at the last epoch**, mean ± sample standard deviation (n − 1) "
         "over seeds (no ± with a single seed). The *best epoch* column is the highest "
         f"{split} top-1 seen during training; it is chosen by looking at the {split} set, so it is "
         "optimistic and is **not the headline**.", ""]
    show_delta = baseline and any(g.stats.get("delta") is not None for g in groups)
    head = ["Group", "Seeds", f"Top-1 last epoch (headline)"]
    if show_delta:
        head.append(f"Δ top-1 vs {baseline}")
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
        best = _pm(st["best"])
        if st["best_epoch"][0] is not None:
            best += f" (ep {st['best_epoch'][0]:.0f})" if st["n"] == 1 else f" (mean ep {st['best_epoch'][0]:.1f})"
        row += [_pm(st["top5"]), best, _human(st["params_deployed"]), _human(st["macs_deployed"])]
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    if show_delta and any(g.stats.get("delta_se") is not None for g in groups):
        L += [f"Δ ± its standard error, sqrt(s²/n + s₀²/n₀) over the two groups' seeds (shown when both "
              f"have two or more). A Δ smaller than about two standard errors is within seed noise; "
              f"with two or three seeds the standard error itself is rough.", ""]
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
        L += [f"- `{d}`" for d in unfinished]
        L.append("")
    return "\n".join(L)


def _common_settings(groups: Sequence[Group]) -> List[str]:
    idents = [_identity(g.first) for g in groups]
    if not idents:
        return []
    keys = ["model.name", "data.name", "data.root", "data.classes", "data.train_fraction", "data.per_class",
            "data.val_fraction", "data.val_split", "train.epochs", "train.batch_size", "optim.lr", "optim.schedule"]
    out = []
    for k in keys:
        vals = {_freeze(i.get(k, "<unset>")) for i in idents}
        if len(vals) == 1 and k in idents[0]:
            out.append(f"{k}={_fmt_setting(idents[0][k])}")
    return out


# --- plots ----------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plots need matplotlib (pip install 'lsskd[plot]'), "
                          "or pass --no-plots for tables only") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int):
    plt = _pyplot()
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
    plt = _pyplot()
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
    differs = {m: [k for k in _varying([o for o in groups if _method(o) == m]) if k != key]
               for m in {_method(g) for g in groups}}
    for g in groups:
        ident = _identity(g.first)
        # a key at its default is absent from the identity; the run itself still records it
        x = float(ident.get(key, g.first.config.get(key, g.first.summary.get(short, default))))
        name = _method(g)
        differ = differs[name]
        if differ:
            full = {**_current_defaults(g.first.config.get("method.name")), **g.first.config}
            names = {k: (k.split(".")[0] if k.endswith(".name") else v) for k, v in _short(differ).items()}
            name += " (" + ", ".join(f"{names[k]}={_fmt_setting(full.get(k, '<unset>'))}"
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
    plt = _pyplot()
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
    plt = _pyplot()
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


# --- entry point ----------------------------------------------------------------------------
@dataclass
class Report:
    groups: List[Group]
    runs: List[Run]
    unfinished: List[Path]
    files: List[Path]
    repeats: List[List[Run]] = field(default_factory=list)  # counted anyway (allow_repeats)


def build_report(paths: Sequence[str | Path], out: str | Path, group_by: Optional[Sequence[str]] = None,
                 baseline: Optional[str] = "ce", plots: bool = True, allow_repeats: bool = False) -> Report:
    """Find runs under ``paths``, aggregate them, write ``report.md``, ``report.csv``
    and (with ``plots``) PNG figures into ``out``. Two folders holding the same seed of
    the same config (:func:`repeated_seeds`, e.g. a run copied elsewhere) are refused
    unless ``allow_repeats``; then they are counted and listed in ``Report.repeats``."""
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
    compute_stats(groups)
    add_deltas(groups, baseline, by_fields=bool(group_by))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    figs: List[Tuple[str, str]] = []
    if plots:
        _pyplot()  # fail before writing anything when matplotlib is missing
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
    (out / "report.md").write_text(md)
    files = [out / "report.md", out / "report.csv", *files]
    return Report(groups, runs, unfinished, files, repeats)
