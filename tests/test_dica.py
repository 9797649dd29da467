"""DICA: the generalized eigenproblem (against an independent scipy solution), lower distributional variance,
the stratified fit set, the fit and its standardisation, the training steps, the hparams, checkpointed fit."""

import copy
import io

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from conftest import run_cli
from dg_meta.algorithms.dica import DICA, dica_solve, stratified_subsample

from dg_meta.errors import UsageError
from dg_meta.hparams import declared_hparams, resolve
from dg_meta.kernels import distributional_variance_matrix, median_bandwidth, rbf_kernel

N, C, DOMAINS, LAM, EPS = 240, 4, 3, 1e-3, 1e-3


def shifted_domains():
    """Class information along dimension 0, a domain shift of 2 along dimensions 1-2."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, C, (N,), generator=g)
    d = torch.arange(N) % DOMAINS
    x = 0.5 * torch.randn(N, 5, generator=g, dtype=torch.float64)
    x[:, 0] += y
    x[:, 1:3] += 2.0 * d.unsqueeze(1)
    return x, y, d


def problem(supervised):
    x, y, d = shifted_domains()
    k = rbf_kernel(x, x, median_bandwidth(x))
    q = distributional_variance_matrix(d)
    rhs = k @ q @ k + k + LAM * torch.eye(N, dtype=k.dtype)
    phi = F.one_hot(y, C).double() if supervised else None
    if supervised:
        ell = phi @ phi.t()
        lhs = ell @ torch.linalg.inv(ell + N * EPS * torch.eye(N, dtype=k.dtype)) @ k @ k / N
    else:
        lhs = k @ k / N
    return k, d, q, lhs, rhs, phi


@pytest.mark.parametrize("supervised", [True, False])
def test_solution_satisfies_the_generalized_eigen_equation(supervised):
    k, d, _, lhs, rhs, phi = problem(supervised)
    b, gamma = dica_solve(k, d, 3, LAM, EPS, phi)
    assert b.shape == (N, 3) and torch.all(gamma[:-1] >= gamma[1:]) and gamma[-1] > 0
    residual = (lhs @ b - rhs @ b * gamma).norm(dim=0) / (rhs @ b * gamma).norm(dim=0)
    assert residual.max() < 1e-4
    assert torch.allclose((b * (rhs @ b)).sum(0), torch.ones(3, dtype=b.dtype))  # b^T C b = 1


def test_unsupervised_eigenvalues_are_the_top_of_the_full_spectrum():
    k, d, _, lhs, rhs, _ = problem(False)
    _, gamma = dica_solve(k, d, 4, LAM, EPS)
    full = torch.linalg.eigvals(torch.linalg.solve(rhs, lhs)).real.sort(descending=True).values
    assert torch.allclose(gamma, full[:4], rtol=1e-6)


def normalized_variance(features, q):
    """Distributional variance of the kernel ``Z Z^T`` over its total variance (scale-free)."""
    gram = features @ features.t()
    centre = torch.eye(len(gram), dtype=gram.dtype) - 1.0 / len(gram)
    return float((gram * q).sum() / (torch.trace(centre @ gram @ centre) / len(gram)))


@pytest.mark.parametrize("supervised", [True, False])
def test_transformed_domains_have_lower_distributional_variance(supervised):
    k, d, q, _, _, phi = problem(supervised)
    b, _ = dica_solve(k, d, 3, LAM, EPS, phi)
    dica = normalized_variance(k @ b, q)
    identity = normalized_variance(k, q)  # B = I: the untransformed kernel
    assert dica < identity
    if supervised:
        assert dica < 0.05 * identity


def test_supervised_components_are_capped_at_the_number_of_classes():
    k, d, _, _, _, phi = problem(True)
    b, gamma = dica_solve(k, d, 10, LAM, EPS, phi)
    assert b.shape == (N, C) and gamma.shape == (C,)


def test_stratified_subsample_balances_domain_class_cells():
    d = torch.tensor([0] * 50 + [1] * 30 + [2] * 6)
    y = torch.arange(86) % 2
    torch.manual_seed(0)
    keep = stratified_subsample(d, y, 30)
    assert len(keep) == 30 and len(set(keep.tolist())) == 30
    counts = torch.bincount(d[keep] * 2 + y[keep], minlength=6)
    assert counts.tolist() == [6, 6, 6, 6, 3, 3]  # the small domain's cells are exhausted first
    assert len(stratified_subsample(d, y, 1000)) == 86


def make_dica(**overrides):
    hp = resolve(declared_hparams(DICA), overrides={"fit_batches": 3, "n_fit": 40, **overrides})
    return DICA((1, 4, 4), 3, 2, {**hp, "mlp_width": 8})


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(8, 1, 4, 4, generator=g) + i, torch.randint(0, 3, (8,), generator=g)) for i in range(2)]


def test_fit_happens_after_fit_batches_and_uses_at_most_n_fit_points():
    algo = make_dica()
    assert algo.update(batch(0)) == {} and algo.update(batch(0)) == {}  # a repeated batch adds nothing
    assert len(algo.pool_x) == 16 and not algo.fitted
    assert torch.equal(algo.embed(torch.rand(2, 1, 4, 4)), torch.zeros(2, 3))  # constant prediction
    losses = algo.update(batch(1))
    assert algo.fitted and len(algo.fit_points) == 32 and len(algo.pool_x) == 0 and "loss" in losses
    assert algo.projection.shape == (32, 3) and algo.embed(torch.rand(5, 1, 4, 4)).shape == (5, 3)


def test_frozen_featurizer_variant_keeps_the_featurizer_fixed():
    torch.manual_seed(0)
    algo = make_dica(dica_input="featurizer", supervised=False, n_components=4)
    frozen = [p.clone() for p in algo.frozen.parameters()]
    for seed in range(5):
        algo.update(batch(seed))
    assert algo.fitted and algo.fit_points.shape[1] == algo.frozen.n_outputs and algo.projection.shape[1] == 4
    assert all(torch.equal(a, b) for a, b in zip(frozen, algo.frozen.parameters()))


@pytest.mark.parametrize("stop_after", [1, 4])  # mid-collection and after the fit
def test_resume_from_checkpoint_equals_uninterrupted(stop_after):
    batches = [batch(seed) for seed in range(6)]
    torch.manual_seed(0)
    straight = make_dica()
    for b in batches:
        straight.update(b)
    torch.manual_seed(0)
    first = make_dica()
    for b in batches[:stop_after]:
        first.update(b)
    buffer = io.BytesIO()
    torch.save({"algo": first.checkpoint_state(), "rng": torch.get_rng_state()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = make_dica()
    resumed.load_checkpoint_state(state["algo"])
    torch.set_rng_state(state["rng"])
    for b in batches[stop_after:]:
        resumed.update(b)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_dica_trains_through_the_cli_and_beats_chance(tmp_path):
    proc = run_cli("--algorithm", "DICA", "--steps", "30", "--checkpoint-freq", "15",
                   "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    acc = float(proc.stdout.split("0° test ")[1].split("%")[0])
    assert acc > 20.0


def reference_dica(k, domains, m, lam, eps, labels=None):
    """Independent numpy/scipy solution of DICA's generalized eigenproblem (Muandet et al. 2013, Algorithm 1):
    ``(1/n) L (L + n eps I)^-1 K^2 b = gamma (K Q K + K + lam I) b``, top ``m``, scaled to ``b^T C b = 1``."""
    k, domains = k.numpy(), domains.numpy()
    n = len(k)
    groups = np.unique(domains)
    size = {g: int((domains == g).sum()) for g in groups}
    q = np.empty((n, n))
    for a in range(n):  # tr(K Q) = (1/N) sum_i G_ii - (1/N^2) sum_ij G_ij, G_ij = mean over domains i, j of k
        for b in range(n):
            da, db = domains[a], domains[b]
            q[a, b] = ((da == db) / len(groups) - 1 / len(groups) ** 2) / (size[da] * size[db])
    rhs = k @ q @ k + k + lam * np.eye(n)
    lhs = k @ k / n
    if labels is not None:
        ell = (labels.numpy()[:, None] == labels.numpy()[None, :]).astype(float)
        lhs = ell @ np.linalg.inv(ell + n * eps * np.eye(n)) @ lhs
    values, vectors = scipy.linalg.eig(lhs, rhs)
    order = np.argsort(-values.real)[:m]
    b = vectors.real[:, order]
    b /= np.sqrt(np.einsum("im,ij,jm->m", b, rhs, b))
    return torch.from_numpy(b), torch.from_numpy(values.real[order])


def same_up_to_sign(a, b, rtol=1e-6):
    """Column-wise equality of two eigenvector matrices up to each column's sign."""
    b = b * torch.sign((a * b).sum(0))
    return torch.allclose(a, b.to(a.dtype), rtol=rtol, atol=rtol * float(b.abs().max()))


