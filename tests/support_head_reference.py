"""Hand-written replays of CloserLookFewShot's test-time fine-tuning (``methods/baselinefinetune.py``) for tests:
torch.optim.SGD's update written out and the loop over shuffled minibatches of 4, independent of
``dg_meta.support_heads``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

LR, MOMENTUM, DAMPENING, WEIGHT_DECAY, EPOCHS, BATCH = 0.01, 0.9, 0.9, 1e-3, 100, 4


def hand_sgd(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None]) -> None:
    """One SGD step in place, as torch.optim.SGD documents it: ``g += wd * p``; the first step sets the
    momentum buffer to ``g``, later ones to ``momentum * b + (1 - dampening) * g``; ``p -= lr * b``."""
    for i, (p, g) in enumerate(zip(params, grads)):
        g = g + WEIGHT_DECAY * p
        bufs[i] = g.clone() if bufs[i] is None else MOMENTUM * bufs[i] + (1 - DAMPENING) * g
        p -= LR * bufs[i]


def replay_finetune(params: list[Tensor], gradient: Callable[[list[Tensor], Tensor, Tensor], list[Tensor]],
                    z: Tensor, y: Tensor, epochs: int = EPOCHS) -> tuple[list[Tensor], list[list[int]]]:
    """The official loop from the current global RNG state: per epoch a ``torch.randperm`` of the support set,
    minibatches of 4 in that order (the last one smaller), one ``hand_sgd`` step on ``gradient(params, z_b, y_b)``
    each. Returns the final parameters and the minibatches."""
    params = [p.detach().clone() for p in params]
    bufs: list[Tensor | None] = [None] * len(params)
    batches = []
    for _ in range(epochs):
        order = torch.randperm(len(z)).tolist()
        for start in range(0, len(z), BATCH):
            take = order[start:start + BATCH]
            batches.append(take)
            hand_sgd(params, gradient(params, z[take], y[take]), bufs)
    return params, batches


def linear_ce_gradient(params: list[Tensor], z: Tensor, y: Tensor) -> list[Tensor]:
    """Gradient of the mean cross-entropy of ``z W^T + b`` in closed form: ``(P - Y)^T z / B`` and
    ``sum(P - Y) / B``."""
    weight, bias = params
    residual = torch.softmax(z @ weight.t() + bias, dim=1) - torch.nn.functional.one_hot(y, len(bias))
    return [residual.t() @ z / len(z), residual.sum(0) / len(z)]
