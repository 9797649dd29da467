"""ProtoNet and MatchingNet: closed-form logits, MatchingNet's update; ResNet-12 (LastShot: test_lastshot.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dg_meta import registry
from dg_meta.dataset import TensorDomain
from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve
from dg_meta.networks import ResNet12, fewshot_backbone
from dg_meta.samplers import Cell, EpisodeSampler
from dg_meta.splits import class_cells

SUPPORT_X = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
SUPPORT_Y = torch.tensor([0, 0, 1, 1])


def build(name: str, input_shape=(1, 16, 16), num_classes: int = 4, **overrides):
    cls = registry.get_algorithm(name)
    return cls(input_shape, num_classes, 1, resolve(declared_hparams(cls), 0, overrides))


def test_protonet_logits_match_hand_computed_values_on_2way_2shot():
    algo = build("ProtoNet")
    algo.featurizer = nn.Flatten()
    # prototypes (1, 0) and (0, 3); squared distances from (1, 1): 1 and 5; from (0, 2): 5 and 1
    logits = algo.adapt(SUPPORT_X, SUPPORT_Y)(torch.tensor([[1.0, 1.0], [0.0, 2.0]]))
    assert torch.allclose(logits, torch.tensor([[-1.0, -5.0], [-5.0, -1.0]]))


def test_matchingnet_logits_match_hand_computed_values_on_2way_2shot():
    algo = build("MatchingNet")
    algo.featurizer = nn.Flatten()
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    logits = algo.adapt(support, SUPPORT_Y)(torch.tensor([[2.0, 0.0], [0.6, 0.8]]))
    e = math.exp
    # cosines to the four support vectors: (1, 0, -1, 0) and (0.6, 0.8, -0.6, -0.8)
    z1 = e(1) + 2 + e(-1)
    z2 = e(0.6) + e(0.8) + e(-0.6) + e(-0.8)
    expected = torch.tensor([[math.log((e(1) + 1) / z1), math.log((1 + e(-1)) / z1)],
                             [math.log((e(0.6) + e(0.8)) / z2), math.log((e(-0.6) + e(-0.8)) / z2)]])
    assert torch.allclose(logits, expected, atol=1e-6)
    assert torch.allclose(logits.exp().sum(1), torch.ones(2))


def toy_cells(n_classes: int = 4, per_class: int = 8, seed: int = 0) -> list[Cell]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    x = torch.rand(len(labels), 1, 16, 16, generator=g) + labels.view(-1, 1, 1, 1) * 0.5
    domain = TensorDomain("toy", x, labels)
    return [Cell(domain, 0, c, idx) for c, idx in class_cells(domain.labels, torch.arange(len(labels))).items()]


@pytest.mark.parametrize("fce", [False, True])
def test_matchingnet_update_trains_every_parameter(fce):
    torch.manual_seed(0)
    algo = build("MatchingNet", fce=fce, n_way=2, k_shot=2, n_query=2, fce_steps=2)
    sampler = EpisodeSampler(toy_cells(), 2, 2, 2, seed=0)
    before = [p.detach().clone() for p in algo.parameters()]
    losses = algo.update([next(sampler)])
    assert torch.isfinite(losses["loss"])
    assert all(not torch.equal(a, b) for a, b in zip(before, algo.parameters()))
    assert (algo.fce is not None) == fce


def test_resnet12_shapes_and_size():
    net = ResNet12((3, 84, 84)).eval()
    assert net.body(torch.zeros(2, 3, 84, 84)).shape == (2, 640, 5, 5)
    assert net(torch.zeros(2, 3, 84, 84)).shape == (2, 640) and net.n_outputs == 640
    assert fewshot_backbone("resnet12", (1, 28, 28))(torch.zeros(1, 1, 28, 28)).shape == (1, 640)
    assert 12.4e6 < sum(p.numel() for p in net.parameters()) < 12.5e6


def test_unknown_backbone_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown backbone 'vgg': choose one of conv4, resnet12"):
        fewshot_backbone("vgg", (1, 28, 28))
