"""Penalty weights that switch on after an annealing period, with the step counter they read.

IRM, V-REx, Fishr, IB-ERM/IB-IRM, RDM and EQRM (Gulrajani & Lopez-Paz 2021, DomainBed ``algorithms.py``)
train with a small penalty weight (or plain ERM) for ``anneal_iters`` steps, then switch to the full weight
and, at that very step, rebuild their Adam optimizer: Adam's moment estimates from the annealing period do
not fit the sudden jump in gradient scale. ``PenaltySchedule`` holds the step count (saved in the algorithm's
``state_dict``, so a resumed run switches at the same step) and says when to switch.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class PenaltySchedule(nn.Module):
    """``weight()`` is ``before`` for the first ``anneal_iters`` updates, then ``after``.

    Call ``switching()`` before the update's optimizer step (True exactly on update number ``anneal_iters``,
    counting from 0: rebuild the optimizer then, as DomainBed does) and ``advance()`` after it.
    """

    def __init__(self, after: float, anneal_iters: int, before: float = 1.0):
        super().__init__()
        self.after, self.anneal_iters, self.before = after, int(anneal_iters), before
        self.count = 0

    def weight(self) -> float:
        return self.after if self.count >= self.anneal_iters else self.before

    def switching(self) -> bool:
        return self.count == self.anneal_iters

    def advance(self) -> None:
        self.count += 1

    def get_extra_state(self) -> Any:
        return {"count": self.count}

    def set_extra_state(self, state: Any) -> None:
        self.count = int(state["count"])
