"""`lsskd sweep` (planning, skip/resume, failures) and `lsskd report` (aggregation, plots)."""
import csv
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from lsskd.cli import main
from lsskd import sweep as sw
from lsskd.config import build_config, dump
from lsskd.errors import ConfigError
from lsskd.data.base import DataBundle
from lsskd.report import build_report

PNG = b"\x89PNG\r\n\x1a\n"


# --- fake but realistic run directories -----------------------------------------------------
def make_run(root, name, method, seed, top1, top5, best, best_epoch, fraction=1.0, branches=None,
             epochs=3, model="resnet8", overrides=()):
    """A run directory as `lsskd train` leaves it: config.yaml from the real config
    builder, one metrics line per epoch (best at ``best_epoch``, ``top1`` last) and summary.json."""
    d = Path(root) / name / f"seed{seed}"
    d.mkdir(parents=True)
    cfg = build_config(None, [f"method.name={method}", f"model.name={model}", f"seed={seed}",
                              f"out_dir={d}", "data.root=../shared/data/cifar100",
                              f"data.train_fraction={fraction}", f"train.epochs={epochs}", *overrides])
    (d / "config.yaml").write_text(dump(cfg))
    rows = []
    for e in range(1, epochs + 1):
        acc = best if e == best_epoch else (top1 if e == epochs else top1 - 10.0 * (epochs - e))
        row = {"epoch": e, "lr": 0.05, "train_loss": 3.0 / e, "train_top1": 10.0 * e, "test_top1": acc,
               "test_top5": top5, "test_loss": 2.0, "epoch_seconds": 1.0}
        if branches:
            row.update({f"test_branch{i + 1}_top1": b for i, b in enumerate(branches)})
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"method": method, "model": model, "dataset": "folder", "seed": seed, "epochs": epochs,
               "eval_on": "test", "train_size": int(10000 * fraction), "test_top1": top1, "test_top5": top5,
               "test_top1_best": best, "best_epoch": best_epoch, "params_deployed": 83892,
               "params_train": 90000 if method != "ce" else 83892, "macs_deployed": 12507392,
               "train_seconds": 10.0 + seed}
    if branches:
        summary["branch_top1"] = list(branches)
    (d / "summary.json").write_text(json.dumps(summary))
    return d


@pytest.fixture
def fake_runs(tmp_path):
    root = tmp_path / "results"
    # ce: last 70/72/74 -> 72 ± 2; top-5 90/91/92 -> 91 ± 1; best 71/73/75 (epoch 2) -> 73 ± 2
    for s, (t1, t5, b) in enumerate([(70.0, 90.0, 71.0), (72.0, 91.0, 73.0), (74.0, 92.0, 75.0)]):
        make_run(root, "ce", "ce", s, t1, t5, b, 2)
    # lsskd: last 73/74/78 -> 75 ± sqrt(7); best 80 at epoch 1 for every seed (std 0)
    for s, t1 in enumerate([73.0, 74.0, 78.0]):
        make_run(root, "lsskd", "lsskd", s, t1, 93.0, 80.0, 1, branches=[40.0 + s, 55.0, 60.0 + 2 * s])
    # Fig. 5 style: 25% / 50% of the training data, one seed each
    for frac, (c, l) in {0.25: (50.0, 55.5), 0.5: (60.0, 64.25)}.items():
        make_run(root, f"ce-frac{frac}", "ce", 0, c, 80.0, c, 3, fraction=frac)
        make_run(root, f"lsskd-frac{frac}", "lsskd", 0, l, 85.0, l, 3, fraction=frac,
                 branches=[30.0, 40.0, 50.0])
    return root


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def row_for(rows, method, fraction):
    sel = [r for r in rows if r["method"] == method
           and (f"train_fraction={fraction:g}" in r["settings"] if fraction != 1.0
                else "train_fraction=1" in r["settings"])]
    assert len(sel) == 1, (method, fraction, rows)
    return sel[0]


