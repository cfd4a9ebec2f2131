"""PyTorch Lightning (lsskd.lightning, issue 28): real Trainer.fit runs on scikit-learn's
digits on CPU, a resume from Lightning's own checkpoint, and DDP with two CPU processes."""
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

pl = pytest.importorskip("pytorch_lightning", reason="PyTorch Lightning not installed "
                         "(pip install -e \".[lightning]\")")
pytest.importorskip("sklearn")

from lsskd import UsageError, WithIndex  # noqa: E402
from lsskd.data import BatchAugment  # noqa: E402
from lsskd.lightning import SelfDistillModule  # noqa: E402
from lsskd.models import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BATCH, STEPS = 32, 3


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    """(train, held-out) TensorDatasets of normalised digits (lsskd's 80/20 split)."""
    import copy

    from lsskd.config import DEFAULTS
    from lsskd.data import build_data

    cfg = copy.deepcopy(DEFAULTS["data"])
    cfg.update(name="digits", image_size=8)
    b = build_data(cfg)
    norm = BatchAugment(b.mean, b.std).normalize
    return TensorDataset(norm(b.train.x), b.train.y), TensorDataset(norm(b.test.x), b.test.y)


class SeededEpochs(Sampler):
    """A shuffling sampler whose order depends on the epoch only (Lightning calls set_epoch),
    so a resumed run sees the same batches as an uninterrupted one."""

    def __init__(self, n):
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch)).tolist())


def _module(train, seed, epochs=2, profile="lsskd"):
    torch.manual_seed(seed)
    return SelfDistillModule(build_model("resnet8", 10), profile, num_train=len(train), epochs=epochs,
                             config={"views_per_step": 2, "gate": "fit", "gate_floor": 0.0},
                             optim={"lr": 0.05})


def _fit(module, data, out, max_epochs, ckpt_path=None, callbacks=(), **kw):
    train, val = data
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=out, save_last=True)
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                         limit_train_batches=STEPS, callbacks=[ckpt, *callbacks], enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=1, **kw)
    loader = DataLoader(WithIndex(train), batch_size=BATCH, sampler=SeededEpochs(len(train)),
                        drop_last=True)
    trainer.fit(module, loader, DataLoader(val, batch_size=200), ckpt_path=ckpt_path)
    return trainer, ckpt


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k], k


def test_fit_logs_branches_and_resumes_exactly_from_its_checkpoint(data, tmp_path):
    ref = _module(data[0], 0)
    trainer, _ = _fit(ref, data, tmp_path / "ref", 2)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert {"val/top1", "val/loss", "val/branch1_top1", "val/branch2_top1", "val/branch3_top1",
            "train/top1", "train/final", "train/hier", "train/kl", "train/feat", "method/alpha",
            "method/gate"} <= set(m)
    assert m["method/gate"] > 0 and m["method/alpha"] > 0  # the schedule reached epoch 2, gate open
    assert ref.sd.epochs_done == 2 and ref.sd.method._view_step == 2 * STEPS
    seen = set()
    for epoch in range(2):  # the rows the two epochs' batches wrote
        s = SeededEpochs(len(data[0]))
        s.set_epoch(epoch)
        seen |= set(list(s)[:STEPS * BATCH])
    assert torch.equal(ref.sd.method.store.filled.nonzero().flatten(), torch.tensor(sorted(seen)))
    assert 0.0 <= m["val/top1"] <= 100.0

    first = _module(data[0], 0)
    _, ckpt = _fit(first, data, tmp_path / "run", 1)  # "interrupted" after epoch 1
    state = torch.load(ckpt.last_model_path, weights_only=True)
    assert state["lsskd"] == {"profile": "lsskd", "epochs": 2, "num_train": len(data[0])}
    assert int(state["state_dict"]["sd.method.store.filled"].sum()) == STEPS * BATCH
    resumed = _module(data[0], 7)  # other initial weights: everything comes from the file
    _fit(resumed, data, tmp_path / "run", 2, ckpt_path=ckpt.last_model_path)
    _same(ref.sd, resumed.sd)


