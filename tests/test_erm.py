"""ERM: Adam on the cross-entropy of the concatenated domain minibatches, replayed by hand over two steps."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms.erm import ERM

from dg_meta.hparams import declared_hparams, resolve


def make() -> ERM:
    torch.manual_seed(0)
    return ERM((3,), 2, 2, resolve(declared_hparams(ERM))).double()


def domain_batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (4,), generator=g))
            for _ in range(2)]


def test_optimizer_is_adam_with_the_documented_defaults():
    algorithm = make()
    assert isinstance(algorithm.optimizer, torch.optim.Adam)
    group = algorithm.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (1e-3, 0.0)
    assert [id(p) for p in group["params"]] == [id(p) for p in algorithm.network.parameters()]


def test_two_updates_are_adam_steps_on_the_pooled_cross_entropy():
    algorithm = make()
    net = copy.deepcopy(algorithm.network)
    names = [n for n, _ in net.named_parameters()]
    hand = HandAdam(list(net.parameters()), lr=1e-3)
    for step in range(2):
        batch = domain_batches(step)
        x, y = torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])
        params = [p.detach().requires_grad_() for p in hand.params]
        expected = F.cross_entropy(torch.func.functional_call(net, dict(zip(names, params)), (x,)), y)
        hand.step([g.detach() for g in torch.autograd.grad(expected, params)])
        losses = algorithm.update(batch)
        assert torch.allclose(losses["loss"], expected.detach(), rtol=0, atol=1e-12)
        for p, q in zip(algorithm.network.parameters(), hand.params):
            assert torch.allclose(p, q, rtol=0, atol=1e-12)
    x = domain_batches(5)[0][0]
    with torch.no_grad():
        expected_logits = torch.func.functional_call(net, dict(zip(names, hand.params)), (x,))
        assert torch.allclose(algorithm.predict(x), expected_logits, rtol=0, atol=1e-12)
