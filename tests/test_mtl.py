"""MTL: DomainBed's hparams, the domain-embedding EMA, two updates replayed by hand (with the embedding and with
DomainBed's noise in its place), predict's use of the predicted batch's own mean, and checkpointed buffers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms.mtl import MTL
from search_space import drawn

from dg_meta.hparams import declared_hparams, resolve

WIDTH = 5


def make(**overrides) -> MTL:
    torch.manual_seed(0)
    hparams = {**resolve(declared_hparams(MTL)), "mlp_width": WIDTH, "mlp_depth": 2, **overrides}
    return MTL((3,), 3, 3, hparams).double()


def domain_batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for n in (4, 5, 4)]


def test_defaults_and_random_search_are_domainbeds():
    hp = resolve(declared_hparams(MTL))
    assert hp["mtl_ema"] == 0.99 and hp["mtl_noise_embedding"] is False
    assert drawn(MTL.HPARAMS["mtl_ema"]) == {0.5, 0.9, 0.99, 1.0}
    assert MTL.HPARAMS["mtl_noise_embedding"].sample is None


def test_networks_buffers_and_optimizer():
    algorithm = make()
    assert algorithm.classifier.weight.shape == (3, 2 * WIDTH)
    assert torch.equal(algorithm.embeddings, torch.zeros(3, WIDTH, dtype=torch.float64))
    assert "embeddings" in algorithm.state_dict()
    group = algorithm.optimizer.param_groups[0]
    assert isinstance(algorithm.optimizer, torch.optim.Adam) and (group["lr"], group["weight_decay"]) == (1e-3, 0.0)
    expected = [*algorithm.featurizer.parameters(), *algorithm.classifier.parameters()]
    assert [id(p) for p in group["params"]] == [id(p) for p in expected]


class Reference:
    """MTL written again: a featurizer and a head from weight lists, its own EMA table, HandAdam."""

    def __init__(self, algorithm: MTL, ema: float):
        self.feat = copy.deepcopy(algorithm.featurizer)
        self.head = copy.deepcopy(algorithm.classifier)
        self.n_feat = len(list(self.feat.parameters()))
        self.adam = HandAdam([*self.feat.parameters(), *self.head.parameters()], lr=1e-3)
        self.ema = ema
        self.table = torch.zeros(3, WIDTH, dtype=torch.float64)

    def features(self, params, x):
        names = [n for n, _ in self.feat.named_parameters()]
        return torch.func.functional_call(self.feat, dict(zip(names, params[:self.n_feat])), (x,))

    def logits(self, params, z, e):
        w, b = params[self.n_feat:]
        return torch.cat([z, e], 1) @ w.T + b

    def step(self, batch, noise_seed=None):
        params = [p.detach().requires_grad_() for p in self.adam.params]
        if noise_seed is not None:
            torch.manual_seed(noise_seed)
        loss = 0
        for d, (x, y) in enumerate(batch):
            z = self.features(params, x)
            e = self.ema * z.mean(0) + (1 - self.ema) * self.table[d]
            self.table[d] = e.detach()
            if noise_seed is not None:
                e = torch.randn(len(x), WIDTH, dtype=torch.float64)
            loss = loss + F.cross_entropy(self.logits(params, z, e.expand(len(x), -1)), y)
        self.adam.step([g.detach() for g in torch.autograd.grad(loss, params)])
        return loss.detach()


@pytest.mark.parametrize("noise, ema", [(False, 0.9), (False, 0.5), (True, 0.99)])
def test_two_updates_equal_an_independent_reimplementation(noise, ema):
    algorithm = make(mtl_noise_embedding=noise, mtl_ema=ema)
    reference = Reference(algorithm, ema)
    for step in range(2):
        batch = domain_batches(step)
        expected = reference.step(batch, noise_seed=100 + step if noise else None)
        if noise:
            torch.manual_seed(100 + step)
        losses = algorithm.update(batch)
        assert torch.allclose(losses["loss"], expected, rtol=0, atol=1e-12)
        assert torch.allclose(algorithm.embeddings, reference.table, rtol=0, atol=1e-12)
        params = [*algorithm.featurizer.parameters(), *algorithm.classifier.parameters()]
        for p, q in zip(params, reference.adam.params):
            assert torch.allclose(p, q, rtol=0, atol=1e-12)


def test_predict_embeds_the_predicted_batch_by_its_own_mean_and_leaves_the_buffers():
    algorithm = make(mtl_noise_embedding=False)
    algorithm.update(domain_batches(0))
    buffers = algorithm.embeddings.clone()
    x = domain_batches(7)[0][0]
    with torch.no_grad():
        z = algorithm.featurizer(x)
        w, b = algorithm.classifier.weight, algorithm.classifier.bias
        whole = torch.cat([z, z.mean(0).expand_as(z)], 1) @ w.T + b
        first = torch.cat([z[:2], z[:2].mean(0).expand(2, -1)], 1) @ w.T + b
        assert torch.allclose(algorithm.predict(x), whole, rtol=0, atol=1e-12)
        assert torch.allclose(algorithm.predict(x[:2]), first, rtol=0, atol=1e-12)
    assert not torch.allclose(whole[:2], first)  # the same examples, another batch: other logits
    assert torch.equal(algorithm.embeddings, buffers)


def test_predict_in_noise_mode_feeds_standard_normal_noise():
    algorithm = make(mtl_noise_embedding=True)
    x = domain_batches(7)[0][0]
    torch.manual_seed(3)
    noise = torch.randn(len(x), WIDTH, dtype=torch.float64)
    with torch.no_grad():
        z = algorithm.featurizer(x)
        expected = torch.cat([z, noise], 1) @ algorithm.classifier.weight.T + algorithm.classifier.bias
        torch.manual_seed(3)
        assert torch.allclose(algorithm.predict(x), expected, rtol=0, atol=1e-12)


def test_checkpoint_restores_the_embeddings():
    algorithm = make(mtl_noise_embedding=False)
    algorithm.update(domain_batches(0))
    state = copy.deepcopy(algorithm.checkpoint_state())
    resumed = make(mtl_noise_embedding=False)
    resumed.load_checkpoint_state(state)
    assert torch.equal(resumed.embeddings, algorithm.embeddings) and algorithm.embeddings.abs().sum() > 0
    algorithm.update(domain_batches(1))
    resumed.update(domain_batches(1))
    for p, q in zip(algorithm.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(resumed.embeddings, algorithm.embeddings)
