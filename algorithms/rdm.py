"""RDM: risk distribution matching, ERM plus the MMD between the worst domain's and all domains' per-example risks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dg_meta.algorithms.erm import ERM
from torch import Tensor

from dg_meta.algorithm import Losses
from dg_meta.feature_alignment import gaussian_mmd
from dg_meta.hparams import HParam, int_uniform, non_negative, positive, uniform
from dg_meta.penalty_schedule import PenaltySchedule
from dg_meta.registry import register_algorithm

#: DomainBed's ``RDM.gaussian_kernel`` widths: ``k(a, b) = sum_g exp(-g (a - b)^2)`` (one more, 1e-4, than
#: the feature-matching methods' ``DOMAINBED_GAMMAS``)
RDM_GAMMAS = (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


@register_algorithm
class RDM(ERM):
    """Risk Distribution Matching (Nguyen, Do, Duong & Nguyen, "Domain Generalisation via Risk Distribution
    Matching", WACV 2024, arXiv:2310.18598), as DomainBed's ``RDM`` (``domainbed/algorithms.py``).

    With ``r_d`` the per-example cross-entropies of domain ``d``'s minibatch (its risk distribution),
    ``R_d = mean(r_d)`` and ``w = argmax_d R_d`` the worst domain of the step, the objective is
    ``(1/D) sum_d R_d + lambda MMD^2(r_w, r_1 u ... u r_D) + mu (var(r_1 u ... u r_D) + var(r_w))``:
    the paper's approximation of matching all the domains' risk distributions, one MMD between the worst
    domain's and the pooled risks (the biased estimate under DomainBed's Gaussian kernel sum over
    ``RDM_GAMMAS``, ``dg_meta.feature_alignment.gaussian_mmd``), and DomainBed's variance penalty
    (unbiased variances). Both weights are 0 for the first ``rdm_penalty_anneal_iters`` updates, then
    ``lambda = rdm_lambda`` and ``mu = variance_weight``; at that switch Adam is rebuilt with learning rate
    ``rdm_lr`` (``dg_meta.penalty_schedule``). The worst domain is chosen without gradient (``argmax``); the
    penalties are computed, weighted by 0, during the annealing updates too, as in DomainBed.

    Hparams (DomainBed ``hparams_registry.py``, the branch of datasets other than those named):
    ``rdm_lambda`` 5.0, ``U(0.1, 10)`` (DomainNet 0.5, ``U(0.1, 1)``; PACS and TerraIncognita 5.0, ``U(1, 10)``);
    ``rdm_penalty_anneal_iters`` 1500, ``int(U(800, 2700))``, i.e. ``int_uniform(800, 2699)`` (DomainNet 2400,
    ``int(U(1500, 3000))``);
    ``variance_weight`` 0.004, ``U(0.001, 0.007)`` (TerraIncognita, OfficeHome and DomainNet 0.0);
    ``rdm_lr`` 1.5e-5, ``U(8e-6, 2e-5)``. DomainBed's RDM batch sizes apply to its large-image datasets only.

    Departure from DomainBed, the same computation where it runs: the per-domain risks are concatenated, so
    domains may bring minibatches of different sizes (DomainBed stacks them into a ``D x n`` matrix, which
    needs equal sizes; with one training domain its ``squeeze`` leaves the worst domain one risk, of NaN
    variance).
    """

    HPARAMS = {
        "rdm_lambda": HParam(5.0, uniform(0.1, 10.0), non_negative, "non-negative",
                             "weight of the MMD between the worst domain's and the pooled risk distributions"),
        "rdm_penalty_anneal_iters": HParam(1500, int_uniform(800, 2699), non_negative, "a non-negative integer",
                                           "updates before the penalties switch on (and Adam is rebuilt)"),
        "variance_weight": HParam(0.004, uniform(0.001, 0.007), non_negative, "non-negative",
                                  "weight of var(pooled risks) + var(worst domain's risks)"),
        "rdm_lr": HParam(1.5e-5, uniform(8e-6, 2e-5), positive, "positive",
                         "Adam's learning rate once the penalties are on"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.schedule = PenaltySchedule(1.0, hparams["rdm_penalty_anneal_iters"], before=0.0)

    def penalties(self, risks: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``(mean_d R_d, MMD^2(r_w, pooled), var(pooled) + var(r_w))`` for the per-example risks ``r_d``.

        Every domain's MMD and variance are computed and the worst domain's are picked by an index that stays
        on the device (no host synchronisation; the extra kernels are on scalars, a few per example)."""
        domain_risks = torch.stack([r.mean() for r in risks])
        worst = domain_risks.detach().argmax()
        pooled = torch.cat(risks)
        matching = torch.stack([gaussian_mmd(r.unsqueeze(1), pooled.unsqueeze(1), RDM_GAMMAS) for r in risks])
        variance = torch.stack([r.var() for r in risks])
        return domain_risks.mean(), matching[worst], pooled.var() + variance[worst]

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        hp = self.hparams
        logits = self.network(torch.cat([x for x, _ in batch]))
        risks = [F.cross_entropy(out, y, reduction="none")
                 for out, (_, y) in zip(logits.split([len(y) for _, y in batch]), batch)]
        erm_loss, matching, variance = self.penalties(risks)
        on = self.schedule.weight()
        loss = erm_loss + on * hp["rdm_lambda"] * matching + on * hp["variance_weight"] * variance
        if self.schedule.switching():
            self.optimizer = self.build_optimizer()
            self.optimizer.param_groups[0]["lr"] = hp["rdm_lr"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.advance()
        return {"loss": loss.detach(), "erm_loss": erm_loss.detach(), "matching_penalty": matching.detach(),
                "variance_penalty": variance.detach()}
