"""IGA: the penalty by hand (two domains: half the squared distance of their gradients; three: the variance
identity), two Adam updates replayed with ``torch.func`` gradients of the whole objective, the defaults."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from search_space import bounds

from dg_meta import registry
from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve

IGA = registry.get_algorithm("IGA")
SIZES = (3, 4, 5)


def tiny(n_domains: int = 3, **overrides) -> torch.nn.Module:
    hp = resolve(declared_hparams(IGA), 0, overrides)
    torch.manual_seed(0)
    return IGA((4,), 3, n_domains, {**hp, "mlp_width": 6, "mlp_depth": 2}).double()


def tiny_batch(seed: int, sizes=SIZES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for n in sizes]


def flat_domain_gradients(net, names, params, batch) -> list[torch.Tensor]:
    """Each domain's loss gradient as one flat vector, by ``torch.func.grad`` (differentiable)."""

    def loss(p, x, y):
        return F.cross_entropy(torch.func.functional_call(net, dict(zip(names, p)), (x,)), y)

    return [torch.cat([g.reshape(-1) for g in torch.func.grad(loss)(params, x, y)]) for x, y in batch]


def test_two_domain_penalty_is_half_the_squared_distance_between_their_gradients():
    alg, batch = tiny(2), tiny_batch(1, (3, 5))
    net = copy.deepcopy(alg.network)
    names = [n for n, _ in net.named_parameters()]
    g1, g2 = flat_domain_gradients(net, names, [p.detach() for p in net.parameters()], batch)
    expected_penalty = 0.5 * (g1 - g2).pow(2).sum()
    expected_loss = (F.cross_entropy(net(batch[0][0]), batch[0][1]) + F.cross_entropy(net(batch[1][0]),
                                                                                      batch[1][1])) / 2
    losses = alg.update(batch)
    assert torch.allclose(losses["penalty"], expected_penalty, rtol=1e-10, atol=0)
    assert torch.allclose(losses["loss"], expected_loss.detach(), rtol=1e-12, atol=0)
    assert float(expected_penalty) > 1e-4


@pytest.mark.parametrize("weight", [0.0, 3.0])
def test_two_updates_are_adam_steps_on_mean_loss_plus_weighted_gradient_variance(weight):
    alg = tiny(penalty=weight)
    net = copy.deepcopy(alg.network)
    names = [n for n, _ in net.named_parameters()]
    hand = HandAdam(list(net.parameters()), lr=1e-3)

    def objective(params, batch):
        grads = flat_domain_gradients(net, names, params, batch)
        mean = sum(grads) / len(grads)
        penalty = sum(g.pow(2).sum() for g in grads) - len(grads) * mean.pow(2).sum()  # sum_e |g_e - mean|^2
        loss = sum(F.cross_entropy(torch.func.functional_call(net, dict(zip(names, params)), (x,)), y)
                   for x, y in batch) / len(batch)
        return loss + weight * penalty, (loss, penalty)

    for step in range(2):
        batch = tiny_batch(10 + step)
        grads, (loss, penalty) = torch.func.grad(objective, has_aux=True)(hand.params, batch)
        hand.step(grads)
        losses = alg.update(batch)
        assert torch.allclose(losses["loss"], loss, rtol=1e-12, atol=0)
        assert torch.allclose(losses["penalty"], penalty, rtol=1e-8, atol=1e-15)
        for p, q in zip(alg.network.parameters(), hand.params):
            assert torch.allclose(p, q, rtol=0, atol=1e-12)


def test_penalty_gradient_matches_finite_differences():
    alg, batch = tiny(penalty=1.0), tiny_batch(3)
    params = list(alg.network.parameters())
    captured = {}

    def capture_step():
        captured["grads"] = [p.grad.clone() for p in params]

    alg.optimizer.step = capture_step
    alg.update(batch)
    net = copy.deepcopy(alg.network)
    names = [n for n, _ in net.named_parameters()]
    direction = [torch.randn_like(p) for p in params]

    def value(shift: float) -> float:
        shifted = [p.detach() + shift * d for p, d in zip(params, direction)]
        grads = flat_domain_gradients(net, names, shifted, batch)
        mean = sum(grads) / len(grads)
        loss = sum(F.cross_entropy(torch.func.functional_call(net, dict(zip(names, shifted)), (x,)), y)
                   for x, y in batch) / len(batch)
        return float(loss + sum((g - mean).pow(2).sum() for g in grads))

    eps = 1e-6
    numeric = (value(eps) - value(-eps)) / (2 * eps)
    analytic = float(sum((g * d).sum() for g, d in zip(captured["grads"], direction)))
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_defaults_and_random_search_range_are_domainbeds():
    declared = declared_hparams(IGA)
    assert resolve(declared)["penalty"] == 1000.0
    assert bounds(declared["penalty"]) == pytest.approx((10.0, 1e5))
    with pytest.raises(UsageError):
        resolve(declared, 0, {"penalty": -1.0})
