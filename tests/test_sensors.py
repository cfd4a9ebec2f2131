"""Issue 7: wearable sensor time series (1D backbones, signal view families, HAPT / UCI HAR)."""
import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import HAPT_NPZ, ROOT, need
from lsskd.config import DEFAULTS, build_config
from lsskd.data import BatchAugment, build_data
from lsskd.errors import ConfigError, DataError
from lsskd.data.sensors import TEST_SUBJECTS
from lsskd.methods.lsskd import LSSKD
from lsskd.methods.transforms import AxisPermutations, TimeFlips, ViewFamily, build_views
from lsskd.models import build_model
from lsskd.registry import DATASETS


# --- models ---------------------------------------------------------------------
@pytest.mark.parametrize("name,chans,strides", [("resnet1d", [32, 64, 128], [1, 2, 2]),
                                                ("tinycnn1d", [16, 32, 64], [2, 2, 2])])
def test_1d_backbones_follow_stage_contract(name, chans, strides):
    torch.manual_seed(0)
    m = build_model(name, 6, in_channels=6).eval()
    assert m.stage_channels == chans and m.stage_strides == strides
    assert m.probe_shape == (6, 128) and m.feature_dim == chans[-1]
    x = torch.randn(3, 6, 128)
    feats, h, logits = m.forward_features(x)
    lengths = [128 // int(np.prod(strides[: i + 1])) for i in range(3)]
    assert [tuple(f.shape) for f in feats] == [(3, c, t) for c, t in zip(chans, lengths)]
    assert h.shape == (3, chans[-1]) and logits.shape == (3, 6)
    assert torch.allclose(m(x), logits)
    # Branch trunks end at the last stage's width; the deepest uses the stride-1 extra block.
    for level in range(3):
        out = m.branch_trunk(level).eval()(feats[level])
        assert out.shape == (3, chans[-1], lengths[-1])
    extra = m.extra_block().eval()
    assert extra(feats[-1]).shape == feats[-1].shape
    # Other channel counts and window lengths (global pooling) work too.
    m3 = build_model(name, 4, in_channels=3)
    assert m3(torch.randn(2, 3, 100)).shape == (2, 4)


def test_tinycnn1d_is_microcontroller_sized():
    m = build_model("tinycnn1d", 6)
    n = sum(p.numel() for p in m.parameters())
    # conv weights 6*16*5 + 16*32*5 + 32*64*5, BN 2*(16+32+64), linear 64*6+6
    assert n == 480 + 2560 + 10240 + 224 + 390 == 13894
    assert n < 30000


def test_model_kwargs_from_config():
    cfg = build_config(ROOT / "configs/hapt/base.yaml", ["model.kwargs={in_channels: 3}"])
    m = build_model(cfg["model"]["name"], 6, **cfg["model"]["kwargs"])
    assert m.probe_shape == (3, 128)
    with pytest.raises(ConfigError, match="model.kwargs.widths"):
        build_model("resnet1d", 6, widths=[32, 0, 64])


def test_lsskd_on_signals_builds_time_flip_branches():
    torch.manual_seed(0)
    m = build_model("tinycnn1d", 6)
    method = LSSKD(m, {"name": "lsskd"}, num_train=8, modality="signal")
    assert isinstance(method.views, TimeFlips) and method.num_views == 4
    assert [br.head.out_features for br in method.aux] == [24, 24, 24]
    method.train()
    x, y = torch.randn(8, 6, 128), torch.arange(8) % 6
    logits, losses = method(x, y, torch.arange(8))
    assert logits.shape == (8, 6) and set(losses) == {"final", "hier", "kl", "feat"}
    assert all(torch.isfinite(v) for v in losses.values())
    method.eval()
    outs = method.eval_forward(x)[1]
    assert sorted(outs) == ["agg1", "agg2", "agg3", "branch1", "branch2", "branch3", "ensemble"]
    assert outs["branch1"].shape == outs["agg3"].shape == outs["ensemble"].shape == (8, 6)


# --- view families ------------------------------------------------------------------
def test_time_flip_views_form_klein_group():
    x = torch.arange(2 * 2 * 4, dtype=torch.float32).view(2, 2, 4) + 1
    fam = build_views("time_flip")
    assert fam.num_views == 4 and fam.modality == "signal"
    v = fam(x)
    assert v.shape == (8, 2, 4)
    assert torch.equal(v[0:2], x)
    assert v[2, 0].tolist() == [4.0, 3.0, 2.0, 1.0]  # time reversal of row 0, channel 0
    assert v[4, 1].tolist() == [-5.0, -6.0, -7.0, -8.0]  # sign flip
    assert v[6, 0].tolist() == [-4.0, -3.0, -2.0, -1.0]  # both
    for a in range(4):
        assert torch.equal(TimeFlips.view(TimeFlips.view(x, a), a), x)  # involutions
        for b in range(4):
            assert torch.equal(TimeFlips.view(TimeFlips.view(x, a), b), TimeFlips.view(x, a ^ b))
    # Row k*B + i of the stacked views carries joint label y_i * M + k.
    y = torch.tensor([0, 2])
    assert ViewFamily.joint_labels(y, 4).tolist() == [0, 8, 1, 9, 2, 10, 3, 11]


def test_axis_perm_cycles_axes_within_each_sensor():
    x = torch.arange(6, dtype=torch.float32).view(1, 6, 1).expand(2, 6, 5)
    fam = build_views("axis_perm")
    assert fam.num_views == 3 and isinstance(fam, AxisPermutations)
    v = fam(x)
    assert v.shape == (6, 6, 5)
    assert v[0, :, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert v[2, :, 0].tolist() == [1, 2, 0, 4, 5, 3]
    assert v[4, :, 0].tolist() == [2, 0, 1, 5, 3, 4]
    once = AxisPermutations.view(x, 1)
    assert torch.equal(AxisPermutations.view(AxisPermutations.view(once, 1), 1), x)  # Z3
    assert torch.equal(AxisPermutations.view(once, 2), x)
    with pytest.raises(ConfigError, match="5 channels"):
        fam(torch.zeros(1, 5, 4))


# --- augmentation ---------------------------------------------------------------------
def test_signal_augment_ignores_image_ops_and_jitters():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, 128, generator=g) * 2 + 1
    mean, std = [1.0] * 6, [2.0] * 6
    plain = BatchAugment(mean, std, "signal", crop_padding=4, flip=True)
    out, mix = plain(x, torch.Generator().manual_seed(1), train=True)
    assert mix is None and torch.allclose(out, (x - 1) / 2)
    noisy = BatchAugment(mean, std, "signal", jitter=0.1)
    out2, _ = noisy(x, torch.Generator().manual_seed(1), train=True)
    assert abs(float((out2 - out).std()) - 0.1) < 0.003
    scaled = BatchAugment(mean, std, "signal", scaling=0.2)
    out3, _ = scaled(x, torch.Generator().manual_seed(1), train=True)
    ratio = out3 / out
    # one factor per (sample, channel), constant over time
    assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), atol=1e-4)
    assert 0.1 < float(ratio[..., 0].std()) < 0.3


