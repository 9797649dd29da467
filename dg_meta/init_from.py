"""Initialising a model from another run's checkpoint (``--init-from RUN_DIR``, LastShot's ``teacher_run``).

``run_folder`` checks that a run folder holds a ``checkpoint.pt``; ``read_run_model`` reads that checkpoint's
model state (``weights_only=True``); ``load_matching`` copies into a module every floating-point tensor whose
name and shape match, and ``init_from_run`` does both and returns the one-line report the CLI prints.
Integer buffers (step counters, BatchNorm's ``num_batches_tracked``) count the source run's progress, not
its weights, so they are never copied.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from dg_meta.errors import UsageError

CHECKPOINT = "checkpoint.pt"


def run_folder(run_dir: str | Path, option: str) -> Path:
    """The absolute path of ``run_dir`` if it holds a ``checkpoint.pt``; otherwise a one-line ``UsageError``
    that names ``option`` (the flag or hparam that gave the folder)."""
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise UsageError(f"{option} {run_dir}: no such folder; pass the output folder of a run of "
                         "python -m dg_meta.train (its --output-dir)")
    if not (path / CHECKPOINT).is_file():
        raise UsageError(f"{option} {run_dir}: the folder holds no {CHECKPOINT}; pass the output folder of a run "
                         "that has saved a checkpoint (train it for at least --checkpoint-freq steps)")
    return path.resolve()


def read_run_model(run_dir: str | Path, option: str) -> dict[str, Tensor]:
    """The model state dict saved in ``run_dir/checkpoint.pt`` (on the CPU)."""
    state = torch.load(run_folder(run_dir, option) / CHECKPOINT, map_location="cpu", weights_only=True)
    return state["algorithm"]["model"]


def _weights(module: nn.Module) -> dict[str, Tensor]:
    """The module's floating-point tensors (not counters, not extra state such as a penalty schedule's step)."""
    return {k: v for k, v in module.state_dict().items() if isinstance(v, Tensor) and v.is_floating_point()}


def load_matching(module: nn.Module, state: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Copy into ``module`` every floating-point tensor of ``state`` whose name and shape match one of its own.

    Returns the names loaded and the names of the module's floating-point tensors left as they were
    (absent from ``state`` or of another shape), both in the module's order.
    """
    loaded, skipped = [], []
    with torch.no_grad():
        for name, tensor in _weights(module).items():
            source = state.get(name)
            if isinstance(source, Tensor) and source.is_floating_point() and source.shape == tensor.shape:
                tensor.copy_(source)
                loaded.append(name)
            else:
                skipped.append(name)
    return loaded, skipped


def init_from_run(module: nn.Module, run_dir: str | Path, option: str = "--init-from") -> str:
    """``load_matching`` from the run in ``run_dir``; returns the one-line report, or raises a ``UsageError``
    when no tensor matches (the run trained another architecture)."""
    loaded, skipped = load_matching(module, read_run_model(run_dir, option))
    if not loaded:
        raise UsageError(f"{option} {run_dir}: no tensor of that run matches this model by name and shape; pass a "
                         "run of the same architecture (same featurizer for this dataset)")
    return (f"init-from {run_dir}: loaded {len(loaded)} tensors; not loaded (absent or shape differs): "
            f"{', '.join(skipped) if skipped else 'none'}")
