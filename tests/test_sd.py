"""SD: the reported cross-entropy and mean squared logit, and the gradient in closed form with respect to the
logits, (softmax - onehot) / N + 2 sd_reg logits / (N C), pulled back through the network; Adam replayed by
HandAdam over two updates; the search space."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adam_reference import HandAdam
from search_space import bounds
from torch.func import functional_call

from dg_meta import registry
from dg_meta.hparams import declared_hparams, resolve

SD = registry.get_algorithm("SD")
SD_REG = 0.4


def tiny(sd_reg: float = SD_REG) -> torch.nn.Module:
    hp = resolve(declared_hparams(SD), 0, {"sd_reg": sd_reg, "lr": 0.05})
    torch.manual_seed(0)
    return SD((3,), 4, 2, {**hp, "mlp_width": 6, "mlp_depth": 2}).double()


def tiny_batch(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(6 * torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g))
            for n in (4, 5)]


def closed_form(logits: np.ndarray, y: np.ndarray, sd_reg: float) -> tuple[float, float, np.ndarray]:
    """Cross-entropy, mean squared logit and d(objective)/d(logits) by hand, in numpy."""
    n, c = logits.shape
    shifted = logits - logits.max(1, keepdims=True)
    p = np.exp(shifted) / np.exp(shifted).sum(1, keepdims=True)
    ce = float(-np.log(p[np.arange(n), y]).mean())
    onehot = np.eye(c)[y]
    return ce, float((logits ** 2).mean()), (p - onehot) / n + 2 * sd_reg * logits / (n * c)


@pytest.mark.parametrize("sd_reg", [SD_REG, 0.0])
def test_two_updates_follow_the_closed_form_gradient(sd_reg):
    alg = tiny(sd_reg)
    net = alg.network
    names = [n for n, _ in net.named_parameters()]
    hand = HandAdam(list(net.parameters()), lr=0.05)
    for seed in (1, 2):
        batch = tiny_batch(seed)
        x, y = torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])
        params = [p.detach().requires_grad_() for p in hand.params]
        logits = functional_call(net, dict(zip(names, params)), (x,))
        ce, penalty, dlogits = closed_form(logits.detach().numpy(), y.numpy(), sd_reg)
        grads = torch.autograd.grad(logits, params, torch.from_numpy(dlogits))
        hand.step(list(grads))
        out = alg.update(batch)
        assert float(out["loss"]) == pytest.approx(ce, abs=1e-12)
        assert float(out["penalty"]) == pytest.approx(penalty, abs=1e-12)
        assert not out["loss"].requires_grad and not out["penalty"].requires_grad
        for p, g, h in zip(net.parameters(), grads, hand.params):
            assert torch.allclose(p.grad, g, rtol=0, atol=1e-12)
            assert torch.allclose(p, h, rtol=0, atol=1e-12)
        assert penalty > 0.1  # the logits are large enough for the penalty term to matter


def test_defaults_and_random_search_are_domainbeds():
    """sd_reg 0.1, random search 10^U(-5, -1) (hparams_registry.py); Adam at lr on the network."""
    hp = resolve(declared_hparams(SD))
    assert hp["sd_reg"] == 0.1
    assert bounds(SD.HPARAMS["sd_reg"]) == (pytest.approx(1e-5), pytest.approx(1e-1))
    alg = SD((3,), 3, 2, {**hp, "mlp_width": 6, "mlp_depth": 1})
    assert isinstance(alg.optimizer, torch.optim.Adam) and alg.optimizer.defaults["lr"] == hp["lr"]
