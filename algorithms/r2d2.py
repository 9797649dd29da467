"""R2-D2 (Bertinetto et al. 2019): a ridge-regression head solved in closed form on each episode's support set."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from dg_meta.algorithms.protonet import ProtoNet
from torch import Tensor, nn

from dg_meta.episode_solvers import ridge_regression
from dg_meta.hparams import HParam, choice, int_uniform, log_uniform, positive
from dg_meta.registry import register_algorithm


@register_algorithm
class R2D2(ProtoNet):
    """Ridge Regression Differentiable Discriminator (Bertinetto, Henriques, Torr & Vedaldi, "Meta-learning with
    differentiable closed-form solvers", ICLR 2019), as the official code github.com/bertinetto/r2d2 computes it
    (``fewshots/models/r2d2.py``: ``RRNet``; ``fewshots/models/adjust.py``).

    Head: the ``n`` support embeddings ``Z`` get a column of ones (the bias) and, as the labels ``Y`` (one-hot),
    are divided by ``sqrt(n)``: ``X = [Z, 1] / sqrt(n)``, ``Y' = Y / sqrt(n)``; the weights are the ridge solution
    ``W = argmin ||X W - Y'||^2 + lambda ||W||^2 = X^T (X X^T + lambda I_n)^-1 Y'`` (Woodbury, the ``rr_woodbury``
    branch, used when ``n <= d + 1``; otherwise the equal ``(X^T X + lambda I)^-1 X^T Y'``, ``rr_standard``), so
    the bias is penalised too. Query logits ``alpha [Z_q, 1] W + beta`` (``AdjustLayer`` with ``base`` 1, the
    queries not divided), minimised in query cross-entropy; the loss is differentiated through the solve into the
    embedding, ``alpha`` and ``beta`` (and ``lambda`` with ``learn_lambda``).

    Update and defaults (``scripts/train/conf/fewshots.yaml`` and ``scripts/train/run_train.py``): Adam
    (``train.optim_method``), lr 5e-3 (``train.learning_rate``), no weight decay, halved every 2000 episodes
    (``StepLR`` with ``train.lr_decay`` 0.5 every ``train.decay_every`` 20 epochs of ``data.train_episodes``
    100), one episode per step; ``lambda`` 50 and not learned (``base_learner.init_lambda``,
    ``base_learner.learn_lambda`` False: the paper meta-learns it, no official script turns it on; learned,
    ``lambda`` is the raw parameter as in ``LambdaLayer``); ``alpha`` starts at 1e-4
    (``base_learner.init_adj_scale`` of the config and of ``scripts/train/mini_r2d2.sh``; the CIFAR-FS and
    Omniglot scripts pass 10), ``beta`` at 0 (``AdjustLayer``'s ``init_bias``). Episodes hold 15 examples
    per class (``data.batch_size`` 240 over ``data.way`` 16), so ``n_query`` is 14 at one shot.

    Departures: the backbone is ``backbone`` (Conv-4 by default), not the official four-layer network of
    96-192-384-512 channels with dropout whose last two layers' features are concatenated; the shot is the fixed
    ``k_shot`` where the official training draws 1 to 9 shots per episode (``data.shot`` 0, ``SetupEpisode``);
    ``n_way`` is 5 where the official trains 16-way (miniImageNet), 20-way (CIFAR-FS) or 60-way (Omniglot)
    (``--hparams '{"n_way": 16}'`` where domains have as many classes); no data augmentation; a linear solve
    instead of the explicit inverse (``base_learner.linsys`` False inverts, the same solution).
    """

    HPARAMS = {
        "lr": HParam(5e-3, log_uniform(-3.5, -2), positive, "positive", "Adam learning rate"),
        "n_query": HParam(14, int_uniform(5, 15), positive, "a positive integer", "queries per class"),
        "init_lambda": HParam(50.0, log_uniform(0, 2.5), positive, "positive", "ridge regularisation lambda"),
        "learn_lambda": HParam(False, choice([False, True]), doc="meta-learn lambda with the embedding"),
        "init_scale": HParam(1e-4, choice([1e-4, 1.0, 10.0]), positive, "positive",
                             "initial alpha, the learned scale of the query logits"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        ridge_lambda = torch.tensor(hparams["init_lambda"])
        if hparams["learn_lambda"]:
            self.ridge_lambda = nn.Parameter(ridge_lambda)
        else:
            self.register_buffer("ridge_lambda", ridge_lambda)
        self.scale = nn.Parameter(torch.tensor(hparams["init_scale"]))
        self.bias = nn.Parameter(torch.tensor(0.0))
        head = [p for name, p in self.named_parameters() if not name.startswith("featurizer.")]
        self.optimizer.add_param_group({"params": head})

    def ridge_weights(self, support_z: Tensor, support_y: Tensor, n_way: int) -> Tensor:
        """``W`` ((d + 1) x n_way, the last row the bias) of the ridge regression on the support set."""
        n = len(support_z)
        x = torch.cat([support_z, support_z.new_ones(n, 1)], 1) / math.sqrt(n)
        y = F.one_hot(support_y, n_way).to(support_z.dtype) / math.sqrt(n)
        return ridge_regression(x, y, self.ridge_lambda)

    def episode_logits(self, support_z: Tensor, support_y: Tensor, query_z: Tensor, n_way: int) -> Tensor:
        """``alpha [Z_q, 1] W + beta`` with ``W`` the ridge solution on the support set."""
        weights = self.ridge_weights(support_z, support_y, n_way)
        query = torch.cat([query_z, query_z.new_ones(len(query_z), 1)], 1)
        return self.scale * (query @ weights) + self.bias
