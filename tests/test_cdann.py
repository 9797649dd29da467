"""CDANN: DANN with a class embedding added to the discriminator's input and a class-balanced domain loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dann_reference import DANNReference
from dg_meta.algorithms.cdann import CDANN
from dg_meta.algorithms.dann import DANN

from dg_meta.hparams import declared_hparams, resolve

TINY = {"mlp_width": 6, "mlp_depth": 2, "lambda": 0.3, "grad_penalty": 0.7, "lr_g": 0.01, "lr_d": 0.02,
        "weight_decay_g": 0.001, "weight_decay_d": 0.002}


def make(**overrides) -> CDANN:
    torch.manual_seed(0)
    return CDANN((3,), 3, 3, resolve(declared_hparams(CDANN), overrides={**TINY, **overrides})).double()


def domain_batches(seed: int, labels: list[list[int]] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    labels = labels or [torch.randint(0, 3, (4,), generator=g).tolist() for _ in range(3)]
    return [(torch.randn(len(y), 3, generator=g, dtype=torch.float64), torch.tensor(y)) for y in labels]


def per_example_domain_ce(algorithm: CDANN, batch) -> torch.Tensor:
    x, y = torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])
    domains = torch.cat([torch.full((len(y_d),), d) for d, (_, y_d) in enumerate(batch)])
    with torch.no_grad():
        logits = algorithm.discriminator(algorithm.featurizer(x) + algorithm.class_embeddings.weight[y])
    return F.cross_entropy(logits, domains, reduction="none")


def test_same_hparams_as_dann_and_registered_flags():
    assert declared_hparams(CDANN) == declared_hparams(DANN)
    assert (CDANN.conditional, CDANN.class_balance) == (True, True)
    assert (DANN.conditional, DANN.class_balance) == (False, False)


def test_class_embedding_is_trained_by_the_discriminators_optimizer():
    algorithm = make()
    assert algorithm.class_embeddings.weight.shape == (3, 6)
    (disc,) = algorithm.disc_opt.param_groups
    expected = [*algorithm.discriminator.parameters(), algorithm.class_embeddings.weight]
    assert [id(p) for p in disc["params"]] == [id(p) for p in expected]
    (gen,) = algorithm.gen_opt.param_groups
    assert [id(p) for p in gen["params"]] == [id(p) for p in algorithm.network.parameters()]


def test_domain_loss_weights_each_example_by_one_over_its_class_count_times_k():
    labels = [[0, 0, 1, 1], [0, 2, 2, 2], [1, 1, 1, 0]]  # counts 4, 5, 3; K = 3
    batch = domain_batches(1, labels)
    algorithm = make(grad_penalty=0.0)
    ce = per_example_domain_ce(algorithm, batch)
    weights = torch.tensor([1 / 12, 1 / 12, 1 / 15, 1 / 15, 1 / 12, 1 / 9, 1 / 9, 1 / 9,
                            1 / 15, 1 / 15, 1 / 15, 1 / 12], dtype=torch.float64)
    losses = algorithm.update(batch)
    assert torch.allclose(losses["disc_loss"], (weights * ce).sum(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("labels, k", [([[0, 1], [1, 1], [0, 0]], 2), ([[0, 2], [2, 2], [0, 0]], 3)])
def test_k_is_the_largest_label_in_the_batch_plus_one(labels, k):
    """DomainBed's ``F.one_hot(all_y)`` is as wide as the largest label plus one, not ``num_classes``."""
    batch = domain_batches(2, labels)
    algorithm = make(grad_penalty=0.0)
    ce = per_example_domain_ce(algorithm, batch)
    y = torch.cat([y for _, y in batch])
    counts = {c: int((y == c).sum()) for c in (0, 1, 2)}
    expected = sum(ce[i] / (counts[int(y[i])] * k) for i in range(len(y)))
    assert torch.allclose(algorithm.update(batch)["disc_loss"], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("d_steps", [1, 2])
def test_updates_equal_an_independent_replay(d_steps):
    algorithm = make(d_steps_per_g_step=d_steps)
    reference = DANNReference(algorithm, conditional=True)
    for step in range(3):
        batch = domain_batches(step)
        expected, disc_turn = reference.step(batch)
        embedding = algorithm.class_embeddings.weight.detach().clone()
        losses = algorithm.update(batch)
        for key in expected:
            assert torch.allclose(losses[key], expected[key], rtol=0, atol=1e-12), key
        generator = [*algorithm.featurizer.parameters(), *algorithm.classifier.parameters()]
        for a, e in zip(generator, reference.gen.params, strict=True):
            assert torch.allclose(a, e, rtol=0, atol=1e-12)
        disc = [*algorithm.discriminator.parameters(), algorithm.class_embeddings.weight]
        for a, e in zip(disc, reference.disc.params, strict=True):
            assert torch.allclose(a, e, rtol=0, atol=1e-12)
        assert torch.equal(algorithm.class_embeddings.weight, embedding) != disc_turn


def test_generator_step_fills_but_does_not_move_the_class_embedding():
    algorithm = make()
    reference = DANNReference(algorithm, conditional=True)
    gen = [p.detach().clone() for p in reference.gen.params]
    disc = [p.detach().clone().requires_grad_() for p in reference.disc.params]
    batch = domain_batches(0)
    (grad_embedding,) = torch.autograd.grad(reference.losses(gen, disc, batch)["disc_loss"], disc[4:])
    before = algorithm.class_embeddings.weight.detach().clone()
    algorithm.update(batch)  # update 1 with d_steps 1: the generator's
    assert torch.equal(algorithm.class_embeddings.weight, before)
    assert torch.allclose(algorithm.class_embeddings.weight.grad, -0.3 * grad_embedding, rtol=0, atol=1e-12)
