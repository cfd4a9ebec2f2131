"""Baseline self-distillation methods: ls, tfkd, cskd, byot, kd.

Golden values are recomputed here from the papers' formulas with plain Python
math (no torch losses), then compared with the methods' loss terms.
"""
import json
import math

import pytest
import torch

from lsskd.config import build_config
from lsskd.errors import ConfigError
from lsskd.data import DataBundle, MixInfo, stratified_indices
from lsskd.engine import Trainer
from lsskd.engine.profile import count_macs, count_params
from lsskd.methods.byot import BeYourOwnTeacher
from lsskd.methods.cskd import ClassPairSampler, ClassWiseSelfKD
from lsskd.methods.kd import KnowledgeDistillation
from lsskd.methods.ls import LabelSmoothing
from lsskd.methods.tfkd import TeacherFreeKD
from lsskd.models import build_model
from lsskd.registry import METHODS


# --- plain-math references -----------------------------------------------------
def softmax(row, T=1.0):
    m = max(v / T for v in row)
    e = [math.exp(v / T - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def ce(row, q):
    """-sum_c q_c log softmax(row)_c"""
    p = softmax(row)
    return -sum(qc * math.log(pc) for qc, pc in zip(q, p))


def kl(p, q):
    return sum(pc * math.log(pc / qc) for pc, qc in zip(p, q) if pc > 0)


def onehot(y, C):
    return [1.0 if c == y else 0.0 for c in range(C)]


LOGITS = [[2.0, -1.0, 0.5, 0.0], [0.3, 0.2, -0.4, 1.5], [-2.0, 1.0, 3.0, 0.1]]
Y = [0, 3, 1]
C = 4


class FixedBackbone(torch.nn.Module):
    """Stands in for a backbone: returns fixed logits, ignoring the input."""

    num_classes = C

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, x):
        return self.logits


def run(method_cls, cfg, mix=None, logits=LOGITS, y=Y, **ctx):
    m = method_cls(FixedBackbone(logits), cfg, **ctx).train()
    out, losses = m(torch.zeros(len(y), 1), torch.tensor(y), torch.arange(len(y)), mix)
    return out, {k: float(v.detach()) for k, v in losses.items()}


# --- ls ------------------------------------------------------------------------
def test_ls_golden_and_cutmix():
    eps = 0.1
    q = [[(1 - eps) * o + eps / C for o in onehot(y, C)] for y in Y]
    want = sum(ce(z, qi) for z, qi in zip(LOGITS, q)) / 3
    _, losses = run(LabelSmoothing, {})
    assert losses == {"ce": pytest.approx(want, rel=1e-6)}

    # CutMix: row i's target = lam q_i + (1 - lam) q_perm(i); CE is linear in the target.
    perm, lam = [2, 0, 1], 0.7
    want_mix = sum(lam * ce(LOGITS[i], q[i]) + (1 - lam) * ce(LOGITS[i], q[perm[i]]) for i in range(3)) / 3
    _, losses = run(LabelSmoothing, {"epsilon": eps}, MixInfo(torch.tensor(perm), lam))
    assert losses["ce"] == pytest.approx(want_mix, rel=1e-6)
    assert abs(want_mix - want) > 0.1


def test_bad_config_values_raise_config_error():
    with pytest.raises(ConfigError, match="method.epsilon"):
        LabelSmoothing(FixedBackbone(LOGITS), {"epsilon": 1.5})
    with pytest.raises(ConfigError, match="method.epsilon"):
        LabelSmoothing(FixedBackbone(LOGITS), {"epsilon": "big"})
    with pytest.raises(ConfigError, match="method.temperature"):
        TeacherFreeKD(FixedBackbone(LOGITS), {"temperature": 3})
    with pytest.raises(ConfigError, match="method.correct_prob"):
        TeacherFreeKD(FixedBackbone(LOGITS), {"correct_prob": 0.0})
    with pytest.raises(ConfigError, match="method.T"):
        ClassWiseSelfKD(FixedBackbone(LOGITS), {"T": -1})


# --- tfkd ----------------------------------------------------------------------
def tfkd_reference(a, alpha, T, logits, targets_p, targets_y):
    total_ce, total_reg = 0.0, 0.0
    for z, p, yq in zip(logits, targets_p, targets_y):
        pT = [v ** (1 / T) for v in p]
        pT = [v / sum(pT) for v in pT]
        total_ce += (1 - alpha) * ce(z, yq)
        total_reg += alpha * T * T * kl(pT, softmax(z, T))
    return total_ce / len(logits), total_reg / len(logits)


def test_tfkd_golden_and_cutmix():
    a, alpha, T = 0.9, 0.1, 20.0
    vt = [[a if c == y else (1 - a) / (C - 1) for c in range(C)] for y in Y]
    want_ce, want_reg = tfkd_reference(a, alpha, T, LOGITS, vt, [onehot(y, C) for y in Y])
    _, losses = run(TeacherFreeKD, {})
    assert losses["ce"] == pytest.approx(want_ce, rel=1e-5)
    assert losses["reg"] == pytest.approx(want_reg, rel=1e-4)
    assert want_reg > 0.01

    # Non-default values go through the config.
    a2, alpha2, T2 = 0.7, 0.5, 3.0
    vt2 = [[a2 if c == y else (1 - a2) / (C - 1) for c in range(C)] for y in Y]
    want_ce2, want_reg2 = tfkd_reference(a2, alpha2, T2, LOGITS, vt2, [onehot(y, C) for y in Y])
    _, losses = run(TeacherFreeKD, {"correct_prob": a2, "alpha": alpha2, "T": T2})
    assert losses["ce"] == pytest.approx(want_ce2, rel=1e-5)
    assert losses["reg"] == pytest.approx(want_reg2, rel=1e-4)

    # CutMix: virtual teachers and one-hots mixed with weight lam before softening.
    perm, lam = [1, 2, 0], 0.6
    vt_mix = [[lam * vt[i][c] + (1 - lam) * vt[perm[i]][c] for c in range(C)] for i in range(3)]
    y_mix = [[lam * o + (1 - lam) * p for o, p in zip(onehot(Y[i], C), onehot(Y[perm[i]], C))] for i in range(3)]
    want_ce, want_reg = tfkd_reference(a, alpha, T, LOGITS, vt_mix, y_mix)
    _, losses = run(TeacherFreeKD, {}, MixInfo(torch.tensor(perm), lam))
    assert losses["ce"] == pytest.approx(want_ce, rel=1e-5)
    assert losses["reg"] == pytest.approx(want_reg, rel=1e-4)


# --- cskd ----------------------------------------------------------------------
def test_cskd_pairs_same_class_and_distinct():
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 1, 3, 0, 2])  # class 3 is a singleton
    sampler = ClassPairSampler(labels)
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(len(labels)).repeat(50)
    pairs = sampler(idx, g)
    assert torch.equal(labels[pairs], labels[idx])
    single = idx == 7
    assert torch.equal(pairs[single], idx[single])
    assert bool((pairs[~single] != idx[~single]).all())
    # Every other member of class 0 is drawn for sample 0 (uniform over the others).
    assert set(pairs[idx == 0].tolist()) == {2, 5, 8}
    # Reproducible from the generator.
    again = sampler(idx, torch.Generator().manual_seed(0))
    assert torch.equal(pairs, again)


