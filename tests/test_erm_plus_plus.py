"""ERMPlusPlus: DomainBed's hparams, the linear probe (head only, its own Adam) then full training (a fresh main
Adam) replayed with HandAdam, the simple moving average against the mean of the recorded snapshots, the SMA's
training-mode forward (batch-norm statistics, DomainBed's recursion), predict/embed on the SMA, and resume."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms.erm import ERM
from dg_meta.algorithms.erm_plus_plus import ERMPlusPlus
from search_space import bounds, drawn
from torch import Tensor, nn

from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve
from dg_meta.registry import ALGORITHMS

Batch = list[tuple[Tensor, Tensor]]


def make(cls: type = ERMPlusPlus, seed: int = 0, dropout: float = 0.0, **overrides) -> ERMPlusPlus:
    """A float64 ERM++ on 3-dimensional inputs, 2 classes, 2 domains, an MLP featurizer of width 6."""
    torch.manual_seed(seed)
    hparams = {**resolve(declared_hparams(cls), overrides=overrides), "mlp_width": 6, "mlp_depth": 2,
               "mlp_dropout": dropout}
    return cls((3,), 2, 2, hparams).double()


def domain_batches(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, generator=g, dtype=torch.float64) * 2 + 1, torch.randint(0, 2, (4,), generator=g))
            for _ in range(2)]


def pooled(batch: Batch) -> tuple[Tensor, Tensor]:
    return torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])


def online(algorithm: ERMPlusPlus) -> list[Tensor]:
    return [p.detach().clone() for p in algorithm.network.parameters()]


def sma(algorithm: ERMPlusPlus) -> list[Tensor]:
    return [p.detach().clone() for p in algorithm.network_sma.parameters()]


def same(a: list[Tensor], b: list[Tensor], atol: float = 1e-12) -> bool:
    return len(a) == len(b) and all(torch.allclose(p, q, rtol=0, atol=atol) for p, q in zip(a, b))


def test_registered_as_domainbed_names_it_and_an_erm_subclass():
    assert ALGORITHMS["ERMPlusPlus"] is ERMPlusPlus and issubclass(ERMPlusPlus, ERM)


def test_defaults_and_random_search_are_domainbeds():
    declared = declared_hparams(ERMPlusPlus)
    defaults = resolve(declared)
    assert {k: defaults[k] for k in ("linear_lr", "linear_steps", "lars", "freeze_bn", "sma_start_iter")} == {
        "linear_lr": 5e-5, "linear_steps": 500, "lars": False, "freeze_bn": False, "sma_start_iter": 600}
    low, high = bounds(declared["linear_lr"])
    assert low == pytest.approx(1e-5, rel=1e-12) and high == pytest.approx(10 ** -3.5, rel=1e-12)
    assert all(1e-5 <= v <= 10 ** -3.5 for v in drawn(declared["linear_lr"]))
    for name, value in (("linear_steps", 500), ("lars", False), ("freeze_bn", False), ("sma_start_iter", 600)):
        assert drawn(declared[name]) == {value}, name
    for seed in (1, 2, 3):
        drawn_values = resolve(declared, hparams_seed=seed)
        assert (drawn_values["linear_steps"], drawn_values["sma_start_iter"]) == (500, 600)
        assert 1e-5 <= drawn_values["linear_lr"] <= 10 ** -3.5


@pytest.mark.parametrize("name, value", [("lars", True), ("linear_lr", 0.0), ("linear_steps", -1),
                                         ("sma_start_iter", 0)])
def test_invalid_values_are_refused(name, value):
    with pytest.raises(UsageError, match=name):
        resolve(declared_hparams(ERMPlusPlus), overrides={name: value})


def test_lars_is_refused_with_the_reason():
    with pytest.raises(UsageError, match="LARS is not implemented.*TypeError"):
        resolve(declared_hparams(ERMPlusPlus), overrides={"lars": True})
    assert resolve(declared_hparams(ERMPlusPlus), overrides={"linear_steps": 0, "sma_start_iter": 1})


def test_the_two_adams_and_what_they_hold():
    algorithm = make(lr=2e-3, linear_lr=3e-4, weight_decay=1e-3)
    probe, main = algorithm.linear_optimizer.param_groups, algorithm.optimizer.param_groups
    assert all(isinstance(opt, torch.optim.Adam) for opt in (algorithm.linear_optimizer, algorithm.optimizer))
    assert len(probe) == 1 and (probe[0]["lr"], probe[0]["weight_decay"]) == (3e-4, 1e-3)
    assert [id(p) for p in probe[0]["params"]] == [id(p) for p in algorithm.classifier.parameters()]
    assert (main[0]["lr"], main[0]["weight_decay"]) == (2e-3, 1e-3)
    assert [id(p) for p in main[0]["params"]] == [id(p) for p in algorithm.network.parameters()]
    assert set(algorithm.optimizers()) == {"optimizer", "linear_optimizer"}


def replay(algorithm: ERMPlusPlus, batches: list[Batch], linear_steps: int, lr: float,
           linear_lr: float) -> list[tuple[Tensor, list[Tensor]]]:
    """The cross-entropy and the weights after each update: HandAdam on the head (``linear_lr``) for updates
    0..linear_steps, then a new HandAdam on every weight (``lr``)."""
    net = copy.deepcopy(algorithm.network)
    names = [n for n, _ in net.named_parameters()]
    head = [i for i, n in enumerate(names) if n.startswith("1.")]
    weights = online(algorithm)
    probe, full = HandAdam([weights[i] for i in head], lr=linear_lr), None
    out = []
    for step, batch in enumerate(batches):
        x, y = pooled(batch)
        leaves = [w.detach().requires_grad_() for w in weights]
        loss = F.cross_entropy(torch.func.functional_call(net, dict(zip(names, leaves)), (x,)), y)
        if step <= linear_steps:
            new_head = probe.step(list(torch.autograd.grad(loss, [leaves[i] for i in head])))
            weights = [w.detach() for w in weights]
            for i, w in zip(head, new_head):
                weights[i] = w
        else:
            full = full or HandAdam(weights, lr=lr)
            weights = list(full.step(list(torch.autograd.grad(loss, leaves))))
        out.append((loss.detach(), [w.clone() for w in weights]))
    return out


@pytest.mark.parametrize("linear_steps", [0, 2])
def test_linear_probe_steps_only_the_head_then_a_fresh_adam_steps_everything(linear_steps):
    algorithm = make(lr=1e-2, linear_lr=3e-2, linear_steps=linear_steps)
    initial = online(algorithm)
    n_head = len(list(algorithm.classifier.parameters()))
    batches = [domain_batches(step) for step in range(linear_steps + 3)]
    expected = replay(algorithm, batches, linear_steps, lr=1e-2, linear_lr=3e-2)
    for step, (batch, (loss, weights)) in enumerate(zip(batches, expected)):
        losses = algorithm.update(batch)
        assert torch.allclose(losses["loss"], loss, rtol=0, atol=1e-12) and not losses["loss"].requires_grad
        assert same(online(algorithm), weights), step
        probing = step <= linear_steps
        assert same(online(algorithm)[:-n_head], initial[:-n_head]) == probing, step
        assert not online(algorithm)[-1].equal(initial[-1])
        assert (len(algorithm.optimizer.state) == 0) == probing
    assert algorithm.global_iter == linear_steps + 3


@pytest.mark.parametrize("start", [1, 2, 3])
def test_sma_is_the_mean_of_the_snapshots_from_update_start_minus_one(start):
    algorithm = make(lr=5e-2, linear_lr=5e-2, linear_steps=1, sma_start_iter=start)
    snapshots = [online(algorithm)]  # snapshots[t]: the weights after update t (0: the initial ones)
    assert same(sma(algorithm), snapshots[0])
    for t in range(1, 6):
        algorithm.update(domain_batches(t))
        snapshots.append(online(algorithm))
        covered = snapshots[t:] if t < start else snapshots[start - 1:]
        expected = [torch.stack(ws).mean(0) for ws in zip(*covered)]
        assert same(sma(algorithm), expected), t
        assert (algorithm.sma.n, algorithm.sma.start_step, algorithm.sma.end_step) == (
            len(covered), t - len(covered) + 1, t)
    assert not same(sma(algorithm), snapshots[-1], atol=1e-6)


def test_predict_and_embed_are_the_sma_network_in_eval_mode():
    algorithm = make(dropout=0.5, lr=5e-2, linear_lr=5e-2, linear_steps=0, sma_start_iter=2)
    names = [n for n, _ in algorithm.network.named_parameters()]
    for t in range(4):
        algorithm.update(domain_batches(t))
    plain = copy.deepcopy(algorithm.network).eval()
    mean = dict(zip(names, sma(algorithm)))
    x = domain_batches(9)[0][0]
    algorithm.train()
    with torch.no_grad():
        expected_logits = torch.func.functional_call(plain, mean, (x,))
        expected_features = torch.func.functional_call(plain[0], {n[2:]: v for n, v in mean.items()
                                                                  if n.startswith("0.")}, (x,))
        assert torch.allclose(algorithm.embed(x), expected_features, rtol=0, atol=1e-12)
        algorithm.train()
        assert torch.allclose(algorithm.predict(x), expected_logits, rtol=0, atol=1e-12)
        assert not torch.allclose(algorithm.predict(x), plain(x), atol=1e-6)
    assert algorithm.embed(x).shape == (4, 6)
    assert not algorithm.predict(x).requires_grad  # the SMA is never differentiated
    assert not any(p.requires_grad for p in algorithm.network_sma.parameters())


class BatchNormFeaturizer(nn.Module):
    """Batch norm on the raw input, then a linear layer: the SMA forward's batch statistics are the input's."""

    n_outputs = 4

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, self.n_outputs))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ERMPlusPlusBN(ERMPlusPlus):
    def build_featurizer(self, hparams: dict) -> nn.Module:
        return BatchNormFeaturizer()


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_sma_statistics_follow_domainbeds_recursion_with_the_sma_forward(freeze_bn):
    """DomainBed: after each update, ``sma = (sma * c + online) / (c + 1)`` over the state_dict (``sma =
    online`` before the start), then, unless freeze_bn, a training-mode forward of the SMA network on the
    update's inputs moves its statistics by momentum 0.1 towards the batch's mean and unbiased variance."""
    start = 3
    algorithm = make(ERMPlusPlusBN, freeze_bn=freeze_bn, lr=5e-2, linear_lr=5e-2, linear_steps=1,
                     sma_start_iter=start)
    norm, sma_norm = algorithm.featurizer.net[0], algorithm.network_sma[0].net[0]
    online_stats = [norm.running_mean.clone(), norm.running_var.clone()]
    sma_stats = [s.clone() for s in online_stats]
    for t in range(1, 6):
        x, _ = pooled(domain_batches(t))
        algorithm.predict(x)  # eval mode: statistics unchanged, and the next update's SMA forward is in training mode
        algorithm.update(domain_batches(t))
        batch_stats = [x.mean(0), x.var(0, unbiased=True)]
        online_stats = [0.9 * s + 0.1 * b for s, b in zip(online_stats, batch_stats)]
        c = t - start + 1
        sma_stats = [s.clone() for s in online_stats] if t < start else [
            (s * c + o) / (c + 1) for s, o in zip(sma_stats, online_stats)]
        if not freeze_bn:
            sma_stats = [0.9 * s + 0.1 * b for s, b in zip(sma_stats, batch_stats)]
        assert torch.allclose(norm.running_mean, online_stats[0], rtol=0, atol=1e-12)
        assert torch.allclose(sma_norm.running_mean, sma_stats[0], rtol=0, atol=1e-12), t
        assert torch.allclose(sma_norm.running_var, sma_stats[1], rtol=0, atol=1e-12), t
        assert int(sma_norm.num_batches_tracked) == (0 if freeze_bn else t)
        assert int(norm.num_batches_tracked) == t


def test_the_sma_forward_draws_dropout_masks_unless_freeze_bn():
    states = {}
    for freeze_bn in (False, True):
        algorithm = make(dropout=0.5, freeze_bn=freeze_bn, linear_steps=0, sma_start_iter=1)
        torch.manual_seed(5)
        algorithm.update(domain_batches(0))
        states[freeze_bn] = torch.get_rng_state()
    torch.manual_seed(5)
    torch.nn.functional.dropout(torch.ones(8, 6, dtype=torch.float64), 0.5)
    assert torch.equal(states[True], torch.get_rng_state())
    torch.nn.functional.dropout(torch.ones(8, 6, dtype=torch.float64), 0.5)
    assert torch.equal(states[False], torch.get_rng_state())


@pytest.mark.parametrize("cls", [ERMPlusPlus, ERMPlusPlusBN])
def test_checkpoint_round_trip_continues_identically(cls):
    hp = {"lr": 5e-2, "linear_lr": 5e-2, "linear_steps": 2, "sma_start_iter": 3}
    first = make(cls, **hp)
    for t in range(3):
        first.update(domain_batches(t))
    buffer = io.BytesIO()
    torch.save(first.checkpoint_state(), buffer)
    buffer.seek(0)
    resumed = make(cls, seed=1, **hp)  # other weights: the checkpoint must replace them
    resumed.load_checkpoint_state(torch.load(buffer, weights_only=True))
    assert "_extra_state" in first.state_dict()
    assert (resumed.global_iter, resumed.sma.n, resumed.sma.start_step) == (3, 2, 2)
    x = domain_batches(9)[0][0]
    for t in range(3, 6):
        a, b = first.update(domain_batches(t)), resumed.update(domain_batches(t))
        assert torch.equal(a["loss"], b["loss"]), t
        assert same(online(first), online(resumed), atol=0) and same(sma(first), sma(resumed), atol=0), t
        assert same(list(first.network_sma.buffers()), list(resumed.network_sma.buffers()), atol=0)
        assert torch.equal(first.predict(x), resumed.predict(x))
