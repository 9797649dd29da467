"""Kernel tools shared by the kernel-based DG methods (DICA, MMD-AAE): RBF Gram matrices, the
median-heuristic bandwidth, the (multi-kernel) MMD estimate and the distributional variance.

Conventions: ``k_sigma(x, y) = exp(-||x - y||^2 / (2 sigma^2))`` on flattened inputs; a sequence of
bandwidths means the mixture (sum) of those kernels, itself a kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Bandwidths = float | Sequence[float] | Tensor


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """``[len(x), len(y)]`` squared Euclidean distances between the flattened rows of ``x`` and ``y``."""
    x, y = x.flatten(1), y.flatten(1)
    d2 = x.pow(2).sum(1, keepdim=True) - 2 * x @ y.t() + y.pow(2).sum(1).unsqueeze(0)
    return d2.clamp_min_(0.0)


def rbf_kernel(x: Tensor, y: Tensor, sigma: Bandwidths) -> Tensor:
    """The Gram matrix ``sum_s exp(-||x_i - y_j||^2 / (2 s^2))`` over the bandwidths ``sigma``."""
    d2 = squared_distances(x, y)
    sigmas = torch.as_tensor(sigma, dtype=d2.dtype, device=d2.device).reshape(-1, 1, 1)
    return torch.exp(-d2.unsqueeze(0) / (2 * sigmas.pow(2))).sum(0)


def median_bandwidth(x: Tensor) -> Tensor:
    """The median heuristic: the median Euclidean distance between distinct rows of ``x`` (a 0-d tensor;
    1 when all rows coincide)."""
    d2 = squared_distances(x, x)
    rows, cols = torch.triu_indices(len(x), len(x), offset=1, device=x.device)
    sigma = d2[rows, cols].median().sqrt() if len(rows) else d2.new_zeros(())
    return torch.where(sigma > 0, sigma, torch.ones_like(sigma))


def mmd2(x: Tensor, y: Tensor, sigma: Bandwidths) -> Tensor:
    """The biased (V-statistic) estimate of the squared MMD between the samples ``x`` and ``y``:
    ``mean k(x, x') + mean k(y, y') - 2 mean k(x, y)`` (Gretton et al. 2012), non-negative."""
    return rbf_kernel(x, x, sigma).mean() + rbf_kernel(y, y, sigma).mean() - 2 * rbf_kernel(x, y, sigma).mean()


def mean_over_pairs(samples: Sequence[Tensor], distance: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """The mean of ``distance(samples[i], samples[j])`` over unordered pairs ``i < j`` (0 for one sample)."""
    pairs = [distance(samples[i], samples[j]) for i in range(len(samples)) for j in range(i + 1, len(samples))]
    return torch.stack(pairs).mean() if pairs else samples[0].new_zeros(())


def mean_pairwise_mmd2(samples: Sequence[Tensor], sigma: Bandwidths) -> Tensor:
    """The mean of ``mmd2`` over all unordered pairs of ``samples`` (0 for fewer than two)."""
    return mean_over_pairs(samples, lambda x, y: mmd2(x, y, sigma))


def distributional_variance_matrix(domains: Tensor, n_domains: int | None = None) -> Tensor:
    """The ``n x n`` matrix ``Q`` with ``tr(K Q)`` = the empirical distributional variance (Muandet et al.
    2013) of the ``N`` domains under Gram matrix ``K``: ``(1/N) tr(G) - (1/N^2) sum_ij G_ij`` where
    ``G_ij = <mu_i, mu_j>`` are the inner products of the domains' empirical mean embeddings.

    ``Q = E (I/N - 11^T/N^2) E^T`` with ``E[k, i] = 1/n_i`` if example ``k`` is in domain ``i``.
    """
    n_domains = int(domains.max()) + 1 if n_domains is None else n_domains
    member = torch.nn.functional.one_hot(domains.long(), n_domains).to(torch.float64)
    present = member.sum(0) > 0
    member = member[:, present]
    e = member / member.sum(0)
    n = e.shape[1]
    centre = torch.eye(n, dtype=e.dtype, device=e.device) / n - 1.0 / n ** 2
    return e @ centre @ e.t()


def distributional_variance(gram: Tensor, domains: Tensor) -> Tensor:
    """``tr(K Q)``: the distributional variance of the domains labelled ``domains`` under Gram matrix ``gram``."""
    q = distributional_variance_matrix(domains).to(gram.dtype)
    return (gram * q).sum()
