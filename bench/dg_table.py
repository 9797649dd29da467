"""Benchmark table of the DG algorithms: leave-one-domain-out accuracy, mean ± SE over trial seeds.

Runs every algorithm of ``ALGORITHMS`` (ERM, DomainBed's list, dg-meta's own DG methods; those registered) with
default hparams on every held-out domain of RotatedDigits, and of MNISTRotation1k where that dataset is
registered and its MNIST files exist under ``--data-dir``, for ``--trials`` trial seeds (seed = trial seed, so the
in/out splits and the initialisation both change). Runs go through ``dg_meta.train.train`` in-process,
each in its own folder under ``--output-dir`` (re-running resumes or skips finished runs). The held-out
accuracy is chosen by training-domain validation (``dg_meta.selection``) and tabulated by
``dg_meta.launch.collect``; the tables replace this script's own section of ``--doc`` (other sections are
kept). Example: ``python bench/dg_table.py --quick --algorithms ERM MLDG``.

Parallel runs (e.g. on a GPU machine's cores): ``--shard I/N`` trains every N-th run starting at the I-th and writes
no table (each shard's is partial); once every shard has finished, ``--collect-only`` with the same arguments but
``--shard`` writes the table from the run folders, and its header gives the runs' own wall time (steps times the
recorded seconds per step, plus evaluations), summed over runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
from dg_meta.launch.collect import load_records, selection_tables, to_markdown

from dg_meta import registry
from dg_meta.atomic import atomic_write_text
from dg_meta.errors import UsageError
from dg_meta.train import parse_args, resolve_run, run_hash, train

REPO = Path(__file__).resolve().parents[1]
#: ERM, DomainBed's published twelve, the rest of DomainBed's list, then the methods only dg-meta has
ALGORITHMS = ["ERM", "IRM", "GroupDRO", "Mixup", "CORAL", "MMD", "DANN", "CDANN", "MTL", "SagNet", "ARM", "VREx", "RSC",
              "MLDG", "SD", "Fish", "Fishr", "ANDMask", "SANDMask", "IGA", "SelfReg", "TRM", "IB_ERM", "IB_IRM", "CAD",
              "CondCAD", "Transfer", "CausIRL_CORAL", "CausIRL_MMD", "EQRM", "RDM", "ADRMX", "URM", "ERMPlusPlus",
              "DICA", "MMDAAE", "CrossGrad", "FeatureCritic", "Ensemble"]
DATASETS = ["RotatedDigits", "MNISTRotation1k"]
NEEDS_MNIST = {"MNISTRotation1k"}
SECTION = "dg-table"
QUICK = {"trials": 1, "steps": 20}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algorithms", nargs="+", default=None,
                   help=f"algorithms to run (default: those of {', '.join(ALGORITHMS)} that are registered)")
    p.add_argument("--datasets", nargs="+", default=None,
                   help=f"datasets (default: {', '.join(DATASETS)}, the second when registered and on disk)")
    p.add_argument("--trials", type=int, default=None, help="trial seeds 0..N-1 (default 3; --quick: 1)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the dataset's; --quick: 20)")
    p.add_argument("--checkpoint-freq", type=int, default=None, help="steps between evaluations (default: dataset's)")
    p.add_argument("--test-envs", type=int, nargs="+", default=None, help="held-out domains (default: every one)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 trial, 20 steps unless given")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="root of the MNIST files")
    p.add_argument("--output-dir", default=str(REPO / "outputs" / "dg_table"), help="folder of the run folders")
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"), help="markdown file to update")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shard", default=None, metavar="I/N", help="train only runs I, I+N, I+2N, ... (0 <= I < N); "
                   "writes no table")
    p.add_argument("--collect-only", action="store_true", help="train nothing: tabulate the finished run folders")
    return p


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"I/N"`` as ``(I, N)``; no shard is ``(0, 1)``."""
    if text is None:
        return 0, 1
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise UsageError(f"--shard {text}: expected I/N with 0 <= I < N, e.g. --shard 0/4")
    return int(index), int(count)


def run_seconds(records: list[dict]) -> float:
    """Training and evaluation seconds of one run's records: each record's mean step time over the steps since
    the previous record, plus its evaluation."""
    seconds, previous = 0.0, 0
    for record in records:
        seconds += record["step_time"] * (record["step"] - previous) + record["eval_time"]
        previous = record["step"]
    return seconds


