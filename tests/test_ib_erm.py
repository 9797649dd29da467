"""IB_ERM: the feature variance by hand numbers and its closed form, three updates through the penalty switch
replayed by hand, Adam (over featurizer then classifier) rebuilt at exactly update ``ib_penalty_anneal_iters``,
resume, and DomainBed's defaults and search space."""

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
    per_domain,
    resumed,
    tiny,
)
from search_space import bounds, drawn

from dg_meta import registry
from dg_meta.hparams import declared_hparams, resolve
from dg_meta.invariance import feature_variance

IB_ERM = registry.get_algorithm("IB_ERM")


def ib_erm_objective(weight: float):
    def objective(forward, batch):
        parts = per_domain(forward, batch)
        nll = sum(hand_ce(z, y) for _, z, y in parts) / len(parts)
        ib = sum(hand_feature_variance(f) for f, _, _ in parts) / len(parts)
        return nll + weight * ib, {"nll": nll, "IB_penalty": ib}

    return objective


def test_defaults_and_search_space_are_domainbeds():
    declared = declared_hparams(IB_ERM)
    hp = resolve(declared)
    assert (hp["ib_lambda"], hp["ib_penalty_anneal_iters"], hp["lr"], hp["weight_decay"]) == (1e2, 500, 1e-3, 0.0)
    assert bounds(declared["ib_lambda"]) == pytest.approx((1e-1, 1e5), rel=1e-12)
    assert bounds(declared["ib_penalty_anneal_iters"]) == (1, 10_000)
    assert all(type(v) is int and 1 <= v < 10_000 for v in drawn(declared["ib_penalty_anneal_iters"]))


def test_feature_variance_matches_hand_numbers_and_the_closed_form():
    f = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]], dtype=torch.float64)
    assert float(feature_variance(f)) == pytest.approx((4.0 + 16.0) / 2, rel=1e-14)  # columns: 8/2 and 32/2
    g = torch.Generator().manual_seed(4)
    f = torch.randn(5, 7, generator=g, dtype=torch.float64)
    assert torch.allclose(feature_variance(f), hand_feature_variance(f), rtol=1e-13, atol=0)


def test_optimizer_is_adam_over_the_featurizer_then_the_classifier():
    alg = tiny("IB_ERM", lr=0.02, weight_decay=0.001)
    group = alg.optimizer.param_groups[0]
    assert isinstance(alg.optimizer, torch.optim.Adam) and (group["lr"], group["weight_decay"]) == (0.02, 0.001)
    expected = [*alg.featurizer.parameters(), *alg.classifier.parameters()]
    assert [id(p) for p in group["params"]] == [id(p) for p in expected]


def test_three_updates_through_the_switch_replayed_by_hand():
    alg = tiny("IB_ERM", ib_lambda=3.0, ib_penalty_anneal_iters=1, weight_decay=0.01)
    replay = Replay(alg)
    for step, (weight, restart) in enumerate([(0.0, False), (3.0, True), (3.0, False)]):
        batch = domain_batches(step)
        expected, grads = replay.step(ib_erm_objective(weight), batch, restart)
        assert_update_matches(alg, replay, alg.update(batch), expected, grads)


def test_adam_is_rebuilt_exactly_at_update_ib_penalty_anneal_iters():
    alg = tiny("IB_ERM", ib_penalty_anneal_iters=2, lr=0.01)
    seen = []
    for step in range(4):
        before = alg.optimizer
        alg.update(domain_batches(step))
        seen.append((alg.optimizer is not before, set(adam_steps(alg))))
    assert seen == [(False, {1}), (False, {2}), (True, {1}), (False, {2})]
    group = alg.optimizer.param_groups[0]
    assert isinstance(alg.optimizer, torch.optim.Adam) and (group["lr"], group["weight_decay"]) == (0.01, 0.0)
    expected = [*alg.featurizer.parameters(), *alg.classifier.parameters()]
    assert [id(p) for p in group["params"]] == [id(p) for p in expected]


def test_resume_keeps_the_schedule_count_and_switches_at_the_same_update():
    straight = tiny("IB_ERM", ib_penalty_anneal_iters=3)
    first = tiny("IB_ERM", ib_penalty_anneal_iters=3)
    for step in range(5):
        straight.update(domain_batches(step))
    for step in range(2):
        first.update(domain_batches(step))
    assert first.state_dict()["ib_schedule._extra_state"] == {"count": 2}
    again = resumed(first, "IB_ERM", ib_penalty_anneal_iters=3)
    assert again.ib_schedule.count == 2
    for step in range(2, 5):
        again.update(domain_batches(step))
    assert set(adam_steps(again)) == set(adam_steps(straight)) == {2}
    for (name, a), b in zip(straight.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, name
