"""Kernels and MMD (dg_meta.kernels) and the MMD-AAE algorithm built on them."""

import copy
import math

import pytest
import torch
from adam_reference import HandAdam
from conftest import run_cli
from dg_meta.algorithms.mmdaae import MMDAAE
from search_space import bounds, drawn
from torch import Tensor, nn
from torch.func import functional_call

from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve
from dg_meta.kernels import (
    distributional_variance,
    mean_pairwise_mmd2,
    median_bandwidth,
    mmd2,
    rbf_kernel,
)


def test_mmd_equals_hand_computed_value_on_four_points():
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[0.0], [2.0]])
    # Kxx mean (2 + 2a)/4, Kyy mean (2 + 2b)/4, Kxy mean (1 + b + 2a)/4 with a = e^-1/2, b = e^-2
    assert float(mmd2(x, y, 1.0)) == pytest.approx((1 - math.exp(-0.5)) / 2, abs=1e-7)


def test_kernel_mixture_is_the_sum_of_its_kernels():
    x, y = torch.randn(5, 3), torch.randn(4, 3)
    assert torch.allclose(rbf_kernel(x, y, [1.0, 3.0]), rbf_kernel(x, y, 1.0) + rbf_kernel(x, y, 3.0))
    assert torch.allclose(mmd2(x, y, [1.0, 3.0]), mmd2(x, y, 1.0) + mmd2(x, y, 3.0), atol=1e-6)
    assert torch.allclose(rbf_kernel(x, y, 2.0), torch.exp(-torch.cdist(x, y).pow(2) / 8), atol=1e-6)


def test_mmd_is_near_zero_for_one_distribution_and_grows_with_mean_shift():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 4, generator=g), torch.randn(400, 4, generator=g)
    sigma = median_bandwidth(torch.cat([x, y]))
    same = float(mmd2(x, y, sigma))
    assert 0 <= same < 1e-2  # the V-statistic bias is O(1/n)
    values = [float(mmd2(x, y + shift, sigma)) for shift in (0.25, 0.5, 1.0, 2.0)]
    assert same < values[0] and all(a < b for a, b in zip(values, values[1:]))
    assert values[-1] > 50 * same


def test_median_bandwidth_is_the_median_pairwise_distance():
    x = torch.tensor([[0.0], [1.0], [3.0]])  # distances 1, 3, 2
    assert float(median_bandwidth(x)) == pytest.approx(2.0)
    assert float(median_bandwidth(torch.zeros(3, 2))) == 1.0


def test_distributional_variance_matches_mean_embedding_oracle():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    d = torch.tensor([0] * 8 + [1] * 12 + [2] * 10)
    mu = torch.stack([x[d == i].mean(0) for i in range(3)])  # linear kernel: mean embeddings are means
    oracle = mu.pow(2).sum(1).mean() - mu.mean(0).pow(2).sum()
    assert float(distributional_variance(x @ x.t(), d)) == pytest.approx(float(oracle), rel=1e-10)


def test_mean_pairwise_mmd_averages_unordered_pairs():
    a, b, c = torch.randn(6, 2), torch.randn(5, 2) + 1, torch.randn(7, 2) - 1
    expected = (mmd2(a, b, 1.0) + mmd2(a, c, 1.0) + mmd2(b, c, 1.0)) / 3
    assert torch.allclose(mean_pairwise_mmd2([a, b, c], 1.0), expected)


def tiny_mmdaae():
    hp = resolve(declared_hparams(MMDAAE))
    return MMDAAE((6,), 3, 2, {**hp, "mlp_width": 16})


def test_mmdaae_defaults_are_the_documented_ones():
    """The docstring's defaults (l0 = 1, l1 = 0.1, l2 = 0.1, bandwidths 1, 5, 10, b = 1) and D's lr 1e-3."""
    hp = resolve(declared_hparams(MMDAAE))
    assert {k: hp[k] for k in MMDAAE.HPARAMS} == {
        "recon_weight": 1.0, "mmd_weight": 0.1, "adv_weight": 0.1, "mmd_sigmas": [1.0, 5.0, 10.0],
        "prior_scale": 1.0, "d_lr": 1e-3}


def test_mmdaae_random_search_ranges():
    """l0 ~ 10^U(-1, 1), l1 ~ 10^U(-2, 3.5) (up to 3162, as the docstring says), l2 ~ 10^U(-2, 0),
    D's lr ~ 10^U(-4.5, -2.5); the bandwidths and the prior scale are drawn from short lists."""
    hp = MMDAAE.HPARAMS
    assert bounds(hp["recon_weight"]) == (0.1, 10.0)
    assert bounds(hp["mmd_weight"]) == (0.01, pytest.approx(10 ** 3.5))
    assert bounds(hp["adv_weight"]) == (0.01, 1.0)
    assert bounds(hp["d_lr"]) == (pytest.approx(10 ** -4.5), pytest.approx(10 ** -2.5))
    assert bounds(hp["mmd_sigmas"]) == ([1.0, 5.0, 10.0], [2.0, 5.0, 10.0, 20.0])
    assert drawn(hp["prior_scale"]) == {0.5, 1.0, 2.0}


