"""Reproduce DomainBed's MNIST results: ERM and MLDG on RotatedMNIST and ColoredMNIST, default hparams.

Launches the sweep (``python -m dg_meta.launch.sweep launch`` with the multiprocess launcher: every held-out
domain x ``--trials`` trial seeds, DomainBed's 5001 steps), then collects it (``dg_meta.launch.collect``)
into tables with training-domain and oracle validation next to DomainBed's published numbers, with each
run's wall time, and writes them, the command and the hardware into this script's section of ``--doc``
(other sections are kept). Launching again skips finished runs and resumes interrupted ones; the hardware
and the sweep's launch time are kept in ``OUTPUT_DIR/reproduce.json``; ``--collect-only`` only collects
(e.g. a sweep run on another machine and copied here). ``--quick``: ERM on RotatedMNIST, held-out 0 degrees,
one trial, full steps, evaluated every 500 steps (a CPU check of about an hour here). Example:
``python bench/reproduce_domainbed.py --data-dir ../shared/data --trials 3 --workers 16``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from dg_meta.launch.collect import Table, env_names, load_records, selection_tables, to_markdown

from dg_meta.atomic import atomic_write_json
from dg_meta.errors import UsageError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dg_table import update_doc  # noqa: E402  (bench/ is not a package)

REPO = Path(__file__).resolve().parents[1]
SECTION = "domainbed-reproduction"
ALGORITHMS = ["ERM", "MLDG"]
DATASETS = ["RotatedMNIST", "ColoredMNIST"]
QUICK_CHECKPOINT_FREQ = 500
METHODS = {"training_domain": "Training-domain validation", "oracle": "Test-domain validation (oracle)"}
# DomainBed (Gulrajani & Lopez-Paz 2021; results of commit 7df6f06): per held-out domain and average, in %;
# None where the paper's number is not reproduced here.
DOMAINBED = {
    ("training_domain", "RotatedMNIST", "ERM"): [95.9, 98.9, 98.8, 98.9, 98.9, 96.4, 98.0],
    ("training_domain", "RotatedMNIST", "MLDG"): [95.8, 98.9, 99.0, 98.9, 99.0, 95.8, 97.9],
    ("training_domain", "ColoredMNIST", "ERM"): [None, None, None, 51.5],
    ("oracle", "ColoredMNIST", "ERM"): [None, None, None, 57.8],
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="root of MNIST/raw")
    p.add_argument("--output-dir", default=str(REPO / "outputs" / "domainbed"), help="the sweep folder")
    p.add_argument("--algorithms", nargs="+", default=ALGORITHMS, help="default: %(default)s")
    p.add_argument("--datasets", nargs="+", default=DATASETS, help="default: %(default)s")
    p.add_argument("--test-envs", type=int, nargs="+", default=None, help="default: every domain")
    p.add_argument("--trials", type=int, default=3, help="trial seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="default: the dataset's (5001, DomainBed's)")
    p.add_argument("--checkpoint-freq", type=int, default=None,
                   help="steps between evaluations (default: the dataset's, 100; --quick: 500)")
    p.add_argument("--workers", type=int, default=None, help="parallel runs (default: the launcher's)")
    p.add_argument("--cpus", type=int, default=1, help="torch CPU threads per run (default: %(default)s)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop the sweep (and its runs) after this many seconds; launching again resumes")
    p.add_argument("--quick", action="store_true", help="ERM, RotatedMNIST, held-out 0, one trial")
    p.add_argument("--collect-only", action="store_true", help="collect the sweep folder; launch nothing")
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"), help="markdown file to update")
    p.add_argument("--no-doc", action="store_true", help="print the section; do not write --doc")
    return p


def apply_quick(args: argparse.Namespace) -> None:
    if args.quick:
        args.algorithms, args.datasets, args.test_envs, args.trials = ["ERM"], ["RotatedMNIST"], [0], 1
        args.checkpoint_freq = args.checkpoint_freq or QUICK_CHECKPOINT_FREQ
    if args.trials < 1:
        raise UsageError(f"--trials must be >= 1, got {args.trials}")


def sweep_argv(args: argparse.Namespace) -> list[str]:
    argv = ["launch", "--output-dir", args.output_dir, "--algorithms", *args.algorithms,
            "--datasets", *args.datasets, "--data-dir", args.data_dir, "--n-trials", str(args.trials),
            "--launcher", "multiprocess", "--cpus", str(args.cpus)]
    for flag, value in (("--steps", args.steps), ("--checkpoint-freq", args.checkpoint_freq),
                        ("--workers", args.workers)):
        if value is not None:
            argv += [flag, str(value)]
    if args.test_envs is not None:
        argv += ["--test-envs", *map(str, args.test_envs)]
    return argv


def hardware() -> str:
    cpus = f"{os.cpu_count()} CPU cores ({platform.machine()})"
    gpu = f"{torch.cuda.get_device_name(0)}, " if torch.cuda.is_available() else ""
    return f"{gpu}{cpus}, torch {torch.__version__}, Python {platform.python_version()}"


def run_sweep(args: argparse.Namespace) -> tuple[int, bool]:
    """``python -m dg_meta.launch.sweep launch ...`` in its own process group, stopped (the sweep and its
    runs) after ``--time-limit`` seconds; returns (exit code, whether it was stopped)."""
    command = [sys.executable, "-m", "dg_meta.launch.sweep", *sweep_argv(args)]
    process = subprocess.Popen(command, start_new_session=True)
    try:
        return process.wait(timeout=args.time_limit), False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return 1, True


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the sweep's unfinished jobs; append this launch's hardware and wall time to reproduce.json."""
    start = time.perf_counter()
    code, stopped = run_sweep(args)
    if code == 2:
        return code
    path = Path(args.output_dir) / "reproduce.json"
    info = json.loads(path.read_text()) if path.exists() else {"launches": []}
    info["launches"].append({"command": shlex.join(["python", "bench/reproduce_domainbed.py", *argv]),
                             "hardware": hardware(), "workers": args.workers, "seconds": time.perf_counter() - start,
                             "stopped_by_time_limit": stopped, "date": time.strftime("%Y-%m-%d %H:%M")})
    atomic_write_json(path, info)
    return code


