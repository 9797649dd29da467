"""Hand references for the tests of IRM, VREx, IB_ERM and IB_IRM: closed forms of the cross-entropy, of IRMv1's
scale derivative and of the feature variance, tiny float64 domain batches, and ``Replay``, an independent
re-implementation of their Adam updates (``HandAdam``, coupled weight decay, restarts) on an objective written
in the test."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import torch
from adam_reference import HandAdam
from torch import Tensor

from dg_meta import registry
from dg_meta.hparams import declared_hparams, resolve

Batch = list[tuple[Tensor, Tensor]]
Forward = Callable[[Tensor], tuple[Tensor, Tensor]]
N_IN, N_CLASSES, SIZES = 3, 3, (6, 5, 6)


def tiny(name: str, **overrides) -> torch.nn.Module:
    """Algorithm ``name`` in float64 on 3-d inputs, 3 classes, 3 domains, an MLP featurizer of width 6."""
    cls = registry.get_algorithm(name)
    hp = resolve(declared_hparams(cls), 0, overrides)
    torch.manual_seed(0)
    return cls((N_IN,), N_CLASSES, len(SIZES), {**hp, "mlp_width": 6, "mlp_depth": 2}).double()


def domain_batches(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return [(2 * torch.randn(n, N_IN, generator=g, dtype=torch.float64), torch.randint(0, N_CLASSES, (n,), generator=g))
            for n in SIZES]


def hand_ce(z: Tensor, y: Tensor) -> Tensor:
    """Mean over examples of ``log sum_k exp z_k - z_y``."""
    return (z.exp().sum(1).log() - z[torch.arange(len(y)), y]).mean()


def scale_derivative(z: Tensor, y: Tensor) -> Tensor:
    """``d/ds CE(s z, y)`` at ``s = 1`` in closed form: the mean over examples of ``(softmax(z) - onehot(y)) . z``."""
    p = z.exp() / z.exp().sum(1, keepdim=True)
    onehot = torch.eye(z.shape[1], dtype=z.dtype)[y]
    return ((p - onehot) * z).sum(1).mean()


def hand_irm_penalty(z: Tensor, y: Tensor, unbiased: bool = True) -> Tensor:
    if unbiased:
        return scale_derivative(z[0::2], y[0::2]) * scale_derivative(z[1::2], y[1::2])
    return scale_derivative(z, y) ** 2


def hand_feature_variance(f: Tensor) -> Tensor:
    """Mean over columns of ``sum_i (f_i - mean f)^2 / (n - 1)``."""
    return ((f - f.sum(0) / len(f)) ** 2).sum(0).div(len(f) - 1).mean()


class Replay:
    """Adam (torch's coupled weight decay: ``g + wd * p``) on ``objective(forward, batch)`` from a copy of the
    algorithm's initial featurizer and classifier; ``restart=True`` starts a fresh Adam before the step, and
    ``weight_decay`` replaces the algorithm's for this step."""

    def __init__(self, algorithm: torch.nn.Module):
        self.featurizer = copy.deepcopy(algorithm.featurizer)
        self.classifier = copy.deepcopy(algorithm.classifier)
        self.f_names = [n for n, _ in self.featurizer.named_parameters()]
        self.c_names = [n for n, _ in self.classifier.named_parameters()]
        self.lr, self.wd = algorithm.hparams["lr"], algorithm.hparams["weight_decay"]
        self.adam = HandAdam([*self.featurizer.parameters(), *self.classifier.parameters()], lr=self.lr)

    def step(self, objective: Callable[[Forward, Batch], tuple[Tensor, dict[str, Tensor]]], batch: Batch,
             restart: bool = False, weight_decay: float | None = None) -> tuple[dict[str, Tensor], list[Tensor]]:
        if restart:
            self.adam = HandAdam(self.adam.params, lr=self.lr)
        params = [p.detach().requires_grad_() for p in self.adam.params]
        n = len(self.f_names)

        def forward(x: Tensor) -> tuple[Tensor, Tensor]:
            f = torch.func.functional_call(self.featurizer, dict(zip(self.f_names, params[:n])), (x,))
            return f, torch.func.functional_call(self.classifier, dict(zip(self.c_names, params[n:])), (f,))

        loss, terms = objective(forward, batch)
        grads = [g.detach() for g in torch.autograd.grad(loss, params)]
        wd = self.wd if weight_decay is None else weight_decay
        self.adam.step([g + wd * p.detach() for g, p in zip(grads, params)])
        return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}, grads


def per_domain(forward: Forward, batch: Batch) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``(features, logits, y)`` of each domain, each domain's minibatch forwarded on its own."""
    return [(*forward(x), y) for x, y in batch]


def assert_update_matches(algorithm: torch.nn.Module, replay: Replay, losses: dict, expected: dict,
                          grads: list[Tensor]) -> None:
    """Same losses, same gradients (``.grad`` left by the step), same parameters after the step."""
    assert set(losses) == set(expected)
    for key, value in expected.items():
        assert torch.allclose(losses[key], value, rtol=1e-12, atol=1e-12), key
    for p, g, q in zip(algorithm.network.parameters(), grads, replay.adam.params):
        assert torch.allclose(p.grad, g, rtol=1e-9, atol=1e-12)
        assert torch.allclose(p, q, rtol=0, atol=1e-10)
    assert max(float(g.abs().max()) for g in grads) > 1e-3


def adam_steps(algorithm: torch.nn.Module) -> list[int]:
    """The step count of the algorithm's Adam for each parameter (0 for a parameter it has not stepped)."""
    state = algorithm.optimizer.state
    return [int(state[p]["step"]) if p in state else 0 for p in algorithm.network.parameters()]


def resumed(algorithm: torch.nn.Module, name: str, **overrides) -> torch.nn.Module:
    """A fresh ``tiny(name, **overrides)`` that loaded ``algorithm``'s checkpoint through ``torch.save``."""
    buffer = io.BytesIO()
    torch.save(algorithm.checkpoint_state(), buffer)
    buffer.seek(0)
    fresh = tiny(name, **overrides)
    fresh.load_checkpoint_state(torch.load(buffer, weights_only=True))
    return fresh
