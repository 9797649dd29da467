"""FewShotPretrain: the official pretrain.py's Adam setting, and two updates replayed by hand (cross-entropy of
the concatenated minibatches through backbone and linear head, Adam with L2 weight decay)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms.fewshot_pretrain import FewShotPretrain
from search_space import bounds

from dg_meta.hparams import declared_hparams, resolve
from dg_meta.networks import Conv4

SHAPE = (1, 16, 16)


def make() -> FewShotPretrain:
    torch.manual_seed(0)
    return FewShotPretrain(SHAPE, 3, 2, resolve(declared_hparams(FewShotPretrain))).double()


def domain_batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, *SHAPE, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g))
            for _ in range(2)]


def test_defaults_are_the_official_convnet_setting_and_the_search_space():
    hp = resolve(declared_hparams(FewShotPretrain))
    assert (hp["lr"], hp["weight_decay"], hp["backbone"]) == (1e-3, 5e-4, "conv4")
    assert bounds(declared_hparams(FewShotPretrain)["weight_decay"]) == pytest.approx((1e-6, 1e-2), rel=1e-12)


def test_the_backbone_is_the_meta_learners_featurizer_under_the_same_name():
    algorithm = make()
    assert isinstance(algorithm.featurizer, Conv4)
    assert (algorithm.classifier.in_features, algorithm.classifier.out_features) == (64, 3)
    assert {k.split(".")[0] for k in algorithm.state_dict()} == {"featurizer", "classifier", "network"}
    assert list(algorithm.network) == [algorithm.featurizer, algorithm.classifier]


def test_two_updates_are_adam_steps_with_weight_decay_on_the_pooled_cross_entropy():
    algorithm = make()
    net = torch.nn.Sequential(copy.deepcopy(algorithm.featurizer), copy.deepcopy(algorithm.classifier))
    names = [n for n, _ in net.named_parameters()]
    hand = HandAdam(list(net.parameters()), lr=1e-3)
    for step in range(2):
        batch = domain_batches(step)
        x, y = torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])
        params = [p.detach().requires_grad_() for p in hand.params]
        expected = F.cross_entropy(torch.func.functional_call(net, dict(zip(names, params)), (x,)), y)
        grads = torch.autograd.grad(expected, params)
        hand.step([g + 5e-4 * p.detach() for g, p in zip(grads, params)])  # Adam's L2 term: grad + wd * theta
        losses = algorithm.update(batch)
        assert torch.allclose(losses["loss"], expected.detach(), rtol=0, atol=1e-10)
        assert not losses["loss"].requires_grad
        # 1e-8: a convolution's bias before batch norm has a rounding-noise gradient, which Adam's
        # normalisation turns into steps that differ by ~1e-10 between two implementations
        ours = [*algorithm.featurizer.parameters(), *algorithm.classifier.parameters()]
        for p, q in zip(ours, hand.params, strict=True):
            assert torch.allclose(p, q, rtol=0, atol=1e-8)
    x = domain_batches(5)[0][0]
    with torch.no_grad():
        expected_logits = torch.func.functional_call(net, dict(zip(names, hand.params)), (x,))
        assert torch.allclose(algorithm.predict(x), expected_logits, rtol=0, atol=1e-8)
