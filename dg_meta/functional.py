"""Functional inner loops over a parameter dict with ``torch.func.functional_call``.

``sgd_step`` is one (differentiable) gradient step ``theta' = theta - alpha * grad L(theta)``: with
``create_graph=True`` the outer loss can backpropagate through it (second order), otherwise the inner
gradients are detached (first order). ``task_query_loss`` adapts on one task's support set and returns its
query loss (the per-task loop); ``vmap_query_losses`` does the same for a stacked batch of tasks at once with
``torch.func.vmap``. ``conjugate_gradient`` and ``hessian_vector_product`` serve implicit meta-gradients.

Batch norm in inner loops is transductive: the networks use ``track_running_stats=False``, so every forward
normalises with the statistics of the batch it is given (support or query), as MAML does, and keeps no
running averages. Under ``vmap`` PyTorch's batched ``batch_norm`` gives a wrong second-order meta-gradient
(measured: 1e-2 off the per-task loop in float64 on Conv4, while the loop agrees with finite differences),
so the vmap path runs a copy of the network whose batch-norm layers compute the same normalisation from
primitive tensor ops (``BatchStatNorm``); other normalisation layers are refused there.

``interpolate_`` is the outer update of Reptile and Fish, ``theta <- theta + eps (theta~ - theta)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dg_meta.errors import UsageError

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def parameters_of(module: nn.Module) -> Params:
    """The module's trainable parameters as an ordered name -> tensor dict (sharing storage)."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def functional_forward(module: nn.Module, params: Params, *args: Tensor) -> Tensor:
    """``module(*args)`` evaluated with ``params`` in place of its parameters (buffers unchanged)."""
    return torch.func.functional_call(module, params, args)


InnerLR = float | dict[str, float | Tensor]


def sgd_step(params: Params, loss: Tensor, lr: InnerLR, create_graph: bool) -> Params:
    """``theta - lr * grad(loss, theta)``; differentiable through the gradient iff ``create_graph``. ``lr`` is one
    step size, or a step size (a number or a tensor broadcast against the parameter, e.g. Meta-SGD's learned
    rates) per parameter name: parameters it does not name keep their value (ANIL, BOIL adapt a subset)."""
    names = list(params) if not isinstance(lr, dict) else [n for n in params if n in lr]
    rates = dict.fromkeys(names, lr) if not isinstance(lr, dict) else lr
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph, allow_unused=True)
    stepped = {n: params[n] - rates[n] * g for n, g in zip(names, grads) if g is not None}
    return {n: stepped.get(n, p) for n, p in params.items()}


def inner_loop(module: nn.Module, params: Params, loss_fn: Callable[[Tensor], Tensor], x: Tensor,
               steps: int, lr: InnerLR, create_graph: bool) -> Params:
    """``steps`` SGD steps on ``loss_fn(module(x; params))`` starting from ``params``."""
    for _ in range(steps):
        params = sgd_step(params, loss_fn(functional_forward(module, params, x)), lr, create_graph)
    return params


def task_query_loss(module: nn.Module, params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                    query_y: Tensor, steps: int, lr: InnerLR, first_order: bool,
                    inner_loss: LossFn = F.cross_entropy, outer_loss: LossFn = F.cross_entropy) -> Tensor:
    """One task of MAML: ``steps`` SGD steps on ``inner_loss`` of the support set from ``params``, then
    ``outer_loss`` of the query set at the adapted parameters (second order unless ``first_order``)."""
    fast = inner_loop(module, params, lambda out: inner_loss(out, support_y), support_x, steps, lr,
                      create_graph=not first_order)
    return outer_loss(functional_forward(module, fast, query_x), query_y)


