"""CausIRL_MMD: DomainBed's hparam, the random split of the pooled batch reproduced with the same seed, the
penalty against an explicit kernel sum, and two Adam updates replayed by an independent re-implementation."""

from __future__ import annotations

import pytest
import torch
from dg_meta.algorithms.causirl_mmd import CausIRL_MMD
from dg_meta.algorithms.erm import ERM
from feature_alignment_reference import domain_batches, hand_mmd, make, replay_updates
from search_space import bounds, drawn
from torch import Tensor

from dg_meta.hparams import declared_hparams
from dg_meta.registry import ALGORITHMS


def split_penalty(features: list[Tensor], seed: int) -> Tensor:
    """One cut per domain, uniform in [0, n_d) from torch's global RNG seeded with ``seed``, drawn in domain
    order; the explicit-kernel-sum MMD between the pooled heads and the pooled tails, 0 unless both parts have
    two rows or more."""
    torch.manual_seed(seed)
    cuts = [torch.randint(0, len(z), (1,)).item() for z in features]
    first = torch.cat([z[:c] for z, c in zip(features, cuts)])
    second = torch.cat([z[c:] for z, c in zip(features, cuts)])
    if min(len(first), len(second)) < 2:
        return features[0].new_zeros(())
    return hand_mmd(first, second)


def test_registered_as_domainbed_names_it_and_an_erm_subclass():
    assert ALGORITHMS["CausIRL_MMD"] is CausIRL_MMD and issubclass(CausIRL_MMD, ERM)


def test_mmd_gamma_default_and_random_search_are_domainbed_s():
    hp = declared_hparams(CausIRL_MMD)["mmd_gamma"]
    assert hp.default == 1.0
    low, high = bounds(hp)
    assert low == pytest.approx(0.1, rel=1e-12) and high == pytest.approx(10.0, rel=1e-12)
    assert all(0.1 <= v <= 10.0 for v in drawn(hp))


def test_split_of_one_domain_at_every_cut_point():
    """Four rows: cuts 0 and 1 leave fewer than two heads, cut 3 one tail: penalty 0 although the MMD of one
    row against three is not; cut 2 is 2 against 2."""
    algorithm = make(CausIRL_MMD)
    z = torch.tensor([[0.0, 0.1], [0.2, 0.0], [0.1, 0.1], [0.4, -0.1]], dtype=torch.float64)
    assert float(hand_mmd(z[:1], z[1:])) > 0.1 and float(hand_mmd(z[:3], z[3:])) > 0.1
    expected = {0: 0.0, 1: 0.0, 2: float(hand_mmd(z[:2], z[2:])), 3: 0.0}
    assert expected[2] > 0.1
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        cut = torch.randint(0, 4, (1,)).item()
        seen.add(cut)
        torch.manual_seed(seed)
        assert float(algorithm.alignment_penalty([z])) == pytest.approx(expected[cut], abs=1e-12)
    assert seen == {0, 1, 2, 3}


def test_split_of_several_domains_pools_heads_and_tails():
    algorithm = make(CausIRL_MMD)
    g = torch.Generator().manual_seed(3)
    features = [torch.randn(n, 3, generator=g, dtype=torch.float64) * s for n, s in ((4, 0.1), (6, 0.5), (5, 0.2))]
    nonzero = 0
    for seed in range(12):
        expected = split_penalty(features, seed)
        nonzero += float(expected) > 0
        torch.manual_seed(seed)
        assert torch.allclose(algorithm.alignment_penalty(features), expected, rtol=0, atol=1e-12)
    assert nonzero >= 8


def test_two_updates_replayed_by_hand():
    algorithm = make(CausIRL_MMD, mmd_gamma=1.7, lr=1e-2)
    batches = [domain_batches(step, (5, 4, 6)) for step in range(2)]
    replayed = replay_updates(algorithm, batches, lr=1e-2, gamma=1.7, penalty=split_penalty)
    assert all(float(pen) > 1e-6 for _, pen in replayed)


@pytest.mark.parametrize("cut", [0, 1, 4])
def test_update_with_fewer_than_two_heads_or_tails_is_a_cross_entropy_step(cut):
    """A cut leaving a part with fewer than two rows gives penalty 0 and no gradient from it (no NaN)."""
    seed = next(s for s in range(100) if torch.manual_seed(s) is not None and torch.randint(0, 5, (1,)).item() == cut)
    algorithm = make(CausIRL_MMD, num_domains=1, lr=1e-2)
    replayed = replay_updates(algorithm, [domain_batches(9, (5,))], lr=1e-2, gamma=1.0, penalty=split_penalty,
                              seed=seed)
    assert float(replayed[0][1]) == 0.0
    assert all(torch.isfinite(p).all() for p in algorithm.parameters())
