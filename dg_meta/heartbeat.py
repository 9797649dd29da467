"""A run's heartbeat: ``heartbeat.json`` in its folder, rewritten (atomically) at every checkpoint.

It says how far the run is (``step`` of ``steps``), when it last reported, and how long a step takes in this
attempt (training and evaluation together, so the ETA includes the evaluations still to come). ``sweep
status`` reads it to show each running job's progress and ETA without touching the checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from dg_meta.atomic import atomic_write_json

HEARTBEAT_FILE = "heartbeat.json"


@dataclass(frozen=True)
class Heartbeat:
    step: int
    steps: int
    updated: float  # time.time() of the last write
    seconds_per_step: float  # wall time per step over this attempt, evaluation included

    def eta_seconds(self, now: float | None = None) -> float:
        """Seconds left: the remaining steps at this attempt's pace, less the time since the last beat."""
        elapsed = (time.time() if now is None else now) - self.updated
        return max(0.0, (self.steps - self.step) * self.seconds_per_step - elapsed)


def write_heartbeat(output_dir: Path, step: int, steps: int, attempt_start_step: int, attempt_start: float) -> None:
    """Record ``step`` of ``steps``; the pace is measured from ``attempt_start`` (when this attempt had done
    ``attempt_start_step`` steps)."""
    now = time.time()
    pace = (now - attempt_start) / max(1, step - attempt_start_step)
    atomic_write_json(Path(output_dir) / HEARTBEAT_FILE,
                      {"step": step, "steps": steps, "updated": now, "seconds_per_step": pace})


def read_heartbeat(output_dir: Path) -> Heartbeat | None:
    """The run's last heartbeat, or None when it has not written one (or it is unreadable)."""
    try:
        data = json.loads((Path(output_dir) / HEARTBEAT_FILE).read_text())
        return Heartbeat(int(data["step"]), int(data["steps"]), float(data["updated"]),
                         float(data["seconds_per_step"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def format_duration(seconds: float) -> str:
    """``45s``, ``12m05s``, ``3h07m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
