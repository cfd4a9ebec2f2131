"""Issue 18 (c), (d): what the soft-target store keeps under CutMix (``method.store_mixed``)
and whether every row is rewritten every epoch (``train.drop_last``)."""
import json

import pytest
import torch

from lsskd.config import build_config
from lsskd.errors import ConfigError
from lsskd.data import ArrayDataset, BatchIterator, DataBundle, MixInfo
from lsskd.engine import Trainer
from lsskd.models import build_model
from lsskd.registry import METHODS


def make(name="lsskd", cutmix_prob=0.0, **cfg):
    torch.manual_seed(0)
    return METHODS.build(name, build_model("resnet8", 10), cfg, num_train=8, cutmix_prob=cutmix_prob).train()


def step(m, idx, mix=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(len(idx), 3, 32, 32, generator=g), torch.tensor([0, 3, 5, 9])[: len(idx)]
    z, losses = m(x, y, idx, mix)
    sum(losses.values()).backward()
    m.after_step()
    return z


MIX = MixInfo(perm=torch.tensor([1, 0, 3, 2]), lam=0.6)


@pytest.mark.parametrize("name", ["lsskd", "pskd"])
def test_store_mixed_skip_keeps_the_previous_prediction(name):
    m = make(name)
    assert m.cfg["store_mixed"] == "skip"
    z = step(m, torch.arange(4))  # unmixed: rows 0-3 written
    before = {k: v.clone() for k, v in m.store.state_dict().items()}
    step(m, torch.arange(4), MIX, seed=2)  # mixed: nothing written
    step(m, torch.arange(4, 8), MIX, seed=3)
    after = m.store.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert m.store.filled.tolist() == [True] * 4 + [False] * 4
    assert torch.allclose(m.store.final[:4], torch.softmax(z.detach(), 1), atol=1e-6)


@pytest.mark.parametrize("name", ["lsskd", "pskd"])
def test_store_mixed_store_writes_the_mixed_prediction(name):
    m = make(name, store_mixed="store")
    step(m, torch.arange(4))
    z = step(m, torch.arange(4), MIX, seed=2)
    assert torch.allclose(m.store.final[:4], torch.softmax(z.detach(), 1), atol=1e-6)
    step(m, torch.arange(4, 8), MIX, seed=3)
    assert m.store.filled.all()


def test_store_mixed_skip_with_every_batch_mixed_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="store_mixed=skip.*cutmix_prob=1.0.*nothing would ever be stored"):
        make("lsskd", cutmix_prob=1.0)
    make("lsskd", cutmix_prob=1.0, store_mixed="store")
    make("sad_ce", cutmix_prob=1.0)  # no store, nothing to skip
    make("lsskd", cutmix_prob=0.99)
    with pytest.raises(ConfigError, match="method.store_mixed. must be skip or store"):
        make("lsskd", store_mixed="never")


@pytest.fixture(scope="module")
def cell(cifar_bundle):
    """36 real CIFAR-100 training images (4 classes x 9): batch 16 leaves 4 over."""
    classes = [0, 1, 2, 3]
    tr, te = cifar_bundle.train.select_classes(classes), cifar_bundle.test.select_classes(classes)
    first = lambda ds, n: torch.cat([torch.nonzero(ds.y == c).flatten()[:n] for c in range(4)])
    return DataBundle(tr.subset(first(tr, 9)), te.subset(first(te, 4)), mean=cifar_bundle.mean,
                      std=cifar_bundle.std, modality="image")


@pytest.mark.parametrize("drop_last,filled,steps", [(True, 32, 2), (False, 36, 3)])
def test_drop_last_false_rewrites_every_row_each_epoch(cell, tmp_path, drop_last, filled, steps):
    cfg = build_config(None, [
        f"out_dir={tmp_path}", "model.name=resnet8", "method.name=pskd", "train.epochs=1",
        "train.batch_size=16", "train.eval_batch_size=64", "train.device=cpu", "train.progress=false",
        "train.tensorboard=false", f"train.drop_last={str(drop_last).lower()}"])
    tr = Trainer(cfg, bundle=cell)
    assert len(tr.iterator) == steps
    tr.fit()
    assert int(tr.method.store.filled.sum()) == filled
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["train_n"] == filled


def test_batch_iterator_last_batch_under_ddp():
    """Without drop_last each of W ranks takes an equal share of the short last batch
    (equal shapes for the collectives); fewer rows than ranks are skipped."""
    def ranks(n, world=2, bs=16):
        ds = ArrayDataset(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), ["a"])
        its = [BatchIterator(ds, bs, False, False, r, world) for r in range(world)]
        assert len({len(it) for it in its}) == 1
        return [[idx.tolist() for idx, _, _ in it.batches(it.order(None))] for it in its]

    r0, r1 = ranks(36)
    assert len(r0) == 3 and [len(b) for b in r0] == [8, 8, 2] == [len(b) for b in r1]
    assert sorted(sum(r0, []) + sum(r1, [])) == list(range(36))
    r0, r1 = ranks(33)  # one row over: it cannot be split across two ranks, so it is skipped
    assert len(r0) == 2 and sorted(sum(r0, []) + sum(r1, [])) == list(range(32))
    (only,) = ranks(33, world=1)
    assert [len(b) for b in only] == [16, 16, 1]
