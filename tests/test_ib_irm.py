"""IB_IRM: four updates through both penalty switches replayed by hand (either switch first), Adam (over
featurizer then classifier) rebuilt at exactly each switch and once when they coincide, resume of both
schedules, and DomainBed's defaults and search space."""

from __future__ import annotations

import pytest
import torch
from invariance_reference import (
    Replay,
    adam_steps,
    assert_update_matches,
    domain_batches,
    hand_ce,
    hand_feature_variance,
    hand_irm_penalty,
    per_domain,
    resumed,
    tiny,
)
from search_space import bounds, drawn

from dg_meta import registry
from dg_meta.hparams import declared_hparams, resolve

IB_IRM = registry.get_algorithm("IB_IRM")


def ib_irm_objective(irm_weight: float, ib_weight: float):
    def objective(forward, batch):
        parts = per_domain(forward, batch)
        nll = sum(hand_ce(z, y) for _, z, y in parts) / len(parts)
        irm = sum(hand_irm_penalty(z, y) for _, z, y in parts) / len(parts)
        ib = sum(hand_feature_variance(f) for f, _, _ in parts) / len(parts)
        return nll + irm_weight * irm + ib_weight * ib, {"nll": nll, "IRM_penalty": irm, "IB_penalty": ib}

    return objective


def test_defaults_and_search_space_are_domainbeds():
    declared = declared_hparams(IB_IRM)
    hp = resolve(declared)
    assert (hp["irm_lambda"], hp["irm_penalty_anneal_iters"], hp["ib_lambda"], hp["ib_penalty_anneal_iters"]) == (
        1e2, 500, 1e2, 500)
    assert (hp["lr"], hp["weight_decay"]) == (1e-3, 0.0)
    for name in ("irm_lambda", "ib_lambda"):
        assert bounds(declared[name]) == pytest.approx((1e-1, 1e5), rel=1e-12)
    for name in ("irm_penalty_anneal_iters", "ib_penalty_anneal_iters"):
        assert bounds(declared[name]) == (1, 10_000)
        assert all(type(v) is int and 1 <= v < 10_000 for v in drawn(declared[name]))


@pytest.mark.parametrize("irm_iters, ib_iters, schedule", [
    (1, 2, [(1.0, 0.0, False), (20.0, 0.0, True), (20.0, 3.0, True), (20.0, 3.0, False)]),
    (2, 1, [(1.0, 0.0, False), (1.0, 3.0, True), (20.0, 3.0, True), (20.0, 3.0, False)]),
])
def test_four_updates_through_both_switches_replayed_by_hand(irm_iters, ib_iters, schedule):
    alg = tiny("IB_IRM", irm_lambda=20.0, irm_penalty_anneal_iters=irm_iters, ib_lambda=3.0,
               ib_penalty_anneal_iters=ib_iters, weight_decay=0.01)
    replay = Replay(alg)
    for step, (irm_weight, ib_weight, restart) in enumerate(schedule):
        batch = domain_batches(step)
        expected, grads = replay.step(ib_irm_objective(irm_weight, ib_weight), batch, restart)
        assert_update_matches(alg, replay, alg.update(batch), expected, grads)


@pytest.mark.parametrize("irm_iters, ib_iters, rebuilt, adam_step_counts", [
    (1, 3, [1, 3], [1, 1, 2, 1, 2]), (3, 1, [1, 3], [1, 1, 2, 1, 2]), (2, 2, [2], [1, 2, 1, 2, 3])])
def test_adam_is_rebuilt_exactly_at_each_switch(irm_iters, ib_iters, rebuilt, adam_step_counts):
    alg = tiny("IB_IRM", irm_penalty_anneal_iters=irm_iters, ib_penalty_anneal_iters=ib_iters, lr=0.01)
    seen, steps = [], []
    for step in range(5):
        before = alg.optimizer
        alg.update(domain_batches(step))
        seen.append(alg.optimizer is not before)
        steps.append(adam_steps(alg))
    assert [i for i, new in enumerate(seen) if new] == rebuilt
    assert steps == [[count] * len(steps[0]) for count in adam_step_counts]
    group = alg.optimizer.param_groups[0]
    assert isinstance(alg.optimizer, torch.optim.Adam) and (group["lr"], group["weight_decay"]) == (0.01, 0.0)
    expected = [*alg.featurizer.parameters(), *alg.classifier.parameters()]
    assert [id(p) for p in group["params"]] == [id(p) for p in expected]


def test_resume_keeps_both_schedule_counts_and_switches_at_the_same_updates():
    iters = {"irm_penalty_anneal_iters": 3, "ib_penalty_anneal_iters": 4}
    straight, first = tiny("IB_IRM", **iters), tiny("IB_IRM", **iters)
    for step in range(6):
        straight.update(domain_batches(step))
    for step in range(2):
        first.update(domain_batches(step))
    state = first.state_dict()
    assert state["irm_schedule._extra_state"] == state["ib_schedule._extra_state"] == {"count": 2}
    again = resumed(first, "IB_IRM", **iters)
    assert again.irm_schedule.count == again.ib_schedule.count == 2
    for step in range(2, 6):
        again.update(domain_batches(step))
    assert set(adam_steps(again)) == set(adam_steps(straight)) == {2}
    for (name, a), b in zip(straight.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, name
