"""Launchers: run a list of jobs in-process, on worker processes, or on Slurm through submitit.

Every launcher first clears the job's old ``error.txt`` and writes its ``job.json``; the job itself runs
``dg_meta.launch.runner.execute`` with the same CPU-thread count everywhere, so one job gives the same
``results.jsonl`` whichever launcher ran it.

- ``local``: one job after another in this process; a failing job is reported and the next one starts.
- ``multiprocess``: ``workers`` worker threads, each running jobs as ``python -m dg_meta.launch.runner``
  subprocesses; with GPUs each worker owns one (``CUDA_VISIBLE_DEVICES``).
- ``slurm``: one submitit job array (``slurm_array_parallelism`` tasks at a time) named after the sweep
  (``dg_meta:ALGORITHMS:DATASETS``; an array has one name for all its tasks); each task is a ``SlurmJob``, a
  ``submitit.helpers.Checkpointable``: its log starts with the run's folder, and on preemption or timeout
  submitit calls its ``checkpoint``, which requeues the same call, and the run resumes from its own
  ``checkpoint.pt``. With ``tasks`` > 1 (``--gpus-per-job`` / ``--tasks-per-job``) each job is one run on that
  many processes of one node (submitit ``tasks_per_node``, one GPU each with ``gpus_per_node``): every task joins
  the run's process group (``dg_meta.distributed`` reads Slurm's variables), ``srun --kill-on-bad-exit`` ends the
  others when one fails, and a requeue restarts (and resumes) all of them.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
import torch

from dg_meta.errors import UsageError

from .jobs import ACTIVE, ERROR_FILE, LOG_FILE, Job, job_states, write_job_file
from .runner import execute, log_line

LAUNCHERS = ("local", "multiprocess", "slurm")
SLURM_NAME_CHARS = 64


def _prepare(job: Job, launcher: str, cpus: int, **info: Any) -> None:
    job.output_dir.mkdir(parents=True, exist_ok=True)
    (job.output_dir / ERROR_FILE).unlink(missing_ok=True)
    write_job_file(job, cpus=cpus, launcher=launcher, submitted=time.time(), launcher_pid=os.getpid(),
                   launcher_host=socket.gethostname(), **info)


def _queue(jobs: list[Job], launcher: str, cpus: int) -> None:
    """Mark ``jobs`` as queued in this launcher process, so ``status`` shows them pending until they start."""
    for job in jobs:
        _prepare(job, launcher, cpus)


def launch_local(jobs: list[Job], cpus: int = 1) -> None:
    """Run ``jobs`` one after another in this process (their output goes to each ``log.txt``)."""
    _queue(jobs, "local", cpus)
    for i, job in enumerate(jobs, 1):
        _prepare(job, "local", cpus)
        print(f"[{i}/{len(jobs)}] {job.name}", flush=True)
        try:
            execute(job.output_dir, list(job.argv), cpus, capture=True)
        except Exception as exc:
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            print(f"  failed: {last} (log: {job.output_dir / LOG_FILE})", flush=True)


def share_of_cores(cpus: int | None, workers: int | None, cores: int, gpus: int) -> tuple[int, int]:
    """``(cpus per job, workers)`` for the multiprocess launcher: each job gets its share of the cores.

    Given neither: one worker per GPU (else one per core) and ``cores // workers`` threads each; given only
    ``workers``: ``cores // workers`` threads each; given only ``cpus``: ``cores // cpus`` workers; both: as given.
    """
    if workers is None:
        workers = gpus or max(1, cores // (cpus or 1))
    return (cpus or max(1, cores // workers)), workers


def launch_multiprocess(jobs: list[Job], cpus: int | None = None, workers: int | None = None) -> None:
    """Run ``jobs`` on ``workers`` subprocesses at a time, each with its share of the cores (``share_of_cores``)."""
    gpus = torch.cuda.device_count()
    cpus, workers = share_of_cores(cpus, workers, os.cpu_count() or 1, gpus)
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        slots.put(slot)

    def run_one(job: Job) -> None:
        slot = slots.get()
        try:
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            _prepare(job, "multiprocess", cpus)
            with open(job.output_dir / LOG_FILE, "a") as log:
                code = subprocess.call([sys.executable, "-m", "dg_meta.launch.runner", str(job.output_dir)],
                                       stdout=log, stderr=subprocess.STDOUT, env=env)
            print(f"{job.name}: {'done' if code == 0 else f'failed (log: {job.output_dir / LOG_FILE})'}",
                  flush=True)
        finally:
            slots.put(slot)

    _queue(jobs, "multiprocess", cpus)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(run_one, jobs))


class SlurmJob(submitit.helpers.Checkpointable):
    """One job on Slurm. On preemption or timeout (submitit's USR2 signal) ``checkpoint`` resubmits the same
    call, so the requeued task resumes the run from its own ``checkpoint.pt``."""

    def __call__(self, output_dir: str, argv: list[str], cpus: int) -> dict:
        print(f"dg_meta run {output_dir}", flush=True)
        return execute(Path(output_dir), argv, cpus)

    def checkpoint(self, output_dir: str, argv: list[str], cpus: int) -> submitit.helpers.DelayedSubmission:
        log_line(Path(output_dir), "preempted or timed out: requeueing; the run resumes from its checkpoint")
        return submitit.helpers.DelayedSubmission(self, output_dir, argv, cpus)


@dataclass
class SlurmOptions:
    """What each Slurm job asks for: ``tasks`` processes on one node (one run on several processes when > 1),
    each with ``cpus`` CPUs and ``gpus`` GPUs; ``sbatch`` holds extra ``#SBATCH`` options (``{"qos": "high"}``)."""

    partition: str | None = None
    time_min: int = 240
    cpus: int = 1
    gpus: int = 0
    tasks: int = 1
    mem_gb: float | None = None
    array_parallelism: int = 256
    max_requeues: int = 3
    sbatch: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)


