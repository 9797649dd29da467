"""RFS (Tian et al. 2020): the official defaults; generation 0's SGD updates and a distilled generation's updates
(gamma CE + alpha T^2 KL to a frozen teacher from a run folder) replayed by hand; the teacher's loading and
refusals; and the test-time classifier: logistic regression fitted on the L2-normalised support features only,
matching sklearn's LogisticRegression(C=1)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dg_meta.algorithms import rfs as rfs_module
from dg_meta.algorithms.baseline_plus_plus import BaselinePlusPlus
from dg_meta.algorithms.rfs import RFS, distillation_kl
from search_space import bounds, drawn
from torch import nn

from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve

SHAPE = (1, 16, 16)


def make(seed: int = 0, num_classes: int = 3, **overrides) -> RFS:
    torch.manual_seed(seed)
    return RFS(SHAPE, num_classes, 2, resolve(declared_hparams(RFS), 0, overrides)).double()


def save_run(model: nn.Module, folder: Path) -> Path:
    """A run folder as dg_meta.train leaves it, as far as ``read_run_model`` reads it."""
    folder.mkdir(parents=True)
    torch.save({"algorithm": model.checkpoint_state()}, folder / "checkpoint.pt")
    return folder


def domain_batches(seed: int, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *SHAPE, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for _ in range(2)]


class HandSGD:
    """torch.optim.SGD with momentum and L2 weight decay, no dampening, written out (out of place)."""

    def __init__(self, params: list[torch.Tensor], lr: float, weight_decay: float, momentum: float = 0.9):
        self.params = [p.detach().clone() for p in params]
        self.bufs: list[torch.Tensor | None] = [None] * len(params)
        self.lr, self.weight_decay, self.momentum = lr, weight_decay, momentum

    def step(self, grads: list[torch.Tensor]) -> None:
        for i, g in enumerate(grads):
            g = g + self.weight_decay * self.params[i]
            self.bufs[i] = g if self.bufs[i] is None else self.momentum * self.bufs[i] + g
            self.params[i] = self.params[i] - self.lr * self.bufs[i]


def test_defaults_are_the_official_ones_and_the_search_space():
    declared = declared_hparams(RFS)
    hp = resolve(declared)
    assert {k: hp[k] for k in ("lr", "weight_decay", "teacher_run", "gamma", "alpha", "kd_temperature", "backbone")} \
        == {"lr": 0.05, "weight_decay": 5e-4, "teacher_run": "", "gamma": 0.5, "alpha": 0.5, "kd_temperature": 4.0,
            "backbone": "conv4"}
    assert bounds(declared["lr"]) == pytest.approx((1e-2, 1e-1), rel=1e-12)
    assert bounds(declared["weight_decay"]) == pytest.approx((1e-6, 1e-2), rel=1e-12)
    assert (drawn(declared["gamma"]), drawn(declared["alpha"])) == ({0.5, 1.0}, {0.5, 1.0})
    assert drawn(declared["kd_temperature"]) == {1.0, 4.0, 8.0}
    algorithm = make()
    assert algorithm.teacher is None and isinstance(algorithm.optimizer, torch.optim.SGD)
    (group,) = algorithm.optimizer.param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"], group["dampening"]) == (0.05, 0.9, 5e-4, 0)
    assert [id(p) for p in group["params"]] == [id(p) for p in algorithm.network.parameters()]


def test_generation_zero_updates_are_sgd_steps_on_the_plain_cross_entropy():
    algorithm = make(gamma=0.25, alpha=3.0)  # no teacher: the weights play no part
    net = copy.deepcopy(algorithm.network)
    names = [n for n, _ in net.named_parameters()]
    hand = HandSGD(list(net.parameters()), lr=0.05, weight_decay=5e-4)
    for step in range(2):
        batch = domain_batches(step)
        x, y = torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])
        params = [p.detach().requires_grad_() for p in hand.params]
        expected = F.cross_entropy(torch.func.functional_call(net, dict(zip(names, params)), (x,)), y)
        hand.step(list(torch.autograd.grad(expected, params)))
        losses = algorithm.update(batch)
        assert set(losses) == {"loss"} and not losses["loss"].requires_grad
        assert torch.allclose(losses["loss"], expected.detach(), rtol=0, atol=1e-10)
        for p, q in zip(algorithm.network.parameters(), hand.params, strict=True):
            assert torch.allclose(p, q, rtol=0, atol=1e-10)


def test_distillation_kl_is_t_squared_times_the_batch_mean_kl_of_softened_outputs():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]], dtype=torch.float64)
    teacher = torch.tensor([[0.0, 3.0, 1.0], [2.0, -1.0, 0.5]], dtype=torch.float64)

    def softmax(v, t):
        e = [math.exp(a / t) for a in v]
        return [a / sum(e) for a in e]

    for t in (1.0, 4.0):
        kl = sum(sum(pt * math.log(pt / ps) for pt, ps in zip(softmax(tr, t), softmax(sr, t)))
                 for sr, tr in zip(student.tolist(), teacher.tolist()))
        assert distillation_kl(student, teacher, t).item() == pytest.approx(t * t * kl / 2, rel=1e-12)


def test_a_distilled_generation_minimises_gamma_ce_plus_alpha_kl_to_the_frozen_teacher(tmp_path):
    source = make(seed=7)
    source.update(domain_batches(9))  # a trained generation: running statistics and weights moved
    run = save_run(source.float(), tmp_path / "gen0")  # float32, as trained: loaded before .double()
    algorithm = make(teacher_run=str(run), gamma=0.3, alpha=0.7, kd_temperature=2.0).train()
    assert not algorithm.teacher.training and all(not p.requires_grad for p in algorithm.teacher.parameters())
    weights = {k: v for k, v in source.network.state_dict().items() if v.is_floating_point()}  # not counters
    assert len(weights) == 26 and all(torch.equal(algorithm.teacher.state_dict()[k], v.double())
                                      for k, v in weights.items())
    fresh = make()  # the student starts from its own initialisation, not the teacher's
    assert all(torch.equal(p, q) for p, q in zip(algorithm.network.parameters(), fresh.network.parameters()))
    teacher = copy.deepcopy(source.network).double().eval()
    teacher_state = copy.deepcopy(algorithm.teacher.state_dict())
    net = copy.deepcopy(algorithm.network)
    names = [n for n, _ in net.named_parameters()]
    hand = HandSGD(list(net.parameters()), lr=0.05, weight_decay=5e-4)
    for step in range(2):
        batch = domain_batches(step)
        x, y = torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])
        params = [p.detach().requires_grad_() for p in hand.params]
        s = torch.func.functional_call(net, dict(zip(names, params)), (x,))
        with torch.no_grad():
            t = teacher(x)
        kl = (F.softmax(t / 2, 1) * (F.log_softmax(t / 2, 1) - F.log_softmax(s / 2, 1))).sum() / len(x) * 4
        ce = F.cross_entropy(s, y)
        expected = 0.3 * ce + 0.7 * kl
        hand.step(list(torch.autograd.grad(expected, params)))
        losses = algorithm.update(batch)
        assert torch.allclose(losses["kd"], kl.detach(), rtol=0, atol=1e-10)
        assert torch.allclose(losses["ce"], ce.detach(), rtol=0, atol=1e-10)
        assert torch.allclose(losses["loss"], expected.detach(), rtol=0, atol=1e-10)
        for p, q in zip(algorithm.network.parameters(), hand.params, strict=True):
            assert torch.allclose(p, q, rtol=0, atol=1e-10)
    assert all(torch.equal(v, algorithm.teacher.state_dict()[k]) for k, v in teacher_state.items())
    assert algorithm.train() is algorithm and algorithm.network.training and not algorithm.teacher.training


def test_a_teacher_run_of_another_network_is_refused(tmp_path):
    torch.manual_seed(0)
    other = BaselinePlusPlus(SHAPE, 3, 2, resolve(declared_hparams(BaselinePlusPlus)))
    run = save_run(other, tmp_path / "cosine")
    with pytest.raises(UsageError, match=r"^RFS hparam teacher_run .*cosine: its network is not this run's "
                                         r"\(network.1.weight absent or of another shape\); set the hparam "
                                         r"teacher_run to the folder of a finished run of the previous generation"):
        make(teacher_run=str(run))
    run = save_run(make(num_classes=5), tmp_path / "five")
    with pytest.raises(UsageError, match=r"network.1.weight absent or of another shape"):
        make(teacher_run=str(run))
    with pytest.raises(UsageError, match=r"^RFS hparam teacher_run .*nowhere: no such folder"):
        make(teacher_run=str(tmp_path / "nowhere"))


def test_adapt_is_logistic_regression_on_normalised_support_features_only(monkeypatch):
    linear_model = pytest.importorskip("sklearn.linear_model")
    algorithm = make().eval()
    fits = []
    original = rfs_module.fit_logistic_regression
    monkeypatch.setattr(rfs_module, "fit_logistic_regression",
                        lambda x, y, c: fits.append((x, y, c)) or fits.append(original(x, y, c)) or fits[-1])
    g = torch.Generator().manual_seed(4)
    support_x = torch.randn(6, *SHAPE, generator=g, dtype=torch.float64)
    support_y, query_x = torch.tensor([0, 0, 1, 1, 2, 2]), torch.randn(4, *SHAPE, generator=g, dtype=torch.float64)
    predict = algorithm.adapt(support_x, support_y)
    logits = predict(query_x)
    (x, y, c), (weight, bias) = fits
    with torch.no_grad():
        support_z, query_z = algorithm.featurizer(support_x), algorithm.featurizer(query_x)
    support_n = support_z / support_z.pow(2).sum(1, keepdim=True).sqrt()
    query_n = query_z / query_z.pow(2).sum(1, keepdim=True).sqrt()
    assert c == 1.0 and torch.equal(y, support_y) and torch.allclose(x, support_n, rtol=0, atol=1e-14)
    assert logits.dtype == torch.float64 and logits.shape == (4, 3)
    assert torch.allclose(logits, query_n @ weight.t() + bias, rtol=0, atol=1e-12)
    # fitted once, on the support set (a batch of 2 may round differently from one of 4: BLAS kernels vary by CPU)
    assert torch.allclose(predict(query_x[:2]), logits[:2], rtol=0, atol=1e-12) and len(fits) == 2
    reference = linear_model.LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(support_n.numpy(),
                                                                                    support_y.numpy())
    expected = torch.tensor(reference.decision_function(query_n.numpy()))
    assert torch.allclose(logits - logits.mean(1, keepdim=True), expected - expected.mean(1, keepdim=True), atol=1e-4)
