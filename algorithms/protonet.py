"""Prototypical Networks (Snell et al. 2017): nearest class mean in a learned embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dg_meta.algorithm import EpisodicAlgorithm, Losses, prototype_logits
from dg_meta.hparams import HParam, choice, int_uniform, non_negative, positive
from dg_meta.networks import fewshot_backbone
from dg_meta.registry import register_algorithm
from dg_meta.samplers import Episode

BACKBONE_HPARAM = HParam("conv4", choice(["conv4"]), lambda v: v in ("conv4", "resnet12"), "conv4 or resnet12",
                         "few-shot backbone (Conv-4, or ResNet-12 for 84x84 images)")


@register_algorithm
class ProtoNet(EpisodicAlgorithm):
    """Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

    Each class ``k`` of an episode is represented by the mean of its embedded support examples,
    ``c_k = (1/|S_k|) sum_{x in S_k} f(x)``; a query is classified by a softmax over negative squared
    Euclidean distances, ``p(y=k|x) = softmax_k(-||f(x) - c_k||^2)``, and ``f`` (Conv-4) is trained by
    minimising the query cross-entropy, one episode per step. Defaults from the paper's Omniglot setting
    (section 3.1): Adam, lr 1e-3 halved every 2000 episodes, 5 queries per class; the paper trains 1-shot
    with more ways (60) than it tests (``--hparams '{"n_way": 60}'`` where a domain has that many classes).
    """

    HPARAMS = {
        "lr": HParam(1e-3, None, positive, "positive", "Adam learning rate"),
        "lr_halve_every": HParam(2000, int_uniform(1000, 4000), non_negative, "non-negative",
                                 "halve the learning rate every this many steps (0: never)"),
        "n_query": HParam(5, int_uniform(5, 15), positive, "a positive integer", "queries per class"),
        "meta_batch_size": HParam(1, None, positive, "a positive integer", "episodes per step"),
        "backbone": BACKBONE_HPARAM,
    }
    data_parallel = "exact"  # the mean over episodes of query losses; batch norm within one episode

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer = fewshot_backbone(hparams["backbone"], self.input_shape)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.optimizer = torch.optim.Adam(self.featurizer.parameters(), lr=hparams["lr"],
                                          weight_decay=hparams["weight_decay"])

    def episode_logits(self, support_z: Tensor, support_y: Tensor, query_z: Tensor, n_way: int) -> Tensor:
        """Query logits from embedded support and query: ``-||z_q - c_k||^2``."""
        return prototype_logits(support_z, support_y, query_z, n_way)

    def embed_episode(self, episode: Episode) -> tuple[Tensor, Tensor]:
        """Support and query embeddings from one forward pass (shared batch statistics)."""
        z = self.featurizer(torch.cat([episode.support_x, episode.query_x]))
        return z[: len(episode.support_x)], z[len(episode.support_x):]

    def episode_loss(self, episode: Episode) -> dict[str, Tensor]:
        """The losses of one episode; ``loss`` is minimised."""
        support_z, query_z = self.embed_episode(episode)
        logits = self.episode_logits(support_z, episode.support_y, query_z, episode.n_way)
        return {"loss": F.cross_entropy(logits, episode.query_y)}

    def set_learning_rate(self) -> None:
        every = self.hparams["lr_halve_every"]
        halvings = int(self.steps_done) // every if every else 0
        for group in self.optimizer.param_groups:
            group["lr"] = self.hparams["lr"] * 0.5 ** halvings

    def update(self, batch: list[Episode]) -> Losses:
        self.set_learning_rate()
        parts = [self.episode_loss(episode) for episode in batch]
        losses = {k: torch.stack([p[k] for p in parts]).mean() for k in parts[0]}
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        self.steps_done += 1
        return {k: v.detach() for k, v in losses.items()}
