"""Does LastShot's distillation from a strong teacher help? LastShot beside ProtoNet, both from one pretraining.

The paper's claim (Ye, Ming, Zhan & Chao, "Few-Shot Learning with a Strong Teacher", TPAMI): a meta-learner
distilled from a strong per-episode teacher (nearest class mean on a fully pretrained embedding) beats the same
meta-learner trained without it. The protocol, on Omniglot's two reduced background sets (``OmniglotSmall``,
``../shared/data/omniglot``; held-out alphabets 5-7, classes pooled across alphabets, the dataset's
``class_pool`` episode protocol):

1. ``FewShotPretrain``: Conv-4 + a linear head over every training class, cross-entropy (the official
   ``pretrain.py`` stage); its own few-shot accuracy is the "pretrained embedding, no meta-training" row.
2. ``ProtoNet`` initialised from it (``--init-from``), meta-trained for ``--steps`` episodes-batches.
3. ``LastShot`` with that run as ``teacher_run`` (the student starts from the same weights), the same steps,
   its default (official) hparams.

All three are scored on the same 1,000 test episodes (5-way 1-shot, 15 queries per class, mean ± 95% CI) of
the held-out alphabets, at the last step only. Runs go through ``dg_meta.train.train``; finished runs are
skipped. The table replaces the ``lastshot-teacher`` block of ``--doc``. Example:
``OMP_NUM_THREADS=1 python bench/lastshot_teacher.py --data-dir ../shared/data``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from dg_meta.train import parse_args, resolve_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dg_table import REPO, run_dir, update_doc  # noqa: E402  (bench/ is not a package)
from paper_mnist_rotation import run_timed  # noqa: E402

SECTION = "lastshot-teacher"
DATASET = "OmniglotSmall"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="root of omniglot/")
    p.add_argument("--output-dir", default=str(REPO / "outputs" / "lastshot_teacher"), help="run folders")
    p.add_argument("--pretrain-steps", type=int, default=1000, help="FewShotPretrain steps")
    p.add_argument("--steps", type=int, default=1000, help="meta-training steps of ProtoNet and LastShot")
    p.add_argument("--episodes", type=int, default=1000, help="test episodes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"), help="markdown file to update")
    p.add_argument("--device", default="cpu")
    return p


def resolved(algorithm: str, steps: int, args: argparse.Namespace, *extra: str) -> dict:
    """The run of ``algorithm`` with this benchmark's data, seed and evaluation (one, at the last step)."""
    return resolve_run(parse_args([
        "--algorithm", algorithm, "--dataset", DATASET, "--data-dir", args.data_dir, "--seed", str(args.seed),
        "--steps", str(steps), "--checkpoint-freq", str(steps), "--fs-episodes", str(args.episodes),
        "--fs-way", "5", "--fs-shot", "1", "--fs-query", "15", *extra]))


def last_record(folder: Path) -> dict:
    return json.loads((folder / "results.jsonl").read_text().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pretrain = resolved("FewShotPretrain", args.pretrain_steps, args)
    pretrain_dir = run_dir(output_dir, pretrain)
    rows = [("FewShotPretrain (embedding only)", pretrain, pretrain_dir)]
    walls = [run_timed(pretrain, args.data_dir, pretrain_dir, args.device)]
    for label, run in (
        ("ProtoNet from it (`--init-from`)", resolved("ProtoNet", args.steps, args, "--init-from", str(pretrain_dir))),
        ("LastShot, teacher = it", resolved("LastShot", args.steps, args, "--hparams",
                                             json.dumps({"teacher_run": str(pretrain_dir)}))),
    ):
        folder = run_dir(output_dir, run)
        rows.append((label, run, folder))
        walls.append(run_timed(run, args.data_dir, folder, args.device))
        print(f"{label}: {100 * last_record(folder)['test_fs_acc']:.1f}%", flush=True)
    lines = ["| model | steps | 5-way 1-shot test accuracy (%) | wall (min) |", "| --- | --- | --- | --- |"]
    for (label, run, folder), wall in zip(rows, walls):
        record = last_record(folder)
        lines.append(f"| {label} | {run['steps']} | {100 * record['test_fs_acc']:.1f} ± "
                     f"{100 * record['test_fs_ci']:.1f} | {wall / 60:.1f} |")
    command = shlex.join(["python", "bench/lastshot_teacher.py", *argv])
    body = (f"## LastShot's strong teacher vs ProtoNet (`bench/lastshot_teacher.py`)\n\n"
            f"OmniglotSmall (Omniglot's two reduced background sets; held-out alphabets 5-7, classes pooled), "
            f"Conv-4, default hparams; {args.episodes} test episodes (5-way 1-shot, 15 queries per class), "
            f"mean ± 95% CI, at the last step. ProtoNet and LastShot start from the same pretraining run and "
            f"train the same number of steps; LastShot adds the distillation from that run's nearest-class-mean "
            f"teacher. Command: `{command}` ({time.strftime('%Y-%m-%d')}, {torch.get_num_threads()} CPU "
            f"thread(s)).\n\n" + "\n".join(lines))
    update_doc(Path(args.doc), body, SECTION)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
