"""CondCAD: the class-conditional bottleneck against hand-computed values and an anchor-by-anchor
re-implementation, and two updates replayed with a hand-written Adam."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from cad_reference import hand_bottleneck_example, reference_bottleneck
from dg_meta.algorithms.cad import CAD
from dg_meta.algorithms.cond_cad import CondCAD
from torch import Tensor
from torch.func import functional_call

from dg_meta.hparams import declared_hparams, resolve
from dg_meta.registry import ALGORITHMS


def make(**overrides) -> CondCAD:
    torch.manual_seed(0)
    hparams = {**resolve(declared_hparams(CondCAD)), "mlp_width": 6, "mlp_depth": 3, **overrides}
    return CondCAD((3,), 3, 3, hparams).double()


def domain_batches(seed: int, n_domains: int = 3) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
            for _ in range(n_domains)]


def test_registered_with_cads_hparams():
    assert ALGORITHMS["CondCAD"] is CondCAD and issubclass(CondCAD, CAD)
    assert declared_hparams(CondCAD) == declared_hparams(CAD)
    hp = resolve(declared_hparams(CondCAD))
    assert (hp["lmbda"], hp["temperature"], hp["is_flipped"], hp["is_project"], hp["is_normalized"]) == (
        0.1, 0.1, True, False, False)


@pytest.mark.parametrize("flipped", [True, False])
def test_bottleneck_equals_hand_computed_values(flipped):
    u, y, d, tau, expected = hand_bottleneck_example()
    algorithm = make(temperature=tau, is_flipped=flipped)
    assert algorithm.bottleneck_loss(u, y, d).item() == pytest.approx(expected[(True, flipped)], rel=1e-12)


@pytest.mark.parametrize("flipped", [True, False])
@pytest.mark.parametrize("normalized", [True, False])
def test_bottleneck_matches_the_anchor_by_anchor_formula(flipped, normalized):
    algorithm = make(temperature=0.3, is_flipped=flipped, is_normalized=normalized)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(10, 4, generator=g, dtype=torch.float64)
    # class 3: one example; class 2: both in domain 1 (no partner from another domain); class 1: one per domain
    y = torch.tensor([0, 1, 0, 2, 1, 2, 0, 3, 1, 0])
    d = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    u = F.normalize(z, dim=1) if normalized else z
    expected = reference_bottleneck(u, y, d, 0.3, flipped, conditional=True)
    assert torch.allclose(algorithm.bottleneck_loss(z, y, d), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("flipped", [True, False])
def test_no_anchor_with_a_partner_gives_zero_and_finite_gradients(flipped):
    """Flipped: every class sits in one domain; not flipped: every class has one example per domain."""
    algorithm = make(is_flipped=flipped)
    z = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1]) if flipped else torch.tensor([0, 1, 0, 1])
    loss = algorithm.bottleneck_loss(z, y, torch.tensor([0, 0, 1, 1]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("overrides", [{}, {"is_flipped": False, "is_normalized": True, "lmbda": 3.0}])
def test_two_updates_replay_the_conditional_bottleneck(overrides):
    algorithm = make(**overrides)
    hp = algorithm.hparams
    featurizer, head = copy.deepcopy(algorithm.featurizer), copy.deepcopy(algorithm.classifier)
    n_featurizer = len(list(featurizer.parameters()))
    names = [n for n, _ in featurizer.named_parameters()] + [n for n, _ in head.named_parameters()]
    hand = HandAdam([*featurizer.parameters(), *head.parameters()], lr=hp["lr"])
    for step in range(2):
        batch = domain_batches(step)
        x, y = torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])
        d = torch.arange(3).repeat_interleave(4)
        params = [p.detach().requires_grad_() for p in hand.params]
        z = functional_call(featurizer, dict(zip(names[:n_featurizer], params[:n_featurizer])), (x,))
        clf = F.cross_entropy(functional_call(head, dict(zip(names[n_featurizer:], params[n_featurizer:])), (z,)), y)
        u = F.normalize(z, dim=1) if hp["is_normalized"] else z
        bn = reference_bottleneck(u, y, d, hp["temperature"], hp["is_flipped"], conditional=True)
        total = clf + hp["lmbda"] * bn
        hand.step([g.detach() for g in torch.autograd.grad(total, params)])
        losses = algorithm.update(batch)
        for key, value in (("loss", total), ("clf_loss", clf), ("bn_loss", bn)):
            assert torch.allclose(losses[key], value.detach(), rtol=0, atol=1e-12), key
        for p, q in zip(algorithm.network.parameters(), hand.params, strict=True):
            assert torch.allclose(p, q, rtol=0, atol=1e-12)