def test_bf16_mixed_precision_on_cpu(data, tmp_path):
    module = _module(data[0], 0, epochs=1, profile="lsskd_selfsup")
    seen = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(outputs["loss"]))

    before = module.sd.backbone.classifier.weight.detach().clone()
    trainer, _ = _fit(module, data, tmp_path, 1, precision="bf16-mixed", callbacks=[Losses()])
    assert len(seen) == STEPS and all(torch.isfinite(torch.tensor(seen)))
    assert not torch.equal(before, module.sd.backbone.classifier.weight)


def test_schedule_length_must_match_the_trainer(data, tmp_path):
    with pytest.raises(UsageError, match=r"max_epochs=3.*epochs=2"):
        _fit(_module(data[0], 0), data, tmp_path, 3)


def _example(args, tmp_path, timeout=420):
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "lightning_fit.py"), "--out",
                        str(tmp_path), *args], capture_output=True, text=True, timeout=timeout,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_lightning_example_runs(tmp_path, monkeypatch, capsys):
    """examples/lightning_fit.py at a tiny budget, in this process."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning_fit.py", "--epochs", "2", "--limit-batches", "2",
                                      "--out", str(tmp_path / "run")])
    runpy.run_path(str(ROOT / "examples" / "lightning_fit.py"), run_name="__main__")
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["profile"] == "lsskd_selfsup" and 0.0 <= out["test_top1"] <= 100.0
    assert {"val/top1", "val/branch1_top1", "val/branch3_top1", "train/top1", "method/gate"} <= set(out)
    assert out["method/gate"] == 0.0  # 2 steps an epoch: the model fits < 50%, the gate stays shut
    state = torch.load(out["checkpoint"], weights_only=True)
    assert state["epoch"] == 1 and state["lsskd"]["profile"] == "lsskd_selfsup"


def test_ddp_two_cpu_processes_share_one_store(tmp_path):
    """Lightning's DDP strategy on CPU (gloo), two processes: every rank's predictions reach
    the store (after_step gathers them), so one epoch of 2 steps x 64 x 2 ranks fills 256 rows."""
    out = _example(["--devices", "2", "--profile", "lsskd", "--epochs", "1", "--limit-batches", "2"],
                   tmp_path)
    state = torch.load(out["checkpoint"], weights_only=True)["state_dict"]
    assert int(state["sd.method.store.filled"].sum()) == 2 * 2 * 64
    assert "val/top1" in out


def test_resume_from_a_mid_epoch_checkpoint_continues_the_epoch(data, tmp_path):
    """A step checkpoint (every_n_train_steps) holds an open epoch; resuming from it goes on
    with that epoch instead of refusing a second on_epoch_start."""
    steps = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=2,
                                         save_top_k=-1, filename="{step}")
    _fit(_module(data[0], 0), data, tmp_path / "a", 1, callbacks=[steps])
    mid = tmp_path / "steps" / "step=2.ckpt"
    state = torch.load(mid, weights_only=True)["state_dict"]["sd._extra_state"]
    assert state["in_epoch"] and state["epochs_done"] == 0 and state["acc"]["n"] == 2 * BATCH
    resumed = _module(data[0], 7)
    _fit(resumed, data, tmp_path / "b", 2, ckpt_path=str(mid))
    assert resumed.sd.epochs_done == 2 and not resumed.sd.in_epoch


def test_gradient_accumulation_commits_every_micro_batch(data, tmp_path):
    module = _module(data[0], 0, epochs=1)
    _fit(module, data, tmp_path, 1, accumulate_grad_batches=2)
    assert int(module.sd.method.store.filled.sum()) == STEPS * BATCH and not module.sd.step_pending


def test_profiles_that_add_samples_train_from_the_given_dataset(data, tmp_path):
    train = data[0]
    with pytest.raises(UsageError, match="pass train_set="):
        SelfDistillModule(build_model("resnet8", 10), "ddgsd", num_train=len(train), epochs=1)
    torch.manual_seed(0)
    module = SelfDistillModule(build_model("resnet8", 10), "dlb", num_train=len(train), epochs=1,
                               train_set=train, optim={"lr": 0.05})
    terms = []

    class Terms(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            terms.append(float(trainer.callback_metrics["train/dlb"]))

    _fit(module, data, tmp_path, 1, callbacks=[Terms()])
    # DLB's consistency term is zero on the first batch (no previous one) and acts after it
    assert len(terms) == STEPS and terms[0] == 0.0 and all(t > 0 for t in terms[1:])

