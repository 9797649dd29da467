"""FewShotPretrain: plain many-way cross-entropy training of a few-shot backbone over all training classes."""

from __future__ import annotations

from dg_meta.algorithms.erm import ERM
from dg_meta.algorithms.protonet import BACKBONE_HPARAM
from torch import nn

from dg_meta.hparams import HParam, log_uniform, non_negative
from dg_meta.networks import fewshot_backbone
from dg_meta.registry import register_algorithm


@register_algorithm
class FewShotPretrain(ERM):
    """The pre-training stage of FEAT and LastShot (official ``pretrain.py`` of github.com/Han-Jia/LastShot).

    ERM with the few-shot backbone: the meta-learners' featurizer (``backbone``: Conv-4 or ResNet-12) and a
    head over every training class (``model/models/classifier.py``'s ``Classifier``: ``encoder`` + ``fc``)
    minimise the cross-entropy of ordinary minibatches, with Adam (lr 1e-3, weight decay 5e-4: the official
    setting for ConvNet; the official code uses SGD with Nesterov momentum for ResNets, we keep Adam). ERM
    itself would take ``featurizer_for``'s network (on 28x28 images DomainBed's MNIST ConvNet); this one's
    ``featurizer.*`` weights fit a meta-learner's ``featurizer``, so LastShot's ``teacher_run`` and
    ``--init-from`` take them from its run folder.
    """

    HPARAMS = {
        "weight_decay": HParam(5e-4, log_uniform(-6, -2), non_negative, "non-negative", "L2 penalty (Adam)"),
        "backbone": BACKBONE_HPARAM,
    }

    def build_featurizer(self, hparams: dict) -> nn.Module:
        return fewshot_backbone(hparams["backbone"], self.input_shape)
