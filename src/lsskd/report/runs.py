"""Collecting finished run directories and grouping them into experiments.

A run directory is any folder holding ``summary.json`` (written by ``lsskd train`` at the
end of a run), usually with ``config.yaml`` and ``metrics.jsonl``. A run's *identity* is
its config apart from the seed and the keys that only affect how a run executes
(:func:`lsskd.config.is_execution_key`); runs with the same identity are the seeds of one
:class:`Group`. Two folders with the same identity *and* seed are repeats
(:func:`repeated_seeds`). Each group also gets its label and distinguishing settings here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from ..config import flatten, is_execution_key
from ..engine.runlock import LOCK_NAME, describe, holder
from ..errors import ConfigError, DataError


def ignored_key(key: str) -> bool:
    """Keys left out of a run's identity: the seed (a group's runs differ in it) and the
    execution-only keys and provenance (config.EXECUTION_KEYS)."""
    return key == "seed" or is_execution_key(key)

# Keys with their own column; not repeated in the "settings" column.
OWN_COLUMNS = {"method.name", "model.name", "data.name", "data.root", "train.epochs"}
# --group-by aliases for summary fields.
ALIASES = {"method": "method.name", "model": "model.name", "dataset": "data.name",
           "epochs": "train.epochs", "train_fraction": "data.train_fraction"}


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
    unfinished ones (``metrics.jsonl`` or ``last.pt`` without ``summary.json``, a summary
    without ``test_top1``, or a run whose lock a live process holds: it is being written,
    so nothing in it is read). :func:`left_out_reason` says which."""
    runs, unfinished, seen = [], [], set()
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise DataError(f"run directory not found: {p}")
        for s in sorted(p.rglob("summary.json")) if p.is_dir() else []:
            d = s.parent.resolve()
            if d not in seen:
                seen.add(d)
                if holder(s.parent) is not None:
                    unfinished.append(s.parent)
                    continue
                run = load_run(s.parent)
                # A summary without a last-epoch accuracy has nothing to average.
                (runs.append(run) if run.summary.get("test_top1") is not None else unfinished.append(s.parent))
        for marker in ("metrics.jsonl", "last.pt", LOCK_NAME):
            for m in sorted(p.rglob(marker)) if p.is_dir() else []:
                d = m.parent
                if marker == LOCK_NAME and holder(d) is None:
                    continue  # left by a run killed before it wrote anything
                if not (d / "summary.json").is_file() and d.resolve() not in seen:
                    seen.add(d.resolve())
                    unfinished.append(d)
    return runs, unfinished


def left_out_reason(d: Path) -> str:
    """Why :func:`find_runs` left the run directory ``d`` out."""
    who = holder(d)
    if who is not None:
        return f"running ({describe(who)})"
    if not (d / "summary.json").is_file():
        return "no summary.json"
    try:
        finished = json.loads((d / "summary.json").read_text()).get("test_top1") is not None
    except (OSError, ValueError, AttributeError):
        finished = False
    # A run that was being written when the runs were collected may have finished since.
    return "finished after the runs were collected" if finished else "summary.json has no test_top1"


