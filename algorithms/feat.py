"""FEAT (Ye et al. 2020): ProtoNet whose prototypes are adapted to the episode by a set-to-set Transformer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from dg_meta.algorithms.protonet import ProtoNet
from torch import Tensor, nn

from dg_meta.algorithm import prototype_logits
from dg_meta.hparams import HParam, choice, int_uniform, log_uniform, non_negative, positive
from dg_meta.registry import register_algorithm
from dg_meta.samplers import Episode

#: the official ``ScaledDotProductAttention``'s ``attn_dropout`` and ``FEAT``'s ``MultiHeadAttention(dropout=0.5)``
ATTENTION_DROPOUT, OUTPUT_DROPOUT = 0.1, 0.5


class SetAttention(nn.Module):
    """One-head self-attention over a set with a residual connection and layer norm (the official
    ``MultiHeadAttention(1, d, d, d, dropout=0.5)``): for a set ``X`` (``[batch, n, d]``),
    ``A = softmax(X W_q (X W_k)^T / sqrt(d))`` (dropout 0.1 on ``A``), and the output is
    ``LayerNorm(X + dropout_0.5(fc(A X W_v)))``. ``W_q, W_k, W_v`` (no bias) are drawn from ``N(0, 2 / (d + d))``,
    ``fc``'s weight is Xavier-normal (its bias keeps PyTorch's default), as in the official initialisation."""

    def __init__(self, width: int):
        super().__init__()
        self.w_q, self.w_k, self.w_v = (nn.Linear(width, width, bias=False) for _ in range(3))
        for layer in (self.w_q, self.w_k, self.w_v):
            nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / (width + width)))
        self.fc = nn.Linear(width, width)
        nn.init.xavier_normal_(self.fc.weight)
        self.layer_norm = nn.LayerNorm(width)
        self.attention_dropout = nn.Dropout(ATTENTION_DROPOUT)
        self.dropout = nn.Dropout(OUTPUT_DROPOUT)

    def forward(self, x: Tensor) -> Tensor:
        scores = self.w_q(x) @ self.w_k(x).transpose(1, 2) / math.sqrt(x.shape[-1])
        attended = self.attention_dropout(torch.softmax(scores, dim=2)) @ self.w_v(x)
        return self.layer_norm(x + self.dropout(self.fc(attended)))


@register_algorithm
class FEAT(ProtoNet):
    """Few-shot Embedding Adaptation with Transformer (Ye, Hu, Zhan & Sha, CVPR 2020, "Few-Shot Learning via
    Embedding Adaptation with Set-to-Set Functions").

    As the official code (github.com/Sha-Lab/FEAT: ``model/models/feat.py``, ``model/trainer/fsl_trainer.py``,
    ``model/trainer/helpers.py``), with its Euclidean branch (``--use_euclidean``, the paper's distance):

    - Prototypes ``c_n = mean_{i: y_i = n} f(x_i)``, adapted as one set by the Transformer ``T`` (``SetAttention``,
      ``slf_attn(proto, proto, proto)``): ``(c'_1..c'_N) = T(c_1..c_N)``; no positional encoding, so permuting
      the classes permutes the adapted prototypes the same way.
    - Query logits ``-||f(x_q) - c'_n||^2 / temperature`` and their cross-entropy ``CE``.
    - Contrastive regulariser: for each class ``n`` the set ``S_n`` of its support and query embeddings is
      adapted alone, ``T(S_n)``; its mean is the centre ``m_n``; every un-adapted embedding ``f(x)`` of support and
      query is classified by ``-||f(x) - m_n||^2 / temperature2`` (``logits_reg`` against ``label_aux``): ``REG``.
    - Loss ``CE + balance * REG`` (``total_loss``), one episode per step; support and query are embedded in one
      batch-norm batch (``encoder(x)`` on the whole episode).
    - Update: Adam without weight decay, the featurizer at ``lr`` and the Transformer at ``lr * lr_mul``
      (``prepare_optimizer``'s two parameter groups); both halve every ``lr_halve_every`` steps (``StepLR``,
      ``step_size`` 20 epochs of ``episodes_per_epoch`` 100, ``gamma`` 0.5: 2000 episodes).
    - Initialisation: the paper starts from a pre-trained embedding (``--init_weights con-pre.pth``); here pass
      ``--init-from RUN_DIR`` with a ``FewShotPretrain`` run, whose ``featurizer.*`` weights are loaded.

    Defaults: the README's ConvNet 5-way 1-shot miniImageNet command: lr 1e-4, ``lr_mul`` 10, ``temperature``
    64, ``temperature2`` 16, ``balance`` 1, ``step_size`` 20 with ``gamma`` 0.5, 15 queries (the 5-shot command
    uses ``balance`` 0.1, ``temperature`` 32, ``temperature2`` 64). Evaluation (``adapt``) uses the query logits
    only, in eval mode (no dropout). Departures: on 84x84 images the library's Conv-4 flattens its 5x5x64 maps
    (1600 features) where the official ``ConvNet`` max-pools them to 64 (inputs of 16x16 to 31x31 leave 1x1 maps,
    so 64 features); ``backbone`` ``resnet12`` keeps these ConvNet settings (the official code trains ResNets with
    SGD, Nesterov momentum 0.9 and weight decay 5e-4); no data augmentation (the official default
    ``--augment`` is off too).
    """

    HPARAMS = {
        "lr": HParam(1e-4, log_uniform(-4.5, -3), positive, "positive", "Adam learning rate of the featurizer"),
        "lr_mul": HParam(10.0, choice([1.0, 10.0]), positive, "positive",
                         "the Transformer's learning rate is lr times this"),
        "temperature": HParam(64.0, choice([1.0, 16.0, 32.0, 64.0]), positive, "positive",
                              "the query logits' distances are divided by it"),
        "temperature2": HParam(16.0, choice([1.0, 16.0, 32.0, 64.0]), positive, "positive",
                               "the regulariser's distances are divided by it"),
        "balance": HParam(1.0, choice([0.0, 0.01, 0.1, 1.0]), non_negative, "non-negative",
                          "weight of the contrastive regulariser"),
        "n_query": HParam(15, int_uniform(5, 15), positive, "a positive integer", "queries per class"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.attention = SetAttention(self.featurizer.n_outputs)
        self.optimizer.add_param_group({"params": list(self.attention.parameters()),
                                        "lr": hparams["lr"] * hparams["lr_mul"]})

    def set_learning_rate(self) -> None:
        """ProtoNet's halving schedule for both groups, the Transformer's rate multiplied by ``lr_mul``."""
        super().set_learning_rate()
        self.optimizer.param_groups[1]["lr"] *= self.hparams["lr_mul"]

    def adapted_prototypes(self, support_z: Tensor, support_y: Tensor, n_way: int) -> Tensor:
        """``T(c_1..c_N)``: the class means of the support embeddings adapted as one set, ``[n_way, d]``."""
        one_hot = F.one_hot(support_y, n_way).to(support_z.dtype)
        means = one_hot.t() @ support_z / one_hot.sum(0).unsqueeze(1)
        return self.attention(means.unsqueeze(0)).squeeze(0)

    def episode_logits(self, support_z: Tensor, support_y: Tensor, query_z: Tensor, n_way: int) -> Tensor:
        """``-||f(x_q) - c'_n||^2 / temperature`` to the adapted prototypes."""
        prototypes = self.adapted_prototypes(support_z, support_y, n_way)
        classes = torch.arange(n_way, device=support_y.device)
        return prototype_logits(prototypes, classes, query_z, n_way) / self.hparams["temperature"]

    def regulariser(self, z: Tensor, y: Tensor, n_way: int) -> Tensor:
        """Cross-entropy of ``-||z_i - m_n||^2 / temperature2``, ``m_n`` the mean of ``T`` applied to class ``n``'s
        embeddings alone (every class has the same number of rows of ``z``)."""
        sets = z[torch.argsort(y, stable=True)].view(n_way, -1, z.shape[1])
        centres = self.attention(sets).mean(1)
        classes = torch.arange(n_way, device=y.device)
        return F.cross_entropy(prototype_logits(centres, classes, z, n_way) / self.hparams["temperature2"], y)

    def episode_loss(self, episode: Episode) -> dict[str, Tensor]:
        support_z, query_z = self.embed_episode(episode)
        ce = F.cross_entropy(self.episode_logits(support_z, episode.support_y, query_z, episode.n_way),
                             episode.query_y)
        reg = self.regulariser(torch.cat([support_z, query_z]), torch.cat([episode.support_y, episode.query_y]),
                               episode.n_way)
        return {"loss": ce + self.hparams["balance"] * reg, "ce": ce, "reg": reg}
