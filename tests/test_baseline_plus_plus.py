"""Baseline++ (Chen et al. 2019): distLinear heads (scale 2 up to 200 classes, 10 above) in training and at test
time; two training updates replayed with a hand-written Adam on hand-written cosine logits, and the test-time
cosine head's 100 epochs of SGD on its weight-norm parameters replayed by hand."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms import baseline as baseline_module
from dg_meta.algorithms.baseline_plus_plus import BaselinePlusPlus
from support_head_reference import replay_finetune
from torch import nn

from dg_meta.hparams import declared_hparams, resolve
from dg_meta.support_heads import CosineHead

SHAPE = (1, 16, 16)


def make(num_classes: int = 3) -> BaselinePlusPlus:
    torch.manual_seed(0)
    return BaselinePlusPlus(SHAPE, num_classes, 2, resolve(declared_hparams(BaselinePlusPlus))).double()


def hand_cosine(z: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * z / (||z|| + 1e-5) . (g_k v_k / ||v_k||)``, written out."""
    z_unit = z / (z.pow(2).sum(1, keepdim=True).sqrt() + 1e-5)
    w = g * v / v.pow(2).sum(1, keepdim=True).sqrt()
    return scale * z_unit @ w.t()


def test_training_head_is_distlinear_over_all_classes_with_the_official_scale():
    algorithm = make()
    hp = resolve(declared_hparams(BaselinePlusPlus))
    assert (hp["lr"], hp["weight_decay"]) == (1e-3, 0.0)
    assert type(algorithm.classifier) is CosineHead and algorithm.classifier.scale == 2.0
    assert algorithm.classifier.weight_v.shape == (3, 64) and algorithm.classifier.weight_g.shape == (3, 1)
    assert list(algorithm.network) == [algorithm.featurizer, algorithm.classifier]
    (group,) = algorithm.optimizer.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in algorithm.network.parameters()]
    assert make(num_classes=200).classifier.scale == 2.0 and make(num_classes=201).classifier.scale == 10.0


def test_two_updates_are_adam_steps_on_the_cosine_cross_entropy():
    algorithm = make()
    featurizer = copy.deepcopy(algorithm.featurizer)
    names = [n for n, _ in featurizer.named_parameters()]
    hand = HandAdam([*featurizer.parameters(), algorithm.classifier.weight_v, algorithm.classifier.weight_g], lr=1e-3)
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        batch = [(torch.randn(3, *SHAPE, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g))
                 for _ in range(2)]
        x, y = torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])
        params = [p.detach().requires_grad_() for p in hand.params]
        z = torch.func.functional_call(featurizer, dict(zip(names, params[:-2])), (x,))
        expected = F.cross_entropy(hand_cosine(z, params[-2], params[-1], 2.0), y)
        hand.step(torch.autograd.grad(expected, params))
        losses = algorithm.update(batch)
        assert torch.allclose(losses["loss"], expected.detach(), rtol=0, atol=1e-10)
        for p, q in zip(algorithm.network.parameters(), hand.params, strict=True):
            assert torch.allclose(p, q, rtol=0, atol=1e-8)


def test_adapt_fits_a_new_cosine_head_on_the_support_features_by_the_official_sgd_loop(monkeypatch):
    algorithm = make().eval()
    fits = []
    original = baseline_module.fit_support_head
    monkeypatch.setattr(baseline_module, "fit_support_head", lambda head, z, y: fits.append(head) or
                        original(head, z, y))
    g = torch.Generator().manual_seed(1)
    support_x = torch.randn(4, *SHAPE, generator=g, dtype=torch.float64)
    support_y, query_x = torch.tensor([0, 0, 1, 1]), torch.randn(3, *SHAPE, generator=g, dtype=torch.float64)
    torch.manual_seed(3)
    logits = algorithm.adapt(support_x, support_y)(query_x)
    (head,) = fits
    assert type(head) is CosineHead and head.scale == 2.0 and head.weight_v.shape == (2, 64)
    with torch.no_grad():
        support_z, query_z = algorithm.featurizer(support_x), algorithm.featurizer(query_x)
    torch.manual_seed(3)
    v0 = nn.Linear(64, 2, bias=False).weight.detach()  # distLinear's nn.Linear, then WeightNorm's g = ||v_k||
    g0 = v0.norm(dim=1, keepdim=True).double()  # taken at construction, in float32
    v0 = v0.double()

    def gradient(params, z, y):
        params = [p.detach().requires_grad_() for p in params]
        return list(torch.autograd.grad(F.cross_entropy(hand_cosine(z, *params, 2.0), y), params))

    (v, gn), batches = replay_finetune([v0, g0], gradient, support_z, support_y)
    assert len(batches) == 100
    assert torch.allclose(logits, hand_cosine(query_z, v, gn, 2.0), rtol=0, atol=1e-10)
    assert not math.isclose(float(gn[0]), float(g0[0]))  # the norms g were trained too
