"""The IRM paper's ColoredMNIST table (ERM, IRM, V-REx), reproduced on ``ColoredMNIST_IRM``.

Protocol (Arjovsky et al. 2019, section 5.2; official code facebookresearch/InvariantRiskMinimization,
``code/colored_mnist/main.py`` and ``reproduce_paper_results.sh``): two training environments of 25,000
digits, full-batch Adam steps, the paper's MLP, the test accuracy of the last step, mean over restarts. The
official loop scores the environments in the forward pass of its last step, i.e. after 500 of its 501
updates: ``--steps 500`` here. Every example trains (``--holdout-fraction 0``).

Each method's settings and where they come from (``METHODS``):

- ERM: ``reproduce_paper_results.sh``'s ERM line: hidden 256, L2 0.001, lr 1e-3, no penalty.
- IRM: the same script's IRM line: hidden 390, L2 0.00110794568, lr 0.000489853656654683, penalty weight
  91257.18613115903 from step 190 (1.0 before), the loss divided by the weight once it exceeds 1.
- VREx: the V-REx authors' ColoredMNIST code (capybaralet/REx_code_release,
  ``InvariantRiskMinimization/colored_mnist/main.py`` defaults): hidden 256, L2 0.001, lr 1e-3, penalty
  ``(R_1 - R_2)^2`` weighted 10,000 from step 100, on the SUM of the two risks, divided by the weight.

Mapping to this library's hparams (exact, not approximate): the official L2 term ``l2 * sum ||w||^2`` over
every parameter is Adam's ``weight_decay = 2 * l2`` (its gradient); dividing the loss by the weight ``w`` is
the algorithms' ``divide_loss_by_penalty_weight`` hparam, which also divides the weight decay by ``w`` (the
official L2 term is part of the divided loss) and keeps Adam's moments at the switch, as the official code does;
``irm_unbiased_penalty: false`` squares the full-batch gradient, as the official ``penalty`` does. V-REx's
``sum + w (R_1 - R_2)^2 + l2 ||w||^2`` equals
twice DomainBed's ``mean + lambda var + (l2 / 2) ||w||^2`` with ``lambda = 2 w`` (the variance of two risks is
``(R_1 - R_2)^2 / 4``), so ``vrex_lambda = 20000`` and ``weight_decay = l2``; a constant factor on the whole
loss does not change Adam's steps (up to its epsilon). One difference remains: before the switch the V-REx
code weights the penalty 1 on the sum (2 in DomainBed's scale), DomainBed's VREx 1.

Runs go through ``dg_meta.train.train``; finished runs are skipped. The table replaces the marked section
``irm-colored-mnist`` of ``--doc``. Example: ``OMP_NUM_THREADS=1 python bench/irm_colored_mnist.py --seeds 5``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from dg_meta.errors import UsageError
from dg_meta.train import parse_args, resolve_run, run_hash

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dg_table import REPO, update_doc  # noqa: E402  (bench/ is not a package)
from paper_mnist_rotation import run_timed  # noqa: E402

DATASET = "ColoredMNIST_IRM"
SECTION = "irm-colored-mnist"
STEPS = 500
METHODS: dict[str, dict] = {
    "ERM": {"hparams": {"hidden_dim": 256, "lr": 1e-3, "weight_decay": 2 * 0.001}},
    "IRM": {"hparams": {"hidden_dim": 390, "lr": 0.0004898536566546834, "weight_decay": 2 * 0.00110794568,
                        "irm_lambda": 91257.18613115903, "irm_penalty_anneal_iters": 190,
                        "divide_loss_by_penalty_weight": True, "irm_unbiased_penalty": False}},
    "VREx": {"hparams": {"hidden_dim": 256, "lr": 1e-3, "weight_decay": 0.001, "vrex_lambda": 20000.0,
                         "vrex_penalty_anneal_iters": 100,
                         "divide_loss_by_penalty_weight": True}},
}
#: (train %, test %) as published: IRM paper section 5.2 table (ERM, IRM); V-REx paper Table 1 (V-REx)
PUBLISHED = {"ERM": (87.4, 0.2, 17.1, 0.6), "IRM": (70.8, 0.9, 66.9, 2.5), "VREx": (71.5, 1.0, 68.7, 0.9)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    p.add_argument("--seeds", type=int, default=5, help="training seeds 0..N-1 (default 5)")
    p.add_argument("--steps", type=int, default=STEPS, help=f"full-batch steps (default {STEPS}, the paper's)")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="root of the MNIST files")
    p.add_argument("--output-dir", default=str(REPO / "outputs" / "irm_colored_mnist"), help="run folders")
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"), help="markdown file to update")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: tabulate the runs already finished (e.g. while other seeds still run)")
    return p


def job_runs(args: argparse.Namespace) -> list[dict]:
    """The resolved ``dg_meta.train`` run of every (method, seed)."""
    if args.seeds < 1 or args.steps < 1:
        raise UsageError(f"--seeds and --steps must be >= 1, got {args.seeds} and {args.steps}")
    runs = []
    for method in args.methods:
        for seed in range(args.seeds):
            argv = ["--algorithm", method, "--dataset", DATASET, "--seed", str(seed), "--steps", str(args.steps),
                    "--checkpoint-freq", str(args.steps), "--holdout-fraction", "0",
                    "--hparams", json.dumps(METHODS[method]["hparams"])]
            runs.append(resolve_run(parse_args(argv)))
    return runs


def mean_se(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.1f}"
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
    return f"{mean:.1f} ± {se:.1f}"


def table(results: dict[str, list[tuple[float, float, float]]]) -> str:
    lines = ["| method | train acc (ours) | test acc (ours) | published train | published test | seeds | "
             "s per step (fastest seed) |", "|---|---|---|---|---|---|---|"]
    for method, rows in results.items():  # rows: (train %, test %, mean s per step) per finished seed
        train_acc, test_acc, step_s = ([r[i] for r in rows] for i in range(3))
        p = PUBLISHED[method]
        lines.append(f"| {method} | {mean_se(train_acc)} | {mean_se(test_acc)} | {p[0]} ± {p[1]} | {p[2]} ± {p[3]} "
                     f"| {len(rows)} | {min(step_s):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        runs = job_runs(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir)
    results: dict[str, list[tuple[float, float, float]]] = {}
    for run in runs:
        folder = output_dir / f"{run['algorithm']}-seed{run['seed']}-{run_hash(run)}"
        if args.finished_only and not (folder / "done").exists():
            continue
        wall = run_timed(run, args.data_dir, folder, args.device)
        last = json.loads((folder / "results.jsonl").read_text().splitlines()[-1])
        train_acc = 100 * (last["env0_in_acc"] + last["env1_in_acc"]) / 2
        test_acc = 100 * last["env2_in_acc"]
        results.setdefault(run["algorithm"], []).append((train_acc, test_acc, last["step_time"]))
        print(f"{run['algorithm']} seed {run['seed']}: train {train_acc:.1f}% test {test_acc:.1f}% "
              f"({wall / 60:.1f} min)", file=sys.stderr)
    command = shlex.join(["python", "bench/irm_colored_mnist.py", *argv])
    body = (f"## The IRM paper's ColoredMNIST (`bench/irm_colored_mnist.py`)\n\n"
            f"Last-step accuracy (%) of the two training environments (mean) and of the test environment, mean ± "
            f"SE over training seeds; settings and their sources in the script's docstring. Command: `{command}` "
            f"({time.strftime('%Y-%m-%d')}, {args.device}, one thread each; the time per step is the least loaded "
            f"seed's on a machine shared with other jobs).\n\n{table(results)}")
    update_doc(Path(args.doc), body, SECTION)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
