"""ProtoNet: closed-form logits; ResNet-12 (MatchingNet: test_matchingnet.py; LastShot: test_lastshot.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dg_meta import registry
from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve
from dg_meta.networks import ResNet12, fewshot_backbone

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


def test_resnet12_shapes_and_size():
    net = ResNet12((3, 84, 84)).eval()
    assert net.body(torch.zeros(2, 3, 84, 84)).shape == (2, 640, 5, 5)
    assert net(torch.zeros(2, 3, 84, 84)).shape == (2, 640) and net.n_outputs == 640
    assert fewshot_backbone("resnet12", (1, 28, 28))(torch.zeros(1, 1, 28, 28)).shape == (1, 640)
    assert 12.4e6 < sum(p.numel() for p in net.parameters()) < 12.5e6


def test_unknown_backbone_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown backbone 'vgg': choose one of conv4, resnet12"):
        fewshot_backbone("vgg", (1, 28, 28))
