"""LSSKD / PS-KD / SAD-CE: golden loss values, store semantics, switches, deploy."""

import pytest
import torch
import torch.nn.functional as F

from lsskd.methods.losses import kl_div, progressive_target
from lsskd.methods.transforms import Rotations, ViewFamily
from lsskd.models import build_model
from lsskd.registry import METHODS


def make(name="lsskd", num_train=16, has_val=False, **cfg):
    torch.manual_seed(0)
    return METHODS.build(name, build_model("resnet8", 10), cfg, num_train=num_train, has_val=has_val)


def test_rotation_views_and_joint_labels():
    x = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).view(2, 1, 2, 2)
    v = Rotations()(x)
    assert v.shape == (8, 1, 2, 2)
    assert torch.equal(v[:2], x)
    assert torch.equal(v[2:4], torch.rot90(x, 1, (-2, -1)))
    assert torch.equal(v[6:8], torch.rot90(x, 3, (-2, -1)))
    y = torch.tensor([3, 7])
    # view-major: rows k*B + i have label y_i * 4 + k
    assert ViewFamily.joint_labels(y, 4).tolist() == [12, 28, 13, 29, 14, 30, 15, 31]


def test_alpha_schedule_and_first_epoch_hard_targets():
    m = make(alpha_T=0.8)
    m.train()
    m.on_epoch_start(1, 4)
    assert m.alpha() == pytest.approx(0.2)
    m.on_epoch_start(4, 4)
    assert m.alpha() == pytest.approx(0.8)
    # Nothing stored yet: the softened target equals the one-hot label whatever alpha is.
    onehot = F.one_hot(torch.tensor([1, 2]), 10).float()
    prev, filled = m.store.get_final(torch.tensor([0, 1]))
    t = progressive_target(onehot, prev, m.row_alpha(filled, m.alpha(), None))
    assert torch.equal(t, onehot)


def test_progressive_target_golden():
    # Eqs. (1)-(2) by hand: (1 - 0.4) * [0, 1, 0] + 0.4 * [0.2, 0.5, 0.3] = [0.08, 0.8, 0.12];
    # a row with nothing stored keeps its hard label; confidence scales alpha per row.
    m = make()
    hard = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    prev = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.5, 0.25, 0.25]])
    a = m.row_alpha(torch.tensor([True, False, True]), 0.4, torch.tensor([1.0, 1.0, 0.5]))
    assert a.flatten().tolist() == pytest.approx([0.4, 0.0, 0.2])
    t = progressive_target(hard, prev, a)
    assert torch.allclose(t, torch.tensor([[0.08, 0.8, 0.12], [1.0, 0.0, 0.0], [0.9, 0.05, 0.05]]))
    assert torch.allclose(t.sum(1), torch.ones(3))


def _batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.tensor([0, 3, 5, 9])[:n], torch.arange(n)


def test_sad_ce_loss_equals_hand_composed_terms():
    """SAD-CE: L = CE(z, y) + beta * sum_l CE(s_l, onehot(y*M + k)) on the same forward."""
    m = make("sad_ce", beta=0.5)
    m.train()
    x, y, idx = _batch()
    torch.manual_seed(5)
    z, losses = m(x, y, idx)
    assert set(losses) == {"final", "hier"}
    torch.manual_seed(5)
    z2, h, outs = m.forward_all(x)
    joint = ViewFamily.joint_labels(y, 4)
    # BN in train mode is deterministic for the same input, so the forward repeats exactly.
    assert torch.allclose(z, z2)
    assert float(losses["final"]) == pytest.approx(float(F.cross_entropy(z2, y)), rel=1e-5)
    hier = sum(float(F.cross_entropy(s, joint)) for _, s in outs)
    assert float(losses["hier"]) == pytest.approx(0.5 * hier, rel=1e-5)


