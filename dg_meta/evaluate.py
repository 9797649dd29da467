"""``python -m dg_meta.evaluate RUN_DIR``: score a trained (or checkpointed) run on any few-shot episode setting.

The run folder's ``args.json`` says how the run was made (algorithm, dataset, hparams, test domains, seeds,
episode protocol); the algorithm and dataset are rebuilt as ``dg_meta.train.Trainer`` builds them, the weights
(and the RNG state) of ``checkpoint.pt`` are loaded, and every requested (shot, evaluation pool) is scored with
``dg_meta.train.episode_metrics``: the function behind the training-time few-shot scores, so the run's own
``--fs-way/--fs-shot/--fs-query/--fs-episodes`` and seed reproduce the few-shot numbers of its last record in
``results.jsonl`` exactly (on the kind of device it was trained on; another one rounds differently).
Each shot starts from the checkpoint's RNG state (``torch.random.fork_rng``), so ``--shot 1 5`` gives the same
1-shot numbers as ``--shot 1``. DG algorithms are scored through their default ``adapt`` (prototypes on their
frozen features). A ``--swad`` run is scored on its last weights, not on the SWAD average.

Evaluation pools are those of ``dg_meta.samplers.evaluation_pools`` under the run's episode protocol:
``env<i>`` per domain (``per_domain``: a held-out domain whole, a training domain's out split) or ``val`` and
``test`` (``class_pool``); ``--domains`` picks them by that name, or per domain by index or name; the default is
the held-out pools. Each shot's table rows go to ``RUN_DIR/evaluate_<way>w<shot>s<query>q_<episodes>.json``
(written atomically; a later call with the same setting replaces it).

Exit codes: 0 done; 2 bad input (one ``error:`` line naming the problem and the fix); 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import dg_meta
from dg_meta import registry
from dg_meta.atomic import atomic_write_json
from dg_meta.dataset import EPISODE_PROTOCOLS, MultiDomainDataset
from dg_meta.errors import UsageError
from dg_meta.samplers import EvaluationPool, evaluation_pools
from dg_meta.splits import DomainSplits
from dg_meta.train import Trainer, episode_metrics

CHECKPOINT = "checkpoint.pt"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one-line ``UsageError``s (exit code 2 in ``main``)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see python -m dg_meta.evaluate --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m dg_meta.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="the output folder of a run of python -m dg_meta.train")
    p.add_argument("--way", type=int, default=5, help="classes per episode (default: %(default)s)")
    p.add_argument("--shot", type=int, nargs="+", default=[1, 5],
                   help="support examples per class; several values give one row each (default: 1 5)")
    p.add_argument("--query", type=int, default=15, help="queries per class (default: %(default)s)")
    p.add_argument("--episodes", type=int, default=2000, help="episodes per pool and shot (default: %(default)s)")
    p.add_argument("--domains", nargs="+", default=None, metavar="POOL",
                   help="evaluation pools: env<i>, a domain's index or name (per_domain), val or test "
                        "(class_pool), or all (default: the held-out pools)")
    p.add_argument("--episode-protocol", choices=EPISODE_PROTOCOLS, default=None,
                   help="default: the run's (or, for a run that drew no episodes, the dataset's)")
    p.add_argument("--seed", type=int, default=None,
                   help="seeds the episodes (default: the run's --seed, as at training time)")
    p.add_argument("--data-dir", default=None, help="root folder of the dataset files (default: the run's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--plugin", action="append", default=[], help="module to import for extra algorithms")
    return p


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The ``args.json`` object of the run in ``run_dir``, which must hold a ``checkpoint.pt``; otherwise a
    one-line ``UsageError``."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UsageError(f"{run_dir}: no such folder; pass the output folder of a run of python -m dg_meta.train "
                         "(its --output-dir)")
    args_path = path / "args.json"
    if not args_path.is_file():
        raise UsageError(f"{run_dir} holds no args.json, so it is not a run folder of python -m dg_meta.train; pass "
                         "the output folder of a run (its --output-dir)")
    try:
        args = json.loads(args_path.read_text())
    except (OSError, ValueError):
        args = None
    if not isinstance(args, dict) or not isinstance(args.get("run"), dict):
        raise UsageError(f"{args_path} is not the args.json of a dg_meta run (unreadable, or no \"run\" object); "
                         "pass the output folder of a run of python -m dg_meta.train")
    if not (path / CHECKPOINT).is_file():
        raise UsageError(f"{run_dir} holds no {CHECKPOINT}: the run has not reached its first checkpoint (every "
                         "--checkpoint-freq steps); resume it with its python -m dg_meta.train command, then evaluate")
    return args


def check_device(device: str) -> str:
    """``device`` if torch knows it and it exists here, else a one-line ``UsageError``."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device}: not a torch device; pass cpu or cuda[:<index>]") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine; pass --device cpu")
    return device


