"""Few-shot Omniglot benchmark of every registered few-shot learner on the reduced background sets.

Each meta-learner (every registered algorithm with ``batch_kind == "episodes"``, Conv-4 on 28x28) is
meta-trained, once per setting (5-way 1-shot, 5-way 5-shot, 20-way 1-shot, training way and shot equal
to the test ones), on episodes over all classes of ``images_background_small1`` (5 alphabets, rotations
as extra classes), for ``--steps`` steps or ``--minutes`` minutes, whichever ends first. The training
episodes are exactly those of ``python -m dg_meta.train --dataset OmniglotSmall --seed SEED`` (the same
``dg_meta.samplers.training_episode_sampler``, in split and protocol: the CLI's default ``--trial-seed``
and ``--holdout-fraction``, and OmniglotSmall's ``class_pool``), with one exception: a meta-learner's ``n_query``
is capped so that every training class can fill an episode (``training_n_query``; the in split keeps 11 to 20
of a character's 20 drawings, and the sampler leaves out the classes with fewer than ``k_shot + n_query``
examples, at 5-shot with ``n_query`` 15 all but 7 of the 544). The few-shot learners trained on ordinary
minibatches over all training classes (``FewShotPretrain`` and its subclasses: Baseline, Baseline++, RFS)
train once, on the CLI's minibatches (``training_minibatch_sampler``), with the same budget, and that model
is scored in every setting (their training does not depend on way or shot). Each model is then
scored on ``--episodes`` test episodes (15 queries per class) over the unrotated characters of the
small2 alphabets that small1 lacks (Japanese (katakana), Sanskrit, Tagalog): mean accuracy and 95% CI.
The 20-way 1-shot model is also scored on the official 20 within-alphabet one-shot runs (error rate).
The table replaces the marked ``fewshot-omniglot`` block of ``--output`` (the rest is kept).
Every finished (algorithm, setting) cell is kept in ``--results`` (JSON lines, rewritten atomically), and a
cell already there with the same budget, episodes, seed and hparams is reused: an interrupted benchmark
resumes where it stopped, and a long one can be run in parts.

    python bench/fewshot_omniglot.py --data-dir ../shared/data --minutes 3 --steps 100000
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from dg_meta.algorithms.fewshot_pretrain import FewShotPretrain
from dg_meta.datasets.omniglot import OmniglotSmall, OneShotRun, load_one_shot_runs

from dg_meta import registry
from dg_meta.algorithm import Algorithm
from dg_meta.atomic import atomic_write_text
from dg_meta.errors import UsageError
from dg_meta.evaluation import episode_accuracy
from dg_meta.hparams import declared_hparams, name_seed, parse_overrides, resolve
from dg_meta.samplers import EpisodeSampler, split_cells, training_episode_sampler, training_minibatch_sampler
from dg_meta.splits import DomainSplits
from dg_meta.train import build_parser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dg_table import update_doc  # noqa: E402  (bench/ is not a package)

SETTINGS = {"5w1s": (5, 1), "5w5s": (5, 5), "20w1s": (20, 1)}
TRAIN_ENVS = [0, 1, 2, 3, 4]
TEST_ENVS = [5, 6, 7]
TEST_QUERIES = 15
CLI_DEFAULTS = build_parser()
TRIAL_SEED = CLI_DEFAULTS.get_default("trial_seed")
HOLDOUT_FRACTION = CLI_DEFAULTS.get_default("holdout_fraction")
SECTION = "## Few-shot Omniglot"
MARKER = "fewshot-omniglot"


def meta_learners() -> list[str]:
    return [n for n in registry.algorithm_names() if registry.get_algorithm(n).batch_kind == "episodes"]


def minibatch_learners() -> list[str]:
    """The few-shot learners trained on minibatches: ``FewShotPretrain`` and its subclasses."""
    return [n for n in registry.algorithm_names() if issubclass(registry.get_algorithm(n), FewShotPretrain)]


def few_shot_learners() -> list[str]:
    return sorted(meta_learners() + minibatch_learners())


def splits_of(dataset: OmniglotSmall) -> DomainSplits:
    """The CLI's splits of OmniglotSmall with the test alphabets held out (default trial seed and holdout)."""
    return dataset.split(TEST_ENVS, TRIAL_SEED, HOLDOUT_FRACTION)


