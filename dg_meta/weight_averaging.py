"""Weight averaging shared by SWAD (``dg_meta/swad.py``) and ERM++'s simple moving average: a running mean of
a sequence of parameter lists (``torch.optim.swa_utils.AveragedModel``'s update) and the recomputation of
batch-norm running statistics for averaged weights (``swa_utils.update_bn``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

BN_UPDATE_STEPS = 500


class ParameterAverage:
    """The running mean of a sequence of parameter lists, with the first and last step it covers."""

    def __init__(self) -> None:
        self.mean: list[Tensor] | None = None
        self.n = 0
        self.start_step = -1
        self.end_step = -1
        self.end_loss = float("nan")

    def add(self, tensors: list[Tensor], start_step: int, end_step: int) -> None:
        """``mean += (x - mean) / (n + 1)`` (``swa_utils.AveragedModel``'s ``avg_fn``); the first member
        (``n == 0``) overwrites whatever ``mean`` holds and sets ``start_step``."""
        if self.n == 0:
            self.mean = [t.detach().clone() for t in tensors]
            self.start_step = start_step
        else:
            assert self.mean is not None
            for m, t in zip(self.mean, tensors):
                m.add_((t.detach().to(m.device) - m) / (self.n + 1))
        self.n += 1
        self.end_step = end_step

    def add_average(self, other: ParameterAverage) -> None:
        """Add ``other``'s mean as one more member (a segment joining the final average)."""
        assert other.mean is not None
        self.add(other.mean, other.start_step, other.end_step)

    def copy(self) -> ParameterAverage:
        twin = ParameterAverage.from_state(self.state_dict())
        twin.mean = None if self.mean is None else [m.clone() for m in self.mean]
        return twin

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "n": self.n, "start_step": self.start_step, "end_step": self.end_step,
                "end_loss": self.end_loss}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ParameterAverage:
        average = cls()
        average.mean, average.n = state["mean"], state["n"]
        average.start_step, average.end_step = state["start_step"], state["end_step"]
        average.end_loss = state["end_loss"]
        return average


@torch.no_grad()
def update_bn(model: nn.Module, forward: Callable[[Tensor], Any], batches: Iterator[Tensor],
              steps: int = BN_UPDATE_STEPS) -> None:
    """Recompute every batch norm's running statistics as the plain mean over ``steps`` batches (momentum
    ``None``), running ``forward(x)`` in training mode (``swa_utils.update_bn``)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    for _ in range(steps):
        forward(next(batches))
    model.train(was_training)
    for m, momentum in momenta.items():
        m.momentum = momentum
