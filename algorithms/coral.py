"""CORAL: ERM plus a penalty aligning the feature means and covariances of every pair of training domains."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from dg_meta.algorithms.erm import ERM
from torch import Tensor

from dg_meta.algorithm import Losses
from dg_meta.feature_alignment import Distance, coral_distance, pairwise_penalty
from dg_meta.hparams import HParam, log_uniform, non_negative
from dg_meta.registry import register_algorithm


@register_algorithm
class CORAL(ERM):
    """Deep CORAL (Sun & Saenko, "Deep CORAL: Correlation Alignment for Deep Domain Adaptation", ECCV 2016
    Workshops), in DomainBed's multi-domain form (``domainbed/algorithms.py``, ``AbstractMMD`` with
    ``gaussian=False``, registered there as ``CORAL``).

    With ``z_i = phi(x_i)`` the features of training domain ``i``'s minibatch (``D`` domains), one step
    minimises, with Adam over ``phi`` and the head ``w``,
    ``L = (1/D) sum_i CE_i + mmd_gamma * (2 / (D (D - 1))) sum_{i<j} dist(z_i, z_j)``,
    ``CE_i`` the mean cross-entropy of ``w(z_i)`` on domain ``i`` (a mean of per-domain means, not ERM's
    pooled mean) and, here, ``dist(a, b) = mean_{k}((mu_a - mu_b)_k^2) + mean_{k,l}((C_a - C_b)_{kl}^2)``:
    squared differences of the feature means ``mu`` and of the unbiased (``1/(n-1)``) covariances ``C``,
    averaged over entries (``dg_meta.feature_alignment.coral_distance``). With one training domain the
    penalty is 0. ``update`` returns ``loss`` (the classification term) and ``penalty`` (the mean pairwise
    distance), as DomainBed does. Subclasses change ``distance`` (MMD) or ``alignment_penalty`` (CausIRL).

    Departures of DomainBed from the paper, followed here: the paper aligns one labelled source domain with
    an unlabelled target domain by ``||C_S - C_T||_F^2 / (4 d^2)`` (no mean term); DomainBed aligns every pair
    of training domains, adds the squared difference of the means, and averages over the ``d^2`` entries
    (``1 / d^2`` instead of ``1 / (4 d^2)``). As in DomainBed, each domain's minibatch goes through the
    featurizer separately (it matters only for a featurizer with batch statistics).

    Hparams: ``mmd_gamma`` (default 1, random search ``10 ** U(-1, 1)``: DomainBed's
    ``hparams_registry.py``, the same for every dataset); ``lr`` and ``weight_decay`` are ERM's.
    """

    HPARAMS = {
        "mmd_gamma": HParam(1.0, log_uniform(-1, 1), non_negative, "non-negative",
                            "weight of the feature-alignment penalty"),
    }
    compile_modules = ("featurizer", "classifier")  # update calls them one by one, not ``network``
    #: per-domain mean cross-entropies (exact on equal shards) and a penalty on every domain's whole minibatch,
    #: its features gathered from all processes (``feature_alignment.pairwise_penalty``)
    data_parallel = "gather"
    #: the distance between two domains' features that the penalty averages
    distance: ClassVar[Distance] = staticmethod(coral_distance)

    def alignment_penalty(self, features: list[Tensor]) -> Tensor:
        """The mean of ``distance`` over the unordered pairs of training domains' features (each domain's whole
        minibatch on several processes)."""
        return pairwise_penalty(features, self.distance)

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        features = [self.featurizer(x) for x, _ in batch]
        classification = torch.stack([F.cross_entropy(self.classifier(z), y)
                                      for z, (_, y) in zip(features, batch)]).mean()
        penalty = self.alignment_penalty(features)
        self.optimizer.zero_grad(set_to_none=True)
        (classification + self.hparams["mmd_gamma"] * penalty).backward()
        self.optimizer.step()
        return {"loss": classification.detach(), "penalty": penalty.detach()}
