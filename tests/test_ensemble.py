"""Ensemble: both forms' losses, gradients, Adam steps and predictions against per-example hand
re-implementations on a tiny MLP; the paper form's heads are source-specific; one domain is ERM."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from adam_reference import HandAdam
from dg_meta.algorithms.ensemble import DomainHeads
from search_space import bounds

from dg_meta import registry
from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve

Ensemble = registry.get_algorithm("Ensemble")
ERM = registry.get_algorithm("ERM")


def make(cls, num_domains: int, **overrides):
    hp = resolve(declared_hparams(cls), 0, overrides)
    torch.manual_seed(0)
    return cls((4,), 3, num_domains, {**hp, "mlp_width": 6, "mlp_depth": 2})


def domain_batch(sizes: list[int], seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g) + d, torch.randint(0, 3, (n,), generator=g)) for d, n in enumerate(sizes)]


def head_scores(model, xi: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-head logits (a Python list, one ``W_i z + b_i`` each) and domain logits for one example."""
    z = model.featurizer(xi.unsqueeze(0))[0]
    heads = [model.heads.weight[i] @ z + model.heads.bias[i] for i in range(model.num_domains)]
    return heads, model.domain_classifier.weight @ z + model.domain_classifier.bias


def nll(scores: torch.Tensor, label: int) -> torch.Tensor:
    return torch.logsumexp(scores, 0) - scores[label]


