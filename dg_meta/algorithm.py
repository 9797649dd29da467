"""The ``Algorithm`` interface every registered method implements, and its shared hparams.

One training loop (``dg_meta.train``) serves every algorithm: it asks the sampler named by
``batch_kind`` for a batch and calls ``update``. ``"domains"`` batches are ``[(x_d, y_d)]``, one
minibatch per training domain in training-domain order; ``"episodes"`` batches are a list of
``Episode`` (a meta-batch). ``predict`` gives logits over all classes; ``adapt`` turns an episode's
support set into a predictor, by default a prototype classifier on the algorithm's frozen features, so
every algorithm is scored on the same few-shot episodes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dg_meta.hparams import HParam, choice, int_uniform, log_uniform, non_negative, positive

Batch = Any
Losses = dict[str, Tensor | float]


def prototype_logits(support_z: Tensor, support_y: Tensor, query_z: Tensor, n_way: int) -> Tensor:
    """Negative squared Euclidean distances from ``query_z`` to the class means of ``support_z``."""
    one_hot = nn.functional.one_hot(support_y, n_way).to(support_z.dtype)
    prototypes = one_hot.t() @ support_z / one_hot.sum(0).unsqueeze(1)
    return -torch.cdist(query_z, prototypes).pow(2)


class Algorithm(nn.Module):
    """Base class: subclasses set ``HPARAMS`` and implement ``update`` and ``predict`` (or ``adapt``)."""

    HPARAMS: ClassVar[dict[str, HParam]] = {
        "lr": HParam(1e-3, log_uniform(-4.5, -2.5), positive, "positive", "learning rate"),
        "weight_decay": HParam(0.0, log_uniform(-6, -2), non_negative, "non-negative", "L2 penalty"),
        "nonlinear_classifier": HParam(False, choice([False, True]), doc="MLP head instead of linear"),
    }
    batch_kind: ClassVar[str] = "domains"
    predicts_classes: ClassVar[bool] = True
    #: submodules that ``--compile`` wraps with ``torch.compile`` (in place: checkpoints are unchanged); empty
    #: means ``--compile`` is refused: the algorithm differentiates through them twice (torch.compile has no
    #: double backward) or has not been checked under compilation
    compile_modules: ClassVar[tuple[str, ...]] = ()
    #: image models of DG algorithms train in the channels_last (NHWC) memory format (``use_fast_layout``): the
    #: same results to rounding, and on the 2-core CPU a DomainBed ERM step took 0.82 s against 1.05 s
    #: (docs/benchmarks.md, training speed); meta-learners keep the default layout (Conv-4 task loops were not
    #: faster in NHWC, measured with bench/maml_speed.py's models)
    channels_last: ClassVar[bool] = True
    #: how a run on several processes (``dg_meta.distributed``) computes what one process would: ``"exact"``
    #: (a loss that is a mean of per-example, or per-task, terms: shards' gradients averaged), ``"gather"``
    #: (terms coupling the examples of a minibatch computed on all of it through ``distributed.gather_rows``),
    #: or None: refused with one line. Read from the class itself, never inherited: a subclass changes the loss
    data_parallel: ClassVar[str | None] = None

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, num_domains: int, hparams: dict):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.num_domains = num_domains
        self.hparams = dict(hparams)

    def use_fast_layout(self) -> Algorithm:
        """Put the parameters in the channels_last memory format when the algorithm asks for it and its inputs
        are images (``[C, H, W]``); convolutions then run in NHWC (their outputs follow their weights' layout)."""
        if self.channels_last and len(self.input_shape) == 3:
            self.to(memory_format=torch.channels_last)
        return self

    def update(self, batch: Batch) -> Losses:
        """One training step on ``batch``; returns the losses (tensors are fine: no host sync needed)."""
        raise NotImplementedError

    def predict(self, x: Tensor) -> Tensor:
        """Logits over all ``num_classes`` classes."""
        raise NotImplementedError

    def embed(self, x: Tensor) -> Tensor:
        """Features used by the default ``adapt``: ``self.featurizer(x)``."""
        return self.featurizer(x)

    def episode_logits(self, support_z: Tensor, support_y: Tensor, query_z: Tensor, n_way: int) -> Tensor:
        """Query logits from embedded support and queries; default: prototypes (negative squared distances)."""
        return prototype_logits(support_z, support_y, query_z, n_way)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        """A predictor for one episode: ``episode_logits`` on the frozen features (``embed``) of the support."""
        n_way = int(support_y.max()) + 1
        with torch.no_grad():
            support_z = self.embed(support_x)

        def predict_query(query_x: Tensor) -> Tensor:
            with torch.no_grad():
                return self.episode_logits(support_z, support_y, self.embed(query_x), n_way)

        return predict_query

    def adapt_episodes(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        """Predictors for E same-shape episodes at once: stacked supports ``[E, S, ...]`` / ``[E, S]`` -> a
        function of the stacked queries ``[E, M, ...]`` giving logits ``[E, M, K]``. The default adapts to
        each episode with ``adapt``; the MAML family overrides it with its task engine."""
        predictors = [self.adapt(sx, sy) for sx, sy in zip(support_x, support_y)]

        def predict_queries(query_x: Tensor) -> Tensor:
            return torch.stack([predict(qx) for predict, qx in zip(predictors, query_x)])

        return predict_queries

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimizer held as an attribute, by attribute name (saved in checkpoints)."""
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.optim.Optimizer)}

    def data_parallel_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers whose gradients are averaged over the processes before each step (default: every one
        held); an algorithm whose outer step is not an optimizer step (Reptile) returns none and averages
        itself."""
        return self.optimizers()

    def data_parallel_refusal(self) -> str | None:
        """Why these hparams keep this (data-parallel) algorithm on one process, or None (the default)."""
        return None

    def checkpoint_state(self) -> dict:
        return {"model": self.state_dict(),
                "optimizers": {k: opt.state_dict() for k, opt in self.optimizers().items()}}

    def load_checkpoint_state(self, state: dict) -> None:
        self.load_state_dict(state["model"])
        for name, opt in self.optimizers().items():
            opt.load_state_dict(state["optimizers"][name])


class EpisodicAlgorithm(Algorithm):
    """Base class of the meta-learners: trained on meta-batches of N-way K-shot Q-query episodes."""

    HPARAMS: ClassVar[dict[str, HParam]] = {
        "n_way": HParam(5, choice([5, 10, 20]), positive, "a positive integer", "classes per episode"),
        "k_shot": HParam(1, choice([1, 5]), positive, "a positive integer", "support examples per class"),
        "n_query": HParam(15, int_uniform(5, 15), positive, "a positive integer", "queries per class"),
        "meta_batch_size": HParam(4, choice([2, 4, 8]), positive, "a positive integer", "tasks per step"),
    }
    batch_kind: ClassVar[str] = "episodes"
    predicts_classes: ClassVar[bool] = False
    channels_last: ClassVar[bool] = False

    def set_training_classes(self, cells: list[Any]) -> None:
        """Called once by the trainer with the training ``samplers.Cell``s (every (domain, class) of the
        training split); meta-learners that need whole classes (LastShot's teacher) keep them."""
