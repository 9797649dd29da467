"""VREx: the penalty is the population variance of the domain risks (by hand), three updates through the
switch replayed by hand (the loss divided by the penalty weight or not), Adam rebuilt at exactly update
``vrex_penalty_anneal_iters``, resume, and DomainBed's defaults and search space."""

from __future__ import annotations

import pytest
import torch
from invariance_reference import (
    Replay,
    adam_steps,
    assert_update_matches,
    domain_batches,
    hand_ce,
    per_domain,
    resumed,
    tiny,
)
from search_space import bounds, drawn

from dg_meta import registry
from dg_meta.hparams import declared_hparams, resolve

VREx = registry.get_algorithm("VREx")


def vrex_objective(weight: float, divisor: float = 1.0):
    def objective(forward, batch):
        r0, r1, r2 = (hand_ce(z, y) for _, z, y in per_domain(forward, batch))
        mean = (r0 + r1 + r2) / 3
        variance = ((r0 - mean) ** 2 + (r1 - mean) ** 2 + (r2 - mean) ** 2) / 3  # population: / D, not / (D - 1)
        return (mean + weight * variance) / divisor, {"nll": mean, "penalty": variance}

    return objective


def test_defaults_and_search_space_are_domainbeds():
    declared = declared_hparams(VREx)
    hp = resolve(declared)
    assert (hp["vrex_lambda"], hp["vrex_penalty_anneal_iters"]) == (1e1, 500)
    assert hp["divide_loss_by_penalty_weight"] is False
    assert (hp["lr"], hp["weight_decay"]) == (1e-3, 0.0)
    assert bounds(declared["vrex_lambda"]) == pytest.approx((1e-1, 1e5), rel=1e-12)
    assert bounds(declared["vrex_penalty_anneal_iters"]) == (1, 10_000)
    assert all(type(v) is int and 1 <= v < 10_000 for v in drawn(declared["vrex_penalty_anneal_iters"]))
    assert drawn(declared["divide_loss_by_penalty_weight"]) == {False}


def test_penalty_is_the_population_variance_of_the_domain_risks():
    alg = tiny("VREx")
    batch = domain_batches(0)
    with torch.no_grad():
        risks = [float(hand_ce(alg.network(x), y)) for x, y in batch]
    losses = alg.update(batch)
    mean = sum(risks) / 3
    assert float(losses["nll"]) == pytest.approx(mean, rel=1e-12)
    assert float(losses["penalty"]) == pytest.approx(sum((r - mean) ** 2 for r in risks) / 3, rel=1e-10)
    assert float(losses["loss"]) == pytest.approx(float(losses["nll"] + losses["penalty"]), rel=1e-12)
    assert float(losses["penalty"]) > 1e-3


def test_three_updates_through_the_switch_replayed_by_hand():
    alg = tiny("VREx", vrex_lambda=30.0, vrex_penalty_anneal_iters=1)
    replay = Replay(alg)
    for step, (weight, restart) in enumerate([(1.0, False), (30.0, True), (30.0, False)]):
        batch = domain_batches(step)
        expected, grads = replay.step(vrex_objective(weight), batch, restart)
        assert_update_matches(alg, replay, alg.update(batch), expected, grads)


@pytest.mark.parametrize("lam, divisor", [(0.5, 1.0), (1.5, 1.5), (30.0, 30.0)])
def test_dividing_by_the_penalty_weight_is_the_official_codes_step(lam, divisor):
    """Loss and weight decay divided by ``max(w, 1)``; one Adam throughout (no rebuild at the switch)."""
    alg = tiny("VREx", vrex_lambda=lam, vrex_penalty_anneal_iters=1, divide_loss_by_penalty_weight=True,
               weight_decay=0.1)
    replay, optimizer = Replay(alg), alg.optimizer
    for step, (weight, div) in enumerate([(1.0, 1.0), (lam, divisor), (lam, divisor)]):
        batch = domain_batches(step)
        expected, grads = replay.step(vrex_objective(weight, div), batch, weight_decay=0.1 / div)
        assert_update_matches(alg, replay, alg.update(batch), expected, grads)
        assert alg.optimizer is optimizer and set(adam_steps(alg)) == {step + 1}
        assert alg.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.1 / div, rel=1e-15)


def test_adam_is_rebuilt_exactly_at_update_vrex_penalty_anneal_iters():
    alg = tiny("VREx", vrex_penalty_anneal_iters=2, lr=0.01)
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
    straight = tiny("VREx", vrex_penalty_anneal_iters=3)
    first = tiny("VREx", vrex_penalty_anneal_iters=3)
    for step in range(5):
        straight.update(domain_batches(step))
    for step in range(2):
        first.update(domain_batches(step))
    assert first.state_dict()["penalty_schedule._extra_state"] == {"count": 2}
    again = resumed(first, "VREx", vrex_penalty_anneal_iters=3)
    assert again.penalty_schedule.count == 2
    for step in range(2, 5):
        again.update(domain_batches(step))
    assert set(adam_steps(again)) == set(adam_steps(straight)) == {2}
    for (name, a), b in zip(straight.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, name
