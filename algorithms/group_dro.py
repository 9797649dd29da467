"""GroupDRO: minimise the domain losses weighted by an online, exponentiated-gradient worst-case mixture q."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dg_meta.algorithms.erm import ERM
from torch import Tensor

from dg_meta.algorithm import Losses
from dg_meta.hparams import HParam, log_uniform, positive
from dg_meta.registry import register_algorithm


@register_algorithm
class GroupDRO(ERM):
    """Group distributionally robust optimisation (Sagawa, Koh, Hashimoto, Liang, ICLR 2020, Algorithm 1).

    The objective is the worst mixture of the ``M`` training-domain risks, ``min_theta max_{q in simplex}
    sum_m q_m R_m(theta)``, optimised online: every update computes each domain's mean cross-entropy
    ``l_m`` on its own minibatch (one forward per domain), moves the mixture by an exponentiated-gradient
    step ``q_m <- q_m exp(eta l_m)`` (``l_m`` detached: no gradient flows into ``q``), renormalises
    ``q <- q / sum(q)``, and takes one Adam step on ``loss = sum_m q_m l_m``.

    Follows DomainBed's ``GroupDRO`` (``domainbed/algorithms.py``): every domain's minibatch in every step
    and Adam (``lr``) for ``theta``, where the paper's Algorithm 1 samples one group per step and takes an
    SGD step on ``q_g grad l_g``. ``q`` starts uniform (the paper's ``q^(0)``; DomainBed starts from ones,
    which gives the same ``q`` after the first normalisation) and is the buffer ``q`` of the state_dict, so a
    resumed run continues with its mixture.

    Hparams: ``groupdro_eta`` (the step size of ``q``), default 1e-2, random search ``10^U(-3, -1)``
    (DomainBed's ``hparams_registry.py``, the same for every dataset).
    """

    HPARAMS = {
        "groupdro_eta": HParam(1e-2, log_uniform(-3, -1), positive, "positive",
                               "exponentiated-gradient step size of the domain weights q"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.register_buffer("q", torch.full((num_domains,), 1.0 / num_domains))

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        losses = torch.stack([F.cross_entropy(self.network(x), y) for x, y in batch])
        with torch.no_grad():
            self.q.mul_(torch.exp(self.hparams["groupdro_eta"] * losses))
            self.q.div_(self.q.sum())
        loss = losses @ self.q
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}