def freeze(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def current_defaults(method: Any) -> Dict[str, Any]:
    """This version's default value of every config key (method keys for ``method``)."""
    from ..config import DEFAULTS
    from ..registry import METHODS

    out = flatten(DEFAULTS)
    if isinstance(method, str) and method in METHODS:
        out.update({f"method.{k}": v for k, v in flatten(METHODS.get(method).defaults).items()})
    return out


def identity(run: Run) -> Dict[str, Any]:
    """The settings that define a run's experiment. A key equal to this version's default is
    left out, so that runs written before the key existed (which lack it) group with runs
    that carry its default."""
    if run.config:
        defaults = current_defaults(run.config.get("method.name"))
        return {k: v for k, v in run.config.items()
                if not ignored_key(k) and not (k in defaults and freeze(defaults[k]) == freeze(v))}
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
            key = (tuple(sorted((k, freeze(v)) for k, v in identity(r).items())), freeze(r.seed))
            by.setdefault(key, []).append(r)
    return [rs for rs in by.values() if len(rs) > 1]


def pooled_seeds(groups: Sequence[Group]) -> List[str]:
    """With ``--group-by``, a group may pool runs of different experiments; where two of them
    share a seed, the group counts one seed twice. One line per such (group, seed), naming
    the settings that tell the runs apart, so that the user can add one to ``--group-by``."""
    lines = []
    for g in groups:
        by_seed: Dict[str, List[Run]] = {}
        for r in g.runs:
            by_seed.setdefault(str(r.seed), []).append(r)
        for seed, rs in by_seed.items():
            if len(rs) < 2:
                continue
            differ = differing_keys([identity(r) for r in rs])
            lines.append(f"group '{g.label}' holds seed {seed} {len(rs)} times ("
                         + " and ".join(str(r.path) for r in rs) + "), differing in "
                         + (", ".join(differ[:6]) + (", ..." if len(differ) > 6 else "") if differ
                            else "nothing but the folder"))
    return lines


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
            key = tuple(freeze(vals[g]) for g in group_by)
        else:
            vals = {}
            key = tuple(sorted((k, freeze(v)) for k, v in identity(r).items()))
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


def varying_keys(groups: Sequence[Group]) -> List[str]:
    return differing_keys([identity(g.first) for g in groups])


def differing_keys(idents: Sequence[Dict[str, Any]]) -> List[str]:
    """The keys whose value (or presence) is not the same in every one of ``idents``."""
    keys = sorted(set().union(*idents)) if idents else []
    return [k for k in keys if len({freeze(i.get(k, "<unset>")) for i in idents}) > 1]


def short_names(keys: Sequence[str]) -> Dict[str, str]:
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def fmt_setting(v: Any, brief: bool = False) -> str:
    """A setting's value as text; ``brief`` shortens long lists (class names, subjects) for
    labels to their first two and last items and their length."""
    if brief and isinstance(v, list) and len(v) > 4:
        return f"[{', '.join(fmt_setting(x) for x in v[:2])}, ..., {fmt_setting(v[-1])}] ({len(v)})"
    return freeze(v).strip('"') if not isinstance(v, float) else f"{v:g}"


def method_name(g: Group) -> str:
    return str(g.first.summary.get("method", g.first.config.get("method.name")))


def _label(groups: Sequence[Group], by_fields: bool) -> None:
    if by_fields:
        for g in groups:
            g.settings = " ".join(f"{k}={fmt_setting(v)}" for k, v in g.fields.items())
        _unique_labels(groups, lambda brief: [", ".join(fmt_setting(v, brief) for v in g.fields.values())
                                              for g in groups])
        return
    differ = varying_keys(groups)
    varying = [k for k in differ if k not in OWN_COLUMNS and not k.startswith("method.")]
    method_keys = [k for k in differ if k.startswith("method.") and k != "method.name"]
    short = short_names(varying + method_keys)
    multi_model = len({g.first.summary.get("model") for g in groups}) > 1
    multi_data = len({dataset_name(g.first) for g in groups}) > 1
    multi_epochs = len({g.first.summary.get("epochs") for g in groups}) > 1
    parts: List[Tuple[str, List[Tuple[str, Any]]]] = []  # per group: head, named settings
    for g in groups:
        ident = identity(g.first)
        full = {**current_defaults(g.first.config.get("method.name")), **g.first.config}
        # A setting at its default is named only for data keys (e.g. train_fraction=1 beside
        # 0.25 and 0.5); elsewhere only the groups that change it name it.
        named = [k for k in varying + method_keys if k in ident or (k in full and k.startswith("data."))]
        g.settings = " ".join(f"{short[k]}={fmt_setting(full[k])}" for k in named)
        head = [str(g.first.summary.get("method", ident.get("method.name", "?")))]
        if multi_model:
            head.append(str(g.first.summary.get("model")))
        if multi_data:
            head.append(dataset_name(g.first))
        if multi_epochs:
            head.append(f"{g.first.summary.get('epochs')} ep")
        parts.append((" / ".join(head), [(short[k], full[k]) for k in named]))
    _unique_labels(groups, lambda brief: [
        head + (f" ({', '.join(f'{n}={fmt_setting(v, brief)}' for n, v in pairs)})" if pairs else "")
        for head, pairs in parts])


def _unique_labels(groups: Sequence[Group], labels) -> None:
    """``labels(brief)`` gives one label per group; long lists are shortened (``brief``)
    unless that makes two groups' labels equal."""
    short = labels(True)
    for g, lab in zip(groups, short if len(set(short)) == len(short) else labels(False)):
        g.label = lab

