"""Gradients that several DG methods compare: per-domain gradients (IGA, AND-mask, SAND-mask, Fish) and
per-example gradients (Fishr), the latter with ``torch.func`` (``vmap`` over ``grad``) instead of BackPACK.

Both keep the graph when asked (``create_graph=True``), so a penalty built from them can be minimised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

Params = dict[str, Tensor]


def domain_gradients(losses: Sequence[Tensor], params: Sequence[Tensor],
                     create_graph: bool = False) -> list[list[Tensor]]:
    """``[grad(loss_e, params) for loss_e in losses]``; every graph is kept until the last loss."""
    return [list(torch.autograd.grad(loss, list(params), create_graph=create_graph,
                                     retain_graph=create_graph or i < len(losses) - 1))
            for i, loss in enumerate(losses)]


def per_example_gradients(module: nn.Module, params: Params, x: Tensor, y: Tensor,
                          loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Params:
    """``{name: [n, *param.shape]}``: the gradient of ``loss_fn(module(x_i), y_i)`` w.r.t. each of ``params``
    for every example ``i``, computed with ``torch.func.vmap(torch.func.grad(...))``; differentiable w.r.t.
    ``params``, ``x`` and anything they depend on (the featurizer for Fishr).

    The module is called with ``torch.func.functional_call(module, params, x_i[None])``: ``params`` may be a
    subset of its parameters (the rest are its own).
    """

    def one_loss(p: Params, xi: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(torch.func.functional_call(module, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    return torch.func.vmap(torch.func.grad(one_loss), in_dims=(None, 0, 0))(params, x, y)
