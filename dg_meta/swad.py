"""SWAD: dense stochastic weight averaging with the loss-valley rule (Cha et al., NeurIPS 2021).

Official code: khanrc/swad (``domainbed/swad.py`` class ``LossValley``, ``domainbed/lib/swa_utils.py``,
``domainbed/trainer.py``; defaults in ``config.yaml``: ``n_converge`` 3, ``n_tolerance`` 6,
``tolerance_ratio`` 0.3). ``python -m dg_meta.train --swad`` applies it to any DG algorithm:

- every step, the algorithm's parameters join a running mean over the current *segment* (the steps since the
  last checkpoint);
- at every checkpoint the segment is closed with the validation loss of the online model (cross-entropy on the
  training domains' ``out`` splits, ``tr_outloss`` in the official trainer) and handed to ``LossValley``:
  the run has *converged* when the oldest of the last ``n_converge`` segments has the lowest loss; the threshold
  is then ``(1 + tolerance_ratio)`` times their mean loss; from there each segment ``n_tolerance`` checkpoints
  old joins the final average while the smallest loss of the last ``n_tolerance`` segments stays under the
  threshold; when it does not, the valley is *dead* and training stops early (as the official trainer does);
- at the end the remaining segments join while their loss stays under the threshold, and the final weights are
  the mean of the segment means (every segment counts once, as ``AveragedModel.update_parameters`` of a segment
  does). Batch-norm running statistics are then recomputed on training batches (``update_bn``; 500 steps).

The selection follows the official code line by line, quirks included: the final average starts as a copy of
the converged segment with count 0 (so its first member overwrites it), at convergence it takes the window
``smooth_q[start + 1 : n_tolerance - n_converge + 1]`` (one past the first segment under the threshold), after
which the head of ``smooth_q`` joins at every checkpoint: the converged segment can join twice, and while
``smooth_q`` is not yet full (convergence within the first ``n_tolerance`` checkpoints) the same head joins at
every checkpoint until the queue fills.
Departures: only parameters are averaged; buffers (batch-norm statistics, an algorithm's own running state)
are those of the online model at the end, then batch norms are recomputed (the official code takes the buffers
of the segment that opens the average: they matter only through batch norm, which both recompute). The first
segment holds ``checkpoint_freq`` steps (the official trainer also evaluates after update 0, a one-step
segment).
"""

from __future__ import annotations

from collections import deque
from copy import deepcopy
from typing import Any

import torch
from torch import Tensor, nn

from dg_meta.weight_averaging import ParameterAverage

N_CONVERGE, N_TOLERANCE, TOLERANCE_RATIO = 3, 6, 0.3


