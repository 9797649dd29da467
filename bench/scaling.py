"""Data-parallel scaling: training steps per second of one run on 1, 2, ... processes (``dg_meta.distributed``).

For each workload and each process count N, ``torchrun --nproc-per-node N -m dg_meta.train`` trains the same run
(same global batch, so the same numbers) in a fresh folder and the steps per second are read from its
``results.jsonl``: ``--steps`` steps with a checkpoint at the middle and at the end, the rate taken from the
second half (``step_time`` of the last record: training only, evaluation excluded, after the warm-up). On
the CPU (gloo) the machine's cores are shared out, ``cores // N`` torch threads per process (``--threads``
fixes it), so N processes compete with one process that may use every core; with ``--device cuda`` (nccl)
each process takes one GPU and N goes up to the number of GPUs. Workloads (``--workloads``):

- ``erm``: ERM on RotatedDigits (DomainBed's MNIST ConvNet, ``--batch-size`` examples per training domain, 5
  training domains);
- ``maml``: second-order MAML on RotatedDigits (Conv-4, 5-way 1-shot 15-query, ``--meta-batch-size`` tasks).

Prints one JSON object (also written to ``--output``): the machine, and per workload and device the steps per
second, examples per second and the speed-up over one process. Example (this repository's 2-core machine):
``python bench/scaling.py --processes 1 2``; on a GPU machine: ``python bench/scaling.py --device cuda``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from dg_meta.atomic import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
ERM_DOMAINS = 5  # RotatedDigits' training domains with held-out domain 0


def workload_args(name: str, batch_size: int, meta_batch_size: int) -> tuple[list[str], int]:
    """The training arguments of a workload and the examples of one global step."""
    if name == "erm":
        return (["--algorithm", "ERM", "--hparams", json.dumps({"batch_size": batch_size})],
                batch_size * ERM_DOMAINS)
    if name == "maml":
        hparams = {"meta_batch_size": meta_batch_size, "n_way": 5, "k_shot": 1, "n_query": 15}
        return (["--algorithm", "MAML", "--hparams", json.dumps(hparams), "--fs-episodes", "1"],
                meta_batch_size * 5 * 16)
    raise SystemExit(f"error: unknown workload {name!r}: choose erm or maml")


def measure(args: list[str], processes: int, threads: int, device: str, steps: int, timeout: float) -> float:
    """Steps per second of the run's second half on ``processes`` processes of ``threads`` threads."""
    with tempfile.TemporaryDirectory(prefix="dg_meta_scaling_") as tmp:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "-m",
                   "dg_meta.train", *args, "--steps", str(steps), "--checkpoint-freq", str(steps // 2),
                   "--device", device, "--threads", str(threads), "--no-progress", "--output-dir", f"{tmp}/run"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SystemExit(f"error: {processes} processes failed:\n{proc.stderr[-2000:]}")
        last = json.loads(Path(f"{tmp}/run/results.jsonl").read_text().splitlines()[-1])
        return 1.0 / last["step_time"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--processes", type=int, nargs="+", default=None,
                   help="process counts (default: 1 2 on the CPU, 1..GPUs on cuda)")
    p.add_argument("--workloads", nargs="+", default=["erm", "maml"])
    p.add_argument("--steps", type=int, default=40, help="training steps per run (the second half is timed)")
    p.add_argument("--batch-size", type=int, default=64, help="erm: examples per training domain")
    p.add_argument("--meta-batch-size", type=int, default=8, help="maml: tasks per step")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch threads of every process (default: the cores shared out, cores // N)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--output", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    gpus = torch.cuda.device_count()
    if args.device == "cuda" and gpus == 0:
        raise SystemExit("error: --device cuda: no GPU visible")
    counts = args.processes or (list(range(1, gpus + 1)) if args.device == "cuda" else [1, 2])
    result: dict = {"machine": {"host": platform.node(), "cores": cores, "gpus": gpus,
                                "gpu": torch.cuda.get_device_name(0) if gpus else None, "torch": torch.__version__},
                    "device": args.device, "steps": args.steps, "workloads": {}}
    for name in args.workloads:
        train_args, examples = workload_args(name, args.batch_size, args.meta_batch_size)
        rows = []
        for n in counts:
            threads = args.threads or (max(1, cores // n) if args.device == "cpu" else 1)
            rate = measure(train_args, n, threads, args.device, args.steps, args.timeout)
            rows.append({"processes": n, "threads_per_process": threads, "steps_per_s": round(rate, 3),
                         "examples_per_s": round(rate * examples, 1)})
        base = rows[0]["steps_per_s"]
        for row in rows:
            row["speedup"] = round(row["steps_per_s"] / base, 2)
        result["workloads"][name] = {"args": train_args, "examples_per_step": examples, "runs": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
