"""FewShotPretrain: plain many-way cross-entropy training of a few-shot backbone over all training classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dg_meta.algorithms.protonet import BACKBONE_HPARAM
from torch import Tensor, nn

from dg_meta.algorithm import Algorithm, Losses
from dg_meta.hparams import HParam, log_uniform, non_negative
from dg_meta.networks import fewshot_backbone
from dg_meta.registry import register_algorithm


@register_algorithm
class FewShotPretrain(Algorithm):
    """The pre-training stage of FEAT and LastShot (official ``pretrain.py`` of github.com/Han-Jia/LastShot).

    The few-shot backbone (``featurizer``: Conv-4 or ResNet-12, the one the meta-learners use) and a linear
    head over every training class (``model/models/classifier.py``'s ``Classifier``: ``encoder`` + ``fc``)
    minimise the cross-entropy of ordinary minibatches, with Adam (lr 1e-3, weight decay 5e-4: the official
    setting for ConvNet; the official code uses SGD with Nesterov momentum for ResNets, we keep Adam). It is
    ERM with the few-shot backbone instead of the featurizer ``featurizer_for`` picks by input size (on 28x28
    images DomainBed's MNIST ConvNet), so its ``featurizer.*`` weights fit a meta-learner's ``featurizer``:
    LastShot's ``teacher_run`` and ``--init-from`` take them from its run folder.
    """

    HPARAMS = {
        "weight_decay": HParam(5e-4, log_uniform(-6, -2), non_negative, "non-negative", "L2 penalty (Adam)"),
        "backbone": BACKBONE_HPARAM,
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer = fewshot_backbone(hparams["backbone"], self.input_shape)
        self.classifier = nn.Linear(self.featurizer.n_outputs, num_classes)
        self.optimizer = torch.optim.Adam([*self.featurizer.parameters(), *self.classifier.parameters()],
                                          lr=hparams["lr"], weight_decay=hparams["weight_decay"])

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        x = torch.cat([x for x, _ in batch])
        y = torch.cat([y for _, y in batch])
        loss = F.cross_entropy(self.predict(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}

    def predict(self, x: Tensor) -> Tensor:
        return self.classifier(self.featurizer(x))