# --- report ---------------------------------------------------------------------------------
def test_report_means_stds_deltas_and_labels(fake_runs, tmp_path):
    out = tmp_path / "rep"
    rep = build_report([fake_runs], out)
    assert len(rep.runs) == 10 and len(rep.groups) == 6
    rows = read_csv(out / "report.csv")
    ce, ls = row_for(rows, "ce", 1.0), row_for(rows, "lsskd", 1.0)
    assert ce["n_seeds"] == "3" and ce["seeds"] == "0 1 2"
    assert float(ce["top1_last_mean"]) == 72.0 and float(ce["top1_last_std"]) == 2.0
    assert float(ce["top5_last_mean"]) == 91.0 and float(ce["top5_last_std"]) == 1.0
    assert float(ce["top1_best_epoch_mean"]) == 73.0 and float(ce["top1_best_epoch_std"]) == 2.0
    assert float(ce["best_epoch_mean"]) == 2.0
    assert float(ls["top1_last_mean"]) == 75.0
    assert float(ls["top1_last_std"]) == pytest.approx(math.sqrt(7.0), abs=1e-6)
    assert float(ls["top1_best_epoch_mean"]) == 80.0 and float(ls["top1_best_epoch_std"]) == 0.0
    # delta vs the ce group of the same config: 75 - 72, and per training fraction
    assert float(ls["delta_top1_vs_baseline"]) == 3.0 and ce["delta_top1_vs_baseline"] == ""
    # its standard error: sqrt(7/3 + 4/3); none for single-seed groups
    assert float(ls["delta_top1_se"]) == pytest.approx(math.sqrt(11 / 3), abs=1e-6)
    assert row_for(rows, "lsskd", 0.25)["delta_top1_se"] == "" and ce["delta_top1_se"] == ""
    # paired over seeds 0-2: differences 3, 2, 4 -> mean 3, sd 1, SE 1/sqrt(3)
    assert float(ls["paired_delta_top1"]) == 3.0 and ls["paired_n"] == "3"
    assert float(ls["paired_delta_se"]) == pytest.approx(1 / math.sqrt(3), abs=1e-6)
    assert ce["paired_delta_top1"] == "" and row_for(rows, "lsskd", 0.25)["paired_n"] == ""
    assert float(row_for(rows, "lsskd", 0.25)["delta_top1_vs_baseline"]) == 5.5
    assert float(row_for(rows, "lsskd", 0.5)["delta_top1_vs_baseline"]) == 4.25
    # single seed: no std
    one = row_for(rows, "ce", 0.25)
    assert one["n_seeds"] == "1" and one["top1_last_std"] == "" and float(one["top1_last_mean"]) == 50.0
    assert int(one["train_size"]) == 2500
    # per-branch means over seeds (40,41,42 -> 41; 55; 60,62,64 -> 62)
    assert [float(v) for v in ls["branch_top1_mean"].split()] == [41.0, 55.0, 62.0]
    assert ce["branch_top1_mean"] == ""
    assert ce["params_deployed"] == "83892" and ls["params_train"] == "90000"

    md = (out / "report.md").read_text()
    assert "Top-1 best epoch (not the headline)" in md and "**not the headline**" in md
    header = next(ln for ln in md.splitlines() if ln.startswith("| Group | Seeds"))
    assert header.index("Top-1 last epoch (headline)") < header.index("best epoch (not the headline)")
    assert "Δ top-1 vs ce" in header
    ce_line = next(ln for ln in md.splitlines() if ln.startswith("| ce (train_fraction=1)"))
    cells = [c.strip() for c in ce_line.strip("|").split("|")]
    assert cells[1:5] == ["3", "72.00 ± 2.00", "–", "–"]
    assert cells[6].startswith("73.00 ± 2.00")
    assert "| lsskd (train_fraction=1) | 41.00 ± 1.00 | 55.00 ± 0.00 | 62.00 ± 2.00 | 75.00 ± 2.65 |" in md
    assert "| lsskd (train_fraction=1) | 3 | 75.00 ± 2.65 | +3.00 ± 1.91 | +3.00 ± 0.58 (3) |" in md
    assert "within seed noise" in md and "Paired Δ (seeds)" in header and "Paired Δ: the mean" in md
    assert "| lsskd (train_fraction=0.25) | 1 | 55.50 | +5.50 | – |" in md

    for name in ("accuracy_per_epoch.png", "accuracy_vs_fraction.png", "branch_accuracy.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
        assert f"]({name})" in md


def test_report_labels_shorten_long_lists_unless_that_makes_two_equal(tmp_path):
    names = ["apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle"]
    other = names[:2] + ["bowl", "boy", "bridge", "bus", "butterfly", "camel", "can"] + names[-1:]
    for cell, classes in (("a", names), ("b", other)):
        for method, top1 in (("ce", 60.0), ("sad_ce", 63.0)):
            make_run(tmp_path / "runs" / cell, method, method, 0, top1, 90.0, top1, 3,
                     overrides=[f"data.classes=[{','.join(classes)}]"])
    rep = build_report([tmp_path / "runs" / "a"], tmp_path / "one", group_by=["method", "data.classes"],
                       plots=False)
    assert sorted(g.label for g in rep.groups) == ["ce, [apple, aquarium_fish, ..., bottle] (10)",
                                                   "sad_ce, [apple, aquarium_fish, ..., bottle] (10)"]
    assert rep.groups[0].settings.endswith('data.classes=["apple", "aquarium_fish", "baby", "bear", "beaver", '
                                           '"bed", "bee", "beetle", "bicycle", "bottle"]')
    # two cells whose lists agree in length, first two and last names: the shortened labels
    # would be equal, so the full lists are shown
    rep = build_report([tmp_path / "runs"], tmp_path / "two", group_by=["method", "data.classes"], plots=False)
    labels = sorted(g.label for g in rep.groups)
    assert len(set(labels)) == 4 and not any("..." in lab for lab in labels)
    assert sum("bowl" in lab for lab in labels) == 2
    deltas = {g.label: g.stats.get("delta") for g in rep.groups if g.label.startswith("sad_ce")}
    assert list(deltas.values()) == [pytest.approx(3.0), pytest.approx(3.0)]


def test_report_compares_variants_of_one_method_with_the_group_named_by_its_label(tmp_path):
    """--compare-to names the plain config's group ("lsskd") when the others are its variants
    ("lsskd (kl_weight=0)"): every variant gets its difference, paired by seed."""
    for seed, (plain, no_kl) in enumerate([(70.0, 69.0), (72.0, 72.5), (71.0, 69.5)]):
        make_run(tmp_path / "runs", "lsskd", "lsskd", seed, plain, 90.0, plain, 3)
        make_run(tmp_path / "runs", "no_kl", "lsskd", seed, no_kl, 90.0, no_kl, 3, overrides=["method.kl_weight=0"])
    rep = build_report([tmp_path / "runs"], tmp_path / "out", baseline="lsskd", plots=False,
                       require_baseline=True)
    by = {g.label: g.stats for g in rep.groups}
    assert set(by) == {"lsskd", "lsskd (kl_weight=0)"} and by["lsskd"]["delta"] is None
    m, se, n = by["lsskd (kl_weight=0)"]["paired"]
    diffs = [-1.0, 0.5, -1.5]
    assert n == 3 and m == pytest.approx(sum(diffs) / 3)
    assert se == pytest.approx(statistics.stdev(diffs) / math.sqrt(3))
    # a name that is neither a group's label nor a method is refused
    with pytest.raises(ConfigError, match="--compare-to lsskd_selfsup: no run"):
        build_report([tmp_path / "runs"], tmp_path / "none", baseline="lsskd_selfsup", plots=False,
                     require_baseline=True)


def test_report_group_by_and_cli(fake_runs, tmp_path, capsys, monkeypatch):
    rep = build_report([fake_runs], tmp_path / "g", group_by=["method"], plots=False)
    n = {g.fields["method"]: g.stats["n"] for g in rep.groups}
    assert n == {"ce": 5, "lsskd": 5}
    # grouping by method alone pools the three training fractions, which share seed 0: said, with
    # the key that tells them apart, in the report and on stderr
    assert len(rep.pooled) == 2 and all("seed 0 3 times" in p and "data.train_fraction" in p for p in rep.pooled)
    assert "holds seed 0 3 times" in (tmp_path / "g" / "report.md").read_text()
    assert not build_report([fake_runs], tmp_path / "g2", group_by=["method", "data.train_fraction"],
                            plots=False).pooled
    ce = next(g for g in rep.groups if g.fields["method"] == "ce")
    assert ce.stats["top1"][0] == pytest.approx((70 + 72 + 74 + 50 + 60) / 5, abs=1e-12)
    assert not list((tmp_path / "g").glob("*.png"))
    with pytest.raises(ConfigError, match="no_such_key"):
        build_report([fake_runs], tmp_path / "h", group_by=["no_such_key"], plots=False)

    # an interrupted run is listed as unfinished, not averaged in
    half = fake_runs / "ce" / "seed9"
    half.mkdir()
    (half / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_top1": 1.0}) + "\n")
    nullrun = make_run(fake_runs, "ce", "ce", 7, 1.0, 1.0, 1.0, 1)
    summ = json.loads((nullrun / "summary.json").read_text())
    (nullrun / "summary.json").write_text(json.dumps({**summ, "test_top1": None}))
    out = tmp_path / "cli"
    assert main(["report", str(fake_runs), "--out", str(out), "--group-by", "method,data.train_fraction",
                 "--compare-to", "none", "--no-plots"]) == 0
    rows = read_csv(out / "report.csv")
    assert len(rows) == 6 and all(r["delta_top1_vs_baseline"] == "" for r in rows)
    assert "2 unfinished run(s) left out" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert f"`{half}`" in md and f"`{nullrun}`" in md

    # a baseline named on the command line that no run has (a group name, a typo) is an error that
    # lists the methods there, before anything is written; the default (ce) stays optional
    assert main(["report", str(fake_runs), "--out", str(tmp_path / "typo"), "--compare-to", "c100_resnet8_ce",
                 "--no-plots"]) == 2
    assert "--compare-to c100_resnet8_ce: no run under" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()
    assert main(["report", str(fake_runs / "lsskd"), "--out", str(tmp_path / "noce"), "--no-plots"]) == 0
    assert read_csv(tmp_path / "noce" / "report.csv")[0]["delta_top1_vs_baseline"] == ""
    assert main(["report", str(fake_runs), "--out", str(tmp_path / "vs"), "--compare-to", "lsskd",
                 "--no-plots"]) == 0
    rows = {r["group"]: r for r in read_csv(tmp_path / "vs" / "report.csv")}
    assert rows["ce (train_fraction=0.25)"]["baseline"] == "lsskd (train_fraction=0.25)"
    assert float(rows["ce (train_fraction=0.25)"]["delta_top1_vs_baseline"]) == pytest.approx(50.0 - 55.5)

    # matplotlib is optional: a clear error, and nothing half-written
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match="matplotlib.*--no-plots"):
        build_report([fake_runs], tmp_path / "noplt")
    assert not (tmp_path / "noplt" / "report.md").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert "no finished runs" in capsys.readouterr().err
    (fake_runs / "ce" / "seed0" / "summary.json").write_text("{not json")
    assert main(["report", str(fake_runs), "--no-plots"]) == 2
    assert "seed0/summary.json: not valid JSON" in capsys.readouterr().err


# --- sweep planning ---------------------------------------------------------------------------
def write_config(path, data_root, **train):
    cfg = {"model": {"name": "resnet8"}, "method": {"name": "ce"},
           "data": {"name": "folder", "root": str(data_root)},
           "train": {"epochs": 1, "batch_size": 32, "progress": False, "tensorboard": False,
                     "max_steps_per_epoch": 2, **train},
           "optim": {"lr": 0.05, "schedule": "cosine"}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sweep_plan_expansion(tmp_path, capsys, monkeypatch):
    a = write_config(tmp_path / "a.yaml", tmp_path)
    b = write_config(tmp_path / "b.yaml", tmp_path)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"configs": ["a.yaml", "b.yaml"], "seeds": [0, 1],
                                    "overrides": {"optim.lr": 0.1},
                                    "grid": {"data.train_fraction": [0.25, 0.5], "method.name": ["ce"]},
                                    "out_root": str(tmp_path / "res")}))
    p = sw.load_plan(plan)
    specs = sw.expand(p["configs"], p["seeds"], p["out_root"], p["overrides"], p["grid"])
    assert [s.name for s in specs] == [
        f"{c}-train_fraction{f}-namece/seed{k}" for c in "ab" for f in ("0.25", "0.5") for k in (0, 1)]
    s = specs[3]
    assert s.out_dir == tmp_path / "res" / "a-train_fraction0.5-namece" / "seed1"
    cfg = build_config(s.config, s.train_overrides())
    assert (cfg["seed"], cfg["optim"]["lr"], cfg["data"]["train_fraction"]) == (1, 0.1, 0.5)
    assert cfg["out_dir"] == str(s.out_dir)
    picked = sw.expand([str(a), str(b)], [0, 1, 2], tmp_path / "r", only=["b*", "a/seed2"])
    assert [x.name for x in picked] == ["a/seed2", "b/seed0", "b/seed1", "b/seed2"]

    with pytest.raises(ConfigError, match="seed=3"):
        sw.expand([str(a)], [0], tmp_path / "r", ["seed=3"])
    with pytest.raises(ConfigError, match="matched none"):
        sw.expand([str(a)], [0], tmp_path / "r", only=["zzz*"])
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        sw.expand([str(a)], [0], tmp_path / "r", ["train.epoch=3"])
    plan.write_text("configs: [a.yaml]\nseed: [0]\n")
    with pytest.raises(ConfigError, match="unknown key 'seed'"):
        sw.load_plan(plan)

    # the example plan shipped in configs/sweeps/ stays valid
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    ex = sw.load_plan(root / "configs" / "sweeps" / "quickstart_seeds.yaml")
    names = [x.name for x in sw.expand(ex["configs"], ex["seeds"], ex["out_root"], ex["overrides"], ex["grid"])]
    assert names[0] == "quickstart-lr0.05/seed0" and len(names) == 6

    # CLI dry run: overrides after --seeds are not swallowed; nothing is created
    assert main(["sweep", "--configs", str(a), "--out-root", str(tmp_path / "dry"), "--dry-run",
                 "--seeds", "3", "4", "train.epochs=5"]) == 0
    out = capsys.readouterr().out
    assert "a/seed3" in out and "a/seed4" in out and "train.epochs=5 seed=4" in out
    assert not (tmp_path / "dry").exists()


