"""DANN: DomainBed's alternating discriminator / generator Adam steps, replayed by hand on a tiny float64 model."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from dann_reference import DANNReference, closed_form_penalty, mlp2
from dg_meta.algorithms.dann import DANN
from search_space import bounds, drawn

from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve

TINY = {"mlp_width": 6, "mlp_depth": 2, "lambda": 0.3, "grad_penalty": 0.7, "lr_g": 0.01, "lr_d": 0.02,
        "weight_decay_g": 0.001, "weight_decay_d": 0.002}


def make(**overrides) -> DANN:
    torch.manual_seed(0)
    return DANN((3,), 3, 3, resolve(declared_hparams(DANN), overrides={**TINY, **overrides})).double()


def domain_batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
            for _ in range(3)]


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def assert_close(actual, expected) -> None:
    for a, e in zip(actual, expected, strict=True):
        assert torch.allclose(a, e, rtol=0, atol=1e-12)


def test_defaults_are_domainbeds():
    hp = resolve(declared_hparams(DANN))
    assert {k: hp[k] for k in ("lambda", "d_steps_per_g_step", "grad_penalty", "beta1", "lr_g", "lr_d",
                               "weight_decay_g", "weight_decay_d", "mlp_width", "mlp_depth", "mlp_dropout")} == {
        "lambda": 1.0, "d_steps_per_g_step": 1, "grad_penalty": 0.0, "beta1": 0.5, "lr_g": 1e-3, "lr_d": 1e-3,
        "weight_decay_g": 0.0, "weight_decay_d": 0.0, "mlp_width": 256, "mlp_depth": 3, "mlp_dropout": 0.0}


def test_random_search_ranges_are_domainbeds():
    declared = declared_hparams(DANN)
    expected_bounds = {"lambda": (1e-2, 1e2), "grad_penalty": (1e-2, 10.0), "weight_decay_d": (1e-6, 1e-2),
                       "lr_g": (10 ** -4.5, 10 ** -2.5), "lr_d": (10 ** -4.5, 10 ** -2.5), "mlp_width": (64, 1024)}
    for name, (low, high) in expected_bounds.items():
        assert bounds(declared[name]) == pytest.approx((low, high), rel=1e-12), name
    assert drawn(declared["d_steps_per_g_step"], 1000) == {1, 2, 3, 4, 5, 6, 7}  # int(2 ** U(0, 3))
    assert drawn(declared["beta1"]) == {0.0, 0.5}
    assert drawn(declared["weight_decay_g"]) == {0.0}
    assert drawn(declared["mlp_depth"]) == {3, 4, 5}
    assert drawn(declared["mlp_dropout"]) == {0.0, 0.1, 0.5}


@pytest.mark.parametrize("name, value", [("beta1", 1.0), ("beta1", -0.5), ("lambda", -0.1), ("grad_penalty", -1.0),
                                         ("d_steps_per_g_step", 0), ("lr_g", 0.0), ("lr_d", 0.0),
                                         ("weight_decay_g", -1e-3), ("weight_decay_d", -1e-3)])
def test_invalid_values_are_refused(name, value):
    with pytest.raises(UsageError, match=name):
        resolve(declared_hparams(DANN), overrides={name: value})


def test_edge_values_are_accepted():
    hp = resolve(declared_hparams(DANN), overrides={"beta1": 0.0, "lambda": 0.0, "grad_penalty": 0.0})
    assert (hp["beta1"], hp["lambda"], hp["grad_penalty"]) == (0.0, 0.0, 0.0)


def test_optimizers_and_what_they_hold():
    algorithm = make(beta1=0.0)
    assert set(algorithm.optimizers()) == {"disc_opt", "gen_opt"}
    (disc,), (gen,) = algorithm.disc_opt.param_groups, algorithm.gen_opt.param_groups
    assert [id(p) for p in disc["params"]] == [id(p) for p in algorithm.discriminator.parameters()]
    assert [id(p) for p in gen["params"]] == [id(p) for p in algorithm.network.parameters()]
    assert (disc["lr"], disc["weight_decay"], disc["betas"]) == (0.02, 0.002, (0.0, 0.9))
    assert (gen["lr"], gen["weight_decay"], gen["betas"]) == (0.01, 0.001, (0.0, 0.9))
    assert algorithm.discriminator(torch.zeros(1, 6, dtype=torch.float64)).shape == (1, 3)  # one logit per domain
    assert not hasattr(algorithm, "class_embeddings")


@pytest.mark.parametrize("d_steps, expected", [(1, "GDGD"), (2, "DGDD")])
def test_alternation_over_four_updates(d_steps, expected):
    algorithm = make(d_steps_per_g_step=d_steps)
    turns = ""
    for step in range(4):
        featurizer, disc = snapshot(algorithm.featurizer), snapshot(algorithm.discriminator)
        algorithm.update(domain_batches(step))
        moved_f = any(not torch.equal(a, b) for a, b in zip(featurizer, algorithm.featurizer.parameters()))
        moved_d = any(not torch.equal(a, b) for a, b in zip(disc, algorithm.discriminator.parameters()))
        assert moved_f != moved_d
        turns += "D" if moved_d else "G"
    assert turns == expected
    assert algorithm.update_count == 4


@pytest.mark.parametrize("d_steps", [1, 2])
def test_updates_equal_an_independent_replay(d_steps):
    algorithm = make(d_steps_per_g_step=d_steps)
    reference = DANNReference(algorithm, conditional=False)
    for step in range(3):
        batch = domain_batches(step)
        expected, _ = reference.step(batch)
        losses = algorithm.update(batch)
        assert set(losses) == set(expected)
        for key in expected:
            assert torch.allclose(losses[key], expected[key], rtol=0, atol=1e-12), key
        assert_close([*algorithm.featurizer.parameters(), *algorithm.classifier.parameters()], reference.gen.params)
        assert_close(algorithm.discriminator.parameters(), reference.disc.params)


def test_generator_gradient_is_class_loss_minus_lambda_times_the_discriminators_loss():
    algorithm = make(d_steps_per_g_step=2)  # update 1 trains the discriminator, update 2 the generator
    batch = domain_batches(0)

    def reference_gradients() -> tuple[list, list, list]:
        gen = [p.detach().clone().requires_grad_() for p in algorithm.network.parameters()]
        disc = [p.detach().clone().requires_grad_() for p in algorithm.discriminator.parameters()]
        losses = DANNReference(algorithm, conditional=False).losses(gen, disc, batch)
        return (torch.autograd.grad(losses["class_loss"], gen[:4], retain_graph=True),
                torch.autograd.grad(losses["disc_loss"], gen[:4], retain_graph=True),
                torch.autograd.grad(losses["disc_loss"], disc))

    _, _, grad_disc_d = reference_gradients()
    featurizer = snapshot(algorithm.featurizer)
    algorithm.update(batch)
    assert_close(algorithm.featurizer.parameters(), featurizer)
    assert_close([p.grad for p in algorithm.discriminator.parameters()], grad_disc_d)
    grad_class, grad_disc_f, grad_disc_d = reference_gradients()
    discriminator = snapshot(algorithm.discriminator)
    algorithm.update(batch)
    assert_close(algorithm.discriminator.parameters(), discriminator)
    assert_close([p.grad for p in algorithm.featurizer.parameters()],
                 [gc - 0.3 * gd for gc, gd in zip(grad_class, grad_disc_f)])
    # DomainBed resets the discriminator's gradients before the generator's backward, which then fills them
    assert_close([p.grad for p in algorithm.discriminator.parameters()], [-0.3 * gd for gd in grad_disc_d])


def test_gradient_penalty_is_the_mean_squared_input_gradient_of_the_summed_domain_loss():
    algorithm = make(grad_penalty=0.0)
    batch = domain_batches(3)
    x, domains = torch.cat([x for x, _ in batch]), torch.arange(3).repeat_interleave(4)
    with torch.no_grad():
        u = algorithm.featurizer(x)
        disc = [p.detach() for p in algorithm.discriminator.parameters()]
        logits, hidden = mlp2(disc, u)
        expected = closed_form_penalty(logits, hidden, domains, disc)
        domain_loss = F.cross_entropy(logits, domains)
    assert expected > 1e-3
    losses = algorithm.update(batch)
    assert torch.allclose(losses["grad_penalty"], expected, rtol=0, atol=1e-12)
    assert torch.allclose(losses["disc_loss"], domain_loss, rtol=0, atol=1e-12)  # grad_penalty 0: not added


def test_update_count_is_in_the_state_dict_and_resumes_the_alternation():
    algorithm = make(d_steps_per_g_step=2)
    for step in range(2):
        algorithm.update(domain_batches(step))
    buffer = io.BytesIO()
    torch.save(algorithm.checkpoint_state(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert int(state["model"]["_extra_state"]) == 2
    assert set(state["optimizers"]) == {"disc_opt", "gen_opt"}
    resumed = make(d_steps_per_g_step=2, lr_g=0.5)  # other weights: the checkpoint must replace them
    resumed.load_checkpoint_state(state)
    assert resumed.update_count == 2
    for step in range(2, 4):
        expected = algorithm.update(domain_batches(step))
        losses = resumed.update(domain_batches(step))
        assert torch.equal(losses["disc_loss"], expected["disc_loss"])
        for a, b in zip(algorithm.state_dict().values(), resumed.state_dict().values()):
            assert torch.equal(a, b)


def test_predict_is_the_classifier_on_the_features():
    algorithm = make()
    x = domain_batches(4)[0][0]
    with torch.no_grad():
        assert torch.equal(algorithm.predict(x), algorithm.classifier(algorithm.featurizer(x)))
