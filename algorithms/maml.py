"""MAML and first-order MAML (``first_order``): a meta-learned initialisation adapted by gradient steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dg_meta.algorithm import EpisodicAlgorithm, Losses
from dg_meta.batched_tasks import (
    ENGINES,
    batched_inner_loop,
    batched_predictor,
    batched_query_losses,
    folded_copy,
    resolve_engine,
    stack_params,
)
from dg_meta.errors import UsageError
from dg_meta.functional import (
    InnerLR,
    Params,
    functional_forward,
    inner_loop,
    parameters_of,
    task_query_loss,
    vmap_network,
    vmap_query_losses,
)
from dg_meta.hparams import HParam, choice, log_uniform, positive
from dg_meta.networks import Conv4
from dg_meta.registry import register_algorithm
from dg_meta.samplers import Episode, stack_episodes
from dg_meta.task_threads import sum_in_order, threads_for

ENGINE_HPARAM = HParam(
    "auto", choice(["auto"]), lambda v: v in ENGINES, "one of " + ", ".join(ENGINES),
    "how the tasks of a meta-batch are computed (speed and rounding only, not the method): loop (one task after "
    "another, the reference), threads (the loop on parallel CPU threads, dg_meta.task_threads), batched (all "
    "tasks folded into one computation, dg_meta.batched_tasks), vmap (torch.func.vmap); auto = batched on CUDA, "
    "threads on the CPU")


@register_algorithm
class MAML(EpisodicAlgorithm):
    """Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017).

    For each task i of a meta-batch, ``phi_i = theta - alpha grad_theta L_support_i(theta)`` (``inner_steps``
    such steps), and the meta-update is ``theta <- Adam(theta, grad_theta (1/B) sum_i L_query_i(phi_i))``.
    ``first_order`` drops the second-order term (FOMAML: the inner gradients are treated as constants).
    The network is ``Conv4`` with ``BatchNorm(track_running_stats=False)`` (transductive batch statistics
    in training and evaluation, no running averages, as in MAML; max-pooling where the paper's Omniglot
    network used strided convolutions) and an ``n_way`` linear head. Defaults
    are the 5-way Omniglot ones of the usage command atop the official ``main.py`` (github.com/cbfinn/maml:
    ``--update_lr=0.4 --num_updates=1 --meta_batch_size=32``) and its ``meta_lr`` default (1e-3, Adam); three
    inner steps at test time are ours (that ``main.py`` tests Omniglot with ``test_num_updates = 10``).
    ``engine`` chooses how the meta-batch is computed (same meta-gradient: ``tests/test_batched_tasks.py``);
    evaluation adapts to many test episodes at once through the same engine (``adapt_episodes``).
    """

    HPARAMS: ClassVar[dict[str, HParam]] = {
        "meta_batch_size": HParam(32, choice([4, 8, 16, 32]), positive, "a positive integer", "tasks per step"),
        "inner_lr": HParam(0.4, log_uniform(-2, 0), positive, "positive", "inner-loop SGD step size alpha"),
        "inner_steps": HParam(1, choice([1, 2, 3, 5]), positive, "a positive integer",
                              "inner SGD steps in meta-training"),
        "inner_steps_test": HParam(3, choice([3, 5, 10]), positive, "a positive integer",
                                   "inner SGD steps when adapting at evaluation"),
        "first_order": HParam(False, doc="FOMAML: no backpropagation through the inner gradients"),
        "engine": ENGINE_HPARAM,
    }
    data_parallel = "exact"  # the mean over tasks of query losses (first or second order); batch norm per task

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer = Conv4(self.input_shape, track_running_stats=False)
        self.classifier = self.build_head(self.featurizer.n_outputs, hparams["n_way"])
        self.network = nn.Sequential(self.featurizer, self.classifier)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=hparams["lr"],
                                          weight_decay=hparams["weight_decay"])

    def build_head(self, n_features: int, n_way: int) -> nn.Module:
        return nn.Linear(n_features, n_way)

    def initial_params(self, n_way: int) -> Params:
        """The parameters every task's inner loop starts from (the meta-parameters theta)."""
        if n_way != self.classifier.out_features:
            raise UsageError(f"{type(self).__name__}'s head has n_way={self.classifier.out_features} outputs but "
                             f"the episode has {n_way} classes: set --fs-way to n_way or hparam n_way to {n_way}")
        return parameters_of(self.network)

    def inner_lrs(self) -> InnerLR:
        """The inner loop's step size: one number, or one per adapted parameter name (ANIL and BOIL adapt a
        subset, Meta-SGD learns a rate per weight)."""
        return self.hparams["inner_lr"]

    def _test_lrs(self) -> InnerLR:
        lrs = self.inner_lrs()
        return {k: v.detach() if isinstance(v, Tensor) else v for k, v in lrs.items()} if isinstance(lrs, dict) else lrs

    def query_logits(self, logits: Tensor) -> Tensor:
        """The network's outputs on query examples as the outer loss and predictions see them."""
        return logits

    def outer_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(self.query_logits(logits), y)

    def engine(self) -> str:
        """The task engine this step uses (hparam ``engine`` resolved for the parameters' device)."""
        return resolve_engine(self.hparams["engine"], next(self.parameters()).device)

    def update(self, episodes: list[Episode]) -> Losses:
        hp = self.hparams
        self.optimizer.zero_grad(set_to_none=True)
        common = {"steps": hp["inner_steps"], "lr": self.inner_lrs(), "first_order": hp["first_order"],
                  "outer_loss": self.outer_loss}
        engine, n = self.engine(), len(episodes)
        if engine in ("batched", "vmap"):
            tasks = stack_episodes(episodes)
            if engine == "batched":
                losses = batched_query_losses(folded_copy(self.network), self.initial_params(episodes[0].n_way),
                                              tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y, **common)
            else:
                losses = vmap_query_losses(vmap_network(self.network), self.initial_params(episodes[0].n_way),
                                           tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y, **common)
            loss = losses.mean()
            loss.backward()
        elif engine == "threads":
            leaves = [p for p in self.parameters() if p.requires_grad]

            def task_gradient(network: nn.Module, e: Episode) -> list[Tensor | None]:
                task_loss = task_query_loss(network, self.initial_params(e.n_way), e.support_x, e.support_y,
                                            e.query_x, e.query_y, **common) / n
                return [task_loss.detach(), *torch.autograd.grad(task_loss, leaves, allow_unused=True)]

            loss, *grads = sum_in_order(threads_for(self.network).map(task_gradient, episodes))
            for p, g in zip(leaves, grads):
                p.grad = g
        else:
            loss = 0.0
            for e in episodes:
                task_loss = task_query_loss(self.network, self.initial_params(e.n_way), e.support_x, e.support_y,
                                            e.query_x, e.query_y, **common) / n
                task_loss.backward()
                loss = loss + task_loss.detach()
        self.optimizer.step()
        return {"loss": loss.detach()}

    def adapted_params(self, network: nn.Module, support_x: Tensor, support_y: Tensor) -> Params:
        """``inner_steps_test`` SGD steps from theta on one support set through ``network`` (detached)."""
        n_way = int(support_y.max()) + 1
        with torch.enable_grad():
            params = {k: v.detach().requires_grad_() for k, v in self.initial_params(n_way).items()}
            fast = inner_loop(network, params, lambda out: F.cross_entropy(out, support_y), support_x,
                              self.hparams["inner_steps_test"], self._test_lrs(), create_graph=False)
        return {k: v.detach() for k, v in fast.items()}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        """``inner_steps_test`` SGD steps from theta on the support set (first order: nothing to backprop)."""
        fast = self.adapted_params(self.network, support_x, support_y)

        def predict_query(query_x: Tensor) -> Tensor:
            with torch.no_grad():
                return self.query_logits(functional_forward(self.network, fast, query_x))

        return predict_query

    def adapt_episodes(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        """``adapt`` for E stacked episodes at once through the task engine."""
        engine = self.engine()
        if engine == "batched":
            n_way = int(support_y.max()) + 1
            with torch.enable_grad():
                theta = {k: v.detach().requires_grad_() for k, v in self.initial_params(n_way).items()}
                fast = batched_inner_loop(folded_copy(self.network), stack_params(theta, len(support_x)),
                                          F.cross_entropy, support_x, support_y, self.hparams["inner_steps_test"],
                                          self._test_lrs(), create_graph=False)
            return batched_predictor(folded_copy(self.network), fast, self.query_logits)
        if engine == "threads":
            fasts = threads_for(self.network).map(lambda network, s: self.adapted_params(network, *s),
                                            list(zip(support_x, support_y)))

            def predict_queries(query_x: Tensor) -> Tensor:
                with torch.no_grad():
                    return torch.stack([self.query_logits(functional_forward(self.network, fast, qx))
                                        for fast, qx in zip(fasts, query_x)])

            return predict_queries
        return super().adapt_episodes(support_x, support_y)