def run_times(sweep_dir: Path) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """Per (dataset, algorithm): each finished run's (wall seconds, mean seconds per training step), from
    its records (``step_time`` x steps plus ``eval_time`` of every checkpoint)."""
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for path in sorted(sweep_dir.rglob("results.jsonl")):
        if not (path.parent / "done").exists():
            continue
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        previous, train_s, eval_s = 0, 0.0, 0.0
        for r in records:
            train_s += r["step_time"] * (r["step"] - previous)
            eval_s += r["eval_time"]
            previous = r["step"]
        key = (records[-1]["args"]["dataset"], records[-1]["args"]["algorithm"])
        times.setdefault(key, []).append((train_s + eval_s, train_s / previous))
    return times


def comparison(table: Table, method: str) -> Table:
    """``table`` with DomainBed's published row under each of our algorithms (where we have it)."""
    names = env_names(table.dataset, len(table.columns) - 1)
    cells = {}
    for algorithm, row in table.cells.items():
        cells[f"{algorithm} (ours)"] = row
        reference = DOMAINBED.get((method, table.dataset, algorithm))
        if reference is None or len(reference) != len(names) + 1:
            continue
        values = [reference[names.index(c)] if c in names else None for c in table.columns[:-1]]
        values.append(reference[-1] if len(table.columns) - 1 == len(names) else None)
        if any(v is not None for v in values):
            cells[f"{algorithm} (DomainBed)"] = [None if v is None else (v, None, None) for v in values]
    return Table(table.title, table.dataset, table.columns, cells)


def section(args: argparse.Namespace) -> str:
    sweep_dir = Path(args.output_dir)
    collection = load_records(sweep_dir)
    tables = [comparison(t, m) for m in METHODS for t in selection_tables(collection.records, m)]
    info_path = sweep_dir / "reproduce.json"
    launches = json.loads(info_path.read_text())["launches"] if info_path.exists() else []
    lines = ["## DomainBed reproduction (`bench/reproduce_domainbed.py`)", "",
             "Default hparams (Adam, lr 1e-3, batch 64 per domain, DomainBed's MNIST ConvNet), 20% of each "
             "domain held out, every held-out domain, trial seeds 0..N-1 (seed = trial seed); held-out "
             "accuracy (%) as mean ± standard error over trials. DomainBed's rows: the paper's numbers "
             "(results of commit 7df6f06); – where not given here.", ""]
    for launch_info in launches:
        stopped = " (stopped by --time-limit; the next launch resumed)" if launch_info["stopped_by_time_limit"] else ""
        lines.append(f"- `{launch_info['command']}` on {launch_info['hardware']}, {launch_info['date']}: "
                     f"{launch_info['seconds'] / 60:.1f} min{stopped}")
    lines += ["", "\n\n".join(to_markdown(t) for t in tables) if tables else "no finished runs yet", "",
              f"_{collection.finished_runs} finished runs; {collection.unfinished_runs} unfinished left out._",
              "", "Wall time per run (training steps + evaluations, from the records):", "",
              "| Dataset | Algorithm | Runs | Wall time per run (s) | Time per step (ms) |",
              "| --- | --- | --- | --- | --- |"]
    for (dataset, algorithm), values in sorted(run_times(sweep_dir).items()):
        lines.append(f"| {dataset} | {algorithm} | {len(values)} | {statistics.mean(v[0] for v in values):.0f} | "
                     f"{1000 * statistics.mean(v[1] for v in values):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        apply_quick(args)
        code = 0 if args.collect_only else launch(args, argv)
        if code == 2:
            return code
        body = section(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(body)
    if not args.no_doc:
        doc = Path(args.doc)
        update_doc(doc, body, SECTION)
        print(f"written to {doc}")
    return code


if __name__ == "__main__":
    sys.exit(main())
