"""EQRM: empirical quantile risk minimisation, the alpha-quantile of the training-domain risks after an ERM
burn-in."""

from __future__ import annotations

import math
from statistics import NormalDist

import torch
import torch.nn.functional as F
from dg_meta.algorithms.erm import ERM
from torch import Tensor

from dg_meta.algorithm import Losses
from dg_meta.errors import UsageError
from dg_meta.hparams import HParam, log_uniform, non_negative, positive, uniform
from dg_meta.penalty_schedule import PenaltySchedule
from dg_meta.registry import register_algorithm


def kde_quantile(samples: Tensor, q: float, steps: int = 32) -> Tensor:
    """The ``q``-quantile of the Gaussian kernel density estimate of ``samples`` (1-D, at least 2), by
    ``steps`` bisection steps on its CDF, in float64, differentiable as DomainBed's ``Nonparametric.icdf``.

    The KDE puts a Gaussian of bandwidth ``h = 1.06 std(samples) n^(-1/5)`` (the Gauss-optimal rule, unbiased
    std) on each of the ``n`` samples, so its CDF is ``F(t) = mean_i Phi((t - s_i) / h)``. The quantile lies
    between ``lo = min(s) + h z_q`` and ``hi = max(s) + h z_q`` (``z_q = Phi^-1(q)``, the quantiles of the
    extreme kernels); bisection halves ``[lo, hi]`` ``steps`` times, keeping the half where ``F`` crosses
    ``q``, and returns the midpoint. The comparisons carry no gradient, so the result is an affine
    combination ``a lo + (1 - a) hi`` and its gradient flows through ``min(s)``, ``max(s)`` and ``h`` only.
    """
    sorted_samples = samples.double().sort().values
    bandwidth = 1.06 * sorted_samples.std() * len(samples) ** -0.2
    shift = bandwidth * NormalDist().inv_cdf(q)
    lo, hi = sorted_samples[0] + shift, sorted_samples[-1] + shift
    mid = (lo + hi) / 2
    for _ in range(steps):
        above = torch.special.ndtr((mid - sorted_samples) / bandwidth).mean() > q
        lo = torch.where(above, lo, mid)
        hi = torch.where(above, mid, hi)
        mid = (lo + hi) / 2
    return mid


@register_algorithm
class EQRM(ERM):
    """Empirical quantile risk minimisation (Eastwood, Robey, Singh, von Kügelgen, Hassani, Pappas,
    Schölkopf, "Probable Domain Generalization via Quantile Risk Minimization", NeurIPS 2022, Algorithm 1).

    The objective is the ``alpha``-quantile of the distribution of the domain risks, ``min_theta
    F^-1_{R(theta)}(alpha)``, estimated from the ``M`` training-domain risks ``R_m = CE_m(theta)`` (each
    domain's mean cross-entropy on its own minibatch, one forward per domain) with a Gaussian KDE
    (``kde_quantile``). Training follows DomainBed's ``EQRM`` (``domainbed/algorithms.py``) and its
    ``Nonparametric`` distribution (``domainbed/lib/misc.py``):

    - updates ``0 .. eqrm_burnin_iters - 1``: ERM burn-in, Adam (``lr``) on ``mean_m R_m``;
    - at update ``eqrm_burnin_iters``: Adam is rebuilt (fresh moments) with learning rate ``eqrm_lr``
      (``weight_decay`` kept), as DomainBed does because of the jump in gradient scale;
    - from then on: Adam on ``kde_quantile(R, alpha)``.

    The update count is ``dg_meta.penalty_schedule.PenaltySchedule``'s counter (``schedule``, saved in the
    state_dict, so a resumed run switches at the same update); its ``switching()`` says when to rebuild Adam,
    its weight is unused (the objective changes, not a penalty weight).

    Where this departs from DomainBed: (1) bisection always runs its 32 steps with ``torch.where`` (no host
    synchronisation) where DomainBed stops early once the midpoint stops moving: from then on the midpoint
    stays put, so the value is the same (in float64 the early stop needs a risk spread below ~1e-6 of the
    risks' size). (2) DomainBed's draws of ``eqrm_burnin_iters`` are floats (``10^U(2.5, 3.5)``), which its
    ``update_count == eqrm_burnin_iters`` test never meets, so its random-search runs never rebuild Adam nor
    switch to ``eqrm_lr``; we round the draw up (``ceil``: the same number of burn-in updates) and rebuild.
    (3) ``Nonparametric.icdf`` reads a negative quantile level as ``log(1 - alpha)`` (an asymptotic formula
    for levels near 1); ``eqrm_quantile`` must be in (0, 1) here. (4) At least two training domains are
    required: the KDE bandwidth is the risks' standard deviation. (5) Precision: DomainBed's bisection runs in
    float64 (its level ``alpha`` is a float64 buffer) with a float32 kernel scale (``torch.ones(n) * bw``);
    ``kde_quantile`` computes everything in float64, and the two agree to ~1e-8.

    Hparams (DomainBed's ``hparams_registry.py``, the same for every dataset): ``eqrm_quantile`` 0.75, random
    search ``U(0.5, 0.99)``; ``eqrm_burnin_iters`` 2500, ``ceil(10^U(2.5, 3.5))``; ``eqrm_lr`` 1e-6,
    ``10^U(-7, -5)``.
    """

    HPARAMS = {
        "eqrm_quantile": HParam(0.75, uniform(0.5, 0.99), lambda a: 0 < a < 1, "in (0, 1)",
                                "quantile level alpha of the domain risks that is minimised"),
        "eqrm_burnin_iters": HParam(2500, lambda r: math.ceil(10 ** r.uniform(2.5, 3.5)), non_negative,
                                    "a non-negative integer", "ERM updates before the quantile objective"),
        "eqrm_lr": HParam(1e-6, log_uniform(-7, -5), positive, "positive",
                          "Adam learning rate from the end of the burn-in on"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        if num_domains < 2:
            raise UsageError(f"EQRM needs at least 2 training domains (the KDE bandwidth is the standard "
                             f"deviation of the domain risks), got {num_domains}")
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.schedule = PenaltySchedule(1.0, hparams["eqrm_burnin_iters"])

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        risks = torch.stack([F.cross_entropy(self.network(x), y) for x, y in batch])
        if self.schedule.count < self.schedule.anneal_iters:
            loss = risks.mean()
        else:
            loss = kde_quantile(risks, self.hparams["eqrm_quantile"])
        if self.schedule.switching():
            self.optimizer = self.build_optimizer()
            for group in self.optimizer.param_groups:
                group["lr"] = self.hparams["eqrm_lr"]
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.schedule.advance()
        return {"loss": loss.detach()}
