"""LSSKD: Layered Self-Supervised Knowledge Distillation (arXiv 2506.07055),
with PS-KD and HSAKD's SAD-CE as switch settings of the same class.

Equation numbers follow ``METHOD.md``. For a batch of B samples and M views
(rotations), the backbone runs once on all M*B views; the final head's logits z
are read on the identity view; branch l (after stage l, HSAKD design) gives joint
logits s_l over M*C labels on every view.

  alpha_t   = alpha_T * t / T                       (epoch t = 1..T; 0 targets in epoch 1)
  (1) y~_i      = (1 - alpha_t) onehot_C(y_i)         + alpha_t P[i]
  (2) q~_{l,i,k} = (1 - alpha_t) onehot_MC(y_i M + k) + alpha_t Q_l[i, k]
  (4) L_final = mean_i CE(z_i, y~_i)
  (5) L_hier  = sum_l mean_rows CE(s_l, q~_l)
  (7) L_KL    = sum_{l<S} tau^2 KL(softmax(s_S/tau)[detached] || softmax(s_l/tau))
  (8) L_feat  = sum_l mean_rows ||h_l - h[detached]||^2 / dim(h)
      L = L_final + beta L_hier + w_KL L_KL + gamma L_feat

Logged terms: ``final``, ``hier``, ``kl``, ``feat`` (already weighted).

Robustness options (issue 9; all off in the ``paper`` profile):
  ``alpha_mode``: ``linear`` (paper) | ``fit`` (alpha_t scaled by the previous
  epoch's training top-1, so a model that fits little of its data trusts its
  own predictions little) | ``confidence`` (per sample, alpha_t * P[i, y_i]).
  ``aux_rampup_epochs``: linear ramp of beta, KL and gamma from 0 over that many epochs.
  ``normalize_aux``: average (not sum) the hier/KL/feat terms over branches.
  ``branch_grad``: scale of the gradient the branches send into the backbone
  (1 = paper; 0 = branches learn on detached stage features).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.distributed import all_gather_cat
from ..engine.profile import count_macs
from .base import Method, mix_targets, register_method, soft_cross_entropy
from .store import SoftTargetStore
from .transforms import ViewFamily, build_views


# Default self-supervised family per data modality (``method.views=auto``).
AUTO_VIEWS = {"image": "rotation", "signal": "time_flip"}


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return x
    if scale == 0.0:
        return x.detach()
    return _ScaleGrad.apply(x, scale)


class Branch(nn.Module):
    """Auxiliary branch l: fresh copies of later stages (+final), pool, joint head."""

    def __init__(self, backbone, level: int, out_dim: int):
        super().__init__()
        self.trunk = backbone.branch_trunk(level)
        self.pool = type(backbone.pool)()
        self.head = nn.Linear(backbone.feature_dim, out_dim)

    def forward(self, feat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.pool(self.trunk(feat))
        return h, self.head(h)


def kl_div(student_logits, teacher_logits, tau: float) -> torch.Tensor:
    """tau^2 * KL(softmax(t/tau) || softmax(s/tau)), mean over rows; teacher detached."""
    t = F.softmax(teacher_logits.detach().float() / tau, dim=-1)
    log_s = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / tau, dim=-1)
    return (tau ** 2) * (t * (log_t - log_s)).sum(-1).mean()


@register_method("lsskd")
class LSSKD(Method):
    defaults = {
        "views": "auto",  # view family (methods/transforms.py); auto: by modality
        "branches": True,  # False: no auxiliary branches (PS-KD / CE)
        "alpha_T": 0.8,  # softening at the last epoch (0 = hard targets)
        "alpha_mode": "linear",  # linear | fit | confidence
        "soften_final": True,
        "soften_branches": True,
        "beta": 1.0,  # weight of L_hier
        "kl_weight": 1.0,  # weight of L_KL (0 = off)
        "kl_mode": "deepest",  # deepest | next: who teaches branch l
        "tau": 3.0,
        "gamma": 0.1,  # weight of L_feat (0 = off)
        "aux_rampup_epochs": 0,
        "normalize_aux": False,
        "branch_grad": 1.0,
        "store_dtype": "float32",  # float32 | float16
    }

    def __init__(self, backbone, cfg=None, num_train: int = 0, **context):
        super().__init__(backbone, cfg, num_train, **context)
        c = self.cfg
        for key in ("alpha_T",):
            if not 0.0 <= c[key] <= 1.0:
                from ..config import ConfigError

                raise ConfigError(f"method.{key} must be in [0, 1], got {c[key]}")
        if c["alpha_mode"] not in ("linear", "fit", "confidence"):
            from ..config import ConfigError

            raise ConfigError(f"method.alpha_mode must be linear, fit or confidence, got {c['alpha_mode']!r}")
        if c["kl_mode"] not in ("deepest", "next"):
            from ..config import ConfigError

            raise ConfigError(f"method.kl_mode must be deepest or next, got {c['kl_mode']!r}")
        views = c["views"]
        if views == "auto":
            views = AUTO_VIEWS.get(context.get("modality", "image"), "rotation")
        self.views: ViewFamily = build_views(views if c["branches"] else "identity")
        M = self.views.num_views
        self.num_views = M
        S = backbone.num_stages if c["branches"] else 0
        self.aux = nn.ModuleList([Branch(backbone, l, M * self.num_classes) for l in range(S)])
        dtype = {"float32": torch.float32, "float16": torch.float16}.get(c["store_dtype"])
        if dtype is None:
            from ..config import ConfigError

            raise ConfigError(f"method.store_dtype must be float32 or float16, got {c['store_dtype']!r}")
        self.uses_store = c["alpha_T"] > 0 and num_train > 0
        self.store = SoftTargetStore(num_train if self.uses_store else 0, self.num_classes,
                                     S if c["soften_branches"] else 0, M, dtype)
        self.register_buffer("fit_acc", torch.tensor(0.0))
        self._pending = None

    # --- schedule ------------------------------------------------------------
    def alpha(self) -> float:
        """alpha_t for the current epoch (before any per-sample scaling)."""
        if not self.uses_store:
            return 0.0
        a = self.cfg["alpha_T"] * self.epoch / max(1, self.total_epochs)
        if self.cfg["alpha_mode"] == "fit":
            a *= float(self.fit_acc)
        return a

    def aux_scale(self) -> float:
        r = self.cfg["aux_rampup_epochs"]
        return 1.0 if r <= 0 else min(1.0, self.epoch / r)

    def on_epoch_end(self, train_stats: Dict[str, float]) -> None:
        # Training top-1 of the finished epoch drives alpha_mode=fit next epoch.
        self.fit_acc.fill_(train_stats.get("top1", 0.0) / 100.0)

    # --- forward ---------------------------------------------------------------
    def forward_all(self, x: torch.Tensor):
        """Views -> backbone once -> (z on identity view, h on all views, [(h_l, s_l)])."""
        B = x.shape[0]
        xv = self.views(x)
        feats, h, logits = self.backbone.forward_features(xv)
        g = self.cfg["branch_grad"]
        outs = [br(scale_grad(feats[l], g)) for l, br in enumerate(self.aux)]
        return logits[:B], h, outs

    def soft_target(self, hard: torch.Tensor, prev: torch.Tensor, filled: torch.Tensor,
                    alpha: float, conf: torch.Tensor | None = None) -> torch.Tensor:
        """(1 - a) hard + a prev, with a = 0 on rows that have no stored prediction."""
        a = torch.full((hard.shape[0], 1), alpha, device=hard.device)
        if conf is not None:
            a = a * conf[:, None]
        a = a * filled[:, None].to(a.dtype)
        return (1 - a) * hard + a * prev

    def train_forward(self, x, y, idx, mix):
        c, M, C = self.cfg, self.num_views, self.num_classes
        B = x.shape[0]
        z, h, outs = self.forward_all(x)
        alpha = self.alpha()
        onehot = F.one_hot(y, C).float()
        conf = None
        if self.uses_store:
            prev_p, filled = self.store.get_final(idx)
            if c["alpha_mode"] == "confidence":
                conf = prev_p.gather(1, y[:, None]).squeeze(1)
        if self.uses_store and c["soften_final"]:
            target = self.soft_target(onehot, prev_p, filled, alpha, conf)
        else:
            target = onehot
        losses = {"final": soft_cross_entropy(z, mix_targets(target, mix))}
        if outs:
            w = self.aux_scale()
            norm = len(outs) if c["normalize_aux"] else 1
            joint = ViewFamily.joint_labels(y, M)
            hard_q = F.one_hot(joint, M * C).float()
            hier = 0.0
            for l, (_, s) in enumerate(outs):
                if self.uses_store and c["soften_branches"]:
                    q = self.soft_target(hard_q, self.store.get_branch(l, idx), filled.repeat(M), alpha,
                                         None if conf is None else conf.repeat(M))
                else:
                    q = hard_q
                hier = hier + soft_cross_entropy(s, mix_targets(q, mix, group=M))
            if c["beta"] > 0:
                losses["hier"] = c["beta"] * w * hier / norm
            S = len(outs)
            if c["kl_weight"] > 0 and S > 1:
                kl = 0.0
                for l in range(S - 1):
                    teacher = outs[-1][1] if c["kl_mode"] == "deepest" else outs[l + 1][1]
                    kl = kl + kl_div(outs[l][1], teacher, c["tau"])
                losses["kl"] = c["kl_weight"] * w * kl / (S - 1 if c["normalize_aux"] else 1)
            if c["gamma"] > 0:
                hd = h.detach().float()
                feat = sum(((hl.float() - hd) ** 2).sum(-1).mean() / hd.shape[-1] for hl, _ in outs)
                losses["feat"] = c["gamma"] * w * feat / norm
        if self.uses_store:
            with torch.no_grad():
                p_new = F.softmax(z.detach().float(), -1)
                q_new = None
                if self.store.num_branches:
                    q_new = torch.stack([F.softmax(s.detach().float(), -1).view(M, B, M * C).transpose(0, 1)
                                         for _, s in outs])
            self._pending = (idx.detach(), p_new, q_new)
        return z, losses

    def after_step(self) -> None:
        """Commit this step's predictions (after the optimiser step, METHOD.md). Under DDP every
        rank gathers all ranks' rows, so the store stays identical everywhere."""
        if self._pending is None:
            return
        idx, p, q = self._pending
        self._pending = None
        idx, p = all_gather_cat(idx), all_gather_cat(p)
        if q is not None:
            q = all_gather_cat(q.transpose(0, 1).contiguous()).transpose(0, 1)
        self.store.write(idx, p, q)

    # --- evaluation / deployment ------------------------------------------------
    @torch.no_grad()
    def eval_outputs(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Branch l's class scores on upright images: joint logits at labels c*M + 0."""
        if not len(self.aux):
            return {}
        feats = self.backbone.forward_stages(x)
        return {f"branch{l + 1}": br(feats[l])[1][:, :: self.num_views] for l, br in enumerate(self.aux)}

    def training_macs(self, input_shape) -> int:
        """MACs of one training sample: M views through backbone and all branches."""
        return count_macs(self, input_shape, forward=lambda x: self.forward_all(x))


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