def held_out_sampler(dataset: OmniglotSmall, n_way: int, k_shot: int, seed: int) -> EpisodeSampler:
    """Test episodes over every drawing of the unrotated characters of the test alphabets, pooled as the
    dataset's protocol says."""
    rotations = 4 if dataset.hparams["rotation_classes"] else 1
    cells = [c for c in split_cells(dataset, splits_of(dataset), TEST_ENVS, "all") if c.class_id % rotations == 0]
    return EpisodeSampler(cells, n_way, k_shot, TEST_QUERIES, seed, dataset.EPISODE_PROTOCOL)


def one_shot_error(algorithm: Algorithm, runs: list[OneShotRun], device: torch.device) -> float:
    """Mean error rate of ``algorithm.adapt`` over the official 20-way one-shot runs."""
    algorithm.eval()
    errors = []
    for run in runs:
        predict = algorithm.adapt(run.support_x.to(device), run.support_y.to(device))
        with torch.no_grad():
            wrong = predict(run.query_x.to(device)).argmax(1).cpu() != run.query_y
        errors.append(float(wrong.float().mean()))
    algorithm.train()
    return sum(errors) / len(errors)


class Trained(NamedTuple):
    """A trained model with its training steps and seconds."""

    algorithm: Algorithm
    steps: int
    train_s: float


def smallest_training_cell(dataset: OmniglotSmall) -> int:
    """Examples in the smallest training (domain, class) cell of the in split."""
    return min(len(c.indices) for c in split_cells(dataset, splits_of(dataset), TRAIN_ENVS, "in"))


def training_n_query(name: str, setting: str, smallest: int, overrides: dict) -> int | None:
    """The queries per class a meta-learner trains with in ``setting``: its ``n_query`` hparam, capped at what the
    smallest training cell (``smallest`` examples) leaves after ``k_shot`` support examples, so that no training
    class is left out of the episodes; ``None`` for a minibatch learner."""
    cls = registry.get_algorithm(name)
    if cls.batch_kind != "episodes":
        return None
    k_shot = SETTINGS[setting][1]
    return min(resolve(declared_hparams(OmniglotSmall, cls), 0, overrides)["n_query"], max(1, smallest - k_shot))


def cell_key(name: str, setting: str, args: argparse.Namespace, smallest: int) -> dict:
    """What defines one (algorithm, setting) cell, ``smallest`` as in ``training_n_query``: a stored result is
    reused only if all of it matches."""
    overrides = parse_overrides(args.hparams).get(name, {})
    return {"algorithm": name, "setting": setting, "steps_limit": args.steps, "minutes": args.minutes,
            "episodes": args.episodes, "seed": args.seed, "hparams": overrides,
            "n_query": training_n_query(name, setting, smallest, overrides),
            "device": torch.device(args.device).type, "holdout_fraction": HOLDOUT_FRACTION}


