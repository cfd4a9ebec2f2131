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
