"""Meta-SGD: a learned rate per weight, meta-learned; its gradient by hand and by finite differences."""

from __future__ import annotations

import copy

import pytest
import torch
from fewshot_gradient_reference import meta_loss
from test_maml import episode, make

SMALL = (1, 16, 16)


def episodes(n: int = 2) -> list:
    g = torch.Generator().manual_seed(12)
    return [episode(g, dtype=torch.float64, shape=SMALL) for _ in range(n)]


def test_rates_start_at_inner_lr_and_are_meta_parameters():
    algorithm = make("MetaSGD", inner_lr=0.3)
    net_params = dict(algorithm.network.named_parameters())
    assert set(algorithm.alpha) == {k.replace(".", "_") for k in net_params}
    assert all(torch.equal(algorithm.alpha[k.replace(".", "_")], torch.full_like(p, 0.3)) for k, p in
               net_params.items())
    optimized = {id(p) for group in algorithm.optimizer.param_groups for p in group["params"]}
    assert all(id(a) in optimized for a in algorithm.alpha.values())
    assert any(k.startswith("alpha.") for k in algorithm.state_dict())


def perturbed_rates(algorithm, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for a in algorithm.alpha.values():
            a.mul_(1 + scale * torch.rand(a.shape, generator=g, dtype=a.dtype))
    return {k: a.detach().clone() for k, a in algorithm.alpha.items()}


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("engine", ["loop", "threads", "batched"])
def test_meta_gradient_of_weights_and_rates_is_the_hand_written_loop(first_order, engine):
    algorithm = make("MetaSGD", shape=SMALL, inner_lr=0.1, first_order=first_order, engine=engine).double()
    rates = perturbed_rates(algorithm)  # element-wise different rates: a scalar rate would pass a wrong broadcast
    net = copy.deepcopy(algorithm.network)
    params = {k: p.detach().requires_grad_() for k, p in net.named_parameters()}
    alpha = {k: rates[k.replace(".", "_")].requires_grad_() for k in params}
    batch = episodes()
    loss = meta_loss(net, params, alpha, batch, 1, first_order)
    expected = torch.autograd.grad(loss, [*params.values(), *alpha.values()])
    algorithm.update(batch)
    got = [p.grad for p in algorithm.network.parameters()] + [algorithm.alpha[k.replace(".", "_")].grad
                                                               for k in params]
    for e, g in zip(expected, got, strict=True):
        assert torch.allclose(g, e, rtol=0, atol=1e-10)


def test_rate_gradient_matches_finite_differences():
    algorithm = make("MetaSGD", shape=SMALL, inner_lr=0.1, engine="loop").double()
    perturbed_rates(algorithm)
    batch = episodes()
    before = copy.deepcopy(algorithm.state_dict())
    algorithm.update(batch)
    grad = algorithm.alpha["1_weight"].grad[2, 5].item()
    algorithm.load_state_dict(before)
    net = algorithm.network
    params = {k: p.detach() for k, p in net.named_parameters()}

    def loss_at(delta: float) -> float:
        alpha = {k: algorithm.alpha[k.replace(".", "_")].detach().clone() for k in params}
        alpha["1.weight"][2, 5] += delta
        with torch.enable_grad():
            leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
            return float(meta_loss(net, leaves, alpha, batch, 1, False).detach())

    h = 1e-6
    assert grad == pytest.approx((loss_at(h) - loss_at(-h)) / (2 * h), rel=1e-5, abs=1e-9)
    assert abs(grad) > 1e-6