# --- HAPT ------------------------------------------------------------------------------
def _hapt_cfg(**kw):
    cfg = copy.deepcopy(DEFAULTS["data"])
    cfg.update(name="hapt", root=str(need(HAPT_NPZ).parent), **kw)
    return cfg


@pytest.fixture(scope="module")
def hapt_raw():
    with np.load(need(HAPT_NPZ)) as f:
        return {k: f[k] for k in ("x", "y", "subject")}


@pytest.fixture(scope="module")
def hapt_bundle():
    return build_data(_hapt_cfg())


def test_hapt_standard_subject_split_basic_activities(hapt_bundle, hapt_raw):
    b = hapt_bundle
    assert b.modality == "signal"
    assert len(b.classes) == 6 and b.classes[0] == "walking" and b.classes[5] == "laying"
    assert b.train.x.dtype == torch.float32 and b.train.x.shape[1:] == (6, 128)
    subj = hapt_raw["subject"]
    tr_subj = set(subj[b.train.source_index.numpy()].tolist())
    te_subj = set(subj[b.test.source_index.numpy()].tolist())
    assert te_subj == set(TEST_SUBJECTS) == {2, 4, 9, 10, 12, 13, 18, 20, 24}
    assert tr_subj == set(range(1, 31)) - te_subj
    assert b.info["train_subjects"] == sorted(tr_subj)
    # every basic-activity window is used exactly once, with its label and samples
    basic = np.flatnonzero(hapt_raw["y"] < 6)
    used = np.sort(np.concatenate([b.train.source_index.numpy(), b.test.source_index.numpy()]))
    assert np.array_equal(used, basic)
    assert torch.equal(b.train.y, torch.from_numpy(hapt_raw["y"][b.train.source_index.numpy()]))
    i = int(b.test.source_index[17])
    assert torch.equal(b.test.x[17], torch.from_numpy(hapt_raw["x"][i].T))
    assert sorted(torch.unique(b.train.y).tolist()) == sorted(torch.unique(b.test.y).tolist()) == list(range(6))