def load_trainer(run: dict[str, Any], run_dir: Path, data_dir: str, device: str) -> Trainer:
    """The run's dataset, splits and algorithm as its ``Trainer`` builds them, with the checkpoint's weights,
    RNG and sampler state loaded (read on the CPU, as ``set_rng_state`` needs). A ``pretrained`` state dict is
    not read: the checkpoint replaces every weight it would have initialised."""
    trainer = Trainer({k: v for k, v in run.items() if k != "pretrained"}, data_dir, run_dir, device)
    ckpt = run_dir / CHECKPOINT
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        trainer.load(state)
    except (RuntimeError, KeyError, EOFError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{ckpt} cannot be loaded into {run['algorithm']} ({reason}); evaluate it with the "
                         "dg_meta version that trained it, or train the run again") from None
    return trainer


def pool_names(dataset: MultiDomainDataset, pools: dict[str, EvaluationPool], protocol: str) -> dict[str, str]:
    """Every name ``--domains`` accepts, mapped to its pool's prefix: the prefix itself and, per domain
    (``per_domain``), the domain's index and name."""
    names = {prefix: prefix for prefix in pools}
    if protocol == "per_domain":
        for env, domain in enumerate(dataset.domains):
            names.setdefault(str(env), f"env{env}")
            names.setdefault(domain.name, f"env{env}")
    return names


def select_pools(dataset: MultiDomainDataset, splits: DomainSplits, protocol: str,
                 domains: list[str] | None) -> dict[str, EvaluationPool]:
    """The pools named by ``domains`` (default: the held-out ones; ``all``: every one), in
    ``evaluation_pools`` order."""
    pools = evaluation_pools(dataset, splits, protocol)
    if domains is None:
        return {k: p for k, p in pools.items() if p.held_out}
    if "all" in domains:
        return pools
    names = pool_names(dataset, pools, protocol)
    unknown = [d for d in domains if d not in names]
    if unknown:
        choices = ", ".join(f"{k} ({p.label})" for k, p in pools.items())
        raise UsageError(f"--domains {unknown[0]}: not an evaluation pool of this run ({protocol} episodes); choose "
                         f"from {choices}, or all")
    chosen = {names[d] for d in domains}
    return {k: p for k, p in pools.items() if k in chosen}


def check_pool(pool: EvaluationPool, way: int, shot: int, query: int) -> None:
    """Refuse a setting under which ``pool`` cannot give an episode: fewer than ``way`` classes, or fewer than
    ``way`` classes with ``shot + query`` examples."""
    sizes: dict[int, int] = {}
    for cell in pool.cells:  # a class may span several domains (class_pool): EpisodeSampler draws cells
        sizes[cell.class_id] = max(sizes.get(cell.class_id, 0), len(cell.indices))
    if way > len(sizes):
        raise UsageError(f"--way {way}: {pool.label} has only {len(sizes)} classes; lower --way to at most "
                         f"{len(sizes)}")
    need = shot + query
    enough = sum(size >= need for size in sizes.values())
    if enough < way:
        raise UsageError(f"--shot {shot} + --query {query}: {pool.label} has only {enough} classes with {need} "
                         f"examples (its largest has {max(sizes.values())}), fewer than --way {way}; lower --shot "
                         "or --query")


def scorable(pools: dict[str, EvaluationPool], way: int, shot: int, query: int,
             skip_validation: bool) -> dict[str, EvaluationPool]:
    """The pools to score at ``shot``: all of ``pools`` (a ``UsageError`` if one cannot give an episode), or with
    ``skip_validation`` (``--domains all``) without the validation pools that cannot, as training-time evaluation
    skips them (listed in one warning line on stderr)."""
    kept, skipped = {}, []
    for prefix, pool in pools.items():
        try:
            check_pool(pool, way, shot, query)
        except UsageError:
            if pool.held_out or not skip_validation:
                raise
            skipped.append(prefix)
            continue
        kept[prefix] = pool
    if skipped:
        print(f"warning: {shot}-shot: {', '.join(skipped)} cannot give {way}-way episodes of {shot + query} examples "
              "per class: not scored (as at training time)", file=sys.stderr)
    return kept


