"""Meta-Baseline (Chen et al., ICCV 2021): a pre-trained classifier's embedding meta-trained on episodes with
cosine-similarity prototypes times a learned temperature."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dg_meta.algorithms.protonet import BACKBONE_HPARAM
from torch import Tensor, nn

from dg_meta.algorithm import EpisodicAlgorithm, Losses
from dg_meta.hparams import HParam, choice, log_uniform, non_negative, positive
from dg_meta.networks import fewshot_backbone
from dg_meta.registry import register_algorithm
from dg_meta.samplers import Episode
from dg_meta.support_heads import class_means, cosine_logits

#: ``utils.make_optimizer``: ``SGD(params, lr, momentum=0.9, weight_decay=weight_decay)``
MOMENTUM = 0.9


@register_algorithm
class MetaBaseline(EpisodicAlgorithm):
    """"Meta-Baseline: Exploring Simple Meta-Learning for Few-Shot Learning" (Chen, Liu, Xu, Darrell & Wang,
    ICCV 2021). Official code: github.com/yinboc/few-shot-meta-baseline.

    Two stages. Stage 1, Classifier-Baseline: cross-entropy training of the backbone and a linear head over all
    training classes; here that is a ``FewShotPretrain`` run (or ``Baseline``'s, whose ``featurizer`` has the same
    names). Stage 2, this algorithm, starts from that run's embedding with ``--init-from RUN_DIR`` (the official
    ``load_encoder``) and meta-trains it on episodes: with ``f`` the backbone (hparam ``backbone``), the
    prototypes ``c_k = mean_{x in S_k} f(x)`` and a learnable temperature ``tau``, a query ``q`` has the logits
    ``tau * cos(f(q), c_k)`` (``models/meta_baseline.py``, ``method='cos'``: ``F.normalize`` of the query
    features and of the class means, then their dot product times ``temp``). ``tau`` starts at 10
    (``temp=10.``, ``temp_learnable=True``). Each step minimises the cross-entropy averaged over every query of
    a meta-batch of 4 episodes, 5-way 1-shot 15-query, all support then all query images embedded in one forward
    pass (``train_meta.py``; ``configs/train_meta_mini.yaml``: ``n_way 5``, ``n_shot 1``, ``n_query 15``,
    ``ep_per_batch 4``), with SGD over the backbone and ``tau``: lr 0.001, momentum 0.9, weight decay 5e-4
    (``optimizer_args: {lr: 0.001, weight_decay: 5.e-4}``; ``utils.make_optimizer``). Few-shot evaluation uses
    the same logits with the support and the queries embedded apart (in eval mode, so the same features).

    Departures: stage 1 is ``FewShotPretrain``'s Adam (the official classifier stage uses SGD at lr 0.1, batch
    128, decayed at epoch 90); episodes carry no data augmentation.
    """

    HPARAMS = {
        "lr": HParam(1e-3, log_uniform(-4, -2), positive, "positive", "SGD learning rate"),
        "weight_decay": HParam(5e-4, log_uniform(-6, -2), non_negative, "non-negative", "L2 penalty (SGD)"),
        "temperature": HParam(10.0, choice([1.0, 10.0, 30.0]), positive, "positive",
                              "initial value of the learned temperature tau"),
        "backbone": BACKBONE_HPARAM,
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer = fewshot_backbone(hparams["backbone"], self.input_shape)
        self.temperature = nn.Parameter(torch.tensor(float(hparams["temperature"])))
        self.optimizer = torch.optim.SGD(self.parameters(), lr=hparams["lr"], momentum=MOMENTUM,
                                         weight_decay=hparams["weight_decay"])

    def episode_logits(self, support_z: Tensor, support_y: Tensor, query_z: Tensor, n_way: int) -> Tensor:
        """``tau * cos(z_q, c_k)`` with ``c_k`` the mean support embedding of class ``k``."""
        return cosine_logits(query_z, class_means(support_z, support_y, n_way), self.temperature)

    def update(self, batch: list[Episode]) -> Losses:
        support_sizes = [len(e.support_x) for e in batch]
        query_sizes = [len(e.query_x) for e in batch]
        z = self.featurizer(torch.cat([e.support_x for e in batch] + [e.query_x for e in batch]))
        support_z = z[: sum(support_sizes)].split(support_sizes)
        query_z = z[sum(support_sizes):].split(query_sizes)
        summed = [F.cross_entropy(self.episode_logits(s, e.support_y, q, e.n_way), e.query_y, reduction="sum")
                  for s, q, e in zip(support_z, query_z, batch)]
        loss = torch.stack(summed).sum() / sum(query_sizes)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach(), "temperature": self.temperature.detach().clone()}
