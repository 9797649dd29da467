"""IRM: the IRMv1 penalty against hand numbers and its closed form, three updates through the penalty switch
replayed by hand (both penalty estimators; the loss divided by the penalty weight or not), Adam rebuilt at
exactly update ``irm_penalty_anneal_iters``, resume, and DomainBed's defaults and search space."""

from __future__ import annotations

import math

import pytest
import torch
from invariance_reference import (
    Replay,
    adam_steps,
    assert_update_matches,
    domain_batches,
    hand_ce,
    hand_irm_penalty,
    per_domain,
    resumed,
    tiny,
)
from search_space import bounds, drawn

from dg_meta import registry
from dg_meta.hparams import declared_hparams, resolve
from dg_meta.invariance import irm_penalty

IRM = registry.get_algorithm("IRM")


def irm_objective(weight: float, unbiased: bool = True, divisor: float = 1.0):
    def objective(forward, batch):
        parts = per_domain(forward, batch)
        nll = sum(hand_ce(z, y) for _, z, y in parts) / len(parts)
        penalty = sum(hand_irm_penalty(z, y, unbiased) for _, z, y in parts) / len(parts)
        return (nll + weight * penalty) / divisor, {"nll": nll, "penalty": penalty}

    return objective


def test_defaults_and_search_space_are_domainbeds():
    declared = declared_hparams(IRM)
    hp = resolve(declared)
    assert (hp["irm_lambda"], hp["irm_penalty_anneal_iters"]) == (1e2, 500)
    assert (hp["divide_loss_by_penalty_weight"], hp["irm_unbiased_penalty"]) == (False, True)
    assert (hp["lr"], hp["weight_decay"]) == (1e-3, 0.0)
    assert bounds(declared["irm_lambda"]) == pytest.approx((1e-1, 1e5), rel=1e-12)
    assert bounds(declared["irm_penalty_anneal_iters"]) == (1, 10_000)
    assert all(type(v) is int and 1 <= v < 10_000 for v in drawn(declared["irm_penalty_anneal_iters"]))
    assert drawn(declared["divide_loss_by_penalty_weight"]) == {False}
    assert drawn(declared["irm_unbiased_penalty"]) == {True}


def test_penalty_matches_hand_numbers():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    e = math.e
    g_even, g_odd = -1 / (e + 1), 2 * e**2 / (1 + e**2)  # (softmax(z_i) - onehot(y_i)) . z_i for i = 0 and 1
    assert float(irm_penalty(z, y).detach()) == pytest.approx(g_even * g_odd, rel=1e-14)
    assert float(irm_penalty(z, y, unbiased=False).detach()) == pytest.approx(((g_even + g_odd) / 2) ** 2, rel=1e-14)


@pytest.mark.parametrize("unbiased", [True, False])
def test_penalty_and_its_gradient_match_the_closed_form(unbiased):
    g = torch.Generator().manual_seed(3)
    z = (2 * torch.randn(7, 4, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, 4, (7,), generator=g)
    ours, reference = irm_penalty(z, y, unbiased), hand_irm_penalty(z, y, unbiased)
    assert torch.allclose(ours, reference, rtol=1e-13, atol=0)
    (grad_ours,), (grad_reference,) = torch.autograd.grad(ours, z), torch.autograd.grad(reference, z)
    assert torch.allclose(grad_ours, grad_reference, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("unbiased", [True, False])
def test_three_updates_through_the_switch_replayed_by_hand(unbiased):
    alg = tiny("IRM", irm_lambda=100.0, irm_penalty_anneal_iters=1, irm_unbiased_penalty=unbiased)
    replay = Replay(alg)
    for step, (weight, restart) in enumerate([(1.0, False), (100.0, True), (100.0, False)]):
        batch = domain_batches(step)
        expected, grads = replay.step(irm_objective(weight, unbiased), batch, restart)
        assert_update_matches(alg, replay, alg.update(batch), expected, grads)


@pytest.mark.parametrize("lam, divisor", [(0.5, 1.0), (1.5, 1.5), (100.0, 100.0)])
def test_dividing_by_the_penalty_weight_is_the_official_codes_step(lam, divisor):
    """Loss and weight decay divided by ``max(w, 1)``; one Adam throughout (no rebuild at the switch)."""
    alg = tiny("IRM", irm_lambda=lam, irm_penalty_anneal_iters=1, divide_loss_by_penalty_weight=True,
               weight_decay=0.1)
    replay, optimizer = Replay(alg), alg.optimizer
    for step, (weight, div) in enumerate([(1.0, 1.0), (lam, divisor), (lam, divisor)]):
        batch = domain_batches(step)
        expected, grads = replay.step(irm_objective(weight, divisor=div), batch, weight_decay=0.1 / div)
        assert_update_matches(alg, replay, alg.update(batch), expected, grads)
        assert alg.optimizer is optimizer and set(adam_steps(alg)) == {step + 1}
        assert alg.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.1 / div, rel=1e-15)


def test_adam_is_rebuilt_exactly_at_update_irm_penalty_anneal_iters():
    alg = tiny("IRM", irm_penalty_anneal_iters=2, lr=0.01)
    seen = []
    for step in range(4):
        before = alg.optimizer
        alg.update(domain_batches(step))
        seen.append((alg.optimizer is not before, set(adam_steps(alg))))
    assert seen == [(False, {1}), (False, {2}), (True, {1}), (False, {2})]
    group = alg.optimizer.param_groups[0]
    assert isinstance(alg.optimizer, torch.optim.Adam) and (group["lr"], group["weight_decay"]) == (0.01, 0.0)
    assert [id(p) for p in group["params"]] == [id(p) for p in alg.network.parameters()]


def test_resume_keeps_the_schedule_count_and_switches_at_the_same_update():
    straight = tiny("IRM", irm_penalty_anneal_iters=3)
    first = tiny("IRM", irm_penalty_anneal_iters=3)
    for step in range(5):
        straight.update(domain_batches(step))
    for step in range(2):
        first.update(domain_batches(step))
    assert first.state_dict()["penalty_schedule._extra_state"] == {"count": 2}
    again = resumed(first, "IRM", irm_penalty_anneal_iters=3)
    assert again.penalty_schedule.count == 2
    for step in range(2, 5):
        again.update(domain_batches(step))
    assert set(adam_steps(again)) == set(adam_steps(straight)) == {2}
    for (name, a), b in zip(straight.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, name
