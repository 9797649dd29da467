"""Invariance penalties shared by IRM and IB-IRM (IRMv1's penalty), by IB-ERM and IB-IRM (the information
bottleneck's feature variance), and the loss rescaling of the official IRM and V-REx ColoredMNIST code.

- ``irm_penalty``: the squared gradient of a domain's risk w.r.t. a dummy scale ``s`` on the logits, at
  ``s = 1`` (Arjovsky et al. 2019, IRMv1). DomainBed (``algorithms.py``, ``IRM._irm_penalty``) estimates it
  without bias as ``g_1 * g_2``, the gradients on the even and the odd examples of the batch; the official
  code (``InvariantRiskMinimization/code/colored_mnist/main.py``, ``penalty``) squares the full-batch gradient.
- ``feature_variance``: the mean over feature dimensions of the unbiased per-dimension variance over the batch
  (Ahuja et al. 2021's proxy for the entropy of the representation; DomainBed ``IB_ERM`` / ``IB_IRM``).
- ``annealed_penalty_step``: IRM's and V-REx's optimizer step on ``nll + w penalty`` in DomainBed's form or the
  official code's (below).
- ``divide_by_penalty_weight``: ``loss / w`` while ``w > 1``, as the official IRM and V-REx ColoredMNIST code
  does after adding ``w`` times its penalty ("to keep gradients in a reasonable range"), with the optimizer's
  weight decay divided by ``w`` too: that code's L2 term is part of the loss it divides.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dg_meta.penalty_schedule import PenaltySchedule


def irm_penalty(logits: Tensor, y: Tensor, unbiased: bool = True) -> Tensor:
    """``(d/ds CE(s * logits, y) at s = 1)^2``; ``unbiased``: the product of that derivative on
    ``logits[::2]`` and on ``logits[1::2]`` instead of its square on the whole batch. Differentiable."""
    scale = torch.ones((), dtype=logits.dtype, device=logits.device, requires_grad=True)
    if not unbiased:
        (grad,) = torch.autograd.grad(F.cross_entropy(logits * scale, y), [scale], create_graph=True)
        return grad.square()
    other = torch.ones((), dtype=logits.dtype, device=logits.device, requires_grad=True)
    risks = F.cross_entropy(logits[::2] * scale, y[::2]) + F.cross_entropy(logits[1::2] * other, y[1::2])
    grad_even, grad_odd = torch.autograd.grad(risks, [scale, other], create_graph=True)
    return grad_even * grad_odd


def feature_variance(features: Tensor) -> Tensor:
    """Mean over dimensions of the unbiased (``n - 1``) variance of ``features`` (``[n, d]``) over the batch."""
    return features.var(dim=0).mean()


def divide_by_penalty_weight(loss: Tensor, weight: float, optimizer: torch.optim.Optimizer,
                             weight_decay: float) -> Tensor:
    """``loss / d`` with ``d = max(weight, 1)``, and ``weight_decay / d`` as every param group's weight decay
    (the official IRM / V-REx ColoredMNIST code divides its loss, L2 term included, by a weight above 1)."""
    divisor = max(weight, 1.0)
    for group in optimizer.param_groups:
        group["weight_decay"] = weight_decay / divisor
    return loss / divisor


def annealed_penalty_step(owner: Any, schedule: PenaltySchedule, nll: Tensor, penalty: Tensor) -> Tensor:
    """One step of ``owner.optimizer`` on ``nll + w penalty`` with ``w = schedule.weight()`` (IRM, V-REx).

    With ``owner.hparams["divide_loss_by_penalty_weight"]``: the official ColoredMNIST code's form, loss and weight
    decay divided by ``max(w, 1)`` (``divide_by_penalty_weight``), Adam kept across the switch; otherwise
    DomainBed's: Adam rebuilt (``owner.build_optimizer()``) at the switch. Advances the schedule; returns the
    minimised loss, detached.
    """
    loss = nll + schedule.weight() * penalty
    if owner.hparams["divide_loss_by_penalty_weight"]:
        loss = divide_by_penalty_weight(loss, schedule.weight(), owner.optimizer, owner.hparams["weight_decay"])
    elif schedule.switching():
        owner.optimizer = owner.build_optimizer()
    owner.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    owner.optimizer.step()
    schedule.advance()
    return loss.detach()

