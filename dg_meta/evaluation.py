"""Evaluation: per-domain classification accuracy (and cross-entropy, for SWAD's validation loss) and few-shot
episode accuracy with a 95% CI."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from dg_meta.algorithm import Algorithm
from dg_meta.dataset import Domain
from dg_meta.samplers import EpisodeSampler, stack_episodes


def _summed_over_batches(algorithm: Algorithm, domain: Domain, idx: Tensor, batch_size: int,
                         score: Callable[[Tensor, Tensor], Tensor]) -> float:
    """``sum score(predict(x), y)`` over the examples ``idx`` of ``domain`` in eval mode, divided by their number
    (NaN for none), summed on the device with one read at the end."""
    if len(idx) == 0:
        return float("nan")
    was_training = algorithm.training
    algorithm.eval()
    total = None
    with torch.no_grad():
        for start in range(0, len(idx), batch_size):
            x, y = domain.batch(idx[start:start + batch_size])
            part = score(algorithm.predict(x), y)
            total = part if total is None else total + part
    algorithm.train(was_training)
    return float(total) / len(idx)


def domain_accuracy(algorithm: Algorithm, domain: Domain, idx: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``algorithm.predict`` on the examples ``idx`` of ``domain`` (eval mode)."""
    return _summed_over_batches(algorithm, domain, idx, batch_size, lambda logits, y: (logits.argmax(1) == y).sum())


def domain_loss(algorithm: Algorithm, domain: Domain, idx: Tensor, batch_size: int = 512) -> float:
    """Mean cross-entropy of ``algorithm.predict`` on the examples ``idx`` of ``domain`` (eval mode)."""
    return _summed_over_batches(algorithm, domain, idx, batch_size,
                                lambda logits, y: torch.nn.functional.cross_entropy(logits, y, reduction="sum"))


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% confidence interval, ``1.96 * std / sqrt(n)``."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, 1.96 * math.sqrt(var / n)


def episode_accuracy(algorithm: Algorithm, sampler: EpisodeSampler, n_episodes: int,
                     episodes_at_once: int = 32) -> tuple[float, float]:
    """Mean query accuracy over ``n_episodes`` episodes from ``sampler`` through ``algorithm.adapt_episodes``
    (``episodes_at_once`` episodes per call: the same episodes and accuracies as one at a time), with its 95% CI
    half-width."""
    was_training = algorithm.training
    algorithm.eval()
    accs: list[float] = []
    while len(accs) < n_episodes:
        tasks = stack_episodes([next(sampler) for _ in range(min(episodes_at_once, n_episodes - len(accs)))])
        predict = algorithm.adapt_episodes(tasks.support_x, tasks.support_y)
        with torch.no_grad():
            correct = (predict(tasks.query_x).argmax(-1) == tasks.query_y).float().mean(1)
        accs.extend(correct.tolist())
    algorithm.train(was_training)
    return mean_ci95(accs)
