"""dg_meta.support_heads: class means and cosine logits by hand, CloserLookFewShot's ``distLinear`` (weight
normalisation, input normalisation, scale rule) and its test-time fine-tuning loop replayed step by step with a
hand-written SGD (momentum, dampening, weight decay) and the cross-entropy gradient in closed form.
(``fit_logistic_regression`` is checked against sklearn in test_lastshot.py and test_rfs.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from support_head_reference import linear_ce_gradient, replay_finetune
from torch import nn

from dg_meta.support_heads import (
    FINETUNE_SGD,
    CosineHead,
    class_means,
    cosine_head_scale,
    cosine_logits,
    fit_logistic_regression,
    fit_support_head,
)


def test_class_means_are_the_per_class_averages():
    z = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    y = torch.tensor([0, 0, 2, 2, 1])
    assert torch.equal(class_means(z, y, 3), torch.tensor([[2.0, 3.0], [5.0, 5.0], [5.0, 0.0]]))


def test_cosine_logits_are_scale_times_the_cosine_of_each_pair():
    query = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    centres = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 5.0]])
    expected = [[3 / 5, 7 / (5 * math.sqrt(2)), 4 / 5], [0.0, -1 / math.sqrt(2), -1.0]]
    assert torch.allclose(cosine_logits(query, centres, 2.5), 2.5 * torch.tensor(expected))
    scale = torch.tensor(3.0, requires_grad=True)
    cosine_logits(query, centres, scale).sum().backward()
    assert scale.grad.item() == pytest.approx(sum(map(sum, expected)), rel=1e-6)


def test_cosine_head_scale_is_two_up_to_200_classes_and_ten_above():
    assert [cosine_head_scale(n) for n in (5, 200, 201, 4112)] == [2.0, 2.0, 10.0, 10.0]


def test_cosine_head_is_distlinear_weight_normalised_rows_on_normalised_inputs():
    torch.manual_seed(4)
    reference = nn.Linear(3, 2, bias=False)
    torch.manual_seed(4)
    head = CosineHead(3, 2, scale=10.0)
    # WeightNorm(dim=0) starts from nn.Linear's weight: direction v = w, norm g = ||w_k|| per row
    assert torch.equal(head.weight_v.detach(), reference.weight.detach())
    assert torch.allclose(head.weight_g.detach(), reference.weight.detach().norm(dim=1, keepdim=True))
    assert torch.allclose(head.weight.detach(), reference.weight.detach())
    assert {n for n, _ in head.named_parameters()} == {"weight_v", "weight_g"}
    head.double()
    with torch.no_grad():
        head.weight_v.copy_(torch.tensor([[3.0, 0.0, 4.0], [0.0, 2.0, 0.0]]))
        head.weight_g.copy_(torch.tensor([[2.0], [0.5]]))
    x = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    # rows of w: 2 * (0.6, 0, 0.8) and 0.5 * (0, 1, 0); x / (||x|| + 1e-5) with ||x|| = 3
    unit = [v / (3 + 1e-5) for v in (1.0, 2.0, 2.0)]
    expected = [[10 * 2 * (0.6 * unit[0] + 0.8 * unit[2]), 10 * 0.5 * unit[1]], [0.0, 0.0]]
    out = head(x)
    assert torch.allclose(out, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("epochs", [2, None])
def test_fit_support_head_replays_the_official_sgd_loop(epochs):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    head = nn.Linear(3, 3).double()
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
    torch.manual_seed(11)
    kwargs = {} if epochs is None else {"epochs": epochs}
    assert fit_support_head(head, z, y, **kwargs) is head
    torch.manual_seed(11)
    (weight, bias), batches = replay_finetune([w0, b0], linear_ce_gradient, z, y, 100 if epochs is None else epochs)
    assert [len(b) for b in batches[:2]] == [4, 2]  # minibatches of 4, the last one smaller
    assert len(batches) == 2 * (100 if epochs is None else epochs)
    assert torch.allclose(head.weight.detach(), weight, rtol=0, atol=1e-12)
    assert torch.allclose(head.bias.detach(), bias, rtol=0, atol=1e-12)
    assert FINETUNE_SGD == {"lr": 0.01, "momentum": 0.9, "dampening": 0.9, "weight_decay": 1e-3}


def test_fit_support_head_trains_under_no_grad_and_leaves_the_features_alone():
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    head = nn.Linear(3, 2).double()
    before = head.weight.detach().clone()
    with torch.no_grad():
        fit_support_head(head, z, torch.tensor([0, 1, 0, 1]), epochs=1)
    assert not torch.equal(head.weight.detach(), before)
    assert z.grad is None


def test_fit_support_head_trains_a_cosine_head_by_its_weight_norm_parameters():
    torch.manual_seed(2)
    head = CosineHead(3, 2, scale=2.0).double()
    z = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, -0.5]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    v, gn = head.weight_v.detach().clone(), head.weight_g.detach().clone()
    torch.manual_seed(5)
    fit_support_head(head, z, y, epochs=1)
    torch.manual_seed(5)
    take = torch.randperm(2).tolist()
    v.requires_grad_(), gn.requires_grad_()
    x = z[take] / (z[take].norm(dim=1, keepdim=True) + 1e-5)
    logits = 2.0 * x @ (gn * v / v.norm(dim=1, keepdim=True)).t()
    grads = torch.autograd.grad(nn.functional.cross_entropy(logits, y[take]), [v, gn])
    expected = [p.detach() - 0.01 * (d + 1e-3 * p.detach()) for p, d in zip([v, gn], grads)]  # first step: buf = g
    assert torch.allclose(head.weight_v.detach(), expected[0], atol=1e-12)
    assert torch.allclose(head.weight_g.detach(), expected[1], atol=1e-12)


def test_fit_logistic_regression_reaches_the_optimum_of_sklearns_objective():
    """At the minimiser of ``c * sum_i CE(W x_i + b, y_i) + ||W||^2 / 2`` the gradient vanishes:
    ``c * sum_i (p_i - y_i) x_i^T + W = 0`` and ``sum_i (p_i - y_i) = 0`` (the intercept is not penalised)."""
    x = torch.tensor([[2.0, 0.1], [1.5, -0.3], [-0.2, 2.1], [0.3, 1.7], [0.1, 0.2], [-1.0, -1.5], [-0.5, -2.0]])
    y = torch.tensor([0, 0, 1, 1, 0, 2, 2])
    for c in (0.3, 4.0):
        weight, bias = fit_logistic_regression(x, y, c)
        assert weight.shape == (3, 2) and bias.shape == (3,) and weight.dtype == torch.float64
        residual = torch.softmax(x.double() @ weight.t() + bias, dim=1) - torch.nn.functional.one_hot(y, 3)
        assert torch.allclose(c * residual.t() @ x.double() + weight, torch.zeros(3, 2, dtype=torch.float64),
                              atol=1e-5)
        assert torch.allclose(residual.sum(0), torch.zeros(3, dtype=torch.float64), atol=1e-5)
        assert weight.abs().max() > 0.1
