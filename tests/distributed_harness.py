"""Run by ``tests/test_distributed.py`` as ``torchrun --nproc-per-node 2 tests/distributed_harness.py OUT``.

Everything in float64 (``distributed_plugin.py``'s ``RotatedDigits64``), one launch for all checks:

1. before the process group exists, each process computes the gradients (Reptile: the new weights) of the first
   update of every case in ``CASES`` on the whole batch, as a single process would (the reference);
2. rank 0, still alone, trains the single-process reference runs of ``RUN_ALGORITHMS`` into ``OUT/single``;
3. both join a gloo process group and repeat 1 through ``Trainer`` (sharded batches, averaged gradients,
   gathered features), recording the largest difference from the reference in ``OUT/rank<r>.json``;
4. they train the same runs on two processes into ``OUT/dist`` (``dg_meta.train.main``, in this group), and
5. try the refused configurations of ``REFUSED``, recording what rank 0 printed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

PLUGIN = Path(__file__).with_name("distributed_plugin.py")
#: algorithm: hparams of the gradient check and of the runs (shards of equal size on two processes)
CASES = {
    "ERM": {},
    "CORAL": {"batch_size": 8},
    "MAML": {"meta_batch_size": 4, "n_query": 2, "first_order": False},
    "ProtoNet": {"meta_batch_size": 2, "n_query": 2},
    "Reptile": {"meta_batch_size": 2, "n_query": 2, "inner_optimizer": "sgd", "inner_steps": 2},
}
RUN_ALGORITHMS = ("ERM", "CORAL", "MAML", "ProtoNet")
STEPS, CHECKPOINT_FREQ = 6, 3
#: refused on two processes: (argv, the start of the one error line)
REFUSED = [
    (["--algorithm", "IRM"], "error: IRM cannot train on 2 processes: it declares no data-parallel form"),
    (["--algorithm", "Reptile", "--hparams", '{"meta_batch_size": 2}'],
     "error: Reptile cannot train on 2 processes: its inner Adam carries its moments"),
    (["--algorithm", "ProtoNet", "--hparams", '{"meta_batch_size": 3}'],
     "error: hparam meta_batch_size (3) is not a multiple of the 2 processes"),
    (["--algorithm", "ERM", "--hparams", '{"batch_size": 5}'],
     "error: every training domain's minibatch (hparam batch_size) (5) is not a multiple of the 2 processes"),
]


def argv(algorithm: str, output_dir: Path | str) -> list[str]:
    """The arguments of a case's run (``--plugin`` excluded: it is imported once here)."""
    episodic = algorithm in ("MAML", "ProtoNet", "Reptile")  # DG on vectors: the MLP featurizer (fast)
    return ["--algorithm", algorithm, "--dataset", "RotatedDigits64" if episodic else "FlatDigits64",
            "--hparams", json.dumps(CASES[algorithm]),
            "--steps", str(STEPS), "--checkpoint-freq", str(CHECKPOINT_FREQ), "--no-progress",
            *(["--fs-episodes", "2", "--fs-query", "2"] if episodic else []), "--output-dir", str(output_dir)]


def first_update(algorithm: str) -> dict[str, torch.Tensor | None]:
    """The averaged gradients at the first optimizer step of the case (Reptile: the meta-weights after it)."""
    from dg_meta.train import Trainer, parse_args, resolve_run

    run = resolve_run(parse_args(argv(algorithm, "unused")))
    trainer = Trainer(run, "data", Path("unused"), "cpu")
    model = trainer.algorithm
    names = {id(p): n for n, p in model.named_parameters()}
    captured: dict[str, torch.Tensor | None] = {}

    def grab(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                captured[names[id(p)]] = None if p.grad is None else p.grad.detach().clone()

    for optimizer in model.data_parallel_optimizers().values():
        optimizer.register_step_pre_hook(grab)  # runs after the global averaging hook
    model.update(trainer.next_batch())
    return captured or {n: p.detach().clone() for n, p in model.network.named_parameters()}  # not Reptile's .fast


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    worst = 0.0
    for key in a:
        assert (a[key] is None) == (b[key] is None), key
        if a[key] is not None:
            worst = max(worst, float((a[key] - b[key]).abs().max()))
    return worst


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    launch = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE")}  # single-process phases: no launch
    from dg_meta import registry, train

    registry.load_plugin(str(PLUGIN))
    reference = {a: first_update(a) for a in CASES}
    if rank == 0:
        for algorithm in RUN_ALGORITHMS:
            assert train.main(argv(algorithm, out / "single" / algorithm)) == 0
    os.environ.update(launch)
    dist.init_process_group("gloo")
    report: dict = {"gradients": {}, "scale": {}, "refused": {}}
    for algorithm in CASES:
        ours = first_update(algorithm)
        report["gradients"][algorithm] = largest_difference(ours, reference[algorithm])
        report["scale"][algorithm] = max(float(t.abs().max()) for t in reference[algorithm].values() if t is not None)
    for algorithm in RUN_ALGORITHMS:
        assert train.main(argv(algorithm, out / "dist" / algorithm)) == 0
    for i, (extra, _) in enumerate(REFUSED):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = train.main([*extra, "--steps", "1", "--output-dir", str(out / f"refused{i}")])
        report["refused"][i] = {"code": code, "stderr": err.getvalue()}
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