def load_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train(key: dict, dataset: OmniglotSmall, args: argparse.Namespace, device: torch.device) -> Trained:
    """Train the cell ``key``'s algorithm within the budget: a meta-learner on its setting's episodes, a
    minibatch learner on the CLI's minibatches (the same model for every setting)."""
    name, setting = key["algorithm"], key["setting"]
    cls = registry.get_algorithm(name)
    episodic = cls.batch_kind == "episodes"
    n_way, k_shot = SETTINGS[setting]
    overrides = {**key["hparams"], **({"n_way": n_way, "k_shot": k_shot, "n_query": key["n_query"]}
                                      if episodic else {})}
    hparams = resolve(declared_hparams(OmniglotSmall, cls), 0, overrides)
    torch.manual_seed(name_seed(args.seed, f"init-{name}-{setting}" if episodic else f"init-{name}"))
    algorithm = cls(dataset.input_shape, dataset.num_classes, len(TRAIN_ENVS), hparams).to(device)
    splits = splits_of(dataset)
    if episodic:
        algorithm.set_training_classes(split_cells(dataset, splits, TRAIN_ENVS, "in"))
        episodes = training_episode_sampler(dataset, splits, dataset.EPISODE_PROTOCOL, n_way, k_shot,
                                            hparams["n_query"], args.seed)
        next_batch = lambda: [next(episodes) for _ in range(hparams["meta_batch_size"])]  # noqa: E731
    else:
        minibatches = training_minibatch_sampler(dataset, splits, hparams["batch_size"], args.seed)
        next_batch = lambda: next(minibatches)  # noqa: E731
    start, steps = time.perf_counter(), 0
    while steps < args.steps and time.perf_counter() - start < 60 * args.minutes:
        algorithm.update(next_batch())
        steps += 1
    return Trained(algorithm, steps, time.perf_counter() - start)


def train_and_test(key: dict, dataset: OmniglotSmall, runs: list[OneShotRun] | None, args: argparse.Namespace,
                   device: torch.device, trained: Trained | None = None) -> dict:
    """Train (unless ``trained`` is given: a minibatch learner's model, shared by its settings) and test the cell
    ``key`` (see ``cell_key``); return its stored result."""
    setting = key["setting"]
    n_way, k_shot = SETTINGS[setting]
    trained = train(key, dataset, args, device) if trained is None else trained
    algorithm, steps, train_s = trained
    test = held_out_sampler(dataset, n_way, k_shot, name_seed(args.seed, f"test-{setting}"))
    acc, ci = episode_accuracy(algorithm, test, args.episodes)
    result = {**key, "acc": acc, "ci95": ci, "steps": steps, "train_s": train_s,
              "threads": torch.get_num_threads() if device.type == "cpu" else None}
    if runs is not None and (n_way, k_shot) == (20, 1):
        result["one_shot_runs_error"] = one_shot_error(algorithm, runs, device)
    return result