def test_lsskd_kl_and_feat_terms_match_formula():
    m = make("lsskd", kl_weight=2.0, gamma=0.3, tau=3.0)
    m.train()
    x, y, idx = _batch()
    _, losses = m(x, y, idx)
    _, h, outs = m.forward_all(x)
    kl = sum(float(kl_div(outs[l][1], outs[-1][1], 3.0)) for l in range(len(outs) - 1))
    assert float(losses["kl"]) == pytest.approx(2.0 * kl, rel=1e-4)
    feat = sum(float(((hl - h) ** 2).sum(1).mean() / h.shape[1]) for hl, _ in outs)
    assert float(losses["feat"]) == pytest.approx(0.3 * feat, rel=1e-4)
    # kl_mode=next: branch l is taught by branch l+1
    m.cfg["kl_mode"] = "next"
    _, losses = m(x, y, idx)
    kl_next = sum(float(kl_div(outs[l][1], outs[l + 1][1], 3.0)) for l in range(len(outs) - 1))
    assert float(losses["kl"]) == pytest.approx(2.0 * kl_next, rel=1e-4)


def test_store_written_after_step_without_grad_and_used_next_epoch():
    m = make("lsskd", num_train=8)
    m.train()
    m.on_epoch_start(1, 2)
    x, y, idx = _batch()
    z, losses = m(x, y, idx)
    assert not m.store.filled.any()  # nothing written before after_step
    sum(losses.values()).backward()
    m.after_step()
    assert m.store.filled[:4].all() and not m.store.filled[4:].any()
    for buf in (m.store.final, m.store.branches):
        assert not buf.requires_grad and buf.grad_fn is None
    assert torch.allclose(m.store.final[:4], F.softmax(z.detach(), 1), atol=1e-6)
    assert torch.allclose(m.store.branches.sum(-1)[:, :4], torch.ones(3, 4, 4), atol=1e-5)
    # epoch 2 of 2: alpha = 0.8; the final target mixes onehot with the stored P
    m.on_epoch_start(2, 2)
    prev, filled = m.store.get_final(idx)
    t = progressive_target(F.one_hot(y, 10).float(), prev, m.row_alpha(filled, m.alpha(), None))
    assert torch.allclose(t, 0.2 * F.one_hot(y, 10).float() + 0.8 * F.softmax(z.detach(), 1), atol=1e-6)


def test_store_round_trips_through_state_dict():
    m = make("lsskd", num_train=8)
    m.train()
    x, y, idx = _batch()
    _, losses = m(x, y, idx)
    sum(losses.values()).backward()
    m.after_step()
    m2 = make("lsskd", num_train=8)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.store.final, m.store.final)
    assert torch.equal(m2.store.branches, m.store.branches)
    assert torch.equal(m2.store.filled, m.store.filled)


def test_switches_give_the_named_ablations():
    pskd = make("pskd")
    assert len(pskd.aux) == 0 and pskd.uses_store and pskd.num_views == 1
    sad = make("sad_ce")
    assert len(sad.aux) == 3 and not sad.uses_store
    ce_like = make("lsskd", branches=False, alpha_T=0.0)
    x, y, idx = _batch()
    ce_like.train()
    z, losses = ce_like(x, y, idx)
    assert set(losses) == {"final"}
    assert float(losses["final"]) == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-6)
    full = make("lsskd")
    full.train()
    _, losses = full(x, y, idx)
    assert set(losses) == {"final", "hier", "kl", "feat"}
    no_feat = make("lsskd", gamma=0.0, kl_weight=0.0)
    no_feat.train()
    assert set(no_feat(x, y, idx)[1]) == {"final", "hier"}


def test_unknown_method_key_is_rejected():
    from lsskd.errors import ConfigError

    with pytest.raises(ConfigError, match="method.gama"):
        make("lsskd", gama=0.1)
    with pytest.raises(ConfigError, match="alpha_mode"):
        make("lsskd", alpha_mode="sometimes")


def test_deploy_is_exactly_the_backbone():
    m = make("lsskd")
    dep = m.deploy()
    plain = build_model("resnet8", 10)
    assert sum(p.numel() for p in dep.parameters()) == sum(p.numel() for p in plain.parameters())
    assert sum(p.numel() for p in m.parameters()) > 3 * sum(p.numel() for p in dep.parameters())
    m.eval()
    x, _, _ = _batch()
    assert torch.equal(m(x), dep(x))


def test_branch_eval_scores_are_joint_logits_at_view_zero():
    m = make("lsskd")
    m.eval()
    x, _, _ = _batch()
    outs = m.eval_forward(x)[1]
    assert [k for k in outs if k.startswith("branch")] == ["branch1", "branch2", "branch3"]
    feats = m.backbone.forward_stages(x)
    full = m.aux[1](feats[1])[1]
    assert torch.equal(outs["branch2"], full[:, 0::4])


