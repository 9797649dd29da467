"""ERM: empirical risk minimisation over the pooled training domains (DomainBed's baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dg_meta.algorithm import Algorithm, Losses
from dg_meta.networks import classifier, featurizer_for
from dg_meta.registry import register_algorithm


@register_algorithm
class ERM(Algorithm):
    """Empirical risk minimisation (Vapnik 1998; DomainBed's baseline, Gulrajani & Lopez-Paz 2021).

    A featurizer ``phi`` and a linear head ``w`` minimise the cross-entropy over the concatenation of
    one minibatch per training domain, ``min_{w,phi} (1/|B|) sum_{(x,y) in B_1 u ... u B_D}
    CE(w(phi(x)), y)``, with Adam (lr 1e-3, no weight decay by default).
    """

    compile_modules = ("network",)
    data_parallel = "exact"  # the pooled minibatch's mean cross-entropy: equal shards' means, averaged

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer = self.build_featurizer(hparams)
        self.classifier = classifier(self.featurizer.n_outputs, num_classes, hparams["nonlinear_classifier"])
        self.network = nn.Sequential(self.featurizer, self.classifier)
        self.optimizer = self.build_optimizer()

    def build_featurizer(self, hparams: dict) -> nn.Module:
        """The featurizer ``phi``: ``featurizer_for``'s choice for the input shape (subclasses may change it)."""
        return featurizer_for(self.input_shape, hparams)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """Adam over ``network`` (``lr``, ``weight_decay``); penalty methods rebuild it when their penalty
        switches on (``dg_meta.penalty_schedule``)."""
        return torch.optim.Adam(self.network.parameters(), lr=self.hparams["lr"],
                                weight_decay=self.hparams["weight_decay"])

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        x = torch.cat([x for x, _ in batch])
        y = torch.cat([y for _, y in batch])
        loss = F.cross_entropy(self.network(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}

    def predict(self, x: Tensor) -> Tensor:
        return self.network(x)
