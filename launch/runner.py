"""Run one job of a sweep, in-process (``execute``) or as ``python -m dg_meta.launch.runner RUN_DIR``.

An attempt records itself in ``attempt.json``, appends ``attempt N on HOST: starting`` or ``... resuming
from checkpoint.pt at step S`` to ``log.txt``, sets torch's CPU threads to the job's CPU count (so every
launcher computes the same numbers for the same job), and calls ``dg_meta.train.train``, which resumes
from the run's checkpoint. A failure's traceback goes to ``error.txt`` and ``log.txt`` and is re-raised.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from dg_meta import distributed
from dg_meta.atomic import atomic_write_json, atomic_write_text
from dg_meta.train import parse_args, resolve_run, train

from .jobs import ATTEMPT_FILE, DONE_FILE, ERROR_FILE, JOB_FILE, LOG_FILE, read_json

CHECKPOINT_FILE = "checkpoint.pt"


def log_line(output_dir: Path, message: str) -> None:
    """Append ``[dg_meta.launch TIME] message`` to the job's ``log.txt``."""
    with open(output_dir / LOG_FILE, "a") as f:
        f.write(f"[dg_meta.launch {time.strftime('%Y-%m-%d %H:%M:%S')}] {message}\n")


def _slurm_id() -> str | None:
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def _start_attempt(output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / ERROR_FILE).unlink(missing_ok=True)
    attempt = read_json(output_dir / ATTEMPT_FILE).get("attempt", 0) + 1
    atomic_write_json(output_dir / ATTEMPT_FILE, {"attempt": attempt, "host": socket.gethostname(),
                                                  "pid": os.getpid(), "slurm_job_id": _slurm_id(),
                                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    where = f"attempt {attempt} on {socket.gethostname()}" + (f" (slurm job {_slurm_id()})" if _slurm_id() else "")
    if (output_dir / DONE_FILE).exists():
        log_line(output_dir, f"{where}: already done")
    elif (output_dir / CHECKPOINT_FILE).exists():
        step = torch.load(output_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=True)["step"]
        log_line(output_dir, f"{where}: resuming from {CHECKPOINT_FILE} at step {step}")
    else:
        log_line(output_dir, f"{where}: starting")


def execute(output_dir: Path, argv: list[str], cpus: int = 1, capture: bool = False) -> dict[str, Any]:
    """Run (or resume) the job ``argv`` in ``output_dir`` with ``cpus`` torch threads; return its final record.

    With ``capture`` the run's stdout and stderr are appended to ``log.txt`` (in-process launchers). In a job of
    several tasks (a run on several processes, ``dg_meta.distributed``) every task trains; the first alone keeps
    the job's books (``attempt.json``, ``log.txt``, ``error.txt``).
    """
    output_dir = Path(output_dir)
    env = distributed.environment()
    books = env is None or env.rank == 0
    if books:
        _start_attempt(output_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(cpus)
    try:
        with open(output_dir / LOG_FILE, "a") as log, contextlib.ExitStack() as stack:
            if capture:
                stack.enter_context(contextlib.redirect_stdout(log))
                stack.enter_context(contextlib.redirect_stderr(log))
            args = parse_args(list(argv))
            final = train(resolve_run(args), args.data_dir, output_dir, args.device, progress=False,
                          compile=args.compile)
    except Exception:
        if books:
            trace = traceback.format_exc()
            atomic_write_text(output_dir / ERROR_FILE, trace)
            log_line(output_dir, "failed:\n" + trace.rstrip())
        raise
    finally:
        torch.set_num_threads(threads)
    if books:
        log_line(output_dir, "done")
    return final


def main(argv: list[str] | None = None) -> int:
    """``python -m dg_meta.launch.runner RUN_DIR``: run the job described by ``RUN_DIR/job.json``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m dg_meta.launch.runner RUN_DIR", file=sys.stderr)
        return 2
    output_dir = Path(argv[0])
    spec = json.loads((output_dir / JOB_FILE).read_text())
    try:
        execute(output_dir, spec["argv"], spec.get("cpus", 1))
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
