"""Helpers shared by the meta-learners' tests: random episodes, float64 algorithms, and the check that an episode
whose way differs from the head's is refused."""

from __future__ import annotations

import pytest
import torch

from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve
from dg_meta.samplers import Episode


def assert_other_way_refused(algorithm, episode, name: str, n_way: int = 5) -> None:
    """``update`` and ``adapt`` on a ``episode`` of another way both raise the same one-line ``UsageError``."""
    way = int(episode.support_y.max()) + 1
    message = (f"{name}'s head has n_way={n_way} outputs but the episode has {way} classes: set --fs-way to "
               f"n_way or hparam n_way to {way}")
    with pytest.raises(UsageError) as info:
        algorithm.update([episode])
    assert str(info.value) == message
    with pytest.raises(UsageError) as info:
        algorithm.adapt(episode.support_x, episode.support_y)
    assert str(info.value) == message


def random_episode(seed: int, n_way: int, shot: int, query: int, shape: tuple[int, ...],
                   dtype: torch.dtype = torch.float64) -> Episode:
    """A class-major episode of standard-normal inputs drawn from ``seed`` (labels ``0..n_way-1``, domain 0)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_way)
    return Episode(torch.randn(n_way * shot, *shape, generator=g, dtype=dtype), labels.repeat_interleave(shot),
                   torch.randn(n_way * query, *shape, generator=g, dtype=dtype), labels.repeat_interleave(query),
                   labels, torch.zeros(n_way, dtype=torch.long))


def build_double(cls: type, shape: tuple[int, ...], overrides: dict, num_classes: int = 4):
    """``cls`` with its declared hparams and ``overrides``, seeded initialisation, in float64."""
    torch.manual_seed(0)
    return cls(shape, num_classes, 1, resolve(declared_hparams(cls), 0, overrides)).double()