def default_datasets(data_dir: str) -> list[str]:
    names = registry.dataset_names()
    return [d for d in DATASETS if d in names and (d not in NEEDS_MNIST or (Path(data_dir) / "MNIST" / "raw").is_dir())]


def job_runs(args: argparse.Namespace) -> list[dict]:
    """The resolved ``dg_meta.train`` run of every (dataset, algorithm, held-out domain, trial)."""
    runs = []
    for dataset in args.datasets:
        n_envs = len(registry.get_dataset(dataset).ENVIRONMENTS)
        envs = range(n_envs) if args.test_envs is None else args.test_envs
        for algorithm in args.algorithms:
            for env in envs:
                for trial in range(args.trials):
                    argv = ["--algorithm", algorithm, "--dataset", dataset, "--test-envs", str(env),
                            "--trial-seed", str(trial), "--seed", str(trial)]
                    if args.steps is not None:
                        argv += ["--steps", str(args.steps)]
                    if args.checkpoint_freq is not None:
                        argv += ["--checkpoint-freq", str(args.checkpoint_freq)]
                    runs.append(resolve_run(parse_args(argv)))
    return runs


def run_dir(output_dir: Path, run: dict) -> Path:
    return output_dir / f"{run['dataset']}-{run['algorithm']}-te{run['test_envs'][0]}-{run_hash(run)}"


def replace_section(text: str, body: str, name: str = SECTION) -> str:
    """``text`` with the block between ``<!-- name:start -->`` and ``<!-- name:end -->`` set to ``body``
    (appended when absent); everything else is kept byte for byte."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        return before + block + rest.split(end, 1)[1]
    if not text.strip():
        return "# Benchmarks\n\n" + block + "\n"
    return text.rstrip("\n") + "\n\n" + block + "\n"


def update_doc(path: Path, body: str, name: str = SECTION) -> None:
    """Set the marked block ``name`` of the markdown file ``path`` to ``body`` atomically (created if absent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, replace_section(path.read_text() if path.exists() else "", body, name))


def section_body(tables: str, args: argparse.Namespace, argv: list[str], seconds: float) -> str:
    command = shlex.join(["python", "bench/dg_table.py", *argv])
    steps = "each dataset's default" if args.steps is None else str(args.steps)
    return (f"## Domain generalization: leave-one-domain-out (`bench/dg_table.py`)\n\n"
            f"Default hparams, {steps} steps, {args.trials} trial seed(s); held-out accuracy (%) chosen by "
            f"training-domain validation, mean ± standard error over trials (their number in brackets). Command: "
            f"`{command}` ({time.strftime('%Y-%m-%d')}; the runs' own wall time: {seconds / 60:.0f} min in all, "
            f"measured by each run on {args.device}).\n\n{tables}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        for key, value in QUICK.items():
            if args.quick and getattr(args, key) is None:
                setattr(args, key, value)
        args.trials = 3 if args.trials is None else args.trials
        if args.trials < 1:
            raise UsageError(f"--trials must be >= 1, got {args.trials}")
        registry.discover()
        if args.algorithms is None:
            args.algorithms = [a for a in ALGORITHMS if a in registry.algorithm_names()]
        args.datasets = args.datasets or default_datasets(args.data_dir)
        index, count = parse_shard(args.shard)
        if args.shard is not None and args.collect_only:
            raise UsageError("--shard trains a part of the runs and --collect-only trains none: give one of them")
        runs = job_runs(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir)
    mine = [] if args.collect_only else runs[index::count]
    for i, run in enumerate(mine, 1):
        final = train(run, args.data_dir, run_dir(output_dir, run), args.device, progress=False)
        env = run["test_envs"][0]
        print(f"[{i}/{len(mine)}] {run['dataset']} {run['algorithm']} test env {env} trial {run['trial_seed']}: "
              f"{100 * final[f'env{env}_in_acc']:.1f}%", file=sys.stderr)
    if args.shard is not None:
        return 0
    folders = [f for f in sorted({run_dir(output_dir, run) for run in runs}) if f.is_dir()]
    per_run = [load_records(f).records for f in folders]
    records = [r for run_records in per_run for r in run_records]
    tables = "\n\n".join(to_markdown(t) for t in selection_tables(records, "training_domain"))
    doc = Path(args.doc)
    update_doc(doc, section_body(tables, args, argv, sum(run_seconds(r) for r in per_run)))
    print(tables)
    print(f"written to {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
