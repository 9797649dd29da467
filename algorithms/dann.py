"""DANN: domain-adversarial training, a discriminator over the training domains against the featurizer."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dg_meta.adversarial import DISCRIMINATOR_HPARAMS, discriminator_turn, domain_discriminator, input_gradient_penalty
from dg_meta.algorithm import Algorithm, Losses
from dg_meta.hparams import HParam, choice, int_log2_uniform, log_uniform, non_negative, positive
from dg_meta.networks import classifier, featurizer_for
from dg_meta.registry import register_algorithm


@register_algorithm
class DANN(Algorithm):
    """Domain-Adversarial Neural Networks (Ganin, Ustinova, Ajakan, Germain, Larochelle, Laviolette, Marchand &
    Lempitsky, "Domain-Adversarial Training of Neural Networks", JMLR 17, 2016), in DomainBed's form
    (``domainbed/algorithms.py``, class ``AbstractDANN`` with ``conditional=False, class_balance=False``).

    A featurizer ``phi``, a classifier ``w`` and a discriminator ``D`` (DomainBed's MLP, ``mlp_*`` hparams)
    predicting which of the ``E`` training domains an example comes from. With ``d`` the domain labels,
    ``L_d = CE(D(phi(x)), d)`` (mean over the step's batch, all domains concatenated) plus the gradient
    penalty ``R = mean_i ||grad_{u_i} sum_j CE(D(u_j), d_j)||^2`` on the discriminator's input ``u = phi(x)``:
    ``L_D = L_d + grad_penalty R``. Update number ``t`` (counted from 1) is a discriminator step when
    ``t mod (1 + d_steps_per_g_step) < d_steps_per_g_step``, a generator step otherwise:
    - discriminator step: Adam (``lr_d``, ``weight_decay_d``, betas ``(beta1, 0.9)``) on ``D``'s parameters,
      minimising ``L_D``;
    - generator step: Adam (``lr_g``, ``weight_decay_g``, same betas) on ``phi`` and ``w``, minimising
      ``CE(w(phi(x)), y) - lambda L_D``: the featurizer receives ``-lambda`` times the gradient of the very
      loss the discriminator minimises, the gradient penalty included (as in DomainBed, whose ``disc_loss``
      already holds it there). That backward also fills ``D``'s ``.grad`` (with ``-lambda grad_D L_D``), after
      the discriminator's gradients were reset as DomainBed's ``disc_opt.zero_grad()`` does; ``D`` does not
      move on a generator step.

    Hparams (names, defaults and random-search distributions of DomainBed's ``hparams_registry.py``, the
    ``SMALL_IMAGES`` branch where it depends on the dataset): ``lambda`` 1, ``d_steps_per_g_step`` 1,
    ``grad_penalty`` 0, ``beta1`` 0.5, ``lr_g`` = ``lr_d`` = 1e-3, ``weight_decay_g`` = ``weight_decay_d`` = 0,
    ``mlp_width`` 256, ``mlp_depth`` 3, ``mlp_dropout`` 0 (for vector inputs the MLP featurizer reads the
    same three, as DomainBed's does). The shared ``lr`` and ``weight_decay`` are unused, as in DomainBed.

    Departures from the paper (all DomainBed's): the paper trains one binary source/target classifier on
    unlabeled target data through a gradient reversal layer, one SGD step updating all networks at once, with
    the adaptation weight annealed from 0 to 1 (``lambda_p = 2 / (1 + exp(-10 p)) - 1``, ``p`` the training
    progress); here, as in DomainBed, ``D`` classifies the training domains (no target data in domain
    generalization), discriminator and generator steps alternate with two Adam optimizers, ``lambda`` is
    constant, and the input-gradient penalty is an addition.

    Departures from DomainBed, neither of which changes a parameter: a discriminator step computes the
    features without a graph to the featurizer (DomainBed backpropagates into the featurizer's ``.grad``,
    which its generator step zeroes before use), saving that backward; and ``update`` returns ``disc_loss``
    (``L_D``), ``class_loss``, ``gen_loss`` and ``grad_penalty`` at every step, whichever network moved
    (DomainBed returns only the moved one's loss; the trainer averages every key over all steps). The update
    counter is a Python integer saved in the ``state_dict`` (extra state) instead of a device buffer, so that
    reading it costs no host-device synchronisation.
    """

    HPARAMS = {
        **DISCRIMINATOR_HPARAMS,
        "lambda": HParam(1.0, log_uniform(-2, 2), non_negative, "non-negative",
                         "weight of the discriminator's loss in the generator's objective"),
        "d_steps_per_g_step": HParam(1, int_log2_uniform(0, 3), positive, "a positive integer",
                                     "discriminator updates per generator update"),
        "grad_penalty": HParam(0.0, log_uniform(-2, 1), non_negative, "non-negative",
                               "weight of the squared input-gradient norm in the discriminator's loss"),
        "beta1": HParam(0.5, choice([0.0, 0.5]), lambda v: 0 <= v < 1, "in [0, 1)",
                        "Adam beta1 of both optimizers (beta2 is 0.9)"),
        "lr_g": HParam(1e-3, log_uniform(-4.5, -2.5), positive, "positive",
                       "generator (featurizer and classifier) learning rate; DomainBed's larger images: 5e-5, "
                       "10**U(-5, -3.5)"),
        "lr_d": HParam(1e-3, log_uniform(-4.5, -2.5), positive, "positive",
                       "discriminator learning rate; DomainBed's larger images: 5e-5, 10**U(-5, -3.5)"),
        "weight_decay_g": HParam(0.0, None, non_negative, "non-negative",
                                 "generator L2 penalty, never searched on small images (DomainBed's larger "
                                 "images: 10**U(-6, -2))"),
        "weight_decay_d": HParam(0.0, log_uniform(-6, -2), non_negative, "non-negative", "discriminator L2 penalty"),
    }
    #: the discriminator sees ``phi(x) + e(y)`` (a learned class embedding) instead of ``phi(x)``
    conditional: ClassVar[bool] = False
    #: the domain loss weights example ``i`` by ``1 / (n_{y_i} K)`` instead of averaging
    class_balance: ClassVar[bool] = False

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer = featurizer_for(self.input_shape, hparams)
        self.classifier = classifier(self.featurizer.n_outputs, num_classes, hparams["nonlinear_classifier"])
        self.network = nn.Sequential(self.featurizer, self.classifier)
        self.discriminator = domain_discriminator(self.featurizer.n_outputs, num_domains, hparams)
        discriminator_params = list(self.discriminator.parameters())
        if self.conditional:
            self.class_embeddings = nn.Embedding(num_classes, self.featurizer.n_outputs)
            discriminator_params += list(self.class_embeddings.parameters())
        betas = (hparams["beta1"], 0.9)
        self.disc_opt = torch.optim.Adam(discriminator_params, lr=hparams["lr_d"],
                                         weight_decay=hparams["weight_decay_d"], betas=betas)
        self.gen_opt = torch.optim.Adam(self.network.parameters(), lr=hparams["lr_g"],
                                        weight_decay=hparams["weight_decay_g"], betas=betas)
        self.update_count = 0

    def get_extra_state(self) -> Any:
        return torch.tensor(self.update_count)

    def set_extra_state(self, state: Any) -> None:
        self.update_count = int(state)

    def domain_loss(self, logits: Tensor, domains: Tensor, y: Tensor) -> Tensor:
        """The discriminator's cross-entropy: the batch mean, or with ``class_balance`` the sum weighted by
        ``1 / (n_{y_i} K)``, ``n_c`` the count of class ``c`` in the batch and ``K`` the largest label in the
        batch plus one (DomainBed's ``F.one_hot(all_y)`` width: the number of classes when all are present)."""
        if not self.class_balance:
            return F.cross_entropy(logits, domains)
        counts = F.one_hot(y, self.num_classes).sum(0)
        weights = 1.0 / (counts[y] * (y.max() + 1)).to(logits.dtype)
        return (weights * F.cross_entropy(logits, domains, reduction="none")).sum()

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        self.update_count += 1
        disc_turn = discriminator_turn(self.update_count, self.hparams["d_steps_per_g_step"])
        x = torch.cat([x for x, _ in batch])
        y = torch.cat([y for _, y in batch])
        domains = torch.cat([torch.full((len(x_d),), d, dtype=torch.long, device=x_d.device)
                             for d, (x_d, _) in enumerate(batch)])
        with torch.set_grad_enabled(not disc_turn):
            features = self.featurizer(x)
        if disc_turn:
            features.requires_grad_()  # the penalty differentiates with respect to the discriminator's input
        disc_input = features + self.class_embeddings(y) if self.conditional else features
        disc_logits = self.discriminator(disc_input)
        penalty = input_gradient_penalty(F.cross_entropy(disc_logits, domains, reduction="sum"), disc_input)
        disc_loss = self.domain_loss(disc_logits, domains, y) + self.hparams["grad_penalty"] * penalty
        class_loss = F.cross_entropy(self.classifier(features), y)
        gen_loss = class_loss - self.hparams["lambda"] * disc_loss
        self.disc_opt.zero_grad(set_to_none=True)
        if disc_turn:
            disc_loss.backward()
            self.disc_opt.step()
        else:
            self.gen_opt.zero_grad(set_to_none=True)
            gen_loss.backward()
            self.gen_opt.step()
        return {"disc_loss": disc_loss.detach(), "class_loss": class_loss.detach(), "gen_loss": gen_loss.detach(),
                "grad_penalty": penalty.detach()}

    def predict(self, x: Tensor) -> Tensor:
        return self.network(x)
