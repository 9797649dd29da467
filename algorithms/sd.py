"""SD: spectral decoupling, ERM plus an L2 penalty on the logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dg_meta.algorithms.erm import ERM
from torch import Tensor

from dg_meta.algorithm import Losses
from dg_meta.hparams import HParam, log_uniform, non_negative
from dg_meta.registry import register_algorithm


@register_algorithm
class SD(ERM):
    """Spectral decoupling (Pezeshki, Kaba, Bengio, Courville, Precup, Lajoie, "Gradient Starvation: A
    Learning Proclivity in Neural Networks", NeurIPS 2021).

    The paper replaces weight decay by an L2 penalty on the network's outputs ``y_hat``, ``(lambda / 2)
    ||y_hat||^2`` per example, so that features learnt early no longer starve the others of gradient. In
    DomainBed's form (class ``SD``, ``domainbed/algorithms.py``), followed here, the penalty is the mean of the
    squared logits over every example and class of the pooled minibatches ``B`` (``C`` classes):

        ``objective = CE_B + sd_reg * (1 / (|B| C)) sum_{x in B} ||f(x)||^2``,

    which is the paper's penalty with ``lambda = 2 sd_reg / C``; one Adam step (``lr``) on it per update. The
    reported ``loss`` is the cross-entropy and ``penalty`` the mean squared logit, as DomainBed reports them.

    Hparams: ``sd_reg``, default 0.1, random search ``10^U(-5, -1)`` (DomainBed's ``hparams_registry.py``, the
    same for every dataset).
    """

    HPARAMS = {
        "sd_reg": HParam(0.1, log_uniform(-5, -1), non_negative, "non-negative",
                         "weight of the mean squared logit"),
    }

    data_parallel = "exact"  # mean cross-entropy and mean squared logit over the pooled minibatch

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        x = torch.cat([x for x, _ in batch])
        y = torch.cat([y for _, y in batch])
        logits = self.network(x)
        loss = F.cross_entropy(logits, y)
        penalty = logits.pow(2).mean()
        objective = loss + self.hparams["sd_reg"] * penalty
        self.optimizer.zero_grad()
        objective.backward()
        self.optimizer.step()
        return {"loss": loss.detach(), "penalty": penalty.detach()}