def test_robust_alpha_modes():
    m = make("lsskd", alpha_mode="fit")
    m.on_epoch_start(2, 4)
    m.on_epoch_end({"top1": 25.0})
    assert m.alpha() == pytest.approx(0.8 * 2 / 4 * 0.25)
    m = make("lsskd", aux_rampup_epochs=4)
    m.on_epoch_start(1, 10)
    assert m.aux_scale() == pytest.approx(0.25)


def test_branch_grad_zero_stops_aux_gradient_into_backbone():
    m = make("sad_ce", branch_grad=0.0)
    m.train()
    x, y, idx = _batch()
    _, losses = m(x, y, idx)
    losses["hier"].backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in m.backbone.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in m.aux.parameters())


def test_loads_checkpoints_from_before_per_view_store_flags():
    m = make("lsskd", num_train=8)
    m.train()
    x, y, idx = _batch()
    _, losses = m(x, y, idx)
    sum(losses.values()).backward()
    m.after_step()
    m.on_epoch_end({"top1": 37.5})
    # The layout before per-view flags, the view counter, gate=gap and the gate helper:
    # the gate's fit at the top level, no val_acc.
    old = {k: v for k, v in m.state_dict().items()
           if k not in ("store.filled_views", "_extra_state", "gating.val_acc", "gating.fit_acc")}
    old["fit_acc"] = torch.tensor(0.375)
    m2 = make("lsskd", num_train=8)
    m2.load_state_dict(old)
    assert float(m2.gating.val_acc) == 1.0  # written before gate=gap existed
    assert float(m2.gating.fit_acc) == 0.375
    assert torch.equal(m2.store.filled_views, m.store.filled_views)
    assert m2._view_step == 0


def test_gate_fit_keeps_backbone_at_ce_below_the_floor_and_opens_linearly():
    m = make("lsskd", gate="fit", gate_floor=0.5)
    m.on_epoch_start(3, 4)
    m.on_epoch_end({"top1": 40.0})  # below the floor: closed
    assert m.gate() == 0.0 and m.alpha() == 0.0
    m.on_epoch_end({"top1": 80.0})  # (0.8 - 0.5) / 0.5
    assert m.gate() == pytest.approx(0.6)
    assert m.alpha() == pytest.approx(0.8 * 3 / 4 * 0.6)
    assert m.schedule_stats() == {"alpha": pytest.approx(0.36), "gate": pytest.approx(0.6)}
    assert make("lsskd").gate() == 1.0

    # Closed gate: the backbone's gradient is exactly CE's; the branches still learn.
    m = make("lsskd", gate="fit", num_train=8)
    m.train()
    x, y, idx = _batch()
    m.on_epoch_start(2, 4)
    z, losses = m(x, y, idx)
    sum(losses.values()).backward(retain_graph=True)
    got = [p.grad.clone() for p in m.backbone.parameters()]
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in m.aux.parameters())
    m.zero_grad()
    F.cross_entropy(z, y).backward()
    for g, p in zip(got, m.backbone.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_branches_when_shut_skip_makes_a_shut_step_a_ce_step():
    """branches_when_shut=skip: while g = 0 the step is the identity view through the backbone
    (CE's loss, CE's gradient, no branch ran, no branch store row written); once the gate opens
    the branches run on the drawn views as with ``train``."""
    from lsskd.errors import ConfigError

    m = make("lsskd", gate="fit", branches_when_shut="skip", num_train=8, views_per_step=2)
    assert m.may_leave_params_unused and not make("lsskd", gate="fit").may_leave_params_unused
    m.train()
    x, y, idx = _batch()
    m.on_epoch_start(2, 4)  # fit_acc 0: shut
    z, losses = m(x, y, idx)
    assert set(losses) == {"final"} and m._view_step == 0  # no view drawn
    sum(losses.values()).backward()
    assert all(p.grad is None for p in m.aux.parameters())
    got = [p.grad.clone() for p in m.backbone.parameters()]
    m.after_step()
    assert bool(m.store.filled[idx].all()) and not bool(m.store.filled_views.any())
    ref = make("ce")
    ref.train()
    F.cross_entropy(ref(x, y, idx)[0], y).backward()
    for g, p in zip(got, ref.backbone.parameters()):
        assert torch.equal(g, p.grad)

    m.zero_grad()
    m.on_epoch_end({"top1": 80.0})  # g = 0.6: the branches run on two views
    z, losses = m(x, y, idx)
    assert {"final", "hier", "kl", "feat"} <= set(losses) and m._view_step == 1
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in m.aux.parameters())
    m.after_step()
    assert int(m.store.filled_views[idx].sum()) == 2 * len(idx)

    with pytest.raises(ConfigError, match="branches_when_shut=skip acts only behind a gate"):
        make("lsskd", branches_when_shut="skip")
    with pytest.raises(ConfigError, match="method.branches_when_shut"):
        make("lsskd", gate="fit", branches_when_shut="never")


