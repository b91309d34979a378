import math

import pytest
import torch

from dpokit.losses import LOSSES, get_loss, sigmoid_loss


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_sigmoid_hand_computed():
    # pair 0: log-ratios chosen 1.0 - 0.5 = 0.5, rejected -1.0 - (-0.5) = -0.5 -> h = 1.0
    # pair 1: margin 0 -> loss ln 2
    losses, cr, rr = sigmoid_loss(t(-1.0, -3.0), t(-2.0, -4.0), t(-1.5, -3.0), t(-1.5, -4.0), beta=0.5)
    assert losses[0].item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-12)  # -log sigma(0.5 * 1.0)
    assert losses[1].item() == pytest.approx(math.log(2), abs=1e-12)
    assert cr.tolist() == pytest.approx([0.25, 0.0]) and rr.tolist() == pytest.approx([-0.25, 0.0])


def test_label_smoothing_zero_is_plain_dpo_and_smoothing_changes_loss():
    args = (t(-1.0), t(-2.0), t(-1.5), t(-1.5))
    plain = sigmoid_loss(*args, beta=0.5)[0]
    assert torch.equal(sigmoid_loss(*args, beta=0.5, label_smoothing=0.0)[0], plain)
    eps = 0.2
    expected = (1 - eps) * math.log1p(math.exp(-0.5)) + eps * math.log1p(math.exp(0.5))
    assert sigmoid_loss(*args, beta=0.5, label_smoothing=eps)[0].item() == pytest.approx(expected, abs=1e-12)


def test_dpo_gradient_matches_closed_form():
    # dL/d logpi(y_w) = -beta * sigma(r_l - r_w), dL/d logpi(y_l) = +beta * sigma(r_l - r_w)
    pc, pr = t(-1.0).requires_grad_(), t(-2.0).requires_grad_()
    rc, rr, beta = t(-1.3), t(-1.7), 0.4
    sigmoid_loss(pc, pr, rc, rr, beta=beta)[0].sum().backward()
    r_w, r_l = beta * (-1.0 + 1.3), beta * (-2.0 + 1.7)
    s = 1 / (1 + math.exp(-(r_l - r_w)))
    assert pc.grad.item() == pytest.approx(-beta * s, abs=1e-12)
    assert pr.grad.item() == pytest.approx(beta * s, abs=1e-12)


def test_registry_and_unknown_name():
    assert LOSSES["sigmoid"].needs_reference
    with pytest.raises(ValueError, match="did you mean 'sigmoid'"):
        get_loss("sigmod")
