"""CAD: the domain bottleneck against hand-computed values and an anchor-by-anchor re-implementation, the
projection and normalisation switches, and two updates replayed with a hand-written Adam."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from cad_reference import hand_bottleneck_example, reference_bottleneck
from dg_meta.algorithms.cad import CAD
from search_space import drawn
from torch import Tensor, nn
from torch.func import functional_call

from dg_meta.hparams import declared_hparams, resolve
from dg_meta.registry import ALGORITHMS


def make(**overrides) -> CAD:
    torch.manual_seed(0)
    hparams = {**resolve(declared_hparams(CAD)), "mlp_width": 6, "mlp_depth": 3, **overrides}
    return CAD((3,), 3, 3, hparams).double()


def domain_batches(seed: int, n_domains: int = 3) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
            for _ in range(n_domains)]


def test_registered_with_domainbeds_defaults_and_search_space():
    assert ALGORITHMS["CAD"] is CAD
    hp = resolve(declared_hparams(CAD))
    assert (hp["lmbda"], hp["temperature"], hp["lr"], hp["weight_decay"]) == (0.1, 0.1, 1e-3, 0.0)
    assert (hp["is_normalized"], hp["is_project"], hp["is_flipped"]) == (False, False, True)
    declared = CAD.HPARAMS
    assert drawn(declared["lmbda"]) == {1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2}
    assert drawn(declared["temperature"]) == {0.05, 0.1}
    for name, value in (("is_normalized", False), ("is_project", False), ("is_flipped", True)):
        assert drawn(declared[name]) == {value}
    for seed in range(1, 20):
        assert resolve(declared_hparams(CAD), seed)["is_flipped"] is True


@pytest.mark.parametrize("flipped", [True, False])
def test_bottleneck_equals_hand_computed_values(flipped):
    u, y, d, tau, expected = hand_bottleneck_example()
    algorithm = make(temperature=tau, is_flipped=flipped)
    assert algorithm.bottleneck_loss(u, y, d).item() == pytest.approx(expected[(False, flipped)], rel=1e-12)


@pytest.mark.parametrize("flipped", [True, False])
@pytest.mark.parametrize("normalized", [True, False])
def test_bottleneck_matches_the_anchor_by_anchor_formula(flipped, normalized):
    algorithm = make(temperature=0.3, is_flipped=flipped, is_normalized=normalized)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3, 1, 2])  # class 3 has a single example: never an anchor
    d = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    u = F.normalize(z, dim=1) if normalized else z
    expected = reference_bottleneck(u, y, d, 0.3, flipped, conditional=False)
    assert torch.allclose(algorithm.bottleneck_loss(z, y, d), expected, rtol=1e-12, atol=1e-12)


def test_one_training_domain_leaves_no_anchor_for_the_flipped_bottleneck():
    algorithm = make()
    z = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    loss = algorithm.bottleneck_loss(z, torch.tensor([0, 0, 1, 1]), torch.zeros(4, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))  # no NaN from the empty sums
    before = [p.detach().clone() for p in algorithm.network.parameters()]
    losses = algorithm.update(domain_batches(0, n_domains=1))
    assert losses["bn_loss"].item() == 0.0 and losses["loss"].item() == losses["clf_loss"].item()
    assert all(torch.isfinite(p).all() and not torch.equal(p, q) for p, q in zip(algorithm.network.parameters(),
                                                                                  before))


def test_projection_head_is_the_authors_and_trained_with_the_network():
    plain = make()
    assert plain.project is None and not any("project" in name for name in plain.state_dict())
    assert [id(p) for p in plain.optimizer.param_groups[0]["params"]] == [id(p) for p in plain.network.parameters()]
    algorithm = make(is_project=True)
    linears = [m for m in algorithm.project.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6, 6), (6, 128)]
    assert isinstance(algorithm.project[1], nn.ReLU)
    params = [*algorithm.network.parameters(), *algorithm.project.parameters()]
    assert [id(p) for p in algorithm.optimizer.param_groups[0]["params"]] == [id(p) for p in params]
    assert algorithm.optimizer.param_groups[0]["lr"] == 1e-3
    x = torch.randn(5, 3, dtype=torch.float64)
    assert torch.equal(algorithm.predict(x), algorithm.classifier(algorithm.featurizer(x)))


def replay(algorithm: CAD, steps: int) -> None:
    """``steps`` Adam steps on ``CE + lmbda * B`` computed on copies of the featurizer, head and projection
    with the reference bottleneck, compared with ``update``'s losses and resulting parameters."""
    hp = algorithm.hparams
    modules = {"featurizer": algorithm.featurizer, "classifier": algorithm.classifier}
    if algorithm.project is not None:
        modules["project"] = algorithm.project
    modules = {key: copy.deepcopy(module) for key, module in modules.items()}
    names = [(key, name) for key, module in modules.items() for name, _ in module.named_parameters()]
    hand = HandAdam([p for module in modules.values() for p in module.parameters()], lr=hp["lr"])

    def call(params: list[Tensor], key: str, x: Tensor) -> Tensor:
        return functional_call(modules[key], {n: p for (k, n), p in zip(names, params) if k == key}, (x,))

    for step in range(steps):
        batch = domain_batches(step)
        x, y = torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])
        d = torch.arange(3).repeat_interleave(4)
        params = [p.detach().requires_grad_() for p in hand.params]
        z = call(params, "featurizer", x)
        clf = F.cross_entropy(call(params, "classifier", z), y)
        u = call(params, "project", z) if "project" in modules else z
        if hp["is_normalized"]:
            u = F.normalize(u, dim=1)
        bn = reference_bottleneck(u, y, d, hp["temperature"], hp["is_flipped"], conditional=False)
        total = clf + hp["lmbda"] * bn
        hand.step([g.detach() for g in torch.autograd.grad(total, params)])
        losses = algorithm.update(batch)
        for key, value in (("loss", total), ("clf_loss", clf), ("bn_loss", bn)):
            assert torch.allclose(losses[key], value.detach(), rtol=0, atol=1e-12), key
        trained = [p for key in modules for p in getattr(algorithm, key).parameters()]
        for p, q in zip(trained, hand.params, strict=True):
            assert torch.allclose(p, q, rtol=0, atol=1e-12)


def test_two_updates_replay_the_default_flipped_bottleneck():
    replay(make(), 2)


def test_two_updates_replay_the_projected_normalised_unflipped_bottleneck_with_another_lmbda():
    replay(make(is_project=True, is_normalized=True, is_flipped=False, lmbda=3.0, temperature=0.05), 2)
