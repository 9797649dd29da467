"""URM: bounded features matched to uniform noise by a discriminator, replayed by hand on a tiny float64 model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms.urm import URM
from search_space import bounds, drawn
from torch import nn

from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve

TINY = {"lr": 0.01, "weight_decay": 0.001, "urm_discriminator_lr": 0.02,
        "urm_adv_lambda": 0.15}
ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid}
INTERVALS = {"tanh": (-1.0, 1.0), "relu": (0.0, 1.0), "sigmoid": (0.0, 1.0)}


def make(**overrides) -> URM:
    torch.manual_seed(0)
    hparams = resolve(declared_hparams(URM), overrides={**TINY, **overrides})
    return URM((3,), 3, 3, {**hparams, "mlp_width": 6, "mlp_depth": 2}).double()  # read by featurizer_for


def domain_batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
            for _ in range(3)]


def bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-(t log sigmoid(l) + (1 - t) log(1 - sigmoid(l)))`` averaged, written with softplus."""
    return (targets * F.softplus(-logits) + (1 - targets) * F.softplus(logits)).mean()


def discriminator_forward(params: list[torch.Tensor], u: torch.Tensor) -> torch.Tensor:
    """Linear layers with LeakyReLU (slope 0.01) between them, one logit per row."""
    for i in range(0, len(params) - 2, 2):
        h = u @ params[i].t() + params[i + 1]
        u = torch.where(h > 0, h, 0.01 * h)
    return (u @ params[-2].t() + params[-1]).squeeze(1)


class HandSGD:
    """SGD with momentum 0.9 (PyTorch's form: the first step's buffer is the gradient itself)."""

    def __init__(self, params: list[torch.Tensor], lr: float):
        self.params, self.lr, self.buffers = [p.detach().clone() for p in params], lr, None

    def step(self, grads: list[torch.Tensor]) -> None:
        self.buffers = list(grads) if self.buffers is None else [0.9 * b + g for b, g in zip(self.buffers, grads)]
        self.params = [p - self.lr * b for p, b in zip(self.params, self.buffers)]


class URMReference:
    """The generator step then the discriminator step of DomainBed's ``URM.update``, on plain tensors."""

    def __init__(self, algorithm: URM):
        hp = self.hp = algorithm.hparams
        self.gen = HandAdam([*algorithm.featurizer.parameters(), *algorithm.classifier.parameters()], lr=hp["lr"])
        disc = list(algorithm.discriminator.parameters())
        lr_d = hp["urm_discriminator_lr"]
        self.disc = HandSGD(disc, lr_d) if hp["urm_discriminator_optimizer"] == "sgd" else HandAdam(disc, lr=lr_d)

    def step(self, batch, seed: int) -> dict[str, torch.Tensor]:
        hp, lam, wd = self.hp, self.hp["urm_adv_lambda"], self.hp["weight_decay"]
        x, y = torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])
        gen = [p.clone().requires_grad_() for p in self.gen.params]
        features = ACTIVATIONS[hp["urm_generator_output"]](torch.relu(x @ gen[0].t() + gen[1]) @ gen[2].t() + gen[3])
        class_loss = F.cross_entropy(features @ gen[4].t() + gen[5], y)
        adv_loss = bce(discriminator_forward(self.disc.params, features), torch.ones(len(y), dtype=torch.float64))
        loss = class_loss + lam * adv_loss
        grads = torch.autograd.grad(loss, gen)
        self.gen.step([g + wd * p for g, p in zip(grads, self.gen.params)])

        torch.manual_seed(seed)
        low, high = INTERVALS[hp["urm_generator_output"]]
        noise = low + (high - low) * torch.rand(features.shape, dtype=torch.float64)
        s = hp["urm_discriminator_label_smoothing"]
        real, fake = torch.ones(len(y), dtype=torch.float64), torch.zeros(len(y), dtype=torch.float64)
        if s:
            real = 1 - s + s * torch.rand(len(y), dtype=torch.float64)
            fake = s * torch.rand(len(y), dtype=torch.float64)
        disc = [p.clone().requires_grad_() for p in self.disc.params]
        disc_loss = bce(discriminator_forward(disc, noise), real) + \
            lam * bce(discriminator_forward(disc, features.detach()), fake)
        grads = torch.autograd.grad(disc_loss, disc)
        self.disc.step([g + wd * p for g, p in zip(grads, self.disc.params)])
        return {"loss": loss.detach(), "class_loss": class_loss.detach(), "adv_loss": adv_loss.detach(),
                "disc_loss": disc_loss.detach()}


def test_defaults_are_domainbeds():
    hp = resolve(declared_hparams(URM))
    assert {k: v for k, v in hp.items() if k.startswith("urm")} == {
        "urm": "adversarial", "urm_adv_lambda": 0.1, "urm_discriminator_label_smoothing": 0.0,
        "urm_discriminator_optimizer": "adam", "urm_discriminator_hidden_layers": 1,
        "urm_generator_output": "tanh", "urm_discriminator_lr": 1e-3}


