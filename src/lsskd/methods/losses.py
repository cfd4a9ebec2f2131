"""The loss functions and target helpers every method shares, in one place.

Conventions (all functions):

* Arguments go **student first, then teacher/target**: ``f(student, teacher, ...)``.
  Teachers and targets are constants: they are detached inside and get no gradient.
* Every loss is a mean over rows (samples or view rows) and computed in float32
  whatever the autocast dtype of its inputs.
* ``KL(p || q) = sum_c p_c log(p_c / q_c)``; ``softmax(z / T)`` is the
  temperature-softened prediction.

Two KL helpers exist because a teacher comes either as logits (a network head:
:func:`kl_div`) or as probabilities (a stored, virtual or already softened
distribution: :func:`kl_div_probs`). They compute the same quantity with different
floating-point steps; each method keeps the one it was written with, so its numbers
stay bit-identical to earlier releases.

The feature-consistency loss has one function and one named argument for its
normalisation: LSSKD divides the squared distance by the feature dimension
(``per_dim=True``), BYOT does not (``per_dim=False``), as each paper states.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..data.augment import MixInfo


# --- targets -----------------------------------------------------------------------
def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a soft target, averaged over rows:

        CE(z, q) = mean_i ( -sum_c q_ic log softmax(z_i)_c )

    With a one-hot ``q`` it is the usual cross-entropy (Shannon; used as the
    classification loss of every method here). ``target`` rows are probabilities.
    """
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def progressive_target(hard: torch.Tensor, prev: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The progressively softened target of LSSKD (METHOD.md Eqs. 1-2; PS-KD, Kim et al.,
    ICCV 2021):

        t_i = (1 - a_i) * hard_i + a_i * prev_i

    ``hard`` one-hot rows (class labels for Eq. 1, joint labels for Eq. 2), ``prev`` the
    model's stored previous-epoch predictions for the same rows (probabilities), ``alpha``
    one weight per row, shape (rows, 1): alpha_t, times any per-sample scaling, and 0 on
    rows with no stored prediction yet (then the target is the hard label)."""
    return (1 - alpha) * hard + alpha * prev


def mix_targets(target: torch.Tensor, mix: Optional[MixInfo], group: int = 1) -> torch.Tensor:
    """CutMix targets (Yun et al., "CutMix", ICCV 2019): row i's target becomes

        t'_i = lam * t_i + (1 - lam) * t_perm(i)

    where lam is the share of row i's own image left after pasting the box. With
    ``group`` > 1 the rows are ``group`` stacked copies of the batch (views, view-major),
    each mixed the same way. ``mix=None`` (no mixing) returns ``target`` itself."""
    if mix is None:
        return target
    b = len(mix.perm)
    t = target.view(group, b, -1)
    return (mix.lam * t + (1 - mix.lam) * t[:, mix.perm]).view_as(target)


def joint_labels(y: torch.Tensor, num_views: int, views: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Joint (class x transformation) labels of stacked views (Lee et al., "Self-supervised
    Label Augmentation", ICML 2020; HSAKD; METHOD.md): sample (x, y) under view t_k has the
    label ``y * M + k`` among M*C. Rows are view-major (rows ``j*B:(j+1)*B`` hold the j-th
    view of ``views``; default all M views ``0..M-1``), so the result has ``len(views) * B``
    entries."""
    if views is None:
        k = torch.arange(num_views, device=y.device).repeat_interleave(len(y))
        return y.repeat(num_views) * num_views + k
    k = torch.tensor(list(views), device=y.device).repeat_interleave(len(y))
    return y.repeat(len(views)) * num_views + k


def joint_class_logits(joint_logits: torch.Tensor, num_views: int, view: int = 0) -> torch.Tensor:
    """Class scores read from joint logits over M*C labels: the entries ``c * M + view``
    (with ``view=0``, the class scores of an untransformed input)."""
    return joint_logits[:, view::num_views]


def aggregate_views(joint: torch.Tensor, num_views: int, views: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Class scores aggregated over transformations (Lee, Hwang and Shin, "Self-supervised
    Label Augmentation", ICML 2020, Sec. 2.3): for joint scores of stacked views (rows
    view-major, as :func:`joint_labels`; ``views`` default all M),

        agg_i[c] = (1 / V) sum_{k in views} s(t_k x_i)[c * M + k]

    (B, C) from (V*B, M*C). Given logits it is SLA's aggregation; given log-probabilities
    it differs from it by a constant per row, so softmax and argmax are the same."""
    return view_class_scores(joint, num_views, views).mean(0)


def view_class_scores(joint: torch.Tensor, num_views: int, views: Optional[Sequence[int]] = None) -> torch.Tensor:
    """(V, B, C): for each stacked view t_k (rows view-major), its joint scores at the slots
    ``c * M + k``, the class scores :func:`aggregate_views` averages."""
    views = list(range(num_views)) if views is None else list(views)
    b = joint.shape[0] // len(views)
    return torch.stack([joint[p * b:(p + 1) * b, k::num_views] for p, k in enumerate(views)])


# --- distillation ---------------------------------------------------------------------
def kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Temperature KL from a teacher given as logits (Hinton et al., "Distilling the
    Knowledge in a Neural Network", 2015):

        T^2 * mean_i KL( softmax(t_i / T) || softmax(s_i / T) )

    ``student_logits`` s, ``teacher_logits`` t (detached). T^2 keeps the gradient scale
    independent of T. Used by LSSKD's deep-to-shallow term (Eq. 7)."""
    t = F.softmax(teacher_logits.detach().float() / T, dim=-1)
    log_s = F.log_softmax(student_logits.float() / T, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / T, dim=-1)
    return (T ** 2) * (t * (log_t - log_s)).sum(-1).mean()


def kl_div_probs(student_logits: torch.Tensor, teacher_probs: torch.Tensor, T: float) -> torch.Tensor:
    """Temperature KL to a teacher given as probabilities p (Hinton et al. 2015, Sec. 2):

        T^2 * mean_i KL( p_i || softmax(s_i / T) ),   KL = sum_c p_c log p_c - p_c log q_c

    ``p`` is already the teacher's softened distribution (e.g. softmax(z_t / T), or a
    virtual teacher) and is detached; 0 log 0 = 0. Used by KD, TF-KD, CS-KD and BYOT."""
    target = teacher_probs.detach().float()
    logq = F.log_softmax(student_logits.float() / T, dim=-1)
    kl = (torch.xlogy(target, target) - target * logq).sum(-1)
    return (T * T) * kl.mean()


def feature_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, *, per_dim: bool) -> torch.Tensor:
    """Feature consistency (hint) loss between pooled features, teacher detached:

        per_dim=False:  mean_i ||h_i - t_i||^2          (BYOT, Zhang et al., ICCV 2019, Sec. 3.2)
        per_dim=True:   mean_i ||h_i - t_i||^2 / D      (LSSKD Eq. 8; D = feature dimension)

    The normalisation is an explicit, required argument because the two papers differ."""
    hd = teacher_feat.detach().float()
    d = ((student_feat.float() - hd) ** 2).sum(-1).mean()
    return d / hd.shape[-1] if per_dim else d
