"""Self-supervised label augmentation with self-distillation, SLA+SD (Lee, Hwang & Shin,
"Self-supervised Label Augmentation via Input Transformations", ICML 2020)."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import Method, register_method
from .losses import joint_class_logits, joint_labels, kl_div, mix_targets, soft_cross_entropy
from .transforms import ViewFamily, build_views, resolve_views

# The view family of ``method.views=auto`` by data modality (as LSSKD's).


def aggregated_logits(joint: torch.Tensor, batch: int, num_views: int) -> torch.Tensor:
    """SLA's aggregation (Sec. 2.3): ``agg_i,c = (1/M) sum_k s(t_k x_i)_{c*M + k}``, the mean over
    the M views of each view's joint logit at its own (class, view) slot. ``joint`` holds the
    M views view-major (rows ``k*batch:(k+1)*batch`` are view k); the result is (batch, C)."""
    rows = joint.view(num_views, batch, -1)
    return sum(joint_class_logits(rows[k], num_views, k) for k in range(num_views)) / num_views


@register_method("sla")
class SelfSupervisedLabelAugmentation(Method):
    """SLA+SD: a joint (class x view) head and the plain head on the backbone's final feature,
    the plain head distilled from the joint head's view-aggregated logits.

    The backbone runs once on the M stacked views t_0(x) .. t_{M-1}(x) (t_0 = identity;
    batch norm sees them as one batch); h is the pooled final feature, s = W_joint h the
    joint logits over M*C labels, z = the backbone's own classifier on the identity view:

    L = CE(s(t_k x), y*M + k)  (mean over the M*B view rows)
        + CE(z(x), y)
        + T^2 * KL(softmax(agg / T) || softmax(z / T)),
    agg_c = (1/M) sum_k s(t_k x)_{c*M + k}, detached

    Paper: Lee et al., ICML 2020, Sec. 2.3 (aggregation, self-distillation); checked against
    the official code (hankook/SLA, ``trainers.create_sla_sd_trainer``): logits (not
    probabilities) are averaged, T = 1, the three terms weigh 1 each, the joint CE is a mean
    over all view rows (``--with-large-loss``, the sum over views the authors use on
    ImageNet, is not implemented). Defaults: ``method.views`` = auto (rotations by 0/90/180/270
    degrees for images, as the paper; time_flip for signals), ``method.T`` = 1.

    The trained model is SLA+SD: ``deploy()`` is the bare backbone with its own classifier,
    so it costs one plain inference. ``eval_forward`` also reports the joint head read at the
    identity slot (``sla_si``, SLA+SI, one pass) and SLA+AG (``sla_ag_<M>pass``: the
    aggregated logits of all M views, **M inferences** per image). Under CutMix/Mixup the
    mixed images are transformed, the joint and plain targets are mixed (the joint ones per
    view); the distillation term compares two heads on the same image and is not mixed.
    """

    defaults = {
        "views": "auto",  # view family (methods/transforms.py); auto: rotation (images), time_flip (signals)
        "T": 1.0,  # temperature of the self-distillation term (paper and official code: 1)
    }
    ranges = {"T": "> 0"}

    def __init__(self, backbone, cfg=None, context=None, **context_fields):
        super().__init__(backbone, cfg, context, **context_fields)
        views = resolve_views(self.cfg["views"], self.context.modality)
        self.views: ViewFamily = build_views(views)
        self.num_views = self.views.num_views
        if self.num_views < 2:
            raise ConfigError(f"method.views={views!r} has one view; sla needs at least 2 (e.g. rotation)")
        self.joint = nn.Linear(backbone.feature_dim, backbone.num_classes * self.num_views)

    def _features(self, xv: torch.Tensor) -> torch.Tensor:
        return self.backbone.pool(self.backbone.final(self.backbone.forward_stages(xv)[-1]))

    def train_forward(self, x, y, idx, mix):
        B, M, T = len(x), self.num_views, self.cfg["T"]
        h = self._features(self.views(x))  # (M*B, D), view-major
        joint = self.joint(h)
        logits = self.backbone.classifier(h[:B])  # the plain head on the identity view
        joint_t = mix_targets(F.one_hot(joint_labels(y, M), self.num_classes * M).float(), mix, group=M)
        target = mix_targets(F.one_hot(y, self.num_classes).float(), mix)
        agg = aggregated_logits(joint, B, M)
        return logits, {
            "joint_ce": soft_cross_entropy(joint, joint_t),
            "ce": soft_cross_entropy(logits, target),
            "sd": kl_div(logits, agg.detach(), T),
        }

    @torch.no_grad()
    def eval_forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(deployed logits, {``sla_si``: joint head at the identity slot, ``sla_ag_<M>pass``:
        SLA+AG over all M views}); the identity view's pass is the deployed model's own."""
        B, M = len(x), self.num_views
        h0 = self._features(x)
        logits = self.backbone.classifier(h0)
        h = torch.cat([h0, self._features(self.views(x)[B:])])
        joint = self.joint(h)
        return logits, {"sla_si": joint_class_logits(joint[:B], M, 0),
                        f"sla_ag_{M}pass": aggregated_logits(joint, B, M)}

    def training_macs(self, input_shape) -> int:
        """MACs of one training sample: the backbone on its M views, the joint head on each
        and the plain head once."""
        from ..engine.profile import count_macs

        y = torch.zeros(1, dtype=torch.long)
        return count_macs(self, input_shape, forward=lambda x: self.train_forward(x, y.to(x.device), None, None))
