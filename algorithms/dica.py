"""DICA: Domain-Invariant Component Analysis (Muandet, Balduzzi & Schölkopf, ICML 2013).

``dica_solve`` is the kernel eigenproblem; the ``DICA`` algorithm fits it once on a stratified subsample
of the training data gathered from its first update batches, then trains a softmax classifier on the
DICA features ``k(x, X_fit) B`` with the usual minibatches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dg_meta.algorithm import Algorithm, Losses
from dg_meta.hparams import HParam, choice, log_uniform, positive
from dg_meta.kernels import distributional_variance_matrix, median_bandwidth, rbf_kernel
from dg_meta.networks import classifier, featurizer_for
from dg_meta.registry import register_algorithm


def _is_input_or_featurizer(value: str) -> bool:
    return value in ("input", "featurizer")


def _at_least_two(value: int) -> bool:
    return value >= 2


def dica_solve(gram: Tensor, domains: Tensor, n_components: int, lam: float, eps: float,
               labels_onehot: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Solve DICA's generalized eigenproblem and return ``(B, gamma)``: the top ``n_components``
    eigenvectors (columns of the ``n x M`` matrix ``B``) and their eigenvalues, in decreasing order.

    Supervised (``labels_onehot`` = ``Phi``, output kernel ``L = Phi Phi^T``):
    ``(1/n) L (L + n eps I)^-1 K^2 B = (K Q K + K + lam I) B Gamma``; unsupervised: ``(1/n) K^2 B = ...``.
    The right-hand matrix ``C`` is symmetric positive definite: with its Cholesky factor ``C = R R^T`` the
    unsupervised problem becomes the symmetric ``R^-1 (K^2/n) R^-T u = gamma u``, ``B = R^-T U`` (``B^T C B = I``).
    The supervised left-hand side is not symmetric but has rank ``<= c`` (the columns of ``Phi``): by the
    push-through identity ``L (L + n eps I)^-1 = Phi (Phi^T Phi + n eps I)^-1 Phi^T``, every eigenvector with
    ``gamma != 0`` is ``b = C^-1 Phi w`` where ``w`` solves the ``c x c`` problem
    ``(1/n) (Phi^T Phi + n eps I)^-1 Phi^T K^2 C^-1 Phi w = gamma w``; so ``n_components`` is capped at ``c``
    and each ``b`` is scaled to ``b^T C b = 1``. Computed in float64.
    """
    k = gram.to(torch.float64)
    n = k.shape[0]
    eye = torch.eye(n, dtype=k.dtype, device=k.device)
    q = distributional_variance_matrix(domains).to(k.device)
    c_mat = k @ q @ k + k + lam * eye
    chol = torch.linalg.cholesky(0.5 * (c_mat + c_mat.t()))
    if labels_onehot is None:
        r_inv_k = torch.linalg.solve_triangular(chol, k, upper=False)
        gamma, u = torch.linalg.eigh(r_inv_k @ r_inv_k.t() / n)
        gamma, u = gamma.flip(0)[:n_components], u.flip(1)[:, :n_components]
        return torch.linalg.solve_triangular(chol.t(), u, upper=True), gamma
    phi = labels_onehot.to(k)
    c_inv_phi = torch.cholesky_solve(phi, chol)
    gram_phi = phi.t() @ phi + n * eps * torch.eye(phi.shape[1], dtype=k.dtype, device=k.device)
    small = torch.linalg.solve(gram_phi, phi.t() @ (k @ (k @ c_inv_phi))) / n
    values, vectors = torch.linalg.eig(small)
    order = values.real.argsort(descending=True)[:n_components]
    gamma, w = values.real[order], vectors.real[:, order]
    b = c_inv_phi @ w
    return b / (b * (c_mat @ b)).sum(0).sqrt(), gamma


