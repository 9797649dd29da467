"""MAML-family meta-steps per second: our task engines vs ``higher`` vs TorchOpt, one process, interleaved.

Conv4 (BatchNorm with ``track_running_stats=False``), 28x28 random images (the data does not change the cost),
5-way with 15 queries per class, SGD inner steps of 0.4, an Adam meta-step. For every configuration of
(shot 1 / 5) x (meta-batch 4 / 32) x (second / first order) x (1 / 5 inner steps) the paths are

- ``loop``: ``MAML`` with ``engine="loop"`` (one task after another: the reference);
- ``threads``: ``engine="threads"`` (the loop's tasks on parallel CPU threads, ``dg_meta.task_threads``);
- ``batched``: ``engine="batched"`` (all tasks folded into one computation, ``dg_meta.batched_tasks``);
- ``higher``: ``higher.innerloop_ctx`` with an SGD inner optimizer (first order: the inner gradients detached by
  ``grad_callback``);
- ``torchopt``: TorchOpt's functional API (``torchopt.sgd`` + ``apply_updates`` over ``functional_call``), if
  ``import torchopt`` works; otherwise the report says why;
- optionally ``vmap`` (``engine="vmap"``).

Each path first computes the meta-gradient of one batch from the same weights (its largest difference to the loop's
is reported, absolute and relative to the largest entry of the whole meta-gradient; on CUDA the loop's own run-to-
run difference, from cuDNN's non-deterministic kernels and TF32 convolutions, is the noise floor: exactness is
tested in float64 on the CPU, ``tests/test_batched_tasks.py``), then the paths are timed interleaved (one step of
each in turn, ``--repeats`` rounds after one warm-up round), so a changing load falls on all alike; median / min /
max seconds per step. Peak memory of one step per path: on CUDA ``max_memory_allocated`` above what was allocated
before; on the CPU the peak RSS growth (``VmHWM`` after resetting it) of one step in a fresh process that builds the
path. ``--imaml`` adds iMAML (5-way 1-shot, meta-batch 32, its 16 proximal steps and 5 conjugate-gradient steps)
through loop / threads / batched. Prints one JSON object and writes it to ``--output``.

    python bench/maml_speed.py --device cpu --repeats 5 --imaml --output bench/results/maml_speed_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from dg_meta.algorithms.imaml import iMAML
from dg_meta.algorithms.maml import MAML

from dg_meta.hparams import declared_hparams, resolve
from dg_meta.samplers import Episode

SHAPE = (1, 28, 28)
ENGINE_PATHS = ("loop", "threads", "batched", "vmap")
Step = Callable[[list[Episode]], None]


def episodes(n_tasks: int, n_way: int, shot: int, query: int, device: torch.device) -> list[Episode]:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n_way)
    return [Episode(torch.randn(n_way * shot, *SHAPE, generator=g), labels.repeat_interleave(shot),
                    torch.randn(n_way * query, *SHAPE, generator=g), labels.repeat_interleave(query), labels,
                    torch.zeros(n_way, dtype=torch.long)).to(device) for _ in range(n_tasks)]


def build(cls: type, device: torch.device, **hparams) -> MAML | iMAML:
    torch.manual_seed(0)
    return cls(SHAPE, 5, 1, resolve(declared_hparams(cls), 0, hparams)).to(device)


def higher_step(algorithm: MAML) -> Step:
    """MAML's meta-step through ``higher.innerloop_ctx`` (SGD inner optimizer, the algorithm's Adam)."""
    import higher

    hp = algorithm.hparams
    inner_opt = torch.optim.SGD(algorithm.network.parameters(), lr=hp["inner_lr"])
    callback = (lambda grads: [g.detach() for g in grads]) if hp["first_order"] else None

    def step(batch: list[Episode]) -> None:
        algorithm.optimizer.zero_grad(set_to_none=True)
        for e in batch:
            with higher.innerloop_ctx(algorithm.network, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(hp["inner_steps"]):
                    diffopt.step(F.cross_entropy(fnet(e.support_x), e.support_y), grad_callback=callback)
                (F.cross_entropy(fnet(e.query_x), e.query_y) / len(batch)).backward()
        algorithm.optimizer.step()

    return step


def torchopt_step(algorithm: MAML) -> Step:
    """MAML's meta-step through TorchOpt's functional API: ``torchopt.sgd`` updates applied out of place."""
    import torchopt

    hp = algorithm.hparams
    inner_opt = torchopt.sgd(lr=hp["inner_lr"])
    names = [n for n, _ in algorithm.network.named_parameters()]

    def step(batch: list[Episode]) -> None:
        algorithm.optimizer.zero_grad(set_to_none=True)
        for e in batch:
            params = tuple(algorithm.network.parameters())
            state = inner_opt.init(params)
            for _ in range(hp["inner_steps"]):
                out = torch.func.functional_call(algorithm.network, dict(zip(names, params)), (e.support_x,))
                grads = torch.autograd.grad(F.cross_entropy(out, e.support_y), params,
                                            create_graph=not hp["first_order"])
                updates, state = inner_opt.update(grads, state, inplace=False)
                params = torchopt.apply_updates(params, updates, inplace=False)
            out = torch.func.functional_call(algorithm.network, dict(zip(names, params)), (e.query_x,))
            (F.cross_entropy(out, e.query_y) / len(batch)).backward()
        algorithm.optimizer.step()

    return step


def meta_gradient(step: Step, algorithm: MAML | iMAML, batch: list[Episode]) -> list[torch.Tensor]:
    """The meta-gradient one step computes, from a copy of the initial weights (the step is undone)."""
    state = copy.deepcopy(algorithm.state_dict())
    opt_state = copy.deepcopy(algorithm.optimizer.state_dict())
    step(batch)
    grads = [p.grad.detach().clone() for p in algorithm.network.parameters()]
    algorithm.load_state_dict(state)
    algorithm.optimizer.load_state_dict(opt_state)
    return grads


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _child_peak(cls_name: str, path: str, hparams: dict, shot: int, meta_batch: int, threads: int,
                queue: multiprocessing.Queue) -> None:
    """In a fresh process: build the path, take one warm-up step, then report the RSS growth of one more."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    if cls_name == "iMAML":
        step = build(iMAML, device, engine=path, **hparams).update
    else:
        algorithms, steps, _ = maml_paths([path], device, hparams)
        step = steps[path]
    batch = episodes(meta_batch, 5, shot, 15, device)
    step(batch)
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset VmHWM to the current RSS
        before = _status_kb("VmRSS")
        step(batch)
        queue.put(max(0, _status_kb("VmHWM") - before) / 1024)
    except OSError as exc:
        queue.put(f"not measured: {exc}")


