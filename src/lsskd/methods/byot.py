"""Be Your Own Teacher, BYOT (Zhang et al., "Be Your Own Teacher: Improve the
Performance of Convolutional Neural Networks via Self Distillation", ICCV 2019)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, register_method
from .branch import Branch
from .losses import feature_loss, kl_div_probs, mix_targets, soft_cross_entropy


@register_method("byot")
class BeYourOwnTeacher(Method):
    """BYOT: the deepest classifier teaches exits attached after every shallower stage.

    Exit l (stage l = 1..S-1) maps stage l's output through ``backbone.branch_trunk``
    (fresh copies of the deeper stages and ``final``), the backbone's pool and a new
    Linear(feature_dim, C), giving a pooled feature h_l and logits z_l; the deepest
    exit is the backbone's own head (h_S, z_S). With q = softmax(. / T):

    L = CE(z_S, y) + sum_{l<S} [ (1 - alpha) * CE(z_l, y)
                                 + alpha * T^2 * KL(q(z_S).detach() || q(z_l))
                                 + lambda * mean_i ||h_l,i - h_S,i.detach()||^2 ]

    Paper: Zhang et al., ICCV 2019 (Sec. 3.2, three losses per shallow section).
    Defaults: ``method.alpha`` = 0.3, ``method.T`` = 3, ``method.lambda`` = 0.03, the
    values of the widely used public BYOT re-implementation (the paper gives no single
    CIFAR setting). The paper's bottleneck+FC exits are replaced by the stage contract's
    branch trunks so any backbone gets exits; since they end in feature_dim channels
    the hint term needs no adapter. Features are compared after pooling. With CutMix
    the CE targets of every exit are mixed; the KD and hint terms compare exits on the
    same (mixed) image and need no mixing. Exits are training-only: ``deploy()`` is
    the bare backbone and ``eval_forward`` reports ``branch1..branch{S-1}``.
    """

    defaults = {"alpha": 0.3, "T": 3.0, "lambda": 0.03}
    ranges = {"alpha": "[0, 1]", "T": "> 0", "lambda": ">= 0"}

    def __init__(self, backbone, cfg=None, context=None, **context_fields):
        super().__init__(backbone, cfg, context, **context_fields)
        self.exits = nn.ModuleList(Branch(backbone, l, backbone.num_classes)
                                   for l in range(backbone.num_stages - 1))

    def all_exits(self, x: torch.Tensor) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
        """(shallow exits' (h_l, z_l), shallow to deep; deepest h_S; deepest z_S)."""
        feats = self.backbone.forward_stages(x)
        h, logits = self.backbone.head(feats[-1])
        return [ex(f) for ex, f in zip(self.exits, feats)], h, logits

    def train_forward(self, x, y, idx, mix):
        alpha, T, lam = self.cfg["alpha"], self.cfg["T"], self.cfg["lambda"]
        shallow, h_deep, logits = self.all_exits(x)
        target = mix_targets(F.one_hot(y, self.num_classes).float(), mix)
        teacher = F.softmax(logits.detach().float() / T, dim=-1)
        zero = logits.new_zeros((), dtype=torch.float32)
        ce_b, kd_b, feat_b = zero, zero, zero
        for h, z in shallow:
            ce_b = ce_b + (1.0 - alpha) * soft_cross_entropy(z, target)
            kd_b = kd_b + alpha * kl_div_probs(z, teacher, T)
            feat_b = feat_b + lam * feature_loss(h, h_deep, per_dim=False)
        return logits, {"ce": soft_cross_entropy(logits, target), "branch_ce": ce_b,
                        "branch_kd": kd_b, "branch_feat": feat_b}

    @torch.no_grad()
    def eval_forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(deepest logits, each shallow exit's logits as ``branch1..``), one backbone pass."""
        feats, _, logits = self.backbone.forward_features(x)
        return logits, {f"branch{l + 1}": ex(f)[1] for l, (ex, f) in enumerate(zip(self.exits, feats))}

    def training_macs(self, input_shape) -> int:
        """MACs of one training forward: backbone plus every exit."""
        from ..engine.profile import count_macs

        return count_macs(self, input_shape, forward=self.all_exits)