def test_hapt_normalisation_fitted_on_training_subjects_only(hapt_bundle, hapt_raw):
    b = hapt_bundle
    assert len(b.mean) == len(b.std) == 6
    raw_train = hapt_raw["x"][b.train.source_index.numpy()].astype(np.float64)
    np.testing.assert_allclose(b.mean, raw_train.mean((0, 1)), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b.std, raw_train.std((0, 1), ddof=1), rtol=1e-6)
    aug = BatchAugment(b.mean, b.std, "signal")
    z, _ = aug(b.train.x, None, train=False)
    assert torch.allclose(z.mean((0, 2)), torch.zeros(6), atol=1e-4)
    assert torch.allclose(z.std((0, 2)), torch.ones(6), atol=1e-4)
    zt, _ = aug(b.test.x, None, train=False)
    # test subjects differ: their statistics were not used
    assert float((zt.mean((0, 2))).abs().max()) > 0.01


def test_hapt_group_split_holds_out_whole_subjects(hapt_bundle, hapt_raw):
    b = build_data(_hapt_cfg(val_fraction=0.1, val_split="group"))
    subj = hapt_raw["subject"]
    tr = set(subj[b.train.source_index.numpy()].tolist())
    va = set(subj[b.val.source_index.numpy()].tolist())
    # 21 training subjects, round(0.1 * 21) = 2 held out whole; none straddles the split
    assert len(va) == 2 and not tr & va and tr | va == set(b.info["train_subjects"])
    assert torch.equal(b.val.groups, torch.from_numpy(subj[b.val.source_index.numpy()]))
    assert len(b.train) + len(b.val) == len(hapt_bundle.train)
    assert sorted(torch.unique(b.val.y).tolist()) == list(range(6))  # each subject does every activity
    # reproducible, moves with subset_seed, and the test subjects are untouched
    again = build_data(_hapt_cfg(val_fraction=0.1, val_split="group"))
    assert torch.equal(again.val.source_index, b.val.source_index)
    other = build_data(_hapt_cfg(val_fraction=0.1, val_split="group", subset_seed=1))
    assert set(subj[other.val.source_index.numpy()].tolist()) != va
    assert torch.equal(b.test.source_index, hapt_bundle.test.source_index)
    # the by-window split puts windows of every training subject on both sides
    strat = build_data(_hapt_cfg(val_fraction=0.1))
    assert set(subj[strat.val.source_index.numpy()].tolist()) == set(b.info["train_subjects"])
    # a class subset keeps the groups aligned with the samples
    sub = build_data(_hapt_cfg(val_fraction=0.5, val_split="group", classes=["walking", "laying"]))
    assert torch.equal(sub.val.groups, torch.from_numpy(subj[sub.val.source_index.numpy()]))
    assert len(set(sub.val.groups.tolist())) == 10 and sub.classes == ["walking", "laying"]


def test_train_subjects_is_refused_by_a_dataset_without_subjects():
    """data.train_subjects on an image dataset names the key and the dataset instead of
    training on all the data unannounced."""
    with pytest.raises(DataError, match=r"data.train_subjects=\[1, 3\]: dataset 'digits' has no subjects"):
        build_data(dict(copy.deepcopy(DEFAULTS["data"]), name="digits", train_subjects=[1, 3]))


def test_group_split_errors():
    from lsskd.data.base import group_split

    with pytest.raises(DataError, match="data.val_split must be 'stratified' or 'group', got 'subject'"):
        build_data(_hapt_cfg(val_fraction=0.1, val_split="subject"))
    with pytest.raises(DataError, match="dataset 'digits' has no groups"):
        build_data(dict(copy.deepcopy(DEFAULTS["data"]), name="digits", val_fraction=0.1, val_split="group"))
    with pytest.raises(DataError, match="at least 2 groups"):
        group_split(torch.zeros(5, dtype=torch.long), 0.5)
    # never every group: one is always left to train on
    tr, va = group_split(torch.tensor([0, 0, 1, 1]), 0.9)
    assert tr.tolist() and va.tolist() and sorted(tr.tolist() + va.tolist()) == [0, 1, 2, 3]