class BatchStatNorm(nn.Module):
    """Batch normalisation with batch statistics, from primitive ops (correct under ``vmap`` at any order).

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the biased mean and variance over every
    dimension but the channels (dimension 1), as ``nn.BatchNorm*d(track_running_stats=False)`` computes;
    ``weight`` and ``bias`` keep the names of the layer it replaces, so parameter dicts carry over.
    """

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias

    def forward(self, x: Tensor) -> Tensor:
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dims, keepdim=True)
        var = (x - mean).pow(2).mean(dims, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is None:
            return y
        shape = [1, -1] + [1] * (x.dim() - 2)
        return y * self.weight.view(shape) + self.bias.view(shape)


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def vmap_network(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that ``vmap_query_losses`` can batch over tasks: batch-norm layers with batch
    statistics become ``BatchStatNorm``; any other normalisation layer is a ``UsageError``."""
    converted = copy.deepcopy(module)
    for name, child in list(converted.named_modules()):
        if not isinstance(child, _NORMS):
            continue
        is_batch_stat = isinstance(child, nn.modules.batchnorm._BatchNorm) and not child.track_running_stats
        if not is_batch_stat:
            raise UsageError(
                f"the vmap path cannot batch tasks through {type(child).__name__} ('{name}'): only batch norm "
                "with track_running_stats=False is verified against the per-task loop; set hparam vmap to false"
            )
        parent_name, _, attr = name.rpartition(".")
        parent = converted.get_submodule(parent_name) if parent_name else converted
        setattr(parent, attr, BatchStatNorm(child))
    return converted


def vmap_query_losses(network: nn.Module, params: Params, support_x: Tensor, support_y: Tensor,
                      query_x: Tensor, query_y: Tensor, steps: int, lr: float, first_order: bool,
                      inner_loss: LossFn = F.cross_entropy, outer_loss: LossFn = F.cross_entropy) -> Tensor:
    """``task_query_loss`` for E stacked tasks at once (inputs ``[E, ...]``), returning the ``[E]`` query
    losses; differentiable to ``params`` by ordinary autograd. ``network`` must come from ``vmap_network``."""

    def one_task(p: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        for _ in range(steps):
            grads = torch.func.grad(lambda q: inner_loss(functional_forward(network, q, sx), sy))(p)
            if first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            p = {k: p[k] - lr * grads[k] for k in p}
        return outer_loss(functional_forward(network, p, qx), qy)

    return torch.func.vmap(one_task, in_dims=(None, 0, 0, 0, 0), randomness="error")(
        params, support_x, support_y, query_x, query_y)


def flat(tensors: list[Tensor] | tuple[Tensor, ...], batch_dims: int = 0) -> Tensor:
    """The tensors flattened and concatenated into one vector (``[..., P]``, keeping ``batch_dims`` leading
    dimensions: one vector per task when the tensors are stacked over tasks)."""
    return torch.cat([t.reshape(*t.shape[:batch_dims], -1) for t in tensors], dim=-1)


def unflat(vector: Tensor, like: list[Tensor], batch_dims: int = 0) -> list[Tensor]:
    """Split ``vector`` into tensors shaped like ``like`` (inverse of ``flat`` with the same ``batch_dims``)."""
    out, start = [], 0
    for t in like:
        size = t.shape[batch_dims:].numel()
        out.append(vector[..., start:start + size].reshape(t.shape))
        start += size
    return out


def hessian_vector_product(grads: list[Tensor], params: list[Tensor], vector: Tensor, batch_dims: int = 0) -> Tensor:
    """``H v`` (flat) where ``grads`` = grad L(params) was computed with ``create_graph=True``; with
    ``batch_dims=1`` the params are stacked over tasks whose losses were summed, and each task's row of
    ``vector`` is multiplied by its own Hessian."""
    dot = sum((g * v).sum() for g, v in zip(grads, unflat(vector, params, batch_dims)))
    return flat(torch.autograd.grad(dot, params, retain_graph=True), batch_dims)


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, steps: int) -> Tensor:
    """Approximately solve ``A x = b`` for symmetric positive-definite ``A`` by ``steps`` iterations of
    conjugate gradient from ``x = 0`` (exact after ``dim`` steps in exact arithmetic). ``b`` may be one vector
    ``[P]`` or a batch ``[E, P]`` of independent systems (``matvec`` maps each row by its own ``A``); a system
    whose residual reaches zero stops there."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum(-1, keepdim=True)
    for _ in range(steps):
        if not rr.any():
            break
        ap = matvec(p)
        alpha = torch.where(rr > 0, rr / (p * ap).sum(-1, keepdim=True), 0.0)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = (r * r).sum(-1, keepdim=True)
        p = r + torch.where(rr > 0, rr_new / rr, 0.0) * p
        rr = rr_new
    return x


def interpolate_(tensors: Iterable[Tensor], targets: Iterable[Tensor], step: float) -> None:
    """``t <- t + step (target - t)`` in place, for each pair of ``tensors`` and ``targets``."""
    with torch.no_grad():
        for t, target in zip(tensors, targets):
            t.add_(target - t, alpha=step)
