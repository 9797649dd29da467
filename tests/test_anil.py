"""ANIL: only the head adapts in the inner loop; the meta-gradient against a hand-written functional loop."""

from __future__ import annotations

import copy

import pytest
import torch
from fewshot_gradient_reference import meta_loss
from test_maml import episode, make

SMALL = (1, 16, 16)


def episodes(n: int = 2) -> list:
    g = torch.Generator().manual_seed(11)
    return [episode(g, dtype=torch.float64, shape=SMALL) for _ in range(n)]


def test_defaults_are_mamls():
    assert make("ANIL").hparams == make("MAML").hparams


def test_inner_loop_changes_only_the_head():
    algorithm = make("ANIL", shape=SMALL, inner_lr=0.1).double()
    e = episodes(1)[0]
    fast = algorithm.adapted_params(algorithm.network, e.support_x, e.support_y)
    theta = dict(algorithm.network.named_parameters())
    changed = {k for k in fast if not torch.equal(fast[k], theta[k])}
    assert changed == {"1.weight", "1.bias"}


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("engine", ["loop", "threads", "batched"])
def test_meta_gradient_is_the_hand_written_head_only_loop(first_order, engine):
    algorithm = make("ANIL", shape=SMALL, inner_lr=0.1, inner_steps=2, first_order=first_order,
                     engine=engine).double()
    net = copy.deepcopy(algorithm.network)
    params = {k: p.detach().requires_grad_() for k, p in net.named_parameters()}
    batch = episodes()
    loss = meta_loss(net, params, {"1.weight": 0.1, "1.bias": 0.1}, batch, 2, first_order)
    expected = torch.autograd.grad(loss, list(params.values()))
    reported = algorithm.update(batch)["loss"]
    assert abs(float(reported) - float(loss.detach())) < 1e-12
    for (name, p), g in zip(algorithm.network.named_parameters(), expected):
        assert torch.allclose(p.grad, g, rtol=0, atol=1e-10), name