def test_hapt_train_subjects_keeps_only_those_people(hapt_bundle, hapt_raw):
    b = build_data(_hapt_cfg(train_subjects=[5, 1, 3]))
    subj = hapt_raw["subject"]
    assert set(subj[b.train.source_index.numpy()].tolist()) == {1, 3, 5}
    assert b.info["train_subjects"] == [1, 3, 5]
    # 336 + 329 + 290 basic-activity windows of subjects 1, 3 and 5; the test set is untouched
    assert len(b.train) == 955
    assert torch.equal(b.test.source_index, hapt_bundle.test.source_index)
    # normalisation is fitted on the kept subjects only
    assert not np.allclose(b.mean, hapt_bundle.mean)
    with pytest.raises(DataError, match=r"data.train_subjects \[2\] are test subjects"):
        build_data(_hapt_cfg(train_subjects=[1, 2]))
    with pytest.raises(DataError, match=r"data.train_subjects \[31\] are not training subjects"):
        build_data(_hapt_cfg(train_subjects=[31]))
    with pytest.raises(DataError, match="list of subject ids"):
        build_data(_hapt_cfg(train_subjects=["one"]))


def test_hapt_all_activities_and_bad_values(tmp_path):
    b = DATASETS.build("hapt", _hapt_cfg(activities="all"))
    assert len(b.classes) == 12 and len(b.train) + len(b.test) == 10361
    assert int(b.train.y.max()) == 11
    with pytest.raises(ConfigError, match="data.activities"):
        DATASETS.build("hapt", _hapt_cfg(activities="transitions"))
    x = np.zeros((4, 8, 6), np.float32)
    x[1, 2, 3] = np.nan
    x[2, 0, 0] = np.inf
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=x, y=np.zeros(4, np.int64), subject=np.array([1, 2, 3, 4]))
    with pytest.raises(DataError, match=r"bad\.npz: 2 non-finite"):
        DATASETS.build("hapt", {"name": "hapt", "root": str(bad)})
    np.savez(tmp_path / "nokey.npz", x=x, y=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="missing array 'subject'"):
        DATASETS.build("hapt", {"name": "hapt", "root": str(tmp_path / "nokey.npz")})
    with pytest.raises(DataError, match="not found"):
        DATASETS.build("hapt", {"name": "hapt", "root": str(tmp_path / "nowhere")})


# --- UCI HAR (official layout, tiny synthetic copy) ---------------------------------------
SIGNALS = ["total_acc_x", "total_acc_y", "total_acc_z", "body_gyro_x", "body_gyro_y", "body_gyro_z"]


