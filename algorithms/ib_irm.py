"""IB-IRM: IRMv1 plus an information-bottleneck penalty, the variance of the features, in DomainBed's form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dg_meta.algorithms.erm import ERM
from torch import Tensor

from dg_meta.algorithm import Losses
from dg_meta.hparams import HParam, log_uniform, non_negative
from dg_meta.invariance import feature_variance, irm_penalty
from dg_meta.penalty_schedule import PenaltySchedule
from dg_meta.registry import register_algorithm


def _anneal_iters(doc: str) -> HParam:
    return HParam(500, lambda r: int(10 ** r.uniform(0, 4)), non_negative, "a non-negative integer", doc)


@register_algorithm
class IB_IRM(ERM):
    """Information-bottleneck IRM (Ahuja, Caballero, Zhang, Gagnon-Audet, Bengio, Mitliagkas & Rish,
    NeurIPS 2021, "Invariance Principle Meets Information Bottleneck for Out-of-Distribution Generalization").

    IRMv1's objective plus the entropy of the representation ``phi(x)``, in practice its variance. This class
    follows DomainBed (``domainbed/algorithms.py``, class ``IB_IRM``): one forward over the concatenated
    domain minibatches; per domain ``d`` the cross-entropy ``R_d``, IRMv1's penalty ``P_d`` (the product of
    the derivatives of the risk w.r.t. a logit scale at 1 on ``x[::2]`` and on ``x[1::2]``,
    ``dg_meta.invariance.irm_penalty``) and ``V_d``, the mean over feature dimensions of the unbiased variance
    of the featurizer's outputs (``dg_meta.invariance.feature_variance``). Adam minimises
    ``L = mean_d R_d + w_irm mean_d P_d + w_ib mean_d V_d`` under two schedules: ``w_irm = 1`` for the first
    ``irm_penalty_anneal_iters`` updates and ``irm_lambda`` after; ``w_ib = 0`` for the first
    ``ib_penalty_anneal_iters`` updates and ``ib_lambda`` after. Adam is rebuilt before the step of update
    number ``irm_penalty_anneal_iters`` and before that of update number ``ib_penalty_anneal_iters`` (counting
    from 0; once if they are equal). DomainBed's Adam covers ``featurizer.parameters()`` then
    ``classifier.parameters()``: the tensors of ``network`` in the same order, so ERM's ``build_optimizer``.
    Returns ``loss`` (``L``), ``nll``, ``IRM_penalty`` and ``IB_penalty`` (the three domain means), DomainBed's
    names.

    Hparams (``domainbed/hparams_registry.py``, the same for every dataset): ``irm_lambda`` and ``ib_lambda``
    1e2, random search ``10^U(-1, 5)``; ``irm_penalty_anneal_iters`` and ``ib_penalty_anneal_iters`` 500,
    ``int(10^U(0, 4))``. The authors' ColoredMNIST code (ahujak/IB-IRM,
    ``AC-CMNIST/experiments/cmnist/irm_baseline/val_main.py``) differs from DomainBed in ways not reproduced:
    IRM weight 0 (not 1) before its annealing ends, the loss divided by the IRM weight while it is > 1, the
    squared full-batch gradient as the IRM penalty, no Adam reset.
    """

    compile_modules = ("featurizer", "classifier")
    HPARAMS = {
        "irm_lambda": HParam(1e2, log_uniform(-1, 5), non_negative, "non-negative",
                             "IRM penalty weight after its annealing period"),
        "irm_penalty_anneal_iters": _anneal_iters("updates with IRM penalty weight 1 first"),
        "ib_lambda": HParam(1e2, log_uniform(-1, 5), non_negative, "non-negative",
                            "feature-variance weight after its annealing period"),
        "ib_penalty_anneal_iters": _anneal_iters("updates without the feature-variance penalty first"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.irm_schedule = PenaltySchedule(hparams["irm_lambda"], hparams["irm_penalty_anneal_iters"])
        self.ib_schedule = PenaltySchedule(hparams["ib_lambda"], hparams["ib_penalty_anneal_iters"], before=0.0)

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        sizes = [len(x) for x, _ in batch]
        features = self.featurizer(torch.cat([x for x, _ in batch]))
        logits = self.classifier(features).split(sizes)
        nll = torch.stack([F.cross_entropy(z, y) for z, (_, y) in zip(logits, batch)]).mean()
        irm = torch.stack([irm_penalty(z, y) for z, (_, y) in zip(logits, batch)]).mean()
        ib = torch.stack([feature_variance(f) for f in features.split(sizes)]).mean()
        loss = nll + self.irm_schedule.weight() * irm + self.ib_schedule.weight() * ib
        if self.irm_schedule.switching() or self.ib_schedule.switching():
            self.optimizer = self.build_optimizer()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.irm_schedule.advance()
        self.ib_schedule.advance()
        return {"loss": loss.detach(), "nll": nll.detach(), "IRM_penalty": irm.detach(), "IB_penalty": ib.detach()}