def test_random_search_ranges_are_domainbeds():
    declared = declared_hparams(URM)
    assert bounds(declared["urm_adv_lambda"]) == (0.0, 0.2)
    assert bounds(declared["urm_discriminator_lr"]) == pytest.approx((10 ** -5.5, 10 ** -3.5), rel=1e-12)
    assert drawn(declared["urm_discriminator_label_smoothing"]) == {0.0}
    assert drawn(declared["urm_discriminator_hidden_layers"]) == {1, 2, 3}
    assert drawn(declared["urm_generator_output"]) == {"tanh", "relu"}
    assert drawn(declared["urm_discriminator_optimizer"]) == {"adam"}
    assert drawn(declared["urm"]) == {"adversarial"}


@pytest.mark.parametrize("name, value", [("urm_generator_output", "identity"), ("urm_discriminator_optimizer", "rms"),
                                         ("urm", "other"), ("urm_discriminator_label_smoothing", 1.5)])
def test_unsupported_values_are_refused(name, value):
    with pytest.raises(UsageError, match=name):
        resolve(declared_hparams(URM), overrides={name: value})


@pytest.mark.parametrize("hidden_layers", [0, 1, 3])
def test_discriminator_is_100_wide_leaky_relu_mlp_with_one_logit(hidden_layers):
    algorithm = make(urm_discriminator_hidden_layers=hidden_layers)
    linears = [m for m in algorithm.discriminator if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6, 100)] + [(100, 100)] * hidden_layers + [(100, 1)]
    u = torch.randn(5, 6, dtype=torch.float64)
    params = [p.detach() for p in algorithm.discriminator.parameters()]
    with torch.no_grad():
        assert torch.allclose(algorithm.discriminator(u).squeeze(1), discriminator_forward(params, u), atol=1e-12)


@pytest.mark.parametrize("output", ["tanh", "relu", "sigmoid"])
def test_features_are_the_activation_of_the_erm_featurizer_and_noise_is_uniform_on_its_interval(output):
    algorithm = make(urm_generator_output=output)
    x = 10 * torch.randn(50, 3, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(algorithm.featurizer(x), ACTIVATIONS[output](algorithm.featurizer.body(x)))
        assert torch.equal(algorithm.predict(x), algorithm.classifier(algorithm.featurizer(x)))
    noise = algorithm.sample_uniform(torch.empty(4000, 6, dtype=torch.float64))
    low, high = INTERVALS[output]
    assert noise.dtype == torch.float64 and noise.shape == (4000, 6)
    assert low <= noise.min() < low + 0.01 and high - 0.01 < noise.max() < high
    assert abs(float(noise.mean()) - (low + high) / 2) < 0.02


def test_optimizers_and_what_they_hold():
    algorithm = make()
    assert set(algorithm.optimizers()) == {"optimizer", "discriminator_opt"}
    (disc,) = algorithm.discriminator_opt.param_groups
    assert isinstance(algorithm.discriminator_opt, torch.optim.Adam)
    assert [id(p) for p in disc["params"]] == [id(p) for p in algorithm.discriminator.parameters()]
    assert (disc["lr"], disc["weight_decay"], disc["betas"]) == (0.02, 0.001, (0.9, 0.999))
    (gen,) = algorithm.optimizer.param_groups
    assert [id(p) for p in gen["params"]] == [id(p) for p in algorithm.network.parameters()]
    sgd = make(urm_discriminator_optimizer="sgd").discriminator_opt
    assert isinstance(sgd, torch.optim.SGD)
    assert (sgd.param_groups[0]["lr"], sgd.param_groups[0]["momentum"], sgd.param_groups[0]["weight_decay"]) == \
        (0.02, 0.9, 0.001)


@pytest.mark.parametrize("overrides", [
    {},
    {"urm_generator_output": "relu", "urm_discriminator_label_smoothing": 0.2, "urm_discriminator_hidden_layers": 2},
    {"urm_generator_output": "sigmoid", "urm_discriminator_optimizer": "sgd"}])
def test_two_updates_equal_an_independent_replay(overrides):
    algorithm = make(**overrides)
    reference = URMReference(algorithm)
    for step in range(2):
        batch = domain_batches(step)
        expected = reference.step(batch, seed=100 + step)
        torch.manual_seed(100 + step)
        losses = algorithm.update(batch)
        assert set(losses) == set(expected)
        for key in expected:
            assert torch.allclose(losses[key], expected[key], rtol=0, atol=1e-12), key
        gen = [*algorithm.featurizer.parameters(), *algorithm.classifier.parameters()]
        for a, e in zip(gen, reference.gen.params, strict=True):
            assert torch.allclose(a, e, rtol=0, atol=1e-12)
        for a, e in zip(algorithm.discriminator.parameters(), reference.disc.params, strict=True):
            assert torch.allclose(a, e, rtol=0, atol=1e-12)
