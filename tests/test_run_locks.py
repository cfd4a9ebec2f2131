"""One writer per run directory (issue 30): the run lock, sweeps that share a plan between
processes, readers that skip runs being written, and running out of disk space.

The races use real ``python -m lsskd`` processes on a tiny folder of real CIFAR-100 PNGs
(4 classes, 8 training images each: 4 steps an epoch);
a "foreign holder" is a bare ``python -c`` process that takes the same ``flock`` on
``run.lock`` and writes a holder record, as another lsskd process would."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import run_lsskd
from lsskd.engine import checkpoint as ckpt
from lsskd.engine.checkpoint import load_checkpoint, load_latest
from lsskd.engine.runlock import LOCK_NAME, RunLock, RunLockedError, holder
from lsskd.errors import StorageError

EPOCHS = 3


@pytest.fixture(scope="module")
def folder(cifar_root, tmp_path_factory):
    """4 classes of real CIFAR-100 PNGs, 8 train / 2 test images each."""
    root = tmp_path_factory.mktemp("folder")
    classes = sorted(d.name for d in (cifar_root / "train").iterdir())[:4]
    for split, n in (("train", 8), ("test", 2)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for f in sorted((cifar_root / split / c).iterdir())[:n]:
                shutil.copy(f, root / split / c / f.name)
    return root


def run_args(root, out, *extra):
    """A run of EPOCHS epochs of 4 steps (resnet8, batch 8) on ``root``."""
    return [f"data.root={root}", "data.cache_dir=none", f"out_dir={out}", "model.name=resnet8",
            "train.batch_size=8", "train.eval_batch_size=64", f"train.epochs={EPOCHS}",
            "train.progress=false", "train.tensorboard=false", "train.device=cpu", "train.threads=1",
            "optim.lr=0.05", *extra]


def plan_overrides(root, *extra):
    """run_args without out_dir (the sweep sets it) and the data (in the config file)."""
    return [a for a in run_args(root, "x") if not a.startswith(("out_dir", "data."))] + list(extra)


def data_config(path: Path, root, **data) -> Path:
    path.write_text(yaml.safe_dump({"data": {"root": str(root), "cache_dir": "none", **data}}))
    return path


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def lsskd_proc(*argv, cwd=None):
    return subprocess.Popen([sys.executable, "-m", "lsskd", *argv], env=env(), cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def epochs_of(run: Path):
    return [json.loads(ln)["epoch"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


HOLD = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": "elsewhere-host", "started": "2026-01-01T00:00:00Z"}).encode())
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def foreign_holder():
    """Start a process that holds ``<folder>/run.lock``; it is SIGKILLed at teardown."""
    procs = []

    def start(folder: Path) -> subprocess.Popen:
        folder.mkdir(parents=True, exist_ok=True)
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder / LOCK_NAME)],
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


# --- the lock itself ---------------------------------------------------------------------

def test_lock_is_exclusive_names_the_holder_and_dies_with_it(tmp_path, foreign_holder):
    run = tmp_path / "run"
    lock = RunLock.acquire(run)  # makes the folder
    rec = json.loads((run / LOCK_NAME).read_text())
    assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname()
    again = RunLock.acquire(run)  # re-entrant within one process
    again.release()
    assert holder(run)["pid"] == os.getpid()
    lock.release()
    # the last release removes the lock file, and the folder the lock made (still empty)
    assert not run.exists() and holder(run) is None

    other = tmp_path / "other"
    proc = foreign_holder(other)
    who = holder(other)
    assert who == {"pid": proc.pid, "host": "elsewhere-host", "started": "2026-01-01T00:00:00Z"}
    with pytest.raises(RunLockedError) as e:
        RunLock.acquire(other)
    msg = str(e.value)
    assert str(other) in msg and f"pid {proc.pid} on elsewhere-host since 2026-01-01T00:00:00Z" in msg
    assert os.listdir(other) == [LOCK_NAME]  # the refused process wrote nothing
    assert json.loads((other / LOCK_NAME).read_text())["host"] == "elsewhere-host"
    proc.kill()
    proc.wait()
    # the kernel dropped the killed holder's lock: no stale lock, though its file is left
    assert (other / LOCK_NAME).is_file() and holder(other) is None
    with RunLock.acquire(other):
        assert holder(other)["pid"] == os.getpid()
    assert os.listdir(other) == []


def test_file_system_without_locks_warns_and_runs_unprotected(tmp_path, monkeypatch, capsys):
    import lsskd.engine.runlock as rl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rl.fcntl, "flock", no_locks)
    run = tmp_path / "run"
    with RunLock.acquire(run):
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert err.startswith(f"warning: the file system of {run} does not support file locks (No locks "
                          "available); this run is not protected")
    assert not run.exists()


# --- two `lsskd train` on one out_dir ----------------------------------------------------

def test_two_trains_on_one_out_dir_exactly_one_trains(folder, tmp_path):
    run = tmp_path / "run"
    args = ["train", *run_args(folder, run, "train.tensorboard=true")]
    procs = [lsskd_proc(*args), lsskd_proc(*args)]
    outs = [p.communicate(timeout=300) for p in procs]
    rcs = [p.returncode for p in procs]
    assert sorted(rcs) == [0, 2], outs
    winner, loser = (0, 1) if rcs[0] == 0 else (1, 0)
    err = outs[loser][1].strip().splitlines()
    assert len(err) == 1 and "Traceback" not in outs[loser][1], outs[loser][1]
    assert err[0].startswith(f"lsskd train: error: run directory {run} is locked by another process "
                             f"(pid {procs[winner].pid} on {socket.gethostname()} since "), err[0]
    assert outs[loser][0] == ""  # no summary printed
    summary = json.loads(outs[winner][0])
    assert summary == json.loads((run / "summary.json").read_text())
    assert epochs_of(run) == [1, 2, 3]
    assert len(list((run / "tb").iterdir())) == 1  # one event file
    assert load_checkpoint(run / "last.pt")["epoch"] == EPOCHS
    assert not (run / LOCK_NAME).exists()  # released on a normal exit


# --- two sweeps over one plan ------------------------------------------------------------

def test_two_sweeps_over_one_plan_train_each_run_once(folder, tmp_path):
    plan = tmp_path / "plan.yaml"
    cfg = data_config(tmp_path / "tiny.yaml", folder)
    plan.write_text(yaml.safe_dump({
        "configs": [str(cfg)], "seeds": [0, 1], "grid": {"optim.lr": [0.05, 0.1]},
        "out_root": str(tmp_path / "res"), "overrides": plan_overrides(folder, "train.epochs=2")}))
    procs = [lsskd_proc("sweep", "--plan", str(plan)), lsskd_proc("sweep", "--plan", str(plan))]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trained = []
    for out, _ in outs:
        last = out.strip().splitlines()[-1]
        assert last.startswith("4 runs: ") and last.endswith(" 0 failed"), out
        trained.append(int(last.split(": ")[1].split(" trained")[0]))
    assert sum(trained) == 4, outs  # every run trained exactly once, by one of the two
    runs = sorted(p.parent for p in (tmp_path / "res").rglob("summary.json"))
    assert len(runs) == 4
    for run in runs:
        assert epochs_of(run) == [1, 2]
        assert not (run / LOCK_NAME).exists()


def test_sweep_leaves_a_run_held_elsewhere_and_readers_skip_it(folder, tmp_path, foreign_holder, capsys):
    """A run whose lock another live process holds: the sweep skips it ("running
    elsewhere", exit 0), the report and tune leave it out and list it."""
    cfg = data_config(tmp_path / "tiny.yaml", folder)
    over = plan_overrides(folder, "train.epochs=1")
    res = tmp_path / "res"
    held = res / "tiny" / "seed1"
    proc = foreign_holder(held)
    rc, out, err = run_lsskd(["sweep", "--configs", str(cfg), "--seeds", "0", "1", "--out-root", str(res), *over],
                             capsys)
    assert rc == 0, err
    row = [ln for ln in out.splitlines() if ln.startswith("tiny/seed1")][0]
    assert "elsewhere" in row and f"running elsewhere (pid {proc.pid} on elsewhere-host" in row
    assert "2 runs: 1 trained/resumed, 0 already finished, 1 running elsewhere, 0 failed" in out
    assert os.listdir(held) == [LOCK_NAME]  # nothing written into the held run

    # a held run that has a summary (a resumed finished run rewrites it) is still left out
    (held / "summary.json").write_text((res / "tiny" / "seed0" / "summary.json").read_text())
    rc, out, err = run_lsskd(["report", str(res), "--no-plots", "--out", str(tmp_path / "rep")], capsys)
    assert rc == 0, err
    assert "1 run(s) in 1 group(s); 1 unfinished run(s) left out" in out
    assert f"left out {held}: running (pid {proc.pid} on elsewhere-host" in out
    assert f"`{held}`: running (pid {proc.pid}" in (tmp_path / "rep" / "report.md").read_text()

    # tune: seed 1 of the only candidate is held (with a summary): seed 0 trains, seed 1 is
    # left out and listed, so no candidate has all its seeds
    t_held = res / "t" / "tiny-lr0.05" / "seed1"
    proc2 = foreign_holder(t_held)
    (t_held / "summary.json").write_text(json.dumps({"val_top1": 99.0}))
    rc, out, err = run_lsskd(["tune", "--config", str(cfg), "--out-root", str(res / "t"),
                              "--seeds", "0", "1", "--val-fraction", "0.25", "--grid", "optim.lr=[0.05]",
                              *over], capsys)
    assert rc == 1, err
    assert (res / "t" / "tiny-lr0.05" / "seed0" / "summary.json").is_file()
    assert f"tune: left out {t_held}: running (pid {proc2.pid} on elsewhere-host" in out
    assert "no candidate finished" in out


# --- SIGKILL of a lock holder, then --resume ---------------------------------------------

def test_sigkilled_holder_leaves_no_stale_lock(folder, tmp_path, capsys):
    run = tmp_path / "run"
    proc = lsskd_proc("train", *run_args(folder, run, "train.ckpt_every_steps=1"))
    try:
        deadline = time.time() + 300
        while not (run / "last.pt.sha256").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.005)
        assert holder(run)["pid"] == proc.pid
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert (run / LOCK_NAME).is_file() and holder(run) is None  # the record stays, the lock does not
    rc, out, err = run_lsskd(["train", "--resume", str(run)], capsys)
    assert rc == 0, err
    assert epochs_of(run) == [1, 2, 3]
    assert not (run / LOCK_NAME).exists()


