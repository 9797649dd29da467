"""Reptile: move the initialisation towards the weights that plain training reaches on each task."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from dg_meta.algorithms.maml import ENGINE_HPARAM
from torch import Tensor, nn

from dg_meta import distributed
from dg_meta.algorithm import EpisodicAlgorithm, Losses
from dg_meta.batched_tasks import batched_forward, folded_copy, resolve_engine, stack_params, task_losses
from dg_meta.errors import UsageError
from dg_meta.functional import interpolate_, parameters_of, sgd_step
from dg_meta.hparams import HParam, choice, int_uniform, log_uniform, non_negative, positive
from dg_meta.networks import Conv4
from dg_meta.registry import register_algorithm
from dg_meta.samplers import Episode
from dg_meta.task_threads import threads_for

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

    ``engine`` (as MAML's): with the inner SGD the batched engine trains every task of a meta-batch at once
    (``dg_meta.batched_tasks``); the inner Adam's moments pass from task to task, so Adam meta-training stays a
    loop. Test-time adaptation leaves the moments untouched, so every engine but ``loop`` adapts to many test
    episodes at once (threads: one copy per episode on parallel threads; batched with SGD: one folded computation).
    The minibatches are drawn in the main thread in the loop's order: every engine trains on the same batches.
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
        "engine": ENGINE_HPARAM,
    }

    #: the mean of the tasks' adapted weights, averaged over the processes before the interpolation (there is no
    #: outer optimizer step to hook); every process draws the minibatch indices of the whole meta-batch
    data_parallel = "exact"

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

    def data_parallel_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}  # the inner optimizer trains one task on one process; the outer step is averaged in update

    def data_parallel_refusal(self) -> str | None:
        if self.hparams["inner_optimizer"] == "adam":
            return ("its inner Adam carries its moments from one task to the next (as the official code does), so "
                    "the tasks of a meta-batch cannot run on separate processes; set hparam inner_optimizer to sgd")
        return None

    def _check_way(self, n_way: int) -> None:
        if n_way != self.classifier.out_features:
            raise UsageError(f"Reptile's head has n_way={self.classifier.out_features} outputs but the episode "
                             f"has {n_way} classes: set --fs-way to n_way or hparam n_way to {n_way}")

    def engine(self) -> str:
        return resolve_engine(self.hparams["engine"], next(self.parameters()).device)

    @staticmethod
    def _train(module: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
               batches: list[Tensor]) -> Tensor:
        """Minibatch training of ``module`` in place on ``batches`` (indices); returns the last loss (detached)."""
        loss = torch.zeros(())
        for idx in batches:
            loss = F.cross_entropy(module(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return loss.detach()

    def _train_batched(self, theta: dict[str, Tensor], x: Tensor, y: Tensor, batches: list[list[Tensor]]
                       ) -> tuple[dict[str, Tensor], Tensor]:
        """Plain SGD of E stacked tasks at once (``x`` ``[E, n, ...]``, ``batches[e][s]`` task e's step-s indices);
        returns the final stacked weights and the tasks' last minibatch losses ``[E]``."""
        folded = folded_copy(self.network)
        fast = {k: v.detach().requires_grad_() for k, v in stack_params(theta, len(x)).items()}
        rows = torch.arange(len(x), device=x.device).unsqueeze(1)
        losses = torch.zeros(len(x), device=x.device)
        with torch.enable_grad():
            for step in range(len(batches[0])):
                idx = torch.stack([task_batches[step] for task_batches in batches]).to(x.device)
                losses = task_losses(F.cross_entropy, batched_forward(folded, fast, x[rows, idx]), y[rows, idx])
                fast = {k: v.detach().requires_grad_()
                        for k, v in sgd_step(fast, losses.sum(), self.hparams["lr"], create_graph=False).items()}
        return {k: v.detach() for k, v in fast.items()}, losses.detach()

    def update(self, episodes: list[Episode]) -> Losses:
        hp = self.hparams
        self._check_way(episodes[0].n_way)
        data = [(torch.cat([e.support_x, e.query_x]), torch.cat([e.support_y, e.query_y])) for e in episodes]
        n_total = len(data) * distributed.world_size()  # every process draws the whole meta-batch's minibatches
        batches = [minibatch_indices(len(data[0][0]), hp["inner_batch_size"], hp["inner_steps"])
                   for _ in range(n_total)][distributed.shard(n_total, "hparam meta_batch_size")]
        if self.engine() == "batched" and hp["inner_optimizer"] == "sgd":
            fast, losses = self._train_batched(parameters_of(self.network), torch.stack([x for x, _ in data]),
                                               torch.stack([y for _, y in data]), batches)
            mean_phi, loss = [v.mean(0) for v in fast.values()], losses.mean()
        else:
            theta = [p.detach().clone() for p in self.network.parameters()]
            mean_phi = [torch.zeros_like(t) for t in theta]
            loss = 0.0
            for (x, y), task_batches in zip(data, batches):
                with torch.no_grad():
                    for p, t in zip(self.fast.parameters(), theta):
                        p.copy_(t)
                loss = loss + self._train(self.fast, self.inner_optimizer, x, y, task_batches) / len(episodes)
                for m, p in zip(mean_phi, self.fast.parameters()):
                    m += p.detach() / len(episodes)
        distributed.mean_(mean_phi)
        eps = self.outer_step_size()
        interpolate_(self.network.parameters(), mean_phi, eps)
        self.meta_step += 1
        return {"loss": loss}

    def _adapted_model(self, support_x: Tensor, support_y: Tensor, batches: list[Tensor]) -> nn.Module:
        """A copy of the network trained on the support set with a copy of the inner optimizer."""
        model = copy.deepcopy(self.network)
        optimizer = self._inner_optimizer(model)
        optimizer.load_state_dict(copy.deepcopy(self.inner_optimizer.state_dict()))
        with torch.enable_grad():
            self._train(model, optimizer, support_x, support_y, batches)
        return model

    def _test_batches(self, n: int) -> list[Tensor]:
        return minibatch_indices(n, self.hparams["inner_batch_size_test"], self.hparams["inner_steps_test"])

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        """``inner_steps_test`` steps on the support set from theta, with a copy of the inner optimizer."""
        self._check_way(int(support_y.max()) + 1)
        model = self._adapted_model(support_x, support_y, self._test_batches(len(support_x)))

        def predict_query(query_x: Tensor) -> Tensor:
            with torch.no_grad():
                return model(query_x)

        return predict_query

    def adapt_episodes(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        """``adapt`` for E stacked episodes at once (see the class docstring); same minibatches as one by one."""
        engine = self.engine()
        if engine == "loop":
            return super().adapt_episodes(support_x, support_y)
        self._check_way(int(support_y.max()) + 1)
        batches = [self._test_batches(support_x.shape[1]) for _ in range(len(support_x))]
        if engine == "batched" and self.hparams["inner_optimizer"] == "sgd":
            fast, _ = self._train_batched(parameters_of(self.network), support_x, support_y, batches)
            folded = folded_copy(self.network)

            def predict_batched(query_x: Tensor) -> Tensor:
                with torch.no_grad():
                    return batched_forward(folded, fast, query_x)

            return predict_batched
        threads = threads_for(self.network)
        models = threads.map(lambda _copy, i: self._adapted_model(support_x[i], support_y[i], batches[i]),
                             list(range(len(support_x))))

        def predict_queries(query_x: Tensor) -> Tensor:
            with torch.no_grad():
                return torch.stack([model(qx) for model, qx in zip(models, query_x)])

        return predict_queries
