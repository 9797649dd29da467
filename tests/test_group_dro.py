"""GroupDRO: the domain weights q after two updates by hand (exponentiated gradient, renormalised), the
gradient of sum_m q_m l_m with q held constant, Adam replayed by HandAdam, q checkpointed, the search space."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from search_space import bounds
from torch.func import functional_call

from dg_meta import registry
from dg_meta.hparams import declared_hparams, resolve

GroupDRO = registry.get_algorithm("GroupDRO")
ETA = 4.0


def tiny(eta: float = ETA) -> torch.nn.Module:
    hp = resolve(declared_hparams(GroupDRO), 0, {"groupdro_eta": eta, "lr": 0.05})
    torch.manual_seed(0)
    return GroupDRO((3,), 3, 3, {**hp, "mlp_width": 6, "mlp_depth": 2}).double()


def tiny_batch(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(3 * torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for n in (4, 5, 6)]


def domain_losses(net, params: dict, batch) -> torch.Tensor:
    """Each domain's mean cross-entropy on its own minibatch, at ``params``."""
    return torch.stack([F.cross_entropy(functional_call(net, params, (x,)), y) for x, y in batch])


def test_q_after_two_updates_by_hand_and_the_steps_are_adam_on_the_q_weighted_loss():
    alg = tiny()
    net = alg.network
    names = [n for n, _ in net.named_parameters()]
    hand = HandAdam(list(net.parameters()), lr=0.05)
    q = [1 / 3, 1 / 3, 1 / 3]
    for seed in (1, 2):
        batch = tiny_batch(seed)
        params = [p.detach().requires_grad_() for p in hand.params]
        losses = domain_losses(net, dict(zip(names, params)), batch)
        unnormalised = [q_m * float(torch.exp(ETA * l_m)) for q_m, l_m in zip(q, losses.detach())]
        q = [u / sum(unnormalised) for u in unnormalised]
        expected_loss = sum(q_m * l_m for q_m, l_m in zip(q, losses))  # q: plain numbers, no gradient
        grads = torch.autograd.grad(expected_loss, params)
        hand.step(list(grads))
        out = alg.update(batch)
        assert torch.allclose(alg.q, torch.tensor(q, dtype=torch.float64), rtol=0, atol=1e-14)
        assert float(out["loss"]) == pytest.approx(float(expected_loss.detach()), abs=1e-12)
        assert not out["loss"].requires_grad
        for p, g, h in zip(net.parameters(), grads, hand.params):
            assert torch.allclose(p.grad, g, rtol=0, atol=1e-12)
            assert torch.allclose(p, h, rtol=0, atol=1e-12)
    assert max(q) - min(q) > 0.1  # the weights moved away from uniform: the test sees their values


def test_q_weights_the_worst_domain_most_and_is_a_distribution():
    alg = tiny(eta=0.5)
    batch = tiny_batch(3)
    with torch.no_grad():
        losses = domain_losses(alg.network, dict(alg.network.named_parameters()), batch)
    alg.update(batch)
    assert int(alg.q.argmax()) == int(losses.argmax()) and int(alg.q.argmin()) == int(losses.argmin())
    assert float(alg.q.sum()) == pytest.approx(1.0, abs=1e-15)
    assert torch.allclose(alg.q, torch.softmax(0.5 * losses, 0), rtol=0, atol=1e-14)


def test_q_starts_uniform_and_is_in_the_state_dict():
    alg = tiny()
    assert torch.allclose(alg.q, torch.full((3,), 1 / 3, dtype=torch.float64), rtol=0, atol=1e-7)
    assert "q" in alg.state_dict()


def test_training_continues_identically_after_resume():
    batches = [tiny_batch(seed) for seed in range(4)]
    straight = tiny()
    for b in batches:
        straight.update(b)
    first = tiny()
    for b in batches[:2]:
        first.update(b)
    buffer = io.BytesIO()
    torch.save(first.checkpoint_state(), buffer)
    buffer.seek(0)
    resumed = tiny()
    resumed.load_checkpoint_state(torch.load(buffer, weights_only=True))
    assert torch.equal(resumed.q, first.q) and not torch.equal(resumed.q, tiny().q)
    for b in batches[2:]:
        resumed.update(b)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_defaults_and_random_search_are_domainbeds():
    """groupdro_eta 1e-2, random search 10^U(-3, -1) (hparams_registry.py); Adam at lr on the network."""
    hp = resolve(declared_hparams(GroupDRO))
    assert hp["groupdro_eta"] == 1e-2
    assert bounds(GroupDRO.HPARAMS["groupdro_eta"]) == (pytest.approx(1e-3), pytest.approx(1e-1))
    alg = GroupDRO((3,), 3, 2, {**hp, "mlp_width": 6, "mlp_depth": 1})
    assert isinstance(alg.optimizer, torch.optim.Adam) and alg.optimizer.defaults["lr"] == hp["lr"]
    assert alg.q.shape == (2,)
