"""Matching Networks (Vinyals et al. 2016): cosine attention over the support set, optional full context
embeddings (FCE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dg_meta.algorithm import EpisodicAlgorithm, Losses
from dg_meta.hparams import HParam, choice, int_uniform, positive
from dg_meta.networks import fewshot_backbone
from dg_meta.registry import register_algorithm
from dg_meta.samplers import Episode


def matching_logits(query_z: Tensor, support_z: Tensor, support_y: Tensor, n_way: int) -> Tensor:
    """``log P(y=k|x) = log sum_{i: y_i=k} a(x, x_i)`` with ``a = softmax_i(cos(f(x), g(x_i)))``."""
    cosine = F.normalize(query_z, dim=1) @ F.normalize(support_z, dim=1).t()
    in_class = F.one_hot(support_y, n_way).t().bool()
    per_class = cosine.unsqueeze(1).masked_fill(~in_class.unsqueeze(0), float("-inf"))
    return per_class.logsumexp(2) - cosine.logsumexp(1, keepdim=True)


class AttentionLSTMCell(nn.Module):
    """One step of the paper's ``LSTM(x, h, c)`` with input ``x = f'(x)`` (width ``d``), previous output
    ``h = [h_{k-1}, r_{k-1}]`` (width ``2d``: the read-out concatenated, appendix A.1) and cell ``c`` (width
    ``d``): gates ``i, f, g, o`` from ``W_x x + b + W_h h``, ``c' = sigmoid(f) c + sigmoid(i) tanh(g)``,
    output ``sigmoid(o) tanh(c')`` (width ``d``, so that ``h^_k + f'(x)`` of Eq. 4 is defined)."""

    def __init__(self, width: int):
        super().__init__()
        self.input_map = nn.Linear(width, 4 * width)
        self.recurrent_map = nn.Linear(2 * width, 4 * width, bias=False)

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        i, f, g, o = (self.input_map(x) + self.recurrent_map(h)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class FullContextEmbedding(nn.Module):
    """Vinyals et al.'s full context embeddings of width ``d`` (the paper's appendix A).

    Support (A.2): ``g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i)``, the two directions of a bidirectional LSTM
    (hidden width ``d``, zero initial states) over the support sequence in episode order. Query (A.1,
    Eqs. 3-6): ``K`` steps of the attention LSTM, ``h^_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1})``,
    ``h_k = h^_k + f'(x)``, ``r_{k-1} = sum_i a(h_{k-1}, g(x_i)) g(x_i)`` with
    ``a = softmax_i(h_{k-1} . g(x_i))``, and ``f(x, S) = h_K``. The paper leaves the initial state open;
    here ``h^_0 = 0`` and ``c_0 = 0``, so ``h_0 = f'(x)`` by Eq. 4 (as in oscarknagg/few-shot's
    ``AttentionLSTM``, which however sums ``h + r`` where the paper concatenates).
    """

    def __init__(self, width: int, steps: int):
        super().__init__()
        self.support_lstm = nn.LSTM(width, width, bidirectional=True, batch_first=True)
        self.query_cell = AttentionLSTMCell(width)
        self.width, self.steps = width, steps

    def support(self, z: Tensor) -> Tensor:
        """``g(x_i, S)`` for the embedded support sequence ``z`` ([n, d])."""
        out, _ = self.support_lstm(z.unsqueeze(0))
        out = out.squeeze(0)
        return z + out[:, : self.width] + out[:, self.width:]

    def query(self, z: Tensor, g: Tensor) -> Tensor:
        """``f(x, S) = h_K`` for the embedded queries ``z`` ([m, d]) given the support's ``g`` ([n, d])."""
        h, c = z, torch.zeros_like(z)
        for _ in range(self.steps):
            readout = torch.softmax(h @ g.t(), dim=1) @ g
            h_hat, c = self.query_cell(z, torch.cat([h, readout], 1), c)
            h = h_hat + z
        return h


@register_algorithm
class MatchingNet(EpisodicAlgorithm):
    """Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, NeurIPS 2016).

    A query ``x`` is labelled by attention over the support set, ``P(y|x, S) = sum_i a(x, x_i) y_i`` with
    ``a(x, x_i) = softmax_i(c(f(x), g(x_i)))`` and ``c`` the cosine similarity, no temperature (section 2.1.1,
    Eqs. 1-2); the embeddings are trained end to end to maximise ``log P(y|x, S)`` of the queries over
    episodes (section 2.2). ``f = g`` is the Conv-4 embedding (64-filter 3x3 conv, batch norm, ReLU, 2x2
    max-pool, four times: section 4.1). With ``fce`` they become the full context embeddings of
    ``FullContextEmbedding`` (section 2.1.2, appendix A), with ``fce_steps`` read steps ``K``. The paper's
    Omniglot results (Table 1) are without FCE and its miniImageNet table (Table 2) reports both; ``fce`` is
    off by default. Ours, not the paper's: Adam with lr 1e-3, one episode per step, ``K = 5`` (the paper
    gives no value), support and query embedded in one batch-norm batch in training.
    """

    HPARAMS = {
        "lr": HParam(1e-3, None, positive, "positive", "Adam learning rate"),
        "fce": HParam(False, choice([False, True]), doc="full context embeddings (LSTMs over the support set)"),
        "fce_steps": HParam(5, int_uniform(1, 10), positive, "a positive integer",
                            "processing steps K of the query attention LSTM"),
        "meta_batch_size": HParam(1, None, positive, "a positive integer", "episodes per step"),
        "backbone": HParam("conv4", choice(["conv4"]), lambda v: v in ("conv4", "resnet12"), "conv4 or resnet12",
                           "few-shot backbone (Conv-4, or ResNet-12 for 84x84 images)"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer = fewshot_backbone(hparams["backbone"], self.input_shape)
        self.fce = FullContextEmbedding(self.featurizer.n_outputs, hparams["fce_steps"]) if hparams["fce"] else None
        self.optimizer = torch.optim.Adam(self.parameters(), lr=hparams["lr"], weight_decay=hparams["weight_decay"])

    def episode_logits(self, support_z: Tensor, support_y: Tensor, query_z: Tensor, n_way: int) -> Tensor:
        """Log class probabilities of the queries from the (context-free) embeddings."""
        if self.fce is not None:
            support_z = self.fce.support(support_z)
            query_z = self.fce.query(query_z, support_z)
        return matching_logits(query_z, support_z, support_y, n_way)

    data_parallel = "exact"  # the mean over episodes of query losses; FCE and batch norm within one episode

    def update(self, batch: list[Episode]) -> Losses:
        losses = []
        for episode in batch:
            z = self.featurizer(torch.cat([episode.support_x, episode.query_x]))
            n = len(episode.support_x)
            logits = self.episode_logits(z[:n], episode.support_y, z[n:], episode.n_way)
            losses.append(F.nll_loss(logits, episode.query_y))
        loss = torch.stack(losses).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}
