"""The library API for a user's own loop (lsskd.api, docs/api.md, issue 28).

The equivalence tests train a few steps with a plain loop written here (its own
optimiser, its own DataLoader and sampler) and with ``lsskd.engine.Trainer`` at the same
seed and settings, on scikit-learn's digits, and compare every tensor of the two methods'
state (parameters, batch-norm statistics, soft-target store, gate inputs) bit for bit.
"""
import math
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

import lsskd
from lsskd import SelfDistiller, UsageError, WithIndex
from lsskd.config import build_config
from lsskd.data import BatchAugment
from lsskd.engine import Trainer
from lsskd.errors import ConfigError
from lsskd.models import StagedAdapter, build_model

pytest.importorskip("sklearn")

SEED, EPOCHS, STEPS, BATCH, LR = 0, 3, 5, 64, 0.05


@pytest.fixture(autouse=True)
def _one_thread():
    # Bit-identical runs need the same reduction order: one thread, torch's default kernels.
    n, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(False)
    yield
    torch.set_num_threads(n)
    torch.use_deterministic_algorithms(det)


class Pairs(Dataset):
    """A user's map-style dataset: (uint8 image, label), no index."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class EpochPermutation(Sampler):
    """The user's shuffling: one permutation per epoch from a seeded generator (what the
    CLI trainer draws; torch's RandomSampler draws a second, unused one per epoch)."""

    def __init__(self, n, seed):
        self.n, self.g = n, torch.Generator().manual_seed(seed)

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.g).tolist())


def _trainer(tmp_path, profile, extra):
    cfg = build_config(None, [
        f"out_dir={tmp_path / profile}", "model.name=resnet8", f"method.name={profile}",
        f"seed={SEED}", "data.name=digits", "data.image_size=8", "data.augment.crop_padding=1",
        "data.augment.flip=false", f"train.epochs={EPOCHS}", f"train.batch_size={BATCH}",
        f"train.max_steps_per_epoch={STEPS}", "train.device=cpu", "train.threads=1",
        "train.progress=false", "train.tensorboard=false", f"optim.lr={LR}", "optim.schedule=cosine",
        *extra])
    tr = Trainer(cfg)
    tr.fit()
    return tr, cfg


def _top1(sd, ds, aug):
    sd.eval()
    with torch.no_grad():
        x, _ = aug(ds.x, None, train=False)
        correct = int((sd(x).argmax(1) == ds.y).sum())
    sd.train()
    return 100.0 * correct / len(ds.y)


