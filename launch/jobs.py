"""A sweep's jobs and their state.

A job is one ``dg_meta.train`` invocation; its run folder, inside the sweep folder, is the run's name
``ALGORITHM/DATASET/te<i>/hp<s>/trial<t>-<hash>`` (``dg_meta.train.run_name``; the hash covers every other
resolved argument), so the same arguments always map to the same folder and launching twice starts nothing
that is done. The same name labels the job in ``status``, in TensorBoard (``tensorboard --logdir SWEEP``) and
in the Slurm task's log. Files a job's folder may hold besides the run's own:

- ``job.json``: written by the launcher: the train arguments, CPUs, launcher, Slurm job id and log paths;
- ``attempt.json``: written by the runner when an attempt starts: host, pid, attempt number;
- ``log.txt``: the runner's lines (attempt starts, resumes, tracebacks) and, off Slurm, the run's output;
- ``error.txt``: the traceback of the last failed attempt (removed when the job is launched again).

The sweep folder's ``sweep.json`` lists every job ever launched into it, so ``status`` knows the jobs that
have not started.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dg_meta import registry
from dg_meta.atomic import atomic_write_json
from dg_meta.errors import UsageError
from dg_meta.heartbeat import format_duration, read_heartbeat
from dg_meta.train import parse_args, resolve_run, run_name

MANIFEST = "sweep.json"
JOB_FILE = "job.json"
ATTEMPT_FILE = "attempt.json"
LOG_FILE = "log.txt"
ERROR_FILE = "error.txt"
DONE_FILE = "done"

DONE, PENDING, RUNNING, FAILED, NOT_STARTED = "done", "pending", "running", "failed", "not started"
STATES = (DONE, PENDING, RUNNING, FAILED, NOT_STARTED)
ACTIVE = (PENDING, RUNNING)  # left alone by launch and delete-incomplete
SLURM_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD"}
SLURM_ACTIVE = SLURM_QUEUED | {"RUNNING", "COMPLETING", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING",
                               "STAGE_OUT"}
UNKNOWN_GRACE_S = 120  # a job neither squeue nor sacct knows yet counts as queued this long after submission


@dataclass(frozen=True)
class Job:
    """One train invocation: its arguments (``--output-dir`` excluded) and its run folder, which lies in the
    sweep folder ``sweep_dir`` (when given) at the job's ``name``."""

    argv: tuple[str, ...]
    output_dir: Path
    run: dict[str, Any] = field(compare=False, hash=False, repr=False)
    sweep_dir: Path | None = field(default=None, compare=False, hash=False, repr=False)

    @property
    def name(self) -> str:
        """The run folder's path in the sweep folder, e.g. ``ERM/RotatedDigits/te0/hp3/trial1-8e4fc7651d``."""
        if self.sweep_dir is None:
            return self.output_dir.name
        return self.output_dir.relative_to(self.sweep_dir).as_posix()


@dataclass(frozen=True)
class JobState:
    """A job's state; for failures ``detail`` is the last line of the traceback and ``log`` its log file."""

    job: Job
    state: str
    detail: str = ""
    log: Path | None = None


def make_job(argv: list[str], sweep_dir: Path) -> Job:
    """Resolve ``argv`` exactly as ``dg_meta.train`` does; the run folder is ``sweep_dir/<run name>``."""
    run = resolve_run(parse_args(argv))
    sweep_dir = Path(sweep_dir).resolve()
    return Job(tuple(argv), sweep_dir / run_name(run), run, sweep_dir)


def test_env_choices(n_envs: int, test_envs: list[int] | None, lodo_pairs: bool) -> list[list[int]]:
    """Every single held-out domain (or those given) and, with ``lodo_pairs``, each pair ``{t, v}`` that
    leave-one-domain-out selection needs for every single ``t``."""
    singles = list(range(n_envs)) if test_envs is None else test_envs
    bad = [e for e in singles if not 0 <= e < n_envs]
    if bad:
        raise UsageError(f"--test-envs {bad} out of range: the dataset has domains 0..{n_envs - 1}")
    choices = [[t] for t in singles]
    if lodo_pairs:
        pairs = sorted({tuple(sorted((t, v))) for t in singles for v in range(n_envs) if v != t})
        choices += [list(p) for p in pairs]
    return choices


