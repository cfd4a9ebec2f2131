"""Hierarchical self-supervised augmented knowledge distillation with its teacher, HSAKD
(Yang, An, Cai & Xu, "Hierarchical Self-supervised Augmented Knowledge Distillation",
IJCAI 2021): the student half, distilling from a frozen teacher trained with SAD-CE."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..deploy.load import extract_backbone
from ..engine.profile import count_macs
from ..errors import ConfigError
from .base import register_method
from .branch import Branch
from .kd import FrozenTeacherMethod, freeze, teacher_state
from .losses import joint_class_logits, kl_div, mix_targets, soft_cross_entropy
from .transforms import ViewFamily, build_views, resolve_views

# The view family of ``views: auto`` by data modality (as LSSKD's, whose runs train the teacher).


class HSAKDTeacher(nn.Module):
    """A frozen SAD-CE (or any branch-trained LSSKD-family) run: its backbone and its branches'
    joint heads, rebuilt from the checkpoint's own config and loaded strictly."""

    def __init__(self, cfg: Dict, state: Dict[str, torch.Tensor], num_classes: int, num_views: int,
                 source: str):
        super().__init__()
        self.backbone = extract_backbone(cfg, state, num_classes, source)
        S, MC = self.backbone.num_stages, num_views * num_classes
        head = state.get("aux.0.head.weight")
        if head is None:
            raise ConfigError(f"{source} has no branches: train the teacher with method.name=sad_ce "
                              f"(HSAKD's teacher), not {cfg['method']['name']!r}")
        if head.shape[0] != MC:
            raise ConfigError(f"{source}: the teacher's branches predict {head.shape[0]} joint labels, "
                              f"the student's {MC} ({num_views} views x {num_classes} classes)")
        last = cfg["method"].get("last_branch", "stage")
        self.aux = nn.ModuleList(Branch(self.backbone, l, MC, last) for l in range(S))
        aux_state = {k[len("aux."):]: v for k, v in state.items() if k.startswith("aux.")}
        try:
            self.aux.load_state_dict(aux_state)
        except RuntimeError as e:
            raise ConfigError(f"{source}: the teacher's branches do not load: {str(e).splitlines()[0]}") from None
        freeze(self)

    def forward(self, xv: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        feats, _, logits = self.backbone.forward_features(xv)
        return logits, [br(f)[1] for br, f in zip(self.aux, feats)]


@register_method("hsakd")
class HSAKD(FrozenTeacherMethod):
    """HSAKD's student: branches after every stage learn only from a frozen teacher's branches,
    on all M transformed views; the final head learns from the labels and the teacher's head.

    The backbone runs once on the M stacked views t_k(x) (rotations for images); s_l are the
    student's branch-l joint logits (M*C labels), z its own logits; s^t_l, z^t the teacher's:

    L = CE(z(t_0 x), y)
        + sum_l T^2 KL(softmax(s^t_l / T) || softmax(s_l / T))   (all M*B view rows)
        + T^2 KL(softmax(z^t / T) || softmax(z / T))              (all M*B view rows)

    Paper: Yang et al., IJCAI 2021 (Eq. 9-10); checked against winycg/HSAKD
    (``train_student_cifar.py``: ``loss_cls`` on the upright rows only, ``loss_div`` summed over
    the branches plus the final logits, every row of every rotation, weights 1, ``kd_T`` = 3;
    the student's branches receive gradient into its backbone, ``grad=True``). The teacher is a
    checkpoint of a run trained with its branches (``method.name=sad_ce``, HSAKD's teacher
    training, ``train_teacher_cifar.py``), loaded through KD's teacher checks (classes, names,
    input shape) with its branches rebuilt from its own config; it must have as many stages as
    the student. Defaults: ``method.T`` = 3, ``method.views`` = auto (rotation for images),
    ``method.teacher_checkpoint`` = '' (required). Branches use HSAKD's deepest design
    (``last_branch`` = stage). The teacher is held outside the module tree (not saved, not
    optimised, always in eval mode), as KD's. Under CutMix/Mixup the CE target is mixed; the KL
    terms compare student and teacher on the same images. ``deploy()`` is the bare student
    backbone; evaluation reports each branch's upright class scores as ``branch1..``.
    """

    defaults = {
        "teacher_checkpoint": "",  # last.pt / best.pt of a run trained with branches (method.name=sad_ce)
        "T": 3.0,  # temperature of every distillation term (HSAKD's kd_T: 3)
        "views": "auto",  # view family; must be the teacher's (auto: rotation for images, time_flip for signals)
    }
    ranges = {"T": "> 0"}

    @classmethod
    def check_rules(cls, cfg, has_val: bool, cutmix_prob: float) -> None:
        if not cfg["teacher_checkpoint"]:
            raise ConfigError("method.teacher_checkpoint must name a checkpoint of a run trained with "
                              "branches (method.name=sad_ce) for method 'hsakd'")

    def __init__(self, backbone, cfg=None, context=None, **context_fields):
        super().__init__(backbone, cfg, context, **context_fields)
        views = resolve_views(self.cfg["views"], self.context.modality)
        self.views: ViewFamily = build_views(views)
        M, C = self.views.num_views, self.num_classes
        self.num_views = M
        path = self.cfg["teacher_checkpoint"]
        tcfg, st = teacher_state(path, C, self.context.input_shape, self.context.classes, method="hsakd")
        t_views = tcfg["method"].get("views", "auto")
        t_views = resolve_views(t_views, self.context.modality)
        if t_views != views:
            raise ConfigError(f"method.views={views!r} but the teacher {path} was trained on {t_views!r} views")
        teacher = HSAKDTeacher(tcfg, st["method"], C, M, f"teacher {Path(path).expanduser()}")
        if teacher.backbone.num_stages != backbone.num_stages:
            raise ConfigError(f"method.teacher_checkpoint: teacher {path} has {teacher.backbone.num_stages} "
                              f"stages, the student {backbone.num_stages}; HSAKD pairs branch l with branch l")
        self._teacher = [teacher]  # a plain list hides it from nn.Module's registration
        self.aux = nn.ModuleList(Branch(backbone, l, M * C, "stage") for l in range(backbone.num_stages))

    def student(self, xv: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(final logits, each branch's joint logits) on stacked views."""
        feats, _, logits = self.backbone.forward_features(xv)
        return logits, [br(f)[1] for br, f in zip(self.aux, feats)]

    def train_forward(self, x, y, idx, mix):
        B, T = len(x), self.cfg["T"]
        xv = self.views(x)
        logits, joint = self.student(xv)
        with torch.no_grad():
            t_logits, t_joint = self.teacher(xv)
        target = mix_targets(F.one_hot(y, self.num_classes).float(), mix)
        kd = kl_div(logits, t_logits, T)
        branch_kd = sum(kl_div(s, t, T) for s, t in zip(joint, t_joint))
        return logits[:B], {"ce": soft_cross_entropy(logits[:B], target), "kd": kd, "branch_kd": branch_kd}

    @torch.no_grad()
    def eval_forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(student logits, each student branch's upright class scores as ``branch1..``), one pass."""
        logits, joint = self.student(x)
        return logits, {f"branch{l + 1}": joint_class_logits(s, self.num_views, 0) for l, s in enumerate(joint)}

    def training_macs(self, input_shape) -> int:
        """MACs of one training sample: student and teacher, each with its branches, on M views."""
        M = self.num_views
        return M * (count_macs(self, input_shape, forward=self.student)
                    + count_macs(self.teacher, input_shape))