class LossValley:
    """The official ``LossValley`` rule over closed segments; ``final`` is the average it selects."""

    def __init__(self, n_converge: int = N_CONVERGE, n_tolerance: int = N_TOLERANCE,
                 tolerance_ratio: float = TOLERANCE_RATIO):
        self.n_converge, self.n_tolerance, self.tolerance_ratio = n_converge, n_tolerance, tolerance_ratio
        self.converge_q: deque[ParameterAverage] = deque(maxlen=n_converge)
        self.smooth_q: deque[ParameterAverage] = deque(maxlen=n_tolerance)
        self.final: ParameterAverage | None = None
        self.converge_step: int | None = None
        self.threshold = float("nan")
        self.dead_valley = False

    def _smooth_loss(self, start: int = 0) -> float:
        return min(s.end_loss for s in list(self.smooth_q)[start:])

    def observe(self, segment: ParameterAverage) -> None:
        """Take a closed segment (``end_loss`` set): detect convergence, extend the average, or end the valley."""
        if self.dead_valley:
            return
        self.converge_q.append(segment)
        self.smooth_q.append(segment)
        if self.converge_step is None:
            self._try_converge()
            return
        if self.smooth_q[0].end_step < self.converge_step:
            return
        if self._smooth_loss() > self.threshold:
            self.dead_valley = True
            return
        assert self.final is not None
        self.final.add_average(self.smooth_q[0])

    def _try_converge(self) -> None:
        if len(self.converge_q) < self.n_converge:
            return
        losses = [s.end_loss for s in self.converge_q]
        if min(range(len(losses)), key=losses.__getitem__) != 0:
            return
        self.converge_step = self.converge_q[0].end_step
        self.final = self.converge_q[0].copy()  # AveragedModel(segment): its weights, n_averaged 0
        self.final.n, self.final.start_step, self.final.end_step = 0, -1, -1
        self.threshold = sum(losses) / len(losses) * (1.0 + self.tolerance_ratio)
        if self.n_tolerance < self.n_converge:
            for segment in list(self.converge_q)[1:1 + self.n_converge - self.n_tolerance]:
                self.final.add_average(segment)
        elif self.n_tolerance > self.n_converge:
            window = list(self.smooth_q)[:self.n_tolerance - self.n_converge + 1]
            start = next((i + 1 for i in reversed(range(len(window))) if window[i].end_loss > self.threshold), 0)
            for segment in window[start + 1:]:
                self.final.add_average(segment)

    def final_average(self) -> ParameterAverage:
        """The selected average (the official ``get_final_model``; this object is left unchanged): before
        convergence, the last segment; otherwise ``final`` plus the segments still in the valley."""
        if self.converge_step is None:
            return self.converge_q[-1]
        assert self.final is not None
        final = self.final.copy()
        if not self.dead_valley:
            rest = list(self.smooth_q)[1:]
            while rest and min(s.end_loss for s in rest) <= self.threshold:
                final.add_average(rest.pop(0))
        return final

    def state_dict(self) -> dict[str, Any]:
        segments = {id(s): s for s in [*self.converge_q, *self.smooth_q]}
        keys = list(segments)
        return {"segments": [s.state_dict() for s in segments.values()],
                "converge_q": [keys.index(id(s)) for s in self.converge_q],
                "smooth_q": [keys.index(id(s)) for s in self.smooth_q],
                "final": None if self.final is None else self.final.state_dict(),
                "converge_step": self.converge_step, "threshold": self.threshold, "dead_valley": self.dead_valley}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        segments = [ParameterAverage.from_state(s) for s in state["segments"]]
        self.converge_q = deque((segments[i] for i in state["converge_q"]), maxlen=self.n_converge)
        self.smooth_q = deque((segments[i] for i in state["smooth_q"]), maxlen=self.n_tolerance)
        self.final = None if state["final"] is None else ParameterAverage.from_state(state["final"])
        self.converge_step, self.threshold = state["converge_step"], state["threshold"]
        self.dead_valley = state["dead_valley"]


class SWAD:
    """Dense averaging of a model's parameters in segments, closed at checkpoints, selected by ``LossValley``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.segment = ParameterAverage()
        self.valley = LossValley()

    def _parameters(self) -> list[Tensor]:
        return [p.detach() for p in self.model.parameters()]

    def update(self, step: int) -> None:
        """Add the model's current parameters (after update number ``step``) to the open segment."""
        self.segment.add(self._parameters(), step, step)

    def close_segment(self, val_loss: float) -> None:
        """End the open segment with the online model's validation loss; frozen copies live on the CPU."""
        assert self.segment.mean is not None
        self.segment.mean = [m.cpu() for m in self.segment.mean]
        self.segment.end_loss = val_loss
        self.valley.observe(self.segment)
        self.segment = ParameterAverage()

    @property
    def dead_valley(self) -> bool:
        return self.valley.dead_valley

    def averaged_model(self) -> tuple[nn.Module, ParameterAverage]:
        """A copy of the model carrying the selected average, and that average (its steps and count)."""
        average = self.valley.final_average()
        copy = deepcopy(self.model)
        with torch.no_grad():
            for p, m in zip(copy.parameters(), average.mean or []):
                p.copy_(m.to(p.device))
        return copy, average

    def state_dict(self) -> dict[str, Any]:
        return {"segment": self.segment.state_dict(), "valley": self.valley.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.segment = ParameterAverage.from_state(state["segment"])
        self.valley.load_state_dict(state["valley"])