def test_cskd_golden_loss_uses_pair_predictions():
    pair_logits = [[0.0, 1.0, 0.0, 0.5], [1.0, -1.0, 0.0, 2.0], [0.2, 2.5, 1.0, 0.0]]
    T, lam = 4.0, 1.0
    want_ce = sum(ce(z, onehot(y, C)) for z, y in zip(LOGITS, Y)) / 3
    want_cls = sum(lam * T * T * kl(softmax(zp, T), softmax(z, T)) for z, zp in zip(LOGITS, pair_logits)) / 3
    m = ClassWiseSelfKD(FixedBackbone(LOGITS), {}, train_labels=torch.tensor(Y)).train()

    class TwoPass(torch.nn.Module):
        """Rows 0..2 are the batch, rows 3..5 the pairs: returns the matching fixed logits."""

        def forward(self, x):
            return torch.tensor(LOGITS if x[0, 0] == 0 else pair_logits, requires_grad=True)

    m.backbone = TwoPass()
    x = torch.cat([torch.zeros(3, 1), torch.ones(3, 1)])
    logits, losses = m(x, torch.tensor(Y + Y), torch.arange(6), None)
    assert logits.shape == (3, C)
    assert losses["ce"].item() == pytest.approx(want_ce, rel=1e-6)
    assert losses["cls"].item() == pytest.approx(want_cls, rel=1e-5)


