"""Fresh classifiers fitted on a few-shot episode's support set only, and cosine-similarity logits.

Methods that score a frozen embedding by training a new head on each episode's labelled support examples
(Baseline, Baseline++, RFS) and cosine-similarity classifiers (Baseline++, Meta-Baseline) share these pieces:

- ``class_means``: the mean support embedding of each class (the prototypes).
- ``cosine_logits``: ``scale * cos(query, centre)`` with ``F.normalize``'s normalisation (Meta-Baseline).
- ``CosineHead`` and ``cosine_head_scale``: CloserLookFewShot's ``distLinear`` (Baseline++'s head).
- ``fit_support_head``: CloserLookFewShot's test-time fine-tuning loop of a new head on the support features.
- ``fit_logistic_regression``: sklearn's multinomial ``LogisticRegression`` objective solved by L-BFGS (RFS's
  test-time classifier, LastShot's logistic-regression teacher).

Every function takes its tensors' device and dtype from its inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: ``BaselineFinetune.set_forward_adaptation`` (wyharveychen/CloserLookFewShot ``methods/baselinefinetune.py``):
#: ``range(100)`` epochs over the support set in shuffled minibatches of ``batch_size = 4``, each a step of
#: ``torch.optim.SGD(lr = 0.01, momentum=0.9, dampening=0.9, weight_decay=0.001)`` on the cross-entropy
FINETUNE_EPOCHS = 100
FINETUNE_BATCH_SIZE = 4
FINETUNE_SGD = {"lr": 0.01, "momentum": 0.9, "dampening": 0.9, "weight_decay": 1e-3}
#: ``distLinear.forward`` divides the features by their norm plus this
COSINE_HEAD_EPS = 1e-5


def class_means(support_z: Tensor, support_y: Tensor, n_way: int) -> Tensor:
    """``[n_way, d]``: row ``k`` is the mean of the rows of ``support_z`` labelled ``k``."""
    one_hot = F.one_hot(support_y, n_way).to(support_z.dtype)
    return one_hot.t() @ support_z / one_hot.sum(0).unsqueeze(1)


def cosine_logits(query_z: Tensor, centres: Tensor, scale: Tensor | float) -> Tensor:
    """``scale * cos(q, c_k)`` for every query row ``q`` and centre row ``c_k`` (rows normalised by
    ``F.normalize``: divided by ``max(||v||, 1e-12)``)."""
    return scale * (F.normalize(query_z, dim=1) @ F.normalize(centres, dim=1).t())


def cosine_head_scale(n_classes: int) -> float:
    """``distLinear``'s fixed scale factor: 2 for at most 200 classes, else 10 (the official comment: Omniglot's
    thousands of classes need the larger one)."""
    return 2.0 if n_classes <= 200 else 10.0


class CosineHead(nn.Module):
    """CloserLookFewShot's ``distLinear`` (``backbone.py``), the head of Baseline++.

    ``s * (x / (||x|| + 1e-5)) . w_k`` for each class ``k``, with ``w_k = g_k v_k / ||v_k||`` weight-normalised
    per class (``WeightNorm.apply(self.L, 'weight', dim=0)`` on a bias-free ``nn.Linear``: direction ``v``,
    learnable norm ``g``; as the official comment says, the cosine is thereby multiplied by a class-wise learnable
    norm). ``v`` starts at ``nn.Linear``'s initialisation and ``g`` at its row norms, as ``WeightNorm`` does.
    """

    def __init__(self, in_features: int, out_features: int, scale: float):
        super().__init__()
        direction = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(direction, a=math.sqrt(5))  # nn.Linear's weight initialisation
        self.weight_v = nn.Parameter(direction)
        self.weight_g = nn.Parameter(direction.norm(dim=1, keepdim=True))
        self.scale = scale

    @property
    def weight(self) -> Tensor:
        """``g_k v_k / ||v_k||`` for every class ``k`` (rows)."""
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        x = x / (x.norm(dim=1, keepdim=True) + COSINE_HEAD_EPS)
        return self.scale * (x @ self.weight.t())


def fit_support_head(head: nn.Module, support_z: Tensor, support_y: Tensor, epochs: int = FINETUNE_EPOCHS,
                     batch_size: int = FINETUNE_BATCH_SIZE) -> nn.Module:
    """Train ``head`` (new, on ``support_z``'s device and dtype) on the support features alone, as
    ``BaselineFinetune`` does: ``epochs`` passes over a fresh random permutation of the support set (torch's
    global generator on ``support_z``'s device), minibatches of ``batch_size`` (the last one smaller), one step of
    ``FINETUNE_SGD`` on the mean cross-entropy of each. The features are fixed (detached). Returns ``head``."""
    optimizer = torch.optim.SGD(head.parameters(), **FINETUNE_SGD)
    z, n = support_z.detach(), len(support_z)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, device=z.device)
            for start in range(0, n, batch_size):
                take = order[start:start + batch_size]
                loss = F.cross_entropy(head(z[take]), support_y[take])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return head


def fit_logistic_regression(x: Tensor, y: Tensor, c: float) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression as sklearn's ``LogisticRegression(C=c)`` fits it: minimise
    ``c * sum_i CE(W x_i + b, y_i) + ||W||^2 / 2`` (intercept unpenalised), by L-BFGS in float64 (divided by
    ``c n``, the same minimiser; strong-Wolfe line search, at most 500 iterations, stopping at a gradient of
    1e-9 or a change of 1e-12: our settings, which reach an objective no higher than sklearn's; LastShot's
    official ``_kd_forward_lr`` runs sklearn's lbfgs with ``max_iter=10000``, RFS's ``eval/meta_eval.py`` with
    ``max_iter=1000``, both at the default ``tol=1e-4``). Returns ``W`` (classes x features) and ``b``."""
    x = x.double()
    n_classes = int(y.max()) + 1
    weight = torch.zeros(n_classes, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    solver = torch.optim.LBFGS([weight, bias], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                               line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        solver.zero_grad()
        loss = F.cross_entropy(x @ weight.t() + bias, y, reduction="mean") + weight.pow(2).sum() / (2 * c * len(x))
        loss.backward()
        return loss

    with torch.enable_grad():
        solver.step(closure)
    return weight.detach(), bias.detach()