def test_sweep_drift_names_changed_keys_but_not_keys_added_since(tmp_path):
    """config_drift reports a result-relevant key that differs from the plan; a key the
    run's config.yaml lacks because it predates the key counts as its default."""
    a = write_config(tmp_path / "a.yaml", tmp_path)
    spec = sw.expand([str(a)], [0], tmp_path / "r")[0]
    spec.out_dir.mkdir(parents=True)
    saved = build_config(spec.config, spec.train_overrides())
    del saved["data"]["val_split"]  # written before data.val_split existed
    saved["train"]["progress"] = not saved["train"]["progress"]  # an execution key
    (spec.out_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert sw.config_drift(spec) == []
    saved["optim"]["lr"] = 0.123
    saved["data"]["val_split"] = "group"
    (spec.out_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert sw.config_drift(spec) == ["data.val_split", "optim.lr"]
    (spec.out_dir / "config.yaml").write_text("- a list\n")
    assert sw.config_drift(spec) == ["config.yaml unreadable"]


def test_sweep_parallel_failures_reported(tmp_path, capsys):
    """--jobs 2 runs `python -m lsskd train` subprocesses; a failing run does not stop the
    others, its error is shown, and the exit status is 1."""
    bad = write_config(tmp_path / "bad.yaml", tmp_path / "no_such_data")
    rc = main(["sweep", "--configs", str(bad), "--seeds", "0", "1", "--jobs", "2",
               "--out-root", str(tmp_path / "res")])
    out = capsys.readouterr().out
    assert rc == 1
    assert out.count("failed") >= 2 and "2 failed" in out
    # the DataError naming the missing folder reaches the table: each child got past the
    # run lock its parent handed down to it (issue 30), and the lock is gone afterwards
    assert "no_such_data" in out
    assert not list((tmp_path / "res").rglob("run.lock"))
    log = (tmp_path / "res" / "bad" / "seed1" / "sweep.log").read_text()
    assert "-m lsskd train --config" in log and "seed=1" in log


# --- real tiny sweep ---------------------------------------------------------------------------
def test_sweep_real_skip_and_resume(cifar_bundle, cifar_root, tmp_path, monkeypatch):
    """Two seeds of resnet8 on the shared CIFAR-100 data (2 steps, 1 epoch). Seed 1 is
    killed after its mid-epoch checkpoint; the next sweep skips seed 0 and resumes
    seed 1, which then matches an uninterrupted run of seed 1 exactly."""
    from lsskd.engine.trainer import Trainer

    cfg_file = write_config(tmp_path / "tiny.yaml", cifar_root, ckpt_every_steps=1)
    # Evaluate on 500 test images to keep the test fast; training uses the real data.
    small = DataBundle(cifar_bundle.train, cifar_bundle.test.subset(range(500)), None,
                       cifar_bundle.mean, cifar_bundle.std, cifar_bundle.modality)
    key = sw.data_key(build_config(cfg_file))
    specs = sw.expand([str(cfg_file)], [0, 1], tmp_path / "res")

    real_step = Trainer._train_step
    calls = {"n": 0}

    def killed_after_checkpoint(self, *a):
        if self.cfg["seed"] == 1:
            calls["n"] += 1
            if calls["n"] == 2:  # the checkpoint after step 1 is on disk
                raise RuntimeError("simulated kill")
        return real_step(self, *a)

    monkeypatch.setattr(Trainer, "_train_step", killed_after_checkpoint)
    first = sw.run_sweep(specs, bundles={key: small}, log=lambda *_: None)
    monkeypatch.setattr(Trainer, "_train_step", real_step)
    assert [(r.action, r.status) for r in first] == [("train", "ok"), ("train", "failed")]
    assert "simulated kill" in first[1].note
    s0, s1 = (s.out_dir for s in specs)
    assert (s0 / "summary.json").is_file() and not (s1 / "summary.json").exists()
    assert (s1 / "last.pt").is_file()

    mtime0 = (s0 / "summary.json").stat().st_mtime_ns
    second = sw.run_sweep(specs, bundles={key: small}, log=lambda *_: None)
    assert [(r.action, r.status) for r in second] == [("skip", "skipped"), ("resume", "ok")]
    assert (s0 / "summary.json").stat().st_mtime_ns == mtime0
    assert second[0].top1 == json.loads((s0 / "summary.json").read_text())["test_top1"]

    ref = sw.expand([str(cfg_file)], [1], tmp_path / "ref")
    sw.run_sweep(ref, bundles={key: small}, log=lambda *_: None)
    got = json.loads((s1 / "summary.json").read_text())
    want = json.loads((ref[0].out_dir / "summary.json").read_text())
    assert got["test_top1"] == want["test_top1"] and got["test_top5"] == want["test_top5"]
    rows = [json.loads(x) for x in (s1 / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (ref[0].out_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["train_loss"] == ref_rows[0]["train_loss"]

    third = sw.run_sweep(specs, bundles={key: small}, log=lambda *_: None)
    assert [r.status for r in third] == ["skipped", "skipped"]

    # and the report over the finished sweep
    rep = build_report([tmp_path / "res"], tmp_path / "rep", plots=False)
    (g,) = rep.groups
    tops = [json.loads((d / "summary.json").read_text())["test_top1"] for d in (s0, s1)]
    assert g.stats["n"] == 2 and g.stats["top1"][0] == pytest.approx(sum(tops) / 2, abs=1e-12)


def test_report_groups_seeds_written_before_a_config_key_existed(tmp_path):
    root = tmp_path / "results"
    for s in range(2):
        make_run(root, "lsskd", "lsskd", s, 70.0 + s, 90.0, 71.0, 2)
    # seed 0 was written by an older version: its config lacks a key added later
    path = root / "lsskd" / "seed0" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    del cfg["train"]["bn_recalibrate"]
    path.write_text(yaml.safe_dump(cfg))
    # seed 1 names a method key at its default value
    path = root / "lsskd" / "seed1" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["method"]["gate"] = "none"
    path.write_text(yaml.safe_dump(cfg))
    # a third run really differs in one of them
    d = make_run(root, "lsskd_gate", "lsskd", 0, 60.0, 80.0, 61.0, 2)
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["method"]["gate"] = "fit"
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    rep = build_report([root], tmp_path / "rep")
    assert sorted(len(g.runs) for g in rep.groups) == [1, 2]
    labels = sorted(g.label for g in rep.groups)
    assert labels == ["lsskd", "lsskd (gate=fit)"]  # a default is not named


def test_in_process_runs_do_not_leak_torch_settings():
    import torch

    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    rng = torch.get_rng_state()
    with sw.torch_globals_restored():
        torch.set_num_threads(1 if threads > 1 else 2)
        torch.use_deterministic_algorithms(not det, warn_only=True)
        torch.rand(3)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == det
    assert torch.equal(torch.get_rng_state(), rng)


def test_report_names_a_class_subset_common_to_all_runs(tmp_path):
    root = tmp_path / "results"
    for name, method in (("ce", "ce"), ("pskd", "pskd")):
        d = make_run(root, name, method, 0, 60.0, 90.0, 61.0, 2)
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        cfg["data"]["classes"] = 10
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    build_report([root], tmp_path / "rep")
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "Common to all groups: model.name=resnet8, data.root=../shared/data/cifar100, data.classes=10," in text


def test_report_plots_accuracy_against_the_epoch_budget(fake_runs, tmp_path):
    from lsskd.report import compute_stats, find_runs, group_runs, points_against

    root = tmp_path / "budget"
    # ce at 3 epochs (70, 72 -> 71 ± 1.41) and 6 epochs (80); lsskd at 3 (73) and 6 (84, 86 -> 85 ± 1.41)
    for s, t1 in enumerate([70.0, 72.0]):
        make_run(root, "ce-e3", "ce", s, t1, 90.0, t1, 3, epochs=3)
        make_run(root, "lsskd-e6", "lsskd", s, 84.0 + 2 * s, 95.0, 86.0, 6, epochs=6)
    make_run(root, "ce-e6", "ce", 0, 80.0, 90.0, 80.0, 6, epochs=6)
    make_run(root, "lsskd-e3", "lsskd", 0, 73.0, 90.0, 73.0, 3, epochs=3)
    # a second model at 3 epochs only gets a line of its own
    make_run(root, "ce-e3-small", "ce", 0, 50.0, 80.0, 50.0, 3, epochs=3, model="resnet14")
    runs, _ = find_runs([root])
    groups = group_runs(runs)
    compute_stats(groups)
    pts = points_against(groups, "train.epochs")
    assert set(pts) == {"ce (model=resnet8)", "ce (model=resnet14)", "lsskd"}
    x, m, s, n = zip(*pts["ce (model=resnet8)"])
    assert x == (3.0, 6.0) and m == (71.0, 80.0) and s[0] == pytest.approx(math.sqrt(2)) and s[1] is None
    assert n == (2, 1)
    assert [(p[0], p[1]) for p in pts["lsskd"]] == [(3.0, 73.0), (6.0, 85.0)]
    assert [(p[0], p[1]) for p in pts["ce (model=resnet14)"]] == [(3.0, 50.0)]

    rep = build_report([root], tmp_path / "rep")
    assert (tmp_path / "rep" / "accuracy_vs_epochs.png").read_bytes()[:8] == PNG
    assert "](accuracy_vs_epochs.png)" in (tmp_path / "rep" / "report.md").read_text()
    assert len(rep.groups) == 5
    # one budget only (the fixture: every run 3 epochs): no budget plot
    build_report([fake_runs], tmp_path / "same")
    assert not (tmp_path / "same" / "accuracy_vs_epochs.png").exists()
    assert (tmp_path / "same" / "accuracy_vs_fraction.png").exists()
    # two budgets but no method at both (e.g. unrelated protocols side by side): no plot
    lone = tmp_path / "lone"
    make_run(lone, "ce-e3", "ce", 0, 70.0, 90.0, 70.0, 3, epochs=3)
    make_run(lone, "lsskd-e6", "lsskd", 0, 80.0, 90.0, 80.0, 6, epochs=6)
    build_report([lone], tmp_path / "lone-rep")
    assert not (tmp_path / "lone-rep" / "accuracy_vs_epochs.png").exists()


def test_report_refuses_a_seed_repeated_in_two_folders_unless_allowed(fake_runs, tmp_path, capsys):
    """Issue 20.5: a copy of a run (same config and seed, another folder, another commit and
    thread count) is one training run, not a second seed."""
    import shutil

    from lsskd.errors import DataError

    copy = tmp_path / "elsewhere" / "ce" / "seed0"
    shutil.copytree(fake_runs / "ce" / "seed0", copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["out_dir"] = str(copy)
    cfg["train"]["threads"] = 2  # execution-only
    cfg["provenance"] = {"git_commit": "0" * 40, "git_dirty": True, "torch": "9.9"}
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(DataError) as e:
        build_report([fake_runs, tmp_path / "elsewhere"], tmp_path / "r", plots=False)
    msg = str(e.value)
    assert "seed 0 of ce" in msg and str(fake_runs / "ce" / "seed0") in msg and str(copy) in msg
    assert "--allow-repeated-seeds" in msg
    assert main(["report", str(fake_runs), str(tmp_path / "elsewhere"), "--out", str(tmp_path / "c"),
                 "--no-plots"]) == 2
    assert "more than one run folder" in capsys.readouterr().err

    rep = build_report([fake_runs, tmp_path / "elsewhere"], tmp_path / "r", plots=False, allow_repeats=True)
    ce = next(g for g in rep.groups if g.label == "ce (train_fraction=1)")
    assert ce.stats["n"] == 4 and sorted(ce.stats["seeds"]) == [0, 0, 1, 2]
    assert ce.stats["top1"][0] == pytest.approx((70 + 70 + 72 + 74) / 4)
    assert len(rep.repeats) == 1 and "Repeated seeds" in (tmp_path / "r" / "report.md").read_text()
    assert main(["report", str(fake_runs), str(tmp_path / "elsewhere"), "--out", str(tmp_path / "c"),
                 "--no-plots", "--allow-repeated-seeds"]) == 0
    assert "warning: repeated seeds" in capsys.readouterr().err

    # same config, another seed: a genuine seed, even with a different commit recorded
    (copy / "config.yaml").write_text(yaml.safe_dump({**cfg, "seed": 5}))
    summ = json.loads((copy / "summary.json").read_text())
    (copy / "summary.json").write_text(json.dumps({**summ, "seed": 5}))
    rep = build_report([fake_runs, tmp_path / "elsewhere"], tmp_path / "r2", plots=False)
    ce = next(g for g in rep.groups if g.label == "ce (train_fraction=1)")
    assert sorted(ce.stats["seeds"]) == [0, 1, 2, 5] and rep.repeats == []


def test_report_shows_the_ceiling_the_head_chases(tmp_path):
    """Runs that logged view-aggregated branches and the ensemble (issue 27) get a ceiling
    table: means over seeds, and the deepest branch's lead over the deployed head per seed."""
    root = tmp_path / "results"
    for s, t1 in enumerate([60.0, 64.0]):
        d = make_run(root, "sad_ce", "sad_ce", s, t1, 90.0, t1, 2, branches=[40.0, 50.0, 63.0 + s])
        summary = json.loads((d / "summary.json").read_text())
        summary.update({"agg_top1": [45.0 + s, 55.0, 66.0 + 3 * s], "ensemble_top1": 68.0 + 2 * s})
        (d / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "rep"
    build_report([root], out)
    row = read_csv(out / "report.csv")[0]
    assert [float(v) for v in row["agg_top1_mean"].split()] == [45.5, 55.0, 67.5]
    assert float(row["ensemble_top1_mean"]) == 69.0
    md = (out / "report.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| sad_ce") and "67.50" in ln)
    cells = [c.strip() for c in line.strip("|").split("|")]
    # branch 3 agg 66/69 -> 67.50 ± 2.12; ensemble 68/70 -> 69.00 ± 1.41; head 60/64;
    # deepest - head: 3 and 0 -> 1.50 ± 2.12
    assert cells[3:] == ["67.50 ± 2.12", "69.00 ± 1.41", "62.00 ± 2.83", "1.50 ± 2.12"]


def test_report_across_cells_pairs_each_cell_with_its_own_baseline(tmp_path, capsys):
    """`lsskd report --cells`: one row per sweep name, one column per cell; the paired Δ is computed
    inside each cell, FLOPs from macs_train, time from train_seconds (both over the cell's CE)."""
    def run(cell, name, method, seed, top1, macs, secs, epochs=3):
        d = make_run(tmp_path / cell, name, method, seed, top1, 90.0, top1, 3, epochs=epochs)
        s = json.loads((d / "summary.json").read_text())
        s.update(macs_train=macs, train_seconds=secs)
        (d / "summary.json").write_text(json.dumps(s))

    for s, (c, l) in enumerate([(60.0, 63.0), (62.0, 66.0), (61.0, 63.0)]):   # A: diffs 3, 4, 2
        run("A", "ce", "ce", s, c, 100, 10.0)
        run("A", "lsskd_selfsup", "lsskd", s, l, 450, 40.0)
        run("A", "ce_2x", "ce", s, c + 1.0 + s, 100, 20.0, epochs=6)   # budget control: diffs 1, 2, 3
    for s, (c, l) in enumerate([(50.0, 49.0), (52.0, 52.0)]):                 # B: diffs -1, 0
        run("B", "ce", "ce", s, c, 100, 20.0)
        run("B", "lsskd_selfsup", "lsskd", s, l, 450, 100.0)
    run("B", "sla", "sla", 0, 55.0, 400, 30.0)                                 # one seed: no pairing
    t = make_run(tmp_path / "B", "teacher", "ce", 0, 58.0, 90.0, 58.0, 3, model="resnet20")  # another network
    ts = json.loads((t / "summary.json").read_text())
    (t / "summary.json").write_text(json.dumps({**ts, "macs_deployed": 3 * 12507392, "macs_train": 300}))
    assert main(["report", "--cells", f"cellA={tmp_path / 'A'}", str(tmp_path / "B"),
                 "--out", str(tmp_path / "out")]) == 0
    rows = {(r["group"], r["cell"]): r for r in read_csv(tmp_path / "out" / "cells.csv")}
    a, b = rows[("lsskd_selfsup", "cellA")], rows[("lsskd_selfsup", "B")]
    assert float(a["paired_delta"]) == 3.0 and float(a["paired_se"]) == pytest.approx(1 / math.sqrt(3), abs=1e-4)
    assert float(b["paired_delta"]) == -0.5 and float(b["paired_se"]) == pytest.approx(0.5, abs=1e-4)
    assert float(a["flops_vs_baseline"]) == 4.5 and float(a["time_vs_baseline"]) == 4.0
    assert float(b["time_vs_baseline"]) == 5.0 and rows[("sla", "B")]["paired_delta"] == ""
    # the reading rule: +3.00 beyond 2 x 0.58 is ahead; -0.50 within 2 x 0.50 is level; unpaired blank
    assert (a["at_2se"], b["at_2se"], rows[("sla", "B")]["at_2se"]) == ("ahead", "level", "")
    assert ("sla", "cellA") not in rows
    # another budget pairs with the cell's only CE, its FLOPs counted over the whole run
    c2 = rows[("ce_2x", "cellA")]
    assert float(c2["paired_delta"]) == 2.0 and float(c2["paired_se"]) == pytest.approx(1 / math.sqrt(3), abs=1e-4)
    assert float(c2["flops_vs_baseline"]) == 2.0 and float(c2["time_vs_baseline"]) == 2.0
    md = (tmp_path / "out" / "cells.md").read_text()
    # the row's cost averages its cells: time (4 + 5) / 2
    assert "| lsskd_selfsup | 64.00 ± 1.73 (n=3)<br>+3.00 ± 0.58 (3) | 50.50 ± 2.12 (n=2)<br>-0.50 ± 0.50 (2) | 4.50 | 4.50 |" in md
    assert "| sla | – | 55.00 (n=1) | 4.00 | 1.50 |" in md
    # a row that deploys another network says so, in the table and the CSV; the others do not
    assert "| teacher<br>(deploys resnet20, 3.0x its MACs) | – | 58.00 (n=1) | 3.00 | 0.50 |" in md
    assert rows[("teacher", "B")]["deploys"] == "deploys resnet20, 3.0x its MACs"
    assert rows[("sla", "B")]["deploys"] == "" and "Every row deploys the baseline's network" in md
    # the figure of the paired differences, linked from the table; --no-plots writes tables only
    assert (tmp_path / "out" / "cells.png").stat().st_size > 1000 and "](cells.png)" in md
    assert main(["report", "--cells", str(tmp_path / "B"), "--no-plots", "--out", str(tmp_path / "np")]) == 0
    assert not (tmp_path / "np" / "cells.png").exists() and "cells.png" not in (tmp_path / "np" / "cells.md").read_text()
    # a baseline named by its sweep folder works; one no cell has is refused before writing
    assert main(["report", "--cells", str(tmp_path / "A"), "--compare-to", "lsskd_selfsup",
                 "--out", str(tmp_path / "o2")]) == 0
    assert "-3.00 ± 0.58 (3)" in (tmp_path / "o2" / "cells.md").read_text()
    assert main(["report", "--cells", str(tmp_path / "A"), "--compare-to", "pskd", "--out", str(tmp_path / "o3")]) == 2
    assert "pskd" in capsys.readouterr().err and not (tmp_path / "o3" / "cells.md").exists()
    assert main(["report", "--cells", f"x={tmp_path / 'A'}", f"x={tmp_path / 'B'}"]) == 2
    assert "two cells named 'x'" in capsys.readouterr().err