def stratified_subsample(domains: Tensor, labels: Tensor, n_max: int) -> Tensor:
    """Indices of at most ``n_max`` examples drawn round-robin over the (domain, class) cells in a random
    order (global torch RNG), so every cell is represented as evenly as its size allows."""
    n = len(labels)
    perm = torch.randperm(n, device=labels.device)
    cell = (domains * (int(labels.max()) + 1) + labels)[perm]
    by_cell = cell.argsort(stable=True)
    sorted_cells = cell[by_cell]
    first = torch.searchsorted(sorted_cells, sorted_cells, side="left")
    rank = torch.empty_like(by_cell)
    rank[by_cell] = torch.arange(n, device=labels.device) - first
    return perm[rank.argsort(stable=True)[:n_max]]


@register_algorithm
class DICA(Algorithm):
    """Domain-Invariant Component Analysis (Muandet, Balduzzi & Schölkopf, ICML 2013).

    With the RBF Gram matrix ``K`` of the fit set (median-heuristic bandwidth), the label delta kernel
    ``L``, and ``Q`` such that ``tr(K Q)`` is the distributional variance across the training domains, DICA
    maximises ``tr(B^T (1/n) L (L + n eps I)^-1 K^2 B) / tr(B^T (K Q K + K + lam I) B)``, whose solution is
    the top-``M`` eigenvectors of ``(1/n) L (L + n eps I)^-1 K^2 B = (K Q K + K + lam I) B Gamma``
    (unsupervised variant: ``(1/n) K^2`` on the left); see ``dica_solve``. A new point's features are
    ``k(x, X_fit) B`` (the paper's transformed kernel is ``K B B^T K``), standardised with the fit set's mean
    and deviation. Fit set: the first ``fit_batches`` update batches are pooled (duplicates dropped), and a
    stratified subsample of at most ``n_fit`` examples over (domain, class) cells is kept; those steps
    only collect. Then a softmax classifier on the frozen DICA features is trained with Adam on each batch.
    ``dica_input="featurizer"`` computes the kernel on a frozen, randomly initialised featurizer's output
    instead of the raw input. The defaults ``lam = eps = 1e-3`` are ours, not
    the paper's; the fit (points, ``B``, bandwidth, standardisation) is kept in buffers. The paper
    fits its classifier (an SVM) to convergence; this convex softmax problem on M standardised features
    gets a larger default learning rate (1e-2) so that it converges within a usual step budget.
    """

    HPARAMS = {
        "lr": HParam(1e-2, log_uniform(-3, -1), positive, "positive",
                     "Adam learning rate of the softmax classifier on the (fixed, standardised) DICA features"),
        "n_fit": HParam(2000, choice([500, 1000, 2000]), _at_least_two, "an integer >= 2",
                        "maximum size of the kernel fit set (the features are standardised by its deviation)"),
        "fit_batches": HParam(10, choice([5, 10, 20]), positive, "a positive integer",
                              "update batches pooled into the fit set before solving"),
        "n_components": HParam(10, choice([5, 10, 20, 50]), positive, "a positive integer",
                               "DICA dimensions M (supervised: at most the number of classes)"),
        "supervised": HParam(True, choice([True, False]), doc="supervised DICA (label kernel) or unsupervised"),
        "dica_lambda": HParam(1e-3, log_uniform(-5, 0), positive, "positive", "lambda: regulariser of tr(B^T B)"),
        "dica_eps": HParam(1e-3, log_uniform(-5, 0), positive, "positive", "eps: conditional-operator ridge"),
        "dica_input": HParam("input", choice(["input", "featurizer"]), _is_input_or_featurizer,
                             "'input' or 'featurizer'", "kernel on the raw input or on a frozen random featurizer"),
    }
    _FIT_BUFFERS = ("pool_x", "pool_y", "pool_d", "fit_points", "projection", "feature_mean", "feature_std")

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.n_features = min(hparams["n_components"], num_classes) if hparams["supervised"] \
            else hparams["n_components"]
        self.frozen = None
        if hparams["dica_input"] == "featurizer":
            self.frozen = featurizer_for(self.input_shape, hparams).requires_grad_(False)
        point_dim = self.frozen.n_outputs if self.frozen is not None else math.prod(self.input_shape)
        self.register_buffer("pool_x", torch.zeros(0, point_dim))
        self.register_buffer("pool_y", torch.zeros(0, dtype=torch.long))
        self.register_buffer("pool_d", torch.zeros(0, dtype=torch.long))
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("fit_points", torch.zeros(0, point_dim))
        self.register_buffer("projection", torch.zeros(0, self.n_features))
        self.register_buffer("bandwidth", torch.ones(()))
        self.register_buffer("feature_mean", torch.zeros(self.n_features))
        self.register_buffer("feature_std", torch.ones(self.n_features))
        self.classifier = classifier(self.n_features, num_classes, hparams["nonlinear_classifier"])
        self.optimizer = torch.optim.Adam(self.classifier.parameters(), lr=hparams["lr"],
                                          weight_decay=hparams["weight_decay"])

    @property
    def fitted(self) -> bool:
        return len(self.projection) > 0

    def points(self, x: Tensor) -> Tensor:
        """What the kernel sees: flattened inputs, or the frozen featurizer's output (eval mode)."""
        if self.frozen is None:
            return x.flatten(1)
        with torch.no_grad():
            self.frozen.eval()
            return self.frozen(x)

    def _raw_features(self, points: Tensor) -> Tensor:
        return rbf_kernel(points, self.fit_points, self.bandwidth) @ self.projection

    def embed(self, x: Tensor) -> Tensor:
        """The standardised DICA features ``k(x, X_fit) B`` (zeros before the fit)."""
        if not self.fitted:
            return x.new_zeros(len(x), self.n_features)
        return (self._raw_features(self.points(x)) - self.feature_mean) / self.feature_std

    def _collect(self, batch: list[tuple[Tensor, Tensor]]) -> None:
        xs = [self.points(x) for x, _ in batch]
        ys = [y for _, y in batch]
        ds = [torch.full_like(y, i) for i, (_, y) in enumerate(batch)]
        x, y, d = torch.cat([self.pool_x, *xs]), torch.cat([self.pool_y, *ys]), torch.cat([self.pool_d, *ds])
        keys = torch.cat([x, d.unsqueeze(1).to(x.dtype)], 1)
        _, inverse = torch.unique(keys, dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), len(x), device=x.device, dtype=torch.long)
        first = first.scatter_reduce(0, inverse, torch.arange(len(x), device=x.device), "amin").sort().values
        self.pool_x, self.pool_y, self.pool_d = x[first], y[first], d[first]
        self.batches_seen += 1

    def fit(self) -> None:
        """Solve DICA on a stratified subsample of the pooled examples and freeze the result in buffers."""
        keep = stratified_subsample(self.pool_d, self.pool_y, self.hparams["n_fit"])
        points, y, d = self.pool_x[keep], self.pool_y[keep], self.pool_d[keep]
        bandwidth = median_bandwidth(points.double())
        gram = rbf_kernel(points.double(), points.double(), bandwidth)
        onehot = F.one_hot(y, self.num_classes)[:, torch.bincount(y, minlength=self.num_classes) > 0] \
            if self.hparams["supervised"] else None
        b, _ = dica_solve(gram, d, self.n_features, self.hparams["dica_lambda"], self.hparams["dica_eps"], onehot)
        if b.shape[1] < self.n_features:
            b = torch.cat([b, b.new_zeros(len(b), self.n_features - b.shape[1])], 1)
        z = gram @ b
        dtype = self.pool_x.dtype
        self.fit_points, self.projection, self.bandwidth = points, b.to(dtype), bandwidth.to(dtype)
        self.feature_mean = z.mean(0).to(dtype)
        self.feature_std = z.std(0).clamp_min(1e-12).to(dtype)
        empty = self.pool_x[:0]
        self.pool_x, self.pool_y, self.pool_d = empty, self.pool_y[:0], self.pool_d[:0]

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        if not self.fitted:
            self._collect(batch)
            if int(self.batches_seen) < self.hparams["fit_batches"]:
                return {}
            self.fit()
        x = torch.cat([x for x, _ in batch])
        y = torch.cat([y for _, y in batch])
        loss = F.cross_entropy(self.classifier(self.embed(x)), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}

    def predict(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))

    def load_checkpoint_state(self, state: dict) -> None:
        for name in self._FIT_BUFFERS:
            setattr(self, name, torch.empty_like(state["model"][name], device=getattr(self, name).device))
        super().load_checkpoint_state(state)