def tiny_problem():
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 2, 1])
    d = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    x = torch.randn(12, 2, generator=g, dtype=torch.float64) + torch.stack([y, d], 1)
    return rbf_kernel(x, x, 1.5), y, d


@pytest.mark.parametrize("supervised", [True, False])
def test_dica_solve_matches_an_independent_scipy_solution(supervised):
    k, y, d = tiny_problem()
    lam, eps, m = 0.3, 0.2, (2 if supervised else 4)  # large enough that a wrong lam or eps shows
    labels = y if supervised else None
    b, gamma = dica_solve(k, d, m, lam, eps, F.one_hot(y).double() if supervised else None)
    b_ref, gamma_ref = reference_dica(k, d, m, lam, eps, labels)
    assert torch.allclose(gamma, gamma_ref, rtol=1e-8) and gamma[0] > gamma[1]
    assert same_up_to_sign(b, b_ref)


def reference_subsample(domains, labels, n_max, seed):
    """Round-robin over the (domain, class) cells, each cell in the order of one ``randperm``."""
    torch.manual_seed(seed)
    perm = torch.randperm(len(labels)).tolist()
    seen, keyed = {}, []
    for position, index in enumerate(perm):
        cell = (int(domains[index]), int(labels[index]))
        seen[cell] = seen.get(cell, 0) + 1
        keyed.append((seen[cell], position, index))
    return [index for _, _, index in sorted(keyed)][:n_max]


