"""Reliability (issue 8): exact resume, atomic checkpoints, numerical faults,
unsafe checkpoints, out-of-memory reporting. In-process and tiny: resnet8 on a
96-image subset of the shared CIFAR-100 data at 16x16 (every other pixel)."""
from __future__ import annotations

import json
import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from lsskd.config import build_config
from lsskd.data.base import DataBundle
from lsskd.engine import checkpoint as ckpt
from lsskd.engine.checkpoint import load_checkpoint, load_latest, save_checkpoint
from lsskd.engine.trainer import Trainer
from lsskd.errors import CheckpointError, NonFiniteError, ResourceError
from lsskd.methods.ce import CrossEntropy
from lsskd.registry import METHODS

TIMING = {"train_seconds", "epoch_seconds", "img_per_s"}


@pytest.fixture(scope="module")
def tiny(cifar_bundle):
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(cifar_bundle.train), generator=g)[:96].sort().values
    te = torch.randperm(len(cifar_bundle.test), generator=g)[:50].sort().values
    train, test = cifar_bundle.train.subset(tr), cifar_bundle.test.subset(te)
    # Half resolution keeps each step cheap; the images stay real CIFAR images.
    train.x, test.x = train.x[:, :, ::2, ::2].contiguous(), test.x[:, :, ::2, ::2].contiguous()
    return DataBundle(train, test, mean=list(cifar_bundle.mean), std=list(cifar_bundle.std))


def tiny_cfg(out, method="ce", *extra):
    return build_config(None, [
        f"out_dir={out}", "model.name=resnet8", f"method.name={method}", "train.epochs=2",
        "train.batch_size=16", "train.eval_batch_size=50", "train.max_steps_per_epoch=4",
        "train.ckpt_every_steps=2", "train.progress=false", "train.tensorboard=false",
        "train.device=cpu", "optim.lr=0.1", "optim.schedule=cosine", *extra])


def metrics_rows(run_dir):
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def snapshot(state):
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}


def same(a, b):
    """Bit-identical tensors (dtype and shape included) or equal plain values."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


class Interrupt(Exception):
    pass


def interrupt_at(trainer, call):
    """Make the ``call``-th training step (1-based, over the whole run) raise."""
    orig, n = trainer._train_step, [0]

    def step(*a):
        n[0] += 1
        if n[0] == call:
            raise Interrupt
        return orig(*a)

    trainer._train_step = step


# --- exact resume -----------------------------------------------------------------

@pytest.mark.parametrize("method", ["lsskd", "ce"])
def test_resume_mid_epoch_is_bit_identical(tiny, tmp_path, method, capsys):
    extra = ["train.batch_size=8"] if method == "lsskd" else []  # 4 views per image: keep it cheap
    ref = Trainer(tiny_cfg(tmp_path / "ref", method, *extra), bundle=tiny)
    want = ref.fit()
    want_w = snapshot(ref.method.state_dict())

    run = tmp_path / "run"
    tr = Trainer(tiny_cfg(run, method, *extra), bundle=tiny)
    interrupt_at(tr, 7)  # epoch 2, third step: the newest checkpoint is epoch 2 after step 2
    with pytest.raises(Interrupt):
        tr.fit()
    st = load_checkpoint(run / "last.pt")
    assert (st["epoch"], st["step"]) == (1, 2)
    assert st["order"] is not None and sorted(st["order"].tolist()) == list(range(len(tiny.train)))
    assert not (run / "summary.json").exists()
    if method == "ce":
        # A damaged newest checkpoint: resume must fall back to last.prev.pt (end of epoch 1).
        data = (run / "last.pt").read_bytes()
        (run / "last.pt").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    tr2 = Trainer(tiny_cfg(run, method, *extra), resume=True, bundle=tiny)
    if method == "ce":
        assert tr2.resumed_from == run / "last.prev.pt"
        assert (tr2.progress.epoch, tr2.progress.step) == (1, 0)
        err = capsys.readouterr().err
        assert "warning" in err and str(run / "last.pt") in err and "last.prev.pt" in err
    else:
        assert tr2.resumed_from == run / "last.pt"
        assert (tr2.progress.epoch, tr2.progress.step) == (1, 2)
    got = tr2.fit()

    assert {k: v for k, v in got.items() if k not in TIMING} == {k: v for k, v in want.items() if k not in TIMING}
    got_w = tr2.method.state_dict()
    assert got_w.keys() == want_w.keys()
    diff = [k for k in want_w if not same(want_w[k], got_w[k])]
    assert diff == []
    if method == "lsskd":  # the soft-target store is part of what must match
        assert any(k.startswith("store.") for k in want_w)
        assert bool(want_w["store.filled"].any())
    assert metrics_rows(run) == metrics_rows(tmp_path / "ref")
    assert [r["epoch"] for r in metrics_rows(run)] == [1, 2]
    # the final files verify, and the kept previous checkpoint has its own sidecar
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    assert load_checkpoint(run / "last.prev.pt")["epoch"] == 1
    assert (run / "last.prev.pt.sha256").is_file()
    assert json.loads((run / "summary.json").read_text())["test_top1"] == want["test_top1"]


def test_progress_keeps_the_checkpoint_layout():
    """The trainer's Progress is saved as the top-level checkpoint keys lsskd-checkpoint-1
    always had (``accum`` for the running sums), so files written before it resume."""
    from lsskd.engine.state import RESUME_KEYS, Progress

    order = torch.tensor([3, 0, 2, 1])
    old = {"epoch": 1, "step": 2, "order": order, "best": {"top1": 12.5, "top5": 50.0, "epoch": 1},
           "train_seconds": 6.0, "skipped_steps": 1, "accum": {"n": 32.0, "loss": 70.4, "correct": 3.0}}
    p = Progress.from_state_dict(old)
    assert (p.epoch, p.step, p.sums["n"], p.best["top1"], p.skipped_steps) == (1, 2, 32.0, 12.5, 1)
    assert p.order is order and p.state_dict() == old
    assert set(old) <= set(RESUME_KEYS)
    p.epoch, p.step = 2, 0  # an epoch boundary: the finished epoch's order is not kept
    assert p.state_dict()["order"] is None and p.order is order
    assert Progress().state_dict() == {"epoch": 0, "step": 0, "order": None, "best": {"top1": -1.0, "epoch": 0},
                                       "train_seconds": 0.0, "skipped_steps": 0, "accum": {}}


class StepClock:
    """Stands in for the trainer's ``time`` module: the clock moves 1 s per training step
    and not otherwise, so every rate the trainer reports has an exact expected value."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now

    def ticking(self, trainer):
        orig = trainer._train_step

        def step(*a):
            orig(*a)
            self.now += 1.0

        trainer._train_step = step


