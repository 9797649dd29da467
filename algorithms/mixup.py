"""Mixup: inter-domain mixup, ERM on convex combinations of the minibatches of two training domains."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dg_meta.algorithms.erm import ERM
from torch import Tensor

from dg_meta.algorithm import Losses
from dg_meta.hparams import HParam, log_uniform, positive
from dg_meta.registry import register_algorithm

Minibatch = tuple[Tensor, Tensor]


def random_pairs_of_minibatches(batch: list[Minibatch]) -> list[tuple[Minibatch, Minibatch]]:
    """Pair each domain with the next one in a random cyclic order: ``len(batch)`` pairs.

    The order is ``torch.randperm(len(batch))`` (the global torch RNG); domain ``perm[i]`` is paired with
    ``perm[(i + 1) % len(batch)]``, and both minibatches are cut to the shorter one's length (DomainBed's
    ``random_pairs_of_minibatches``, ``domainbed/lib/misc.py``).
    """
    perm = torch.randperm(len(batch)).tolist()
    pairs = []
    for i, d in enumerate(perm):
        (xi, yi), (xj, yj) = batch[d], batch[perm[(i + 1) % len(perm)]]
        n = min(len(xi), len(xj))
        pairs.append(((xi[:n], yi[:n]), (xj[:n], yj[:n])))
    return pairs


@register_algorithm
class Mixup(ERM):
    """Inter-domain mixup (Yan et al. 2020, arXiv:2001.00677; Wang et al. 2020, arXiv:1912.01805).

    Every update pairs the ``D`` training domains in a random cycle (``random_pairs_of_minibatches``) and,
    for each pair ``(i, j)``, draws ``lam ~ Beta(mixup_alpha, mixup_alpha)``, mixes the inputs
    ``x = lam x_i + (1 - lam) x_j`` and scores the prediction against both label sets:

        ``loss = (1 / D) sum_pairs [lam CE(f(x), y_i) + (1 - lam) CE(f(x), y_j)]``,

    one Adam step (``lr``) on ``loss``. Follows DomainBed's ``Mixup`` (``domainbed/algorithms.py``) and its
    pairing, with one departure: ``lam`` is drawn with ``torch.distributions.Beta`` from torch's global RNG
    (seeded by the trainer and saved in its checkpoints, as is the ``randperm`` of the pairing) instead of
    numpy's global RNG (``np.random.beta``), so a resumed run draws the same ``lam`` sequence. The draws
    happen on the CPU, so they are the same numbers on every device.

    Hparams: ``mixup_alpha``, default 0.2, random search ``10^U(-1, 1)`` (DomainBed's ``hparams_registry.py``,
    the same for every dataset).
    """

    HPARAMS = {
        "mixup_alpha": HParam(0.2, log_uniform(-1, 1), positive, "positive",
                              "both parameters of the Beta distribution of the mixing weight lam"),
    }

    def update(self, batch: list[Minibatch]) -> Losses:
        alpha = torch.tensor(self.hparams["mixup_alpha"], dtype=torch.float64)
        mixing = torch.distributions.Beta(alpha, alpha)
        objective = 0.0
        for (xi, yi), (xj, yj) in random_pairs_of_minibatches(batch):
            lam = float(mixing.sample())
            logits = self.network(lam * xi + (1 - lam) * xj)
            objective = objective + lam * F.cross_entropy(logits, yi) + (1 - lam) * F.cross_entropy(logits, yj)
        objective = objective / len(batch)
        self.optimizer.zero_grad()
        objective.backward()
        self.optimizer.step()
        return {"loss": objective.detach()}
