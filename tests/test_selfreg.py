"""SelfReg: the same-class pairing, the cdpl head, and two updates replayed by DomainBed's sorted-batch form."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms.selfreg import SelfReg, class_partners, projection_head

from dg_meta.hparams import declared_hparams, resolve


def make(num_classes: int, **overrides) -> SelfReg:
    torch.manual_seed(0)
    hparams = {**resolve(declared_hparams(SelfReg)), "mlp_width": 4, "mlp_depth": 2, **overrides}
    return SelfReg((3,), num_classes, 2, hparams).double()


def domain_batches(seed: int, num_classes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randint(0, num_classes, (6,), generator=g))
            for _ in range(2)]


def test_defaults():
    assert resolve(declared_hparams(SelfReg))["selfreg_train_cdpl"] is True
    assert SelfReg.HPARAMS["selfreg_train_cdpl"].sample is None


def test_class_partners_are_permutations_within_each_class():
    torch.manual_seed(1)
    y = torch.tensor([2, 0, 2, 1, 0, 2, 2, 0, 5])
    seen = set()
    for _ in range(30):
        for partner in class_partners(y):
            assert torch.equal(y[partner], y)
            assert sorted(partner.tolist()) == list(range(len(y)))
            seen.add(tuple(partner.tolist()))
    assert len(seen) > 10  # random, not a fixed pairing


def test_projection_head_is_domainbeds_cdpl():
    def shapes(head):
        return [tuple(m.weight.shape) for m in head if isinstance(m, torch.nn.Linear)]

    head = projection_head(5)
    assert shapes(head) == [(10, 5), (10, 10), (5, 10)]
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert shapes(projection_head(2048)) == [(2048, 2048), (2048, 2048), (2048, 2048)]


def batch_norm(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = v.mean(0)
    var = ((v - mean) ** 2).mean(0)
    return (v - mean) / torch.sqrt(var + 1e-5) * weight + bias


def cdpl_forward(p: list[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """The head written out: (linear, BN, ReLU) twice, linear, BN; ``p`` = its 12 weights in order."""
    h = torch.relu(batch_norm(z @ p[0].T + p[1], p[2], p[3]))
    h = torch.relu(batch_norm(h @ p[4].T + p[5], p[6], p[7]))
    return batch_norm(h @ p[8].T + p[9], p[10], p[11])


def reference_loss(net, params, head_params, x, y, seed):
    """DomainBed's SelfReg step: sort the batch by label, shuffle within each label interval, mix, regularise."""
    torch.manual_seed(seed)
    half = torch.tensor(0.5, dtype=torch.float64)
    lam = float(torch.distributions.Beta(half, half).sample())
    y_sorted, order = torch.sort(y, stable=True)
    x = x[order]
    names = [n for n, _ in net.named_parameters()]
    weights = dict(zip(names, params))
    feat = torch.func.functional_call(net[0], {n[2:]: p for n, p in weights.items() if n.startswith("0.")}, (x,))
    proj = cdpl_forward(head_params, feat)
    output = torch.func.functional_call(net[1], {n[2:]: p for n, p in weights.items() if n.startswith("1.")},
                                        (feat,))
    starts = [0] + [i for i in range(1, len(y)) if y_sorted[i] != y_sorted[i - 1]] + [len(y)]
    shuffle_1, shuffle_2 = [], []
    for start, end in zip(starts[:-1], starts[1:]):
        shuffle_1.append(torch.randperm(end - start) + start)
        shuffle_2.append(torch.randperm(end - start) + start)
    s1, s2 = torch.cat(shuffle_1), torch.cat(shuffle_2)
    output_2, feat_2 = output[s1], proj[s1]
    output_3 = lam * output_2 + (1 - lam) * output[s2]
    feat_3 = lam * feat_2 + (1 - lam) * proj[s2]
    l_ind = ((output - output_2) ** 2).mean() + 0.3 * ((feat - feat_2) ** 2).mean()
    l_hdl = ((output - output_3) ** 2).mean() + 0.3 * ((feat - feat_3) ** 2).mean()
    cl_loss = F.cross_entropy(output, y_sorted)
    c_scale = min(cl_loss.item(), 1.0)
    return cl_loss + c_scale * (lam * l_ind + (1 - lam) * l_hdl), cl_loss.item()


@pytest.mark.parametrize("num_classes, train_cdpl", [(2, False), (5, False), (3, True)])
def test_two_updates_equal_an_independent_reimplementation(num_classes, train_cdpl):
    algorithm = make(num_classes, selfreg_train_cdpl=train_cdpl)
    net = copy.deepcopy(algorithm.network)
    head_init = [p.detach().clone() for p in algorithm.cdpl.parameters()]
    n_net = len(list(net.parameters()))
    hand = HandAdam(list(net.parameters()) + (head_init if train_cdpl else []), lr=1e-3)
    class_losses = []
    for step in range(2):
        batch = domain_batches(step, num_classes)
        x, y = torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])
        params = [p.detach().requires_grad_() for p in hand.params]
        head = params[n_net:] if train_cdpl else head_init
        expected, class_loss = reference_loss(net, params[:n_net], head, x, y, seed=10 + step)
        class_losses.append(class_loss)
        hand.step([g.detach() for g in torch.autograd.grad(expected, params)])
        torch.manual_seed(10 + step)
        losses = algorithm.update(batch)
        assert torch.allclose(losses["loss"], expected.detach(), rtol=0, atol=1e-12)
        for p, q in zip(algorithm.network.parameters(), hand.params):
            assert torch.allclose(p, q, rtol=0, atol=1e-12)
        head_now = hand.params[n_net:] if train_cdpl else head_init
        for p, q in zip(algorithm.cdpl.parameters(), head_now):
            # the biases before a batch norm get round-off gradients (~1e-16, exactly 0 in exact arithmetic)
            # that Adam turns into ~1e-11 steps: compare the head at 1e-9 (its real steps are ~lr = 1e-3)
            assert torch.allclose(p, q, rtol=0, atol=1e-9)
    assert all(c < 1 for c in class_losses) if num_classes == 2 else all(c > 1 for c in class_losses)
    if train_cdpl:
        assert not torch.allclose(algorithm.cdpl[0].weight, head_init[0])
    else:
        assert all(not p.requires_grad for p in algorithm.cdpl.parameters())
