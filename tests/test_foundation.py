"""Config parsing, schedules, the training loop and the CLI on real images."""
import json

import pytest
import torch

from lsskd.cli import main
from lsskd.config import build_config
from lsskd.errors import ConfigError
from lsskd.engine.trainer import Trainer, lr_at


def test_defaults_are_the_papers_recipe():
    cfg = build_config()
    o = cfg["optim"]
    assert (o["lr"], o["momentum"], o["weight_decay"], o["milestones"], o["lr_decay"]) == (0.05, 0.9, 5e-4, [150, 210], 0.1)
    assert cfg["train"]["epochs"] == 240 and cfg["train"]["batch_size"] == 64


def test_overrides_types_and_unknown_keys(tmp_path):
    cfg = build_config(None, ["train.epochs=3", "optim.lr=0.1", "seed=4", "data.root=/x", "optim.milestones=[1, 2]"])
    assert cfg["train"]["epochs"] == 3 and cfg["optim"]["lr"] == 0.1 and cfg["seed"] == 4
    assert cfg["optim"]["milestones"] == [1, 2]
    with pytest.raises(ConfigError, match="'train.epoch'"):
        build_config(None, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="'train.epochs' must be an integer"):
        build_config(None, ["train.epochs=three"])
    with pytest.raises(ConfigError, match="'train.progress' must be true/false"):
        build_config(None, ["train.progress=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {nam: resnet8}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'model.nam'"):
        build_config(bad)
    base = tmp_path / "base.yaml"
    base.write_text("train: {epochs: 7, batch_size: 32}\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\ntrain: {epochs: 9}\n")
    cfg = build_config(child)
    assert cfg["train"]["epochs"] == 9 and cfg["train"]["batch_size"] == 32


def test_lr_schedules():
    o = build_config()["optim"]
    assert lr_at(o, 240, 149, 0, 10) == pytest.approx(0.05)
    assert lr_at(o, 240, 150, 0, 10) == pytest.approx(0.005)
    assert lr_at(o, 240, 239, 5, 10) == pytest.approx(0.0005)
    o = dict(o, schedule="cosine")
    assert lr_at(o, 10, 0, 0, 10) == pytest.approx(0.05)
    assert lr_at(o, 10, 5, 0, 10) == pytest.approx(0.025)


def _small_cfg(tmp_path, method="ce", **extra):
    over = [f"method.name={method}", "model.name=resnet8", f"out_dir={tmp_path / 'run'}",
            "train.epochs=2", "train.max_steps_per_epoch=6", "train.batch_size=32", "train.progress=false",
            "optim.schedule=cosine", "train.tensorboard=false"] + [f"{k}={v}" for k, v in extra.items()]
    return build_config(None, over)


def test_trainer_end_to_end_real_images(tmp_path, cifar_bundle):
    import dataclasses

    from lsskd.data.base import ArrayDataset

    # 1,000 of the 10,000 test images: scoring the head and three branches on all of them
    # twice was most of this test's time. The ceiling (four views) at the last epoch only.
    t = cifar_bundle.test
    bundle = dataclasses.replace(cifar_bundle, test=ArrayDataset(t.x[::10], t.y[::10], t.classes, "test"))
    cfg = _small_cfg(tmp_path, "lsskd", **{"method.eval_aggregate": "last"})
    summary = Trainer(cfg, bundle=bundle).fit()
    run = tmp_path / "run"
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss_final", "train_loss_hier", "train_loss_kl", "train_loss_feat", "test_top1",
                "test_top5", "test_branch1_top1", "test_branch3_top1", "test_agg3_top1", "test_ensemble_top1"):
        assert key in rows[-1]
    assert "test_agg3_top1" not in rows[0]
    assert summary["agg_top1"][-1] == rows[-1]["test_agg3_top1"]
    assert summary["test_top1"] == rows[-1]["test_top1"]
    assert summary["test_top1_best"] == max(r["test_top1"] for r in rows)
    assert summary["params_deployed"] == 83892 and summary["params_train"] > summary["params_deployed"]
    assert len(summary["branch_top1"]) == 3
    assert summary["macs_train"] > 8 * summary["macs_deployed"]
    for f in ("config.yaml", "summary.json", "last.pt", "best.pt"):
        assert (run / f).is_file()
    # A second run into the same directory must refuse rather than overwrite.
    from lsskd.errors import RunDirError

    with pytest.raises(RunDirError, match="already holds a run"):
        Trainer(cfg, bundle=bundle)


