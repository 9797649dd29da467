"""The random-search space of a declared hparam, read through its ``HParam.sample``: the two ends of its
range (an rng stub that always draws the lowest or the highest value) and the values seeded draws produce."""

from __future__ import annotations

from typing import Any

import numpy as np

from dg_meta.hparams import HParam


class _EdgeRng:
    """Stands in for ``numpy.random.Generator``: every ``uniform``/``integers`` draw is its range's low end, or
    (``top``) its high end (``integers`` excludes ``high``, as numpy's does)."""

    def __init__(self, top: bool):
        self.top = top

    def uniform(self, low: float, high: float) -> float:
        return high if self.top else low

    def integers(self, low: int, high: int | None = None) -> int:
        if high is None:
            low, high = 0, low
        return high - 1 if self.top else low


def bounds(hp: HParam) -> tuple[Any, Any]:
    """The lowest and the highest value random search can draw for ``hp``."""
    return hp.draw(_EdgeRng(top=False)), hp.draw(_EdgeRng(top=True))


def drawn(hp: HParam, draws: int = 200) -> set:
    """The values of ``draws`` seeded draws of ``hp`` (every option of a small ``choice``)."""
    rng = np.random.default_rng(0)
    return {hp.draw(rng) for _ in range(draws)}