def test_throughput_counts_only_the_samples_of_the_time_measured(tiny, tmp_path, monkeypatch):
    """img_per_s is this session's training samples over the time they took: a mid-epoch
    checkpoint (train.ckpt_every_steps) does not restart its clock, and after a mid-epoch
    resume the samples trained before the interruption are not counted (both once gave
    twice the true rate here). 4 steps of 16 images per epoch, 1 s per step: 16 images/s."""
    import lsskd.engine.trainer as trainer_mod

    clock = StepClock()
    monkeypatch.setattr(trainer_mod, "time", clock)
    ref = Trainer(tiny_cfg(tmp_path / "ref"), bundle=tiny)
    clock.ticking(ref)
    assert ref.fit()["train_seconds"] == 8.0
    rows = [json.loads(ln) for ln in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["img_per_s"], r["epoch_seconds"], r["train_seconds"]) for r in rows] == [(16.0, 4.0, 4.0),
                                                                                         (16.0, 4.0, 8.0)]

    run = tmp_path / "run"
    tr = Trainer(tiny_cfg(run), bundle=tiny)
    clock.ticking(tr)
    interrupt_at(tr, 7)  # epoch 2, third step: last.pt holds epoch 2 after 2 steps (32 images)
    with pytest.raises(Interrupt):
        tr.fit()
    assert load_checkpoint(run / "last.pt")["train_seconds"] == 6.0
    tr2 = Trainer(tiny_cfg(run), resume=True, bundle=tiny)
    clock.ticking(tr2)
    assert tr2.progress.sums["n"] == 32.0
    assert tr2.fit()["train_seconds"] == 8.0
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["epoch"], last["train_n"]) == (2, 64.0)  # the epoch's stats cover all its samples
    assert (last["img_per_s"], last["epoch_seconds"], last["train_seconds"]) == (16.0, 2.0, 8.0)


# --- atomic writes ----------------------------------------------------------------

def small_state(v: float):
    return {"method": {"w": torch.full((3,), v)}, "epoch": int(v)}


