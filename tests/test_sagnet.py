"""SagNet: style and content randomisation reproduced with the same seed (values and gradients), two updates
replayed by hand (content, style and adversarial steps with three hand-written Adams), predict, the optimizers,
the defaults and search space, resume."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms.sagnet import randomize
from search_space import bounds
from torch import Tensor, nn

from dg_meta import registry
from dg_meta.hparams import declared_hparams, resolve

SagNet = registry.get_algorithm("SagNet")


def tiny(**overrides) -> nn.Module:
    hp = resolve(declared_hparams(SagNet), 0, {"sag_w_adv": 0.7, "lr": 0.01, **overrides})
    torch.manual_seed(0)
    return SagNet((4,), 3, 3, {**hp, "mlp_width": 6, "mlp_depth": 2}).double()


def tiny_batch(seed: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
            for _ in range(3)]


def hand_randomize(z: Tensor, what: str) -> Tensor:
    """The formula written out: draws ``a`` (n x 1, z's dtype) then the permutation, unbiased row variance."""
    a = torch.rand(len(z), 1, dtype=z.dtype)
    perm = torch.randperm(len(z))
    d = z.shape[1]
    mu = z.sum(1, keepdim=True) / d
    s2 = ((z - mu) ** 2).sum(1, keepdim=True) / (d - 1)
    u = (z - mu) / torch.sqrt(s2 + 1e-5)
    if what == "style":
        return u * torch.sqrt(a * s2 + (1 - a) * s2[perm] + 1e-5) + a * mu + (1 - a) * mu[perm]
    return u[perm].detach() * torch.sqrt(s2 + 1e-5) + mu


def test_defaults_and_search_space_are_domainbeds():
    assert resolve(declared_hparams(SagNet))["sag_w_adv"] == 0.1
    assert bounds(SagNet.HPARAMS["sag_w_adv"]) == (pytest.approx(0.01), pytest.approx(10.0))


@pytest.mark.parametrize("what", ["style", "content"])
def test_randomization_values_and_gradients_match_the_formula_with_the_same_seed(what):
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_()
    weights = torch.randn(6, 5, generator=g, dtype=torch.float64)
    torch.manual_seed(11)
    out = randomize(z, what)
    (grad,) = torch.autograd.grad((out * weights).sum(), z)
    torch.manual_seed(11)
    expected = hand_randomize(z, what)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), z)
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)
    assert torch.allclose(grad, expected_grad, rtol=0, atol=1e-12)
    assert not torch.allclose(out, z, atol=1e-3)