@pytest.mark.parametrize("sigmas", [[2.0], [0.5, 3]])
def test_mmd_sigmas_accepts_any_non_empty_list_of_positive_numbers(sigmas):
    assert resolve(declared_hparams(MMDAAE), 0, {"mmd_sigmas": sigmas})["mmd_sigmas"] == sigmas


@pytest.mark.parametrize("sigmas", [[], [1.0, -1.0], [0.0], 2.0])
def test_mmd_sigmas_refuses_anything_else(sigmas):
    message = f"hparam 'mmd_sigmas' = {sigmas!r} is invalid: it must be a non-empty list of positive numbers"
    with pytest.raises(UsageError) as info:
        resolve(declared_hparams(MMDAAE), 0, {"mmd_sigmas": sigmas})
    assert str(info.value) == message


def test_mmdaae_networks_and_what_predict_and_embed_return():
    """Code layer on the featurizer, decoder MLP code -> 512 -> input, discriminator MLP code -> 256 -> 256 -> 1;
    ``embed`` is the code ``Q(x)`` and ``predict`` is ``C(Q(x))``."""
    torch.manual_seed(0)
    algo = tiny_mmdaae()

    def linear_shapes(net: nn.Module) -> list[tuple[int, int]]:
        return [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, nn.Linear)]

    code = algo.featurizer.n_outputs
    assert linear_shapes(algo.encoder)[-1] == (code, code)
    assert linear_shapes(algo.decoder) == [(code, 512), (512, 6)]
    assert linear_shapes(algo.discriminator) == [(code, 256), (256, 256), (256, 1)]
    x = torch.randn(4, 6)
    codes = algo.encoder(x)
    assert torch.equal(algo.embed(x), codes)
    assert torch.equal(algo.predict(x), algo.classifier(codes))
    assert algo.predict(x).shape == (4, 3)


def test_mmdaae_step_updates_discriminator_with_its_own_optimizer():
    torch.manual_seed(0)
    algo = tiny_mmdaae()
    assert set(algo.optimizers()) == {"optimizer", "d_optimizer"}
    d_params = {id(p) for p in algo.d_optimizer.param_groups[0]["params"]}
    assert d_params == {id(p) for p in algo.discriminator.parameters()}
    assert not d_params & {id(p) for p in algo.optimizer.param_groups[0]["params"]}
    before = [p.clone() for p in algo.discriminator.parameters()]
    batch = [(torch.randn(8, 6), torch.randint(0, 3, (8,))), (torch.randn(8, 6) + 1, torch.randint(0, 3, (8,)))]
    losses = algo.update(batch)
    assert set(losses) == {"loss", "cls_loss", "recon_loss", "mmd_loss", "adv_loss", "d_loss"}
    assert all(math.isfinite(float(v)) for v in losses.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, algo.discriminator.parameters()))
    codes = algo.encoder(torch.cat([x for x, _ in batch]))
    assert algo.sample_prior(codes).shape == codes.shape


def test_prior_is_laplace_with_the_configured_scale():
    torch.manual_seed(0)
    hp = resolve(declared_hparams(MMDAAE))
    algo = MMDAAE((6,), 3, 2, {**hp, "mlp_width": 16, "prior_scale": 2.0})
    z = algo.sample_prior(torch.empty(1000, 100))
    # Laplace(0, b): E|z| = b, P(|z| > b) = 1/e (a Gaussian with the same E|z| has P = 0.32)
    assert abs(float(z.mean())) < 0.05
    assert float(z.abs().mean()) == pytest.approx(2.0, abs=0.03)
    assert float((z.abs() > 2.0).double().mean()) == pytest.approx(math.exp(-1), abs=0.01)


def mixture_mmd2(a: Tensor, b: Tensor, sigmas: list[float]) -> Tensor:
    """Biased MMD^2 under sum_s exp(-|u - v|^2 / (2 s^2)), written with explicit differences."""
    def k(u, v):
        d2 = (u[:, None, :] - v[None, :, :]).pow(2).sum(-1)
        return sum(torch.exp(-d2 / (2 * s * s)) for s in sigmas)
    return k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()