def _write_uci_har(root, subjects, T=8):
    """Windows w of split s: value(c, t) = 100*w + 10*c + t/8 (+1000 for test)."""
    base = root / "UCI HAR Dataset"
    base.mkdir(parents=True)
    names = ["WALKING", "WALKING_UPSTAIRS", "WALKING_DOWNSTAIRS", "SITTING", "STANDING", "LAYING"]
    (base / "activity_labels.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(names)))
    for split, subj in subjects.items():
        d = base / split / "Inertial Signals"
        d.mkdir(parents=True)
        off = 1000 if split == "test" else 0
        n = len(subj)
        for c, s in enumerate(SIGNALS):
            rows = [" ".join(f"{off + 100 * w + 10 * c + t / 8:.6e}" for t in range(T)) for w in range(n)]
            (d / f"{s}_{split}.txt").write_text("\n".join("  " + r for r in rows) + "\n")
        (base / split / f"y_{split}.txt").write_text("".join(f"{(w % 6) + 1}\n" for w in range(n)))
        (base / split / f"subject_{split}.txt").write_text("".join(f"{s}\n" for s in subj))
    return base


def test_uci_har_official_layout(tmp_path):
    base = _write_uci_har(tmp_path, {"train": [1, 1, 3, 5, 5, 6, 7], "test": [2, 4, 4]})
    cfg = {"name": "uci_har", "root": str(tmp_path)}
    b = DATASETS.build("uci_har", cfg)
    assert b.modality == "signal" and b.classes[:2] == ["walking", "walking_upstairs"] and len(b.classes) == 6
    assert b.train.x.shape == (7, 6, 8) and b.test.x.shape == (3, 6, 8) and b.train.x.dtype == torch.float32
    assert b.train.y.tolist() == [0, 1, 2, 3, 4, 5, 0] and b.test.y.tolist() == [0, 1, 2]
    assert b.train.x[3, 4].tolist() == pytest.approx([300 + 40 + t / 8 for t in range(8)])
    assert b.test.x[2, 5, 7].item() == pytest.approx(1000 + 200 + 50 + 7 / 8)
    assert b.info["train_subjects"] == [1, 3, 5, 6, 7] and b.info["test_subjects"] == [2, 4]
    # statistics of the training windows only (channel c: mean 100*mean(w) + 10c + mean(t)/8)
    w_mean, t_mean = np.mean(range(7)), np.mean(range(8)) / 8
    assert b.mean == pytest.approx([100 * w_mean + 10 * c + t_mean for c in range(6)], rel=1e-6)
    assert DATASETS.build("uci_har", {"name": "uci_har", "root": str(base)}).train.x.shape == (7, 6, 8)

    p = base / "test" / "Inertial Signals" / "body_gyro_y_test.txt"
    lines = p.read_text().splitlines()
    p.write_text("\n".join([" ".join(["nan"] + lines[0].split()[1:])] + lines[1:]) + "\n")
    with pytest.raises(DataError, match=r"body_gyro_y_test\.txt: 1 non-finite"):
        DATASETS.build("uci_har", cfg)
    p.write_text("\n".join(lines[:1] + [lines[1] + " 1.0"] + lines[2:]) + "\n")
    with pytest.raises(DataError, match=r"body_gyro_y_test\.txt: line 2 has 9 values"):
        DATASETS.build("uci_har", cfg)


def test_uci_har_rejects_nonstandard_split_and_missing_files(tmp_path):
    _write_uci_har(tmp_path / "a", {"train": [1, 2, 3], "test": [4, 9]})
    with pytest.raises(DataError, match="not the standard test subjects"):
        DATASETS.build("uci_har", {"name": "uci_har", "root": str(tmp_path / "a")})
    base = _write_uci_har(tmp_path / "b", {"train": [1, 3], "test": [2]})
    (base / "train" / "y_train.txt").unlink()
    with pytest.raises(DataError, match="missing file .*y_train.txt"):
        DATASETS.build("uci_har", {"name": "uci_har", "root": str(tmp_path / "b")})


# --- configs and end to end ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ce", "pskd", "sad_ce", "lsskd"])
def test_hapt_configs(method):
    cfg = build_config(ROOT / f"configs/hapt/{method}.yaml")
    assert cfg["method"]["name"] == method and cfg["data"]["name"] == "hapt"
    assert cfg["data"]["activities"] == "basic" and cfg["data"]["root"] == "../shared/data/hapt"
    assert cfg["train"]["batch_size"] == 64 and cfg["optim"]["schedule"] == "cosine"
    assert cfg["model"]["name"] in ("tinycnn1d", "resnet1d")


def test_lsskd_trains_on_hapt_end_to_end(hapt_bundle, tmp_path):
    from lsskd.engine.trainer import Trainer

    b = hapt_bundle
    small = dataclasses.replace(b, test=b.test.subset(torch.arange(0, len(b.test), 10)))
    cfg = build_config(ROOT / "configs/hapt/lsskd.yaml",
                       [f"out_dir={tmp_path / 'run'}", "train.epochs=1", "train.max_steps_per_epoch=3",
                        "train.tensorboard=false", "train.batch_size=32"])
    summary = Trainer(cfg, bundle=small).fit()
    for key in ("test_top1", "test_top1_best", "best_epoch", "params_deployed", "macs_train", "branch_top1"):
        assert key in summary
    assert summary["method"] == "lsskd" and summary["dataset"] == "hapt" and summary["train_size"] == len(b.train)
    assert len(summary["branch_top1"]) == 3 and all(0 <= v <= 100 for v in summary["branch_top1"])
    assert summary["params_deployed"] == 13894 and summary["macs_train"] > 4 * summary["macs_deployed"]
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["epoch"] == 1 and row["train_n"] == 3 * 32 and np.isfinite(row["train_loss"])