@pytest.mark.parametrize("n_max", [50, 500])
def test_stratified_subsample_equals_a_plain_round_robin(n_max):
    g = torch.Generator().manual_seed(2)
    d = torch.randint(0, 3, (150,), generator=g) * torch.randint(0, 2, (150,), generator=g)  # domain 0 largest
    y = torch.randint(0, 3, (150,), generator=g)
    torch.manual_seed(5)
    assert stratified_subsample(d, y, n_max).tolist() == reference_subsample(d, y, n_max, 5)


def test_hparam_defaults_and_search_space():
    declared = declared_hparams(DICA)
    assert {name: declared[name].default for name in DICA.HPARAMS} == {
        "lr": 1e-2, "n_fit": 2000, "fit_batches": 10, "n_components": 10, "supervised": True,
        "dica_lambda": 1e-3, "dica_eps": 1e-3, "dica_input": "input"}
    rng = np.random.default_rng(0)
    draws = {name: [hp.sample(rng) for _ in range(300)] for name, hp in DICA.HPARAMS.items()}
    for name, low, high in [("lr", 1e-3, 1e-1), ("dica_lambda", 1e-5, 1.0), ("dica_eps", 1e-5, 1.0)]:
        values = np.log10(draws[name])
        assert low <= 10 ** values.min() < 2 * low and high / 2 < 10 ** values.max() <= high, name
    assert set(draws["n_fit"]) == {500, 1000, 2000} and set(draws["fit_batches"]) == {5, 10, 20}
    assert set(draws["n_components"]) == {5, 10, 20, 50} and set(draws["supervised"]) == {True, False}
    assert set(draws["dica_input"]) == {"input", "featurizer"}


@pytest.mark.parametrize("name, value, message", [
    ("dica_input", "pixels", "hparam 'dica_input' = 'pixels' is invalid: it must be 'input' or 'featurizer'"),
    ("n_fit", 1, "hparam 'n_fit' = 1 is invalid: it must be an integer >= 2"),
])
def test_invalid_hparams_are_refused(name, value, message):
    with pytest.raises(UsageError) as info:
        resolve(declared_hparams(DICA), overrides={name: value})
    assert str(info.value) == message
    assert resolve(declared_hparams(DICA), overrides={"n_fit": 2})["n_fit"] == 2