class ReferenceMMDAAE:
    """One MMD-AAE step written out: the discriminator's Adam step on prior-vs-code cross-entropy, then the
    autoencoder/classifier Adam step on ``L_cls + l0 L_rec + l1 MMD + l2 (-log D(Q(x)))`` against the updated
    discriminator."""

    def __init__(self, algo: MMDAAE):
        self.hp = algo.hparams
        self.nets = {k: copy.deepcopy(getattr(algo, k)) for k in ("encoder", "decoder", "classifier", "discriminator")}
        self.names = {k: [n for n, _ in net.named_parameters()] for k, net in self.nets.items()}
        model = ("encoder", "decoder", "classifier")
        self.sizes = [len(self.names[k]) for k in model]
        self.model_adam = HandAdam([p for k in model for p in self.nets[k].parameters()], self.hp["lr"])
        self.d_adam = HandAdam(list(self.nets["discriminator"].parameters()), self.hp["d_lr"])

    def call(self, which: str, params: list[Tensor], x: Tensor) -> Tensor:
        return functional_call(self.nets[which], dict(zip(self.names[which], params)), (x,))

    def step(self, batch, z: Tensor) -> dict[str, float]:
        x = torch.cat([xb for xb, _ in batch])
        y = torch.cat([yb for _, yb in batch])
        params = [p.detach().requires_grad_(True) for p in self.model_adam.params]
        enc, dec, cls = (params[sum(self.sizes[:i]):sum(self.sizes[:i + 1])] for i in range(3))
        codes = self.call("encoder", enc, x)
        d_params = [p.detach().requires_grad_(True) for p in self.d_adam.params]
        d_real, d_fake = self.call("discriminator", d_params, z), self.call("discriminator", d_params, codes.detach())
        d_loss = -nn.functional.logsigmoid(d_real).mean() - nn.functional.logsigmoid(-d_fake).mean()
        d_new = self.d_adam.step(list(torch.autograd.grad(d_loss, d_params)))

        cls_loss = -self.call("classifier", cls, codes).log_softmax(1).gather(1, y[:, None]).mean()
        recon_loss = (self.call("decoder", dec, codes) - x.flatten(1)).pow(2).mean()
        per_domain = codes.split([len(yb) for _, yb in batch])
        pairs = [(i, j) for i in range(len(batch)) for j in range(i + 1, len(batch))]
        mmd_loss = sum(mixture_mmd2(per_domain[i], per_domain[j], self.hp["mmd_sigmas"]) for i, j in pairs) / len(pairs)
        adv_loss = -nn.functional.logsigmoid(self.call("discriminator", d_new, codes)).mean()
        loss = cls_loss + self.hp["recon_weight"] * recon_loss + self.hp["mmd_weight"] * mmd_loss + \
            self.hp["adv_weight"] * adv_loss
        self.model_adam.step(list(torch.autograd.grad(loss, params)))
        terms = {"loss": loss, "cls_loss": cls_loss, "recon_loss": recon_loss, "mmd_loss": mmd_loss,
                 "adv_loss": adv_loss, "d_loss": d_loss}
        return {k: float(v.detach()) for k, v in terms.items()}


def test_two_updates_equal_an_independent_reimplementation():
    torch.manual_seed(0)
    hp = {**resolve(declared_hparams(MMDAAE)), "mlp_width": 8, "lr": 1e-2, "d_lr": 3e-3, "recon_weight": 0.7,
          "mmd_weight": 1.3, "adv_weight": 0.4, "mmd_sigmas": [0.5, 2.0], "prior_scale": 1.5}
    algo = MMDAAE((5,), 3, 3, hp).double()
    ref = ReferenceMMDAAE(algo)
    drawn = []
    sample_prior = algo.sample_prior
    algo.sample_prior = lambda like: drawn.append(sample_prior(like)) or drawn[-1]
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        batch = [(torch.randn(n, 5, generator=g, dtype=torch.float64) + shift, torch.randint(0, 3, (n,), generator=g))
                 for n, shift in ((4, 0.0), (3, 1.0), (5, -0.5))]
        losses = algo.update(batch)
        (z,) = drawn
        drawn.clear()
        expected = ref.step(batch, z)
        assert expected["mmd_loss"] > 1e-3 and set(losses) == set(expected)
        for name, value in expected.items():
            assert float(losses[name]) == pytest.approx(value, abs=1e-10), name
    model = [*algo.encoder.named_parameters(), *algo.decoder.named_parameters(), *algo.classifier.named_parameters()]
    for (name, p), q in zip(model, ref.model_adam.params, strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-8), (name, float((p - q).abs().max()))
    for (name, p), q in zip(algo.discriminator.named_parameters(), ref.d_adam.params, strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-8), (name, float((p - q).abs().max()))


@pytest.mark.slow
def test_mmdaae_trains_through_the_cli(tmp_path):
    proc = run_cli("--algorithm", "MMDAAE", "--steps", "20", "--checkpoint-freq", "20",
                   "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "done").exists()
