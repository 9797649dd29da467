"""CORAL: DomainBed's hparam, the penalty against hand numbers and explicit mean/covariance sums, and two
Adam updates replayed by an independent re-implementation."""

from __future__ import annotations

import pytest
import torch
from dg_meta.algorithms.coral import CORAL
from dg_meta.algorithms.erm import ERM
from feature_alignment_reference import domain_batches, hand_coral, hand_pairwise, make, replay_updates
from search_space import bounds, drawn

from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve
from dg_meta.registry import ALGORITHMS


def test_registered_as_domainbed_names_it_and_an_erm_subclass():
    assert ALGORITHMS["CORAL"] is CORAL and issubclass(CORAL, ERM)


def test_mmd_gamma_default_and_random_search_are_domainbed_s():
    hp = declared_hparams(CORAL)["mmd_gamma"]
    assert hp.default == 1.0
    low, high = bounds(hp)
    assert low == pytest.approx(0.1, rel=1e-12) and high == pytest.approx(10.0, rel=1e-12)
    assert all(0.1 <= v <= 10.0 for v in drawn(hp))
    assert resolve(declared_hparams(CORAL), overrides={"mmd_gamma": 0})["mmd_gamma"] == 0.0
    with pytest.raises(UsageError, match="mmd_gamma"):
        resolve(declared_hparams(CORAL), overrides={"mmd_gamma": -0.1})


def test_penalty_on_hand_computed_numbers():
    algorithm = make(CORAL)
    # means 1 and 2; unbiased variances 2 and 3: (1 - 2)^2 + (2 - 3)^2
    x = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [1.0], [4.0]], dtype=torch.float64)
    assert float(algorithm.alignment_penalty([x, y])) == pytest.approx(2.0, abs=1e-12)
    # means (1, 0), (0, 1): squared differences average to 1; covariances diag(2, 0), diag(0, 2): 8 / 4 entries
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[0.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    assert float(algorithm.alignment_penalty([x, y])) == pytest.approx(3.0, abs=1e-12)
    assert float(algorithm.alignment_penalty([x])) == 0.0


def test_penalty_is_the_mean_over_domain_pairs_of_the_explicit_distance():
    algorithm = make(CORAL)
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(n, 4, generator=g, dtype=torch.float64) * s for n, s in ((3, 1.0), (5, 2.0), (4, 0.5))]
    expected = hand_pairwise(features, hand_coral)
    assert torch.allclose(algorithm.alignment_penalty(features), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.7, 3.0])
def test_two_updates_replayed_by_hand(gamma):
    algorithm = make(CORAL, mmd_gamma=gamma, lr=1e-2)
    batches = [domain_batches(step, (3, 5, 4)) for step in range(2)]
    replayed = replay_updates(algorithm, batches, lr=1e-2, gamma=gamma,
                              penalty=lambda features, _: hand_pairwise(features, hand_coral))
    assert all(float(pen) > 1e-6 for _, pen in replayed)


def test_one_domain_is_a_cross_entropy_step_without_penalty():
    algorithm = make(CORAL, num_domains=1, lr=1e-2)
    replayed = replay_updates(algorithm, [domain_batches(7, (5,))], lr=1e-2, gamma=1.0,
                              penalty=lambda features, _: features[0].new_zeros(()))
    assert float(replayed[0][1]) == 0.0