def test_gate_gap_opens_only_when_the_model_fits_training_data_better_than_held_out_data():
    from lsskd.errors import ConfigError

    m = make("lsskd", gate="gap", gate_floor=0.5, gap_floor=0.05, gap_width=0.1, has_val=True)
    assert m.wants_val and m.gate_mode == "gap"
    m.on_epoch_start(3, 4)
    m.on_epoch_end({"top1": 90.0})  # fit gate (0.9 - 0.5) / 0.5 = 0.8
    m.on_validation({"top1": 88.0, "loss": 0.4})  # gap 0.02 < floor: closed
    assert m.gate() == 0.0 and m.alpha() == 0.0
    m.on_validation({"top1": 75.0, "loss": 0.9})  # gap 0.15: (0.15 - 0.05) / 0.1 = 1
    assert m.gate() == pytest.approx(0.8)
    m.on_validation({"top1": 80.0, "loss": 0.9})  # gap 0.10: 0.5 of the way
    assert m.gate() == pytest.approx(0.8 * 0.5)
    assert m.alpha() == pytest.approx(0.8 * 3 / 4 * 0.4)
    m.on_epoch_end({"top1": 45.0})  # below the fit floor: closed whatever the gap
    m.on_validation({"top1": 10.0, "loss": 3.0})
    assert m.gate() == 0.0
    # The gap state is a buffer: it travels with checkpoints (exact resume).
    assert float(m.state_dict()["gating.val_acc"]) == pytest.approx(0.10)
    m3 = make("lsskd", gate="gap", has_val=True)
    m3.load_state_dict({**{k: v for k, v in m.state_dict().items() if not k.startswith("gating.")},
                        "fit_acc": torch.tensor(0.45), "val_acc": torch.tensor(0.10)})  # before the helper
    assert float(m3.gating.val_acc) == pytest.approx(0.10) and m3.gate() == 0.0
    # auto: gap with a held-out split, fit without one; gap without a split is an error.
    assert make("lsskd", gate="auto", has_val=True).gate_mode == "gap"
    assert make("lsskd", gate="auto").gate_mode == "fit" and not make("lsskd", gate="auto").wants_val
    with pytest.raises(ConfigError, match="data.val_fraction"):
        make("lsskd", gate="gap")
    with pytest.raises(ConfigError, match="gap_width"):
        make("lsskd", gate="gap", gap_width=0.0, has_val=True)


def test_gate_rejects_bad_values():
    from lsskd.errors import ConfigError

    with pytest.raises(ConfigError, match="method.gate"):
        make("lsskd", gate="always")
    with pytest.raises(ConfigError, match="gate_floor"):
        make("lsskd", gate_floor=1.0)
    with pytest.raises(ConfigError, match="bn_views"):
        make("lsskd", bn_views="per_view")