def test_same_seed_same_result(tmp_path, cifar_bundle):
    import dataclasses

    from lsskd.data.base import ArrayDataset

    t = cifar_bundle.test  # 2,000 test images: scoring all 10,000 twice was most of the time
    bundle = dataclasses.replace(cifar_bundle, test=ArrayDataset(t.x[::5], t.y[::5], t.classes, "test"))
    cfg = _small_cfg(tmp_path / "a", "pskd", **{"train.epochs": 1})
    a = Trainer(cfg, bundle=bundle).fit()
    cfg = _small_cfg(tmp_path / "b", "pskd", **{"train.epochs": 1})
    b = Trainer(cfg, bundle=bundle).fit()
    assert a["test_top1"] == b["test_top1"] and a["test_top5"] == b["test_top5"]


def test_cli_train_resume_eval(tmp_path, cifar_root, capsys):
    run = tmp_path / "cli"
    args = ["train", "model.name=resnet8", f"data.root={cifar_root}", f"out_dir={run}", "train.epochs=1",
            "train.max_steps_per_epoch=4", "train.progress=false", "train.tensorboard=false",
            "data.classes=10"]  # 2,000 images to decode per command instead of 20,000
    assert main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["method"] == "ce"
    # Extending a finished run is not allowed through overrides; resume of a finished run is a no-op fit.
    assert main(["train", "--resume", str(run)]) == 0
    assert main(["eval", "--checkpoint", str(run / "last.pt")]) == 0
    out = capsys.readouterr().out
    res = json.loads(out[out.rindex("{\n  \"checkpoint\""):])
    assert res["test_top1"] == pytest.approx(summary["test_top1"])


def test_cli_errors_name_the_fault(tmp_path, capsys):
    assert main(["train", "train.epoch=1"]) == 2
    assert "train.epoch" in capsys.readouterr().err
    assert main(["train", f"data.root={tmp_path / 'nope'}", f"out_dir={tmp_path / 'r'}"]) == 2
    assert "nope" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "train" / "cat").mkdir(parents=True)
    assert main(["train", f"data.root={empty}", f"out_dir={tmp_path / 'r2'}"]) == 2
    err = capsys.readouterr().err
    assert "cat" in err and "no image files" in err
    assert not (tmp_path / "r2" / "config.yaml").exists()


def test_stage_adapter_wraps_a_user_model():
    from torch import nn

    from lsskd.models import StagedAdapter

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.block1 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
            self.block2 = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            return self.fc(self.block2(self.block1(self.conv(x))).mean((2, 3)))

    net = Net()
    staged = StagedAdapter(net, stem="conv", stages=["block1", "block2"], classifier="fc")
    assert staged.stage_channels == [16, 16] and staged.stage_strides == [2, 2]
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(staged(x), net(x), atol=1e-6)
    from lsskd.registry import METHODS

    m = METHODS.build("lsskd", staged, {}, num_train=4)
    m.train()
    z, losses = m(x, torch.tensor([0, 4]), torch.tensor([0, 1]))
    assert z.shape == (2, 5) and torch.isfinite(sum(losses.values()))


