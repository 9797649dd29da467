"""Domain-adversarial pieces shared by DANN, CDANN and the other adversarial DG methods.

- ``grad_reverse(x, scale)``: identity forward, ``-scale * grad`` backward (Ganin & Lempitsky 2015, the
  gradient reversal layer), for methods that train featurizer and discriminator in one backward pass.
- ``DISCRIMINATOR_HPARAMS`` and ``domain_discriminator``: DomainBed's MLP discriminator (``networks.MLP``
  with ``mlp_width`` / ``mlp_depth`` / ``mlp_dropout``, DomainBed ``hparams_registry.py``).
- ``discriminator_turn``: DomainBed's alternation of ``d_steps`` discriminator updates per generator update.
- ``input_gradient_penalty``: the squared norm of the gradient of a loss w.r.t. the discriminator's input
  (DomainBed ``AbstractDANN.update``'s ``grad_penalty``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dg_meta.hparams import HParam, choice, int_log2_uniform, positive
from dg_meta.networks import MLP


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.scale * grad, None


def grad_reverse(x: Tensor, scale: float = 1.0) -> Tensor:
    """``x`` unchanged; the gradient flowing back through it is multiplied by ``-scale``."""
    return _GradReverse.apply(x, scale)


DISCRIMINATOR_HPARAMS: dict[str, HParam] = {
    "mlp_width": HParam(256, int_log2_uniform(6, 10), positive, "a positive integer", "discriminator width"),
    "mlp_depth": HParam(3, choice([3, 4, 5]), lambda v: v >= 2, "an integer >= 2", "discriminator linear layers"),
    "mlp_dropout": HParam(0.0, choice([0.0, 0.1, 0.5]), lambda v: 0 <= v < 1, "in [0, 1)", "discriminator dropout"),
}


def domain_discriminator(n_features: int, n_outputs: int, hparams: dict) -> nn.Module:
    """DomainBed's ``networks.MLP(n_features, n_outputs, hparams)``: ``mlp_depth`` linear layers of width
    ``mlp_width`` with dropout and ReLU between them."""
    return MLP(n_features, n_outputs, hparams["mlp_width"], hparams["mlp_depth"], hparams["mlp_dropout"])


def discriminator_turn(update_count: int, d_steps: int) -> bool:
    """True when update number ``update_count`` (counted from 1, as DomainBed increments before testing)
    trains the discriminator: ``update_count % (1 + d_steps) < d_steps``."""
    return update_count % (1 + d_steps) < d_steps


def input_gradient_penalty(loss_sum: Tensor, inputs: Tensor) -> Tensor:
    """``mean_i ||d loss_sum / d inputs_i||^2`` with the graph kept (so the penalty can be minimised)."""
    (grad,) = torch.autograd.grad(loss_sum, [inputs], create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


