"""Checks shared by the meta-learners' tests: an episode whose way differs from the head's is refused."""

from __future__ import annotations

import pytest

from dg_meta.errors import UsageError


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
