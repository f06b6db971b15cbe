import math

import pytest
import torch
import torch.nn.functional as F

from kdray.losses import kd_loss


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([[1.0, 1.0, 0.0]])
    y = torch.tensor([0])
    T, alpha = 2.0, 0.7
    # by hand: p_t = softmax(t/T), p_s = softmax(s/T)
    zt = [math.exp(0.5), math.exp(0.5), math.exp(0.0)]
    zs = [math.exp(1.0), math.exp(0.0), math.exp(-0.5)]
    pt = [z / sum(zt) for z in zt]
    ps = [z / sum(zs) for z in zs]
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    ce = -math.log(math.exp(2.0) / (math.exp(2.0) + 1 + math.exp(-1.0)))
    expected = alpha * T * T * kl + (1 - alpha) * ce
    assert kd_loss(s, y, t, alpha, T).item() == pytest.approx(expected, rel=1e-5)


def test_alpha_zero_is_plain_cross_entropy_and_needs_no_teacher():
    s, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    assert torch.allclose(kd_loss(s, y, None, 0.0), F.cross_entropy(s, y))


def test_identical_logits_give_zero_kd_term():
    s, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    assert kd_loss(s, y, s.clone(), 1.0, 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_scale_is_comparable_across_temperatures():
    # T² scaling keeps the soft-target gradient magnitude roughly independent of T (Hinton et al.)
    torch.manual_seed(0)
    t = torch.randn(64, 3)
    grads = []
    for T in (4.0, 8.0):
        s = torch.zeros(64, 3, requires_grad=True)
        kd_loss(s, torch.zeros(64, dtype=torch.long), t, 1.0, T).backward()
        grads.append(s.grad.norm().item())
    assert grads[0] / grads[1] == pytest.approx(1.0, rel=0.25)


def test_invalid_arguments():
    s, y = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="needs teacher"):
        kd_loss(s, y, None, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(s, y, s, 1.5)
