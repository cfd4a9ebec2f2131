"""LSSKD: Layered Self-Supervised Knowledge Distillation (arXiv 2506.07055).

Equation numbers are those of ``METHOD.md``. For a batch of B samples and M views
(rotations for images, t_0 = identity) the backbone runs once over the stacked M*B views;
the final head's logits z are read on the identity view, and branch l (a copy of the
deeper stages after stage l, HSAKD's design) gives joint logits s_l over M*C labels and
a pooled feature h_l on every view.

  alpha_t    = alpha_T * t / T                        (epoch t = 1..T; hard targets in epoch 1)
  (1) y~_i       = (1 - alpha_t) onehot_C(y_i)         + alpha_t P[i]
  (2) q~_{l,i,k} = (1 - alpha_t) onehot_MC(y_i M + k)  + alpha_t Q_l[i, k]
  (4) L_final = mean_i CE(z_i, y~_i)
  (5) L_hier  = sum_l mean_rows CE(s_l, q~_l)
  (7) L_KL    = sum_{l<S} tau^2 KL(softmax(s_S/tau)[detached] || softmax(s_l/tau))
  (8) L_feat  = sum_l mean_rows ||h_l - h[detached]||^2 / dim(h)
      L = L_final + beta L_hier + w_KL L_KL + gamma L_feat   (Eqs. 6, 9)

P and Q_l are the previous epoch's predictions, written after each optimiser step
(``after_step``) into a per-sample store (methods/store.py). Logged terms: ``final``,
``hier``, ``kl``, ``feat`` (already weighted). At inference the branches are dropped.

PS-KD, HSAKD's SAD-CE and the robust and recommended profiles are switch settings of the
same class (the variants at the end of this file), so each profile reads as a diff of the
same defaults. The options beyond the paper are explained where they were measured:
safeguards for small models and short budgets (``gate``, ``bn_views``, ``alpha_mode``,
``normalize_aux``, ``branch_grad``, ``aux_rampup_epochs``, ``branches_when_shut``,
``store_mixed``) in docs/robust.md; memory and cost (``store*``, ``views_per_step``) in
docs/scale.md; every key with its default in docs/config.md.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.distributed import all_gather_cat
from ..engine.profile import count_macs
from ..errors import ConfigError
from .base import Method, register_method
from .branch import Branch, frozen_bn_stats, scale_grad
from .gate import FitGapGate
from .losses import (aggregate_views, feature_loss, joint_class_logits, joint_labels, kl_div,
                     mix_targets, progressive_target, soft_cross_entropy, view_class_scores)
from .store import choose_store, build_store
from .transforms import ViewFamily, build_views, resolve_views




@register_method("lsskd")
class LSSKD(Method):
    defaults = {
        "views": "auto",  # view family (methods/transforms.py); auto: by modality
        "branches": True,  # False: no auxiliary branches (PS-KD / CE)
        "alpha_T": 0.8,  # softening at the last epoch (0 = hard targets)
        "alpha_mode": "linear",  # linear (paper); fit/confidence scale alpha_t by the fit
        "soften_final": True,
        "soften_branches": True,
        "beta": 1.0,  # weight of L_hier
        "kl_weight": 1.0,  # weight of L_KL (0 = off)
        "kl_mode": "deepest",  # who teaches branch l: the deepest or the next deeper branch
        "tau": 3.0,
        "gamma": 0.1,  # weight of L_feat (0 = off)
        "aux_rampup_epochs": 0,
        "normalize_aux": False,
        "branch_grad": 1.0,
        "store_dtype": "float32",  # dense store precision
        "store": "auto",  # soft-target store layout (methods/store.py, docs/scale.md)
        "store_topk": 10,  # k of the top-k store
        "store_budget_gb": 0.0,  # auto: largest layout that fits (0 = no budget: dense)
        "store_on_host": False,  # keep the store in CPU memory when training on a GPU
        "views_per_step": 0,  # views per step incl. identity (0 = all M)
        "gate": "none",  # alpha and branch gradients scaled by the fit (and gap) gate (methods/gate.py)
        "gate_floor": 0.5,  # training top-1 (fraction) below which gate=fit keeps the backbone at CE
        "gap_floor": 0.05,  # gate=gap: train-minus-held-out top-1 (fraction) below which it stays shut
        # (a negative floor opens it even while held-out top-1 exceeds training top-1)
        "gap_width": 0.10,  # gate=gap: ... and above which (floor + width) it is fully open
        "branches_when_shut": "train",  # run the branches (train) or skip them while the gate is shut
        "bn_views": "shared",  # split: batch-norm statistics of the identity view apart
        "last_branch": "stage",  # deepest branch's trunk: the last stage at stride 1 (HSAKD) or one block
        "store_mixed": "skip",  # does a CutMix-ed batch write its predictions into the store?
        "head_teacher": "none",  # who teaches the deployed head: aggregated deepest branch, all, all + head
        "head_teacher_source": "step",  # the teacher from this step's views, or every view's stored rows
        "head_tau": 1.0,  # temperature of the head-teaching KL (SLA: 1)
        "head_weight": 1.0,  # weight of the head-teaching KL
        "eval_aggregate": "every",  # epochs with view-aggregated branch and ensemble scores (M passes; evaluation only, execution key)
    }

    ranges = {
        "alpha_T": "[0, 1]", "beta": ">= 0", "kl_weight": ">= 0", "tau": "> 0", "gamma": ">= 0",
        "aux_rampup_epochs": ">= 0", "branch_grad": ">= 0", "store_topk": ">= 1",
        "store_budget_gb": ">= 0", "views_per_step": ">= 0", "gate_floor": "[0, 1)",
        "gap_floor": "(-1, 1)", "gap_width": "> 0", "head_tau": "> 0", "head_weight": ">= 0",
    }
    choices = {
        "alpha_mode": ("linear", "fit", "confidence"), "kl_mode": ("deepest", "next"),
        "store_dtype": ("float32", "float16"), "store": ("auto", "dense", "topk"),
        "gate": ("none", "fit", "gap", "auto"), "branches_when_shut": ("train", "skip"),
        "bn_views": ("shared", "split"), "last_branch": ("stage", "block"),
        "store_mixed": ("skip", "store"),
        "head_teacher": ("none", "deepest", "branches", "branches_head"),
        "head_teacher_source": ("step", "store"), "eval_aggregate": ("every", "last", "off"),
    }

    @classmethod
    def check_rules(cls, c, has_val: bool, cutmix_prob: float) -> None:
        if c["gate"] == "gap" and not has_val:
            raise ConfigError("method.gate=gap reads the held-out split: set data.val_fraction > 0 "
                              "(e.g. 0.1), or use method.gate=fit")
        if c["branches_when_shut"] == "skip" and c["gate"] == "none":
            raise ConfigError("method.branches_when_shut=skip acts only behind a gate: set method.gate "
                              "to fit, gap or auto, or leave branches_when_shut=train")
        stores = c["alpha_T"] > 0 or (c["head_teacher"] != "none" and c["head_teacher_source"] == "store")
        if stores and c["store_mixed"] == "skip" and cutmix_prob >= 1.0:
            raise ConfigError("method.store_mixed=skip keeps CutMix-ed batches out of the soft-target "
                              f"store, but data.augment.cutmix_prob={cutmix_prob} mixes every batch, so "
                              "nothing would ever be stored: lower cutmix_prob or set method.store_mixed=store")

    def __init__(self, backbone, cfg=None, context=None, **context_fields):
        super().__init__(backbone, cfg, context, **context_fields)  # checks ranges, choices, rules
        c = self.cfg
        self.gating = FitGapGate(c["gate"], self.context.has_val, c["gate_floor"], c["gap_floor"],
                                 c["gap_width"])
        self.wants_val = self.gating.wants_val
        self.may_leave_params_unused = c["branches_when_shut"] == "skip"
        views = resolve_views(c["views"], self.context.modality)
        self.views: ViewFamily = build_views(views if c["branches"] else "identity")
        M = self.views.num_views
        self.num_views = M
        S = backbone.num_stages if c["branches"] else 0
        self.aux = nn.ModuleList([Branch(backbone, l, M * self.num_classes, c["last_branch"]) for l in range(S)])
        dtype = {"float32": torch.float32, "float16": torch.float16}[c["store_dtype"]]
        V = c["views_per_step"]
        if V > M:  # M depends on the data's view family, known once the method is built
            raise ConfigError(f"method.views_per_step must be in [0, {M}] (0 = all views), got {V}")
        self.views_per_step = M if V == 0 else V
        self._view_step = 0
        # The store holds previous-epoch predictions for softening (Eqs. 1-2) and, with
        # head_teacher_source=store, every view's branch rows for the head's teacher.
        self.softens = c["alpha_T"] > 0 and self.num_train > 0
        self.store_teacher = bool(S) and c["head_teacher"] != "none" and c["head_teacher_source"] == "store"
        if self.store_teacher and self.num_train <= 0:
            raise ConfigError("method.head_teacher_source=store keeps a row per training sample: the "
                              "method needs the training set size (num_train), or use head_teacher_source=step")
        self.uses_store = self.softens or self.store_teacher
        n = self.num_train if self.uses_store else 0
        sb = S if (c["soften_branches"] and self.softens) or self.store_teacher else 0
        self.store_choice = choose_store(n, self.num_classes, sb, M, c["store"], dtype, c["store_topk"],
                                         c["store_budget_gb"])
        self.store = build_store(n, self.num_classes, sb, M, self.store_choice, c["store_on_host"])
        self._pending = None

    # --- schedule (alpha_t, the gate) ------------------------------------------
    @property
    def gate_mode(self) -> str:
        return self.gating.mode

    def gate(self) -> float:
        """g in [0, 1] (1 with gate=none): how far self-distillation acts on the backbone."""
        return self.gating.value()

    def alpha(self) -> float:
        """alpha_t for the current epoch (before any per-sample scaling)."""
        if not self.softens:
            return 0.0
        a = self.cfg["alpha_T"] * self.epoch / max(1, self.total_epochs)
        if self.cfg["alpha_mode"] == "fit":
            a *= float(self.gating.fit_acc)
        return a * self.gate()

    def aux_scale(self) -> float:
        r = self.cfg["aux_rampup_epochs"]
        return 1.0 if r <= 0 else min(1.0, self.epoch / r)

    def schedule_stats(self) -> Dict[str, float]:
        out = {"alpha": self.alpha()}
        if self.gate_mode != "none":
            out["gate"] = self.gate()
        return out

    def summary_notes(self, summary: Dict) -> List[str]:
        return self.gating.never_opened_note(summary)

    def on_epoch_end(self, train_stats: Dict[str, float]) -> None:
        # The finished epoch's training top-1 drives the gate and alpha_mode=fit next epoch.
        self.gating.record_fit(train_stats)

    def on_validation(self, val_stats: Dict[str, float]) -> None:
        self.gating.record_val(val_stats)

    # --- views of a step -----------------------------------------------------------
    def step_views(self) -> List[int] | None:
        """Views of this training step (None = all M): identity + V-1 others, drawn from a
        generator seeded by the step counter (identical on every DDP rank)."""
        M, V = self.num_views, self.views_per_step
        if V >= M:
            return None
        g = torch.Generator().manual_seed(1000003 + self._view_step)
        self._view_step += 1
        others = (torch.randperm(M - 1, generator=g)[: V - 1] + 1).sort().values
        return [0] + others.tolist()

    def get_extra_state(self):
        return {"view_step": self._view_step}

    def set_extra_state(self, state) -> None:
        self._view_step = int(state.get("view_step", 0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Older checkpoints: no view counter (before views_per_step), the gate's state at the
        # method's top level (before the gate helper), no val_acc (before gate=gap).
        state_dict.setdefault(prefix + "_extra_state", {"view_step": 0})
        for name in ("fit_acc", "val_acc"):
            if prefix + name in state_dict:
                state_dict[prefix + "gating." + name] = state_dict.pop(prefix + name)
        if prefix + "gating.fit_acc" in state_dict:
            state_dict.setdefault(prefix + "gating.val_acc", torch.tensor(1.0))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- forward -------------------------------------------------------------------
    def forward_all(self, x: torch.Tensor, views: List[int] | None = None):
        """Views -> backbone once -> (z on identity view, h on the views, [(h_l, s_l)]).
        ``views`` (identity first) restricts the stacked batch to those views."""
        B = x.shape[0]
        xv = self.views(x)
        if views is not None:
            xv = xv.view(self.num_views, B, *x.shape[1:])[views].flatten(0, 1)
        feats, h, logits = self._backbone_views(xv, B)
        g = self.cfg["branch_grad"] * (self.gate() if self.training else 1.0)
        outs = [br(scale_grad(feats[l], g)) for l, br in enumerate(self.aux)]
        return logits[:B], h, outs

    def _backbone_views(self, xv: torch.Tensor, B: int):
        """The backbone over the stacked views, as one batch (bn_views=shared) or as the
        identity view then the others with running statistics frozen (bn_views=split)."""
        if self.cfg["bn_views"] == "shared" or xv.shape[0] == B or not self.training:
            return self.backbone.forward_features(xv)
        up = self.backbone.forward_features(xv[:B])
        with frozen_bn_stats(self.backbone):
            rest = self.backbone.forward_features(xv[B:])
        return ([torch.cat([a, b]) for a, b in zip(up[0], rest[0])],
                torch.cat([up[1], rest[1]]), torch.cat([up[2], rest[2]]))

    def row_alpha(self, filled: torch.Tensor, alpha: float, conf: torch.Tensor | None) -> torch.Tensor:
        """Each row's alpha of Eqs. (1)-(2), shape (rows, 1): alpha_t, times the stored
        confidence P[i, y_i] with alpha_mode=confidence, and 0 where nothing is stored yet."""
        a = torch.full((filled.shape[0], 1), alpha, device=filled.device)
        if conf is not None:
            a = a * conf[:, None]
        return a * filled[:, None].to(a.dtype)

    def train_forward(self, x, y, idx, mix):
        if self.may_leave_params_unused and self.gate() == 0.0:
            # Shut gate, branches skipped: the identity view through the backbone, CE's step.
            views, z, h, outs = None, self.backbone(x), None, []
        else:
            views = self.step_views() if len(self.aux) else None
            z, h, outs = self.forward_all(x, views)
        final_target, branch_targets = self.targets(y, idx, views, len(outs))
        losses = {"final": soft_cross_entropy(z, mix_targets(final_target, mix))}  # (4)
        if outs:
            losses.update(self.branch_losses(h, outs, branch_targets, mix, views))
            g = self.gate()
            if self.cfg["head_teacher"] != "none" and g > 0:
                # The deployed head learns what the branches know (SLA's self-distillation);
                # behind the gate like every other self-distillation term.
                teacher = self.head_teacher(z, outs, idx, views)
                if self.cfg["head_teacher_source"] == "store":
                    teacher = mix_targets(teacher, mix)  # stored rows are per sample: mix them as the images
                losses["head"] = (self.cfg["head_weight"] * self.aux_scale() * g
                                  * kl_div(z, teacher, self.cfg["head_tau"]))
        self._stash_predictions(idx, z, outs, views, mix)
        return z, losses

    def targets(self, y, idx, views, num_branches: int):
        """The targets of this batch: Eq. (1) for the final head, Eq. (2) for each branch's
        rows (view-major, the step's views); hard labels where softening is off."""
        c, M, C = self.cfg, self.num_views, self.num_classes
        V = M if views is None else len(views)
        alpha = self.alpha()
        onehot = F.one_hot(y, C).float()
        final, conf = onehot, None
        if self.softens:
            prev_p, filled = self.store.get_final(idx)
            if c["alpha_mode"] == "confidence":
                conf = prev_p.gather(1, y[:, None]).squeeze(1)
            if c["soften_final"]:
                final = progressive_target(onehot, prev_p, self.row_alpha(filled, alpha, conf))  # (1)
        if not num_branches:
            return final, []
        hard_q = F.one_hot(joint_labels(y, M, views), M * C).float()
        if not (self.softens and c["soften_branches"]):
            return final, [hard_q] * num_branches
        conf_v = None if conf is None else conf.repeat(V)
        filled_v = self.store.branch_filled(idx, views)
        return final, [progressive_target(hard_q, self.store.get_branch(l, idx, views),  # (2)
                                          self.row_alpha(filled_v, alpha, conf_v))
                       for l in range(num_branches)]

    def branch_losses(self, h, outs, branch_targets, mix, views) -> Dict[str, torch.Tensor]:
        """Eqs. (5), (7), (8), weighted (Eqs. 6, 9): the branches' joint labels, the deepest
        branch teaching the shallower ones, and feature consistency with the final layer."""
        c = self.cfg
        V = self.num_views if views is None else len(views)
        w = self.aux_scale()
        S = len(outs)
        norm = S if c["normalize_aux"] else 1
        losses = {}
        if c["beta"] > 0:
            hier = 0.0
            for (_, s), q in zip(outs, branch_targets):
                hier = hier + soft_cross_entropy(s, mix_targets(q, mix, group=V))  # (5)
            losses["hier"] = c["beta"] * w * hier / norm
        if c["kl_weight"] > 0 and S > 1:
            kl = 0.0
            for l in range(S - 1):
                teacher = outs[-1][1] if c["kl_mode"] == "deepest" else outs[l + 1][1]
                kl = kl + kl_div(outs[l][1], teacher, c["tau"])  # (7)
            losses["kl"] = c["kl_weight"] * w * kl / (S - 1 if c["normalize_aux"] else 1)
        if c["gamma"] > 0:
            feat = sum(feature_loss(hl, h, per_dim=True) for hl, _ in outs)  # (8)
            losses["feat"] = c["gamma"] * w * feat / norm
        return losses

    @torch.no_grad()
    def head_teacher(self, z, outs, idx, views) -> torch.Tensor:
        """The deployed head's teacher, detached, (B, C) logits (or log-probabilities):

          deepest:        agg_S = (1/V) sum_k s_S(t_k x)[c M + k]       (SLA, Lee et al. 2020)
          branches:       (1/S) sum_l agg_l
          branches_head:  (agg_1 + ... + agg_S + z) / (S + 1)

        From this step's views (``head_teacher_source=step``; with views_per_step < M only
        those), or from the store's previous-epoch rows of every view (``store``; log of the
        stored probabilities, over the views stored so far; a row with none stored yet is
        taught by its own logits, which adds no loss and no gradient)."""
        c, M = self.cfg, self.num_views
        levels = [len(outs) - 1] if c["head_teacher"] == "deepest" else list(range(len(outs)))
        if c["head_teacher_source"] == "step":
            parts = [aggregate_views(outs[l][1].detach().float(), M, views) for l in levels]
            if c["head_teacher"] == "branches_head":
                parts.append(z.detach().float())
            return torch.stack(parts).mean(0)
        B = len(idx)
        have = self.store.branch_filled(idx).view(M, B).float()  # views stored per sample
        n = have.sum(0)
        parts = []
        for l in levels:
            per_view = view_class_scores(self.store.get_branch(l, idx).clamp_min(1e-12).log(), M)
            parts.append((per_view * have[:, :, None]).sum(0) / n.clamp_min(1.0)[:, None])
        if c["head_teacher"] == "branches_head":
            parts.append(self.store.get_final(idx)[0].clamp_min(1e-12).log())
        teacher = torch.stack(parts).mean(0)
        none = n == 0
        teacher[none] = z.detach().float()[none]
        return teacher

    def _stash_predictions(self, idx, z, outs, views, mix) -> None:
        """Keep this step's detached predictions (P, and Q_l for the step's views) for
        ``after_step`` to write; CutMix-ed batches write nothing unless store_mixed=store."""
        self._pending = None
        if not self.uses_store or (mix is not None and self.cfg["store_mixed"] != "store"):
            return
        M, C, B = self.num_views, self.num_classes, z.shape[0]
        V = M if views is None else len(views)
        with torch.no_grad():
            p_new = F.softmax(z.detach().float(), -1)
            q_new = None
            if self.store.num_branches and outs:
                q_new = torch.stack([F.softmax(s.detach().float(), -1).view(V, B, M * C).transpose(0, 1)
                                     for _, s in outs])
        self._pending = (idx.detach(), p_new, q_new, views)

    def after_step(self) -> None:
        """Commit this step's predictions (after the optimiser step, METHOD.md). Under DDP every
        rank gathers all ranks' rows, so the store stays identical everywhere."""
        if self._pending is None:
            return
        idx, p, q, views = self._pending
        self._pending = None
        idx, p = all_gather_cat(idx), all_gather_cat(p)
        if q is not None:
            q = all_gather_cat(q.transpose(0, 1).contiguous()).transpose(0, 1)
        self.store.write(idx, p, q, views)

    # --- evaluation / deployment ------------------------------------------------
    @torch.no_grad()
    def eval_forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(final logits, extra heads' class scores): ``branch{l}``, branch l on upright inputs
        (joint logits at labels c*M + 0), from the same backbone pass; with ``eval_aggregate``
        also ``agg{l}``, branch l aggregated over all M views (:func:`aggregate_views`; M - 1
        more passes), and ``ensemble``, the mean of the softmax of the final head and of every
        ``agg{l}``: the accuracy the branches hold that the deployed head could learn."""
        if not len(self.aux):
            return self(x), {}
        M = self.num_views
        feats, _, logits = self.backbone.forward_features(x)
        upright = [br(feats[l])[1] for l, br in enumerate(self.aux)]
        outs = {f"branch{l + 1}": joint_class_logits(s, M) for l, s in enumerate(upright)}
        mode = self.cfg["eval_aggregate"]
        if mode == "off" or (mode == "last" and self.epoch < self.total_epochs):
            return logits, outs
        others = self.backbone.forward_features(self.views(x)[x.shape[0]:])[0]
        probs = [F.softmax(logits.float(), -1)]
        for l, br in enumerate(self.aux):
            agg = aggregate_views(torch.cat([upright[l], br(others[l])[1]]).float(), M)
            outs[f"agg{l + 1}"] = agg
            probs.append(F.softmax(agg, -1))
        outs["ensemble"] = torch.stack(probs).mean(0)
        return logits, outs

    def aggregated_branch(self, level: int = -1) -> nn.Module:
        """Branch ``level`` (default the deepest) aggregated over all M views, as a model of
        its own: x -> agg_l(x) (B, C), M passes per input. For users who accept M times the
        backbone's cost at inference for the branch's accuracy (``lsskd profile`` shows both)."""
        return ViewAggregatedBranch(self.backbone, self.aux[level], self.views, level % len(self.aux))

    def training_macs(self, input_shape) -> int:
        """MACs of one training sample: the step's views (M, or views_per_step) through
        backbone and all branches."""
        views = None if self.views_per_step >= self.num_views else list(range(self.views_per_step))
        return count_macs(self, input_shape, forward=lambda x: self.forward_all(x, views))


class ViewAggregatedBranch(nn.Module):
    """An auxiliary branch as an inference model: every view of the input through the
    backbone's stages up to ``level`` and the branch, joint logits averaged over the views
    at each class's slot (:func:`aggregate_views`). Shares the trained modules."""

    def __init__(self, backbone, branch: Branch, views: ViewFamily, level: int):
        super().__init__()
        self.backbone, self.branch, self.views, self.level = backbone, branch, views, level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.forward_features(self.views(x))[0]
        return aggregate_views(self.branch(feats[self.level])[1], self.views.num_views)


def _variant(name: str, doc: str, **overrides):
    class Variant(LSSKD):
        defaults = {**LSSKD.defaults, **overrides}

    Variant.__name__ = Variant.__qualname__ = name
    Variant.__doc__ = doc
    return Variant


PSKD = register_method("pskd")(_variant(
    "PSKD",
    """PS-KD (Kim et al., ICCV 2021): progressive self-knowledge distillation. No branches;
    the final head's target is (1 - alpha_t) onehot + alpha_t P_prev, alpha_t = alpha_T t / T,
    alpha_T = 0.8. L = CE(z, y~).""",
    branches=False, alpha_T=0.8, kl_weight=0.0, gamma=0.0))

SADCE = register_method("sad_ce")(_variant(
    "SADCE",
    """HSAKD's teacher-free joint training (Yang et al. 2021, "SAD-CE"): branches after every
    stage learn the joint (class x rotation) labels with hard targets; the final head with CE.
    L = CE(z, y) + beta sum_l CE(s_l, onehot(y M + k)). No softening, no KL, no feature loss.""",
    branches=True, alpha_T=0.0, kl_weight=0.0, gamma=0.0))

LSSKDRobust = register_method("lsskd_robust")(_variant(
    "LSSKDRobust",
    """LSSKD's robust profile for small models and short budgets (issue 9, docs/robust.md):
    the paper's method with ``gate=auto`` (self-distillation reaches the backbone only once
    its training top-1 passes ``gate_floor``, and, when the run holds out a validation split
    (``data.val_fraction``), only while it fits its training data better than the held-out
    data; otherwise the backbone trains exactly as with CE), ``bn_views=split`` (running
    batch-norm statistics from upright images) and ``normalize_aux`` (auxiliary terms
    averaged over branches). Every other value is the paper's; the ``lsskd`` method keeps
    the paper profile for reproduction.""",
    gate="auto", bn_views="split", normalize_aux=True))

LSSKDSelfSup = register_method("lsskd_selfsup")(_variant(
    "LSSKDSelfSup",
    """The recommended profile (issue 18, docs/robust.md): LSSKD's layered self-supervised
    branches (joint class x view labels after every stage, hard targets, summed over
    branches: HSAKD's SAD-CE) behind the robust profile's safeguards, and nothing else:
    ``gate=auto`` (the backbone trains exactly as with CE until it fits ``gate_floor`` of
    its training data, and, given a held-out split, while it generalises as well as it
    fits), ``bn_views=split`` (running batch-norm statistics from upright inputs) and
    ``views_per_step=2`` (the identity view plus one other per step: half SAD-CE's cost).
    No progressive softening, no deep-to-shallow KL, no feature term: on the held-out
    splits of the over-fitting cells each of those was level with or behind this profile
    (results/overfit-suite). Where a model under-fits, its gate stays shut and it trains
    CE's backbone; where it over-fits, the branches' self-supervised task regularises it.""",
    alpha_T=0.0, kl_weight=0.0, gamma=0.0, gate="auto", bn_views="split", views_per_step=2))
