"""ARM: the context network, predict's support groups, two updates replayed by hand (context network frozen as
in DomainBed, and trained), the refusal of vector inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms.arm import ARM

from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve

SHAPE = (1, 8, 8)
SUPPORT = 4


def make(**overrides) -> ARM:
    torch.manual_seed(0)
    hparams = {**resolve(declared_hparams(ARM)), "batch_size": SUPPORT, **overrides}
    return ARM(SHAPE, 3, 2, hparams).double()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def domain_batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(SUPPORT, *SHAPE, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (SUPPORT,), generator=g)) for _ in range(2)]


def test_vector_inputs_are_refused_in_one_line():
    hparams = {**resolve(declared_hparams(ARM)), "batch_size": 4}
    with pytest.raises(UsageError, match="ARM needs image inputs") as info:
        ARM((4,), 3, 2, hparams)
    assert "\n" not in str(info.value)


def test_defaults_and_networks():
    assert resolve(declared_hparams(ARM))["arm_train_context_net"] is True
    assert ARM.HPARAMS["arm_train_context_net"].sample is None
    algorithm = make()
    convs = [m for m in algorithm.featurizer.context_net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(64, 1, 5, 5), (64, 64, 5, 5), (1, 64, 5, 5)]
    assert all(c.padding == (2, 2) for c in convs)
    norms = [m for m in algorithm.featurizer.context_net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [n.num_features for n in norms] == [64, 64]
    first = next(m for m in algorithm.featurizer.body.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == SHAPE[0] + 1  # the image and its context channel
    assert algorithm.classifier.in_features == algorithm.featurizer.n_outputs == 128
    assert all(p.requires_grad for p in algorithm.featurizer.context_net.parameters())
    frozen = make(arm_train_context_net=False).featurizer.context_net.parameters()
    assert all(not p.requires_grad for p in frozen)


def norm(v: torch.Tensor, w: torch.Tensor, b: torch.Tensor, mean=None, var=None) -> torch.Tensor:
    """Batch norm over (N, H, W): batch statistics, or the given running ones."""
    if mean is None:
        mean, var = v.mean((0, 2, 3)), v.var((0, 2, 3), unbiased=False)
    shape = (1, -1, 1, 1)
    return (v - mean.view(shape)) / torch.sqrt(var.view(shape) + 1e-5) * w.view(shape) + b.view(shape)


def context(p: list[torch.Tensor], x: torch.Tensor, running=None) -> torch.Tensor:
    """The context network written out; ``p`` its 10 weights in order; ``running`` the BN statistics (eval)."""
    stats = running or [(None, None), (None, None)]
    h = torch.relu(norm(F.conv2d(x, p[0], p[1], padding=2), p[2], p[3], *stats[0]))
    h = torch.relu(norm(F.conv2d(h, p[4], p[5], padding=2), p[6], p[7], *stats[1]))
    return F.conv2d(h, p[8], p[9], padding=2)


def grouped_mean(c: torch.Tensor, group: int) -> torch.Tensor:
    return torch.cat([c[i:i + group].mean(0, keepdim=True).expand(group, -1, -1, -1)
                      for i in range(0, len(c), group)])


@pytest.mark.parametrize("n, group", [(8, SUPPORT), (12, SUPPORT), (4, 4), (6, 6), (3, 3)])
def test_predict_averages_the_context_over_support_groups(n, group):
    algorithm = make()
    algorithm.update(domain_batches(0))  # moves the context network's running statistics off (0, 1)
    algorithm.eval()
    x = images(n, seed=n)
    p = [q.detach() for q in algorithm.featurizer.context_net.parameters()]
    norms = [m for m in algorithm.featurizer.context_net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    running = [(m.running_mean, m.running_var) for m in norms]
    with torch.no_grad():
        c = grouped_mean(context(p, x, running), group)
        expected = algorithm.classifier(algorithm.featurizer.body(torch.cat([x, c], 1)))
        assert torch.allclose(algorithm.predict(x), expected, rtol=0, atol=1e-12)
        if group < n:  # the first group alone predicts the same, not the whole batch's context
            assert torch.allclose(algorithm.predict(x[:group]), expected[:group], rtol=0, atol=1e-12)


@pytest.mark.parametrize("train_context", [False, True])
def test_two_updates_equal_an_independent_reimplementation(train_context):
    algorithm = make(arm_train_context_net=train_context)
    ctx_init = [p.detach().clone() for p in algorithm.featurizer.context_net.parameters()]
    body, head = copy.deepcopy(algorithm.featurizer.body), copy.deepcopy(algorithm.classifier)
    names = [n for n, _ in body.named_parameters()]
    n_body = len(names)
    hand = HandAdam([*body.parameters(), *head.parameters(), *(ctx_init if train_context else [])], lr=1e-3)
    for step in range(2):
        batch = domain_batches(step)
        x, y = torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])
        params = [p.detach().requires_grad_() for p in hand.params]
        ctx = params[n_body + 2:] if train_context else ctx_init
        c = grouped_mean(context(ctx, x), SUPPORT)  # training: batch statistics over both domains
        z = torch.func.functional_call(body, dict(zip(names, params[:n_body])), (torch.cat([x, c], 1),))
        expected = F.cross_entropy(z @ params[n_body].T + params[n_body + 1], y)
        hand.step([g.detach() for g in torch.autograd.grad(expected, params)])
        losses = algorithm.update(batch)
        assert torch.allclose(losses["loss"], expected.detach(), rtol=0, atol=1e-12)
        trained = [*algorithm.featurizer.body.parameters(), *algorithm.classifier.parameters()]
        for p, q in zip(trained, hand.params):
            assert torch.allclose(p, q, rtol=0, atol=1e-12)
        if train_context:
            # the conv biases before a batch norm get round-off gradients (exactly 0 in exact arithmetic)
            # that Adam turns into ~1e-11 steps: compare at 1e-9 (real steps are ~lr = 1e-3)
            for p, q in zip(algorithm.featurizer.context_net.parameters(), hand.params[n_body + 2:]):
                assert torch.allclose(p, q, rtol=0, atol=1e-9)
        else:
            for p, q in zip(algorithm.featurizer.context_net.parameters(), ctx_init):
                assert torch.equal(p, q)
    if train_context:
        assert not torch.allclose(algorithm.featurizer.context_net.net[0].weight, ctx_init[0])
