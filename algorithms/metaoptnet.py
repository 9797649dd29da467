"""MetaOptNet (Lee et al. 2019): a multi-class linear SVM solved per episode as a differentiable quadratic program."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dg_meta.algorithms.protonet import BACKBONE_HPARAM
from torch import Tensor, nn

from dg_meta.algorithm import EpisodicAlgorithm, Losses
from dg_meta.episode_solvers import crammer_singer_svm_logits
from dg_meta.hparams import HParam, choice, int_uniform, log_uniform, non_negative, positive, unit_interval
from dg_meta.networks import fewshot_backbone
from dg_meta.registry import register_algorithm
from dg_meta.samplers import Episode

#: the official learning-rate factors by (0-based) epoch: ``lambda_epoch`` of ``train.py`` under its PyTorch 1.0
#: ``LambdaLR``, stepped before each epoch: epochs 0-19 at 1, 20-39 at 0.06, 40-49 at 0.012, then 0.0024
LR_FACTORS = ((20, 1.0), (40, 0.06), (50, 0.012))
LAST_LR_FACTOR = 0.0024


def lr_factor(epoch: int) -> float:
    """The factor of the base learning rate in (0-based) epoch ``epoch`` (``LR_FACTORS``)."""
    for end, factor in LR_FACTORS:
        if epoch < end:
            return factor
    return LAST_LR_FACTOR


@register_algorithm
class MetaOptNet(EpisodicAlgorithm):
    """MetaOptNet-SVM (Lee, Maji, Ravichandran & Soatto, "Meta-Learning with Differentiable Convex
    Optimization", CVPR 2019), as the official code github.com/kjunelee/MetaOptNet computes it
    (``models/classification_heads.py``: ``MetaOptNetHead_SVM_CS``, ``ClassificationHead``; ``train.py``).

    Head: on each episode the Crammer-Singer multi-class SVM on the support embeddings ``x_i``, through its dual
    ``min_alpha 1/2 sum_m ||w_m||^2 - sum_i alpha_i^{y_i}``, ``w_m = sum_i alpha_i^m x_i``, subject to
    ``alpha_i^m <= C [m = y_i]`` and ``sum_m alpha_i^m = 0`` (``dg_meta.episode_solvers.crammer_singer_dual``,
    the official ``G, e, C, h, A, b``), solved by a batched primal-dual interior-point method, ``qp_iterations``
    iterations in training and ``qp_iterations_test`` in ``adapt`` (qpth's ``maxIter``: 15 by default in
    ``MetaOptNetHead_SVM_CS``, 3 in ``test.py``); query logits ``scale * w_m . x_q`` with a learned ``scale``
    starting at 1 (``ClassificationHead``). The solution is differentiated implicitly through its KKT conditions
    (OptNet), with respect to the support features; the query features enter the logits directly.

    Objective: the cross-entropy of the queries of all episodes of a meta-batch against label-smoothed targets,
    ``1 - eps`` on the true class and ``eps / (n_way - 1)`` on each other (``train.py``; ``--eps`` is 0 by
    default and 0.1 in the README's miniImageNet ResNet-12 command: ``{"label_smoothing": 0.1}``). The supports
    of a meta-batch are embedded in one forward pass and its queries in another (batch-norm statistics as in
    ``train.py``). Update (``train.py``): SGD with Nesterov momentum 0.9, weight decay 5e-4 (the ``scale``
    included), lr 0.1 times 1 in epochs 0-19, 0.06 in 20-39, 0.012 in 40-49 and 0.0024 after (``lambda_epoch``),
    an epoch being ``steps_per_epoch`` 1000 meta-batches of ``meta_batch_size`` 8 episodes. Episodes:
    5-way (``--train-way``), 15-shot (``--train-shot``; the paper meta-trains with more shots than it tests),
    6 queries per class (``--train-query``); ``C`` = 0.1 (``C_reg``).

    Departures: the QP solver is ``dg_meta.episode_solvers.solve_qp``, not qpth (see ``interior_point`` for how
    they differ), and solves in float64 (the official default ``double_precision=False`` solves in float32);
    evaluation always runs ``qp_iterations_test`` iterations (the validation inside the official ``train.py``
    runs the default 15, its ``test.py`` 3); the backbone is ``backbone``: Conv-4 by default (the official
    ``ProtoNetEmbedding`` is Conv-4 with bias-free convolutions and He initialisation), or this library's
    ResNet-12, globally average-pooled and without DropBlock (the official ``resnet12(avg_pool=False,
    drop_rate=0.1)`` flattens the 5 x 5 map); no data augmentation.
    """

    HPARAMS = {
        "lr": HParam(0.1, log_uniform(-2, -0.5), positive, "positive", "SGD learning rate before the decays"),
        "weight_decay": HParam(5e-4, log_uniform(-5, -3), non_negative, "non-negative", "SGD weight decay"),
        "steps_per_epoch": HParam(1000, choice([500, 1000, 2000]), positive, "a positive integer",
                                  "steps of an epoch of the learning-rate schedule"),
        "k_shot": HParam(15, choice([5, 10, 15]), positive, "a positive integer", "support examples per class"),
        "n_query": HParam(6, int_uniform(5, 15), positive, "a positive integer", "queries per class"),
        "meta_batch_size": HParam(8, choice([4, 8]), positive, "a positive integer", "episodes per step"),
        "svm_c": HParam(0.1, log_uniform(-2, 0), positive, "positive", "C of the SVM"),
        "qp_iterations": HParam(15, choice([10, 15]), positive, "a positive integer",
                                "interior-point iterations in training"),
        "qp_iterations_test": HParam(3, choice([3, 5, 15]), positive, "a positive integer",
                                     "interior-point iterations when adapting at evaluation"),
        "label_smoothing": HParam(0.0, choice([0.0, 0.1]), unit_interval, "in [0, 1]",
                                  "eps: target mass spread over the other classes"),
        "backbone": BACKBONE_HPARAM,
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer = fewshot_backbone(hparams["backbone"], self.input_shape)
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.optimizer = torch.optim.SGD(self.parameters(), lr=hparams["lr"], momentum=0.9, nesterov=True,
                                         weight_decay=hparams["weight_decay"])

    def svm_logits(self, support_z: Tensor, support_y: Tensor, query_z: Tensor, n_way: int,
                   iterations: int) -> Tensor:
        """``scale * w_m . x_q`` for episodes stacked along the first dimension."""
        return self.scale * crammer_singer_svm_logits(support_z, support_y, query_z, n_way, self.hparams["svm_c"],
                                                      iterations)

    def episode_logits(self, support_z: Tensor, support_y: Tensor, query_z: Tensor, n_way: int) -> Tensor:
        """One episode's query logits with ``qp_iterations_test`` iterations (what ``adapt`` predicts)."""
        logits = self.svm_logits(support_z.unsqueeze(0), support_y.unsqueeze(0), query_z.unsqueeze(0), n_way,
                                 self.hparams["qp_iterations_test"])
        return logits.squeeze(0)

    def smoothed_cross_entropy(self, logits: Tensor, y: Tensor, n_way: int) -> Tensor:
        """Mean of ``-sum_k t_k log softmax(logits)_k`` with ``t = (1 - eps) onehot(y) + eps / (n_way - 1)
        (1 - onehot(y))``."""
        eps = self.hparams["label_smoothing"]
        one_hot = F.one_hot(y, n_way).to(logits.dtype)
        target = one_hot * (1 - eps) + (1 - one_hot) * eps / (n_way - 1)
        return -(target * F.log_softmax(logits, 1)).sum(1).mean()

    def set_learning_rate(self) -> None:
        factor = lr_factor(int(self.steps_done) // self.hparams["steps_per_epoch"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.hparams["lr"] * factor

    def update(self, batch: list[Episode]) -> Losses:
        self.set_learning_rate()
        n_way, shape = batch[0].n_way, (len(batch), len(batch[0].support_x), len(batch[0].query_x))
        support_z = self.featurizer(torch.cat([e.support_x for e in batch])).unflatten(0, shape[:2])
        query_z = self.featurizer(torch.cat([e.query_x for e in batch])).unflatten(0, (shape[0], shape[2]))
        support_y = torch.stack([e.support_y for e in batch])
        logits = self.svm_logits(support_z, support_y, query_z, n_way, self.hparams["qp_iterations"])
        loss = self.smoothed_cross_entropy(logits.flatten(0, 1), torch.cat([e.query_y for e in batch]), n_way)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps_done += 1
        return {"loss": loss.detach()}
