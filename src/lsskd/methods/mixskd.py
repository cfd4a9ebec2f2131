"""Self-knowledge distillation from Mixup, MixSKD (Yang, An, Zhou, Cai, Zhi, Wu, Xu & Zhang,
"MixSKD: Self-Knowledge Distillation from Mixup for Image Recognition", ECCV 2022)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..data.augment import MixInfo, mixup
from .base import Method, register_method
from .branch import Branch
from .gate import FitGapGate
from .losses import kl_div, mix_targets, soft_cross_entropy


class SelfTeacher(nn.Module):
    """MixSKD's self-teacher: the S levels' final-resolution feature maps concatenated along
    channels, a 1x1 convolution back to ``dim`` channels (a Linear over the channel axis, so it
    serves images and signals alike), global average pooling, a linear classifier."""

    def __init__(self, levels: int, dim: int, num_classes: int):
        super().__init__()
        self.fuse = nn.Linear(levels * dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, maps: List[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(maps, 1).movedim(1, -1)  # (B, *spatial, S*D)
        return self.head(self.fuse(x).flatten(1, -2).mean(1))


def interpolate(t: torch.Tensor, mix: MixInfo) -> torch.Tensor:
    """``lam * t_i + (1 - lam) * t_perm(i)`` for the rows of the original images."""
    return mix.lam * t + (1.0 - mix.lam) * t[mix.perm]


@register_method("mixskd")
class MixupSelfKD(Method):
    """MixSKD: the predictions and feature maps of a Mixup image and the interpolation of its two
    originals' teach each other at every stage, and a self-teacher built from all stages teaches
    the final classifier.

    Every step the method Mixes its own batch (x~ = lam x + (1 - lam) x[perm], lam ~ Beta(a, a))
    and runs the backbone once on [x; x~]. Level l = 1..S-1 is a classifier after stage l
    (``backbone.branch_trunk``: fresh copies of the deeper stages and ``final``, pool, linear),
    level S the backbone's own head; each gives a final-resolution map F_l and logits z_l. With
    bar(t) = lam t(x) + (1 - lam) t(x[perm]) and t~ = t(x~), the self-teacher g on the maps:

    L = sum_l CE(z_l(x), y)                                              (ce)
      + sum_l CE_mix(z~_l) + CE_mix(g(bar F)) + CE_mix(g(F~))            (mix_ce)
      + sum_{l<S} [KL_T(bar z_l || z~_l) + KL_T(z~_l || bar z_l)]
      + KL_T(bar z_S || g(F~)) + KL_T(z~_S || g(bar F))                   (kl)
      + sum_l mean((bar F_l - F~_l)^2)                                   (feat)

    with KL_T(student || teacher) = T^2 KL(softmax(teacher / T) || softmax(student / T)), the
    teacher detached, and CE_mix the Mixup CE lam CE(., y) + (1 - lam) CE(., y[perm]).

    Paper: Yang et al., ECCV 2022; checked against winycg/Self-KD-Lib (``main_mixskd_cifar.py``,
    ``models/resnet_mixskd.py``): Mixup alpha 0.4, T = 3, every term weight 1, the self-teacher a
    1x1 convolution over the concatenated maps. Where we differ from that code, deliberately:
    its total loss leaves out the Mixup CE terms it computes (so its self-teacher never learns:
    it is only read detached), we add them, as the paper's task loss does
    (``method.mix_ce=false`` gives the code's loss); its adversarial feature term trains the
    network against discriminators held in a plain list, outside the optimiser, so they stay at
    their random initialisation: we leave that term out. The stage contract's branch trunks
    replace the code's ResNet-only extractors, so every staged backbone works.

    ``method.gate`` (``none`` by default, the paper; ``fit``, ``gap``, ``auto`` as in the LSSKD
    profiles, methods/gate.py): with g in [0, 1] the loss is CE(z_S(x), y) + g * (every other
    term above), and while g = 0 the step is CE's own (the backbone on the original images only,
    no Mixup draw, the stage classifiers and self-teacher idle), so a model that never fits
    ``gate_floor`` of its training data trains exactly CE's model.

    Defaults: ``method.alpha`` = 0.4, ``method.T`` = 3, ``method.mix_ce`` = true. The method
    mixes its own batches, so ``data.augment.cutmix_prob`` and ``mixup_alpha`` must be 0 (a
    ConfigError otherwise). Mixup draws from torch's global generator, which checkpoints save,
    so a resumed run draws the same. ``deploy()`` is the bare backbone; evaluation reports the
    stage classifiers (``branch1`` ..) and the self-teacher on upright maps (``self_teacher``,
    which needs every branch at test time). Training accuracy counts the original images.
    """

    defaults = {
        "alpha": 0.4,  # Mixup's Beta(alpha, alpha) (Self-KD-Lib: 0.4)
        "T": 3.0,  # temperature of the mutual and self-teacher KL terms (Self-KD-Lib: 3)
        "mix_ce": True,  # the Mixup CE of every level and of the self-teacher (paper; false = the official code's loss)
        "gate": "none",  # every term but the head's CE scaled by the fit (and gap) gate (methods/gate.py)
        "gate_floor": 0.5,  # training top-1 (fraction) below which gate=fit keeps the backbone at CE
        "gap_floor": 0.05,  # gate=gap: train-minus-held-out top-1 (fraction) below which it stays shut
        "gap_width": 0.10,  # gate=gap: ... and above which (floor + width) it is fully open
    }
    ranges = {"alpha": "> 0", "T": "> 0", "gate_floor": "[0, 1)", "gap_width": "> 0"}
    choices = {"gate": ("none", "fit", "gap", "auto")}

    @classmethod
    def check_rules(cls, cfg, has_val: bool, cutmix_prob: float) -> None:
        if cutmix_prob > 0:
            raise ConfigError("mixskd mixes its own batches: set data.augment.cutmix_prob=0 and "
                              "data.augment.mixup_alpha=0 (the method's Mixup is method.alpha)")
        if cfg["gate"] == "gap" and not has_val:
            raise ConfigError("method.gate=gap reads the held-out split: set data.val_fraction > 0 "
                              "(e.g. 0.1), or use method.gate=fit")

    def __init__(self, backbone, cfg=None, context=None, **context_fields):
        super().__init__(backbone, cfg, context, **context_fields)
        S = backbone.num_stages
        self.exits = nn.ModuleList(Branch(backbone, l, backbone.num_classes) for l in range(S - 1))
        self.teacher = SelfTeacher(S, backbone.feature_dim, backbone.num_classes)
        c = self.cfg
        self.gating = None  # gate=none: no gate module, so the paper's method keeps its checkpoint layout
        if c["gate"] != "none":
            self.gating = FitGapGate(c["gate"], self.context.has_val, c["gate_floor"],
                                     c["gap_floor"], c["gap_width"])
            self.wants_val = self.gating.wants_val
            self.may_leave_params_unused = True  # a shut gate leaves the stage classifiers idle

    def gate(self) -> float:
        """g in [0, 1] (1 with gate=none): how far MixSKD's terms act on the backbone."""
        return self.gating.value() if self.gating is not None else 1.0

    def schedule_stats(self) -> Dict[str, float]:
        return {"gate": self.gate()} if self.gating is not None else {}

    def on_epoch_end(self, train_stats: Dict[str, float]) -> None:
        if self.gating is not None:
            self.gating.record_fit(train_stats)

    def on_validation(self, val_stats: Dict[str, float]) -> None:
        if self.gating is not None:
            self.gating.record_val(val_stats)

    def summary_notes(self, summary: Dict) -> List[str]:
        return self.gating.never_opened_note(summary) if self.gating is not None else []

    def levels(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Every level's final-resolution map F_l and logits z_l, shallow to deep (the last is
        the backbone's own head)."""
        feats = self.backbone.forward_stages(x)
        maps = [ex.trunk(f) for ex, f in zip(self.exits, feats)] + [self.backbone.final(feats[-1])]
        heads = [ex.head for ex in self.exits] + [self.backbone.classifier]
        return maps, [head(self.backbone.pool(m)) for head, m in zip(heads, maps)]

    def _mix(self, x: torch.Tensor):
        return mixup(x, self.cfg["alpha"], torch.default_generator)

    def train_forward(self, x, y, idx, mix):
        if mix is not None:
            raise RuntimeError("mixskd got a batch mixed by the data pipeline (check data.augment)")
        g = self.gate()
        if g == 0.0:
            # Shut gate: CE's step exactly (its loss, no Mixup draw, the backbone alone).
            logits = self.backbone(x)
            return logits, {"ce": F.cross_entropy(logits.float(), y)}
        B, T = len(x), self.cfg["T"]
        xm, m = self._mix(x)
        maps, logits = self.levels(torch.cat([x, xm]))
        onehot = F.one_hot(y, self.num_classes).float()
        mixed_t = mix_targets(onehot, m)
        bar_z = [interpolate(z[:B], m) for z in logits]
        bar_f = [interpolate(f[:B], m) for f in maps]
        mix_z, mix_f = [z[B:] for z in logits], [f[B:] for f in maps]
        g_bar, g_mix = self.teacher(bar_f), self.teacher(mix_f)

        ce_levels = [soft_cross_entropy(z[:B], onehot) for z in logits]
        ce = sum(ce_levels)
        kl = kl_div(bar_z[-1], g_mix, T) + kl_div(mix_z[-1], g_bar, T)
        for b, t in zip(bar_z[:-1], mix_z[:-1]):
            kl = kl + kl_div(b, t, T) + kl_div(t, b, T)
        feat = sum(F.mse_loss(b.float(), t.float()) for b, t in zip(bar_f, mix_f))
        losses = {"ce": ce, "kl": kl, "feat": feat}
        if self.cfg["mix_ce"]:
            losses["mix_ce"] = sum(soft_cross_entropy(z, mixed_t) for z in mix_z + [g_bar, g_mix])
        if self.gating is not None:
            # The deployed head's CE on the originals stays whole; the rest acts by g.
            losses = {"ce": ce_levels[-1] + g * sum(ce_levels[:-1]),
                      **{k: g * v for k, v in losses.items() if k != "ce"}}
        return logits[-1][:B], losses

    @torch.no_grad()
    def eval_forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(the backbone's logits, each stage classifier's as ``branch1..`` and the self-teacher's
        on the upright maps), one backbone pass."""
        maps, logits = self.levels(x)
        outs = {f"branch{l + 1}": z for l, z in enumerate(logits[:-1])}
        outs["self_teacher"] = self.teacher(maps)
        return logits[-1], outs

    def training_macs(self, input_shape) -> int:
        """MACs of one training sample: the backbone, its stage classifiers and the self-teacher,
        on the image and on its Mixup image."""
        from ..engine.profile import count_macs

        def forward(x):
            maps, logits = self.levels(x)
            return self.teacher(maps)  # once per image: g(bar F) for the originals, g(F~) for the Mixup image

        return 2 * count_macs(self, input_shape, forward=forward)
