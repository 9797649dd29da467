"""CrossGrad: the cross perturbations follow the other network's clipped input gradient of its batch-mean
loss, and one update equals an independent re-implementation (perturbations, both losses, Adam)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from conftest import run_cli
from dg_meta.algorithms.crossgrad import CrossGrad, cross_perturbation
from search_space import bounds
from torch import Tensor, nn
from torch.func import functional_call

from dg_meta.hparams import declared_hparams, resolve


def linear_net():
    net = nn.Linear(3, 2)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [-1.0, 3.0, 0.0]]))
        net.bias.zero_()
    return net


def test_perturbation_is_eps_times_clipped_gradient_of_the_batch_mean_loss():
    net = linear_net()
    x = torch.tensor([[0.2, 0.1, -0.3], [1.0, 0.0, 0.5]])
    t = torch.tensor([0, 1])
    # closed form: d mean CE / dx_i = W^T (softmax(W x_i) - onehot(t_i)) / batch size
    grad = (F.softmax(net(x), 1) - F.one_hot(t, 2).float()) @ net.weight / len(x)
    out = cross_perturbation(net, x, t, eps=0.5, clip=0.3)
    assert torch.allclose(out - x, 0.5 * grad.clamp(-0.3, 0.3), atol=1e-6)
    assert not out.requires_grad and grad.abs().max() > 0.3  # the clip is active on some entries
    unclipped = cross_perturbation(net, x, t, eps=1e-2, clip=10.0)
    assert torch.allclose(unclipped - x, 1e-2 * grad, atol=1e-7)
    before = F.cross_entropy(net(x), t, reduction="none")
    after = F.cross_entropy(net(unclipped), t, reduction="none")
    assert torch.all(after > before)  # ascent: the perturbation increases that network's loss


def test_defaults_are_the_authors_constants():
    hp = resolve(declared_hparams(CrossGrad))
    assert (hp["crossgrad_eps"], hp["crossgrad_alpha"], hp["crossgrad_clip"]) == (10.0, 0.5, 0.1)


def test_random_search_ranges_contain_the_authors_constants():
    """eps ~ 10^U(0, 1.5) (1 to 31.6, around the authors' 10), a ~ U(0.1, 0.9), clip ~ 10^U(-2, 0)."""
    hp = CrossGrad.HPARAMS
    assert bounds(hp["crossgrad_eps"]) == (1.0, pytest.approx(10 ** 1.5))
    assert bounds(hp["crossgrad_alpha"]) == (0.1, 0.9)
    assert bounds(hp["crossgrad_clip"]) == (0.01, 1.0)


def test_predict_is_the_label_network():
    torch.manual_seed(0)
    algo = CrossGrad((4,), 3, 2, {**resolve(declared_hparams(CrossGrad)), "mlp_width": 8})
    x = torch.randn(5, 4)
    logits = algo.predict(x)
    assert logits.shape == (5, 3)
    assert torch.equal(logits, algo.label_net(x))


def mean_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return -logits.log_softmax(1).gather(1, targets.unsqueeze(1)).mean()


class ReferenceCrossGrad:
    """The update written out from the paper's Algorithm 1 with the authors' loss scale: both perturbations
    from the current parameters, then each network's Adam step on its clean + other-perturbed loss."""

    def __init__(self, algo: CrossGrad, lr: float):
        self.nets = {"label": copy.deepcopy(algo.label_net), "domain": copy.deepcopy(algo.domain_net)}
        self.names = {k: [n for n, _ in net.named_parameters()] for k, net in self.nets.items()}
        self.adam = {k: HandAdam(list(net.parameters()), lr) for k, net in self.nets.items()}

    def forward(self, which: str, params: list[Tensor], x: Tensor) -> Tensor:
        return functional_call(self.nets[which], dict(zip(self.names[which], params)), (x,))

    def perturb(self, which: str, x: Tensor, targets: Tensor, eps: float, clip: float) -> Tensor:
        x = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(mean_cross_entropy(self.forward(which, self.adam[which].params, x), targets), x)
        return x.detach() + eps * torch.clamp(g, -clip, clip)

    def step(self, batch, eps: float, alpha: float, clip: float) -> dict[str, float]:
        x = torch.cat([xb for xb, _ in batch])
        targets = {"label": torch.cat([yb for _, yb in batch]),
                   "domain": torch.cat([torch.full((len(yb),), i) for i, (_, yb) in enumerate(batch)])}
        x_d = self.perturb("domain", x, targets["domain"], eps, clip)
        x_l = self.perturb("label", x, targets["label"], eps, clip)
        losses = {}
        for which, x_other in (("label", x_d), ("domain", x_l)):
            params = [p.detach().requires_grad_(True) for p in self.adam[which].params]
            t = targets[which]
            loss = (1 - alpha) * mean_cross_entropy(self.forward(which, params, x), t) + \
                alpha * mean_cross_entropy(self.forward(which, params, x_other), t)
            self.adam[which].step(list(torch.autograd.grad(loss, params)))
            losses[which] = float(loss.detach())
        return losses


def test_two_updates_equal_an_independent_reimplementation():
    torch.manual_seed(0)
    hp = {**resolve(declared_hparams(CrossGrad)), "mlp_width": 8, "lr": 1e-2}
    algo = CrossGrad((4,), 3, 2, hp).double()
    ref = ReferenceCrossGrad(algo, hp["lr"])
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        batch = [(torch.randn(3, 4, generator=g, dtype=torch.float64), torch.tensor([0, 2, 1])),
                 (torch.randn(2, 4, generator=g, dtype=torch.float64) + 1, torch.tensor([1, 1]))]
        losses = algo.update(batch)
        expected = ref.step(batch, hp["crossgrad_eps"], hp["crossgrad_alpha"], hp["crossgrad_clip"])
        assert float(losses["loss"]) == pytest.approx(expected["label"], abs=1e-10)
        assert float(losses["domain_loss"]) == pytest.approx(expected["domain"], abs=1e-10)
    for which, net in (("label", algo.label_net), ("domain", algo.domain_net)):
        for name, p, q in zip(ref.names[which], net.parameters(), ref.adam[which].params):
            assert torch.allclose(p, q, rtol=0, atol=1e-8), (which, name, float((p - q).abs().max()))


def test_crossgrad_runs_through_the_cli_process(tmp_path):
    """The CLI plumbing only (the update is checked above; a step costs ~0.6 s: two ConvNets, four backwards)."""
    proc = run_cli("--algorithm", "CrossGrad", "--steps", "2", "--checkpoint-freq", "2",
                   "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "done").exists()
    lines = (tmp_path / "run" / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2]