def test_randomization_keeps_or_mixes_the_row_statistics():
    """Content randomisation keeps each row's mean and (up to eps) variance and takes another row's standardised
    pattern; style randomisation keeps the row's pattern and mixes its mean with its partner's."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(8, 7, generator=g, dtype=torch.float64) * torch.arange(1, 9, dtype=torch.float64)[:, None]
    pattern = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True)
    torch.manual_seed(2)
    content = randomize(z, "content")
    torch.manual_seed(2)
    torch.rand(8, 1, dtype=torch.float64)
    perm = torch.randperm(8)
    assert torch.allclose(content.mean(1), z.mean(1), rtol=0, atol=1e-12)
    assert torch.allclose(content.var(1), z.var(1), rtol=1e-4, atol=0)
    content_pattern = (content - content.mean(1, keepdim=True)) / content.std(1, keepdim=True)
    assert torch.allclose(content_pattern, pattern[perm], rtol=0, atol=1e-9)
    torch.manual_seed(2)
    style = randomize(z, "style")
    torch.manual_seed(2)
    alpha = torch.rand(8, 1, dtype=torch.float64)[:, 0]
    perm = torch.randperm(8)
    style_pattern = (style - style.mean(1, keepdim=True)) / style.std(1, keepdim=True)
    assert torch.allclose(style_pattern, pattern, rtol=0, atol=1e-9)
    assert torch.allclose(style.mean(1), alpha * z.mean(1) + (1 - alpha) * z.mean(1)[perm], rtol=0, atol=1e-12)


def test_float32_draws_on_the_cpu_are_domainbeds():
    """DomainBed draws ``torch.rand(n, 1)`` (float32, CPU) then ``torch.randperm(n)``: same stream here."""
    z = torch.randn(5, 4)
    torch.manual_seed(4)
    out = randomize(z, "style")
    torch.manual_seed(4)
    alpha, perm = torch.rand(5, 1), torch.randperm(5)
    mean, var = z.mean(-1, keepdim=True), z.var(-1, keepdim=True)
    mixed_mean = alpha * mean + (1 - alpha) * mean[perm]
    mixed_var = alpha * var + (1 - alpha) * var[perm]
    assert torch.allclose(out, (z - mean) / (var + 1e-5).sqrt() * (mixed_var + 1e-5).sqrt() + mixed_mean, atol=1e-6)


class Reference:
    """SagNet's update from the formulas: parameter lists, ``torch.func.functional_call`` and HandAdam."""

    def __init__(self, alg: nn.Module, lr: float, w_adv: float):
        self.alg, self.w_adv = alg, w_adv
        self.nets = {"f": alg.featurizer, "c": alg.classifier, "s": alg.style_classifier}
        self.names = {k: [n for n, _ in m.named_parameters()] for k, m in self.nets.items()}
        self.adam = {k: HandAdam(list(m.parameters()), lr) for k, m in self.nets.items()}

    def call(self, key: str, x: Tensor, params: list[Tensor] | None = None) -> Tensor:
        params = self.adam[key].params if params is None else params
        return torch.func.functional_call(self.nets[key], dict(zip(self.names[key], params)), (x,))

    def step(self, key: str, loss: Tensor, params: list[Tensor]) -> None:
        self.adam[key].step([g.detach() for g in torch.autograd.grad(loss, params)])
        self.adam[key].params = [p.detach() for p in self.adam[key].params]

    def update(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        f = [p.requires_grad_() for p in self.adam["f"].params]
        c = [p.requires_grad_() for p in self.adam["c"].params]
        loss_c = F.cross_entropy(self.call("c", hand_randomize(self.call("f", x, f), "style"), c), y)
        grads = torch.autograd.grad(loss_c, f + c)
        self.adam["f"].step([g.detach() for g in grads[:len(f)]])
        self.adam["c"].step([g.detach() for g in grads[len(f):]])
        for key in ("f", "c"):
            self.adam[key].params = [p.detach() for p in self.adam[key].params]
        s = [p.requires_grad_() for p in self.adam["s"].params]
        with torch.no_grad():
            z = self.call("f", x)
        loss_s = F.cross_entropy(self.call("s", hand_randomize(z, "content"), s), y)
        self.step("s", loss_s, s)
        f = [p.requires_grad_() for p in self.adam["f"].params]
        probs = self.call("s", hand_randomize(self.call("f", x, f), "content")).softmax(1)
        loss_adv = self.w_adv * -(probs.log().sum(1) / probs.shape[1]).mean()
        self.step("f", loss_adv, f)
        return loss_c.detach(), loss_s.detach(), loss_adv.detach()


def test_two_updates_match_the_content_style_adversary_steps_by_hand():
    alg = tiny()
    ref = Reference(alg, lr=0.01, w_adv=0.7)
    for step in range(2):
        batch = tiny_batch(step)
        x, y = torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])
        torch.manual_seed(100 + step)
        expected = ref.update(x, y)
        torch.manual_seed(100 + step)
        losses = alg.update(batch)
        for key, value in zip(("loss_c", "loss_s", "loss_adv"), expected):
            assert torch.allclose(losses[key], value, rtol=0, atol=1e-12), key
        for key, module in ref.nets.items():
            for p, q in zip(module.parameters(), ref.adam[key].params):
                assert torch.allclose(p, q, rtol=0, atol=1e-12), key


def test_predict_is_the_content_head_on_unrandomised_features_and_draws_nothing():
    alg = tiny()
    x = tiny_batch(7)[0][0]
    state = torch.get_rng_state()
    with torch.no_grad():
        assert torch.equal(alg.predict(x), alg.classifier(alg.featurizer(x)))
    assert torch.equal(torch.get_rng_state(), state)


def test_three_adams_over_disjoint_modules_with_lr_and_weight_decay():
    alg = tiny(weight_decay=0.02)
    modules = {"optimizer_f": alg.featurizer, "optimizer_c": alg.classifier, "optimizer_s": alg.style_classifier}
    assert set(alg.optimizers()) == set(modules)
    for name, module in modules.items():
        opt = alg.optimizers()[name]
        assert isinstance(opt, torch.optim.Adam)
        group = opt.param_groups[0]
        assert (group["lr"], group["weight_decay"]) == (0.01, 0.02)
        assert [id(p) for p in group["params"]] == [id(p) for p in module.parameters()]


def test_resume_equals_uninterrupted():
    alg = tiny()
    torch.manual_seed(1)
    alg.update(tiny_batch(0))
    buffer = io.BytesIO()
    torch.save(alg.checkpoint_state(), buffer)
    torch.manual_seed(2)
    alg.update(tiny_batch(1))
    buffer.seek(0)
    resumed = tiny()
    resumed.load_checkpoint_state(torch.load(buffer, weights_only=True))
    torch.manual_seed(2)
    resumed.update(tiny_batch(1))
    for p, q in zip(alg.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
