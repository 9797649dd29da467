"""V-REx: variance risk extrapolation, the mean of the domains' risks plus their variance, in DomainBed's form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dg_meta.algorithms.erm import ERM
from torch import Tensor

from dg_meta.algorithm import Losses
from dg_meta.hparams import HParam, log_uniform, non_negative
from dg_meta.invariance import annealed_penalty_step
from dg_meta.penalty_schedule import PenaltySchedule
from dg_meta.registry import register_algorithm


@register_algorithm
class VREx(ERM):
    """Variance Risk Extrapolation, V-REx (Krueger, Caballero, Jacobsen, Zhang, Binas, Zhang, Le Priol &
    Courville, ICML 2021, "Out-of-Distribution Generalization via Risk Extrapolation").

    The paper minimises ``sum_e R_e(theta) + beta Var(R_1, ..., R_m)``. This class follows DomainBed
    (``domainbed/algorithms.py``, class ``VREx``): one forward over the concatenated domain minibatches, the
    cross-entropy ``R_d`` of each domain, and Adam on ``L = mean_d R_d + w Var_d(R_d)`` with the population
    variance ``Var_d(R_d) = mean_d (R_d - mean R)^2``, ``w = 1`` for the first ``vrex_penalty_anneal_iters``
    updates and ``vrex_lambda`` after; at update number ``vrex_penalty_anneal_iters`` (counting from 0),
    before its step, Adam is rebuilt (``dg_meta.penalty_schedule``). The mean of the risks instead of the
    paper's sum is DomainBed's: the same minimiser as the paper's with ``beta = m w``. Returns ``loss`` (``L``),
    ``nll`` (``mean_d R_d``) and ``penalty`` (the variance). Departure from DomainBed: its ``nll`` output is the
    last domain's risk (a loop variable), ours the mean; the minimised loss is the same.

    Hparams (``domainbed/hparams_registry.py``, the same for every dataset): ``vrex_lambda`` 1e1, random
    search ``10^U(-1, 5)``; ``vrex_penalty_anneal_iters`` 500, ``int(10^U(0, 4))``.
    ``divide_loss_by_penalty_weight`` (False = DomainBed, fixed in random search): the step of the V-REx
    ColoredMNIST code (capybaralet/REx_code_release, ``InvariantRiskMinimization/colored_mnist/main.py``, built
    on the IRM code), ``dg_meta.invariance.divide_by_penalty_weight``: minimise ``L / w`` while ``w > 1`` with
    the weight decay divided by ``w`` too (its L2 term is part of the divided loss), and keep Adam's moments at
    the switch (that code never rebuilds its Adam). That code also sums the two training risks and penalises
    ``(R_1 - R_2)^2``, four times the population variance of two risks: twice this loss with ``vrex_lambda``
    twice its weight, and a constant factor on the loss changes Adam's steps only through its ``eps``.
    """

    HPARAMS = {
        "vrex_lambda": HParam(1e1, log_uniform(-1, 5), non_negative, "non-negative",
                              "variance weight after the annealing period"),
        "vrex_penalty_anneal_iters": HParam(500, lambda r: int(10 ** r.uniform(0, 4)), non_negative,
                                            "a non-negative integer", "updates with variance weight 1 first"),
        "divide_loss_by_penalty_weight": HParam(False, None, doc="loss and weight decay divided by the penalty "
                                                "weight while it is > 1, no Adam reset (the V-REx ColoredMNIST code)"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.penalty_schedule = PenaltySchedule(hparams["vrex_lambda"], hparams["vrex_penalty_anneal_iters"])

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        logits = self.network(torch.cat([x for x, _ in batch])).split([len(x) for x, _ in batch])
        risks = torch.stack([F.cross_entropy(z, y) for z, (_, y) in zip(logits, batch)])
        nll = risks.mean()
        penalty = risks.var(correction=0)
        loss = annealed_penalty_step(self, self.penalty_schedule, nll, penalty)
        return {"loss": loss, "nll": nll.detach(), "penalty": penalty.detach()}