# --- byot ----------------------------------------------------------------------
def test_byot_exits_losses_and_deploy():
    torch.manual_seed(0)
    backbone = build_model("resnet8", 5)
    m = BeYourOwnTeacher(backbone, {"alpha": 0.3, "T": 3, "lambda": 0.03}).train()
    assert len(m.exits) == backbone.num_stages - 1 == 2
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0])
    shallow, h_deep, z_deep = m.all_exits(x)
    assert [tuple(h.shape) for h, _ in shallow] == [(6, backbone.feature_dim)] * 2
    assert [tuple(z.shape) for _, z in shallow] == [(6, 5)] * 2

    logits, losses = m(x, y, torch.arange(6), None)
    assert torch.allclose(logits, z_deep)  # train-mode BN: same batch, same outputs
    zs = z_deep.tolist()
    want_ce = sum(ce(z, onehot(t, 5)) for z, t in zip(zs, y.tolist())) / 6
    want_bce = want_kd = want_feat = 0.0
    for h, z in shallow:
        for i in range(6):
            want_bce += 0.7 * ce(z[i].tolist(), onehot(int(y[i]), 5)) / 6
            want_kd += 0.3 * 9 * kl(softmax(zs[i], 3), softmax(z[i].tolist(), 3)) / 6
            want_feat += 0.03 * sum((a - b) ** 2 for a, b in zip(h[i].tolist(), h_deep[i].tolist())) / 6
    assert losses["ce"].item() == pytest.approx(want_ce, rel=1e-4)
    assert losses["branch_ce"].item() == pytest.approx(want_bce, rel=1e-4)
    assert losses["branch_kd"].item() == pytest.approx(want_kd, rel=1e-3)
    assert losses["branch_feat"].item() == pytest.approx(want_feat, rel=1e-3)

    # Gradients reach the exits but the KD/hint targets (the deepest exit) are detached.
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in m.exits.parameters())

    # CutMix changes only the CE terms.
    _, mixed = m(x, y, torch.arange(6), MixInfo(torch.tensor([1, 2, 3, 4, 5, 0]), 0.5))
    assert mixed["ce"].item() != pytest.approx(losses["ce"].item(), rel=1e-3)
    assert mixed["branch_kd"].item() == pytest.approx(losses["branch_kd"].item(), rel=1e-4)

    m.eval()
    outs = m.eval_forward(x)[1]
    assert list(outs) == ["branch1", "branch2"]
    assert all(v.shape == (6, 5) for v in outs.values())
    deployed = m.deploy()
    assert deployed is backbone
    assert {id(p) for p in deployed.parameters()} == {id(p) for p in backbone.parameters()}
    assert count_params(deployed) == count_params(build_model("resnet8", 5))
    assert count_params(m) > count_params(deployed)
    assert m.training_macs((3, 32, 32)) > count_macs(deployed, (3, 32, 32))


# --- end to end through the Trainer -------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bundle(cifar_bundle):
    """3 images per CIFAR-100 class for training, 64 test images (real data)."""
    tr = cifar_bundle.train
    train = tr.subset(stratified_indices(tr.y, per_class=3, seed=0))
    test = cifar_bundle.test.subset(torch.arange(64))
    return DataBundle(train, test, mean=cifar_bundle.mean, std=cifar_bundle.std, modality="image")


