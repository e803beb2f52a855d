"""Losses against hand-worked examples and explicit-loop formulas; gradients; edge cases."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lift3d.train.losses import ppkd, ppnce, soft_ce, topk_to_dense

torch.set_num_threads(1)


def unit(x):
    return x / x.norm(dim=1, keepdim=True)


# --- ppnce ----------------------------------------------------------------------------------


def test_ppnce_hand_worked_n2():
    # f1 = (1, 0), f2 = (0, 1); g1 = (cos 60, sin 60), g2 = (0, 1).
    # f1.g1 = 1/2, f1.g2 = 0, f2.g1 = sqrt(3)/2, f2.g2 = 1.
    z3d = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2d = torch.tensor([[0.5, math.sqrt(3) / 2], [0.0, 1.0]])
    T = 0.5
    row1 = -math.log(math.exp(0.5 / T) / (math.exp(0.5 / T) + math.exp(0.0 / T)))
    row2 = -math.log(math.exp(1.0 / T) / (math.exp((math.sqrt(3) / 2) / T) + math.exp(1.0 / T)))
    assert abs(float(ppnce(z3d, z2d, T)) - (row1 + row2) / 2) < 1e-6


def test_ppnce_matches_loop_formula():
    torch.manual_seed(0)
    n, d, T = 6, 4, 0.04
    a, b = unit(torch.randn(n, d)).double(), unit(torch.randn(n, d)).double()
    total = 0.0
    for i in range(n):
        sims = [sum(float(a[i, k]) * float(b[j, k]) for k in range(d)) / T for j in range(n)]
        m = max(sims)
        lse = m + math.log(sum(math.exp(s - m) for s in sims))
        total += lse - sims[i]
    assert abs(float(ppnce(a, b, T)) - total / n) < 1e-9


def test_ppnce_edge_cases_and_temperature():
    torch.manual_seed(1)
    z = unit(torch.randn(1, 8))
    assert float(ppnce(z, unit(torch.randn(1, 8)), 0.04)) == pytest.approx(0.0, abs=1e-7)
    a, b = unit(torch.randn(5, 3)), unit(torch.randn(5, 3))
    # logits are (a . b) / T: scaling a by c and T by c gives the same loss
    assert float(ppnce(a * 2.5, b, 0.1 * 2.5)) == pytest.approx(float(ppnce(a, b, 0.1)), rel=1e-5)
    # very high temperature: uniform softmax, loss -> log n
    assert float(ppnce(a, b, 1e6)) == pytest.approx(math.log(5), rel=1e-5)
    # identical embeddings, low temperature: positives dominate, loss -> 0
    z = unit(torch.eye(4) + 0.01)
    assert float(ppnce(z, z, 0.01)) < 1e-6
    with pytest.raises(ValueError):
        ppnce(a, b[:4], 0.1)
    with pytest.raises(ValueError):
        ppnce(a, b, 0.0)


def test_ppnce_gradients():
    torch.manual_seed(2)
    a = unit(torch.randn(4, 3).double()).requires_grad_()
    b = unit(torch.randn(4, 3).double()).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: ppnce(x, y, 0.2), (a, b))
    loss = ppnce(a, b, 0.04)
    loss.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


# --- soft_ce / topk_to_dense ----------------------------------------------------------------


def test_soft_ce_matches_loop_and_hard_labels():
    torch.manual_seed(3)
    logits = torch.randn(5, 4).double()
    t = torch.softmax(torch.randn(5, 4).double(), 1)
    total = 0.0
    for i in range(5):
        z = sum(math.exp(float(v)) for v in logits[i])
        total += -sum(float(t[i, c]) * (float(logits[i, c]) - math.log(z)) for c in range(4))
    assert float(soft_ce(logits, t)) == pytest.approx(total / 5, rel=1e-12)
    labels = torch.tensor([0, 3, 1, 1, 2])
    assert float(soft_ce(logits, F.one_hot(labels, 4).double())) == pytest.approx(
        float(F.cross_entropy(logits, labels)), rel=1e-12
    )


def test_soft_ce_gradient_is_softmax_minus_target():
    torch.manual_seed(4)
    logits = torch.randn(6, 5, requires_grad=True)
    t = torch.softmax(torch.randn(6, 5), 1)
    soft_ce(logits, t).backward()
    expected = (torch.softmax(logits.detach(), 1) - t) / 6
    torch.testing.assert_close(logits.grad, expected)


def test_topk_to_dense_hand_worked():
    prob = torch.tensor([[0.5, 0.3], [0.2, 0.2], [0.0, 0.0]], dtype=torch.float16)
    index = torch.from_numpy(np.array([[3, 0], [1, 4], [2, 1]], dtype=np.uint16))
    dense = topk_to_dense(prob, index, 5)
    expected = torch.tensor([[0.375, 0, 0, 0.625, 0], [0, 0.5, 0, 0, 0.5], [0, 0.5, 0.5, 0, 0]])
    torch.testing.assert_close(dense, expected, rtol=0, atol=1e-3)
    torch.testing.assert_close(dense.sum(1), torch.ones(3))
    with pytest.raises(ValueError):
        topk_to_dense(prob, torch.tensor([[5, 0], [1, 4], [2, 1]]), 5)


# --- ppkd -----------------------------------------------------------------------------------


def test_ppkd_matches_loop_formula():
    torch.manual_seed(5)
    s = torch.randn(4, 3).double()
    t = torch.randn(4, 3).double()
    for T in (1.0, 2.0, 0.5):
        total = 0.0
        for i in range(4):
            p = [math.exp(float(v) / T) for v in t[i]]
            q = [math.exp(float(v) / T) for v in s[i]]
            p = [v / sum(p) for v in p]
            q = [v / sum(q) for v in q]
            total += sum(pc * math.log(pc / qc) for pc, qc in zip(p, q))
        assert float(ppkd(s, t, T)) == pytest.approx(T * T * total / 4, rel=1e-10)


def test_ppkd_probabilities_and_zero_cases():
    torch.manual_seed(6)
    s = torch.randn(3, 4)
    assert float(ppkd(s, s.clone(), 2.0)) == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    logq = torch.log_softmax(s, 1)
    kl = [
        sum(float(p[i, c]) * (math.log(float(p[i, c])) - float(logq[i, c])) for c in range(4) if p[i, c] > 0)
        for i in range(3)
    ]
    assert float(ppkd(s, p, 1.0, teacher_is_prob=True)) == pytest.approx(sum(kl) / 3, rel=1e-5)
    # probabilities and their logs as logits are the same teacher at any temperature
    assert float(ppkd(s, p, 3.0, teacher_is_prob=True)) == pytest.approx(float(ppkd(s, torch.log(p), 3.0)), rel=1e-5)


def test_ppkd_gradient_and_frozen_teacher():
    torch.manual_seed(7)
    s = torch.randn(5, 3, requires_grad=True)
    t = torch.randn(5, 3, requires_grad=True)
    T = 2.0
    ppkd(s, t, T).backward()
    # d/ds [T^2 KL(p || softmax(s / T))] = T (softmax(s / T) - p), averaged over n points
    expected = T * (torch.softmax(s.detach() / T, 1) - torch.softmax(t.detach() / T, 1)) / 5
    torch.testing.assert_close(s.grad, expected)
    assert t.grad is None
