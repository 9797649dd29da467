"""Fish: two updates replayed by hand (Adam steps through the domains in order with its moments carried over,
then the interpolation theta + meta_lr (theta~ - theta)), buffers, the defaults and search space, resume."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from search_space import drawn
from torch import nn

from dg_meta import registry
from dg_meta.hparams import declared_hparams, resolve

Fish = registry.get_algorithm("Fish")


def tiny(**overrides) -> nn.Module:
    hp = resolve(declared_hparams(Fish), 0, {"meta_lr": 0.3, "lr": 0.01, **overrides})
    torch.manual_seed(0)
    return Fish((4,), 3, 3, {**hp, "mlp_width": 6, "mlp_depth": 2}).double()


def tiny_batch(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g))
            for _ in range(3)]


def test_defaults_and_search_space_are_domainbeds():
    hp = resolve(declared_hparams(Fish))
    assert hp["meta_lr"] == 0.5
    assert drawn(Fish.HPARAMS["meta_lr"]) == {0.05, 0.1, 0.5}


def test_two_updates_are_sequential_adam_steps_then_the_interpolation():
    alg = tiny()
    net = alg.network
    names = [n for n, _ in net.named_parameters()]
    theta = [p.detach().clone() for p in net.parameters()]
    inner = HandAdam(theta, lr=0.01)
    for step in range(2):
        batch = tiny_batch(step)
        inner.params = [t.clone() for t in theta]
        for x, y in batch:
            params = [p.requires_grad_() for p in inner.params]
            last = F.cross_entropy(torch.func.functional_call(net, dict(zip(names, params)), (x,)), y)
            inner.step([g.detach() for g in torch.autograd.grad(last, params)])
            inner.params = [p.detach() for p in inner.params]
        theta = [t + 0.3 * (t_inner - t) for t, t_inner in zip(theta, inner.params)]
        losses = alg.update(batch)
        assert torch.allclose(losses["loss"], last.detach(), rtol=0, atol=1e-12)
        for p, t in zip(alg.network.parameters(), theta):
            assert torch.allclose(p, t, rtol=0, atol=1e-12)
        assert max(float((p - t).abs().max()) for p, t in zip(inner.params, theta)) > 1e-3
    x = tiny_batch(9)[0][0]
    with torch.no_grad():
        assert torch.allclose(alg.predict(x), torch.func.functional_call(net, dict(zip(names, theta)), (x,)),
                              rtol=0, atol=1e-12)


def test_inner_adam_has_lr_and_weight_decay_and_steps_the_copy_only():
    alg = tiny(weight_decay=0.01)
    group = alg.inner_optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.01, 0.01)
    assert [id(p) for p in group["params"]] == [id(p) for p in alg.inner_network.parameters()]
    assert not {id(p) for p in alg.network.parameters()} & {id(p) for p in alg.inner_network.parameters()}
    assert alg.optimizers() == {"inner_optimizer": alg.inner_optimizer}


def test_floating_buffers_are_interpolated_and_integer_buffers_kept():
    """A featurizer with live batch norm: its running statistics move like the weights (DomainBed's
    state-dict arithmetic); ``num_batches_tracked`` is not interpolated."""
    alg = tiny()
    norm = nn.BatchNorm1d(6).double()
    alg.network[0].net.insert(1, norm)
    alg.inner_network = copy.deepcopy(alg.network)
    alg.inner_optimizer = torch.optim.Adam(alg.inner_network.parameters(), lr=0.01)
    mean_before = norm.running_mean.clone()
    alg.update(tiny_batch(0))
    inner_norm = alg.inner_network[0].net[1]
    expected = mean_before + 0.3 * (inner_norm.running_mean - mean_before)
    assert torch.allclose(norm.running_mean, expected, rtol=0, atol=1e-12)
    assert float((norm.running_mean - mean_before).abs().max()) > 1e-3
    assert int(norm.num_batches_tracked) == 0 and int(inner_norm.num_batches_tracked) == 3


def test_resume_equals_uninterrupted():
    alg = tiny()
    alg.update(tiny_batch(0))
    buffer = io.BytesIO()
    torch.save(alg.checkpoint_state(), buffer)
    alg.update(tiny_batch(1))
    buffer.seek(0)
    resumed = tiny()
    resumed.load_checkpoint_state(torch.load(buffer, weights_only=True))
    resumed.update(tiny_batch(1))
    for p, q in zip(alg.network.parameters(), resumed.network.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("meta_lr", [0.05, 1.0])
def test_the_outer_step_is_meta_lr_times_the_inner_move(meta_lr):
    alg = tiny(meta_lr=meta_lr)
    theta = [p.detach().clone() for p in alg.network.parameters()]
    alg.update(tiny_batch(0))
    for p, t, q in zip(alg.network.parameters(), theta, alg.inner_network.parameters()):
        assert torch.allclose(p, t + meta_lr * (q - t), rtol=0, atol=1e-12)
