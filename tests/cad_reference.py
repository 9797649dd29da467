"""CAD's and CondCAD's domain bottleneck written anchor by anchor from the formulas (Ruan et al. 2022, as
DomainBed computes them), for the tests of ``algorithms/cad.py`` and ``algorithms/cond_cad.py``."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def reference_bottleneck(u: Tensor, y: Tensor, d: Tensor, tau: float, flipped: bool, conditional: bool) -> Tensor:
    """Mean over the kept anchors of ``b_i`` times ``tau / 0.07``; 0 when no anchor is kept.

    Anchor ``i`` picks ``j`` among ``pool`` (every other example; CondCAD: the other examples of its class)
    with probability ``exp(u_i.u_j / tau) / sum_pool``. Flipped: ``b_i = -log P(pick another domain)``;
    not flipped: ``b_i = log P(pick its domain)``, where CAD also counts the anchor itself with logit 0.
    CAD keeps the anchors with another example of their class; both keep only anchors whose sum is not empty.
    """
    n = len(u)
    terms = []
    for i in range(n):
        same_class = [j for j in range(n) if j != i and y[j] == y[i]]
        pool = same_class if conditional else [j for j in range(n) if j != i]
        if not same_class:
            continue
        logit = {j: u[i] @ u[j] / tau for j in pool}
        if not flipped and not conditional:
            logit[i] = torch.zeros((), dtype=u.dtype)
        members = [j for j in logit if (d[j] != d[i]) == flipped]
        if not members:
            continue
        log_norm = torch.logsumexp(torch.stack([logit[j] for j in pool]), 0)
        log_members = torch.logsumexp(torch.stack([logit[j] for j in members]), 0) - log_norm
        terms.append(-log_members if flipped else log_members)
    if not terms:
        return torch.zeros((), dtype=u.dtype)
    return tau / 0.07 * torch.stack(terms).mean()


def hand_bottleneck_example() -> tuple[Tensor, Tensor, Tensor, float, dict[tuple[bool, bool], float]]:
    """Four 1-d features with hand-computed bottlenecks at ``tau = 0.5``, keyed by ``(conditional, flipped)``.

    ``u = (1, 0, 2, 1)``, classes ``(0, 0, 1, 0)``, domains ``(0, 1, 1, 0)``. With ``A = 1 / tau``, the logits
    ``u_i u_j / tau`` are ``s_01 = 0, s_02 = 2A, s_03 = A, s_12 = s_13 = 0, s_23 = 2A``. Example 2 is alone in
    its class: it is never an anchor.
    """
    tau = 0.5
    u = torch.tensor([[1.0], [0.0], [2.0], [1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 0])
    d = torch.tensor([0, 1, 1, 0])
    e1, e2 = math.exp(1 / tau), math.exp(2 / tau)
    expected = {
        # CAD flipped: anchors 0 and 3 pick another domain (examples 1, 2) with P = (1 + e^2A) / (1 + e^A +
        # e^2A); anchor 1 sees logits 0, 0, 0 and picks domain 0 (examples 0, 3) with P = 2/3
        (False, True): (2 * -math.log((1 + e2) / (1 + e1 + e2)) - math.log(2 / 3)) / 3,
        # CAD not flipped: anchors 0 and 3: own domain = itself (logit 0) and the other one (logit A), over
        # the same normaliser; anchor 1: itself and example 2, both logit 0, over 3
        (False, False): (2 * math.log((1 + e1) / (1 + e1 + e2)) + math.log(2 / 3)) / 3,
        # CondCAD flipped: anchor 0 picks among {1, 3} (logits 0, A) example 1: -log(1 / (1 + e^A)); anchor 3
        # likewise; anchor 1 picks among {0, 3}, both of another domain: 0
        (True, True): 2 * math.log(1 + e1) / 3,
        # CondCAD not flipped: anchors 0 and 3 pick each other (logit A) among {1, the other}: log(e^A / (1 +
        # e^A)); anchor 1 has no class-0 example of its domain: left out
        (True, False): math.log(e1 / (1 + e1)),
    }
    return u, y, d, tau, {key: tau / 0.07 * value for key, value in expected.items()}