# --- out of disk space -------------------------------------------------------------------

def enospc_on(monkeypatch, name: str, call: int):
    """The ``call``-th atomic write of a file called ``name`` writes a few bytes to its
    temporary file and then fails with ENOSPC, as a full disk does."""
    real = ckpt._write_atomic
    seen = {"n": 0}

    def write(path, fn):
        if Path(path).name == name:
            seen["n"] += 1
            if seen["n"] == call:
                def partial(f):
                    f.write(b"PK\x03\x04 partial")
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(path, partial)
        return real(path, fn)

    monkeypatch.setattr(ckpt, "_write_atomic", write)
    return seen


@pytest.mark.parametrize("name", ["last.pt", "metrics.jsonl"])
def test_out_of_space_stops_keeps_the_checkpoint_and_resume_continues(folder, tmp_path, capsys, monkeypatch, name):
    run = tmp_path / "run"
    # last.pt is saved once per epoch (call 2 = epoch 2); metrics.jsonl is written empty at
    # the start, then once per epoch (call 3 = epoch 2's row)
    enospc_on(monkeypatch, name, 2 if name == "last.pt" else 3)
    rc, out, err = run_lsskd(["train", *run_args(folder, run)], capsys)
    assert rc == 3 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"lsskd train: error: run {run} stopped: no space left to write {run / name} "
                           "(No space left on device)"), line
    assert f"`lsskd train --resume {run}`" in line
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]  # no partial file left
    assert not (run / "summary.json").exists() and not (run / LOCK_NAME).exists()
    state, used = load_latest(run / "last.pt")
    assert used == run / "last.pt" and state["epoch"] == 1  # epoch 1's, intact and verified
    monkeypatch.undo()
    rc, out, err = run_lsskd(["train", "--resume", str(run)], capsys)
    assert rc == 0, err
    assert epochs_of(run) == [1, 2, 3]
    assert json.loads(out)["epochs"] == EPOCHS


def test_out_of_space_while_writing_the_decoded_cache(tmp_path, monkeypatch):
    from PIL import Image

    from lsskd.data import folder as fmod

    items = []
    for k in range(4):
        p = tmp_path / "img" / f"{k}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), 40 * k, np.uint8)).save(p)
        items.append((p, k % 2))

    def full(path, **arrays):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fmod.np, "savez", full)
    cache = tmp_path / "cache"
    with pytest.raises(StorageError) as e:
        fmod.load_items(items, ["a", "b"], None, cache, "tiny")
    assert str(e.value).startswith(f"no space left to write the decoded cache {cache}")
    assert "data.cache_dir=none" in str(e.value)
    assert list(cache.iterdir()) == []  # the partial cache file was removed
    monkeypatch.undo()
    ds = fmod.load_items(items, ["a", "b"], None, cache, "tiny")  # with space: written and used
    assert len(ds) == 4 and len(list(cache.iterdir())) == 1