def _plain_loop(bundle, profile, method_cfg, has_val):
    """A user's loop: everything but SelfDistiller/WithIndex is plain PyTorch."""
    torch.manual_seed(SEED)
    backbone = build_model("resnet8", len(bundle.classes))
    sd = SelfDistiller(backbone, profile, num_train=len(bundle.train), epochs=EPOCHS,
                       config=method_cfg, has_val=has_val)
    opt = torch.optim.SGD(sd.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    aug = BatchAugment(bundle.mean, bundle.std, "image", crop_padding=1, flip=False)
    aug_gen = torch.Generator().manual_seed(SEED + 1)
    train = Pairs(bundle.train.x, bundle.train.y)
    loader = DataLoader(WithIndex(train), batch_size=BATCH, drop_last=True,
                        sampler=EpochPermutation(len(train), SEED))
    logs = []
    for epoch in range(EPOCHS):
        sd.train()
        sd.on_epoch_start(epoch)
        for step, (xb, yb, idx) in enumerate(loader):
            if step == STEPS:
                break
            for g in opt.param_groups:  # cosine over the run, per step
                g["lr"] = LR * 0.5 * (1 + math.cos(math.pi * (epoch + step / STEPS) / EPOCHS))
            # the samples the profile adds (DDGSD, DLB, CS-KD), drawn as the trainer draws them
            xb, yb, idx = sd.with_extra(xb, yb, idx, train, generator=aug_gen)
            x, mix = aug(xb, aug_gen)
            out = sd.step(x, yb, idx, mix)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sd.after_step()
        logs.append(sd.on_epoch_end())
        if sd.wants_val:
            sd.on_validation(_top1(sd, bundle.val, aug))
    return sd, logs


def _assert_same_value(u, v, k):
    if torch.is_tensor(u):
        assert torch.is_tensor(v) and torch.equal(u, v), k
    elif isinstance(u, dict):  # a method's extra state (DLB's previous batch)
        assert isinstance(v, dict) and list(u) == list(v), k
        for j in u:
            _assert_same_value(u[j], v[j], f"{k}.{j}")
    else:
        assert u == v, k


def _assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        _assert_same_value(sa[k], sb[k], k)


CASES = {
    # the recommended profile; its fit gate opened early (floor 0.1) so the branches act
    "lsskd_selfsup": ("lsskd_selfsup", {"gate_floor": 0.1}, []),
    # the paper profile: soft-target store (indices), alpha schedule, KL, feature term
    "lsskd": ("lsskd", {"views_per_step": 2}, []),
    # the gap gate: reads held-out accuracy after every epoch (on_validation)
    "lsskd_robust_gap": ("lsskd_robust", {"gate_floor": 0.1, "gap_floor": -0.5, "views_per_step": 2}, ["data.val_fraction=0.2"]),
    # profiles that add samples to each batch (with_extra): a second view of every sample,
    # the previous batch, a same-class partner drawn from the shared generator
    "ddgsd": ("ddgsd", {}, []),
    "dlb": ("dlb", {}, []),
    "cskd": ("cskd", {}, []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_plain_loop_trains_the_cli_trainers_model(case, tmp_path):
    profile, method_cfg, extra = CASES[case]
    tr, _ = _trainer(tmp_path, profile, [f"method.{k}={v}" for k, v in method_cfg.items()] + extra)
    sd, logs = _plain_loop(tr.bundle, profile, method_cfg, tr.bundle.val is not None)
    _assert_same_state(tr.method, sd.method)
    rows = tr.rundir.metric_rows()
    assert [r["train_top1"] for r in rows] == [r["top1"] for r in logs]
    assert [r.get("method_gate") for r in rows] == [r.get("gate") for r in logs]
    assert [r["train_loss"] for r in rows] == pytest.approx([r["loss"] for r in logs], rel=1e-12)
    if sd.loads_extra:
        # accuracy counted the batch's own rows: STEPS batches an epoch, not the extra rows
        assert [r["n"] for r in logs] == [STEPS * BATCH] * EPOCHS
    elif profile != "lsskd":
        assert max(r["gate"] for r in logs) > 0  # the gate opened: the branches reached the backbone
    else:
        assert sd.needs_indices and bool(sd.method.store.filled.any())
        assert logs[-1]["alpha"] == pytest.approx(0.8)


def _digits():
    from lsskd.config import DEFAULTS
    from lsskd.data import build_data
    import copy

    cfg = copy.deepcopy(DEFAULTS["data"])
    cfg.update(name="digits", image_size=8)
    return build_data(cfg)


@pytest.fixture(scope="module")
def digits():
    return _digits()


def _run(sd, opt, bundle, aug, epochs, stop=None, start=(0, 0)):
    """Train ``sd`` from (epoch, step) ``start`` to ``stop`` (exclusive) with per-epoch seeded
    orders; returns the epoch logs."""
    n, logs = len(bundle.train), []
    e0, s0 = start
    for epoch in range(e0, epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(100 + epoch))
        sd.train()
        if not (epoch == e0 and s0):
            sd.on_epoch_start(epoch)
        for step in range(s0 if epoch == e0 else 0, STEPS):
            if stop == (epoch, step):
                return logs
            idx = order[step * 32:(step + 1) * 32]
            x, _ = aug(bundle.train.x[idx], torch.Generator().manual_seed(1000 * epoch + step))
            out = sd.step(x, bundle.train.y[idx], idx)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sd.after_step()
        logs.append(sd.on_epoch_end())
    return logs


def _fresh(bundle, seed):
    torch.manual_seed(seed)
    sd = SelfDistiller(build_model("resnet8", 10), "lsskd", num_train=len(bundle.train), epochs=3,
                       config={"views_per_step": 2, "gate": "fit", "gate_floor": 0.1})
    return sd, torch.optim.SGD(sd.parameters(), lr=0.05, momentum=0.9)


def test_state_dict_resumes_exactly_mid_epoch(digits, tmp_path):
    """A user's checkpoint (sd.state_dict() + optimiser) taken mid-epoch and loaded into
    freshly built objects continues to the same model as an uninterrupted run."""
    aug = BatchAugment(digits.mean, digits.std, "image", crop_padding=1, flip=False)
    ref, opt = _fresh(digits, 0)
    ref_logs = _run(ref, opt, digits, aug, 3)
    assert ref_logs[-1]["gate"] > 0 and ref_logs[-1]["alpha"] > 0

    sd, opt = _fresh(digits, 0)
    _run(sd, opt, digits, aug, 3, stop=(1, 2))  # two steps into the second epoch
    path = tmp_path / "ckpt.pt"
    torch.save({"sd": sd.state_dict(), "opt": opt.state_dict()}, path)
    assert sd.method._view_step == 5 + 2  # one draw per step so far

    again, opt2 = _fresh(digits, 7)  # other initial weights: all must come from the file
    state = torch.load(path, weights_only=True)
    again.load_state_dict(state["sd"])
    opt2.load_state_dict(state["opt"])
    assert again.epochs_done == 1 and again.method.epoch == 2 and again.method._view_step == 7
    logs = _run(again, opt2, digits, aug, 3, start=(1, 2))
    _assert_same_state(ref, again)
    assert logs == ref_logs[1:]


def test_indices_are_required_and_range_checked(digits):
    sd = SelfDistiller(build_model("resnet8", 10), "pskd", num_train=len(digits.train), epochs=2)
    assert sd.needs_indices and not sd.may_leave_params_unused
    assert sd.store_buffers() == ["method.store.filled", "method.store.filled_views", "method.store.final",
                                 "method.store.branches"]
    sd.train()
    sd.on_epoch_start()
    x, y = digits.train.x[:4].float(), digits.train.y[:4]
    with pytest.raises(UsageError, match=r"WithIndex\(train_set\)"):
        sd.step(x, y)
    with pytest.raises(UsageError, match=rf"sample index {len(digits.train)} is outside 0\.\.{len(digits.train) - 1}"):
        sd.step(x, y, torch.tensor([0, 1, 2, len(digits.train)]))
    with pytest.raises(UsageError, match="one integer index per sample"):
        sd.step(x, y, torch.tensor([0, 1]))
    # the recommended profile keeps no per-sample state: indices are optional
    rec = SelfDistiller(build_model("resnet8", 10), num_train=len(digits.train), epochs=2)
    assert rec.profile == lsskd.RECOMMENDED == "lsskd_selfsup" and not rec.needs_indices


def test_hooks_out_of_order_are_named(digits):
    sd = SelfDistiller(build_model("resnet8", 10), "pskd", num_train=len(digits.train), epochs=2)
    x, y, idx = digits.train.x[:4].float(), digits.train.y[:4], torch.arange(4)
    sd.train()
    with pytest.raises(UsageError, match=r"call sd.on_epoch_start\(\) before"):
        sd.step(x, y, idx)
    with pytest.raises(UsageError, match=r"on_epoch_start\(3\) but 0 epoch"):
        sd.on_epoch_start(3)
    sd.on_epoch_start(0)
    with pytest.raises(UsageError, match="before on_epoch_end"):
        sd.on_epoch_start(1)
    sd.step(x, y, idx)
    with pytest.raises(UsageError, match=r"call sd.after_step\(\)"):
        sd.step(x, y, idx)
    with pytest.raises(UsageError, match=r"call sd.after_step\(\)"):
        sd.on_epoch_end()
    sd.after_step()
    assert bool(sd.method.store.filled[:4].all()) and not bool(sd.method.store.filled[4:].any())
    with pytest.raises(UsageError, match=r"after_step\(\) without a step"):
        sd.after_step()
    sd.step(x, y, idx + 4)
    sd.discard_step()  # a skipped step stores nothing
    assert not bool(sd.method.store.filled[4:].any())
    stats = sd.on_epoch_end()
    assert stats["n"] == 4.0 and sd.epochs_done == 1
    with pytest.raises(UsageError, match=r"step\(\) outside an epoch"):
        sd.step(x, y, idx)
    sd.eval()
    with pytest.raises(UsageError, match=r"sd.train\(\)"):
        sd.step(x, y, idx)
    sd.train()
    sd.on_epoch_start(1)
    sd.step(x, y, idx)
    sd.after_step()
    sd.on_epoch_end()
    with pytest.raises(UsageError, match="all 2 epochs"):
        sd.on_epoch_start()


def test_held_out_profile_requires_on_validation(digits):
    with pytest.raises(ConfigError, match="in your own loop: construct with has_val=True"):
        SelfDistiller(build_model("resnet8", 10), "lsskd", num_train=10, epochs=2,
                      config={"gate": "gap"})
    sd = SelfDistiller(build_model("resnet8", 10), "lsskd_robust", num_train=len(digits.train),
                       epochs=3, has_val=True)
    assert sd.wants_val
    sd.train()
    sd.on_epoch_start()
    sd.step(digits.train.x[:4].float(), digits.train.y[:4], torch.arange(4))
    sd.after_step()
    sd.on_epoch_end()
    with pytest.raises(UsageError, match=r"on_validation\(top1\) after epoch 1"):
        sd.on_epoch_start()
    with pytest.raises(UsageError, match="in percent"):
        sd.on_validation(120)
    sd.on_validation({"top1": 62.5})
    # (the buffer's place inside the method may change: find it by name)
    val_acc = [v for k, v in sd.state_dict().items() if k.endswith("val_acc")]
    assert len(val_acc) == 1 and float(val_acc[0]) == 0.625
    sd.on_epoch_start()


class TinyNet(nn.Module):
    """A user's own model, not written for lsskd."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.block2(self.block1(self.conv(x))).mean((2, 3)))


def test_own_module_with_named_stages_trains_and_deploys_itself(digits):
    net = TinyNet()
    with pytest.raises(UsageError, match="is not a staged backbone: name its parts"):
        SelfDistiller(net, num_train=10, epochs=1)
    with pytest.raises(UsageError, match="do not fit TinyNet: module has no submodule 'block3'"):
        SelfDistiller(net, num_train=10, epochs=1,
                      stages={"stem": "conv", "stages": ["block1", "block3"], "classifier": "fc"})
    with pytest.raises(UsageError, match="has no stages"):
        SelfDistiller(net, num_train=10, epochs=1,
                      stages={"stem": "conv", "stages": [], "classifier": "fc"})
    sd = SelfDistiller(net, "sad_ce", num_train=len(digits.train), epochs=1, input_shape=(3, 8, 8),
                       stages={"stem": "conv", "stages": ["block1", "block2"], "classifier": "fc"})
    assert len(sd.method.aux) == 2
    before = net.fc.weight.detach().clone()
    opt = torch.optim.SGD(sd.parameters(), lr=0.1)
    sd.train()
    sd.on_epoch_start()
    out = sd.step(digits.train.x[:32].float() / 255, digits.train.y[:32])
    assert set(out.terms) == {"final", "hier"}
    assert torch.allclose(out.loss.detach(), sum(out.terms.values()))
    assert out.logits.shape == (32, 10)
    out.loss.backward()
    opt.step()
    sd.after_step()
    sd.on_epoch_end()
    assert sd.deploy() is net and not torch.equal(net.fc.weight, before)
    assert sum(p.numel() for p in sd.parameters()) > sum(p.numel() for p in net.parameters())


def test_zoo_names_adapters_and_refusals():
    sd = SelfDistiller("resnet8", "ce", num_train=4, epochs=1, num_classes=3)
    assert sd.deploy() is sd.backbone and sd.backbone.num_classes == 3
    with pytest.raises(UsageError, match="pass num_classes"):
        SelfDistiller("resnet8", num_train=4, epochs=1)
    with pytest.raises(UsageError, match="unknown method 'nope'.*lsskd_selfsup"):
        SelfDistiller("resnet8", "nope", num_train=4, epochs=1, num_classes=3)
    with pytest.raises(UsageError, match="num_train must be a positive int"):
        SelfDistiller("resnet8", num_train=0, epochs=1, num_classes=3)
    adapter = StagedAdapter(TinyNet(), stem="conv", stages=["block1", "block2"], classifier="fc")
    sd = SelfDistiller(adapter, num_train=4, epochs=1)
    assert sd.deploy() is adapter and len(sd.method.aux) == 2
    with pytest.raises(ConfigError, match="unknown config key 'method.gate_flor'"):
        SelfDistiller(adapter, num_train=4, epochs=1, config={"gate_flor": 0.2})


def test_with_index_returns_the_dataset_index():
    base = Pairs(torch.arange(10).float()[:, None] * 2, torch.arange(10) % 3)
    ds = WithIndex(base)
    assert len(ds) == 10
    x, y, i = ds[7]
    assert (float(x), int(y), i) == (14.0, 1, 7)
    assert WithIndex([5, 6, 7])[2] == (7, 2)
    xb, yb, ib = next(iter(DataLoader(ds, batch_size=4, shuffle=True,
                                      generator=torch.Generator().manual_seed(0))))
    assert torch.equal(xb[:, 0], ib.float() * 2) and torch.equal(yb, ib % 3)

    class Stream(IterableDataset):
        def __iter__(self):
            yield 1

    with pytest.raises(UsageError, match="map-style dataset"):
        WithIndex(Stream())


def test_plain_loop_example_runs(monkeypatch, capsys):
    """examples/plain_loop.py at a tiny budget (2 epochs of 3 steps), in this process."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.setattr(sys, "argv", ["plain_loop.py", "--epochs", "2", "--max-steps", "3"])
    runpy.run_path(str(root / "examples" / "plain_loop.py"), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    pat = r"(\w+): test top-1 ([\d.]+), train top-1 ([\d.]+)(, gate ([\d.]+))?"
    rows = [re.fullmatch(pat, ln) for ln in lines]
    assert [m.group(1) for m in rows] == ["ce", "lsskd_selfsup"]
    assert all(0 <= float(m.group(2)) <= 100 and 0 <= float(m.group(3)) <= 100 for m in rows)
    assert rows[0].group(5) is None and float(rows[1].group(5)) == 0.0  # < 50% fit: gate shut
    # a profile that adds samples to each batch runs through the same loop (with_extra)
    monkeypatch.setattr(sys, "argv", ["plain_loop.py", "--epochs", "1", "--max-steps", "2",
                                      "--profiles", "dlb"])
    runpy.run_path(str(root / "examples" / "plain_loop.py"), run_name="__main__")
    assert re.fullmatch(pat, capsys.readouterr().out.strip()).group(1) == "dlb"


def _ddp_worker(rank, world, port, folder):
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    sd = SelfDistiller("resnet8", "pskd", num_train=64, epochs=1, num_classes=4)
    DDP._set_params_and_buffers_to_ignore_for_model(sd, sd.store_buffers())
    ddp = DDP(sd, find_unused_parameters=sd.may_leave_params_unused)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    sd.train()
    sd.on_epoch_start(0)
    for step in range(2):  # global batches of 16, 8 rows per rank
        idx = torch.arange(step * 16 + rank * 8, step * 16 + rank * 8 + 8)
        out = ddp(x[idx], y[idx], idx)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sd.after_step()
    stats = sd.on_epoch_end()
    torch.save({"state": sd.state_dict(), "stats": stats}, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_in_a_plain_loop_shares_the_store(tmp_path):
    """DistributedDataParallel(sd) in a user's loop, two CPU processes (gloo): every rank's
    predictions reach every rank's store, weights agree, the epoch's top-1 counts all rows."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["stats"] == r1["stats"] and r0["stats"]["n"] == 32.0
    # Everything but what is per rank by design: batch-norm running statistics (each rank
    # normalises its own rows; DDP re-broadcasts rank 0's before every forward) and this
    # wrapper's running sums before their reduction.
    local = ("running_mean", "running_var", "num_batches_tracked", "_extra_state")
    for k in r0["state"]:
        a, b = r0["state"][k], r1["state"][k]
        assert k.endswith(local) or (torch.equal(a, b) if torch.is_tensor(a) else a == b), k
    assert r0["state"]["method.store.filled"].nonzero().flatten().tolist() == list(range(32))


class Noisy(Dataset):
    """A dataset with its own random transform (a second load is a second draw) and no
    label attribute; counts the loads."""

    def __init__(self, n=12):
        self.y, self.loads = torch.arange(n) % 3, []

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.loads.append(i)
        return torch.full((3, 8, 8), float(i)) + 0.01 * torch.randn(3, 8, 8), int(self.y[i])


def test_with_extra_loads_what_the_profile_adds():
    torch.manual_seed(0)
    ds = Noisy()
    idx = torch.tensor([0, 4, 5, 7])
    x, y = torch.stack([ds[int(i)][0] for i in idx]), ds.y[idx]
    ds.loads.clear()
    # DDGSD: a second, independently transformed view of every sample, loaded from the dataset
    sd = SelfDistiller("resnet8", "ddgsd", num_train=12, epochs=1, num_classes=3)
    assert sd.loads_extra and sd.needs_indices
    sd.on_epoch_start(0)
    with pytest.raises(UsageError, match=r"call x, y, idx = sd.with_extra\(x, y, idx, train_set\)"):
        sd.step(x, y, idx)
    x2, y2, i2 = sd.with_extra(x, y, idx, WithIndex(ds))
    assert ds.loads == [0, 4, 5, 7] and torch.equal(i2, idx.repeat(2)) and torch.equal(y2, y.repeat(2))
    assert torch.allclose(x2[4:], x, atol=0.1) and not torch.equal(x2[4:], x)
    with pytest.raises(UsageError, match="with_extra built 8 rows, step\\(\\) got 4"):
        sd.step(x, y, idx)  # the extended batch must reach step()
    x2, y2, i2 = sd.with_extra(x, y, idx, ds)
    out = sd.step(x2, y2, i2)
    assert out.logits.shape == (4, 3) and set(out.terms) == {"ce", "kl", "mmd"}
    sd.after_step()
    assert sd.on_epoch_end()["n"] == 4  # accuracy over the batch's own samples
    with pytest.raises(UsageError, match="train_set has 5 samples but num_train=12"):
        sd.with_extra(x, y, idx, Pairs(torch.zeros(5, 3, 8, 8), torch.zeros(5)))
    # CS-KD: a partner of the same class, labels read by one pass over a dataset without a
    # label attribute; the partner draws resume exactly from state_dict()
    sd = SelfDistiller("resnet8", "cskd", num_train=12, epochs=1, num_classes=3, seed=5)
    state = sd.state_dict()
    _, yp, ip = sd.with_extra(x, y, idx, ds)
    assert torch.equal(yp[4:], y) and torch.equal(ds.y[ip[4:]], y) and not torch.equal(ip[4:], idx)
    again = SelfDistiller("resnet8", "cskd", num_train=12, epochs=1, num_classes=3, seed=99)
    again.load_state_dict(state)
    assert torch.equal(again.with_extra(x, y, idx, ds)[2], ip)
    # profiles that add nothing pass the batch through
    plain = SelfDistiller("resnet8", "ce", num_train=12, epochs=1, num_classes=3)
    assert not plain.loads_extra and plain.with_extra(x, y, idx, ds)[0] is x
