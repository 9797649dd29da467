"""Baseline (Chen et al., ICLR 2019): cross-entropy training over all training classes, then a new linear head
fitted on each few-shot episode's support set."""

from __future__ import annotations

from collections.abc import Callable

import torch
from dg_meta.algorithms.fewshot_pretrain import FewShotPretrain
from torch import Tensor, nn

from dg_meta.hparams import HParam, log_uniform, non_negative
from dg_meta.registry import register_algorithm
from dg_meta.support_heads import fit_support_head


@register_algorithm
class Baseline(FewShotPretrain):
    """Baseline of "A Closer Look at Few-shot Classification" (Chen, Liu, Kira, Wang & Huang, ICLR 2019).

    Official code: github.com/wyharveychen/CloserLookFewShot.

    - Training (``methods/baselinetrain.py``, ``BaselineTrain`` with ``loss_type='softmax'``): the few-shot
      backbone ``f`` (hparam ``backbone``, Conv-4 by default) and a linear head ``W x + b`` over every training
      class, its bias initialised to zero (``self.classifier.bias.data.fill_(0)``), minimise the cross-entropy
      ``CE(W f(x) + b, y)`` of ordinary minibatches with Adam at PyTorch's defaults, lr 1e-3 and no weight decay
      (``train.py``: ``torch.optim.Adam(model.parameters())``).
    - Few-shot evaluation (``adapt``; ``methods/baselinefinetune.py``, ``BaselineFinetune``): ``f`` is frozen (in
      eval mode) and a new head over the episode's ``N`` classes, ``nn.Linear`` at PyTorch's initialisation, is
      trained on the support features alone by ``support_heads.fit_support_head``: 100 epochs of minibatches of
      4 in a fresh random order, SGD with lr 0.01, momentum 0.9, dampening 0.9, weight decay 1e-3, on the
      cross-entropy. Its logits ``W' f(q) + b'`` classify the queries.

    Departures: minibatches hold the dataset's ``batch_size`` examples of each training domain (the official
    loader draws 16 examples from the pooled base classes), without the official data augmentation; training has
    no epochs, ``--steps`` bounds it; the head has one output per class of the dataset (the official one has
    ``--num_classes`` 200 outputs, more than the base classes); minibatch orders come from torch's generator
    (the official code shuffles with numpy's).
    """

    HPARAMS = {
        "weight_decay": HParam(0.0, log_uniform(-6, -2), non_negative, "non-negative", "L2 penalty (Adam)"),
        "nonlinear_classifier": HParam(False, None, lambda v: v is False, "false (the heads are the method's own)",
                                       "must stay false: the heads are the method's own"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.classifier = self.training_head(self.featurizer.n_outputs, num_classes)
        self.network = nn.Sequential(self.featurizer, self.classifier)
        self.optimizer = self.build_optimizer()

    def training_head(self, n_features: int, n_classes: int) -> nn.Module:
        """The head trained with the backbone: linear, zero bias."""
        head = nn.Linear(n_features, n_classes)
        nn.init.zeros_(head.bias)
        return head

    def support_head(self, n_features: int, n_way: int) -> nn.Module:
        """The new head fitted on an episode's support set: linear, PyTorch's initialisation."""
        return nn.Linear(n_features, n_way)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        """A new ``support_head`` fitted on the frozen support features only; it scores the queries."""
        n_way = int(support_y.max()) + 1
        with torch.no_grad():
            support_z = self.embed(support_x)
        head = self.support_head(support_z.shape[1], n_way).to(support_z)
        fit_support_head(head, support_z, support_y)

        def predict_query(query_x: Tensor) -> Tensor:
            with torch.no_grad():
                return head(self.embed(query_x))

        return predict_query
