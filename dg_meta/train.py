"""``python -m dg_meta.train``: the one training loop for every algorithm and dataset.

It resolves hparams, builds the dataset's in/out splits, feeds ``algorithm.update`` from the sampler its
``batch_kind`` names, and every ``--checkpoint-freq`` steps evaluates every domain, appends a record to
``results.jsonl``, writes TensorBoard scalars and saves ``checkpoint.pt`` atomically (model, optimizers,
sampler and RNG state, and the records so far). Re-running the same command resumes from the checkpoint;
a finished run (``done`` present) is not re-run.

Exit codes: 0 done; 2 bad input (one ``error:`` line, checked before the run folder is created, so a refused
run writes nothing); 1 a run that diverged (a non-finite loss: not misuse, so not 2); 130 Ctrl-C (one line
naming the last checkpoint and the command that resumes from it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import dg_meta
from dg_meta import distributed, registry
from dg_meta.algorithm import Algorithm
from dg_meta.atomic import atomic_torch_save, atomic_write_json, atomic_write_text
from dg_meta.dataset import EPISODE_PROTOCOLS, MultiDomainDataset
from dg_meta.errors import TrainingError, UsageError
from dg_meta.evaluation import domain_accuracy, domain_loss, episode_accuracy
from dg_meta.heartbeat import write_heartbeat
from dg_meta.hparams import declared_hparams, name_seed, parse_overrides, resolve
from dg_meta.init_from import init_from_run, run_folder
from dg_meta.networks import load_pretrained
from dg_meta.samplers import (
    Cell,
    DomainBatchSampler,
    EpisodeSampler,
    evaluation_episode_samplers,
    evaluation_pools,
    split_cells,
    training_episode_sampler,
    training_minibatch_sampler,
)
from dg_meta.splits import DomainSplits, check_test_envs
from dg_meta.swad import SWAD
from dg_meta.tensorboard_log import RunLog, resolve_log_every
from dg_meta.weight_averaging import update_bn

DEFAULT_DATASET = "RotatedDigits"
TIMING_KEYS = ("step_time", "eval_time")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one-line ``UsageError``s (exit code 2 in ``main``)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see python -m dg_meta.train --help)")


def build_parser() -> argparse.ArgumentParser:
    epilog = (f"algorithms: {', '.join(registry.algorithm_names())}\n"
              f"datasets:   {', '.join(registry.dataset_names())}")
    p = _Parser(prog="python -m dg_meta.train", description=__doc__.split("\n")[0],
                                epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algorithm", required=True, help="registered algorithm name (see below)")
    p.add_argument("--dataset", default=DEFAULT_DATASET, help="registered dataset name (default: %(default)s)")
    p.add_argument("--data-dir", default=os.environ.get("DG_META_DATA", "data"),
                   help="root folder of the dataset files (default: $DG_META_DATA or ./data)")
    p.add_argument("--test-envs", type=int, nargs="+", default=None,
                   help="held-out domain indices (default: the dataset's, usually 0)")
    p.add_argument("--hparams", default=None, help="JSON object of hparam overrides, e.g. '{\"lr\": 1e-3}'")
    p.add_argument("--hparams-seed", type=int, default=0, help="0: defaults; s>0: random-search draw s")
    p.add_argument("--trial-seed", type=int, default=0, help="seeds the in/out splits")
    p.add_argument("--seed", type=int, default=0, help="seeds initialisation and sampling")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the dataset's)")
    p.add_argument("--checkpoint-freq", type=int, default=None, help="steps between evaluations/checkpoints")
    p.add_argument("--holdout-fraction", type=float, default=0.2,
                   help="out-split fraction of each domain (0: train on all of it, no training-domain validation)")
    p.add_argument("--fs-episodes", type=int, default=None,
                   help="few-shot evaluation episodes per domain (default: 100 for meta-learners, 0 otherwise)")
    p.add_argument("--fs-way", type=int, default=5, help="classes per evaluation episode")
    p.add_argument("--fs-shot", type=int, default=1, help="support examples per class in evaluation episodes")
    p.add_argument("--fs-query", type=int, default=15, help="queries per class in evaluation episodes")
    p.add_argument("--episode-protocol", choices=EPISODE_PROTOCOLS, default=None,
                   help="how training and evaluation episodes draw classes: per_domain (one domain per episode) "
                        "or class_pool (the pooled classes of all training, or all held-out, domains); "
                        "default: the dataset's EPISODE_PROTOCOL")
    p.add_argument("--output-dir", default=None,
                   help="run folder (default: outputs/ALGORITHM/DATASET/te<i>/hp<s>/trial<t>-<args hash>)")
    p.add_argument("--log-every", type=int, default=None, metavar="N",
                   help="TensorBoard loss point every N steps (default: steps // 50; not part of the run's identity)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--plugin", action="append", default=[], help="module to import for extra algorithms")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the algorithm's networks (speed only: not part of the run's identity)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (torch.set_num_threads; default: torch's choice; not part of the "
                        "run's identity); 1 is often fastest on a machine shared with other jobs")
    p.add_argument("--pretrained", default=None, metavar="PATH",
                   help="local torchvision ResNet state dict to initialise the ResNet featurizer (never downloaded)")
    p.add_argument("--init-from", default=None, metavar="RUN_DIR",
                   help="initialise a fresh run from RUN_DIR/checkpoint.pt (any algorithm): every weight whose name "
                        "and shape match is loaded, the rest is listed on stderr; not applied on resume")
    p.add_argument("--swad", action="store_true",
                   help="SWAD (Cha et al. 2021): score the dense average of the weights over the loss valley of the "
                        "training domains' validation loss (dg_meta/swad.py); DG algorithms, --holdout-fraction > 0")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="image-folder datasets: leave out images that cannot be decoded (listed on stderr) "
                        "instead of refusing them; recorded in the run's hparams")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Load ``--plugin`` modules first (so ``--help`` lists their algorithms), then parse everything."""
    pre = _Parser(add_help=False)
    pre.add_argument("--plugin", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    for module in known.plugin:
        registry.load_plugin(module)
    return build_parser().parse_args(argv)


def resolve_run(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the arguments and resolve everything that defines the run (its identity)."""
    algorithm_cls = registry.get_algorithm(args.algorithm)
    dataset_cls = registry.get_dataset(args.dataset)
    test_envs = check_test_envs(args.test_envs if args.test_envs is not None else dataset_cls.DEFAULT_TEST_ENVS,
                                dataset_cls.ENVIRONMENTS)
    hparams = resolve(declared_hparams(dataset_cls, algorithm_cls), args.hparams_seed,
                      parse_overrides(args.hparams))
    if args.skip_bad_images:  # a data option, not a declared hparam: recorded only when given (keeps identities)
        if not getattr(dataset_cls, "CHECKS_IMAGE_FILES", False):
            raise UsageError(f"--skip-bad-images: only image-folder datasets (PACS, VLCS, ...) can leave out "
                             f"unreadable images, not {args.dataset}; drop the flag")
        hparams["skip_bad_images"] = True
    steps = dataset_cls.N_STEPS if args.steps is None else args.steps
    freq = dataset_cls.CHECKPOINT_FREQ if args.checkpoint_freq is None else args.checkpoint_freq
    if steps < 1 or freq < 1:
        raise UsageError(f"--steps and --checkpoint-freq must be >= 1, got {steps} and {freq}")
    if not 0 <= args.holdout_fraction < 1:
        raise UsageError(f"--holdout-fraction must be in [0, 1), got {args.holdout_fraction}")
    episodic = algorithm_cls.batch_kind == "episodes"
    if args.swad and (episodic or not algorithm_cls.predicts_classes):
        raise UsageError(f"--swad averages the weights of DG algorithms scored on held-out domains; {args.algorithm} "
                         "is trained on episodes: drop --swad")
    if args.swad and args.holdout_fraction == 0:
        raise UsageError("--swad needs the training domains' out splits for its validation loss: use "
                         "--holdout-fraction > 0")
    fs_episodes = (100 if episodic else 0) if args.fs_episodes is None else args.fs_episodes
    if fs_episodes < 0 or min(args.fs_way, args.fs_shot, args.fs_query) < 1:
        raise UsageError(f"--fs-episodes must be >= 0 and --fs-way, --fs-shot, --fs-query >= 1, got {fs_episodes}, "
                         f"{args.fs_way}, {args.fs_shot}, {args.fs_query}")
    # recorded only where episodes are drawn, so runs without any keep their identity (and folder name)
    protocol = {"episode_protocol": args.episode_protocol or dataset_cls.EPISODE_PROTOCOL} \
        if episodic or fs_episodes > 0 else {}
    pretrained = None
    if args.pretrained is not None:
        if not Path(args.pretrained).is_file():
            raise UsageError(f"--pretrained {args.pretrained}: no such file; pass a local torchvision ResNet "
                             "state dict saved with torch.save(model.state_dict(), PATH)")
        pretrained = str(Path(args.pretrained).resolve())
    init_from = {} if args.init_from is None else {"init_from": str(run_folder(args.init_from, "--init-from"))}
    return {
        "algorithm": args.algorithm, "dataset": args.dataset, "test_envs": test_envs, "hparams": hparams,
        "hparams_seed": args.hparams_seed, "trial_seed": args.trial_seed, "seed": args.seed,
        "steps": steps, "checkpoint_freq": freq, "holdout_fraction": args.holdout_fraction,
        "fs_episodes": fs_episodes, "fs_way": args.fs_way, "fs_shot": args.fs_shot, "fs_query": args.fs_query,
        "pretrained": pretrained, **init_from, **protocol, **({"swad": True} if args.swad else {}),
    }


def run_hash(run: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:10]


def run_name(run: dict[str, Any]) -> str:
    """``ALGORITHM/DATASET/te<i>[-<j>]/hp<s>/trial<t>-<hash>``: the run's folder below a sweep (or ``outputs``),
    hence its TensorBoard run name; the hash of every other argument keeps different runs apart."""
    envs = "-".join(map(str, run["test_envs"]))
    return (f"{run['algorithm']}/{run['dataset']}/te{envs}/hp{run['hparams_seed']}/"
            f"trial{run['trial_seed']}-{run_hash(run)}")


def default_output_dir(run: dict[str, Any]) -> Path:
    return Path("outputs") / run_name(run)


class Trainer:
    """One run: the dataset, splits, algorithm, samplers and the loop with checkpoint/resume."""

    def __init__(self, run: dict[str, Any], data_dir: str, output_dir: Path, device: str, compile: bool = False):
        self.run, self.output_dir = run, output_dir
        self.device = torch.device(device)
        algorithm_cls = registry.get_algorithm(run["algorithm"])
        dataset_cls = registry.get_dataset(run["dataset"])
        self.dataset: MultiDomainDataset = dataset_cls(data_dir, run["hparams"]).to(self.device)
        self.splits: DomainSplits = self.dataset.split(run["test_envs"], run["trial_seed"], run["holdout_fraction"])
        torch.manual_seed(name_seed(run["seed"], "init"))
        self.algorithm: Algorithm = algorithm_cls(self.dataset.input_shape, self.dataset.num_classes,
                                                  len(self.splits.train_envs), run["hparams"]).to(self.device)
        self.algorithm.use_fast_layout()
        if run.get("pretrained"):
            load_pretrained(self.algorithm, run["pretrained"])
        if compile:
            for name in algorithm_cls.compile_modules:
                getattr(self.algorithm, name).compile()
        self.sampler = self._train_sampler()
        episodic = self.algorithm.batch_kind == "episodes"
        distributed.check_data_parallel(self.algorithm, [run["hparams"]["meta_batch_size"]] if episodic
                                        else self.sampler.batch_sizes())
        if distributed.world_size() > 1:
            distributed.synchronize_optimizers(self.algorithm)
        if self.algorithm.batch_kind == "episodes":
            self.algorithm.set_training_classes(self._cells(self.splits.train_envs, use_in=True))
        self.swad = SWAD(self.algorithm) if run.get("swad") else None
        self.step = 0
        self.records: list[dict] = []

    def _cells(self, envs: list[int], use_in: bool) -> list[Cell]:
        return split_cells(self.dataset, self.splits, envs, "in" if use_in else "out")

    def _train_sampler(self) -> DomainBatchSampler | EpisodeSampler:
        hp = self.run["hparams"]
        if self.algorithm.batch_kind == "episodes":
            return training_episode_sampler(self.dataset, self.splits, self.run["episode_protocol"], hp["n_way"],
                                            hp["k_shot"], hp["n_query"], self.run["seed"])
        return self._domain_sampler("sampler", sharded=True)

    def _domain_sampler(self, purpose: str, sharded: bool = False) -> DomainBatchSampler:
        """Minibatches of every training domain's ``in`` split, seeded by the run's seed and ``purpose``; with
        ``sharded``, on several processes, this process's share of each (``dg_meta.distributed.shard``)."""
        part = (lambda n: distributed.shard(n, "a training domain's minibatch")) \
            if sharded and distributed.world_size() > 1 else None
        return training_minibatch_sampler(self.dataset, self.splits, self.run["hparams"]["batch_size"],
                                          self.run["seed"], purpose, part)

    def next_batch(self) -> Any:
        """The next training batch, or on several processes this process's share of it (the tasks of its block
        of the meta-batch, its slice of every domain's minibatch)."""
        if self.algorithm.batch_kind == "episodes":
            n = self.run["hparams"]["meta_batch_size"]
            return self.sampler.take(n, distributed.shard(n, "hparam meta_batch_size"))
        return next(self.sampler)

    def evaluate(self, model: Algorithm | None = None) -> dict[str, float]:
        """Per-domain in/out accuracy (with SWAD: the training domains' mean out-split loss) and, if asked,
        episode accuracy with its 95% CI, of ``model`` (default: the algorithm), RNG untouched."""
        model = self.algorithm if model is None else model
        metrics: dict[str, float] = {}
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if model.predicts_classes:
                for env, domain in enumerate(self.dataset.domains):
                    metrics[f"env{env}_in_acc"] = domain_accuracy(model, domain, self.splits.in_idx[env])
                    if len(self.splits.out_idx[env]):  # --holdout-fraction 0: no out split, no key
                        metrics[f"env{env}_out_acc"] = domain_accuracy(model, domain, self.splits.out_idx[env])
            if self.swad is not None:
                losses = [domain_loss(model, self.dataset.domains[e], self.splits.out_idx[e])
                          for e in self.splits.train_envs]
                metrics["train_out_loss"] = sum(losses) / len(losses)
            if self.run["fs_episodes"] > 0:
                metrics.update(self._episode_metrics(model))
        return metrics

    def swad_record(self) -> dict[str, Any]:
        """The SWAD model's record: the selected average (batch norms recomputed on 500 training batches from
        their own seeded sampler) scored like a checkpoint, with the steps it spans and whether the validation
        loss converged (if not, SWAD's rule falls back to the last segment)."""
        assert self.swad is not None
        model, average = self.swad.averaged_model()
        update_bn(model, model.predict, pooled_inputs(self._domain_sampler("swad_bn")))
        return {**self.evaluate(model), "step": self.step, "swad": True, "swad_start_step": average.start_step,
                "swad_end_step": average.end_step, "swad_converged": self.swad.valley.converge_step is not None}

    def _episode_metrics(self, model: Algorithm) -> dict[str, float]:
        """``{prefix}_fs_acc`` / ``_fs_ci`` per evaluation sampler of the run's protocol: ``env{i}`` per domain
        (per_domain), or ``val`` and ``test`` pooling the training / held-out classes (class_pool)."""
        return episode_metrics(model, self.dataset, self.splits, self.run["episode_protocol"], self.run["fs_way"],
                               self.run["fs_shot"], self.run["fs_query"], self.run["seed"], self.run["fs_episodes"])

    def state(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        swad = {} if self.swad is None else {"swad": self.swad.state_dict()}
        return {"step": self.step, "algorithm": self.algorithm.checkpoint_state(),
                "sampler": self.sampler.state_dict(), "rng": rng, "records": self.records, **swad}

    def load(self, state: dict) -> None:
        self.step = state["step"]
        self.algorithm.load_checkpoint_state(state["algorithm"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["torch"].cpu())  # the checkpoint is loaded onto the device
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)
        self.records = state["records"]
        if self.swad is not None:
            self.swad.load_state_dict(state["swad"])


def episode_metrics(model: Algorithm, dataset: MultiDomainDataset, splits: DomainSplits, protocol: str, way: int,
                    shot: int, query: int, seed: int, episodes: int,
                    prefixes: list[str] | None = None) -> dict[str, float]:
    """``{prefix}_fs_acc`` / ``_fs_ci`` of ``episodes`` episodes from each sampler of
    ``evaluation_episode_samplers`` (only ``prefixes``, if given, in that function's order): the one function
    behind training-time scores and ``python -m dg_meta.evaluate``, so both draw and score the same episodes."""
    metrics = {}
    for prefix, sampler in evaluation_episode_samplers(dataset, splits, protocol, way, shot, query, seed).items():
        if prefixes is None or prefix in prefixes:
            acc, ci = episode_accuracy(model, sampler, episodes)
            metrics.update({f"{prefix}_fs_acc": acc, f"{prefix}_fs_ci": ci})
    return metrics


def pooled_inputs(sampler: DomainBatchSampler) -> Iterator[torch.Tensor]:
    """The inputs of every training domain's minibatch, concatenated, one step after another."""
    while True:
        yield torch.cat([x for x, _ in next(sampler)])


def _write_records(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def summary_line(run: dict[str, Any], record: dict, env_names: list[str]) -> str:
    parts = []
    for env, name in enumerate(env_names):
        role = "test" if env in run["test_envs"] else "val"
        key = f"env{env}_in_acc" if role == "test" else f"env{env}_out_acc"
        value = record.get(key, record.get(f"env{env}_fs_acc"))
        if value is not None:
            parts.append(f"{name} {role} {100 * value:.1f}%")
    for prefix, pool in (("val", "training classes"), ("test", "held-out classes")):  # class_pool episodes
        if f"{prefix}_fs_acc" in record:
            parts.append(f"{pool} {prefix} {100 * record[f'{prefix}_fs_acc']:.1f}%")
    swad = "" if not record.get("swad") else (
        f" (SWAD: mean of steps {record['swad_start_step']}-{record['swad_end_step']}"
        + ("" if record["swad_converged"] else "; the loss never reached a valley: the last segment only") + ")")
    return f"{run['algorithm']} on {run['dataset']} step {record['step']}{swad}: " + " | ".join(parts)


def check_compile(algorithm: str) -> None:
    """Refuse ``--compile`` for an algorithm that declares no ``compile_modules``."""
    if not registry.get_algorithm(algorithm).compile_modules:
        raise UsageError(f"--compile: {algorithm} does not support torch.compile (it differentiates through its "
                         "networks twice, or is unchecked); run it without --compile")


RUN_FILES = ("checkpoint.pt", "results.jsonl", "heartbeat.json", "done")  # written only after args.json
FINITE_CHECK_EVERY = 10  # steps between reads of the losses' finiteness (one host-device sync per read)


def check_output_dir(output_dir: Path, run: dict[str, Any]) -> None:
    """Refuse, before anything is written, an ``--output-dir`` that cannot hold ``run``: a file or a path through
    one, a folder whose ``args.json`` is unreadable or holds another run, or a folder with run files but no
    ``args.json`` (not a complete dg_meta run folder: its arguments cannot be checked, so it is not adopted)."""
    existing = next(p for p in (output_dir, *output_dir.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == output_dir else f"cannot be created: {existing} is a file"
        raise UsageError(f"--output-dir {output_dir} {where}; choose another --output-dir")
    args_path = output_dir / "args.json"
    if not args_path.is_file():
        found = [name for name in RUN_FILES if (output_dir / name).exists()]
        if found:
            raise UsageError(f"{output_dir} holds {', '.join(found)} but no args.json, so it is not a complete "
                             "dg_meta run folder; choose another --output-dir or delete that folder")
        return
    try:
        previous = json.loads(args_path.read_text())["run"]
    except (OSError, ValueError, KeyError, TypeError):
        previous = None
    if not isinstance(previous, dict):
        raise UsageError(f"{args_path} is not the args.json of a dg_meta run (unreadable, or no \"run\" object); "
                         "choose another --output-dir or delete that folder")
    current = json.loads(json.dumps(run))
    if previous != current:
        diff = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        raise UsageError(f"{output_dir} holds a run with different arguments ({', '.join(diff)}): "
                         "choose another --output-dir or delete that folder")


def _finished_record(results_path: Path) -> dict:
    lines = results_path.read_text().splitlines() if results_path.is_file() else []
    if not lines:
        raise UsageError(f"{results_path.parent} is marked done but holds no results.jsonl records; delete that "
                         "folder to run it again")
    return json.loads(lines[-1])


def check_fewshot_pools(dataset: MultiDomainDataset, splits: DomainSplits, run: dict[str, Any]) -> None:
    """Refuse few-shot evaluation flags under which ``evaluation_episode_samplers`` would skip a pool (a run
    that finishes without its few-shot metric): ``--fs-way`` above the classes of a pool of ``evaluation_pools``
    (a domain, or under ``class_pool`` the pooled training or held-out domains), or a held-out pool without
    ``--fs-way`` classes of ``--fs-shot + --fs-query`` examples. A training domain's ``out`` split may still be
    too small for that many examples per class; its validation episodes are then skipped, as that function
    says."""
    if run["fs_episodes"] == 0:
        return
    way, need = run["fs_way"], run["fs_shot"] + run["fs_query"]
    pools = evaluation_pools(dataset, splits, run["episode_protocol"]).values()
    classes = {pool.label: len({c.class_id for c in pool.cells}) for pool in pools}
    fewest = min(classes, key=classes.get)
    if way > classes[fewest]:
        raise UsageError(f"--fs-way {way}: {fewest} has only {classes[fewest]} classes; lower --fs-way to at most "
                         f"{classes[fewest]}")
    for pool in pools:
        enough = len({c.class_id for c in pool.cells if len(c.indices) >= need})
        if pool.held_out and enough < way:
            raise UsageError(f"--fs-shot {run['fs_shot']} + --fs-query {run['fs_query']}: held-out {pool.label} has "
                             f"only {enough} classes with {need} examples, fewer than --fs-way {way}; lower "
                             "--fs-query or --fs-shot")


def check_finite(sums: dict[str, Any], since: int, step: int, output_dir: Path, records: list[dict]) -> None:
    """Raise a ``TrainingError`` if a loss summed since the last checkpoint is not finite.

    A non-finite loss leaves its running sum non-finite (NaN and infinities survive addition), so reading the
    sums every ``FINITE_CHECK_EVERY`` steps finds the first bad window of steps ``since+1..step`` with one
    host-device sync for all losses instead of one per step. The message says truthfully whether a checkpoint
    exists (``records`` are the checkpoint's: appended just before each save)."""
    keys = [k for k, v in sums.items() if isinstance(v, torch.Tensor)]
    flags = torch.stack([torch.isfinite(sums[k]).all() for k in keys]).tolist() if keys else []
    finite = dict(zip(keys, flags)) | {k: math.isfinite(v) for k, v in sums.items() if k not in keys}
    bad = [k for k, ok in finite.items() if not ok]
    if bad:
        kept = (f"the checkpoint of step {records[-1]['step']} in {output_dir} is kept" if records
                else "no checkpoint was saved before it")
        raise TrainingError(f"{', '.join(bad)} became non-finite in steps {since + 1}-{step}: lower the learning rate "
                            f"(--hparams '{{\"lr\": ...}}') and start a new run; {kept}")


def kept_checkpoint(output_dir: Path) -> str:
    """What re-running a stopped run resumes from: the step of ``checkpoint.pt`` (replaced atomically, so the
    truth), with any number of processes."""
    ckpt = output_dir / "checkpoint.pt"
    if not ckpt.is_file():
        return f"no checkpoint was saved in {output_dir}: re-running the command starts the run over"
    step = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["step"]
    return (f"the checkpoint of step {step} in {output_dir} is kept: re-run the same command (with any number of "
            "processes) to resume")


def train(run: dict[str, Any], data_dir: str, output_dir: Path, device: str, progress: bool = True,
          compile: bool = False, log_every: int | None = None) -> dict:
    """``_train`` in this process's share of a run on several processes when launched by torchrun or a
    multi-task srun (``dg_meta.distributed.session``: ``device`` ``cuda`` becomes the GPU of the local rank),
    else as it is. A process that stops ends the run with one ``TrainingError`` line naming it."""
    with distributed.session(device, kept=lambda: kept_checkpoint(output_dir)) as device:
        return _train(run, data_dir, output_dir, device, progress, compile, log_every)


def _train(run: dict[str, Any], data_dir: str, output_dir: Path, device: str, progress: bool = True,
           compile: bool = False, log_every: int | None = None) -> dict:
    """Train (or resume, or skip if finished) the run in ``output_dir``; return the final record.

    ``compile`` wraps the algorithm's ``compile_modules`` with ``torch.compile``: it changes speed and
    rounding, not the run, so a run may be resumed with or without it. ``log_every`` (default: ``steps // 50``)
    spaces the TensorBoard loss points (``dg_meta.tensorboard_log``); it is not part of the run either.
    """
    if compile:
        check_compile(run["algorithm"])
    log_every = resolve_log_every(log_every, run["steps"])
    args_path, results_path = output_dir / "args.json", output_dir / "results.jsonl"
    ckpt_path, done_path = output_dir / "checkpoint.pt", output_dir / "done"
    check_output_dir(output_dir, run)
    if done_path.exists():
        return _finished_record(results_path)
    # everything that can refuse the run comes before the folder is made: a refused run writes nothing
    trainer = Trainer(run, data_dir, output_dir, device, compile)
    check_fewshot_pools(trainer.dataset, trainer.splits, run)
    resume = ckpt_path.exists()
    init_report = init_from_run(trainer.algorithm, run["init_from"]) if run.get("init_from") and not resume else None
    distributed.barrier()  # every process has looked for the checkpoint before rank 0 writes anything
    main = distributed.is_main()  # on several processes rank 0 alone evaluates and writes the run's files
    if main:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--output-dir {output_dir}: cannot create it ({exc.strerror}); choose another "
                             "--output-dir") from None
        for stale in output_dir.glob(".*.tmp"):
            stale.unlink()
    if resume:
        trainer.load(torch.load(ckpt_path, map_location=trainer.device, weights_only=True))
        if main:
            _write_records(results_path, trainer.records)
    elif main:
        if init_report:
            print(init_report, file=sys.stderr)
        atomic_write_json(args_path, {
            "run": run, "command": sys.argv, "device": str(trainer.device), "data_dir": data_dir,
            "versions": {"dg_meta": dg_meta.__version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "host": platform.node(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
    tb = RunLog(output_dir / "tb", run, trainer.dataset.ENVIRONMENTS, trainer.step, log_every) if main else None
    run_info = {"args": {**{k: run[k] for k in ("algorithm", "dataset", "test_envs", "hparams_seed",
                                                "trial_seed", "seed")}, **({"swad": True} if run.get("swad") else {})},
                "hparams": run["hparams"]}
    sums: dict[str, Any] = {}
    steps_in_interval, interval_start = 0, time.perf_counter()
    attempt_start, attempt_start_step = time.time(), trainer.step
    checked_step = trainer.step  # the losses are known finite up to here
    bar = tqdm(total=run["steps"], initial=trainer.step, disable=not (progress and main), desc=run["algorithm"],
               dynamic_ncols=True, file=sys.stderr)
    while trainer.step < run["steps"] and not (trainer.swad and trainer.swad.dead_valley):
        losses = distributed.update(trainer.algorithm, trainer.next_batch(), trainer.device)
        for key, value in losses.items():
            value = value.detach() if isinstance(value, torch.Tensor) else value
            sums[key] = sums[key] + value if key in sums else value
        trainer.step += 1
        if trainer.swad is not None:
            trainer.swad.update(trainer.step)
        steps_in_interval += 1
        bar.update(1)
        if tb is not None:
            tb.add_losses(losses, trainer.step)
        at_checkpoint = trainer.step % run["checkpoint_freq"] == 0 or trainer.step == run["steps"]
        if at_checkpoint or trainer.step % FINITE_CHECK_EVERY == 0:
            check_finite(sums, checked_step, trainer.step, output_dir, trainer.records)
            checked_step = trainer.step
        if not at_checkpoint:
            continue
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        step_time = (time.perf_counter() - interval_start) / steps_in_interval
        record = {k: float(v) / steps_in_interval for k, v in sums.items()}
        eval_start = time.perf_counter()
        record.update(distributed.from_main(trainer.evaluate))
        record.update(step=trainer.step, step_time=step_time, eval_time=time.perf_counter() - eval_start,
                      **run_info)
        if trainer.swad is not None:
            trainer.swad.close_segment(record["train_out_loss"])
        trainer.records.append(record)
        if main:
            _write_records(results_path, trainer.records)
            tb.add_checkpoint(trainer.records)
            atomic_torch_save(ckpt_path, trainer.state())
            write_heartbeat(output_dir, trainer.step, run["steps"], attempt_start_step, attempt_start)
            bar.set_postfix_str(summary_line(run, record, trainer.dataset.ENVIRONMENTS).split(": ", 1)[1][:80])
        sums, steps_in_interval, interval_start = {}, 0, time.perf_counter()
    bar.close()
    if trainer.swad is not None:
        trainer.records.append({**distributed.from_main(trainer.swad_record), **run_info})
        if main:
            _write_records(results_path, trainer.records)
    if tb is not None:
        tb.finish()
        atomic_write_text(done_path, "")
    return trainer.records[-1]


def set_threads(threads: int | None) -> None:
    """``--threads N``: ``torch.set_num_threads(N)`` (speed only); ``None`` keeps torch's choice."""
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def _close_progress_bars() -> None:
    """Close the progress bar a diverged or interrupted run leaves open (``tqdm._instances``: the bars alive), so
    that the message after it has a line of its own and the bar is not redrawn below it at exit."""
    for bar in list(tqdm._instances):
        bar.close()


def interrupted_line(output_dir: Path | None, resume_argv: list[str]) -> str:
    """The one line printed on Ctrl-C: the step of the checkpoint kept (read from ``checkpoint.pt``, which is
    replaced atomically, so it is the truth) and the command that resumes from it."""
    if output_dir is None or not (output_dir / "args.json").is_file():
        return "interrupted before the run started: nothing was written"
    if (output_dir / "done").exists():
        return f"interrupted after the run finished: its results are in {output_dir / 'results.jsonl'}"
    command = shlex.join([sys.executable, "-m", "dg_meta.train", *resume_argv])
    ckpt = output_dir / "checkpoint.pt"
    if not ckpt.is_file():
        return f"interrupted before the first checkpoint: nothing to resume in {output_dir}; start over with: {command}"
    step = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["step"]
    return f"interrupted: the checkpoint of step {step} in {output_dir} is kept; resume with: {command}"


def main(argv: list[str] | None = None) -> int:
    """The CLI; exit codes as the module docstring says, every refusal, divergence or interrupt in one line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    output_dir, resume_argv = None, argv
    try:
        args = parse_args(argv)
        set_threads(args.threads)
        run = resolve_run(args)
        output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(run)
        resume_argv = argv if args.output_dir else [*argv, "--output-dir", str(output_dir)]
        final = train(run, args.data_dir, output_dir, args.device, progress=not args.no_progress,
                      compile=args.compile, log_every=args.log_every)
    except UsageError as exc:
        if distributed.prints():  # on several processes one of them speaks for all
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        _close_progress_bars()
        if distributed.prints():
            print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _close_progress_bars()
        if distributed.prints():
            print(interrupted_line(output_dir, resume_argv), file=sys.stderr)
        return 130
    if distributed.prints():
        env_names = registry.get_dataset(run["dataset"]).ENVIRONMENTS
        print(summary_line(run, final, env_names))
        print(f"results: {output_dir / 'results.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
