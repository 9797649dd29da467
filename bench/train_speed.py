"""Training speed of ERM on RotatedMNIST: our in-memory samplers versus DomainBed-style DataLoaders.

Both paths train the same model (``dg_meta.algorithms.ERM``: DomainBed's MNIST ConvNet, Adam, lr 1e-3) on
batches of ``--batch-size`` examples from each of the 5 training domains (held-out domain 0, DomainBed's
80/20 in/out split), in one process, from the same initialisation:

- ``memory``: the training loop's own path, its ``DomainBatchSampler`` over the domains' tensors, which live
  on ``--device`` (indices drawn on the CPU, examples gathered on the device), and the model in the layout the
  loop gives it (``Algorithm.use_fast_layout``: channels_last for DG image models);
- ``dataloader``: what DomainBed does, one ``torch.utils.data.DataLoader`` per domain over a
  ``TensorDataset`` of CPU tensors, sampling with replacement in an endless batch sampler
  (DomainBed's ``InfiniteDataLoader``) with ``--workers`` worker processes each (DomainBed: 8), the
  minibatches copied to the device every step, and PyTorch's default (contiguous) layout.

``--variants`` adds variants of the ``memory`` path, each alone: ``fused`` (fused Adam, CUDA only),
``contiguous`` (our sampler with the default layout), ``compile`` (``torch.compile`` of the network, compile time
excluded and reported) and ``sync`` (a host-device synchronisation after every batch draw, what a blocking
index copy costs). Each variant starts from the same weights and draws the same batches as ``memory``, so
``max_param_diff`` (largest absolute parameter difference after all steps) shows whether it changes results.
The paths are timed interleaved (``--block`` steps each in turn) so that a shared machine's changing load
falls on all of them alike. Prints one JSON object (and writes it to ``--output``). Example:
``python bench/train_speed.py --data-dir ../shared/data --steps 20 --device cpu``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, Subset, TensorDataset

from dg_meta import registry
from dg_meta.algorithm import Algorithm
from dg_meta.atomic import atomic_write_text
from dg_meta.dataset import MultiDomainDataset, TensorDomain
from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, name_seed, resolve
from dg_meta.samplers import training_minibatch_sampler
from dg_meta.splits import DomainSplits

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("fused", "contiguous", "compile", "sync")
Batch = list[tuple[Tensor, Tensor]]


class _InfiniteSampler(Sampler):
    """DomainBed's endless wrapper around a batch sampler."""

    def __init__(self, sampler: BatchSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield from self.sampler


def infinite_loader(dataset: torch.utils.data.Dataset, batch_size: int, workers: int) -> Iterator:
    """DomainBed's ``InfiniteDataLoader``: uniform sampling with replacement, ``workers`` processes."""
    batches = BatchSampler(RandomSampler(dataset, replacement=True), batch_size, drop_last=True)
    return iter(DataLoader(dataset, num_workers=workers, batch_sampler=_InfiniteSampler(batches)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="root of MNIST/raw")
    p.add_argument("--dataset", default="RotatedMNIST", help="a tensor-backed dataset (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20, help="timed steps per path (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    p.add_argument("--block", type=int, default=1,
                   help="consecutive steps of one path between switches (default: %(default)s; more on GPUs)")
    p.add_argument("--batch-size", type=int, default=64, help="examples per domain (default: %(default)s)")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers per domain (DomainBed: 8)")
    p.add_argument("--variants", nargs="*", default=[], choices=VARIANTS, help="speed-up variants to time")
    p.add_argument("--output", default=None, help="also write the JSON here")
    return p


class Bench:
    """The dataset, its splits and ERM's hparams, loaded once and shared by every timed path."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        dataset_cls = registry.get_dataset(args.dataset)
        self.algorithm_cls = registry.get_algorithm("ERM")
        self.hparams = resolve(declared_hparams(dataset_cls, self.algorithm_cls), 0,
                               {"batch_size": args.batch_size})
        self.dataset: MultiDomainDataset = dataset_cls(args.data_dir, self.hparams)
        if not all(isinstance(d, TensorDomain) for d in self.dataset.domains):
            raise UsageError(f"--dataset {args.dataset} is not held in memory as tensors; use RotatedMNIST "
                             "or ColoredMNIST")
        self.splits: DomainSplits = self.dataset.split([0], trial_seed=0, holdout_fraction=0.2)
        self.cpu_domains = [(d.x.clone(), d.labels.clone()) for d in self.dataset.domains]
        self.dataset.to(self.device)

    def algorithm(self, fast_layout: bool = True) -> Algorithm:
        """The algorithm as the training loop builds it (``use_fast_layout``: channels_last for DG image models),
        or with PyTorch's default layout (``fast_layout=False``: DomainBed's)."""
        torch.manual_seed(name_seed(0, "init"))
        algorithm = self.algorithm_cls(self.dataset.input_shape, self.dataset.num_classes,
                                       len(self.splits.train_envs), self.hparams).to(self.device)
        return algorithm.use_fast_layout() if fast_layout else algorithm

    def memory_batches(self) -> Callable[[], Batch]:
        sampler = training_minibatch_sampler(self.dataset, self.splits, self.args.batch_size, seed=0)
        return lambda: next(sampler)

    def dataloader_batches(self) -> Callable[[], Batch]:
        loaders = []
        for env in self.splits.train_envs:
            x, y = self.cpu_domains[env]
            subset = Subset(TensorDataset(x, y), self.splits.in_idx[env].tolist())
            loaders.append(infinite_loader(subset, self.args.batch_size, self.args.workers))
        return lambda: [(x.to(self.device), y.to(self.device)) for x, y in (next(it) for it in loaders)]

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_paths(self, paths: dict[str, tuple[Algorithm, Callable[[], Batch]]]) -> dict[str, dict]:
        """Warm every path up, then time them interleaved, ``--block`` steps of one path after another,
        so that a shared machine's changing load hits every path alike: steps/s over all timed steps, the
        median ms per step over blocks, the ms per step spent waiting for the batch (host time; on a GPU
        the copies it launches may finish later), the warm-up time and the last loss."""
        results: dict[str, dict] = {}
        for name, (algorithm, next_batch) in paths.items():
            start = time.perf_counter()
            for _ in range(self.args.warmup):
                algorithm.update(next_batch())
            self.synchronize()
            results[name] = {"warmup_s": time.perf_counter() - start, "blocks": [], "data_s": 0.0}
        for _ in range(math.ceil(self.args.steps / self.args.block)):
            for name, (algorithm, next_batch) in paths.items():
                start = time.perf_counter()
                for _ in range(self.args.block):
                    fetch_start = time.perf_counter()
                    batch = next_batch()
                    results[name]["data_s"] += time.perf_counter() - fetch_start
                    loss = algorithm.update(batch)["loss"]
                self.synchronize()
                results[name]["blocks"].append((time.perf_counter() - start) / self.args.block)
                results[name]["final_loss"] = float(loss)
        for result in results.values():
            blocks = result.pop("blocks")
            steps = len(blocks) * self.args.block
            result.update(steps_per_s=1 / statistics.mean(blocks), ms_per_step_median=1000 * statistics.median(blocks),
                          data_ms_per_step=1000 * result.pop("data_s") / steps, timed_steps=steps)
        return results


def apply_variant(bench: Bench, name: str, algorithm: Algorithm,
                  next_batch: Callable[[], Batch]) -> Callable[[], Batch]:
    """Turn ``algorithm`` (an ERM) and its batch source into variant ``name``; returns the batch source."""
    if name == "fused":
        hp = bench.hparams
        algorithm.optimizer = torch.optim.Adam(algorithm.network.parameters(), lr=hp["lr"],
                                               weight_decay=hp["weight_decay"], fused=True)
    elif name == "contiguous":
        algorithm.to(memory_format=torch.contiguous_format)
    elif name == "compile":
        algorithm.network.compile()
    elif name == "sync":
        draw = next_batch

        def synced() -> Batch:
            batch = draw()
            bench.synchronize()
            return batch

        return synced
    return next_batch


def max_param_diff(a: Algorithm, b: Algorithm) -> float:
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def measure(args: argparse.Namespace) -> dict:
    bench = Bench(args)
    baseline = bench.algorithm()
    paths = {"memory": (baseline, bench.memory_batches()),
             "dataloader": (bench.algorithm(fast_layout=False), bench.dataloader_batches())}
    for name in args.variants:
        algorithm = bench.algorithm()
        paths[name] = (algorithm, apply_variant(bench, name, algorithm, bench.memory_batches()))
    results = bench.time_paths(paths)
    results["dataloader"]["workers"] = args.workers
    for name in args.variants:
        results[name]["max_param_diff"] = max_param_diff(paths[name][0], baseline)
    device = torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else platform.processor()
    return {
        "dataset": args.dataset, "algorithm": "ERM", "device": str(bench.device), "device_name": device,
        "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "steps": args.steps,
        "warmup": args.warmup, "block": args.block,
        "batch": f"{args.batch_size} x {len(bench.splits.train_envs)} domains",
        "results": results,
        "ratio_memory_vs_dataloader": results["memory"]["steps_per_s"] / results["dataloader"]["steps_per_s"],
        "speedup_vs_memory": {name: results[name]["steps_per_s"] / results["memory"]["steps_per_s"]
                              for name in args.variants},
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if min(args.steps, args.batch_size, args.block) < 1 or min(args.warmup, args.workers) < 0:
            raise UsageError("--steps, --batch-size and --block must be >= 1, --warmup and --workers >= 0")
        if "fused" in args.variants and torch.device(args.device).type != "cuda":
            raise UsageError("the fused variant needs --device cuda (fused Adam runs on CUDA tensors)")
        report = measure(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
