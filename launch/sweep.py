"""``python -m dg_meta.launch.sweep launch|status|collect|delete-incomplete``: sweeps of training runs.

``launch`` defines the jobs (datasets x algorithms x held-out domains x hparams seeds x trials), skips the
ones that are done or running and runs the failed and unstarted ones with the chosen launcher;
``--dry-run`` lists them. ``status`` counts done / pending (queued) / running / failed / not started jobs,
shows each running job's Slurm id or pid, step / total and ETA (from its ``heartbeat.json``), and each
failure's log and last traceback line. ``collect`` prints the model-selection tables (``--latex``,
``--plot out.png``). ``delete-incomplete`` removes the folders of jobs that are neither done nor running.
Bad input exits with code 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from dg_meta.errors import UsageError
from dg_meta.train import DEFAULT_DATASET

from . import collect as collect_mod
from . import launchers
from .jobs import (
    DONE,
    FAILED,
    NOT_STARTED,
    PENDING,
    RUNNING,
    STATES,
    Job,
    JobState,
    delete_run_folder,
    job_states,
    manifest_jobs,
    record_manifest,
    sweep_jobs,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message} (see python -m dg_meta.launch.sweep --help)")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m dg_meta.launch.sweep", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    launch = sub.add_parser("launch", help="run the sweep's failed and unstarted jobs")
    launch.add_argument("--output-dir", required=True, help="the sweep folder (one run folder per job)")
    launch.add_argument("--algorithms", nargs="+", required=True, help="registered algorithm names")
    launch.add_argument("--datasets", nargs="+", default=[DEFAULT_DATASET], help="default: %(default)s")
    launch.add_argument("--data-dir", default=None, help="root folder of the dataset files")
    launch.add_argument("--test-envs", type=int, nargs="+", default=None,
                        help="held-out domains, one job each (default: every domain)")
    launch.add_argument("--lodo-pairs", action="store_true",
                        help="also hold out the pairs that leave-one-domain-out selection needs")
    launch.add_argument("--n-hparams", type=int, default=1, help="hparams seeds 0..N-1 (0 = defaults)")
    launch.add_argument("--n-trials", type=int, default=1, help="trial seeds 0..N-1")
    launch.add_argument("--steps", type=int, default=None, help="training steps (default: the dataset's)")
    launch.add_argument("--checkpoint-freq", type=int, default=None, help="steps between checkpoints")
    launch.add_argument("--hparams", default=None, help="JSON hparam overrides for every job")
    launch.add_argument("--fs-episodes", type=int, default=None, help="few-shot evaluation episodes per domain")
    launch.add_argument("--plugin", action="append", default=[], help="module to import for extra algorithms")
    launch.add_argument("--launcher", choices=launchers.LAUNCHERS, default="local")
    launch.add_argument("--cpus", type=int, default=None,
                        help="CPUs (torch threads) per job (default: local and slurm 1, the same numbers on both; "
                             "multiprocess: the cores divided among the workers)")
    launch.add_argument("--workers", type=int, default=None, help="multiprocess: parallel jobs")
    launch.add_argument("--dry-run", action="store_true", help="list the jobs and their state; run nothing")
    launch.add_argument("--wait", action="store_true", help="slurm: wait for the jobs, then print the status")
    slurm = launch.add_argument_group("Slurm (--launcher slurm)")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--time", type=int, default=240, help="minutes per task (default: %(default)s)")
    slurm.add_argument("--gpus", type=int, default=0, help="GPUs per task (a run on one process)")
    slurm.add_argument("--gpus-per-job", type=int, default=0, metavar="N",
                       help="one run on N GPUs of one node: N processes (Slurm tasks), one GPU each "
                            "(docs/distributed.md)")
    slurm.add_argument("--tasks-per-job", type=int, default=None, metavar="N",
                       help="one run on N processes of one node (default: --gpus-per-job, else 1); without GPUs "
                            "they train on the CPU (gloo)")
    slurm.add_argument("--mem-gb", type=float, default=None, help="memory per task (default: Slurm's)")
    slurm.add_argument("--array-parallelism", type=int, default=256, help="tasks running at once")
    slurm.add_argument("--max-requeues", type=int, default=3, help="timeouts/preemptions requeued per task")
    slurm.add_argument("--sbatch", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="extra sbatch option, e.g. --sbatch qos=high --sbatch constraint=volta")
    slurm.add_argument("--setup", action="append", default=[], metavar="CMD",
                       help="shell line run before each task, e.g. 'module load cuda'")
    for name, text in (("status", "count jobs by state; show failures"),
                       ("delete-incomplete", "delete the folders of jobs neither done nor running")):
        sub.add_parser(name, help=text).add_argument("--output-dir", required=True, help="the sweep folder")
    coll = sub.add_parser("collect", help="print model-selection tables")
    coll.add_argument("--output-dir", required=True, help="the sweep folder")
    coll.add_argument("--latex", action="store_true", help="LaTeX tabulars instead of markdown")
    coll.add_argument("--plot", default=None, metavar="OUT.png", help="also draw per-domain accuracy bars")
    return p


def format_status(states: list[JobState]) -> str:
    counts = {s: sum(st.state == s for st in states) for s in STATES}
    lines = [f"{len(states)} jobs: " + ", ".join(f"{counts[s]} {s}" for s in STATES)]
    for st in states:
        if st.state == RUNNING:
            lines.append(f"running: {st.job.name}: {st.detail}")
    for st in states:
        if st.state == FAILED:
            lines += [f"failed: {st.job.name}", f"  log: {st.log}", f"  error: {st.detail}"]
    return "\n".join(lines)


def _command(job: Job) -> str:
    return shlex.join(["python", "-m", "dg_meta.train", *job.argv, "--output-dir", str(job.output_dir)])


def slurm_tasks(gpus: int, gpus_per_job: int, tasks_per_job: int | None) -> tuple[int, int]:
    """``(tasks per job, GPUs per task)`` from ``--gpus``, ``--gpus-per-job`` and ``--tasks-per-job``."""
    if min(gpus, gpus_per_job) < 0 or (tasks_per_job is not None and tasks_per_job < 1):
        raise UsageError("--gpus and --gpus-per-job must be >= 0 and --tasks-per-job >= 1")
    if gpus and gpus_per_job:
        raise UsageError("--gpus (GPUs of a one-process run) and --gpus-per-job (a run on that many GPUs, one per "
                         "process) exclude each other: give one")
    if gpus_per_job and tasks_per_job not in (None, gpus_per_job):
        raise UsageError(f"--gpus-per-job {gpus_per_job} starts one process per GPU: --tasks-per-job must be "
                         f"{gpus_per_job} or left out")
    if gpus_per_job:
        return gpus_per_job, 1
    return tasks_per_job or 1, gpus


def cmd_launch(args: argparse.Namespace) -> int:
    sweep_dir = Path(args.output_dir).resolve()
    jobs = sweep_jobs(sweep_dir, args.algorithms, args.datasets, data_dir=args.data_dir, test_envs=args.test_envs,
                      lodo_pairs=args.lodo_pairs, n_hparams=args.n_hparams, n_trials=args.n_trials,
                      steps=args.steps, checkpoint_freq=args.checkpoint_freq, hparams=args.hparams,
                      fs_episodes=args.fs_episodes, plugins=tuple(args.plugin))
    if args.cpus is not None and args.cpus < 1:
        raise UsageError(f"--cpus must be >= 1, got {args.cpus}")
    tasks, gpus = slurm_tasks(args.gpus, args.gpus_per_job, args.tasks_per_job)
    if args.launcher != "slurm" and tasks > 1:
        raise UsageError(f"--gpus-per-job and --tasks-per-job start several processes per run through Slurm: use "
                         f"--launcher slurm, or launch the run with torchrun (docs/distributed.md), not "
                         f"--launcher {args.launcher}")
    states = job_states(jobs)
    todo = [s.job for s in states if s.state in (FAILED, NOT_STARTED)]
    count = {s: sum(st.state == s for st in states) for s in STATES}
    print(f"{len(jobs)} jobs: {count[DONE]} done, {count[PENDING]} pending and {count[RUNNING]} running (left "
          f"alone); launching "
          f"{count[FAILED]} failed and {count[NOT_STARTED]} not started with --launcher {args.launcher}")
    if args.dry_run:
        for st in states:
            print(f"{st.state:>11}  {_command(st.job)}")
        return 0
    record_manifest(sweep_dir, jobs)
    if not todo:
        return 0
    if args.launcher == "local":
        launchers.launch_local(todo, args.cpus or 1)
    elif args.launcher == "multiprocess":
        launchers.launch_multiprocess(todo, args.cpus, args.workers)
    else:
        options = launchers.SlurmOptions(partition=args.partition, time_min=args.time, cpus=args.cpus or 1,
                                         gpus=gpus, tasks=tasks, mem_gb=args.mem_gb,
                                         array_parallelism=args.array_parallelism,
                                         max_requeues=args.max_requeues, sbatch=dict(args.sbatch),
                                         setup=args.setup)
        folder = sweep_dir / ".submitit" / time.strftime("%Y%m%d-%H%M%S")
        submitted = launchers.launch_slurm(todo, folder, options)
        print(f"submitted job array {submitted[0].job_id.split('_')[0]} ({len(submitted)} tasks); "
              f"submitit folder {folder}")
        if not args.wait:
            return 0
        launchers.wait(todo)
    final = job_states(todo)
    print(format_status(final))
    return 1 if any(s.state == FAILED for s in final) else 0


def cmd_status(args: argparse.Namespace) -> int:
    print(format_status(job_states(manifest_jobs(Path(args.output_dir)))))
    return 0


def cmd_delete_incomplete(args: argparse.Namespace) -> int:
    states = job_states(manifest_jobs(Path(args.output_dir)))
    deleted = [s.job for s in states if s.state == FAILED or (s.state == NOT_STARTED and s.job.output_dir.exists())]
    for job in deleted:
        delete_run_folder(job)
    active = sum(s.state in (PENDING, RUNNING) for s in states)
    print(f"deleted {len(deleted)} incomplete run folders; {active} pending or running jobs left alone")
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    collection = collect_mod.load_records(args.output_dir)
    print(collect_mod.report(collection, latex=args.latex))
    if args.plot:
        collect_mod.plot(collect_mod.all_tables(collection.records), args.plot)
        print(f"plot: {args.plot}")
    return 0


COMMANDS = {"launch": cmd_launch, "status": cmd_status, "collect": cmd_collect,
            "delete-incomplete": cmd_delete_incomplete}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except json.JSONDecodeError as exc:
        print(f"error: a sweep file is not valid JSON ({exc}): delete it or the sweep folder", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
