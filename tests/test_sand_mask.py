"""SAND-mask: the smooth mask on hand-made gradients against hand-computed numbers (and DomainBed's NaN
rules), the gradient handed to Adam, two Adam updates replayed, the defaults."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from search_space import bounds

from dg_meta import registry
from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve

SANDMask = registry.get_algorithm("SANDMask")
SIZES = (3, 4, 5)


def tiny(**overrides) -> torch.nn.Module:
    hp = resolve(declared_hparams(SANDMask), 0, overrides)
    torch.manual_seed(0)
    return SANDMask((4,), 3, len(SIZES), {**hp, "mlp_width": 6, "mlp_depth": 2}).double()


def tiny_batch(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for n in SIZES]


def test_smooth_mask_matches_hand_computed_values():
    # three domains; per entry: signs, |mean sign|, unbiased variance
    grads = torch.tensor([[1.0, 1.0, 1.0, 0.1, 0.0, 2.0],
                          [2.0, 3.0, -1.0, 0.1, 0.0, -2.0],
                          [3.0, 5.0, 2.0, 0.1, 0.0, 3.0]], dtype=torch.float64)
    mask = tiny(tau=0.5, k=2.0).mask(grads)
    expected = [math.tanh(2.0 * (1 - 0.5) / 1.0),  # agreement 1, variance 1
                math.tanh(2.0 * (1 - 0.5) / 4.0),  # agreement 1, variance 4
                0.0,  # agreement 1/3 < tau: tanh < 0, clipped to 0
                1.0,  # agreement 1, variance 0: tanh(+inf)
                0.0,  # agreement 0, variance 0: tanh(-inf), clipped
                0.0]  # agreement 1/3
    assert mask.tolist() == pytest.approx(expected, rel=1e-12, abs=0)
    assert mask.dtype == grads.dtype


def test_variance_is_unbiased_and_k_scales_the_argument():
    grads = torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64)  # mean 7/3, divisor E - 1 = 2
    variance = ((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2
    mask = tiny(tau=0.25, k=0.3).mask(grads)
    assert float(mask) == pytest.approx(math.tanh(0.3 * 0.75 / variance), rel=1e-12)


def test_nan_rules_follow_domainbed():
    # agreement exactly tau with zero variance: 0 / 0 -> NaN -> 1e-17
    assert float(tiny(tau=0.0, k=1.0).mask(torch.zeros(3, 1, dtype=torch.float64))) == 1e-17
    # one domain: the variance is NaN -> 1e-17, so an agreeing entry gets tanh(huge) = 1
    with pytest.warns(UserWarning):
        one = tiny(tau=0.5, k=1e-3).mask(torch.tensor([[2.0, -3.0]], dtype=torch.float64))
    assert one.tolist() == [1.0, 1.0]
    with pytest.warns(UserWarning):
        assert float(tiny(tau=1.0, k=1.0).mask(torch.tensor([[0.0]], dtype=torch.float64))) == 0.0


def hand_masked_gradients(net, names, params, batch, tau: float, k: float) -> list[torch.Tensor]:
    def loss(p, x, y):
        return F.cross_entropy(torch.func.functional_call(net, dict(zip(names, p)), (x,)), y)

    per_domain = [torch.func.grad(loss)(params, x, y) for x, y in batch]
    e = len(batch)
    out = []
    for i in range(len(params)):
        g = torch.stack([d[i] for d in per_domain])
        mean = g.sum(0) / e
        variance = ((g - mean) ** 2).sum(0) / (e - 1)
        agreement = ((g > 0).sum(0) - (g < 0).sum(0)).abs() / e
        mask = torch.tanh(k * (agreement - tau) / variance).clamp(min=0)
        out.append(mask * mean / (1e-10 + mask.sum() / mask.numel()))
    return out


def test_gradient_given_to_adam_is_the_rescaled_smoothly_masked_mean():
    alg, batch = tiny(tau=0.4, k=0.05), tiny_batch(1)
    net = copy.deepcopy(alg.network)
    names = [n for n, _ in net.named_parameters()]
    expected = hand_masked_gradients(net, names, [p.detach() for p in net.parameters()], batch, 0.4, 0.05)
    captured = {}
    alg.optimizer.step = lambda: captured.update(grads=[p.grad.clone() for p in alg.network.parameters()])
    losses = alg.update(batch)
    for g, e in zip(captured["grads"], expected):  # near-equal domain gradients: variance known to ~1e-8
        assert torch.allclose(g, e, rtol=1e-7, atol=1e-12)
    values = torch.cat([g.flatten() for g in expected])
    assert bool((values != 0).any()) and bool((values == 0).any())
    mean_loss = sum(F.cross_entropy(net(x), y) for x, y in batch) / len(batch)
    assert torch.allclose(losses["loss"], mean_loss.detach(), rtol=1e-12, atol=0)


def test_two_updates_are_adam_steps_on_the_masked_gradients():
    alg = tiny(tau=0.4, k=0.05)
    net = copy.deepcopy(alg.network)
    names = [n for n, _ in net.named_parameters()]
    hand = HandAdam(list(net.parameters()), lr=1e-3)
    for step in range(2):
        batch = tiny_batch(10 + step)
        hand.step(hand_masked_gradients(net, names, hand.params, batch, 0.4, 0.05))
        alg.update(batch)
        for p, q in zip(alg.network.parameters(), hand.params):
            assert torch.allclose(p, q, rtol=0, atol=1e-12)


def test_default_tau_of_one_masks_everything_so_the_parameters_do_not_move():
    alg = tiny()
    before = [p.detach().clone() for p in alg.network.parameters()]
    alg.update(tiny_batch(2))
    for p, q in zip(alg.network.parameters(), before):
        assert torch.equal(p, q)


def test_defaults_and_random_search_ranges_are_domainbeds():
    declared = declared_hparams(SANDMask)
    hp = resolve(declared)
    assert (hp["tau"], hp["k"]) == (1.0, 10.0)
    assert bounds(declared["tau"]) == (0.0, 1.0)
    assert bounds(declared["k"]) == pytest.approx((1e-3, 1e5))
    for bad in ({"tau": 1.5}, {"tau": -0.5}, {"k": 0.0}):
        with pytest.raises(UsageError):
            resolve(declared, 0, bad)
