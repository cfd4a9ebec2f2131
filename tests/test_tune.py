"""lsskd tune: candidates train on a held-out split and the best is recorded."""
import json

import yaml

from lsskd.cli import main
from lsskd.config import build_config


# --jobs 2: the two candidates train side by side as `python -m lsskd train` subprocesses
def test_tune_picks_best_on_validation_split(tmp_path, cifar_root, capsys):
    out = tmp_path / "tune"
    rc = main(["tune", "--config", "configs/quickstart_cifar.yaml", "--out-root", str(out),
               "--grid", "optim.lr=[0.0,0.1]", "--jobs", "2", f"data.root={cifar_root}", "data.per_class=3",
               "train.epochs=1", "train.max_steps_per_epoch=3", "train.batch_size=32",
               "train.progress=false", "train.tensorboard=false", "train.eval_batch_size=512"])
    assert rc == 0
    res = json.loads((out / "tune.json").read_text())
    assert [c["group"] for c in res["candidates"]] == ["quickstart_cifar-lr0.0", "quickstart_cifar-lr0.1"]
    for c in res["candidates"]:
        summary = json.loads((out / c["group"] / "seed0" / "summary.json").read_text())
        assert summary["eval_on"] == "val" and summary["val_top1"] == c["mean_val_top1"]
        # 3 per class minus a 10% stratified hold-out: 2 or 3 per class, never the test set
        assert summary["train_size"] < 300
    best = max(res["candidates"], key=lambda c: c["mean_val_top1"])
    assert res["chosen"]["group"] == best["group"]
    # chosen.yaml is a config of its own: the tuned file, the fixed overrides and the winner,
    # trained on the whole training set (no held-out split)
    chosen = yaml.safe_load((out / "chosen.yaml").read_text())
    assert chosen["optim"] == {"lr": float(best["group"].split("lr")[-1])}
    assert "val_fraction" not in chosen["data"] and "eval_on" not in chosen["data"]
    cfg = build_config(out / "chosen.yaml")
    base = build_config("configs/quickstart_cifar.yaml")
    assert cfg["optim"]["lr"] == chosen["optim"]["lr"] and cfg["data"]["per_class"] == 3
    assert cfg["data"]["val_fraction"] == 0.0 and cfg["model"] == base["model"]
    assert cfg["method"] == base["method"] and cfg["train"]["epochs"] == 1


def test_tune_rejects_test_set_overrides(tmp_path, capsys):
    rc = main(["tune", "--config", "configs/quickstart.yaml", "--out-root", str(tmp_path),
               "--grid", "optim.lr=[0.1]", "data.eval_on=test"])
    assert rc == 2
    assert "data.eval_on" in capsys.readouterr().err


def test_behind_best_pairs_seeds_and_flags_what_noise_cannot_separate():
    from lsskd.commands.tune import behind_best

    best = {"group": "a", "val_top1": [64.5, 66.0]}
    tied = {"group": "b", "val_top1": [63.5, 67.0]}  # -1, +1 by seed: level on average
    worse = {"group": "c", "val_top1": [55.0, 57.0]}  # 9.5 behind, 0.5 apart
    one = [{"group": "x", "val_top1": [70.0]}, {"group": "y", "val_top1": [69.0]}]
    assert behind_best([best, tied, worse], best) == ["b"]
    assert tied["behind_best"] == {"mean": 0.0, "se": 1.0}  # deficits +1, -1: std sqrt(2) / sqrt(2)
    assert worse["behind_best"] == {"mean": 9.25, "se": 0.25}  # deficits 9.5, 9.0
    assert behind_best(one, one[0]) == ["y"] and one[1]["behind_best"] == {"mean": 1.0, "se": None}
