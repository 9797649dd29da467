"""IRM: invariant risk minimization (IRMv1), a risk plus the squared gradient of each domain's risk w.r.t. a
dummy classifier scale, in DomainBed's form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dg_meta.algorithms.erm import ERM
from torch import Tensor

from dg_meta.algorithm import Losses
from dg_meta.hparams import HParam, log_uniform, non_negative
from dg_meta.invariance import annealed_penalty_step, irm_penalty
from dg_meta.penalty_schedule import PenaltySchedule
from dg_meta.registry import register_algorithm


@register_algorithm
class IRM(ERM):
    """Invariant Risk Minimization, IRMv1 (Arjovsky, Bottou, Gulrajani & Lopez-Paz, arXiv:1907.02893, 2019).

    The paper's practical objective is ``min_phi sum_e R^e(phi) + lambda ||grad_{w | w=1} R^e(w phi)||^2``:
    a dummy scale ``w = 1`` on the logits, and the penalty is the squared derivative of each domain's risk
    w.r.t. it. This class follows DomainBed (``domainbed/algorithms.py``, class ``IRM``): one forward over the
    concatenated domain minibatches, then per domain ``d`` the cross-entropy ``R_d`` and the penalty
    ``P_d = g_d(x[::2]) * g_d(x[1::2])``, ``g_d(S) = d/ds CE(s f(S), y_S)`` at ``s = 1`` (an unbiased estimate of
    the squared gradient, ``dg_meta.invariance.irm_penalty``); Adam minimises
    ``L = mean_d R_d + w mean_d P_d``, ``w = 1`` for the first ``irm_penalty_anneal_iters`` updates and
    ``irm_lambda`` after. At update number ``irm_penalty_anneal_iters`` (counting from 0), before its step,
    Adam is rebuilt: its moments restart (``dg_meta.penalty_schedule``). Returns ``loss`` (the minimised loss),
    ``nll`` (``mean_d R_d``) and ``penalty`` (``mean_d P_d``), DomainBed's names.

    Hparams (``domainbed/hparams_registry.py``, the same for every dataset): ``irm_lambda`` 1e2, random search
    ``10^U(-1, 5)``; ``irm_penalty_anneal_iters`` 500, ``int(10^U(0, 4))``. Two options reproduce the official
    code (facebookresearch/InvariantRiskMinimization, ``code/colored_mnist/main.py``); off by default
    (DomainBed) and fixed in random search:
    - ``divide_loss_by_penalty_weight``: that code's step, ``dg_meta.invariance.divide_by_penalty_weight``:
      minimise ``L / w`` while ``w > 1`` with the weight decay divided by ``w`` too (its L2 term is part of the
      divided loss), and keep Adam's moments at the switch (that code never rebuilds its Adam). Dividing alone
      would change little: after a reset, a constant ``1 / w`` on every gradient is undone by Adam but for its
      ``eps`` and the weight decay.
    - ``irm_unbiased_penalty`` (True): False squares the derivative on the domain's whole batch, as that code
      does, instead of DomainBed's product over the two halves.
    That code's single logit with binary cross-entropy is a two-class softmax here: ``CE(s (z_0, z_1), y)`` is
    ``BCE(s (z_1 - z_0), y)``, so its risk and penalty are the same functions of ``z_1 - z_0``.
    """

    HPARAMS = {
        "irm_lambda": HParam(1e2, log_uniform(-1, 5), non_negative, "non-negative",
                             "penalty weight after the annealing period"),
        "irm_penalty_anneal_iters": HParam(500, lambda r: int(10 ** r.uniform(0, 4)), non_negative,
                                           "a non-negative integer", "updates with penalty weight 1 first"),
        "divide_loss_by_penalty_weight": HParam(False, None, doc="loss and weight decay divided by the penalty "
                                                "weight while it is > 1, no Adam reset (the official IRM code)"),
        "irm_unbiased_penalty": HParam(True, None, doc="product of the scale gradients on the two halves of a "
                                       "domain's batch (DomainBed); False: square of the whole-batch gradient"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.penalty_schedule = PenaltySchedule(hparams["irm_lambda"], hparams["irm_penalty_anneal_iters"])

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        logits = self.network(torch.cat([x for x, _ in batch])).split([len(x) for x, _ in batch])
        nll = torch.stack([F.cross_entropy(z, y) for z, (_, y) in zip(logits, batch)]).mean()
        penalty = torch.stack([irm_penalty(z, y, self.hparams["irm_unbiased_penalty"])
                               for z, (_, y) in zip(logits, batch)]).mean()
        loss = annealed_penalty_step(self, self.penalty_schedule, nll, penalty)
        return {"loss": loss, "nll": nll.detach(), "penalty": penalty.detach()}