def sweep_jobs(sweep_dir: Path, algorithms: list[str], datasets: list[str], *, data_dir: str | None = None,
               test_envs: list[int] | None = None, lodo_pairs: bool = False, n_hparams: int = 1,
               n_trials: int = 1, steps: int | None = None, checkpoint_freq: int | None = None,
               hparams: str | None = None, fs_episodes: int | None = None,
               plugins: tuple[str, ...] = ()) -> list[Job]:
    """The jobs of a sweep: datasets x algorithms x held-out domains x hparams seeds x trials.

    hparams seed 0 is the defaults, seed ``s > 0`` a random-search draw; trial ``t`` sets both the split
    seed (``--trial-seed``) and the init/sampling seed (``--seed``).
    """
    if n_hparams < 1 or n_trials < 1:
        raise UsageError(f"--n-hparams and --n-trials must be >= 1, got {n_hparams} and {n_trials}")
    for module in plugins:
        registry.load_plugin(module)
    common: list[str] = [f"--plugin={m}" for m in plugins]
    if data_dir is not None:
        common += ["--data-dir", os.path.abspath(data_dir)]
    for flag, value in (("--steps", steps), ("--checkpoint-freq", checkpoint_freq), ("--hparams", hparams),
                        ("--fs-episodes", fs_episodes)):
        if value is not None:
            common += [flag, str(value)]
    jobs = []
    for dataset in datasets:
        n_envs = len(registry.get_dataset(dataset).ENVIRONMENTS)
        envs_list = test_env_choices(n_envs, test_envs, lodo_pairs)
        for algorithm, envs, hseed, trial in itertools.product(algorithms, envs_list, range(n_hparams),
                                                              range(n_trials)):
            argv = ["--algorithm", algorithm, "--dataset", dataset, "--test-envs", *map(str, envs),
                    "--hparams-seed", str(hseed), "--trial-seed", str(trial), "--seed", str(trial), *common]
            jobs.append(make_job(argv, sweep_dir))
    return list(dict.fromkeys(jobs))


def record_manifest(sweep_dir: Path, jobs: list[Job]) -> None:
    """Add ``jobs`` to the sweep folder's ``sweep.json``."""
    path = Path(sweep_dir) / MANIFEST
    entries = json.loads(path.read_text())["jobs"] if path.exists() else {}
    entries.update({job.name: list(job.argv) for job in jobs})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"jobs": entries})


def manifest_jobs(sweep_dir: Path) -> list[Job]:
    """The jobs listed in ``sweep.json`` plus any run folder found at any depth in the sweep folder."""
    sweep_dir = Path(sweep_dir).resolve()
    path = sweep_dir / MANIFEST
    if not sweep_dir.is_dir():
        raise UsageError(f"sweep folder {sweep_dir} does not exist: launch a sweep there first")
    entries = json.loads(path.read_text())["jobs"] if path.exists() else {}
    for folder in sorted(p.parent for p in sweep_dir.rglob(JOB_FILE)):
        name = folder.relative_to(sweep_dir).as_posix()
        entries.setdefault(name, json.loads((folder / JOB_FILE).read_text())["argv"])
    return [Job(tuple(argv), sweep_dir / name, {}, sweep_dir) for name, argv in sorted(entries.items())]


def delete_run_folder(job: Job) -> None:
    """Delete the job's run folder and the folders above it that it leaves empty, up to the sweep folder."""
    shutil.rmtree(job.output_dir)
    if job.sweep_dir is None:
        return
    for parent in job.output_dir.relative_to(job.sweep_dir).parents[:-1]:
        folder = job.sweep_dir / parent
        if any(folder.iterdir()):
            return
        folder.rmdir()


