"""SelfReg: self-supervised contrastive regularisation between same-class examples, at feature and logit level."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dg_meta.algorithms.erm import ERM
from torch import Tensor, nn

from dg_meta.algorithm import Losses
from dg_meta.hparams import HParam
from dg_meta.registry import register_algorithm

#: weight of the feature-level terms and concentration of the Beta distribution of lam (DomainBed constants)
FEATURE_WEIGHT = 0.3
MIXUP_CONCENTRATION = 0.5


def class_partners(y: Tensor) -> tuple[Tensor, Tensor]:
    """Two random same-class pairings of the batch: index tensors ``(a, b)`` with ``y[a] == y[b] == y`` that
    are permutations within each class. Classes are visited in increasing order, each drawing
    ``torch.randperm(n_c)`` for ``a`` then for ``b`` (torch's global CPU RNG); returned on ``y``'s device."""
    labels = y.cpu()
    partners = torch.empty(2, len(labels), dtype=torch.long)
    for c in labels.unique().tolist():
        members = (labels == c).nonzero()[:, 0]
        for pairing in partners:
            pairing[members] = members[torch.randperm(len(members))]
    return partners[0].to(y.device), partners[1].to(y.device)


def projection_head(n_features: int) -> nn.Sequential:
    """DomainBed's class-specific domain perturbation layer ``cdpl``: three linear layers with batch norm,
    ``n -> h -> h -> n`` (ReLU after the first two), ``h = n`` for 2048 features (ResNet-50), else ``2n``."""
    hidden = n_features if n_features == 2048 else 2 * n_features
    return nn.Sequential(
        nn.Linear(n_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, n_features), nn.BatchNorm1d(n_features),
    )


@register_algorithm
class SelfReg(ERM):
    """Self-supervised contrastive regularisation (Kim, Yoo, Park, Kim, Lee, ICCV 2021), in DomainBed's form.

    On the pooled batch of all training domains, with features ``z = phi(x)``, projections ``r = cdpl(z)`` and
    logits ``o = w(z)``, every example ``i`` gets two random partners of its own class, ``a(i)`` and ``b(i)``
    (``class_partners``), and ``lam ~ Beta(0.5, 0.5)`` is drawn once per step. With ``MSE`` the mean squared
    error over all entries,

        ``L_ind = MSE(o, o_a) + 0.3 MSE(z, r_a)`` (individualised in-class regularisation),
        ``L_hdl = MSE(o, lam o_a + (1 - lam) o_b) + 0.3 MSE(z, lam r_a + (1 - lam) r_b)`` (mixup of the two),
        ``loss = CE(o, y) + c (lam L_ind + (1 - lam) L_hdl)``, ``c = min(CE(o, y), 1)`` held constant,

    and one Adam step (``lr``). Gradients flow through both sides of every squared error (the partners too).

    Follows DomainBed's ``SelfReg`` (``domainbed/algorithms.py``): the feature terms compare an example's features
    with its partners' projections, as the official code does (dnap512/SelfReg, ``codes/utils.py``). DomainBed's
    ``cdpl`` (``projection_head``) is left out of the optimizer, so it keeps its initial weights (DomainBed issue
    #62: the authors' DomainBed results were obtained so); its batch norms still use batch statistics;
    ``selfreg_train_cdpl=False`` reproduces that. The default ``True`` adds it to the Adam optimizer (``lr``): the
    official code trains its head with the rest of the network. DomainBed and this class leave out the official
    code's stochastic weight averaging and inter-domain curriculum. Departures from DomainBed: the batch is not
    sorted by label (every loss is a mean over examples, the featurizer treats examples independently and the head's
    batch statistics do not depend on the order, so only the pairing matters, and its distribution is the same: a
    uniform permutation within each class); ``lam`` is drawn with ``torch.distributions.Beta`` from torch's global
    RNG (checkpointed by the trainer), not numpy's; ``c`` is computed on the device (no host synchronisation). The
    weight 0.3 and Beta(0.5, 0.5) are constants of DomainBed and of the official code, not hparams (DomainBed's
    ``hparams_registry.py`` has no SelfReg entry).
    """

    HPARAMS = {
        "selfreg_train_cdpl": HParam(True, None, doc="also train the projection head cdpl (the official code); "
                                     "false: DomainBed's code, the head keeps its initial weights"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.cdpl = projection_head(self.featurizer.n_outputs)
        if hparams["selfreg_train_cdpl"]:
            self.optimizer.add_param_group({"params": list(self.cdpl.parameters())})
        else:
            self.cdpl.requires_grad_(False)

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        x = torch.cat([x for x, _ in batch])
        y = torch.cat([y for _, y in batch])
        concentration = torch.tensor(MIXUP_CONCENTRATION, dtype=torch.float64)
        lam = float(torch.distributions.Beta(concentration, concentration).sample())
        a, b = class_partners(y)
        features = self.featurizer(x)
        projections = self.cdpl(features)
        logits = self.classifier(features)
        mixed_logits = lam * logits[a] + (1 - lam) * logits[b]
        mixed_projections = lam * projections[a] + (1 - lam) * projections[b]
        individual = F.mse_loss(logits, logits[a]) + FEATURE_WEIGHT * F.mse_loss(features, projections[a])
        mixed = F.mse_loss(logits, mixed_logits) + FEATURE_WEIGHT * F.mse_loss(features, mixed_projections)
        class_loss = F.cross_entropy(logits, y)
        scale = class_loss.detach().clamp(max=1.0)
        loss = class_loss + scale * (lam * individual + (1 - lam) * mixed)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}