def evaluate_run(run_dir: str | Path, way: int = 5, shots: tuple[int, ...] | list[int] = (1, 5), query: int = 15,
                 episodes: int = 2000, domains: list[str] | None = None, protocol: str | None = None,
                 seed: int | None = None, data_dir: str | None = None, device: str = "cpu") -> list[dict[str, Any]]:
    """Score the run in ``run_dir`` on ``way``-way ``query``-query episodes for every shot of ``shots`` and every
    selected pool, write one JSON file per shot beside the run and return their contents (in ``shots`` order).
    Every bad input is a one-line ``UsageError``, raised before anything is written."""
    shots = list(dict.fromkeys(shots))
    if min(way, query, episodes, *shots) < 1:
        raise UsageError(f"--way, --shot, --query and --episodes must be >= 1, got {way}, "
                         f"{' '.join(map(str, shots))}, {query}, {episodes}")
    run_dir = Path(run_dir)
    args = read_run(run_dir)
    run = args["run"]
    data_dir = data_dir if data_dir is not None else args.get("data_dir", os.environ.get("DG_META_DATA", "data"))
    dataset_cls = registry.get_dataset(run["dataset"])
    protocol = protocol or run.get("episode_protocol") or dataset_cls.EPISODE_PROTOCOL
    seed = run["seed"] if seed is None else seed
    trainer = load_trainer(run, run_dir, data_dir, check_device(device))
    pools = select_pools(trainer.dataset, trainer.splits, protocol, domains)
    scored = {shot: scorable(pools, way, shot, query, skip_validation=domains is not None and "all" in domains)
              for shot in shots}
    devices = [trainer.device.index or 0] if trainer.device.type == "cuda" else []
    header = {
        "run_dir": str(run_dir.resolve()), "algorithm": run["algorithm"], "dataset": run["dataset"],
        "test_envs": run["test_envs"], "step": trainer.step, "finished": (run_dir / "done").exists(),
        "protocol": protocol, "seed": seed, "way": way, "query": query, "episodes": episodes,
        "data_dir": data_dir, "device": str(trainer.device),
        "versions": {"dg_meta": dg_meta.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    reports = []
    for shot in shots:
        with torch.random.fork_rng(devices=devices):  # every shot from the checkpoint's RNG state
            metrics = episode_metrics(trainer.algorithm, trainer.dataset, trainer.splits, protocol, way, shot, query,
                                      seed, episodes, list(scored[shot]))
        rows = {prefix: {"pool": pool.label, "held_out": pool.held_out, "acc": metrics[f"{prefix}_fs_acc"],
                         "ci": metrics[f"{prefix}_fs_ci"]} for prefix, pool in scored[shot].items()}
        report = {**header, "shot": shot, "evaluated": time.strftime("%Y-%m-%dT%H:%M:%S"), "pools": rows}
        report["path"] = str(run_dir / f"evaluate_{way}w{shot}s{query}q_{episodes}.json")
        atomic_write_json(report["path"], report)
        reports.append(report)
    return reports


def table(reports: list[dict[str, Any]]) -> str:
    """The printed table: a header line, then one row per (shot, pool) with its accuracy and 95% CI."""
    first = reports[0]
    state = "finished" if first["finished"] else "not finished"
    lines = [f"{first['algorithm']} on {first['dataset']}, checkpoint of step {first['step']} ({state}): "
             f"{first['way']}-way, {first['query']} queries per class, {first['episodes']} episodes per row, "
             f"{first['protocol']} episodes, seed {first['seed']}",
             f"{'shot':>4}  {'pool':<40} {'accuracy':>8}  95% CI"]
    for report in reports:
        for prefix, row in report["pools"].items():
            role = "held-out" if row["held_out"] else "validation"
            pool = f"{prefix}: {row['pool']} ({role})"
            lines.append(f"{report['shot']:>4}  {pool:<40} {100 * row['acc']:>7.2f}%  ± {100 * row['ci']:.2f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The CLI: prints the table and the files written; every bad input is one ``error:`` line, exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        for module in args.plugin:
            registry.load_plugin(module)
        reports = evaluate_run(args.run_dir, args.way, args.shot, args.query, args.episodes, args.domains,
                               args.episode_protocol, args.seed, args.data_dir, args.device)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the evaluation files already written are complete, the others were not written",
              file=sys.stderr)
        return 130
    print(table(reports))
    for report in reports:
        print(f"results: {report['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