def test_fresh_model_holds_empty_fit_buffers():
    algo = make_dica()
    shapes = {name: tuple(getattr(algo, name).shape) for name in DICA._FIT_BUFFERS}
    assert shapes == {"pool_x": (0, 16), "pool_y": (0,), "pool_d": (0,), "fit_points": (0, 16),
                      "projection": (0, 3), "feature_mean": (3,), "feature_std": (3,)}
    assert int(algo.batches_seen) == 0 and float(algo.bandwidth) == 1.0 and algo.frozen is None
    x = torch.rand(4, 1, 4, 4)
    assert torch.equal(algo.predict(x), algo.classifier.bias.expand(4, 3))  # zero features before the fit


def test_fit_solves_dica_on_the_pool_with_the_classes_present():
    """Class 2 absent, class 1 seen once: two DICA components, the third feature padded with zeros."""
    algo = make_dica(fit_batches=1, n_components=5, dica_lambda=0.2, dica_eps=0.05)
    g = torch.Generator().manual_seed(3)
    xs = [torch.rand(6, 1, 4, 4, generator=g) + i for i in range(2)]
    ys = [torch.tensor([0, 0, 1, 0, 0, 0]), torch.zeros(6, dtype=torch.long)]
    algo.update(list(zip(xs, ys)))
    assert algo.fitted and len(algo.pool_x) == len(algo.pool_y) == len(algo.pool_d) == 0
    flat = torch.cat(xs).flatten(1)
    source = (algo.fit_points.unsqueeze(1) == flat.unsqueeze(0)).all(2).int().argmax(1)
    assert torch.equal(flat[source], algo.fit_points) and sorted(source.tolist()) == list(range(12))
    points = algo.fit_points.double()
    bandwidth = median_bandwidth(points)
    gram = rbf_kernel(points, points, bandwidth)
    b_ref, _ = reference_dica(gram, source // 6, 2, 0.2, 0.05, torch.cat(ys)[source])
    assert float(algo.bandwidth) == pytest.approx(float(bandwidth), rel=1e-6)
    assert same_up_to_sign(algo.projection[:, :2].double(), b_ref, rtol=1e-4)
    assert torch.equal(algo.projection[:, 2], torch.zeros(12))
    features = algo.embed(torch.cat(xs)).double()  # the fit set standardised: mean 0, deviation 1
    assert torch.allclose(features[:, :2].mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(features[:, :2].std(0), torch.ones(2, dtype=torch.float64), atol=1e-5)
    assert torch.equal(features[:, 2], torch.zeros(12, dtype=torch.float64))
    z = gram @ algo.projection.double()
    assert torch.allclose(algo.feature_mean.double(), z.mean(0), atol=1e-6)


def test_training_steps_are_adam_steps_on_the_frozen_dica_features():
    torch.manual_seed(0)
    algo = make_dica(weight_decay=1e-2)
    algo.update(batch(0))
    algo.update(batch(1))
    head = copy.deepcopy(algo.classifier)
    adam = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-2)
    for seed in (2, 3):  # the first of these batches also completes the fit
        losses = algo.update(batch(seed))
        x = torch.cat([x for x, _ in batch(seed)])
        y = torch.cat([y for _, y in batch(seed)])
        loss = F.cross_entropy(head(algo.embed(x)), y)
        assert float(losses["loss"]) == pytest.approx(float(loss.detach()), rel=1e-6)
        adam.zero_grad()
        loss.backward()
        adam.step()
        for a, b in zip(algo.classifier.parameters(), head.parameters()):
            assert torch.allclose(a, b, atol=1e-7)
        assert torch.equal(algo.predict(x), algo.classifier(algo.embed(x)))


def test_frozen_featurizer_is_evaluated_in_eval_mode_without_gradients():
    hp = resolve(declared_hparams(DICA), overrides={"dica_input": "featurizer", "fit_batches": 1})
    algo = DICA((6,), 3, 2, {**hp, "mlp_width": 8, "mlp_dropout": 0.5})
    assert not any(p.requires_grad for p in algo.frozen.parameters())
    x = torch.randn(5, 6)
    algo.frozen.train()
    assert torch.equal(algo.points(x), algo.points(x)) and not algo.frozen.training
    assert torch.equal(algo.points(x), algo.frozen(x))
