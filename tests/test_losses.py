"""methods/losses.py: each shared loss and target helper on numbers checkable by hand."""
import math

import pytest
import torch

from lsskd.data import MixInfo
from lsskd.methods.losses import (feature_loss, joint_class_logits, joint_labels, kl_div, kl_div_probs,
                                  mix_targets, soft_cross_entropy)


def test_soft_cross_entropy():
    z = torch.tensor([[1.0, 2.0, 3.0]])
    lse = math.log(math.e + math.e ** 2 + math.e ** 3)  # 3.40760596...
    assert float(soft_cross_entropy(z, torch.tensor([[0.0, 0.0, 1.0]]))) == pytest.approx(0.4076059644, abs=1e-7)
    assert float(soft_cross_entropy(z, torch.tensor([[0.0, 0.5, 0.5]]))) == pytest.approx(lse - 2.5, abs=1e-6)
    # Mean over rows: a second row with target class 0 adds lse - 1 = 2.4076...
    two = soft_cross_entropy(z.repeat(2, 1), torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    assert float(two) == pytest.approx(((lse - 3) + (lse - 1)) / 2, abs=1e-6)


def test_mix_targets():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mix = MixInfo(perm=torch.tensor([1, 0]), lam=0.75)
    assert mix_targets(t, mix).tolist() == [[0.75, 0.25], [0.25, 0.75]]
    assert mix_targets(t, None) is t
    # group=2: two stacked copies (views) of the batch, each mixed the same way.
    assert mix_targets(torch.cat([t, t]), mix, group=2).tolist() == [[0.75, 0.25], [0.25, 0.75]] * 2


def test_joint_labels_and_class_logits():
    y = torch.tensor([3, 7])
    assert joint_labels(y, 4).tolist() == [12, 28, 13, 29, 14, 30, 15, 31]  # y*4 + k, view-major
    assert joint_labels(y, 4, [0, 2]).tolist() == [12, 28, 14, 30]
    s = torch.arange(8.0).view(1, 8)  # M = 4 views x C = 2 classes: label c*4 + k
    assert joint_class_logits(s, 4).tolist() == [[0.0, 4.0]]
    assert joint_class_logits(s, 4, view=1).tolist() == [[1.0, 5.0]]


def test_kl_from_logits_and_from_probs_agree():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[2 * math.log(3.0), 0.0]])  # softmax(t / 2) = (3/4, 1/4)
    want = 4.0 * (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))  # 0.52324814
    assert float(kl_div(s, t, 2.0)) == pytest.approx(want, abs=1e-6)
    assert float(kl_div_probs(s, torch.tensor([[0.75, 0.25]]), 2.0)) == pytest.approx(want, abs=1e-6)
    assert float(kl_div(t, t, 3.0)) == pytest.approx(0.0, abs=1e-7)
    # 0 log 0 = 0: a one-hot teacher against a uniform student is log 2.
    assert float(kl_div_probs(s, torch.tensor([[1.0, 0.0]]), 1.0)) == pytest.approx(math.log(2), abs=1e-6)


def test_kl_gradients_reach_the_student_only():
    s = torch.tensor([[0.5, -0.5]], requires_grad=True)
    t = torch.tensor([[2.0, 0.0]], requires_grad=True)
    kl_div(s, t, 2.0).backward()
    assert t.grad is None and s.grad is not None
    # d/ds [T^2 KL(p || softmax(s/T))] = T (q - p): q = softmax(s/2), p = softmax(t/2).
    q1 = 1 / (1 + math.exp(-0.5))
    p1 = 1 / (1 + math.exp(-1.0))
    assert s.grad.tolist()[0] == pytest.approx([2 * (q1 - p1), 2 * (p1 - q1)], abs=1e-6)


def test_feature_loss_normalisations():
    h = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.0, 0.0], [0.0, 2.0]], requires_grad=True)
    # squared distances 1 + 4 = 5 and 0 + 4 = 4: mean 4.5; per dimension (D = 2) 2.25
    assert float(feature_loss(h, t, per_dim=False)) == 4.5
    loss = feature_loss(h, t, per_dim=True)
    assert float(loss) == 2.25
    loss.backward()
    assert t.grad is None
    assert h.grad.tolist() == [[0.5, 1.0], [0.0, -1.0]]  # 2 (h - t) / (B D)
    with pytest.raises(TypeError):
        feature_loss(h, t)  # the normalisation must be named
