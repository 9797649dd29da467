"""iMAML: MAML with a proximal inner problem and an implicit meta-gradient by conjugate gradient."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from dg_meta.algorithms.maml import ENGINE_HPARAM
from torch import Tensor, nn

from dg_meta.algorithm import EpisodicAlgorithm, Losses
from dg_meta.batched_tasks import (
    batched_forward,
    batched_predictor,
    folded_copy,
    resolve_engine,
    stack_params,
    task_losses,
)
from dg_meta.errors import UsageError
from dg_meta.functional import (
    LossFn,
    Params,
    conjugate_gradient,
    flat,
    functional_forward,
    hessian_vector_product,
    parameters_of,
    sgd_step,
    unflat,
)
from dg_meta.hparams import HParam, choice, log_uniform, positive
from dg_meta.networks import Conv4
from dg_meta.registry import register_algorithm
from dg_meta.samplers import Episode, stack_episodes
from dg_meta.task_threads import sum_in_order, threads_for

Forward = Callable[[Params, Tensor], Tensor]


def proximal_inner_loop(forward: Forward, theta: Params, x: Tensor, y: Tensor, lam: float, steps: int, lr: float,
                        loss_fn: LossFn = F.cross_entropy) -> Params:
    """``steps`` gradient steps from ``theta`` on ``loss_fn(forward(phi, x), y) + lam/2 ||phi - theta||^2``;
    returns detached leaves ``phi`` (requiring grad) with no graph back to ``theta``. With the batched engine
    ``theta`` is stacked over tasks and ``loss_fn`` sums the tasks' losses: each task takes its own steps."""
    anchor = {k: v.detach() for k, v in theta.items()}
    phi = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
    for _ in range(steps):
        prox = sum(((phi[k] - anchor[k]) ** 2).sum() for k in phi)
        loss = loss_fn(forward(phi, x), y) + 0.5 * lam * prox
        phi = {k: v.detach().requires_grad_() for k, v in sgd_step(phi, loss, lr, create_graph=False).items()}
    return phi


def implicit_meta_gradient(forward: Forward, phi: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                           query_y: Tensor, lam: float, cg_steps: int, loss_fn: LossFn = F.cross_entropy,
                           batch_dims: int = 0) -> Tensor:
    """``(I + H/lam)^-1 g`` (flat), ``g = grad L_query(phi)``, ``H = hess L_support(phi)``, by ``cg_steps`` of
    conjugate gradient with Hessian-vector products (Rajeswaran et al. 2019, Algorithm 2). With
    ``batch_dims=1`` (the batched engine) ``phi`` is stacked over tasks, ``loss_fn`` sums their losses, and
    every task's system is solved at once (``[E, P]``)."""
    leaves = list(phi.values())
    g_query = flat(torch.autograd.grad(loss_fn(forward(phi, query_x), query_y), leaves), batch_dims)
    g_train = torch.autograd.grad(loss_fn(forward(phi, support_x), support_y), leaves, create_graph=True)
    return conjugate_gradient(lambda v: v + hessian_vector_product(g_train, leaves, v, batch_dims) / lam, g_query,
                              cg_steps)


def summed_task_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """The sum over tasks of each task's mean cross-entropy (stacked ``[E, N, K]`` logits)."""
    return task_losses(F.cross_entropy, logits, y).sum()