def make_cfg(out_dir, method, *extra, steps=3, cutmix=0.0):
    return build_config(None, [
        f"out_dir={out_dir}", "model.name=resnet8", f"method.name={method}", *extra,
        "train.epochs=1", f"train.max_steps_per_epoch={steps}", "train.batch_size=32",
        "train.eval_batch_size=64", "train.device=cpu", "train.progress=false",
        "train.tensorboard=false", f"data.augment.cutmix_prob={cutmix}", "optim.lr=0.02",
    ])


@pytest.fixture(scope="module")
def teacher_ckpt(tiny_bundle, tmp_path_factory):
    """A resnet8 teacher written by the Trainer itself (2 steps of CE)."""
    out = tmp_path_factory.mktemp("teacher")
    Trainer(make_cfg(out, "ce", steps=2), bundle=tiny_bundle).fit()
    return out / "last.pt"


def test_kd_teacher_loading_and_golden_loss(teacher_ckpt, tiny_bundle):
    torch.manual_seed(0)
    student = build_model("resnet8", 100)
    m = KnowledgeDistillation(student, {"teacher_checkpoint": str(teacher_ckpt)},
                              input_shape=(3, 32, 32)).train()
    st = torch.load(teacher_ckpt, weights_only=True)
    t_params = dict(m.teacher.named_parameters())
    assert torch.equal(t_params["classifier.weight"], st["method"]["backbone.classifier.weight"])
    # The teacher is frozen, in eval mode and outside the student's state/params.
    assert not m.teacher.training and not any(p.requires_grad for p in m.teacher.parameters())
    assert all(k.startswith("backbone.") for k in m.state_dict())
    assert count_params(m) == count_params(student) == count_params(m.deploy())
    assert m.deploy() is student
    m.double()  # follows .to()/.double() like a submodule
    assert next(m.teacher.parameters()).dtype == torch.float64
    m.float()

    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([3, 50, 7, 99])
    logits, losses = m(x, y, torch.arange(4), None)
    with torch.no_grad():
        zt = m.teacher(x).tolist()
    zs = logits.tolist()
    T, alpha = 4.0, 0.9
    want_ce = sum((1 - alpha) * ce(z, onehot(t, 100)) for z, t in zip(zs, y.tolist())) / 4
    want_kd = sum(alpha * T * T * kl(softmax(a, T), softmax(b, T)) for a, b in zip(zt, zs)) / 4
    assert losses["ce"].item() == pytest.approx(want_ce, rel=1e-4)
    assert losses["kd"].item() == pytest.approx(want_kd, rel=1e-3)
    assert m.training_macs((3, 32, 32)) == 2 * count_macs(student, (3, 32, 32))

    with pytest.raises(ConfigError, match="method.teacher_checkpoint must name"):
        KnowledgeDistillation(build_model("resnet8", 100), {})
    with pytest.raises(ConfigError, match="not found"):
        KnowledgeDistillation(build_model("resnet8", 100), {"teacher_checkpoint": str(teacher_ckpt) + ".nope"})
    with pytest.raises(ConfigError, match="100 classes, the student 10"):
        KnowledgeDistillation(build_model("resnet8", 10), {"teacher_checkpoint": str(teacher_ckpt)})
    bad = list(tiny_bundle.classes)
    bad[5] = "not-a-class"
    with pytest.raises(ConfigError, match="index 5"):
        KnowledgeDistillation(build_model("resnet8", 100), {"teacher_checkpoint": str(teacher_ckpt)},
                              classes=bad)


