"""AND-mask: step only along the gradient entries whose sign the training domains agree on."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dg_meta.algorithms.erm import ERM
from torch import Tensor

from dg_meta.algorithm import Losses
from dg_meta.gradients import domain_gradients
from dg_meta.hparams import HParam, uniform, unit_interval
from dg_meta.registry import register_algorithm


def inverse_density_rescaled(mask: Tensor, mean_grad: Tensor) -> Tensor:
    """``mask * mean_grad / (1e-10 + mean(mask))``: the masked gradient, scaled up by the inverse of the
    fraction of the tensor the mask keeps (DomainBed's rescaling, per parameter tensor)."""
    return mask * mean_grad / (1e-10 + mask.mean())


@register_algorithm
class ANDMask(ERM):
    """AND-mask (Parascandolo, Neitz, Orvieto, Gresele & Schoelkopf, "Learning explanations that are hard to
    vary", ICLR 2021), in the form of DomainBed's ``ANDMask`` class (``domainbed/algorithms.py``).

    Every step takes each training domain's minibatch loss ``L_e`` (its cross-entropy, each domain through the
    network on its own) and its gradient ``g_e`` over the network's parameters. For every parameter tensor,
    entry-wise, the agreement is ``a = |(1/E) sum_e sign(g_e)|`` and the mask ``m = [a >= tau]`` (0 or 1);
    the gradient given to Adam is ``m * gbar / (1e-10 + mean(m))``, ``gbar = (1/E) sum_e g_e`` and
    ``mean(m)`` the fraction of that tensor's entries kept. ``tau = 1`` keeps only the entries whose sign
    every domain shares; ``tau = 0`` keeps every entry (the mean gradient, i.e. ERM with equal domain
    weights). Returned: ``loss``, the mean of the domain losses.

    The authors' code (github.com/gibipara92/learning-explanations-hard-to-vary, ``and_mask_utils.get_grads``)
    also offers a geometric-mean combination and makes the rescaling optional (``scale_grad_inverse_sparsity``);
    DomainBed, and this file, always use the arithmetic mean with the rescaling, over one gradient per
    training domain.

    Hparam (DomainBed ``hparams_registry.py``, ``ANDMask`` block, one branch for every dataset): ``tau``
    1, ``U(0.5, 1)``.
    """

    compile_modules = ()  # not checked under torch.compile
    HPARAMS = {
        "tau": HParam(1.0, uniform(0.5, 1.0), unit_interval, "in [0, 1]",
                      "sign agreement an entry needs to be updated (1: every domain)"),
    }

    def mask(self, grads: Tensor) -> Tensor:
        """The mask of one parameter tensor from its ``[E, *shape]`` stacked domain gradients."""
        return (grads.sign().mean(0).abs() >= self.hparams["tau"]).to(grads.dtype)

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        params = list(self.network.parameters())
        losses = [F.cross_entropy(self.network(x), y) for x, y in batch]
        grads = domain_gradients(losses, params)
        for param, per_domain in zip(params, zip(*grads)):
            stacked = torch.stack(per_domain)
            param.grad = inverse_density_rescaled(self.mask(stacked), stacked.mean(0))
        self.optimizer.step()
        return {"loss": torch.stack(losses).mean().detach()}