@register_algorithm
class iMAML(EpisodicAlgorithm):  # noqa: N801 (the method's name)
    """Implicit MAML (Rajeswaran, Finn, Kakade & Levine, NeurIPS 2019), in the paper's form.

    Each task's adapted parameters approximately solve the proximal problem
    ``phi* = argmin_phi L_support(phi) + lam/2 ||phi - theta||^2`` (``inner_steps`` gradient steps on that
    regularised objective from theta, no graph kept). The meta-gradient is the implicit one (the paper's
    Lemma 1 and Algorithm 2), ``d L_query(phi*)/d theta = (I + H/lam)^-1 grad L_query(phi*)`` with ``H`` the
    Hessian of ``L_support`` at ``phi*``, computed by ``cg_steps`` of conjugate gradient with Hessian-vector
    products; it is averaged over the meta-batch and applied with Adam. Conv4 with transductive batch norm
    (``track_running_stats=False``) and an ``n_way`` linear head. Evaluation adapts with the same proximal
    steps. Defaults are the official README's Omniglot 5-way 1-shot command (github.com/aravindr93/imaml_dev,
    ``examples/README.md``: ``--lam 2.0 --inner_lr 1e-1 --n_steps 16 --cg_steps 5 --task_mb_size 32
    --outer_lr 1e-3``; 16 steps of 0.1 at test, ``measure_accuracy.py --n_steps 16 --inner_lr 1e-1``).

    How the official code differs (read, not adopted): (1) inner loop: ``Learner.learn_task``
    (``implicit_maml/learner_model.py``, ``add_regularization=False``) takes plain SGD steps on the support
    loss, then ``examples/omniglot_implicit_maml.py`` takes one SGD step on ``regularization_loss(w_k, lam)``
    ("pull back for regularization"), ``phi <- phi - inner_lr lam (phi - theta)``; (2) linear system:
    ``Learner.matrix_evaluator`` solves ``((1 + cg_damping) I + H/(lam + lam_damping)) x = g`` with
    ``cg_damping = 1`` (README) and ``lam_damping = 10`` (its default), i.e. ``(2I + H/12) x = g`` instead
    of ``(I + H/lam) x = g``; (3) at test ``measure_accuracy.py`` is run with ``--lam 0.0``: plain gradient
    steps, the pull a no-op; (4) the outer Adam has ``eps = 1e-3`` (``Learner.__init__``) and the network
    (``make_conv_network``) uses stride-2 convolutions instead of max-pooling; (5) its tasks hold K query
    images per class (``examples/README.md``: 1 for 5-way 1-shot), ours the library's ``n_query = 15``, the
    episode size every meta-learner here is trained and scored on (override with ``{"n_query": 1}``).
    """

    HPARAMS: ClassVar[dict[str, HParam]] = {
        "meta_batch_size": HParam(32, choice([4, 8, 16, 32]), positive, "a positive integer", "tasks per step"),
        "lam": HParam(2.0, log_uniform(-1, 1), positive, "positive", "proximal regularisation strength lambda"),
        "inner_lr": HParam(0.1, log_uniform(-2, 0), positive, "positive", "inner gradient step size"),
        "inner_steps": HParam(16, choice([5, 10, 16, 25]), positive, "a positive integer",
                              "inner gradient steps in meta-training"),
        "inner_steps_test": HParam(16, choice([16, 25]), positive, "a positive integer",
                                   "inner gradient steps when adapting at evaluation"),
        "cg_steps": HParam(5, choice([3, 5, 10]), positive, "a positive integer", "conjugate-gradient iterations"),
        "engine": ENGINE_HPARAM,
    }
    data_parallel = "exact"  # the mean over tasks of implicit meta-gradients, set as .grad before one Adam step

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer = Conv4(self.input_shape, track_running_stats=False)
        self.classifier = nn.Linear(self.featurizer.n_outputs, hparams["n_way"])
        self.network = nn.Sequential(self.featurizer, self.classifier)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=hparams["lr"],
                                          weight_decay=hparams["weight_decay"])

    def _theta(self, n_way: int) -> Params:
        if n_way != self.classifier.out_features:
            raise UsageError(f"iMAML's head has n_way={self.classifier.out_features} outputs but the episode has "
                             f"{n_way} classes: set --fs-way to n_way or hparam n_way to {n_way}")
        return parameters_of(self.network)

    def _task(self, network: nn.Module, e: Episode, n: int) -> tuple[Tensor, Tensor]:
        """One task's implicit meta-gradient divided by ``n`` (flat) and its query loss at ``phi``."""
        hp = self.hparams
        forward = lambda params, x: functional_forward(network, params, x)  # noqa: E731
        phi = proximal_inner_loop(forward, self._theta(e.n_way), e.support_x, e.support_y, hp["lam"],
                                  hp["inner_steps"], hp["inner_lr"])
        grad = implicit_meta_gradient(forward, phi, e.support_x, e.support_y, e.query_x, e.query_y, hp["lam"],
                                      hp["cg_steps"]) / n
        with torch.no_grad():
            return grad, F.cross_entropy(forward(phi, e.query_x), e.query_y)

    def update(self, episodes: list[Episode]) -> Losses:
        hp = self.hparams
        theta = self._theta(episodes[0].n_way)
        engine, n = resolve_engine(hp["engine"], next(self.parameters()).device), len(episodes)
        if engine in ("batched", "vmap"):
            folded = folded_copy(self.network)
            forward = lambda params, x: batched_forward(folded, params, x)  # noqa: E731
            tasks = stack_episodes(episodes)
            phi = proximal_inner_loop(forward, stack_params(theta, n), tasks.support_x, tasks.support_y, hp["lam"],
                                      hp["inner_steps"], hp["inner_lr"], summed_task_cross_entropy)
            meta_grad = implicit_meta_gradient(forward, phi, tasks.support_x, tasks.support_y, tasks.query_x,
                                               tasks.query_y, hp["lam"], hp["cg_steps"], summed_task_cross_entropy,
                                               batch_dims=1).sum(0) / n
            with torch.no_grad():
                query_loss = task_losses(F.cross_entropy, forward(phi, tasks.query_x), tasks.query_y).mean()
        else:
            if engine == "threads":
                threads = threads_for(self.network)
                results = threads.map(lambda network, e: self._task(network, e, n), episodes)
            else:
                results = [self._task(self.network, e, n) for e in episodes]
            meta_grad, query_loss = sum_in_order(results)
            query_loss = query_loss / n
        for p, g in zip(theta.values(), unflat(meta_grad, list(theta.values()))):
            p.grad = g.clone()
        self.optimizer.step()
        return {"loss": query_loss}

    def _adapted(self, network: nn.Module, support_x: Tensor, support_y: Tensor) -> Params:
        hp = self.hparams
        theta = self._theta(int(support_y.max()) + 1)
        with torch.enable_grad():
            phi = proximal_inner_loop(lambda params, x: functional_forward(network, params, x), theta, support_x,
                                      support_y, hp["lam"], hp["inner_steps_test"], hp["inner_lr"])
        return {k: v.detach() for k, v in phi.items()}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        """``inner_steps_test`` proximal gradient steps from theta on the support set."""
        phi = self._adapted(self.network, support_x, support_y)

        def predict_query(query_x: Tensor) -> Tensor:
            with torch.no_grad():
                return functional_forward(self.network, phi, query_x)

        return predict_query

    def adapt_episodes(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        """``adapt`` for E stacked episodes at once through the task engine."""
        hp = self.hparams
        engine = resolve_engine(hp["engine"], next(self.parameters()).device)
        if engine in ("batched", "vmap"):
            folded = folded_copy(self.network)
            theta = stack_params(self._theta(int(support_y.max()) + 1), len(support_x))
            with torch.enable_grad():
                phi = proximal_inner_loop(lambda params, x: batched_forward(folded, params, x), theta, support_x,
                                          support_y, hp["lam"], hp["inner_steps_test"], hp["inner_lr"],
                                          summed_task_cross_entropy)
            return batched_predictor(folded, phi, lambda logits: logits)
        if engine == "threads":
            threads = threads_for(self.network)
            phis = threads.map(lambda network, s: self._adapted(network, *s), list(zip(support_x, support_y)))

            def predict_queries(query_x: Tensor) -> Tensor:
                with torch.no_grad():
                    return torch.stack([functional_forward(self.network, phi, qx) for phi, qx in zip(phis, query_x)])

            return predict_queries
        return super().adapt_episodes(support_x, support_y)
