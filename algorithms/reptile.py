"""Reptile: move the initialisation towards the weights that plain training reaches on each task."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dg_meta.algorithm import EpisodicAlgorithm, Losses
from dg_meta.errors import UsageError
from dg_meta.functional import interpolate_
from dg_meta.hparams import HParam, choice, int_uniform, log_uniform, non_negative, positive
from dg_meta.networks import Conv4
from dg_meta.registry import register_algorithm
from dg_meta.samplers import Episode

INNER_OPTIMIZERS = ("adam", "sgd")


def minibatch_indices(n: int, batch_size: int, steps: int) -> list[Tensor]:
    """``steps`` minibatches of ``min(batch_size, n)`` indices into ``n`` examples, drawn from a stream of
    concatenated random permutations (each example once per pass; global torch RNG), as the official
    ``_mini_batches`` (``supervised_reptile/reptile.py``) cuts its stream of reshuffles, except that a batch
    larger than the task is capped at ``n`` where the official one fills it from the next reshuffles, with
    repeats (of the README's commands only transductive 1-shot Omniglot asks for one: eval batch 25 from 5)."""
    size = min(batch_size, n)
    passes = -(-size * steps // n)
    stream = torch.cat([torch.randperm(n) for _ in range(passes)])
    return [stream[i * size:(i + 1) * size] for i in range(steps)]


@register_algorithm
class Reptile(EpisodicAlgorithm):
    """Reptile (Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018).

    For each task i of a meta-batch of B, train a copy of the network from theta with ``inner_steps``
    minibatch steps of the inner optimizer on the task's examples, reaching ``phi_i``; then
    ``theta <- theta + eps_t ((1/B) sum_i phi_i - theta)`` with ``eps_t`` annealed linearly from
    ``outer_lr`` to ``outer_lr_final`` over ``anneal_steps`` meta-steps. Training uses all the examples of an
    episode (support and query: ``k_shot + n_query`` = 10 per class, the paper's train shots). Defaults are
    the paper's appendix table of Omniglot hyperparameters (the comparison between algorithms): Adam with
    beta1 = 0 and lr 0.001, 5 inner steps of batch 10, meta-batch 5, eps 1.0 -> 0 over 100k steps, and at
    test time 50 steps of batch 5 on the support set. The official README's tuned per-setting commands
    differ (github.com/openai/supervised-reptile, e.g. 1-shot 5-way Omniglot: 12 inner steps of batch 5, lr
    4.4e-4, meta-batch 3, 200k steps, 86 test steps). As in the official ``supervised_reptile/reptile.py``
    (``Reptile.train_step`` restores only the model variables; ``Reptile.evaluate`` restores every variable
    afterwards), the inner Adam's moments persist across tasks, and test-time adaptation starts from them
    and leaves them untouched. Conv4 with transductive batch norm (``track_running_stats=False``).
    """

    HPARAMS: ClassVar[dict[str, HParam]] = {
        "lr": HParam(1e-3, log_uniform(-4, -2), positive, "positive", "inner-loop learning rate"),
        "n_query": HParam(9, int_uniform(4, 15), positive, "a positive integer",
                          "queries per class; training uses support and query (k_shot + n_query per class)"),
        "meta_batch_size": HParam(5, choice([1, 5, 10]), positive, "a positive integer", "tasks per step"),
        "inner_optimizer": HParam("adam", choice(list(INNER_OPTIMIZERS)), lambda v: v in INNER_OPTIMIZERS,
                                  "adam or sgd", "inner optimizer (adam has beta1 = 0)"),
        "inner_steps": HParam(5, choice([5, 10]), positive, "a positive integer", "inner minibatch steps"),
        "inner_batch_size": HParam(10, choice([5, 10]), positive, "a positive integer", "inner minibatch size"),
        "inner_steps_test": HParam(50, choice([50]), positive, "a positive integer",
                                   "inner steps when adapting at evaluation"),
        "inner_batch_size_test": HParam(5, choice([5]), positive, "a positive integer",
                                        "inner minibatch size when adapting at evaluation"),
        "outer_lr": HParam(1.0, choice([0.5, 1.0]), positive, "positive", "initial outer step size eps"),
        "outer_lr_final": HParam(0.0, choice([0.0]), non_negative, "non-negative", "final outer step size"),
        "anneal_steps": HParam(100000, choice([100000]), positive, "a positive integer",
                               "meta-steps over which eps is annealed linearly"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer = Conv4(self.input_shape, track_running_stats=False)
        self.classifier = nn.Linear(self.featurizer.n_outputs, hparams["n_way"])
        self.network = nn.Sequential(self.featurizer, self.classifier)
        self.fast = copy.deepcopy(self.network)
        self.inner_optimizer = self._inner_optimizer(self.fast)
        self.register_buffer("meta_step", torch.zeros((), dtype=torch.long))

    def _inner_optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        if self.hparams["inner_optimizer"] == "adam":
            return torch.optim.Adam(module.parameters(), lr=self.hparams["lr"], betas=(0.0, 0.999))
        return torch.optim.SGD(module.parameters(), lr=self.hparams["lr"])

    def outer_step_size(self) -> float:
        """``eps_t``: linear from ``outer_lr`` at meta-step 0 to ``outer_lr_final`` at ``anneal_steps``."""
        hp = self.hparams
        done = min(float(self.meta_step) / hp["anneal_steps"], 1.0)
        return (1 - done) * hp["outer_lr"] + done * hp["outer_lr_final"]

    def _check_way(self, n_way: int) -> None:
        if n_way != self.classifier.out_features:
            raise UsageError(f"Reptile's head has n_way={self.classifier.out_features} outputs but the episode "
                             f"has {n_way} classes: set --fs-way to n_way or hparam n_way to {n_way}")

    @staticmethod
    def _train(module: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, steps: int,
               batch_size: int) -> Tensor:
        """Minibatch training of ``module`` in place; returns the last minibatch loss (detached)."""
        loss = torch.zeros(())
        for idx in minibatch_indices(len(x), batch_size, steps):
            loss = F.cross_entropy(module(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return loss.detach()

    def update(self, episodes: list[Episode]) -> Losses:
        hp = self.hparams
        self._check_way(episodes[0].n_way)
        theta = [p.detach().clone() for p in self.network.parameters()]
        mean_phi = [torch.zeros_like(t) for t in theta]
        loss = 0.0
        for e in episodes:
            with torch.no_grad():
                for p, t in zip(self.fast.parameters(), theta):
                    p.copy_(t)
            x, y = torch.cat([e.support_x, e.query_x]), torch.cat([e.support_y, e.query_y])
            loss = loss + self._train(self.fast, self.inner_optimizer, x, y, hp["inner_steps"],
                                      hp["inner_batch_size"]) / len(episodes)
            for m, p in zip(mean_phi, self.fast.parameters()):
                m += p.detach() / len(episodes)
        eps = self.outer_step_size()
        interpolate_(self.network.parameters(), mean_phi, eps)
        self.meta_step += 1
        return {"loss": loss}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        """``inner_steps_test`` steps on the support set from theta, with a copy of the inner optimizer."""
        self._check_way(int(support_y.max()) + 1)
        model = copy.deepcopy(self.network)
        optimizer = self._inner_optimizer(model)
        optimizer.load_state_dict(copy.deepcopy(self.inner_optimizer.state_dict()))
        with torch.enable_grad():
            self._train(model, optimizer, support_x, support_y, self.hparams["inner_steps_test"],
                        self.hparams["inner_batch_size_test"])

        def predict_query(query_x: Tensor) -> Tensor:
            with torch.no_grad():
                return model(query_x)

        return predict_query
