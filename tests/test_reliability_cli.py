"""Reliability at the command line (issue 8): SIGKILL + ``--resume``, bad data,
existing run directories, malformed configs and overrides, unsafe checkpoints,
out of memory. ``lsskd.cli.main`` runs in-process except for the kill test."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_lsskd
from lsskd.config import DEFAULTS, build_config
from lsskd.data.base import ArrayDataset, DataBundle
from lsskd.engine.checkpoint import load_checkpoint
from lsskd.engine.trainer import Trainer
from lsskd.methods.ce import CrossEntropy
from lsskd.registry import DATASETS

N_CLASSES, N_TRAIN, N_TEST = 4, 16, 4


@pytest.fixture(scope="module")
def folder(cifar_root, tmp_path_factory):
    """A 4-class folder dataset of real CIFAR-100 PNGs (16 train / 4 test per class)."""
    root = tmp_path_factory.mktemp("folder")
    classes = sorted(d.name for d in (cifar_root / "train").iterdir())[:N_CLASSES]
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for f in sorted((cifar_root / split / c).iterdir())[:n]:
                shutil.copy(f, root / split / c / f.name)
    return root


def train_args(root, out, *extra):
    return [f"data.root={root}", "data.cache_dir=none", f"out_dir={out}", "model.name=resnet8",
            "train.batch_size=8", "train.eval_batch_size=64", "train.progress=false",
            "train.tensorboard=false", "train.device=cpu", "train.threads=1", "optim.lr=0.1",
            "optim.schedule=cosine", *extra]


def run_cli(argv, capsys):
    """(exit status, stderr) of ``lsskd ARGV``; argparse exits count as statuses."""
    rc, _, err = run_lsskd(argv, capsys)
    return rc, err


def assert_one_line_error(rc, err, *needles, code=2):
    assert rc == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lsskd "), err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])


# --- SIGKILL mid-run, then --resume ------------------------------------------------

@pytest.mark.slow  # two `python -m lsskd` processes (torch import each)
def test_sigkill_then_resume_matches_uninterrupted_run(folder, tmp_path):
    run = tmp_path / "run"
    args = train_args(folder, run, "train.epochs=3", "train.ckpt_every_steps=2")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "lsskd", "train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        # the sidecar is written last: the first checkpoint is complete
        while not (run / "last.pt.sha256").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists()  # really killed before the end

    res = subprocess.run([sys.executable, "-m", "lsskd", "train", "--resume", str(run)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads((run / "summary.json").read_text())

    threads = torch.get_num_threads()
    try:
        want = Trainer(build_config(None, train_args(folder, tmp_path / "ref", "train.epochs=3",
                                                     "train.ckpt_every_steps=2"))).fit()
    finally:
        torch.set_num_threads(threads)
    for key in ("test_top1", "test_top5", "test_top1_best", "best_epoch", "skipped_steps"):
        assert got[key] == want[key], key
    a = load_checkpoint(run / "last.pt")["method"]
    b = load_checkpoint(tmp_path / "ref" / "last.pt")["method"]
    assert [k for k in b if not torch.equal(a[k], b[k])] == []
    assert [json.loads(ln)["epoch"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


# --- bad data ----------------------------------------------------------------------

def _corrupt_image(root):
    bad = sorted((root / "train").iterdir())[1] / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return [], bad


def _empty_class(root):
    (root / "train" / "zz_empty").mkdir()
    return [], root / "train" / "zz_empty"


def _class_mismatch(root):
    first = sorted((root / "test").iterdir())[0]
    first.rename(root / "test" / "renamed_class")
    return [], root / "test"


def _smaller_than_batch(root):
    return ["train.batch_size=128"], "train.batch_size"


def _label_out_of_range(root):
    return ["data.name=test_bad_labels"], f"{root}/train"


@pytest.mark.parametrize("damage", [_corrupt_image, _empty_class, _class_mismatch, _smaller_than_batch,
                                    _label_out_of_range])
def test_bad_data_is_a_one_line_error_and_creates_nothing(folder, tmp_path, capsys, monkeypatch, damage):
    root = tmp_path / "data"
    shutil.copytree(folder, root)

    def bad_labels(cfg):  # a loader whose labels do not fit its class list
        x = torch.zeros(8, 3, 8, 8, dtype=torch.uint8)
        return DataBundle(ArrayDataset(x, torch.arange(8) % 5, ["a", "b", "c", "d"], f"{cfg['root']}/train"),
                          ArrayDataset(x, torch.zeros(8), ["a", "b", "c", "d"], f"{cfg['root']}/test"))

    monkeypatch.setitem(DATASETS._items, "test_bad_labels", bad_labels)
    extra, needle = damage(root)
    out = tmp_path / "out"
    rc, err = run_cli(["train", *train_args(root, out, "train.epochs=1", *extra)], capsys)
    assert_one_line_error(rc, err, "lsskd train: error:", needle)
    assert not out.exists()


def test_existing_run_dir_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("precious\n")
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    # reported before any data is read (data.root does not even exist)
    rc, err = run_cli(["train", *train_args(tmp_path / "missing", out)], capsys)
    assert_one_line_error(rc, err, "already holds a run", str(out), "--resume")
    assert (out / "config.yaml").read_text() == "precious\n"
    assert (out / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
    assert sorted(f.name for f in out.iterdir()) == ["config.yaml", "metrics.jsonl"]


def test_resume_errors_are_one_line(tmp_path, capsys):
    rc, err = run_cli(["train", "--resume", str(tmp_path / "nothing")], capsys)
    assert_one_line_error(rc, err, str(tmp_path / "nothing" / "config.yaml"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train:\n  epochs: 1\n")
    rc, err = run_cli(["train", "--resume", str(run)], capsys)
    assert_one_line_error(rc, err, "cannot resume", str(run / "last.pt"))
    rc, err = run_cli(["train", "--resume", str(run), "train.epochs=3"], capsys)
    assert_one_line_error(rc, err, "overrides are not accepted")


# --- malformed configs and overrides -----------------------------------------------

BAD_YAML = [  # (file text, expected words, whether the file is checked while it is read)
    ("train:\n  epochz: 3\n", "unknown config key 'train.epochz'", True),
    ("train:\n  epochs: ten\n", "'train.epochs' must be an integer", True),
    ("- a\n- b\n", "top level must be a mapping", True),
    ("train: {epochs: [1,\n", "invalid YAML", True),
    ("train: 5\n", "'train' must be a mapping", True),
    ("_base_: self.yaml\n", "loops back", True),
    ("_base_: [1]\n", "_base_ must be a file name", True),
    (b"\xff\xfe\x00\x01 binary", "not UTF-8", True),
    ("data:\n  augment: [1, 2]\n", "'data.augment' must be a mapping", True),
    # checked against the method's / trainer's own rules before any data is read
    ("method:\n  name: lsskd\n  alpha_T: high\n", "'method.alpha_T' must be a number", False),
    ("method:\n  name: ce\n  alpha_T: 0.5\n", "unknown config key 'method.alpha_T'", False),
    ("optim:\n  lr: .inf\n", "'optim.lr' must be a finite number >= 0, got inf", False),
    ("model:\n  kwargs: 5\n", "'model.kwargs' must be a mapping", False),
]


@pytest.mark.parametrize("text,needle,names_file", BAD_YAML, ids=range(len(BAD_YAML)))
def test_malformed_config_file(tmp_path, capsys, text, needle, names_file):
    f = tmp_path / "self.yaml"
    (f.write_bytes if isinstance(text, bytes) else f.write_text)(text)
    rc, err = run_cli(["train", "--config", str(f), f"out_dir={tmp_path / 'out'}"], capsys)
    assert_one_line_error(rc, err, needle, *([f] if names_file else []))
    assert not (tmp_path / "out").exists()


def test_yaml_python_tags_are_never_executed(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    payload = f'!!python/object/apply:builtins.open ["{marker}", "w"]'
    f = tmp_path / "evil.yaml"
    f.write_text(f"seed: {payload}\n")
    rc, err = run_cli(["train", "--config", str(f), f"out_dir={tmp_path / 'o'}"], capsys)
    assert_one_line_error(rc, err, "invalid YAML", "python/object/apply")
    rc, err = run_cli(["train", f"seed={payload}", f"out_dir={tmp_path / 'o'}"], capsys)
    assert_one_line_error(rc, err, "override 'seed'", "python/object/apply")
    assert not marker.exists()


BAD_OVERRIDES = [
    (["train.epochs=abc"], "train.epochs"),
    (["nokey"], "override 'nokey' is not of the form key=value"),
    (["=3"], "empty key"),
    (["train.epochs.x=1"], "train.epochs"),
    (["data.augment.flip=maybe"], "data.augment.flip"),
    (["optim.milestones=5"], "optim.milestones"),
    (["train.epochs=[1,"], "override 'train.epochs'"),
    (["method.name=nope"], "method.name"),
    (["model.name=nope"], "model.name"),
    (["data.name=nope"], "data.name"),
    (["method.name=lsskd", "method.nokey=1"], "method.nokey"),
    (["model.name=resnet8", "model.kwargs.bogus=1"], "model.kwargs"),
    (["train.device=tpu"], "train.device"),
    (["train.amp=fp8"], "train.amp"),
    (["optim.schedule=linear"], "optim.schedule"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.nonfinite=ignore"], "train.nonfinite"),
    (["optim.lr=-1"], "optim.lr"),
    (["data.eval_on=train"], "data.eval_on"),
    (["train=5"], "'train' must be a mapping"),
    (["out_dir=[1]"], "out_dir"),
]


@pytest.mark.parametrize("overrides,needle", BAD_OVERRIDES, ids=range(len(BAD_OVERRIDES)))
def test_malformed_override(folder, tmp_path, capsys, overrides, needle):
    # data.root is valid, so each error must come from the override itself
    args = [a for a in train_args(folder, tmp_path / "out") if not a.startswith(tuple(
        o.split("=")[0] + "=" for o in overrides))]
    rc, err = run_cli(["train", *args, *overrides], capsys)
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "out").exists()


def _flat_keys(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _flat_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def test_random_override_fuzz_never_tracebacks(tmp_path, capsys):
    """120 seeded random ``key=value`` strings (real and mangled keys, junk values);
    data.root is never set, so every run must end in a one-line error, status 2."""
    rng = random.Random(8)
    # keys whose valid values would change process-wide state before the data error
    keys = [k for k in _flat_keys(DEFAULTS) if k not in ("out_dir", "train.threads", "train.deterministic",
                                                         "data.root")]
    keys += ["method.alpha_T", "method.views", "bogus", "train.bogus", "model.kwargs.depth", "..", "a..b"]
    junk = ["", "[", "]", "{", "{a: 1}", "[1, 2]", "!!python/name:os.system", "!!binary AAAA", "&a [*a]",
            "1e999", "-5", "0", "3.5", "true", "null", "~", "'", '"', "\\x00", "é", "cuda:99", "nan",
            "*alias", "%TAG", "a: b: c", "- x", "?", "|", ">"]
    for _ in range(120):
        key = rng.choice(keys)
        if rng.random() < 0.2:
            key = key[: rng.randrange(len(key) + 1)] + rng.choice(["", ".", "x", "=", " "])
        item = f"{key}={rng.choice(junk)}" if rng.random() < 0.9 else rng.choice(junk)
        rc, err = run_cli(["train", item, f"out_dir={tmp_path / 'out'}"], capsys)
        assert rc == 2, (item, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (item, err)
        assert err.startswith("lsskd train: error:"), (item, err)
    assert not (tmp_path / "out").exists()


# --- unsafe checkpoints, out of memory -------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_eval_refuses_pickled_objects(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    p = tmp_path / "evil.pt"
    torch.save({"method": {}, "config": {}, "x": _Payload(marker)}, p)
    rc, err = run_cli(["eval", "--checkpoint", str(p)], capsys)
    assert_one_line_error(rc, err, "lsskd eval: error: refusing to load checkpoint", p, "--unsafe-load")
    assert not marker.exists()


def test_cli_out_of_memory_message(folder, tmp_path, capsys, monkeypatch):
    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(CrossEntropy, "train_forward", oom)
    rc, err = run_cli(["train", *train_args(folder, tmp_path / "out", "train.epochs=1")], capsys)
    assert_one_line_error(rc, err, "lsskd train: error: out of memory", "training step 1 of epoch 1",
                          "train.batch_size (now 8)", "method.store_dtype=float16", code=3)
