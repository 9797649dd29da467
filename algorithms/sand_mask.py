"""SAND-mask: AND-mask with a smooth mask in [0, 1] that also asks the domains' gradients to agree in size."""

from __future__ import annotations

import torch
from dg_meta.algorithms.and_mask import ANDMask
from torch import Tensor

from dg_meta.hparams import HParam, log_uniform, positive, uniform, unit_interval
from dg_meta.registry import register_algorithm


@register_algorithm
class SANDMask(ANDMask):
    """Smoothed-AND mask (Shahtalebi, Gagnon-Audet, Laleh, Faramarzi, Ahuja & Rish, "SAND-mask: An Enhanced
    Gradient Masking Strategy for the Discovery of Invariances in Domain Generalization", arXiv:2106.02266,
    2021), in the form of DomainBed's ``SANDMask`` class (``domainbed/algorithms.py``).

    The update is AND-mask's (``ANDMask``: per-domain gradients ``g_e``, the masked mean gradient
    ``m * gbar / (1e-10 + mean(m))`` per parameter tensor, one Adam step), with the hard mask replaced,
    entry-wise, by

        ``m = max(0, tanh(k * (|(1/E) sum_e sign(g_e)| - tau) / s2))``,

    ``s2`` the unbiased variance of the ``E`` domain gradients of that entry (``torch.var``, divisor
    ``E - 1``; DomainBed writes it ``(gamma * s2)^-1`` with ``gamma = 1`` fixed). Entries whose domains
    disagree in sign more than ``tau`` allows get 0; agreeing ones get close to 1 when their gradients also
    agree in size (small ``s2``) or ``k`` is large. As in DomainBed, a variance that is NaN (a single
    training domain) becomes ``1e-17``, and a mask entry that is NaN (``0 / 0``: agreement exactly ``tau``
    with zero variance) becomes ``1e-17``.

    Departures from DomainBed: it writes ``SANDMask`` as its own ``ERM`` subclass repeating ``ANDMask``'s
    update (and builds the same Adam, betas ``(0.9, 0.999)``); here it subclasses ``ANDMask`` and replaces the
    mask. Its ``update_count`` buffer, never read, is left out.

    Hparams (DomainBed ``hparams_registry.py``, ``SANDMask`` block, one branch for every dataset): ``tau``
    1.0, ``U(0, 1)``; ``k`` 10, ``10**U(-3, 5)``. With the default ``tau = 1`` the argument of ``tanh`` is
    never positive (the agreement is at most 1), so the mask is 0 but for entries whose domain gradients
    are exactly equal and non-zero (``0 / 0``, then ``1e-17``), and the default run does not train (measured:
    held-out accuracy at chance after 100 steps on RotatedDigits); kept as DomainBed has it, random search
    draws ``tau < 1``.
    """

    HPARAMS = {
        "tau": HParam(1.0, uniform(0.0, 1.0), unit_interval, "in [0, 1]",
                      "sign agreement below which an entry's mask is 0"),
        "k": HParam(10.0, log_uniform(-3, 5), positive, "positive", "steepness of the smooth mask"),
    }

    def mask(self, grads: Tensor) -> Tensor:
        """The smooth mask of one parameter tensor from its ``[E, *shape]`` stacked domain gradients."""
        variance = grads.var(0).nan_to_num(nan=1e-17)
        agreement = grads.sign().mean(0).abs() - self.hparams["tau"]
        smooth = torch.tanh(self.hparams["k"] * agreement / variance)
        return smooth.clamp(min=0).nan_to_num(nan=1e-17)