def _flag_values(jobs: list[Job], flag: str) -> list[str]:
    return list(dict.fromkeys(job.argv[job.argv.index(flag) + 1] for job in jobs if flag in job.argv))


def slurm_array_name(jobs: list[Job]) -> str:
    """``dg_meta:ALGORITHMS:DATASETS`` of ``jobs`` (comma-separated), cut to 64 characters with ``...``."""
    name = ":".join(["dg_meta", ",".join(_flag_values(jobs, "--algorithm")), ",".join(_flag_values(jobs, "--dataset"))])
    return name if len(name) <= SLURM_NAME_CHARS else name[:SLURM_NAME_CHARS - 3] + "..."


def launch_slurm(jobs: list[Job], folder: Path, options: SlurmOptions) -> list[submitit.Job]:
    """Submit ``jobs`` as one job array; submitit's files and the task logs go to ``folder``."""
    if shutil.which("sbatch") is None:
        raise UsageError("--launcher slurm needs Slurm's sbatch on PATH: run on a Slurm login node, or use "
                         "--launcher local or multiprocess")
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=options.max_requeues)
    params: dict[str, Any] = {"name": slurm_array_name(jobs), "timeout_min": options.time_min,
                              "cpus_per_task": options.cpus, "gpus_per_node": options.gpus * options.tasks,
                              "tasks_per_node": options.tasks, "nodes": 1,
                              "slurm_array_parallelism": options.array_parallelism}
    if options.tasks > 1:  # one failed process ends the job's others at once (no wait on a dead peer)
        params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
    if options.partition:
        params["slurm_partition"] = options.partition
    if options.mem_gb is not None:
        params["mem_gb"] = options.mem_gb
    if options.sbatch:
        params["slurm_additional_parameters"] = dict(options.sbatch)
    if options.setup:
        params["slurm_setup"] = list(options.setup)
    executor.update_parameters(**params)
    for job in jobs:
        _prepare(job, "slurm", options.cpus, slurm_job_id=None)
    submitted = executor.map_array(SlurmJob(), [str(j.output_dir) for j in jobs], [list(j.argv) for j in jobs],
                                   [options.cpus] * len(jobs))
    for job, sub in zip(jobs, submitted):
        _prepare(job, "slurm", options.cpus, slurm_job_id=sub.job_id, slurm_log=str(sub.paths.stderr))
    return submitted


def wait(jobs: list[Job], poll_s: float = 3.0, timeout_s: float | None = None) -> None:
    """Block until no job of ``jobs`` is pending or running."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while any(s.state in ACTIVE for s in job_states(jobs)):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"jobs still running after {timeout_s} s")
        time.sleep(poll_s)
