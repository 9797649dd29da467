"""Mixup: the random cyclic pairing of domains, and two updates replayed from the same seeded torch RNG (the
randperm, then one Beta(alpha, alpha) draw per pair), the mixed loss, its gradient and Adam; the search space."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms.mixup import random_pairs_of_minibatches
from search_space import bounds
from torch.func import functional_call

from dg_meta import registry
from dg_meta.hparams import declared_hparams, resolve

Mixup = registry.get_algorithm("Mixup")
SIZES = (4, 6, 5)


def tiny(alpha: float = 0.7) -> torch.nn.Module:
    hp = resolve(declared_hparams(Mixup), 0, {"mixup_alpha": alpha, "lr": 0.05})
    torch.manual_seed(0)
    return Mixup((3,), 3, 3, {**hp, "mlp_width": 6, "mlp_depth": 2}).double()


def tiny_batch(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for n in SIZES]


def test_pairs_follow_a_random_cycle_and_are_cut_to_the_shorter_minibatch():
    batch = tiny_batch(0)
    torch.manual_seed(5)
    pairs = random_pairs_of_minibatches(batch)
    torch.manual_seed(5)
    perm = torch.randperm(3).tolist()
    assert len(pairs) == 3
    for i, ((xi, yi), (xj, yj)) in enumerate(pairs):
        a, b = perm[i], perm[(i + 1) % 3]
        n = min(SIZES[a], SIZES[b])
        assert len(xi) == len(yi) == len(xj) == len(yj) == n
        assert torch.equal(xi, batch[a][0][:n]) and torch.equal(yi, batch[a][1][:n])
        assert torch.equal(xj, batch[b][0][:n]) and torch.equal(yj, batch[b][1][:n])
    orders = set()
    for seed in range(20):
        torch.manual_seed(seed)
        orders.add(tuple(len(xi) for (xi, _), _ in random_pairs_of_minibatches(batch)))
    assert len(orders) > 1  # the cycle is random


def test_a_single_domain_is_paired_with_itself():
    batch = tiny_batch(0)[:1]
    ((xi, _), (xj, _)), = random_pairs_of_minibatches(batch)
    assert torch.equal(xi, batch[0][0]) and torch.equal(xj, batch[0][0])


def reference_objective(net, params: dict, batch, alpha: float) -> tuple[torch.Tensor, list[float]]:
    """The mixup objective written from the formula, drawing from the global torch RNG in the same order
    as the algorithm: the domain cycle, then ``lam ~ Beta(alpha, alpha)`` (float64) for each pair in turn."""
    perm = torch.randperm(len(batch)).tolist()
    beta = torch.distributions.Beta(torch.tensor(alpha, dtype=torch.float64),
                                    torch.tensor(alpha, dtype=torch.float64))
    total, lams = 0.0, []
    for i in range(len(batch)):
        (xi, yi), (xj, yj) = batch[perm[i]], batch[perm[(i + 1) % len(batch)]]
        n = min(len(xi), len(xj))
        lam = beta.sample().item()
        logits = functional_call(net, params, (lam * xi[:n] + (1 - lam) * xj[:n],))
        log_p = F.log_softmax(logits, 1)
        total = total - (lam * log_p[torch.arange(n), yi[:n]] + (1 - lam) * log_p[torch.arange(n), yj[:n]]).mean()
        lams.append(lam)
    return total / len(batch), lams


def test_two_updates_equal_the_formula_with_the_same_seeded_draws():
    alg = tiny()
    net = alg.network
    names = [n for n, _ in net.named_parameters()]
    hand = HandAdam(list(net.parameters()), lr=0.05)
    for step, seed in enumerate((1, 2)):
        batch = tiny_batch(seed)
        params = [p.detach().requires_grad_() for p in hand.params]
        torch.manual_seed(100 + step)
        expected, lams = reference_objective(net, dict(zip(names, params)), batch, 0.7)
        grads = torch.autograd.grad(expected, params)
        hand.step(list(grads))
        torch.manual_seed(100 + step)
        out = alg.update(batch)
        assert float(out["loss"]) == pytest.approx(float(expected.detach()), abs=1e-12)
        assert not out["loss"].requires_grad
        for p, g, h in zip(net.parameters(), grads, hand.params):
            assert torch.allclose(p.grad, g, rtol=0, atol=1e-12)
            assert torch.allclose(p, h, rtol=0, atol=1e-12)
        assert len(set(lams)) == 3 and all(0 < lam < 1 for lam in lams)
        assert max(abs(lam - 0.5) for lam in lams) > 0.1  # lam weights the two label sets differently


def test_each_pair_draws_its_own_lam_from_beta_alpha_alpha_on_the_torch_rng(monkeypatch):
    draws = []
    sample = torch.distributions.Beta.sample

    def recording_sample(self, *args, **kwargs):
        value = sample(self, *args, **kwargs)
        draws.append((float(self.concentration1), float(self.concentration0), float(value)))
        return value

    monkeypatch.setattr(torch.distributions.Beta, "sample", recording_sample)
    batch = tiny_batch(3)
    losses = []
    for seed in (7, 7, 8):
        alg = tiny(0.3)
        torch.manual_seed(seed)
        losses.append(float(alg.update(batch)["loss"]))
    assert len(draws) == 9
    assert all(a == pytest.approx(0.3) and b == pytest.approx(0.3) for a, b, _ in draws)
    assert [lam for *_, lam in draws[:3]] == [lam for *_, lam in draws[3:6]] != [lam for *_, lam in draws[6:]]
    assert losses[0] == losses[1] != losses[2]


def test_defaults_and_random_search_are_domainbeds():
    """mixup_alpha 0.2, random search 10^U(-1, 1) (hparams_registry.py); Adam at lr on the network."""
    hp = resolve(declared_hparams(Mixup))
    assert hp["mixup_alpha"] == 0.2
    assert bounds(Mixup.HPARAMS["mixup_alpha"]) == (pytest.approx(0.1), pytest.approx(10.0))
    alg = Mixup((3,), 3, 2, {**hp, "mlp_width": 6, "mlp_depth": 1})
    assert isinstance(alg.optimizer, torch.optim.Adam) and alg.optimizer.defaults["lr"] == hp["lr"]
