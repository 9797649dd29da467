"""ADRMX: additive disentanglement of domain features from label features, with a remix loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dg_meta.adversarial import discriminator_turn, domain_discriminator
from dg_meta.algorithm import Algorithm, Losses
from dg_meta.hparams import HParam, choice, positive
from dg_meta.networks import classifier, featurizer_for
from dg_meta.registry import register_algorithm

#: the in-domain weight and the temperature of DomainBed's ``SupConLossLambda(lamda=0.5)``
SUPCON_LAMBDA = 0.5
SUPCON_TEMPERATURE = 0.07
#: the constant DomainBed adds to the denominator and to the fraction before its log
SUPCON_EPS = 1e-5


def supcon_lambda_loss(features: Tensor, y: Tensor, d: Tensor, lam: float = SUPCON_LAMBDA,
                       temperature: float = SUPCON_TEMPERATURE) -> Tensor:
    """DomainBed's ``SupConLossLambda``: a supervised contrastive loss whose terms weigh examples of the
    anchor's domain by ``lam`` and of other domains by ``1 - lam``.

    With ``f`` the L2-normalised features, ``e_ij = w_ij exp(f_i . f_j / temperature)`` (``w_ij = lam`` if
    ``d_j = d_i`` else ``1 - lam``), ``P_i`` the other examples of ``i``'s class and
    ``l_i = (1/|P_i|) sum_{j in P_i} log(e_ij / (sum_{k != i} e_ik + 1e-5) + 1e-5)``, the loss is
    ``-sum_i l_i / (m + 1)`` over the ``m`` anchors with ``P_i`` not empty (the ``+ 1`` is DomainBed's).
    """
    f = F.normalize(features, dim=1)
    n = len(f)
    others = ~torch.eye(n, dtype=torch.bool, device=f.device)
    weights = torch.where(d.unsqueeze(1) == d.unsqueeze(0), lam, 1 - lam)
    scaled = weights * torch.exp(f @ f.t() / temperature)
    denominator = (scaled * others).sum(1, keepdim=True) + SUPCON_EPS
    log_fraction = torch.log(scaled / denominator + SUPCON_EPS)
    positives = (y.unsqueeze(1) == y.unsqueeze(0)) & others
    count = positives.sum(1)
    per_anchor = torch.where(positives, log_fraction, torch.zeros_like(log_fraction)).sum(1) / count.clamp(min=1)
    return -per_anchor.sum() / ((count > 0).sum() + 1)


def remix_pairs(y: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """DomainBed's remix draw: for every class ``c`` with ``n_c`` examples in the batch, two distinct positions
    ``(first_c, second_c)`` uniformly at random in ``0 .. n_c - 1`` of the pooled batch (DomainBed's
    ``torch.randperm(n_c)[:2]``, used as batch positions), and whether ``n_c >= 2``. Drawn from torch's global
    generator of ``y``'s device, without reading the counts back to the host."""
    n = len(y)
    counts = torch.bincount(y, minlength=num_classes)
    keys = torch.rand(num_classes, n, device=y.device)
    keys = keys.masked_fill(torch.arange(n, device=y.device) >= counts.unsqueeze(1), -1.0)
    first, second = keys.topk(2, dim=1).indices.unbind(1)
    return first, second, counts >= 2


@register_algorithm
class ADRMX(Algorithm):
    """ADRMX (Demirel, Aptoula, Ozkan, "ADRMX: Additive Disentanglement of Domain Features with Remix Loss",
    arXiv 2308.06624, 2023), as DomainBed's ``ADRMX`` (``domainbed/algorithms.py``; the authors' code,
    github.com/berkerdemirel/ADRMX, is the same class).

    A label featurizer ``f_l`` and a domain featurizer ``f_d`` split the features additively: ``f_l(x) =
    z + f_d(x)`` with ``z = f_l(x) - f_d(x)`` the domain-invariant part. A discriminator ``D`` (DomainBed's MLP:
    ``mlp_width``, ``mlp_depth``, ``mlp_dropout``) predicts the domain from ``z``; three DomainBed nonlinear
    heads (``n -> n/2 -> n/4 -> out``) predict the class from ``f_l`` (``c_1``, the predictor) and from ``z``
    (``c_2``) and the domain from ``f_d`` (``c_d``). Update number ``t`` (counted from 1) is a discriminator
    turn when ``t mod (1 + k) < k`` (``k = d_steps_per_g_step``, ``dg_meta.adversarial.discriminator_turn``):

    - discriminator turn: an Adam step of ``D`` alone on ``L_disc = CE(D(z), d)``;
    - otherwise an Adam step of ``f_l, f_d, c_1, c_2, c_d`` on ``CE(c_1(f_l), y) + CE(c_2(z), y) +
      dclf_lambda CE(c_d(f_d), d) + rmxd_lambda L_remix + cnt_lambda (S(f_l) + S(z)) - disc_lambda L_disc``,
      ``S`` DomainBed's ``SupConLossLambda`` (``supcon_lambda_loss``) and ``L_remix = (1/C) sum_c
      CE(c_1(z_a + f_d(x_b)), y_a)`` over the classes ``c`` with at least two examples in the batch, ``(a,
      b)`` drawn by ``remix_pairs``: the invariant part of one example plus the domain part of another must
      still give ``a``'s class.

    Both Adams have ``lr`` and betas ``(beta1, 0.9)`` and no weight decay (hparams ``weight_decay`` and
    ``nonlinear_classifier`` are not used, as in DomainBed). ``predict`` is ``c_1(f_l(x))``; the few-shot
    ``embed`` is ``f_l``. The update count is part of the checkpoint.

    Departure of DomainBed (and the authors' code) from the paper, followed here: the paper (and DomainBed's
    comment) remixes two examples of the same class from different domains; DomainBed draws ``idx1, idx2 =
    randperm(n_c)[:2]`` and uses them as positions in the whole pooled batch, so ``a`` and ``b`` are two
    distinct examples among the first ``n_c`` of the batch, of any class and domain (the target is ``a``'s own
    label). Departures from DomainBed, none changing a result: the pairs come from random keys and a top-2 (the
    distribution of ``randperm``'s first two, not the same draws) and go through ``c_1`` in one batch (DomainBed
    loops over the classes); the discriminator turn computes the features without a gradient (DomainBed's
    featurizer gradients from that turn are zeroed before they are used).

    Hparams (DomainBed's ``hparams_registry.py``): ``lr`` 3e-3, random search one of 5e-4, 1e-3, 2e-3, 3e-3
    (its small-image value; 3e-5 and one of 2e-5, 3e-5, 4e-5, 5e-5 for other datasets); ``mlp_depth`` 9, one of
    8, 9, 10; fixed by random search: ``cnt_lambda`` 1, ``dclf_lambda`` 1, ``disc_lambda`` 0.75,
    ``rmxd_lambda`` 1, ``d_steps_per_g_step`` 2, ``beta1`` 0.5, ``mlp_width`` 256, ``mlp_dropout`` 0.
    """

    HPARAMS = {
        "lr": HParam(3e-3, choice([5e-4, 1e-3, 2e-3, 3e-3]), positive, "positive",
                     "learning rate of both Adams (DomainBed's non-small-image default: 3e-5)"),
        "cnt_lambda": HParam(1.0, None, doc="weight of the two contrastive losses"),
        "dclf_lambda": HParam(1.0, None, doc="weight of the domain classifier's cross-entropy"),
        "disc_lambda": HParam(0.75, None, doc="weight of the discriminator loss the featurizers maximise"),
        "rmxd_lambda": HParam(1.0, None, doc="weight of the remix loss"),
        "d_steps_per_g_step": HParam(2, None, positive, "a positive integer",
                                     "discriminator updates per featurizer update"),
        "beta1": HParam(0.5, None, lambda v: 0 <= v < 1, "in [0, 1)", "Adam's beta1 (beta2 is 0.9)"),
        "mlp_width": HParam(256, None, positive, "a positive integer",
                            "width of the discriminator MLP (and of the MLP featurizers of vector inputs)"),
        "mlp_depth": HParam(9, choice([8, 9, 10]), lambda v: v >= 2, "an integer >= 2",
                            "linear layers of the discriminator MLP (and of the MLP featurizers of vector inputs)"),
        "mlp_dropout": HParam(0.0, None, lambda v: 0 <= v < 1, "in [0, 1)",
                              "dropout of the discriminator MLP (and of the MLP featurizers of vector inputs)"),
    }
    compile_modules = ("featurizer_label", "featurizer_domain", "discriminator", "classifier_label_1",
                       "classifier_label_2", "classifier_domain")

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer_label = featurizer_for(self.input_shape, hparams)
        self.featurizer_domain = featurizer_for(self.input_shape, hparams)
        width = self.featurizer_label.n_outputs
        self.discriminator = domain_discriminator(width, num_domains, hparams)
        self.classifier_label_1 = classifier(width, num_classes, nonlinear=True)
        self.classifier_label_2 = classifier(width, num_classes, nonlinear=True)
        self.classifier_domain = classifier(width, num_domains, nonlinear=True)
        self.network = torch.nn.Sequential(self.featurizer_label, self.classifier_label_1)
        betas = (hparams["beta1"], 0.9)
        self.disc_opt = torch.optim.Adam(self.discriminator.parameters(), lr=hparams["lr"], betas=betas)
        generator = [self.featurizer_label, self.featurizer_domain, self.classifier_label_1,
                     self.classifier_label_2, self.classifier_domain]
        self.opt = torch.optim.Adam([p for m in generator for p in m.parameters()], lr=hparams["lr"], betas=betas)
        self.update_count = 0

    def get_extra_state(self) -> Any:
        return {"update_count": self.update_count}

    def set_extra_state(self, state: Any) -> None:
        self.update_count = int(state["update_count"])

    def remix_loss(self, invariant: Tensor, domain_features: Tensor, y: Tensor) -> Tensor:
        """``L_remix``: ``c_1`` on ``z_a + f_d(x_b)`` against ``y_a`` for each class's ``remix_pairs``, summed over
        the classes with two examples and divided by the number of classes."""
        if len(y) < 2:
            return invariant.new_zeros(())
        first, second, drawn = remix_pairs(y, self.num_classes)
        logits = self.classifier_label_1(invariant[first] + domain_features[second])
        losses = F.cross_entropy(logits, y[first], reduction="none")
        return torch.where(drawn, losses, torch.zeros_like(losses)).sum() / self.num_classes

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        self.update_count += 1
        x = torch.cat([x for x, _ in batch])
        y = torch.cat([y for _, y in batch])
        d = torch.cat([torch.full((len(x_d),), i, dtype=torch.long, device=x.device)
                       for i, (x_d, _) in enumerate(batch)])
        hp = self.hparams
        if discriminator_turn(self.update_count, hp["d_steps_per_g_step"]):
            with torch.no_grad():
                invariant = self.featurizer_label(x) - self.featurizer_domain(x)
            loss_disc = F.cross_entropy(self.discriminator(invariant), d)
            self.disc_opt.zero_grad(set_to_none=True)
            loss_disc.backward()
            self.disc_opt.step()
            return {"loss_disc": loss_disc.detach()}
        label_features = self.featurizer_label(x)
        domain_features = self.featurizer_domain(x)
        invariant = label_features - domain_features
        losses = {
            "loss_disc": F.cross_entropy(self.discriminator(invariant), d),
            "loss_dmn": F.cross_entropy(self.classifier_domain(domain_features), d),
            "loss_clf_int": F.cross_entropy(self.classifier_label_1(label_features), y),
            "loss_cnt_int": supcon_lambda_loss(label_features, y, d),
            "loss_clf_fin": F.cross_entropy(self.classifier_label_2(invariant), y),
            "loss_cnt_final": supcon_lambda_loss(invariant, y, d),
            "loss_remixed": self.remix_loss(invariant, domain_features, y),
        }
        loss = (losses["loss_clf_int"] + losses["loss_clf_fin"] + hp["dclf_lambda"] * losses["loss_dmn"]
                + hp["rmxd_lambda"] * losses["loss_remixed"]
                + hp["cnt_lambda"] * (losses["loss_cnt_int"] + losses["loss_cnt_final"])
                - hp["disc_lambda"] * losses["loss_disc"])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}}

    def predict(self, x: Tensor) -> Tensor:
        return self.network(x)

    def embed(self, x: Tensor) -> Tensor:
        return self.featurizer_label(x)