def hand_losses(model, batch, form: str, alpha: float, lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, class, domain) losses, one example at a time.

    paper: example of domain d scored by (1 - alpha) f_d + alpha * mean_i f_i (its own head plus the
    domain-agnostic average), cross-entropy on those logits. weighted_heads: -log sum_i w_i softmax(f_i)_y."""
    n_domains = model.num_domains
    class_terms, domain_terms = [], []
    for d, (x, y) in enumerate(batch):
        for xi, yi in zip(x, y):
            heads, g = head_scores(model, xi)
            if form == "paper":
                fused = (1 - alpha) * heads[d] + alpha * sum(heads) / n_domains
                class_terms.append(nll(fused, int(yi)))
            else:
                w = torch.exp(g - torch.logsumexp(g, 0))
                p_y = sum(w[i] * torch.exp(heads[i] - torch.logsumexp(heads[i], 0))[yi] for i in range(n_domains))
                class_terms.append(-torch.log(p_y))
            domain_terms.append(nll(g, d))
    class_loss = torch.stack(class_terms).mean()
    domain_loss = torch.stack(domain_terms).mean()
    return class_loss + lam * domain_loss, class_loss, domain_loss


def assert_update_matches_hand(form: str, alpha: float = 0.25, lam: float = 0.7, lr: float = 1e-2) -> None:
    ens = make(Ensemble, 3, ensemble_form=form, alpha_agnostic=alpha, lambda_domain=lam, lr=lr)
    batch = domain_batch([4, 3, 5])
    ref = copy.deepcopy(ens)
    total, class_loss, domain_loss = hand_losses(ref, batch, form, alpha, lam)
    names, params = zip(*ref.named_parameters())
    grads = torch.autograd.grad(total, params)
    total, class_loss, domain_loss = total.detach(), class_loss.detach(), domain_loss.detach()

    losses = ens.update(batch)
    assert float(losses["loss"]) == pytest.approx(float(total), abs=1e-5)
    assert float(losses["class_loss"]) == pytest.approx(float(class_loss), abs=1e-5)
    assert float(losses["domain_loss"]) == pytest.approx(float(domain_loss), abs=1e-5)
    new = dict(ens.named_parameters())
    for name, old, grad in zip(names, params, grads):
        assert torch.allclose(new[name].grad, grad, atol=1e-6), name
        # Adam's first step: m_hat = g, v_hat = g^2, so the step is lr * g / (|g| + eps)
        expected = old.detach() - lr * grad / (grad.abs() + 1e-8)
        assert torch.allclose(new[name].detach(), expected, atol=1e-6), name


def test_defaults_are_the_paper_model():
    hp = resolve(declared_hparams(Ensemble), 0)
    assert hp["ensemble_form"] == "paper"
    assert hp["alpha_agnostic"] == 0.25
    drawn = {resolve(declared_hparams(Ensemble), s)["ensemble_form"] for s in range(1, 6)}
    assert drawn == {"paper"}


def test_domain_loss_weight_default_and_random_search_ranges():
    """lambda_domain defaults to 1 (the docstring); search: alpha ~ U(0, 0.5), lambda_domain ~ 10^U(-1, 1)."""
    assert resolve(declared_hparams(Ensemble), 0)["lambda_domain"] == 1.0
    assert bounds(Ensemble.HPARAMS["alpha_agnostic"]) == (0.0, 0.5)
    assert bounds(Ensemble.HPARAMS["lambda_domain"]) == (0.1, 10.0)


def test_heads_are_initialised_like_nn_linear():
    """Every weight and bias ~ U(-1/sqrt(F), 1/sqrt(F)) for F input features (nn.Linear's default init)."""
    torch.manual_seed(0)
    heads = DomainHeads(4, 25, 50)
    for p in (heads.weight.detach(), heads.bias.detach()):
        assert -0.2 <= float(p.min()) < -0.19 and 0.19 < float(p.max()) <= 0.2


@pytest.mark.parametrize("form", ["paper", "weighted_heads"])
def test_two_updates_are_adam_steps_on_fresh_gradients(form):
    """The second step's gradient is the second batch's alone (gradients are reset) and Adam carries its moments."""
    alpha, lam, lr = 0.25, 0.7, 1e-2
    ens = make(Ensemble, 3, ensemble_form=form, alpha_agnostic=alpha, lambda_domain=lam, lr=lr).double()
    ref = copy.deepcopy(ens)
    adam = HandAdam(list(ref.parameters()), lr)
    for seed in (1, 2):
        batch = [(x.double(), y) for x, y in domain_batch([4, 3, 5], seed)]
        with torch.no_grad():
            for p, q in zip(ref.parameters(), adam.params):
                p.copy_(q)
        grads = torch.autograd.grad(hand_losses(ref, batch, form, alpha, lam)[0], list(ref.parameters()))
        adam.step(list(grads))
        ens.update(batch)
    for (name, p), g, q in zip(ens.named_parameters(), grads, adam.params, strict=True):
        assert torch.allclose(p.grad, g, rtol=0, atol=1e-10), name
        assert torch.allclose(p.detach(), q, rtol=0, atol=1e-10), name


def test_paper_update_matches_hand_reimplementation():
    assert_update_matches_hand("paper")


def test_paper_update_without_agnostic_component_matches_hand_reimplementation():
    assert_update_matches_hand("paper", alpha=0.0)


def test_weighted_heads_update_matches_hand_reimplementation():
    assert_update_matches_hand("weighted_heads")


def test_paper_heads_are_source_specific_without_the_agnostic_component():
    """alpha = 0: head i's gradient comes only from domain i's examples; alpha > 0 adds every domain's."""
    batch = domain_batch([4, 3, 5])
    relabelled = [(x, (y + 1) % 3) if d == 0 else (x, y) for d, (x, y) in enumerate(batch)]

    def head_grads(alpha, b):
        ens = make(Ensemble, 3, alpha_agnostic=alpha)
        ens.update(b)
        return ens.heads.weight.grad

    own, changed = head_grads(0.0, batch), head_grads(0.0, relabelled)
    assert not torch.allclose(own[0], changed[0])
    assert torch.equal(own[1:], changed[1:])
    shared, shared_changed = head_grads(0.25, batch), head_grads(0.25, relabelled)
    assert not torch.allclose(shared[1], shared_changed[1])


def test_paper_predict_fuses_logits_with_the_predicted_domain_weights():
    alpha = 0.25
    ens = make(Ensemble, 3, alpha_agnostic=alpha)
    x = torch.randn(6, 4)
    with torch.no_grad():
        expected = []
        for xi in x:
            heads, g = head_scores(ens, xi)
            w = torch.exp(g - torch.logsumexp(g, 0))
            expected.append((1 - alpha) * sum(w[i] * heads[i] for i in range(3)) + alpha * sum(heads) / 3)
        assert torch.allclose(ens.predict(x), torch.stack(expected), atol=1e-6)


def test_weighted_heads_prediction_is_the_domain_weighted_mixture():
    ens = make(Ensemble, 3, ensemble_form="weighted_heads")
    x = torch.randn(6, 4)
    with torch.no_grad():
        z = ens.featurizer(x)
        w = F.softmax(ens.domain_classifier(z), dim=1)
        probs = F.softmax(ens.heads(z), dim=2)
        expected = (w.unsqueeze(2) * probs).sum(1)
        assert torch.allclose(ens.predict(x).exp(), expected, atol=1e-6)
        assert torch.allclose(expected.sum(1), torch.ones(6), atol=1e-6)


@pytest.mark.parametrize("form", ["paper", "weighted_heads"])
def test_one_training_domain_reduces_to_erm(form):
    erm, ens = make(ERM, 1), make(Ensemble, 1, ensemble_form=form)
    ens.featurizer.load_state_dict(erm.featurizer.state_dict())
    with torch.no_grad():
        ens.heads.weight[0].copy_(erm.classifier.weight)
        ens.heads.bias[0].copy_(erm.classifier.bias)
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    expected = erm.predict(x) if form == "paper" else F.log_softmax(erm.predict(x), dim=1)
    assert torch.allclose(ens.predict(x), expected, atol=1e-6)
    erm_loss = float(erm.update([(x, y)])["loss"])
    losses = ens.update([(x, y)])
    assert abs(float(losses["class_loss"]) - erm_loss) < 1e-6
    assert float(losses["domain_loss"]) == 0.0


def test_heads_are_one_stacked_parameter_evaluated_in_one_call():
    ens = make(Ensemble, 4)
    assert ens.heads.weight.shape == (4, 3, ens.featurizer.n_outputs)
    assert not any(isinstance(m, torch.nn.Linear) for m in ens.heads.modules())
    z = torch.randn(5, ens.featurizer.n_outputs)
    loop = torch.stack([F.linear(z, ens.heads.weight[d], ens.heads.bias[d]) for d in range(4)], dim=1)
    assert torch.allclose(ens.heads(z), loop, atol=1e-6)


def test_update_trains_the_domain_classifier_on_domain_indices():
    ens = make(Ensemble, 2, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    batch = [(torch.randn(16, 4, generator=g) + 4 * d, torch.randint(0, 3, (16,), generator=g)) for d in range(2)]
    first = float(ens.update(batch)["domain_loss"])
    for _ in range(30):
        last = float(ens.update(batch)["domain_loss"])
    assert last < 0.5 * first


def test_unknown_form_is_refused():
    with pytest.raises(UsageError, match=r"^hparam 'ensemble_form' = 'mixture' is invalid: it must be paper or "
                                         r"weighted_heads$"):
        make(Ensemble, 2, ensemble_form="mixture")


def test_nonlinear_heads_are_refused():
    with pytest.raises(UsageError, match="Ensemble's batched per-domain heads are linear: set hparam"):
        make(Ensemble, 2, nonlinear_classifier=True)