def test_truncated_checkpoint_is_named_and_previous_is_used(tmp_path, capsys):
    p = tmp_path / "last.pt"
    save_checkpoint(small_state(1.0), p, keep_previous=True)
    save_checkpoint(small_state(2.0), p, keep_previous=True)
    assert load_checkpoint(tmp_path / "last.prev.pt")["epoch"] == 1
    data = p.read_bytes()
    p.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as e:
        load_checkpoint(p)
    assert str(p) in str(e.value)
    st, used = load_latest(p)
    assert used == tmp_path / "last.prev.pt" and st["epoch"] == 1
    assert "warning" in capsys.readouterr().err
    # without a sidecar, torch's own failure still becomes a CheckpointError naming the file
    (tmp_path / "last.pt.sha256").unlink()
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint") as e:
        load_checkpoint(p)
    assert str(p) in str(e.value)
    # nothing usable at all: both files are named
    (tmp_path / "last.prev.pt").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError) as e:
        load_latest(p)
    assert str(p) in str(e.value) and str(tmp_path / "last.prev.pt") in str(e.value)


def test_crash_during_save_keeps_a_valid_checkpoint(tmp_path, monkeypatch, capsys):
    p = tmp_path / "last.pt"
    save_checkpoint(small_state(1.0), p, keep_previous=True)

    def half_write(state, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(small_state(2.0), p, keep_previous=True)
    monkeypatch.undo()
    assert load_checkpoint(p)["epoch"] == 1  # untouched
    assert sorted(f.name for f in tmp_path.iterdir()) == ["last.prev.pt", "last.prev.pt.sha256",
                                                         "last.pt", "last.pt.sha256"]

    # crash after the new file is renamed in but before its sidecar is written
    real = ckpt.atomic_write_text

    def no_sidecar(path, text):
        if str(path).endswith(".sha256"):
            raise KeyboardInterrupt
        return real(path, text)

    monkeypatch.setattr(ckpt, "atomic_write_text", no_sidecar)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(small_state(3.0), p, keep_previous=True)
    monkeypatch.undo()
    with pytest.raises(CheckpointError):
        load_checkpoint(p)  # new data, old checksum: detected
    st, used = load_latest(p)
    assert used.name == "last.prev.pt" and st["epoch"] == 1
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp files left


def test_metrics_tolerate_a_torn_line_and_are_rewritten_atomically(tiny, tmp_path):
    tr = Trainer(tiny_cfg(tmp_path / "r", "ce", "train.epochs=1", "train.max_steps_per_epoch=1"), bundle=tiny)
    tr.run_dir.mkdir(exist_ok=True)  # made by the run lock
    (tr.run_dir / "metrics.jsonl").write_text('{"epoch": 1, "x": 1}\n{"epoch": 2, "x"')
    tr.rundir.append_metrics({"epoch": 2, "x": 2})
    assert [json.loads(ln) for ln in (tr.run_dir / "metrics.jsonl").read_text().splitlines()] == \
        [{"epoch": 1, "x": 1}, {"epoch": 2, "x": 2}]
    tr.rundir.truncate_metrics(1)
    assert (tr.run_dir / "metrics.jsonl").read_text() == '{"epoch": 1, "x": 1}\n'


# --- numerical faults -------------------------------------------------------------

class NanProbe(CrossEntropy):
    """Test-only method: CE plus a zero ``probe`` term; calls ``nan_from`` ..
    ``nan_from + nan_count - 1`` (1-based) get NaN in the probe term (``mode=loss``)
    or in the input images (``mode=input``, which also poisons BN statistics)."""

    defaults = {"nan_from": 0, "nan_count": 1, "mode": "loss"}

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls = 0

    def train_forward(self, x, y, idx, mix):
        self.calls += 1
        c = self.cfg
        hit = c["nan_from"] <= self.calls < c["nan_from"] + c["nan_count"]
        if hit and c["mode"] == "input":
            x = x * float("nan")
        logits = self.backbone(x)
        ce = F.cross_entropy(logits.float(), y)
        probe = logits.float().sum() * (float("nan") if hit and c["mode"] == "loss" else 0.0)
        return logits, {"ce": ce, "probe": probe}


@pytest.fixture
def nan_probe(monkeypatch):
    monkeypatch.setitem(METHODS._items, "nan_probe", NanProbe)
    return "nan_probe"


def all_finite(state):
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def test_nan_loss_stops_naming_epoch_step_term(tiny, tmp_path, nan_probe):
    run = tmp_path / "r"
    tr = Trainer(tiny_cfg(run, nan_probe, "method.nan_from=7"), bundle=tiny)
    with pytest.raises(NonFiniteError) as e:
        tr.fit()
    msg = str(e.value)
    assert "loss term(s) probe" in msg and "epoch 2, step 3" in msg and str(run / "last.pt") in msg
    st = load_checkpoint(run / "last.pt")  # the last good one: epoch 2 after step 2
    assert (st["epoch"], st["step"]) == (1, 2) and all_finite(st["method"])
    assert not (run / "summary.json").exists()


def test_nan_before_any_checkpoint_says_so(tiny, tmp_path, nan_probe):
    tr = Trainer(tiny_cfg(tmp_path / "r", nan_probe, "method.nan_from=1"), bundle=tiny)
    with pytest.raises(NonFiniteError, match=r"epoch 1, step 1; no checkpoint was written"):
        tr.fit()


def test_huge_lr_diverges_into_nonfinite_error(tiny, tmp_path):
    tr = Trainer(tiny_cfg(tmp_path / "r", "ce", "optim.lr=1.0e+30", "train.epochs=1"), bundle=tiny)
    with pytest.raises(NonFiniteError, match=r"non-finite (loss term\(s\) ce|gradient) at epoch 1, step [2-4]"):
        tr.fit()


def test_skip_mode_skips_counts_and_restores_bn(tiny, tmp_path, nan_probe, capsys):
    run = tmp_path / "r"
    tr = Trainer(tiny_cfg(run, nan_probe, "method.nan_from=2", "method.nan_count=2", "method.mode=input",
                          "train.nonfinite=skip", "train.max_skipped_steps=2", "train.epochs=1"), bundle=tiny)
    summary = tr.fit()
    assert summary["skipped_steps"] == 2
    assert json.loads((run / "summary.json").read_text())["skipped_steps"] == 2
    assert metrics_rows(run)[0]["skipped_steps"] == 2
    assert capsys.readouterr().err.count("step skipped") == 2
    # NaN inputs went through BN in train mode; the skip must have undone that.
    state = tr.method.state_dict()
    assert all_finite(state) and math.isfinite(summary["test_top1"])
    bn_tracked = [v for k, v in state.items() if k.endswith("num_batches_tracked")]
    assert bn_tracked and all(int(v) == 2 for v in bn_tracked)  # 4 steps, 2 skipped


def test_skip_mode_gives_up_after_max_skipped_steps(tiny, tmp_path, nan_probe):
    tr = Trainer(tiny_cfg(tmp_path / "r", nan_probe, "method.nan_from=2", "method.nan_count=3",
                          "train.nonfinite=skip", "train.max_skipped_steps=2", "train.epochs=1"), bundle=tiny)
    with pytest.raises(NonFiniteError, match=r"epoch 1, step 4 after skipping 2 step\(s\) "
                                             r"\(train.max_skipped_steps\)"):
        tr.fit()


# --- unsafe checkpoints -----------------------------------------------------------

class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    p = tmp_path / "evil.pt"
    torch.save({"method": {"w": torch.ones(2)}, "extra": _Payload(marker)}, p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    msg = str(e.value)
    assert str(p) in msg and "--unsafe-load" in msg and "refusing" in msg
    assert not marker.exists()
    # plain pickle (not a torch zip file) with the same payload: refused as well
    p2 = tmp_path / "evil2.pt"
    p2.write_bytes(pickle.dumps({"x": _Payload(marker)}))
    with pytest.raises(CheckpointError):
        load_checkpoint(p2)
    assert not marker.exists()
    # the explicit opt-out does unpickle it (which is why it is opt-in)
    load_checkpoint(p, weights_only=False)
    assert marker.exists()


# --- resource errors --------------------------------------------------------------

def test_out_of_memory_becomes_resource_error_with_advice(tiny, tmp_path, monkeypatch):
    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(CrossEntropy, "train_forward", oom)
    tr = Trainer(tiny_cfg(tmp_path / "r", "ce"), bundle=tiny)
    with pytest.raises(ResourceError) as e:
        tr.fit()
    msg = str(e.value)
    assert isinstance(e.value, MemoryError)
    assert "training step 1 of epoch 1" in msg and "train.batch_size (now 16)" in msg
    assert "method.store_dtype=float16" in msg and "Tried to allocate 2.00 GiB" in msg
    assert os.path.isdir(tmp_path / "r")


def test_resume_does_not_repeat_tensorboard_events(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = tiny_cfg(run, "ce", "train.tensorboard=true", "train.epochs=3")
    tr = Trainer(cfg, bundle=tiny)
    orig_save = tr.save

    def save():  # a crash after epoch 2 was logged, before its checkpoint landed
        if (tr.progress.epoch, tr.progress.step) == (2, 0):
            raise Interrupt
        return orig_save()

    tr.save = save
    with pytest.raises(Interrupt):
        tr.fit()
    tr2 = Trainer(cfg, resume=True, bundle=tiny)
    assert (tr2.progress.epoch, tr2.progress.step) == (1, 2)  # epoch 2 is replayed
    tr2.fit()
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("test/top1")]
    assert steps == [1, 2, 3]
