"""Test plug-in of ``tests/test_distributed.py`` (``--plugin tests/distributed_plugin.py``).

- ``RotatedDigits64``: RotatedDigits in float64, with float64 networks (the default dtype is set on import), so
  that a run on two processes can be compared with a single-process run to 1e-9 instead of float32's rounding;
  ``FlatDigits64``: the same images as vectors of 256, so that DG algorithms get DomainBed's MLP featurizer
  (exact on shards, no normalisation, and fast).
- ``$DG_META_TEST_KILL=RANK:STEP``: the process of that rank kills itself (SIGKILL) before drawing the batch of
  step ``STEP + 1``, i.e. between a checkpoint and the next, as ``kill -9`` of one rank would, after writing the
  time of its death (``time.time()``) into the file ``$DG_META_TEST_KILL_STAMP`` if set.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from dg_meta.datasets.digits import RotatedDigits

import dg_meta.train as train
from dg_meta.registry import register_dataset

torch.set_default_dtype(torch.float64)


@register_dataset
class RotatedDigits64(RotatedDigits):
    """RotatedDigits with float64 inputs."""

    def __init__(self, root: str | None, hparams: dict):
        super().__init__(root, hparams)
        for domain in self.domains:
            domain.x = domain.x.double()


@register_dataset
class FlatDigits64(RotatedDigits64):
    """RotatedDigits64 with each image flattened to a vector."""

    INPUT_SHAPE = (256,)

    def __init__(self, root: str | None, hparams: dict):
        super().__init__(root, hparams)
        for domain in self.domains:
            domain.x = domain.x.flatten(1)


def _kill_at(rank: int, step: int, trainer_cls: type) -> None:
    next_batch = trainer_cls.next_batch

    def killing_next_batch(self):
        if self.step == step and dist.is_initialized() and dist.get_rank() == rank:
            if os.environ.get("DG_META_TEST_KILL_STAMP"):
                with open(os.environ["DG_META_TEST_KILL_STAMP"], "w") as stamp:
                    stamp.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        return next_batch(self)

    trainer_cls.next_batch = killing_next_batch


if os.environ.get("DG_META_TEST_KILL"):
    kill_rank, kill_step = map(int, os.environ["DG_META_TEST_KILL"].split(":"))
    # ``python -m dg_meta.train`` runs the module as __main__, a second copy of dg_meta.train: patch the one running
    main_module = sys.modules["__main__"]
    for module in {train, main_module} if hasattr(main_module, "Trainer") else {train}:
        _kill_at(kill_rank, kill_step, module.Trainer)
