"""A hand-written Adam (Kingma & Ba 2015, no weight decay) for tests that replay an algorithm's update
independently of ``torch.optim``."""

from __future__ import annotations

import torch
from torch import Tensor


class HandAdam:
    """Adam over a list of tensors, updated out of place: ``step(grads)`` returns the new tensors."""

    def __init__(self, params: list[Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params = [p.detach().clone() for p in params]
        self.lr, (self.b1, self.b2), self.eps = lr, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def step(self, grads: list[Tensor]) -> list[Tensor]:
        self.t += 1
        for i, g in enumerate(grads):
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            m_hat = self.m[i] / (1 - self.b1 ** self.t)
            v_hat = self.v[i] / (1 - self.b2 ** self.t)
            self.params[i] = self.params[i] - self.lr * m_hat / (v_hat.sqrt() + self.eps)
        return self.params