def test_bn_views_split_keeps_running_stats_of_the_identity_view():
    x, y, idx = _batch()
    m = make("sad_ce", bn_views="split")
    m.train()
    bns = [b for b in m.backbone.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    z, _ = m(x, y, idx)
    # Running stats equal those of a plain forward on the upright batch alone.
    ref = make("sad_ce")
    ref.train()
    ref.backbone(x)
    refs = [b for b in ref.backbone.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    for a, b in zip(bns, refs):
        assert torch.allclose(a.running_mean, b.running_mean, atol=1e-6)
        assert torch.allclose(a.running_var, b.running_var, atol=1e-5)
        assert int(a.num_batches_tracked) == 1 and a.track_running_stats
    # The identity view's logits are those of the upright batch alone (own batch statistics);
    # with shared BN they are not.
    assert torch.allclose(z, ref.backbone(x), atol=1e-5)
    shared = make("sad_ce")
    shared.train()
    z_shared, _ = shared(x, y, idx)
    assert not torch.allclose(z_shared, z, atol=1e-3)


def test_selfsup_profile_is_sad_ce_behind_the_gate_with_split_bn_and_two_views():
    sad, selfsup = make("sad_ce"), make("lsskd_selfsup")
    diff = {k for k in sad.cfg if sad.cfg[k] != selfsup.cfg[k]}
    assert diff == {"gate", "bn_views", "views_per_step"}
    assert (selfsup.cfg["gate"], selfsup.cfg["bn_views"], selfsup.cfg["views_per_step"]) == ("auto", "split", 2)
    assert not selfsup.uses_store and selfsup.views_per_step == 2 and len(selfsup.aux) == 3


def test_robust_profile_is_the_paper_method_plus_gate_split_bn_and_normalised_aux():
    paper, robust = make("lsskd"), make("lsskd_robust")
    diff = {k for k in paper.cfg if paper.cfg[k] != robust.cfg[k]}
    assert diff == {"gate", "bn_views", "normalize_aux"}
    assert (robust.cfg["gate"], robust.cfg["bn_views"], robust.cfg["normalize_aux"]) == ("auto", "split", True)


# --- the deployed head's teacher and the ceiling it chases (issue 27) ----------------------
def test_aggregate_views_golden():
    from lsskd.methods.losses import aggregate_views

    # M = 2 views, C = 2 classes, B = 1: joint slots [c0k0, c0k1, c1k0, c1k1].
    joint = torch.tensor([[1.0, 9.0, 3.0, 9.0],    # view 0: class scores at slots 0, 2 -> (1, 3)
                          [9.0, 5.0, 9.0, 2.0]])   # view 1: slots 1, 3 -> (5, 2)
    assert aggregate_views(joint, 2).tolist() == [[3.0, 2.5]]
    assert aggregate_views(joint[1:], 2, views=[1]).tolist() == [[5.0, 2.0]]


def _manual_agg(m, x, level, views=None):
    """Branch ``level``'s aggregated class scores by running each view on its own."""
    M = m.num_views
    views = list(range(M)) if views is None else views
    B = x.shape[0]
    rows = []
    for k in views:
        xk = m.views(x)[k * B:(k + 1) * B]
        feats = m.backbone.forward_features(xk)[0]
        rows.append(m.aux[level](feats[level])[1][:, k::M])
    return torch.stack(rows).mean(0)


def test_eval_reports_view_aggregated_branches_and_the_ensemble():
    m = make("lsskd")
    m.eval()
    x, _, _ = _batch()
    logits, outs = m.eval_forward(x)
    assert sorted(outs) == ["agg1", "agg2", "agg3", "branch1", "branch2", "branch3", "ensemble"]
    with torch.no_grad():
        for l in range(3):
            assert torch.allclose(outs[f"agg{l + 1}"], _manual_agg(m, x, l), atol=1e-5)
        ens = torch.stack([F.softmax(logits, 1)] + [F.softmax(outs[f"agg{l}"], 1) for l in (1, 2, 3)]).mean(0)
    assert torch.allclose(outs["ensemble"], ens, atol=1e-6)
    assert torch.allclose(outs["ensemble"].sum(1), torch.ones(4), atol=1e-5)
    # last: only at the last epoch; off: never (the upright branches stay).
    m2 = make("lsskd", eval_aggregate="last")
    m2.eval()
    m2.on_epoch_start(1, 3)
    assert sorted(m2.eval_forward(x)[1]) == ["branch1", "branch2", "branch3"]
    m2.on_epoch_start(3, 3)
    assert "ensemble" in m2.eval_forward(x)[1]
    assert "agg1" not in make("lsskd", eval_aggregate="off").eval().eval_forward(x)[1]


def test_head_teacher_from_the_step_is_sla_self_distillation():
    m = make("sad_ce", head_teacher="deepest", head_tau=2.0, head_weight=0.5)
    m.train()
    x, y, idx = _batch()
    z, losses = m(x, y, idx)
    assert set(losses) == {"final", "hier", "head"}
    # Hand computation: teacher = the deepest branch's logits averaged over the 4 rotations at
    # each class's slot, then 0.5 * T^2 KL(softmax(agg / T) || softmax(z / T)), T = 2.
    with torch.no_grad():
        torch.manual_seed(0)
        _, _, outs = m.forward_all(x)
        s = outs[-1][1]
        agg = torch.stack([s[k * 4:(k + 1) * 4, k::4] for k in range(4)]).mean(0)
        p, logq = F.softmax(agg / 2, 1), F.log_softmax(z / 2, 1)
        want = 0.5 * 4 * (p * (p.log() - logq)).sum(1).mean()
    assert float(losses["head"]) == pytest.approx(float(want), rel=1e-5)
    # The teacher carries no gradient: the head term moves the backbone, never the branches.
    m.zero_grad()
    losses["head"].backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in m.aux.parameters())
    assert float(m.backbone.classifier.weight.grad.abs().sum()) > 0


def test_head_teacher_ensemble_and_views_per_step():
    m = make("sad_ce", head_teacher="branches_head", views_per_step=2)
    m.train()
    x, y, idx = _batch()
    views = m.step_views()
    m._view_step = 0  # the forward draws the same views again
    with torch.no_grad():
        z, _, outs = m.forward_all(x, views)
    from lsskd.methods.losses import aggregate_views
    teacher = m.head_teacher(z, outs, idx, views)
    parts = [aggregate_views(s, 4, views) for _, s in outs] + [z]
    assert torch.allclose(teacher, torch.stack(parts).mean(0), atol=1e-6)
    assert len(views) == 2 and views[0] == 0


def test_head_teacher_from_the_store_uses_every_stored_view():
    m = make("lsskd_selfsup", head_teacher="deepest", head_teacher_source="store", gate="none",
             num_train=8)
    assert m.uses_store and not m.softens and m.store.num_branches == 3 and m.alpha() == 0.0
    m.train()
    x, y, idx = _batch()
    z, losses = m(x, y, idx)
    # Nothing stored yet: every row teaches itself, a zero term with zero gradient.
    assert float(losses["head"]) == pytest.approx(0.0, abs=1e-7)
    sum(losses.values()).backward()
    m.after_step()
    views_written = m._view_step  # one step, identity + one other view
    q = m.store.get_branch(2, idx)  # (4 * 4, 40), view-major
    have = m.store.branch_filled(idx).view(4, 4)
    assert views_written == 1 and have[0].all() and int(have.sum()) == 8
    teacher = m.head_teacher(z, [(None, None)] * 3, idx, None)
    logq = q.clamp_min(1e-12).log()
    ks = [k for k in range(4) if have[k, 0]]
    want = torch.stack([logq[k * 4:(k + 1) * 4, k::4] for k in ks]).mean(0)
    assert torch.allclose(teacher, want, atol=1e-6)
    with pytest.raises(Exception, match="num_train"):
        make("sad_ce", head_teacher="deepest", head_teacher_source="store", num_train=0)


def test_head_teacher_waits_behind_a_shut_gate():
    m = make("lsskd_selfsup", head_teacher="deepest")
    m.train()
    m.on_epoch_start(2, 4)  # training top-1 0 so far: the fit gate is shut
    x, y, idx = _batch()
    _, losses = m(x, y, idx)
    assert "head" not in losses
    m.on_epoch_end({"top1": 100.0})
    _, losses = m(x, y, idx)
    assert "head" in losses


def test_rotate90_is_torch_rot90_bit_for_bit():
    """The rotation views are written with flip/transpose (ONNX has no rot90); same values,
    square or not, every k including negative ones."""
    from lsskd.methods.transforms import rotate90

    for shape in ((2, 3, 5, 5), (1, 2, 4, 6)):
        x = torch.randn(*shape)
        for k in range(-4, 8):
            assert torch.equal(rotate90(x, k), torch.rot90(x, k, dims=(-2, -1))), (shape, k)