def test_kd_refuses_a_teacher_whose_run_did_not_finish(teacher_ckpt, tmp_path):
    """A half-trained teacher is refused, naming the file, the epoch and the fix: a last.pt
    written before the run's last epoch, a mid-epoch snapshot, the best-so-far of a stopped run,
    and any checkpoint in a run directory that a live process still trains."""
    from lsskd.engine.checkpoint import load_checkpoint, save_checkpoint
    from lsskd.engine.runlock import RunLock

    def teacher(path):
        return KnowledgeDistillation(build_model("resnet8", 100), {"teacher_checkpoint": str(path)})

    st = load_checkpoint(teacher_ckpt)
    assert st["epoch"] == st["config"]["train"]["epochs"] == 1 and st["step"] == 0
    run = tmp_path / "stopped"
    stopped = dict(st, config={**st["config"], "train": {**st["config"]["train"], "epochs": 3}})
    save_checkpoint(stopped, run / "last.pt")  # the same run, interrupted after epoch 1 of 3
    with pytest.raises(ConfigError, match=r"teacher .*stopped/last.pt was saved after epoch 1 of 3: "
                                          r"its run did not finish; resume it \(lsskd train --resume"):
        teacher(run / "last.pt")
    save_checkpoint(dict(stopped, best={"epoch": 1, "top1": 5.0}), run / "best.pt")
    with pytest.raises(ConfigError, match=r"best.pt is the best epoch so far of a run that did not finish "
                                          r"\(.*last.pt stopped after epoch 1 of 3\)"):
        teacher(run / "best.pt")
    save_checkpoint(dict(st, step=2), tmp_path / "mid" / "last.pt")
    with pytest.raises(ConfigError, match="saved during epoch 2 of 1"):
        teacher(tmp_path / "mid" / "last.pt")
    with RunLock.acquire(teacher_ckpt.parent):
        with pytest.raises(ConfigError, match=r"is still being trained \(pid \d+"):
            teacher(teacher_ckpt)
    teacher(teacher_ckpt)  # finished and no longer held: accepted
    save_checkpoint(dict(stopped, epoch=3), run / "last.pt")  # the run, resumed to its end
    teacher(run / "best.pt")


@pytest.mark.parametrize("method,extra,cutmix", [
    ("ls", [], 1.0),
    ("tfkd", ["method.T=10"], 1.0),
    ("cskd", [], 0.5),
    ("byot", [], 1.0),
    ("kd", None, 1.0),
])
def test_trainer_end_to_end(method, extra, cutmix, tiny_bundle, teacher_ckpt, tmp_path):
    if extra is None:
        extra = [f"method.teacher_checkpoint={teacher_ckpt}"]
    cfg = make_cfg(tmp_path / method, method, *extra, cutmix=cutmix)
    summary = Trainer(cfg, bundle=tiny_bundle).fit()
    for key in ("test_top1", "test_top5", "params_deployed", "macs_deployed", "train_seconds"):
        assert key in summary
    assert summary["method"] == method
    assert summary["params_deployed"] == count_params(build_model("resnet8", 100))
    row = json.loads((tmp_path / method / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(row["train_loss"]) and row["train_loss"] > 0
    assert row["train_n"] == 3 * 32  # cskd: pair rows are not counted as samples
    terms = {"ls": ["ce"], "tfkd": ["ce", "reg"], "cskd": ["ce", "cls"],
             "byot": ["ce", "branch_ce", "branch_kd", "branch_feat"], "kd": ["ce", "kd"]}[method]
    assert sum(row[f"train_loss_{t}"] for t in terms) == pytest.approx(row["train_loss"], rel=1e-6)
    if method == "byot":
        assert len(summary["branch_top1"]) == 2 and "test_branch1_top1" in row
        assert summary["macs_train"] > summary["macs_deployed"]
    if method == "kd":
        assert summary["macs_train"] == 2 * summary["macs_deployed"]
        st = torch.load(tmp_path / method / "last.pt", weights_only=True)
        assert all(k.startswith("backbone.") for k in st["method"])


def test_registered_names():
    for name in ("ls", "tfkd", "cskd", "byot", "kd"):
        assert name in METHODS
        assert METHODS.get(name).__doc__ and "L =" in METHODS.get(name).__doc__