def peak_memory_mb(step: Step, batch: list[Episode], device: torch.device, child_args: tuple) -> float | str:
    """Memory one step needs above what was in use before it (see the module docstring). On the CPU a fresh
    (spawned, not forked: a fork of a process with OpenMP threads can hang) process rebuilds the path from
    ``child_args`` = (class name, path, hparams, shot, meta-batch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(batch)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child_peak, args=(*child_args, torch.get_num_threads(), queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def interleaved_seconds(steps: dict[str, Step], batch: list[Episode], repeats: int,
                        device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each path, one step of each in turn, ``repeats`` rounds after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(repeats + 1):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return times


def measure(algorithms: dict[str, MAML | iMAML], steps: dict[str, Step], batch: list[Episode], repeats: int,
            device: torch.device, memory: tuple | None) -> dict[str, dict]:
    """Gradient check, interleaved timing and (``memory`` = (class name, hparams, shot)) peak memory per path."""
    reference = meta_gradient(steps["loop"], algorithms["loop"], batch)
    report: dict[str, dict] = {}
    for name in steps:
        grads = meta_gradient(steps[name], algorithms[name], batch)
        report[name] = {"max_grad_diff_vs_loop": max(float((a - b).abs().max()) for a, b in zip(grads, reference)),
                        "max_grad_rel_diff_vs_loop": max(float((a - b).abs().max()) for a, b in zip(grads, reference))
                        / max(float(b.abs().max()) for b in reference)}
    for name, seconds in interleaved_seconds(steps, batch, repeats, device).items():
        median = statistics.median(seconds)
        report[name].update(median_s=median, min_s=min(seconds), max_s=max(seconds), steps_per_s=1.0 / median)
    if memory:
        cls_name, hparams, shot = memory
        for name in steps:
            report[name]["peak_memory_mb"] = peak_memory_mb(steps[name], batch, device,
                                                            (cls_name, name, hparams, shot, len(batch)))
    for name in steps:
        for base in ("loop", "higher"):
            if base in report:
                report[name][f"speed_vs_{base}"] = report[base]["median_s"] / report[name]["median_s"]
    return report


def maml_paths(paths: list[str], device: torch.device, hparams: dict) -> tuple[dict, dict, dict[str, str]]:
    algorithms, steps, skipped = {}, {}, {}
    for name in paths:
        engine = name if name in ENGINE_PATHS else "loop"
        try:
            algorithm = build(MAML, device, engine=engine, **hparams)
            if name in ENGINE_PATHS:
                steps[name] = algorithm.update
            else:
                steps[name] = {"higher": higher_step, "torchopt": torchopt_step}[name](algorithm)
        except ImportError as exc:
            skipped[name] = f"not installed here ({exc})"
            continue
        algorithms[name] = algorithm
    return algorithms, steps, skipped


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up (default 5)")
    parser.add_argument("--paths", nargs="+", default=["loop", "threads", "batched", "higher", "torchopt"],
                        choices=[*ENGINE_PATHS, "higher", "torchopt"])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--meta-batches", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--orders", nargs="+", default=["second", "first"], choices=["second", "first"])
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--imaml", action="store_true", help="also iMAML 5w1s meta-batch 32 (loop/threads/batched)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result: dict = {
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "repeats": args.repeats,
        "setting": {"backbone": "Conv4", "input": list(SHAPE), "n_way": 5, "n_query": 15, "inner_lr": 0.4},
        "maml": [], "skipped": {},
    }
    for shot, meta_batch, order, inner_steps in itertools.product(args.shots, args.meta_batches, args.orders,
                                                                   args.inner_steps):
        config = {"k_shot": shot, "meta_batch": meta_batch, "order": order, "inner_steps": inner_steps}
        hparams = {"inner_steps": inner_steps, "first_order": order == "first", "inner_lr": 0.4}
        algorithms, steps, skipped = maml_paths(args.paths, device, hparams)
        if set(skipped) - set(result["skipped"]):
            print(json.dumps({"skipped": skipped}), file=sys.stderr, flush=True)
        result["skipped"].update(skipped)
        batch = episodes(meta_batch, 5, shot, 15, device)
        memory = None if args.no_memory else ("MAML", hparams, shot)
        result["maml"].append({**config, "paths": measure(algorithms, steps, batch, args.repeats, device, memory)})
        print(json.dumps(result["maml"][-1]), flush=True)
    if args.imaml:
        algorithms = {name: build(iMAML, device, engine=name) for name in ("loop", "threads", "batched")}
        steps = {name: a.update for name, a in algorithms.items()}
        batch = episodes(32, 5, 1, 15, device)
        result["imaml"] = {"k_shot": 1, "meta_batch": 32, "inner_steps": 16, "cg_steps": 5,
                           "paths": measure(algorithms, steps, batch, args.repeats, device,
                                            None if args.no_memory else ("iMAML", {}, 1))}
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
