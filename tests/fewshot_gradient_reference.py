"""A hand-written MAML-family meta-loss for the ANIL / BOIL / Meta-SGD tests: inner SGD steps on the parameters
that ``rates`` names (a number or a tensor each), then the mean query loss, all with ``functional_call``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def meta_loss(net: nn.Module, params: dict[str, torch.Tensor], rates: dict, episodes: list, steps: int,
              first_order: bool) -> torch.Tensor:
    total = 0.0
    for e in episodes:
        fast = dict(params)
        for _ in range(steps):
            support = F.cross_entropy(torch.func.functional_call(net, fast, (e.support_x,)), e.support_y)
            names = list(rates)
            grads = torch.autograd.grad(support, [fast[n] for n in names], create_graph=not first_order)
            fast.update({n: fast[n] - rates[n] * (g.detach() if first_order else g) for n, g in zip(names, grads)})
        total = total + F.cross_entropy(torch.func.functional_call(net, fast, (e.query_x,)), e.query_y)
    return total / len(episodes)