PLUGIN = """
import torch.nn.functional as F
from torch import nn

from lsskd.methods.base import register_method
from lsskd.methods.ce import CrossEntropy
from lsskd.models import StagedAdapter
from lsskd.registry import MODELS


class TinyNet(nn.Module):
    def __init__(self, num_classes, width):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.block1 = nn.Sequential(nn.Conv2d(width, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(width, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.block2(self.block1(self.conv(x))).mean((2, 3)))


@MODELS.register("plugin_tinynet")
def plugin_tinynet(num_classes=10, width=8):
    return StagedAdapter(TinyNet(num_classes, width), stem="conv", stages=["block1", "block2"],
                         classifier="fc", probe_shape=(3, 16, 16))


@register_method("plugin_scaled_ce")
class ScaledCE(CrossEntropy):
    defaults = {"scale": 1.0}

    def train_forward(self, x, y, idx, mix):
        logits = self.backbone(x)
        return logits, {"ce": self.cfg["scale"] * F.cross_entropy(logits.float(), y)}
"""


def test_plugins_bring_a_users_model_and_method_to_the_cli(tmp_path, capsys):
    """plugins=[file.py] registers the user's model and method for `lsskd train`; the run's
    stored config is enough for `lsskd eval` in a fresh interpreter to rebuild it."""
    import subprocess
    import sys

    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(PLUGIN)
    run = tmp_path / "run"
    common = ["data.name=digits", "data.image_size=16", "train.epochs=1", "train.max_steps_per_epoch=4",
              "train.progress=false", "train.tensorboard=false"]
    args = ["train", f"plugins=[{plugin}]", "model.name=plugin_tinynet", "model.kwargs={width: 12}",
            "method.name=plugin_scaled_ce", "method.scale=0.5", f"out_dir={run}", *common]
    assert main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "plugin_tinynet" and summary["method"] == "plugin_scaled_ce"
    assert "my_plugin.py" in (run / "config.yaml").read_text()
    assert main(["train", "--resume", str(run)]) == 0  # the same file again: nothing registered twice
    capsys.readouterr()
    done = subprocess.run([sys.executable, "-m", "lsskd", "eval", "--checkpoint", str(run / "last.pt")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    res = json.loads(done.stdout[done.stdout.rindex('{\n  "checkpoint"'):])
    assert res["test_top1"] == pytest.approx(summary["test_top1"])

    assert main(["train", "plugins=[no_such_module_xyz]", f"out_dir={tmp_path / 'r2'}", *common]) == 2
    assert "cannot import 'no_such_module_xyz'" in capsys.readouterr().err
    assert main(["train", f"plugins=[{tmp_path / 'missing.py'}]", f"out_dir={tmp_path / 'r3'}", *common]) == 2
    assert "missing.py: no such file" in capsys.readouterr().err
    assert main(["train", "plugins=a_string", f"out_dir={tmp_path / 'r4'}", *common]) == 2
    assert "'plugins' must be a list" in capsys.readouterr().err
    assert main(["train", "model.name=not_a_model", f"out_dir={tmp_path / 'r5'}", *common]) == 2
    assert "plugins=[...]" in capsys.readouterr().err


def test_gap_gate_reads_the_held_out_split_every_epoch(tmp_path):
    """gate=gap: the trainer scores the held-out split after every epoch (never the test
    set) and the next epoch's gate follows g_fit * clip((f - v - gap_floor) / gap_width)."""
    cfg = _small_cfg(tmp_path, "lsskd_robust", **{
        "data.name": "digits", "data.image_size": 16, "data.val_fraction": 0.2, "data.augment.flip": "false",
        "train.epochs": 3, "train.max_steps_per_epoch": 10, "method.gate_floor": 0.0,
        "method.gap_floor": -0.5, "method.gap_width": 1.0})
    tr = Trainer(cfg)
    assert tr.method.gate_mode == "gap" and len(tr.bundle.val) == 287
    tr.fit()
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["method_gate"] == 0.0 and all("val_top1" in r and "test_top1" in r for r in rows)
    for prev, row in zip(rows, rows[1:]):
        f, v = prev["train_top1"] / 100, prev["val_top1"] / 100
        assert row["method_gate"] == pytest.approx(f * min(1.0, max(0.0, f - v + 0.5)), abs=1e-6)
    assert float(tr.method.gating.val_acc) == pytest.approx(rows[-1]["val_top1"] / 100)
    assert rows[-1]["method_gate"] > 0


def test_a_method_that_wants_the_held_out_split_needs_one(tmp_path):
    """A third-party method with ``wants_val`` and no ``data.val_fraction`` is refused up front,
    naming the method and the key, instead of failing after the first epoch."""
    from lsskd.methods.ce import CrossEntropy
    from lsskd.registry import METHODS

    if "test_val_reader" not in METHODS:
        METHODS.register("test_val_reader")(type("ValReader", (CrossEntropy,), {"wants_val": True}))
    small = {"data.name": "digits", "data.image_size": 16}
    with pytest.raises(ConfigError, match=r"'test_val_reader'.*data\.val_fraction"):
        Trainer(_small_cfg(tmp_path, "test_val_reader", **small))
    tr = Trainer(_small_cfg(tmp_path, "test_val_reader", **small, **{"data.val_fraction": 0.2}))
    assert tr.method.wants_val and len(tr.bundle.val) == 287


def test_closed_lsskd_gate_trains_the_backbone_exactly_like_ce(tmp_path, cifar_bundle, capsys):
    """gate=fit below its floor + bn_views=split: the deployed backbone is CE's (issue 9)."""
    import dataclasses

    from lsskd.data.base import ArrayDataset

    # The view-aggregated ceiling is off (an execution key: the weights do not depend on it);
    # scoring it every epoch was most of this test's time.
    t = cifar_bundle.test
    cifar_bundle = dataclasses.replace(cifar_bundle, test=ArrayDataset(t.x[:512], t.y[:512], t.classes, "test"))
    ce = Trainer(_small_cfg(tmp_path / "ce", "ce"), bundle=cifar_bundle)
    a = ce.fit()
    gated = Trainer(_small_cfg(tmp_path / "gated", "lsskd", **{
        "method.gate": "fit", "method.gate_floor": 0.99, "method.bn_views": "split",
        "method.views_per_step": 2, "method.eval_aggregate": "off"}), bundle=cifar_bundle)
    b = gated.fit()
    err = capsys.readouterr().err  # a note for the user: stderr, with the resolved floor
    assert b["gate_max"] == 0.0 and "gate never opened" in err and "gate_floor=0.99" in err
    assert b["test_top1"] == pytest.approx(a["test_top1"], abs=0.02)
    sa, sb = ce.method.backbone.state_dict(), gated.method.backbone.state_dict()

    def max_diff(a, b):
        return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)

    closed = max_diff(sa, sb)
    assert closed < 1e-4
    # branches_when_shut=skip: the same backbone, bit for bit, at CE's arithmetic per step.
    skipped = Trainer(_small_cfg(tmp_path / "skip", "lsskd", **{
        "method.gate": "fit", "method.gate_floor": 0.99, "method.bn_views": "split",
        "method.views_per_step": 2, "method.eval_aggregate": "off", "method.branches_when_shut": "skip"}), bundle=cifar_bundle)
    skipped.fit()
    assert max_diff(sa, skipped.method.backbone.state_dict()) == 0.0
    # An open gate (floor 0) changes the backbone's training.
    opened = Trainer(_small_cfg(tmp_path / "open", "lsskd", **{
        "method.gate": "fit", "method.gate_floor": 0.0, "method.bn_views": "split",
        "method.views_per_step": 2, "method.eval_aggregate": "off"}), bundle=cifar_bundle)
    c = opened.fit()
    rows = [json.loads(l) for l in (tmp_path / "open" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["method_gate"] == 0.0 and rows[1]["method_gate"] == pytest.approx(rows[0]["train_top1"] / 100)
    assert c["gate_max"] > 0
    sc = opened.method.backbone.state_dict()
    # g is small here (epoch 1's training top-1), but the effect is far above rounding.
    assert max_diff(sa, sc) > max(100 * closed, 1e-5)
