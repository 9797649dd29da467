"""TensorBoard events of one run, in the protocol's terms: what each scalar is for in this run.

Tags name domains (the dataset's ``ENVIRONMENTS``) by their role in the run:

- ``test/<domain>``: a held-out domain's accuracy on its ``in`` split (``env{i}_in_acc``, the number
  ``dg_meta.selection`` reports; its ``out`` split is the oracle's validation); ``test_fs/<domain>``: its
  few-shot episode accuracy (episodes from all its examples);
- ``val/<domain>``: a training domain's ``out`` split (training-domain validation); ``val_fs/<domain>``: its
  few-shot episode accuracy (``per_domain`` protocol, drawn from that split);
- ``train/<domain>``: a training domain's ``in`` split, the examples it trains on;
- ``paper/test_acc`` and ``paper/val_acc``: the numbers a paper reports, the mean over the held-out domains and
  the mean over the training domains' ``out`` splits; ``paper/test_fs_acc`` and ``paper/val_fs_acc``: the same
  for episodes (the ``class_pool`` protocol's pooled ``test_fs_acc`` / ``val_fs_acc``);
- ``selected/<method>_test_acc`` and ``selected/<method>_val_acc``, for the selection methods that one run can
  compute on its own checkpoints (``dg_meta.selection``'s ``training_domain`` and ``oracle``, one held-out
  domain): at each checkpoint, the checkpoint each method would pick so far;
- ``loss/<key>``: the mean of the last ``log_every`` steps' losses (and at checkpoints), read back from the
  device once per window; ``time/<key>`` (the record's wall times, ``*_time``) at checkpoints.

When the run finishes, its HParams session is written (``torch.utils.tensorboard.summary.hparams`` on the run's
own writer, so no sub-run folder): every hparam declared by any registered algorithm or dataset, plus the
algorithm, dataset, held-out domains and seeds. An hparam this run does not have gets a sentinel of its
column's type: ``-1`` for numbers (every declared numeric hparam's default and random-search draws are
non-negative, as ``tests/test_tensorboard.py`` checks), ``"n/a"`` for text (booleans and lists are written as
text). Not NaN: TensorBoard 2.21's HParams plugin drops NaN hparams
as unset (``plugins/hparams/list_session_groups.py``, ``_add_session``) and its parallel-coordinates view
leaves out every session with an unset or NaN value (``tf-hparams-parallel-coords-plot``,
``_computeValidSessionGroups``). Not ``"n/a"`` in a number column either: each run writes its own experiment
summary and the plugin reads the first it finds (``backend_context.py``, ``_find_experiment_tag``), so every
run must give a column the same type. The HParams metrics are the last values of the ``selected/*`` and
``paper/*`` series: the plugin reads a metric as the last point of a scalar series of the session's run
(``read_last_scalars``), so reusing series the run logs anyway adds no single-point tags to the Scalars
dashboard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dg_meta import registry, selection
from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams

RUN_SELECTION_METHODS = ("training_domain", "oracle")
ABSENT_NUMBER = -1
ABSENT_TEXT = "n/a"
POINTS_PER_RUN = 50
METRICS = (
    *(f"selected/{method}_{split}_acc" for method in RUN_SELECTION_METHODS for split in ("test", "val")),
    "paper/test_acc", "paper/val_acc", "paper/test_fs_acc", "paper/val_fs_acc",
)


def resolve_log_every(log_every: int | None, steps: int) -> int:
    """Steps per logged loss point: ``log_every``, or ``steps // 50`` (at least 1) when not given."""
    if log_every is None:
        return max(1, steps // POINTS_PER_RUN)
    if log_every < 1:
        raise UsageError(f"--log-every must be >= 1, got {log_every}")
    return log_every


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def domain_scalars(test_envs: list[int], record: dict, env_names: list[str]) -> dict[str, float]:
    """The ``test/``, ``val/``, ``train/``, ``*_fs/`` and ``paper/`` scalars of one result record."""
    scalars: dict[str, float] = {}
    means: dict[str, list[float]] = {"test_acc": [], "val_acc": [], "test_fs_acc": [], "val_fs_acc": []}
    for env, name in enumerate(env_names):
        held_out = env in test_envs
        keys = ((f"test/{name}", "in", "test_acc"), (f"test_fs/{name}", "fs", "test_fs_acc")) if held_out else \
            ((f"train/{name}", "in", None), (f"val/{name}", "out", "val_acc"), (f"val_fs/{name}", "fs", "val_fs_acc"))
        for tag, split, paper in keys:
            value = record.get(f"env{env}_{split}_acc")
            if value is not None:
                scalars[tag] = value
                if paper is not None:
                    means[paper].append(value)
    for prefix in ("test", "val"):  # class_pool: one pooled sampler per role
        if f"{prefix}_fs_acc" in record:
            means[f"{prefix}_fs_acc"].append(record[f"{prefix}_fs_acc"])
    scalars.update({f"paper/{key}": _mean(values) for key, values in means.items() if values})
    return scalars


def selection_scalars(test_envs: list[int], records: list[dict]) -> dict[str, float]:
    """``selected/<method>_{test,val}_acc``: what each one-run selection method picks among ``records``."""
    if len(test_envs) != 1 or f"env{test_envs[0]}_in_acc" not in records[-1]:
        return {}
    scalars = {}
    for method in RUN_SELECTION_METHODS:
        choice = selection.METHODS[method](records, test_envs[0])
        if choice is not None:
            scalars[f"selected/{method}_val_acc"], scalars[f"selected/{method}_test_acc"] = choice
    return scalars


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json.dumps(value)


def hparam_columns(run: dict[str, Any], env_names: list[str]) -> dict[str, float | str]:
    """One HParams column per hparam any registered algorithm or dataset declares (sentinels where this run has
    none), the run's own extra hparams, and ``algorithm``, ``dataset``, ``test_envs`` (names), the seeds."""
    numeric: dict[str, bool] = {}
    owners = [*map(registry.get_algorithm, registry.algorithm_names()),
              *map(registry.get_dataset, registry.dataset_names())]
    for owner in owners:
        for name, hp in declared_hparams(owner).items():
            numeric[name] = numeric.get(name, True) and _is_number(hp.default)
    for name, value in run["hparams"].items():
        numeric.setdefault(name, _is_number(value))
    columns: dict[str, float | str] = {}
    for name, is_number in sorted(numeric.items()):
        value = run["hparams"].get(name)
        if is_number:
            columns[name] = ABSENT_NUMBER if value is None else value
        else:
            columns[name] = ABSENT_TEXT if value is None else _text(value)
    columns.update(algorithm=run["algorithm"], dataset=run["dataset"],
                   test_envs=",".join(env_names[e] for e in run["test_envs"]), hparams_seed=run["hparams_seed"],
                   trial_seed=run["trial_seed"], seed=run["seed"])
    return columns


class RunLog:
    """The TensorBoard writer of one run in ``logdir``, resumed at ``start_step`` (later events are purged)."""

    def __init__(self, logdir: Path, run: dict[str, Any], env_names: list[str], start_step: int, log_every: int):
        from torch.utils.tensorboard import SummaryWriter

        self.run, self.env_names, self.log_every = run, list(env_names), log_every
        self.writer = SummaryWriter(str(logdir), purge_step=start_step + 1 if start_step else None)
        self.window: dict[str, Any] = {}
        self.window_steps = 0

    def add_losses(self, losses: dict[str, Any], step: int) -> None:
        """Accumulate one step's losses on their device; every ``log_every`` steps and at each checkpoint
        step, write their mean since the last point (one host read-back per point)."""
        for key, value in losses.items():
            value = value.detach() if isinstance(value, torch.Tensor) else value
            self.window[key] = self.window[key] + value if key in self.window else value
        self.window_steps += 1
        run = self.run
        if step % self.log_every and step % run["checkpoint_freq"] and step != run["steps"]:
            return
        on_device = [key for key, total in self.window.items() if isinstance(total, torch.Tensor)]
        read = torch.stack([self.window[key].float() for key in on_device]).tolist() if on_device else []
        totals = {**self.window, **dict(zip(on_device, read))}
        for key, total in totals.items():
            self.writer.add_scalar(f"loss/{key}", float(total) / self.window_steps, step)
        self.window, self.window_steps = {}, 0

    def add_checkpoint(self, records: list[dict]) -> None:
        """The accuracy, selection and timing scalars of the last of ``records`` (all the run's so far)."""
        record, test_envs = records[-1], self.run["test_envs"]
        scalars = {**domain_scalars(test_envs, record, self.env_names), **selection_scalars(test_envs, records)}
        scalars.update({f"time/{key}": value for key, value in record.items() if key.endswith("_time")})
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()  # on disk before the checkpoint: a resumed run never re-logs the steps up to it

    def finish(self) -> None:
        """Write the finished run's HParams session (its columns and ``METRICS``) and close the writer."""
        from torch.utils.tensorboard.summary import hparams

        # hparams() takes only the metric names from its dict: the values are the series' last points
        for summary in hparams(hparam_columns(self.run, self.env_names), dict.fromkeys(METRICS, 0.0)):
            self.writer.file_writer.add_summary(summary)
        self.writer.close()
