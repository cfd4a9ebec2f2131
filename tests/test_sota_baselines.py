"""Issue 29's baselines: sla (SLA+SD), zipf_ls, dlb, ddgsd, and Mixup as a CE row.

Golden values are recomputed from the papers' formulas (as the official code computes them)
with plain Python math, then compared with the methods' loss terms; the trainer runs each
method end to end on real CIFAR images, and DLB resumes bit for bit."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lsskd.config import build_config
from lsskd.data import DataBundle, MixInfo
from lsskd.engine import Trainer
from lsskd.engine.profile import count_macs, count_params
from lsskd.errors import ConfigError
from lsskd.methods.ddgsd import DataDistortionSelfDistillation
from lsskd.methods.dlb import LastMiniBatchDistillation
from lsskd.methods.hsakd import HSAKD
from lsskd.methods.mixskd import MixupSelfKD
from lsskd.methods.sla import SelfSupervisedLabelAugmentation, aggregated_logits
from lsskd.methods.zipf import ZipfLabelSmoothing, dense_votes, drop_target, min_ranks, zipf_targets
from lsskd.models import build_model
from lsskd.registry import METHODS


# --- plain-math references -----------------------------------------------------
def softmax(row, T=1.0):
    m = max(v / T for v in row)
    e = [math.exp(v / T - m) for v in row]
    return [v / sum(e) for v in e]


def ce(row, y):
    return -math.log(softmax(row)[y])


def kl(p, q):
    return sum(pc * math.log(pc / qc) for pc, qc in zip(p, q) if pc > 0)


def kd(student, teacher, T):
    """T^2 KL(softmax(teacher / T) || softmax(student / T)) for one row."""
    return T * T * kl(softmax(teacher, T), softmax(student, T))


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


LOGITS = [[2.0, -1.0, 0.5, 0.0], [0.3, 0.2, -0.4, 1.5], [-2.0, 1.0, 3.0, 0.1], [0.0, 0.5, 0.5, -1.0]]
Y = [0, 3, 1, 2]
C = 4


class Linearish(nn.Module):
    """Stands in for a staged backbone whose input rows *are* its logits and pooled features
    (one scale parameter, so there is a gradient): forward_features(x) = ([x], x, x)."""

    num_classes = C

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward_features(self, x):
        return [x], x * self.scale, x * self.scale

    def forward_stages(self, x):
        return [x * self.scale]

    def head(self, last):
        return last, last

    def forward(self, x):
        return x * self.scale


def losses_of(out):
    return {k: float(v.detach()) for k, v in out[1].items()}


# --- sla -----------------------------------------------------------------------------
def test_sla_aggregation_by_hand():
    # B = 1, M = 2, C = 2: joint columns are (c0,k0) (c0,k1) (c1,k0) (c1,k1).
    joint = torch.tensor([[1.0, 2.0, 3.0, 4.0],  # view 0 reads columns 0 and 2
                          [5.0, 6.0, 7.0, 8.0]])  # view 1 reads columns 1 and 3
    assert aggregated_logits(joint, 1, 2).tolist() == [[(1 + 6) / 2, (3 + 8) / 2]]


def test_sla_sd_loss_matches_the_official_formula():
    torch.manual_seed(0)
    m = SelfSupervisedLabelAugmentation(build_model("resnet8", 3), {}, num_train=8).train()
    B, M = 2, 4
    x, y = torch.randn(B, 3, 32, 32), torch.tensor([2, 0])
    logits, losses = m(x, y, torch.arange(B), None)
    with torch.no_grad():  # same input, same batch statistics: the same features
        h = m._features(torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]))
        joint = m.joint(h).tolist()
        z = m.backbone.classifier(h[:B]).tolist()
    assert torch.allclose(logits, torch.tensor(z), atol=1e-5)
    joint_ce = mean(ce(joint[k * B + i], y[i] * M + k) for k in range(M) for i in range(B))
    agg = [[mean(joint[k * B + i][c * M + k] for k in range(M)) for c in range(3)] for i in range(B)]
    want = {"joint_ce": joint_ce, "ce": mean(ce(z[i], y[i]) for i in range(B)),
            "sd": mean(kd(z[i], agg[i], 1.0) for i in range(B))}
    got = {k: float(v) for k, v in losses.items()}
    assert got == {k: pytest.approx(v, rel=1e-4) for k, v in want.items()}
    # The teacher is detached: the sd term's gradient reaches the plain head, not the joint head.
    m.zero_grad()
    losses["sd"].backward()
    assert m.joint.weight.grad is None or float(m.joint.weight.grad.abs().sum()) == 0.0
    assert float(m.backbone.classifier.weight.grad.abs().sum()) > 0


def test_sla_eval_reports_si_and_aggregation_and_deploys_the_backbone():
    torch.manual_seed(1)
    m = SelfSupervisedLabelAugmentation(build_model("resnet8", 5), {}).eval()
    x = torch.randn(3, 3, 32, 32)
    logits, outs = m.eval_forward(x)
    assert torch.equal(logits, m.backbone(x)) and m.deploy() is m.backbone
    assert set(outs) == {"sla_si", "sla_ag_4pass"}
    per_view = [m.joint(m._features(torch.rot90(x, k, dims=(-2, -1)))) for k in range(4)]
    assert torch.allclose(outs["sla_si"], per_view[0][:, 0::4], atol=1e-5)
    agg = sum(v[:, k::4] for k, v in enumerate(per_view)) / 4
    assert torch.allclose(outs["sla_ag_4pass"], agg, atol=1e-5)
    # Training costs the backbone on 4 views (plus the small heads).
    dep = count_macs(m.backbone, (3, 32, 32))
    assert 4 * dep < m.training_macs((3, 32, 32)) < 4.05 * dep
    with pytest.raises(ConfigError, match="one view"):
        SelfSupervisedLabelAugmentation(build_model("resnet8", 5), {"views": "identity"})


# --- zipf_ls ---------------------------------------------------------------------------
def test_zipf_ranks_and_targets_by_hand():
    assert min_ranks(torch.tensor([[3.0, 1.0, 3.0, 0.0]])).tolist() == [[1, 3, 1, 4]]
    # Many ties (dense votes): 1 + the number of strictly higher scores, as a pairwise count gives.
    votes = torch.randint(0, 4, (20, 30), generator=torch.Generator().manual_seed(0)).float()
    assert torch.equal(min_ranks(votes), 1 + (votes[:, None, :] > votes[:, :, None]).sum(-1))
    # y = 0: the non-target classes 1, 2, 3 have ranks 3, 1, 4 -> p ∝ 1/3, 1, 1/4.
    p = zipf_targets(torch.tensor([[3.0, 1.0, 3.0, 0.0]]), torch.tensor([0]))
    s = 1 / 3 + 1 + 1 / 4
    assert p.tolist()[0] == pytest.approx([1 / 3 / s, 1 / s, 1 / 4 / s])
    p2 = zipf_targets(torch.tensor([[3.0, 1.0, 3.0, 0.0]]), torch.tensor([0]), power=2.0)
    s2 = 1 / 9 + 1 + 1 / 16
    assert p2.tolist()[0] == pytest.approx([1 / 9 / s2, 1 / s2, 1 / 16 / s2])
    assert drop_target(torch.tensor([[0.0, 1, 2, 3]]), torch.tensor([2])).tolist() == [[0, 1, 3]]


def test_zipf_dense_votes_count_per_position_argmax():
    lin = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    bb = type("B", (), {"final": nn.Identity(), "classifier": lin, "num_classes": 3})()
    # One sample, 2 channels, 2x2 positions: (1,0)->class 0, (0,2)->1, (-1,-1)->2, (3,1)->0.
    fmap = torch.tensor([[[[1.0, 0.0], [-1.0, 3.0]], [[0.0, 2.0], [-1.0, 1.0]]]])
    assert dense_votes(bb, fmap).tolist() == [[2.0, 1.0, 1.0]]


def test_zipf_ls_loss_by_hand_with_logit_ranks_and_mix():
    m = ZipfLabelSmoothing(Linearish(), {"rank_by": "logits"}).train()
    x = torch.tensor(LOGITS)
    out = m(x, torch.tensor(Y), torch.arange(4), None)
    want_zipf = []
    for z, y in zip(LOGITS, Y):
        ranks = [1 + sum(o > v for o in z) for v in z]
        w = [1 / r for c, r in enumerate(ranks) if c != y]
        p = [v / sum(w) for v in w]
        want_zipf.append(kl(p, softmax([v for c, v in enumerate(z) if c != y])))
    want = {"ce": mean(ce(z, y) for z, y in zip(LOGITS, Y)), "zipf": 0.1 * mean(want_zipf)}
    assert losses_of(out) == {k: pytest.approx(v, rel=1e-6) for k, v in want.items()}
    # Mixed batch: CE against the mixed one-hot targets, the Zipf term unchanged.
    mix = MixInfo(perm=torch.tensor([1, 0, 3, 2]), lam=0.7)
    got = losses_of(m(x, torch.tensor(Y), torch.arange(4), mix))
    perm = [1, 0, 3, 2]
    want_ce = mean(0.7 * ce(LOGITS[i], Y[i]) + 0.3 * ce(LOGITS[i], Y[perm[i]]) for i in range(4))
    assert got == {"ce": pytest.approx(want_ce, rel=1e-6), "zipf": pytest.approx(want["zipf"], rel=1e-6)}
    with pytest.raises(ConfigError, match="'method.rank_by' must be dense or logits"):
        ZipfLabelSmoothing(Linearish(), {"rank_by": "soft"})


def test_zipf_ls_dense_on_a_real_backbone():
    torch.manual_seed(0)
    m = ZipfLabelSmoothing(build_model("resnet8", 10), {}).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits, losses = m(x, y, torch.arange(4), None)
    assert set(losses) == {"ce", "zipf"} and float(losses["zipf"]) > 0
    # resnet8's final map is 8x8: 64 votes per image; the dense classifier costs 64x its head.
    with torch.no_grad():
        votes = dense_votes(m.backbone, m.backbone.forward_stages(x)[-1])
    assert votes.sum(1).tolist() == [64.0] * 4
    extra = m.training_macs((3, 32, 32)) - count_macs(m.backbone, (3, 32, 32))
    assert extra == 64 * m.backbone.feature_dim * 10


# --- dlb --------------------------------------------------------------------------------
def test_dlb_two_steps_by_hand():
    m = LastMiniBatchDistillation(Linearish(), {}).train()
    T = 3.0
    # Step 1: no previous batch, a CE step; its rows are kept after the step.
    assert m.sample_extra(torch.tensor([4, 7]), None, None) is None
    out = m(torch.tensor(LOGITS[:2]), torch.tensor(Y[:2]), torch.tensor([4, 7]), None)
    assert losses_of(out) == {"ce": pytest.approx(mean(ce(LOGITS[i], Y[i]) for i in range(2))), "dlb": 0.0}
    m.after_step()
    assert m.sample_extra(torch.tensor([1, 2]), None, None).tolist() == [4, 7]
    # Step 2: new rows 2, 3, then samples 4 and 7 again under another augmentation.
    again = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 1.0]]
    x = torch.tensor(LOGITS[2:] + again)
    y = torch.tensor(Y[2:] + Y[:2])
    logits, losses = m(x, y, torch.tensor([1, 2, 4, 7]), None)
    assert torch.equal(logits, torch.tensor(LOGITS[2:]))
    rows = LOGITS[2:] + again
    want = {"ce": mean(ce(r, t) for r, t in zip(rows, Y[2:] + Y[:2])),
            "dlb": mean(kd(again[i], LOGITS[i], T) for i in range(2))}
    assert {k: float(v) for k, v in losses.items()} == {k: pytest.approx(v, rel=1e-6) for k, v in want.items()}
    # A skipped step (no after_step) keeps the older batch.
    assert m.sample_extra(None, None, None).tolist() == [4, 7]
    m.after_step()
    assert m.sample_extra(None, None, None).tolist() == [1, 2]
    # The chain travels in the state dict.
    m2 = LastMiniBatchDistillation(Linearish(), {})
    m2.load_state_dict(m.state_dict())
    assert m2.prev_idx.tolist() == [1, 2] and torch.equal(m2.prev_logits, m.prev_logits)


# --- ddgsd ------------------------------------------------------------------------------
def test_ddgsd_loss_by_hand():
    m = DataDistortionSelfDistillation(Linearish(), {}).train()
    assert m.sample_extra(torch.tensor([3, 5]), None, None).tolist() == [3, 5]
    v1, v2 = LOGITS[:2], LOGITS[2:]
    logits, losses = m(torch.tensor(v1 + v2), torch.tensor([0, 3, 0, 3]), torch.tensor([3, 5, 3, 5]), None)
    assert torch.equal(logits, torch.tensor(v1))
    T = 4.0
    want = {"ce": 0.5 * mean(ce(r, t) for r, t in zip(v1 + v2, [0, 3, 0, 3])),
            "kl": mean(kd(v1[i], v2[i], T) for i in range(2)) + mean(kd(v2[i], v1[i], T) for i in range(2)),
            "mmd": 5e-4 * (mean(sum(v1, [])) - mean(sum(v2, []))) ** 2}
    assert {k: float(v) for k, v in losses.items()} == {k: pytest.approx(v, rel=1e-6) for k, v in want.items()}


# --- mixskd ------------------------------------------------------------------------------
def test_mixskd_loss_from_the_paper_formula():
    torch.manual_seed(0)
    m = MixupSelfKD(build_model("resnet8", 3), {}).train()
    B, T, lam, perm = 3, 3.0, 0.7, [2, 0, 1]
    x, y = torch.randn(B, 3, 32, 32), [2, 0, 1]
    xm = lam * x + (1 - lam) * x[perm]
    m._mix = lambda _x: (xm, MixInfo(perm=torch.tensor(perm), lam=lam))
    logits, losses = m(x, torch.tensor(y), torch.arange(B), None)
    with torch.no_grad():
        maps, zs = m.levels(torch.cat([x, xm]))
        bar_f = [lam * f[:B] + (1 - lam) * f[:B][perm] for f in maps]
        g_bar, g_mix = m.teacher(bar_f).tolist(), m.teacher([f[B:] for f in maps]).tolist()
    zs = [z.tolist() for z in zs]
    orig = [z[:B] for z in zs]
    mixd = [z[B:] for z in zs]
    bar = [[[lam * a + (1 - lam) * b for a, b in zip(z[i], z[perm[i]])] for i in range(B)] for z in orig]
    ce_mix = lambda row, i: lam * ce(row, y[i]) + (1 - lam) * ce(row, y[perm[i]])
    want = {
        "ce": sum(mean(ce(z[i], y[i]) for i in range(B)) for z in orig),
        "mix_ce": sum(mean(ce_mix(z[i], i) for i in range(B)) for z in mixd + [g_bar, g_mix]),
        "kl": mean(kd(bar[-1][i], g_mix[i], T) for i in range(B)) + mean(kd(mixd[-1][i], g_bar[i], T) for i in range(B))
        + sum(mean(kd(b[i], t[i], T) + kd(t[i], b[i], T) for i in range(B)) for b, t in zip(bar[:-1], mixd[:-1])),
        "feat": sum(float(((b - f[B:]) ** 2).mean()) for b, f in zip(bar_f, maps)),
    }
    assert {k: float(v) for k, v in losses.items()} == {k: pytest.approx(v, rel=1e-4) for k, v in want.items()}
    assert torch.allclose(logits, torch.tensor(orig[-1]), atol=1e-5)
    # The self-teacher learns from the Mixup CE only; without it (the official code's loss) it gets no gradient.
    m2 = MixupSelfKD(build_model("resnet8", 3), {"mix_ce": False}).train()
    m2._mix = m._mix
    _, l2 = m2(x, torch.tensor(y), torch.arange(B), None)
    assert set(l2) == {"ce", "kl", "feat"}
    sum(l2.values()).backward()
    assert m2.teacher.fuse.weight.grad is None
    with pytest.raises(ConfigError, match="mixskd mixes its own batches"):
        MixupSelfKD(build_model("resnet8", 3), {}, cutmix_prob=1.0)


def test_mixskd_gate_scales_every_term_but_the_heads_ce():
    torch.manual_seed(0)
    B, lam, perm = 3, 0.7, [2, 0, 1]
    x, y = torch.randn(B, 3, 32, 32), torch.tensor([2, 0, 1])
    mix = lambda _x: (lam * x + (1 - lam) * x[perm], MixInfo(perm=torch.tensor(perm), lam=lam))
    plain = MixupSelfKD(build_model("resnet8", 3), {}).train()
    gated = MixupSelfKD(build_model("resnet8", 3), {"gate": "fit", "gate_floor": 0.5}).train()
    gated.load_state_dict(plain.state_dict(), strict=False)  # the gate's buffers are gated's own
    plain._mix = gated._mix = mix
    gated.on_epoch_end({"top1": 75.0})  # g = (0.75 - 0.5) / (1 - 0.5) = 0.5
    assert gated.gate() == 0.5 and gated.schedule_stats() == {"gate": 0.5}
    z, full = plain(x, y, torch.arange(B), None)
    _, half = gated(x, y, torch.arange(B), None)
    head_ce = float(F.cross_entropy(z, y))  # the head on the originals (batch-norm over [x; x~])
    assert float(half["ce"]) == pytest.approx(head_ce + 0.5 * (float(full["ce"]) - head_ce), rel=1e-5)
    for k in ("kl", "feat", "mix_ce"):
        assert float(half[k]) == pytest.approx(0.5 * float(full[k]), rel=1e-6)
    # Shut (training top-1 under the floor): CE's loss, the backbone alone, no Mixup draw.
    gated.on_epoch_end({"top1": 40.0})
    gated._mix = None
    z, shut = gated(x, y, torch.arange(B), None)
    with torch.no_grad():
        alone = gated.backbone(x)  # batch-norm over x only: no Mixup rows went through
    assert list(shut) == ["ce"] and torch.allclose(z, alone, atol=1e-6)
    assert float(shut["ce"]) == pytest.approx(float(F.cross_entropy(alone, y)), rel=1e-6)
    assert gated.may_leave_params_unused and not plain.may_leave_params_unused
    assert "gating.fit_acc" not in plain.state_dict()  # the paper's method keeps its checkpoint keys
    with pytest.raises(ConfigError, match="method.gate=gap reads the held-out split"):
        MixupSelfKD(build_model("resnet8", 3), {"gate": "gap"})


def test_shut_mixskd_gate_trains_ces_model_bit_for_bit(cell, tmp_path, capsys):
    ce = Trainer(cfg_for(tmp_path / "ce", "ce"), bundle=cell)
    a = ce.fit()
    gated = Trainer(cfg_for(tmp_path / "gated", "mixskd", "method.gate=fit", "method.gate_floor=0.99"),
                    bundle=cell)
    b = gated.fit()
    assert b["gate_max"] == 0.0 and "mixskd gate never opened" in capsys.readouterr().err
    sa, sb = ce.method.backbone.state_dict(), gated.method.backbone.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and b["test_top1"] == a["test_top1"]


# --- through the trainer ----------------------------------------------------------------
@pytest.fixture(scope="module")
def cell(cifar_bundle):
    classes = [0, 1, 2, 3]
    tr, te = cifar_bundle.train.select_classes(classes), cifar_bundle.test.select_classes(classes)
    first = lambda ds, n: torch.cat([torch.nonzero(ds.y == c).flatten()[:n] for c in range(4)])
    return DataBundle(tr.subset(first(tr, 12)), te.subset(first(te, 10)), mean=cifar_bundle.mean,
                      std=cifar_bundle.std, modality="image")


def cfg_for(out, method, *extra):
    return build_config(None, [
        f"out_dir={out}", "model.name=resnet8", f"method.name={method}", *extra, "train.epochs=2",
        "train.batch_size=16", "train.eval_batch_size=50", "train.device=cpu", "train.threads=1",
        "train.progress=false", "train.tensorboard=false", "optim.lr=0.05"])


@pytest.mark.parametrize("method,extra,terms", [
    ("sla", [], ["joint_ce", "ce", "sd"]),
    ("zipf_ls", ["data.augment.cutmix_prob=0.5"], ["ce", "zipf"]),
    ("dlb", ["data.augment.mixup_alpha=0.4"], ["ce", "dlb"]),
    ("ddgsd", [], ["ce", "kl", "mmd"]),
    ("mixskd", [], ["ce", "kl", "feat", "mix_ce"]),
    ("ce", ["data.augment.mixup_alpha=0.4"], ["ce"]),
])
def test_trainer_end_to_end(method, extra, terms, cell, tmp_path, cifar_root):
    summary = Trainer(cfg_for(tmp_path / method, method, *extra), bundle=cell).fit()
    assert summary["method"] == method
    assert summary["params_deployed"] == count_params(build_model("resnet8", 4))
    rows = [json.loads(ln) for ln in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["train_n"] == 3 * 16  # 48 images, batch 16: extra rows are not samples
        assert sum(row[f"train_loss_{t}"] for t in terms) == pytest.approx(row["train_loss"], rel=1e-6)
        assert math.isfinite(row["train_loss"])
    if method == "sla":
        assert "test_sla_ag_4pass_top1" in rows[-1] and "test_sla_si_top1" in rows[-1]
        assert summary["macs_train"] > 4 * summary["macs_deployed"]
        # lsskd eval reports the extra heads too (the 4-class cell's full test split)
        from lsskd.engine.evaluation import evaluate_checkpoint

        res = evaluate_checkpoint(tmp_path / method / "last.pt", device="cpu",
                                  overrides=[f"data.root={cifar_root}", "data.classes=4"])
        assert {"sla_ag_4pass_top1", "sla_si_top1"} <= set(res) and 0 <= res["sla_ag_4pass_top1"] <= 100
    if method == "dlb":  # every step after the run's first distils from the previous batch
        assert rows[0]["train_loss_dlb"] > 0 and rows[1]["train_loss_dlb"] > 0
    if method in ("dlb", "ddgsd"):
        assert summary["macs_train"] == 2 * summary["macs_deployed"]
    if method == "ce":  # Mixup changes the run; the context says every batch is mixed
        plain = Trainer(cfg_for(tmp_path / "plain", "ce"), bundle=cell)
        assert plain.method.context.cutmix_prob == 0.0
        mixed = Trainer(cfg_for(tmp_path / "mixed", "ce", *extra), bundle=cell)
        assert mixed.method.context.cutmix_prob == 1.0
        plain.fit()
        first = lambda run: json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]
        assert first(tmp_path / "plain") != first(tmp_path / method)


def test_dlb_resumes_its_chain_exactly(cell, tmp_path):
    want = Trainer(cfg_for(tmp_path / "ref", "dlb", "train.ckpt_every_steps=1"), bundle=cell).fit()
    run = tmp_path / "run"
    tr = Trainer(cfg_for(run, "dlb", "train.ckpt_every_steps=1"), bundle=cell)
    orig, n = tr._train_step, [0]

    class Stop(Exception):
        pass

    def step(*a):
        n[0] += 1
        if n[0] == 5:  # epoch 2, second step: the checkpoint holds step 1's batch and logits
            raise Stop
        return orig(*a)

    tr._train_step = step
    with pytest.raises(Stop):
        tr.fit()
    tr2 = Trainer(cfg_for(run, "dlb", "train.ckpt_every_steps=1"), resume=True, bundle=cell)
    assert tr2.method.prev_idx is not None and len(tr2.method.prev_idx) == 16
    got = tr2.fit()
    timing = {"train_seconds", "epoch_seconds", "img_per_s"}
    assert {k: v for k, v in got.items() if k not in timing} == {k: v for k, v in want.items() if k not in timing}


# --- hsakd --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sad_ce_teacher(cell, tmp_path_factory):
    """A resnet8 SAD-CE teacher (branches included) written by the Trainer, and a CE one."""
    root = tmp_path_factory.mktemp("hsakd_teachers")
    for method in ("sad_ce", "ce"):
        Trainer(cfg_for(root / method, method, "train.epochs=1", "train.max_steps_per_epoch=1"), bundle=cell).fit()
    return root / "sad_ce" / "last.pt", root / "ce" / "last.pt"


def test_hsakd_loss_from_the_official_formula(sad_ce_teacher, cell):
    torch.manual_seed(0)
    ctx = dict(classes=tuple(cell.classes), input_shape=(3, 32, 32))
    m = HSAKD(build_model("resnet8", 4), {"teacher_checkpoint": str(sad_ce_teacher[0])}, **ctx).train()
    # The teacher is the checkpoint's backbone and branches, frozen, outside the state dict.
    st = torch.load(sad_ce_teacher[0], weights_only=True)["method"]
    assert torch.equal(m.teacher.aux[1].head.weight, st["aux.1.head.weight"])
    assert not any(k.startswith("_teacher") for k in m.state_dict()) and not m.teacher.training
    assert all(not p.requires_grad for p in m.teacher.parameters())
    B, T = 2, 3.0
    x, y = torch.randn(B, 3, 32, 32), [3, 1]
    logits, losses = m(x, torch.tensor(y), torch.arange(B), None)
    xv = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)])
    with torch.no_grad():
        z, s = m.student(xv)
        tz, ts = m.teacher(xv)
    z, tz = z.tolist(), tz.tolist()
    want = {"ce": mean(ce(z[i], y[i]) for i in range(B)),
            "kd": mean(kd(z[r], tz[r], T) for r in range(4 * B)),
            "branch_kd": sum(mean(kd(a.tolist()[r], b.tolist()[r], T) for r in range(4 * B)) for a, b in zip(s, ts))}
    assert {k: float(v) for k, v in losses.items()} == {k: pytest.approx(v, rel=1e-4) for k, v in want.items()}
    assert len(s) == 3 and s[0].shape == (4 * B, 16)
    # A teacher without branches, or trained on other classes, is refused before training.
    with pytest.raises(ConfigError, match="has no branches: train the teacher with method.name=sad_ce"):
        HSAKD(build_model("resnet8", 4), {"teacher_checkpoint": str(sad_ce_teacher[1])}, **ctx)
    with pytest.raises(ConfigError, match="different classes"):
        HSAKD(build_model("resnet8", 4), {"teacher_checkpoint": str(sad_ce_teacher[0])},
              classes=("a", "b", "c", "d"), input_shape=(3, 32, 32))
    with pytest.raises(ConfigError, match="must name a checkpoint .* for method 'hsakd'"):
        HSAKD(build_model("resnet8", 4), {})


def test_hsakd_trains_end_to_end(sad_ce_teacher, cell, tmp_path):
    cfg = cfg_for(tmp_path / "h", "hsakd", f"method.teacher_checkpoint={sad_ce_teacher[0]}")
    summary = Trainer(cfg, bundle=cell).fit()
    row = json.loads((tmp_path / "h" / "metrics.jsonl").read_text().splitlines()[-1])
    assert sum(row[f"train_loss_{t}"] for t in ("ce", "kd", "branch_kd")) == pytest.approx(row["train_loss"], rel=1e-6)
    assert "test_branch3_top1" in row and row["train_n"] == 48
    assert summary["params_deployed"] == count_params(build_model("resnet8", 4))
    st = torch.load(tmp_path / "h" / "last.pt", weights_only=True)
    assert all(k.startswith(("backbone.", "aux.")) for k in st["method"])
    # student and teacher, each with branches, on 4 views
    assert summary["macs_train"] > 8 * summary["macs_deployed"]


def test_registered_with_formula_docstrings():
    for name in ("sla", "zipf_ls", "dlb", "ddgsd", "mixskd", "hsakd"):
        doc = METHODS.get(name).__doc__
        # the formula, and the code it was checked against
        assert "L =" in doc and "checked against" in doc and "Paper:" in doc, name


def test_bench_loads_the_extra_rows_a_method_asks_for():
    """lsskd bench feeds sample_extra's rows as the trainer does: DLB's previous batch, DDGSD's
    second view and CS-KD's pairs are trained on (CS-KD failed in bench before)."""
    from lsskd.bench import run_bench

    rep = run_bench("resnet8", 4, ["ce", "dlb", "ddgsd", "cskd"], steps=2, warmup=1, isolate=False)
    ratio = {r["method"]: r["flops_ratio"] for r in rep["results"]}
    assert ratio == {"ce": 1.0, "dlb": 2.0, "ddgsd": 2.0, "cskd": 2.0}
    assert all(r["step_ms"] > 0 for r in rep["results"])
