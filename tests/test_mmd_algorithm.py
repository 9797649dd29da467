"""MMD (DomainBed's algorithm; tests/test_mmd.py tests the kernels and MMD-AAE): DomainBed's hparam, the
penalty against a hand-computed value and an explicit kernel sum, two Adam updates replayed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from dg_meta.algorithms.erm import ERM
from dg_meta.algorithms.mmd import MMD
from feature_alignment_reference import GAMMAS, domain_batches, hand_mmd, hand_pairwise, make, replay_updates
from search_space import bounds, drawn

from dg_meta.hparams import declared_hparams
from dg_meta.registry import ALGORITHMS


def test_registered_as_domainbed_names_it_and_an_erm_subclass():
    assert ALGORITHMS["MMD"] is MMD and issubclass(MMD, ERM)


def test_mmd_gamma_default_and_random_search_are_domainbed_s():
    hp = declared_hparams(MMD)["mmd_gamma"]
    assert hp.default == 1.0
    low, high = bounds(hp)
    assert low == pytest.approx(0.1, rel=1e-12) and high == pytest.approx(10.0, rel=1e-12)
    assert all(0.1 <= v <= 10.0 for v in drawn(hp))


def test_penalty_on_a_hand_computed_value():
    algorithm = make(MMD)
    x = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    # k(x, x) = k(y, y) = 7 (seven kernels at distance 0), k(x, y) = sum_g exp(-g)
    expected = 14 - 2 * sum(math.exp(-g) for g in GAMMAS)
    assert float(algorithm.alignment_penalty([x, y])) == pytest.approx(expected, abs=1e-12)
    assert float(algorithm.alignment_penalty([x])) == 0.0


def test_penalty_is_the_mean_over_domain_pairs_of_the_explicit_kernel_sum():
    algorithm = make(MMD)
    g = torch.Generator().manual_seed(2)
    features = [torch.randn(n, 3, generator=g, dtype=torch.float64) * s for n, s in ((3, 0.1), (4, 0.3), (2, 1.0))]
    expected = hand_pairwise(features, hand_mmd)
    assert torch.allclose(algorithm.alignment_penalty(features), expected, rtol=0, atol=1e-12)


def test_two_updates_replayed_by_hand():
    algorithm = make(MMD, mmd_gamma=2.5, lr=1e-2)
    batches = [domain_batches(step, (4, 3, 5)) for step in range(2)]
    replayed = replay_updates(algorithm, batches, lr=1e-2, gamma=2.5,
                              penalty=lambda features, _: hand_pairwise(features, hand_mmd))
    assert all(float(pen) > 1e-6 for _, pen in replayed)
