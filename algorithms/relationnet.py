"""Relation Networks (Sung et al. 2018): a learned relation module scores pairs of class and query feature maps."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dg_meta.algorithm import EpisodicAlgorithm, Losses
from dg_meta.errors import UsageError
from dg_meta.hparams import HParam, choice, int_uniform, log_uniform, positive
from dg_meta.networks import Conv4
from dg_meta.registry import register_algorithm
from dg_meta.samplers import Episode

#: channels of the embedding's feature maps (the official ``CNNEncoder``'s 64, ``--feature_dim``)
FEATURE_DIM = 64


def relation_init(module: nn.Module) -> None:
    """The official ``weights_init``: convolutions ``N(0, 2 / (k_h k_w C_out))`` with zero bias, linear layers
    ``N(0, 0.01^2)`` with bias one (batch norm keeps PyTorch's default, the official weight 1 and bias 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.ones_(m.bias)


class RelationModule(nn.Module):
    """``g``: two blocks of conv3x3 (``2C -> C``, then ``C -> C``, padding ``padding``), batch norm, ReLU and 2x2
    max-pool on a concatenated pair of ``C x h x w`` feature maps, then ``fc1`` (``hidden`` units, ReLU) and ``fc2``
    (one unit, sigmoid): one relation score in ``(0, 1)`` per pair."""

    def __init__(self, map_shape: tuple[int, int, int], hidden: int, padding: int):
        super().__init__()
        channels, h, w = map_shape
        layers: list[nn.Module] = []
        for c_in in (2 * channels, channels):
            layers += [nn.Conv2d(c_in, channels, 3, padding=padding), nn.BatchNorm2d(channels), nn.ReLU(),
                       nn.MaxPool2d(2)]
            h, w = (h + 2 * padding - 2) // 2, (w + 2 * padding - 2) // 2
        if h < 1 or w < 1:
            hint = " or relation_padding 1" if padding == 0 else ""
            raise UsageError(f"RelationNet: the relation module (relation_padding {padding}) reduces the embedding's "
                             f"{map_shape[1]}x{map_shape[2]} feature maps to nothing: use larger images{hint}")
        self.blocks = nn.Sequential(*layers)
        self.fc1 = nn.Linear(channels * h * w, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, pairs: Tensor) -> Tensor:
        return torch.sigmoid(self.fc2(F.relu(self.fc1(self.blocks(pairs).flatten(1))))).squeeze(1)


@register_algorithm
class RelationNet(EpisodicAlgorithm):
    """Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales, CVPR 2018, "Learning to Compare").

    As the official code (github.com/floodsung/LearningToCompare_FSL, ``omniglot/omniglot_train_few_shot.py``,
    ``miniimagenet/miniimagenet_train_few_shot.py`` and their ``*_one_shot.py`` twins):

    - Embedding ``f`` (``CNNEncoder``): four blocks of conv3x3-64, batch norm, ReLU; only the first two end in a
      2x2 max-pool, so ``f(x)`` is a ``64 x h x w`` feature map (``Conv4(pool_blocks=2)``).
    - Class feature map ``F_n = sum_{i: y_i = n} f(x_i)``, the sum (not the mean) over the class's support
      (``torch.sum(sample_features, 1)``; 1-shot: the one map).
    - Relation score ``r_{q,n} = g([F_n, f(x_q)])``, ``g`` the ``RelationModule`` (``RelationNetwork``) on the
      channel concatenation, class map first; the prediction is ``argmax_n r_{q,n}``.
    - Loss ``sum_{q,n} (r_{q,n} - 1[y_q = n])^2 / (Q N)`` (``nn.MSELoss`` to the one-hot labels), averaged over the
      meta-batch; support and query are embedded in separate forward passes (two batch-norm batches).
    - Update: the gradient's 2-norm is clipped to ``max_grad_norm`` separately for ``f`` and for ``g``
      (``clip_grad_norm(..., 0.5)`` on each), then Adam (lr 1e-3, no weight decay) steps (one optimizer over both
      networks: the official one per network with the same settings is the same update); the learning rate
      of step ``t`` (from 0) is ``lr * lr_gamma ** (t // lr_step)`` (``StepLR(step_size=100000, gamma=0.5)``
      stepped with the episode index before it). One episode per step.
    - Initialisation: ``relation_init`` (the official ``weights_init``) on ``f`` and ``g``.

    Defaults: lr 1e-3 (``--learning_rate``), ``relation_dim`` 8 (``--relation_dim``: ``fc1``'s units),
    ``relation_padding`` 1 (the Omniglot scripts' ``RelationNetwork``; the miniImageNet scripts pad 0, which our
    21x21 maps of 84x84 images take to the official 3x3 before ``fc1``), 15 queries per class (``-b 15``: the
    Omniglot 5-shot and miniImageNet 1-shot commands of the README; Omniglot 1-shot uses 19, miniImageNet 5-shot
    10). Departures: (1) the embedding's first two convolutions are padded (official: ``padding=0``) as in the
    library's Conv-4, so 16x16 images (RotatedDigits) keep 4x4 maps the relation module can pool twice; on
    28x28 Omniglot the maps are 7x7 (official 5x5), and both reach 1x1 before ``fc1``; (2) batch norm uses
    PyTorch's momentum 0.1 and evaluation runs in eval mode on its running averages (official: momentum 1 and
    no ``.eval()``, so evaluation normalises with each test batch's own statistics); (3) no rotation
    augmentation of Omniglot episodes (the official scripts rotate each episode by a random multiple of 90
    degrees).
    """

    HPARAMS = {
        "lr": HParam(1e-3, log_uniform(-4, -2.5), positive, "positive", "Adam learning rate"),
        "lr_step": HParam(100000, choice([50000, 100000]), positive, "a positive integer",
                          "multiply the learning rate by lr_gamma every this many steps"),
        "lr_gamma": HParam(0.5, choice([0.1, 0.5]), lambda v: 0 < v <= 1, "in (0, 1]", "step decay factor"),
        "max_grad_norm": HParam(0.5, choice([0.5, 1.0, 5.0]), positive, "positive",
                                "clip the embedding's and the relation module's gradient 2-norms to this"),
        "relation_dim": HParam(8, choice([8, 16]), positive, "a positive integer",
                               "hidden units of the relation module's first fully connected layer"),
        "relation_padding": HParam(1, None, lambda v: v in (0, 1), "0 or 1",
                                   "padding of the relation module's convolutions (Omniglot 1, miniImageNet 0)"),
        "n_query": HParam(15, int_uniform(5, 19), positive, "a positive integer", "queries per class"),
        "meta_batch_size": HParam(1, None, positive, "a positive integer", "episodes per step"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer = Conv4(self.input_shape, hidden=FEATURE_DIM, pool_blocks=2)
        self.map_shape = (FEATURE_DIM, self.input_shape[1] // 4, self.input_shape[2] // 4)
        self.relation = RelationModule(self.map_shape, hparams["relation_dim"], hparams["relation_padding"])
        relation_init(self)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.optimizer = torch.optim.Adam(self.parameters(), lr=hparams["lr"], weight_decay=hparams["weight_decay"])

    def class_maps(self, support_z: Tensor, support_y: Tensor, n_way: int) -> Tensor:
        """``F_n``: the sum of the support feature maps of each class, ``[n_way, C, h, w]``."""
        one_hot = F.one_hot(support_y, n_way).to(support_z.dtype)
        return (one_hot.t() @ support_z).view(n_way, *self.map_shape)

    def episode_logits(self, support_z: Tensor, support_y: Tensor, query_z: Tensor, n_way: int) -> Tensor:
        """Relation scores ``r[q, n] = g([F_n, f(x_q)])`` from flattened support and query embeddings."""
        classes = self.class_maps(support_z, support_y, n_way)
        queries = query_z.view(len(query_z), *self.map_shape)
        pairs = torch.cat([classes.unsqueeze(0).expand(len(queries), -1, -1, -1, -1),
                           queries.unsqueeze(1).expand(-1, n_way, -1, -1, -1)], dim=2)
        return self.relation(pairs.flatten(0, 1)).view(len(queries), n_way)

    def episode_loss(self, episode: Episode) -> Tensor:
        """Mean squared error of the query relation scores to the one-hot labels."""
        scores = self.episode_logits(self.featurizer(episode.support_x), episode.support_y,
                                     self.featurizer(episode.query_x), episode.n_way)
        return F.mse_loss(scores, F.one_hot(episode.query_y, episode.n_way).to(scores.dtype))

    def set_learning_rate(self) -> None:
        """``StepLR``: ``lr * lr_gamma ** (t // lr_step)`` at step ``t`` (counted from 0)."""
        decays = int(self.steps_done) // self.hparams["lr_step"]
        for group in self.optimizer.param_groups:
            group["lr"] = self.hparams["lr"] * self.hparams["lr_gamma"] ** decays

    def update(self, batch: list[Episode]) -> Losses:
        self.set_learning_rate()
        loss = torch.stack([self.episode_loss(episode) for episode in batch]).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for part in (self.featurizer, self.relation):
            nn.utils.clip_grad_norm_(part.parameters(), self.hparams["max_grad_norm"])
        self.optimizer.step()
        self.steps_done += 1
        return {"loss": loss.detach()}
