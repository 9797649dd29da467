"""Distances between the feature distributions of two domains, shared by the feature-matching DG methods
(CORAL, MMD, CausIRL-CORAL, CausIRL-MMD), and their mean over all pairs of domains.

- ``coral_distance``: ``mean((mu_x - mu_y)^2) + mean((C_x - C_y)^2)`` with unbiased covariances (Sun &
  Saenko 2016, in DomainBed's form ``AbstractMMD.mmd`` with ``kernel_type="mean_cov"``: means over entries,
  not the paper's ``1 / (4 d^2)`` Frobenius scaling).
- ``gaussian_mmd``: the biased squared MMD under DomainBed's sum of Gaussian kernels
  ``sum_g exp(-g ||x - y||^2)``, ``g`` in ``DOMAINBED_GAMMAS`` (``AbstractMMD.gaussian_kernel``), computed by
  ``dg_meta.kernels.mmd2`` with the bandwidths ``sigma = 1 / sqrt(2 g)``.
- ``mean_over_pairs`` (from ``dg_meta.kernels``): a distance's mean over all pairs of domains.
- ``pairwise_penalty``: that mean over each domain's whole minibatch, its features gathered from every process
  of a run on several processes (``dg_meta.distributed.gather_rows``), so the penalty is the single-process one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import Tensor

from dg_meta.distributed import gather_rows
from dg_meta.kernels import mean_over_pairs, mmd2

DOMAINBED_GAMMAS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)

Distance = Callable[[Tensor, Tensor], Tensor]


def coral_distance(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared difference of the means plus mean squared difference of the (n-1) covariances."""
    mean_x, mean_y = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
    cent_x, cent_y = x - mean_x, y - mean_y
    cov_x = cent_x.t() @ cent_x / (len(x) - 1)
    cov_y = cent_y.t() @ cent_y / (len(y) - 1)
    return (mean_x - mean_y).pow(2).mean() + (cov_x - cov_y).pow(2).mean()


def gaussian_mmd(x: Tensor, y: Tensor, gammas: Sequence[float] = DOMAINBED_GAMMAS) -> Tensor:
    """Biased squared MMD under ``sum_g exp(-g ||x - y||^2)``."""
    return mmd2(x, y, [1.0 / math.sqrt(2.0 * g) for g in gammas])


def pairwise_penalty(features: list[Tensor], distance: Distance) -> Tensor:
    """``mean_over_pairs`` of ``distance`` over the domains' features, each domain's gathered from all processes
    (``features`` unchanged on one process)."""
    return mean_over_pairs([gather_rows(z) for z in features], distance)


__all__ = ["DOMAINBED_GAMMAS", "Distance", "coral_distance", "gaussian_mmd", "mean_over_pairs", "pairwise_penalty"]
