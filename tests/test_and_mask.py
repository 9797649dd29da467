"""AND-mask: the mask on hand-made gradients (threshold included), the gradient handed to Adam against a
hand computation from per-domain ``torch.func`` gradients, two Adam updates replayed, the defaults."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from search_space import bounds

from dg_meta import registry
from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve

ANDMask = registry.get_algorithm("ANDMask")
SIZES = (3, 4, 5, 4)


def tiny(**overrides) -> torch.nn.Module:
    hp = resolve(declared_hparams(ANDMask), 0, overrides)
    torch.manual_seed(0)
    return ANDMask((4,), 3, len(SIZES), {**hp, "mlp_width": 6, "mlp_depth": 2}).double()


def tiny_batch(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for n in SIZES]


# four domains, five entries: sign agreements |mean sign| = 1, 0.5, 0.5, 0, 0.75
GRADS = torch.tensor([[1.0, 2.0, -1.0, 1.0, 0.0],
                      [2.0, 1.0, -3.0, -1.0, 4.0],
                      [0.5, -1.0, 1.0, 2.0, 1.0],
                      [3.0, 1.0, -1.0, -2.0, 2.0]], dtype=torch.float64)


@pytest.mark.parametrize(("tau", "kept"), [(1.0, [1, 0, 0, 0, 0]), (0.75, [1, 0, 0, 0, 1]),
                                           (0.5, [1, 1, 1, 0, 1]), (0.0, [1, 1, 1, 1, 1])])
def test_mask_keeps_the_entries_whose_sign_agreement_reaches_tau(tau, kept):
    mask = tiny(tau=tau).mask(GRADS)
    assert mask.dtype == GRADS.dtype
    assert mask.tolist() == [float(k) for k in kept]


def hand_masked_gradients(net, names, params, batch, tau: float) -> list[torch.Tensor]:
    """Per-domain gradients by ``torch.func.grad``; agreement counted as |#positive - #negative| / E."""

    def loss(p, x, y):
        return F.cross_entropy(torch.func.functional_call(net, dict(zip(names, p)), (x,)), y)

    per_domain = [torch.func.grad(loss)(params, x, y) for x, y in batch]
    out = []
    for i in range(len(params)):
        g = torch.stack([d[i] for d in per_domain])
        agreement = ((g > 0).sum(0) - (g < 0).sum(0)).abs() / len(batch)
        mask = (agreement >= tau).double()
        out.append(mask * g.sum(0) / len(batch) * (mask.numel() / (mask.sum() + 1e-10 * mask.numel())))
    return out


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_gradient_given_to_adam_is_the_rescaled_masked_mean(tau):
    alg, batch = tiny(tau=tau), tiny_batch(1)
    net = copy.deepcopy(alg.network)
    names = [n for n, _ in net.named_parameters()]
    expected = hand_masked_gradients(net, names, [p.detach() for p in net.parameters()], batch, tau)
    captured = {}
    alg.optimizer.step = lambda: captured.update(grads=[p.grad.clone() for p in alg.network.parameters()])
    losses = alg.update(batch)
    for g, e in zip(captured["grads"], expected):
        assert torch.allclose(g, e, rtol=1e-12, atol=1e-15)
    kept = sum(int((g != 0).sum()) for g in expected)
    assert 0 < kept < sum(g.numel() for g in expected)  # the mask is neither empty nor full here
    mean_loss = sum(F.cross_entropy(net(x), y) for x, y in batch) / len(batch)
    assert torch.allclose(losses["loss"], mean_loss.detach(), rtol=1e-12, atol=0)


def test_two_updates_are_adam_steps_on_the_masked_gradients():
    alg = tiny()
    net = copy.deepcopy(alg.network)
    names = [n for n, _ in net.named_parameters()]
    hand = HandAdam(list(net.parameters()), lr=1e-3)
    for step in range(2):
        batch = tiny_batch(10 + step)
        hand.step(hand_masked_gradients(net, names, hand.params, batch, 1.0))
        alg.update(batch)
        for p, q in zip(alg.network.parameters(), hand.params):
            assert torch.allclose(p, q, rtol=0, atol=1e-12)


def test_defaults_and_random_search_range_are_domainbeds():
    declared = declared_hparams(ANDMask)
    assert resolve(declared)["tau"] == 1.0
    assert bounds(declared["tau"]) == (0.5, 1.0)
    for bad in (-0.1, 1.5):
        with pytest.raises(UsageError):
            resolve(declared, 0, {"tau": bad})
