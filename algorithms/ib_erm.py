"""IB-ERM: ERM plus an information-bottleneck penalty, the variance of the features, in DomainBed's form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dg_meta.algorithms.erm import ERM
from torch import Tensor

from dg_meta.algorithm import Losses
from dg_meta.hparams import HParam, log_uniform, non_negative
from dg_meta.invariance import feature_variance
from dg_meta.penalty_schedule import PenaltySchedule
from dg_meta.registry import register_algorithm


@register_algorithm
class IB_ERM(ERM):
    """Information-bottleneck ERM (Ahuja, Caballero, Zhang, Gagnon-Audet, Bengio, Mitliagkas & Rish,
    NeurIPS 2021, "Invariance Principle Meets Information Bottleneck for Out-of-Distribution Generalization").

    The paper adds to the risk the entropy of the representation ``phi(x)``, in practice its variance. This
    class follows DomainBed (``domainbed/algorithms.py``, class ``IB_ERM``): per domain ``d`` the
    cross-entropy ``R_d`` and ``V_d``, the mean over feature dimensions of the unbiased variance of the
    featurizer's outputs over the domain's minibatch (``dg_meta.invariance.feature_variance``); Adam on
    ``L = mean_d R_d + w mean_d V_d``, ``w = 0`` (plain ERM, per-domain means) for the first
    ``ib_penalty_anneal_iters`` updates and ``ib_lambda`` after. At update number ``ib_penalty_anneal_iters``
    (counting from 0), before its step, Adam is rebuilt (``dg_meta.penalty_schedule``). DomainBed's Adam
    covers ``featurizer.parameters()`` then ``classifier.parameters()``: the tensors of ``network``, in the
    same order, so ERM's ``build_optimizer`` is that Adam. Returns ``loss`` (``L``), ``nll`` (``mean_d R_d``)
    and ``IB_penalty`` (``mean_d V_d``), DomainBed's names.

    Hparams (``domainbed/hparams_registry.py``, the same for every dataset): ``ib_lambda`` 1e2, random search
    ``10^U(-1, 5)``; ``ib_penalty_anneal_iters`` 500, ``int(10^U(0, 4))``. The authors' ColoredMNIST code
    (ahujak/IB-IRM, ``AC-CMNIST/experiments/cmnist/irm_baseline/val_main.py``, ``inter = 4``) also penalises
    the variance of the last linear layer's input, as DomainBed and this class do.
    """

    compile_modules = ("featurizer", "classifier")
    HPARAMS = {
        "ib_lambda": HParam(1e2, log_uniform(-1, 5), non_negative, "non-negative",
                            "feature-variance weight after the annealing period"),
        "ib_penalty_anneal_iters": HParam(500, lambda r: int(10 ** r.uniform(0, 4)), non_negative,
                                          "a non-negative integer", "updates without the penalty first"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.ib_schedule = PenaltySchedule(hparams["ib_lambda"], hparams["ib_penalty_anneal_iters"], before=0.0)

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        sizes = [len(x) for x, _ in batch]
        features = self.featurizer(torch.cat([x for x, _ in batch]))
        logits = self.classifier(features)
        nll = torch.stack([F.cross_entropy(z, y) for z, (_, y) in zip(logits.split(sizes), batch)]).mean()
        ib_penalty = torch.stack([feature_variance(f) for f in features.split(sizes)]).mean()
        loss = nll + self.ib_schedule.weight() * ib_penalty
        if self.ib_schedule.switching():
            self.optimizer = self.build_optimizer()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.ib_schedule.advance()
        return {"loss": loss.detach(), "nll": nll.detach(), "IB_penalty": ib_penalty.detach()}
