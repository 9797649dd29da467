"""Independent re-implementations for the tests of CORAL, MMD, CausIRL_CORAL and CausIRL_MMD: the CORAL
distance from explicit mean and covariance sums, the Gaussian-kernel MMD from an explicit double sum over
rows, and a replay of their updates (per-domain cross-entropy plus weighted penalty) with ``HandAdam``."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from torch import Tensor

from dg_meta.hparams import declared_hparams, resolve

GAMMAS = [0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]  # DomainBed's AbstractMMD.gaussian_kernel


def hand_coral(a: Tensor, b: Tensor) -> Tensor:
    """Mean over entries of the squared mean difference plus mean over entries of the squared difference of
    the unbiased covariances, from explicit sums over rows."""
    def mean_and_cov(z: Tensor) -> tuple[Tensor, Tensor]:
        mu = sum(z[k] for k in range(len(z))) / len(z)
        cov = sum(torch.outer(z[k] - mu, z[k] - mu) for k in range(len(z))) / (len(z) - 1)
        return mu, cov

    (mu_a, cov_a), (mu_b, cov_b) = mean_and_cov(a), mean_and_cov(b)
    d = a.shape[1]
    return ((mu_a - mu_b) ** 2).sum() / d + ((cov_a - cov_b) ** 2).sum() / d ** 2


def hand_mmd(a: Tensor, b: Tensor) -> Tensor:
    """Biased squared MMD under ``sum_g exp(-g ||u - v||^2)``: explicit sums over every pair of rows."""
    def k(u: Tensor, v: Tensor) -> Tensor:
        return torch.exp(-torch.tensor(GAMMAS, dtype=u.dtype) * ((u - v) ** 2).sum()).sum()

    def mean_k(p: Tensor, q: Tensor) -> Tensor:
        return sum(k(p[i], q[j]) for i in range(len(p)) for j in range(len(q))) / (len(p) * len(q))

    return mean_k(a, a) + mean_k(b, b) - 2 * mean_k(a, b)


def hand_pairwise(features: list[Tensor], distance: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``distance`` summed over pairs ``i < j`` divided by ``D (D - 1) / 2``."""
    n = len(features)
    total = sum(distance(features[i], features[j]) for i in range(n) for j in range(i + 1, n))
    return total / (n * (n - 1) / 2)


def make(cls: type, num_domains: int = 3, **overrides) -> torch.nn.Module:
    """A float64 algorithm on 3-dimensional inputs, 2 classes, an MLP featurizer of width 6 (depth 3)."""
    torch.manual_seed(0)
    hparams = {**resolve(declared_hparams(cls), overrides=overrides), "mlp_width": 6, "mlp_depth": 3}
    return cls((3,), 2, num_domains, hparams).double()


def domain_batches(seed: int, sizes: tuple[int, ...]) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,), generator=g))
            for n in sizes]


def replay_updates(algorithm, batches: list[list[tuple[Tensor, Tensor]]], lr: float, gamma: float,
                   penalty: Callable[[list[Tensor], int], Tensor], seed: int = 100) -> list[tuple[Tensor, Tensor]]:
    """Run ``algorithm.update`` on each batch (torch seeded with ``seed + step`` before it) and check losses and
    parameters against an independent replay: ``mean_i CE_i + gamma * penalty(features, seed + step)`` with
    ``HandAdam``. Returns the (loss, penalty) pairs the replay computed."""
    network = copy.deepcopy(algorithm.network)
    names = [n for n, _ in network.named_parameters()]
    hand = HandAdam(list(network.parameters()), lr=lr)
    replayed = []
    for step, batch in enumerate(batches):
        params = [p.detach().requires_grad_() for p in hand.params]
        state = dict(zip(names, params))
        features = [torch.func.functional_call(network[0], {n[2:]: p for n, p in state.items() if n[0] == "0"},
                                               (x,)) for x, _ in batch]
        head = {n[2:]: p for n, p in state.items() if n[0] == "1"}
        ce = sum(F.cross_entropy(torch.func.functional_call(network[1], head, (z,)), y)
                 for z, (_, y) in zip(features, batch)) / len(batch)
        pen = penalty(features, seed + step)
        hand.step([g.detach() for g in torch.autograd.grad(ce + gamma * pen, params)])
        torch.manual_seed(seed + step)
        losses = algorithm.update(batch)
        ce, pen = ce.detach(), pen.detach()
        assert not (losses["loss"].requires_grad or losses["penalty"].requires_grad)
        assert math.isclose(float(losses["loss"]), float(ce), rel_tol=0, abs_tol=1e-12)
        assert math.isclose(float(losses["penalty"]), float(pen), rel_tol=0, abs_tol=1e-12)
        for p, q in zip(algorithm.network.parameters(), hand.params):
            assert torch.allclose(p, q, rtol=0, atol=1e-12)
        replayed.append((ce, pen))
    return replayed