def write_job_file(job: Job, **info: Any) -> None:
    job.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(job.output_dir / JOB_FILE, {"argv": list(job.argv), **info})


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _expand_array(job_id: str) -> list[str]:
    """``12_[0-3,5%2]`` -> ``12_0 .. 12_3, 12_5`` (squeue/sacct's compressed pending array tasks)."""
    if "_[" not in job_id:
        return [job_id]
    base, spec = job_id.split("_[", 1)
    ids = []
    for part in spec.rstrip("]").split("%")[0].split(","):
        low, _, high = part.partition("-")
        ids += [f"{base}_{i}" for i in range(int(low), int(high or low) + 1)]
    return ids


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """``{job id: state}`` from ``squeue`` (active jobs) and ``sacct`` (finished ones); ``{}`` off Slurm."""
    if not job_ids:
        return {}
    states: dict[str, str] = {}
    commands = (["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(sorted(set(job_ids)))],
                ["squeue", "-h", "-r", "-o", "%i|%T"])
    for command in commands:
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in out.splitlines():
            if "|" in line:
                jid, state = line.split("|", 1)
                for one in _expand_array(jid.strip()):
                    states[one] = state.split()[0] if state.split() else "UNKNOWN"
    return states


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def job_states(jobs: list[Job]) -> list[JobState]:
    """The state of every job: done, pending (queued), running (with its progress), failed (with why) or
    not started."""
    infos = {job: read_json(job.output_dir / JOB_FILE) for job in jobs}
    slurm = slurm_states([i["slurm_job_id"] for i in infos.values() if i.get("slurm_job_id")])
    return [_job_state(job, infos[job], slurm) for job in jobs]


def _job_state(job: Job, info: dict[str, Any], slurm: dict[str, str]) -> JobState:
    folder = job.output_dir
    log = Path(info["slurm_log"]) if info.get("slurm_log") else folder / LOG_FILE
    if (folder / DONE_FILE).exists():
        return JobState(job, DONE)
    if (folder / ERROR_FILE).exists():
        return JobState(job, FAILED, last_line(folder / ERROR_FILE), log)
    if info.get("slurm_job_id"):
        state = slurm.get(info["slurm_job_id"], "UNKNOWN")
        recent = time.time() - info.get("submitted", 0) < UNKNOWN_GRACE_S
        if state in SLURM_QUEUED or (state == "UNKNOWN" and recent):
            return JobState(job, PENDING, f"slurm job {info['slurm_job_id']} {state}", log)
        if state in SLURM_ACTIVE:
            return JobState(job, RUNNING, f"slurm job {info['slurm_job_id']} {state}" + _progress(folder), log)
        return JobState(job, FAILED, f"slurm job {info['slurm_job_id']} ended {state} without a traceback", log)
    attempt = read_json(folder / ATTEMPT_FILE)
    if attempt:
        if attempt.get("host") != socket.gethostname():
            return JobState(job, RUNNING, f"pid {attempt.get('pid')} on {attempt.get('host')} (not checked)"
                            + _progress(folder), log)
        if _pid_alive(int(attempt["pid"])):
            return JobState(job, RUNNING, f"pid {attempt['pid']}" + _progress(folder), log)
        return JobState(job, FAILED, f"process {attempt['pid']} ended without finishing (killed?)", log)
    launcher_pid = info.get("launcher_pid")
    if launcher_pid and info.get("launcher_host") == socket.gethostname() and _pid_alive(int(launcher_pid)):
        return JobState(job, PENDING, f"queued in launcher process {launcher_pid}", log)
    return JobState(job, NOT_STARTED)


def _progress(folder: Path) -> str:
    """``, step 120/500, ETA 4m10s`` from the run's heartbeat (empty before its first checkpoint)."""
    beat = read_heartbeat(folder)
    if beat is None:
        return ", no checkpoint yet"
    return f", step {beat.step}/{beat.steps}, ETA {format_duration(beat.eta_seconds())}"
