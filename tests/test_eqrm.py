"""EQRM: the KDE quantile against a root of the KDE CDF (scipy), a hand bisection and DomainBed's numbers, its
gradient in closed form; the ERM burn-in, the switch (Adam rebuilt with eqrm_lr) and the quantile updates
replayed by HandAdam; resume across the switch; the search space."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms.eqrm import kde_quantile
from scipy.optimize import brentq
from scipy.stats import norm
from search_space import bounds
from torch.func import functional_call

from dg_meta import registry
from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve

EQRM = registry.get_algorithm("EQRM")
SAMPLES = [([0.5, 0.9, 1.3, 0.7], 0.75), ([2.0, 0.1, 0.4], 0.6), ([1.0, 1.5], 0.99), ([3.0, 0.2, 0.25, 0.9, 1.7], 0.1)]


def bandwidth(r: np.ndarray) -> float:
    """Gauss-optimal bandwidth 1.06 std n^(-1/5), unbiased std."""
    return 1.06 * r.std(ddof=1) * len(r) ** -0.2


def hand_bisection(r: torch.Tensor, q: float, steps: int = 32) -> torch.Tensor:
    """Bisection on the KDE CDF as DomainBed's ``continuous_bisect_fun_left`` does it, with Python branches,
    started from the q-quantiles of the lowest and highest kernels; differentiable through the bracket."""
    n = len(r)
    h = 1.06 * r.std() * n ** -0.2
    z = math.sqrt(2) * torch.erfinv(torch.tensor(2 * q - 1, dtype=torch.float64))
    lo, hi = r[int(r.argmin())] + h * z, r[int(r.argmax())] + h * z
    k = (lo + hi) / 2
    for _ in range(steps):
        cdf = sum(0.5 * (1 + torch.erf((k - r_i) / (h * math.sqrt(2)))) for r_i in r) / n
        if cdf > q:
            hi = k
        else:
            lo = k
        k = (lo + hi) / 2
    return k


@pytest.mark.parametrize("samples, q", SAMPLES)
def test_quantile_is_the_root_of_the_kde_cdf(samples, q):
    r = np.array(samples)
    h = bandwidth(r)
    root = brentq(lambda t: norm.cdf((t - r) / h).mean() - q, r.min() - 10 * h, r.max() + 10 * h, xtol=1e-14)
    ours = kde_quantile(torch.tensor(samples, dtype=torch.float64), q)
    assert ours.dtype == torch.float64
    assert float(ours) == pytest.approx(root, abs=(r.max() - r.min()) * 2.0 ** -31)


@pytest.mark.parametrize("samples, q", SAMPLES)
def test_quantile_and_gradient_equal_a_hand_bisection(samples, q):
    ours_r = torch.tensor(samples, dtype=torch.float64, requires_grad=True)
    hand_r = torch.tensor(samples, dtype=torch.float64, requires_grad=True)
    ours, hand = kde_quantile(ours_r, q), hand_bisection(hand_r, q)
    ours.backward()
    hand.backward()
    assert ours.item() == pytest.approx(hand.item(), abs=1e-15)
    assert torch.allclose(ours_r.grad, hand_r.grad, rtol=0, atol=1e-13)


@pytest.mark.parametrize("samples, q", SAMPLES)
def test_gradient_flows_through_the_bracket_only(samples, q):
    """Q = a lo + (1 - a) hi, lo/hi = min/max + h z_q: dQ/dr_i = a [i = argmin] + (1 - a) [i = argmax]
    + z_q dh/dr_i, with dh/dr_i = 1.06 n^(-1/5) (r_i - mean) / ((n - 1) std)."""
    r = torch.tensor(samples, dtype=torch.float64, requires_grad=True)
    value = kde_quantile(r, q)
    value.backward()
    x = np.array(samples)
    n, h, z = len(x), bandwidth(x), norm.ppf(q)
    lo, hi = x.min() + h * z, x.max() + h * z
    a = (hi - value.item()) / (hi - lo)
    expected = z * 1.06 * n ** -0.2 * (x - x.mean()) / ((n - 1) * x.std(ddof=1))
    expected[x.argmin()] += a
    expected[x.argmax()] += 1 - a
    assert np.allclose(r.grad.numpy(), expected, rtol=0, atol=1e-9)
    assert 0.05 < a < 0.95


def test_a_midpoint_where_the_cdf_equals_the_level_becomes_the_lower_end():
    """Samples {0, 1}, level 1/2: the first midpoint 1/2 has F = 1/2 exactly (symmetry). DomainBed's
    ``val_range[int(f(k) > v)] = k`` makes it the lower end, so the 32 halvings of [1/2, 1] end at
    1/2 + 2^-33 (a tie sent to the upper end would end at 1/2 - 2^-33)."""
    r = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert torch.special.ndtr((0.5 - r) / (1.06 * r.std() * 2 ** -0.2)).mean().item() == 0.5
    assert kde_quantile(r, 0.5).item() == 0.5 + 2.0 ** -33


def test_matches_domainbeds_nonparametric_icdf():
    """Numbers from DomainBed b93c22a ``lib/misc.py`` ``Nonparametric().icdf`` on float64 risks; its kernel
    scale is float32 (``torch.ones(...) * bw``), hence the agreement to ~1e-8 only."""
    for samples, q, value, grad in [
        ([0.5, 0.9, 1.3, 0.7], 0.75, 1.1309300677894227,
         [0.2576056207595103, 0.026438972150112743, 0.7952723235407152, -0.0793169164503384]),
        ([2.0, 0.1, 0.4], 0.6, 1.082184951018163, [0.524159590554365, 0.5215679780749972, -0.045727568629362295]),
    ]:
        r = torch.tensor(samples, dtype=torch.float64, requires_grad=True)
        ours = kde_quantile(r, q)
        ours.backward()
        assert ours.item() == pytest.approx(value, abs=1e-7)
        assert np.allclose(r.grad.numpy(), grad, rtol=0, atol=1e-7)


def test_float32_risks_give_a_float64_quantile_with_float32_gradients():
    r = torch.tensor([0.5, 0.9, 1.3], requires_grad=True)
    value = kde_quantile(r, 0.75)
    value.backward()
    assert value.dtype == torch.float64 and r.grad.dtype == torch.float32
    assert value.item() == kde_quantile(r.detach().double(), 0.75).item()


def tiny(burnin: int = 2, **overrides) -> torch.nn.Module:
    hp = resolve(declared_hparams(EQRM), 0, {"eqrm_burnin_iters": burnin, "lr": 0.05, "eqrm_lr": 0.01,
                                              "eqrm_quantile": 0.7, **overrides})
    torch.manual_seed(0)
    return EQRM((3,), 3, 3, {**hp, "mlp_width": 6, "mlp_depth": 2}).double()


def tiny_batch(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(3 * torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for n in (4, 6, 5)]


def test_burn_in_then_switch_then_quantile_replayed_by_hand():
    """Updates 0, 1: Adam (lr 0.05) on the mean of the domain risks (unequal minibatches: not the pooled
    cross-entropy); update 2: a fresh Adam at eqrm_lr 0.01 on the 0.7-quantile, continued at update 3."""
    alg = tiny(burnin=2)
    net = alg.network
    names = [n for n, _ in net.named_parameters()]
    hand = HandAdam(list(net.parameters()), lr=0.05)
    first_optimizer = alg.optimizer
    for step in range(4):
        if step == 2:
            hand = HandAdam(hand.params, lr=0.01)
        batch = tiny_batch(step)
        params = [p.detach().requires_grad_() for p in hand.params]
        risks = torch.stack([F.cross_entropy(functional_call(net, dict(zip(names, params)), (x,)), y)
                             for x, y in batch])
        expected = risks.mean() if step < 2 else hand_bisection(risks, 0.7)
        grads = torch.autograd.grad(expected, params)
        hand.step(list(grads))
        out = alg.update(batch)
        assert float(out["loss"]) == pytest.approx(float(expected.detach()), abs=1e-12)
        assert not out["loss"].requires_grad
        for p, g, h in zip(net.parameters(), grads, hand.params):
            assert torch.allclose(p.grad, g, rtol=0, atol=1e-12)
            assert torch.allclose(p, h, rtol=0, atol=1e-12)
        assert (alg.optimizer is first_optimizer) == (step < 2)
        assert alg.schedule.count == step + 1
    assert (risks.max() - risks.min()).item() > 0.1


def test_the_rebuilt_adam_has_eqrm_lr_and_keeps_weight_decay():
    alg = tiny(burnin=1, weight_decay=0.02)
    batch = tiny_batch(0)
    alg.update(batch)
    assert [(g["lr"], g["weight_decay"]) for g in alg.optimizer.param_groups] == [(0.05, 0.02)]
    alg.update(batch)
    rebuilt = alg.optimizer
    assert isinstance(rebuilt, torch.optim.Adam)
    assert [(g["lr"], g["weight_decay"]) for g in rebuilt.param_groups] == [(0.01, 0.02)]
    assert [id(p) for p in rebuilt.param_groups[0]["params"]] == [id(p) for p in alg.network.parameters()]
    assert all(rebuilt.state[p]["step"] == 1 for p in alg.network.parameters())  # fresh moments
    alg.update(batch)
    assert alg.optimizer is rebuilt


def test_no_burn_in_starts_with_the_quantile_at_eqrm_lr():
    alg = tiny(burnin=0)
    batch = tiny_batch(0)
    with torch.no_grad():
        risks = torch.stack([F.cross_entropy(alg.network(x), y) for x, y in batch])
    out = alg.update(batch)
    assert float(out["loss"]) == pytest.approx(float(hand_bisection(risks, 0.7)), abs=1e-12)
    assert alg.optimizer.param_groups[0]["lr"] == 0.01


@pytest.mark.parametrize("saved_after", [1, 2, 3])
def test_training_continues_identically_after_resume(saved_after):
    """Saved before the switch (1), just before it (2: the count is saved, the switch happens on resume) and
    after it (3: the rebuilt Adam, eqrm_lr included, comes back from the checkpoint; no second rebuild)."""
    batches = [tiny_batch(seed) for seed in range(5)]
    straight = tiny(burnin=2)
    for b in batches:
        straight.update(b)
    first = tiny(burnin=2)
    for b in batches[:saved_after]:
        first.update(b)
    buffer = io.BytesIO()
    torch.save(first.checkpoint_state(), buffer)
    buffer.seek(0)
    resumed = tiny(burnin=2)
    resumed.load_checkpoint_state(torch.load(buffer, weights_only=True))
    assert resumed.schedule.count == saved_after
    for b in batches[saved_after:]:
        resumed.update(b)
    assert resumed.optimizer.param_groups[0]["lr"] == 0.01
    assert straight.schedule.count == resumed.schedule.count == 5
    for (name, a), b in zip(straight.network.state_dict().items(), resumed.network.state_dict().values()):
        assert torch.equal(a, b), name
    for p, q in zip(straight.network.parameters(), resumed.network.parameters()):
        assert torch.equal(straight.optimizer.state[p]["exp_avg_sq"], resumed.optimizer.state[q]["exp_avg_sq"])


def test_defaults_and_random_search_are_domainbeds():
    """eqrm_quantile 0.75 ~ U(0.5, 0.99), eqrm_burnin_iters 2500 ~ ceil(10^U(2.5, 3.5)), eqrm_lr 1e-6 ~
    10^U(-7, -5) (hparams_registry.py)."""
    hp = resolve(declared_hparams(EQRM))
    assert (hp["eqrm_quantile"], hp["eqrm_burnin_iters"], hp["eqrm_lr"]) == (0.75, 2500, 1e-6)
    assert bounds(EQRM.HPARAMS["eqrm_quantile"]) == (0.5, 0.99)
    assert bounds(EQRM.HPARAMS["eqrm_burnin_iters"]) == (317, 3163)
    assert bounds(EQRM.HPARAMS["eqrm_lr"]) == (pytest.approx(1e-7), pytest.approx(1e-5))
    alg = EQRM((3,), 3, 2, {**hp, "mlp_width": 6, "mlp_depth": 1})
    assert alg.schedule.anneal_iters == 2500 and alg.schedule.count == 0
    assert isinstance(alg.optimizer, torch.optim.Adam) and alg.optimizer.param_groups[0]["lr"] == hp["lr"]


@pytest.mark.parametrize("level", [0.0, 1.0, -0.5, 1.5])
def test_quantile_level_outside_the_open_unit_interval_is_refused(level):
    with pytest.raises(UsageError, match=r"eqrm_quantile.*in \(0, 1\)"):
        resolve(declared_hparams(EQRM), 0, {"eqrm_quantile": level})
    assert resolve(declared_hparams(EQRM), 0, {"eqrm_quantile": 0.01})["eqrm_quantile"] == 0.01


def test_negative_burn_in_is_refused():
    with pytest.raises(UsageError, match="eqrm_burnin_iters"):
        resolve(declared_hparams(EQRM), 0, {"eqrm_burnin_iters": -1})


def test_one_training_domain_is_refused():
    hp = resolve(declared_hparams(EQRM))
    with pytest.raises(UsageError, match="EQRM needs at least 2 training domains"):
        EQRM((3,), 3, 1, {**hp, "mlp_width": 6, "mlp_depth": 1})
    EQRM((3,), 3, 2, {**hp, "mlp_width": 6, "mlp_depth": 1})