def markdown(results: list[dict], names: list[str], args: argparse.Namespace, device: torch.device) -> str:
    lines = [
        SECTION, "",
        f"`python bench/fewshot_omniglot.py --steps {args.steps} --minutes {args.minutes} --episodes {args.episodes}` "
        f"({time.strftime('%Y-%m-%d')}, {device.type}, torch {torch.__version__}, Python {platform.python_version()}). "
        "Meta-learners are trained per setting on episodes; FewShotPretrain and its subclasses (Baseline, "
        "Baseline++, RFS) once on minibatches over all training classes, that model scored in every setting. "
        f"Trained on the in split ({100 * (1 - HOLDOUT_FRACTION):.0f}%, as `dg_meta.train` uses) of "
        "images_background_small1 (5 alphabets, rotations as classes), episodes pooling its classes; tested on "
        "the unrotated characters of Japanese (katakana), Sanskrit and Tagalog; accuracy % with 95% CI over "
        f"{args.episodes} episodes (15 queries per class); error % on the official 20 within-alphabet "
        "one-shot runs with the 20-way 1-shot model; training steps (minutes, CPU threads) and training queries "
        "per class (a meta-learner's `n_query`, capped so that every training class fills an episode) per setting.",
        "", "| algorithm | 5-way 1-shot | 5-way 5-shot | 20-way 1-shot | 20 runs error | steps (min, threads) "
        "| training queries |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        row = {r["setting"]: r for r in results if r["algorithm"] == name}
        cells = [f"{100 * row[s]['acc']:.1f} ± {100 * row[s]['ci95']:.1f}" if s in row
                 else "not run" if s in args.settings else "" for s in SETTINGS]
        error = row.get("20w1s", {}).get("one_shot_runs_error")
        budget = " / ".join(f"{row[s]['steps']} ({row[s]['train_s'] / 60:.1f}, {row[s].get('threads') or 'GPU'})"
                            for s in SETTINGS if s in row)
        queries = " / ".join(str(row[s]["n_query"] or "-") for s in SETTINGS if s in row)
        lines.append(f"| {name} | {' | '.join(cells)} | {'' if error is None else f'{100 * error:.1f}'} | {budget} "
                     f"| {queries} |")
    lines.append("")
    missing = len(names) * len(args.settings) - len(results)
    if missing:
        lines.append(f"**Partial**: {missing} of {len(names) * len(args.settings)} cells not run yet; the same command "
                     "without `--collect-only` runs them (stored cells are reused).")
        lines.append("")
    lines.append("Published full-Omniglot references (5-way 1-shot, 30 background alphabets): ProtoNet 98.8, "
                 "MAML 98.7, iMAML 99.5, MatchingNet 98.1.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="../shared/data", help="folder holding omniglot/images_background_small*")
    p.add_argument("--algorithms", nargs="+", default=None, help="default: every registered few-shot learner")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--steps", type=int, default=100000, help="training steps per algorithm and setting")
    p.add_argument("--minutes", type=float, default=3.0, help="training minutes per algorithm and setting")
    p.add_argument("--episodes", type=int, default=1000, help="test episodes per setting")
    p.add_argument("--hparams", default=None, help='JSON {"ALGORITHM": {hparam: value}} overrides')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default="docs/benchmarks.md", help="markdown file whose section is replaced")
    p.add_argument("--results", default=str(Path(__file__).resolve().parent / "results" / "fewshot_omniglot.jsonl"),
                   help="finished cells, reused when their budget, episodes, seed and hparams match")
    p.add_argument("--collect-only", action="store_true",
                   help="write the table from the stored cells and train nothing (missing cells: 'not run'); "
                   "the data is still read, for each cell's training n_query")
    args = p.parse_args(argv)
    try:
        names = args.algorithms or few_shot_learners()
        overrides = parse_overrides(args.hparams)
        if not args.algorithms and "LastShot" in names and not overrides.get("LastShot", {}).get("teacher_run"):
            names.remove("LastShot")
            print("LastShot left out: it needs a finished pretraining run as teacher, --hparams "
                  "'{\"LastShot\": {\"teacher_run\": RUN_DIR}}' (bench/lastshot_teacher.py makes one)", file=sys.stderr)
        learners, by_minibatches = few_shot_learners(), minibatch_learners()
        for name in names:
            if name not in learners:
                raise UsageError(f"{name} is not a few-shot learner (a meta-learner or FewShotPretrain's family): "
                                 f"choose from {', '.join(learners)}")
        device = torch.device(args.device)
        results_path = Path(args.results)
        stored = load_results(results_path)
        dataset = OmniglotSmall(args.data_dir, {"rotation_classes": True}).to(device)
        smallest = smallest_training_cell(dataset)
        runs: list[OneShotRun] | None = None
        results = []
        for name in names:
            shared: Trained | None = None  # a minibatch learner's model, trained once for all its settings
            for setting in args.settings:
                key = cell_key(name, setting, args, smallest)
                done = [r for r in stored if all(r.get(k) == v for k, v in key.items())]
                if done or args.collect_only:
                    results += done[-1:]
                    continue
                if runs is None and "20w1s" in args.settings:
                    runs = load_one_shot_runs(args.data_dir)
                if shared is None and name in by_minibatches:
                    shared = train(key, dataset, args, device)
                results.append(train_and_test(key, dataset, runs, args, device, shared))
                stored.append(results[-1])
                results_path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(results_path, "".join(json.dumps(r) + "\n" for r in stored))
                print(json.dumps(results[-1]), flush=True)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    update_doc(Path(args.output), markdown(results, names, args, device), MARKER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
