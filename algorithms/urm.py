"""URM: uniform risk minimization, features pushed by a discriminator towards a uniform distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dg_meta.algorithms.erm import ERM
from torch import Tensor, nn

from dg_meta.algorithm import Losses
from dg_meta.hparams import HParam, choice, log_uniform, non_negative, positive, uniform, unit_interval
from dg_meta.registry import register_algorithm

#: the bounded output activations and the interval ``[a, b)`` of the uniform target of each
ACTIVATIONS: dict[str, tuple[type[nn.Module], float, float]] = {
    "tanh": (nn.Tanh, -1.0, 1.0), "relu": (nn.ReLU, 0.0, 1.0), "sigmoid": (nn.Sigmoid, 0.0, 1.0)}
OPTIMIZERS = ("adam", "sgd")


class ActivatedFeaturizer(nn.Module):
    """``activation(body(x))``, with the body's ``n_outputs``."""

    def __init__(self, body: nn.Module, activation: nn.Module):
        super().__init__()
        self.body, self.activation = body, activation
        self.n_outputs = body.n_outputs

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.body(x))


def uniform_discriminator(n_features: int, hidden_layers: int) -> nn.Sequential:
    """DomainBed's URM discriminator: ``Linear(n_features, 100)``, LeakyReLU, ``hidden_layers`` times
    ``Linear(100, 100)`` and LeakyReLU, then ``Linear(100, 1)`` (one logit: "uniform sample")."""
    layers: list[nn.Module] = [nn.Linear(n_features, 100), nn.LeakyReLU()]
    for _ in range(hidden_layers):
        layers += [nn.Linear(100, 100), nn.LeakyReLU()]
    layers.append(nn.Linear(100, 1))
    return nn.Sequential(*layers)


@register_algorithm
class URM(ERM):
    """Uniform Risk Minimization (Krishnamachari et al., "Uniformly Distributed Feature Representations for
    Fair and Robust Learning", TMLR 2024), as DomainBed implements it (``domainbed/algorithms.py``, class
    ``URM``, contributed to DomainBed by @kiranchari per its README).

    The featurizer's output goes through a bounded activation ``s`` (``urm_generator_output``: tanh, or relu /
    sigmoid), ``f = s(phi(x))``, and a discriminator ``D`` (``uniform_discriminator``, one logit) learns to
    tell the features from uniform noise ``n ~ U[a, b)^k`` (``[-1, 1)`` for tanh, ``[0, 1)`` otherwise), while
    the featurizer learns to fool it. With ``l = urm_adv_lambda`` and ``BCE`` the binary cross-entropy on
    ``D``'s logit, averaged over the batch (all domains concatenated), each step is
    - generator step: ERM's Adam (``lr``, ``weight_decay``) on ``phi`` and ``w`` minimising
      ``CE(w(f), y) + l BCE(D(f), 1)``;
    - then discriminator step: its own optimizer on ``D`` minimising ``BCE(D(n), t_1) + l BCE(D(f'), t_0)``
      with ``f'`` the features of this step computed before the generator step (detached) and fresh noise
      ``n`` drawn after it (global torch RNG); targets ``t_1 = 1``, ``t_0 = 0``, or with label smoothing ``s >
      0`` random soft targets ``t_1 ~ U[1 - s, 1)`` and ``t_0 ~ U[0, s)`` per example (drawn after the noise,
      ``t_1`` first). ``D`` is unchanged by the generator step (its optimizer resets the gradients that step
      left in it before its own backward).

    Hparams (names, defaults and random-search distributions of DomainBed's ``hparams_registry.py``):
    ``urm_adv_lambda`` 0.1, ``U(0, 0.2)``; ``urm_discriminator_lr`` 1e-3 (SMALL_IMAGES branch; its search
    range ``10**U(-5.5, -3.5)`` does not contain the default, as in DomainBed; larger images: 5e-5,
    ``10**U(-6, -4.5)``); ``urm_discriminator_hidden_layers`` 1, ``{1, 2, 3}``; ``urm_generator_output``
    ``tanh``, ``{tanh, relu}``; ``urm_discriminator_optimizer`` ``adam`` (never searched; ``sgd`` is SGD with
    momentum 0.9), both with the shared ``weight_decay``; ``urm_discriminator_label_smoothing`` 0 (never
    searched); ``urm`` ``adversarial``, the only variant (DomainBed declares it and never reads it).

    Departures from DomainBed: ``urm_discriminator_label_smoothing`` defaults to the float 0.0 (DomainBed: the
    integer 0; its random draw is a float), so that a smoothing such as 0.1 passes the hparam type check; the
    soft targets are drawn in the features' dtype (DomainBed: float32); ``identity`` is not an accepted output
    (DomainBed accepts it for the featurizer but has no uniform interval for it and fails at the first step);
    the activation wraps the featurizer (``ActivatedFeaturizer``) instead of replacing an ``activation``
    attribute of DomainBed's networks. ``update`` also returns the classification, adversarial and
    discriminator losses.
    """

    compile_modules = ()  # not checked under torch.compile
    HPARAMS = {
        "urm": HParam("adversarial", choice(["adversarial"]), lambda v: v == "adversarial", "'adversarial'",
                      "URM variant (DomainBed implements only the adversarial one)"),
        "urm_adv_lambda": HParam(0.1, uniform(0, 0.2), non_negative, "non-negative",
                                 "weight of the adversarial terms (generator, and features in the discriminator)"),
        "urm_discriminator_label_smoothing": HParam(0.0, uniform(0, 0), unit_interval, "in [0, 1]",
                                                    "width of the soft targets' intervals (0: hard 0/1 targets)"),
        "urm_discriminator_optimizer": HParam("adam", choice(["adam"]), lambda v: v in OPTIMIZERS,
                                              f"one of {', '.join(OPTIMIZERS)}", "the discriminator's optimizer"),
        "urm_discriminator_hidden_layers": HParam(1, choice([1, 2, 3]), non_negative, "a non-negative integer",
                                                  "hidden 100-unit layers of the discriminator"),
        "urm_generator_output": HParam("tanh", choice(["tanh", "relu"]), lambda v: v in ACTIVATIONS,
                                       f"one of {', '.join(ACTIVATIONS)}", "bounded activation of the features"),
        "urm_discriminator_lr": HParam(1e-3, log_uniform(-5.5, -3.5), positive, "positive",
                                       "discriminator learning rate (DomainBed's larger images: 5e-5, "
                                       "10**U(-6, -4.5))"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.discriminator = uniform_discriminator(self.featurizer.n_outputs,
                                                   hparams["urm_discriminator_hidden_layers"])
        params, lr, decay = self.discriminator.parameters(), hparams["urm_discriminator_lr"], hparams["weight_decay"]
        if hparams["urm_discriminator_optimizer"] == "sgd":
            self.discriminator_opt = torch.optim.SGD(params, lr=lr, weight_decay=decay, momentum=0.9)
        else:
            self.discriminator_opt = torch.optim.Adam(params, lr=lr, weight_decay=decay)

    def build_featurizer(self, hparams: dict) -> nn.Module:
        """ERM's featurizer followed by the ``urm_generator_output`` activation."""
        return ActivatedFeaturizer(super().build_featurizer(hparams), ACTIVATIONS[hparams["urm_generator_output"]][0]())

    def sample_uniform(self, features: Tensor) -> Tensor:
        """Noise shaped like ``features``, uniform on the activation's interval ``[a, b)`` (global torch RNG)."""
        _, low, high = ACTIVATIONS[self.hparams["urm_generator_output"]]
        return (high - low) * torch.rand_like(features) + low

    def targets(self, like: Tensor, real: bool) -> Tensor:
        """The discriminator's targets for a batch shaped like ``like``'s logits: 1 for noise (``real``), 0 for
        features, or with smoothing ``s`` uniform on ``[1 - s, 1)`` / ``[0, s)``."""
        smoothing = self.hparams["urm_discriminator_label_smoothing"]
        if not smoothing:
            return torch.full_like(like, float(real))
        return smoothing * torch.rand_like(like) + (1.0 - smoothing if real else 0.0)

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        lam = self.hparams["urm_adv_lambda"]
        x = torch.cat([x for x, _ in batch])
        y = torch.cat([y for _, y in batch])
        features = self.featurizer(x)
        class_loss = F.cross_entropy(self.classifier(features), y)
        judged = self.discriminator(features).squeeze(1)
        adv_loss = F.binary_cross_entropy_with_logits(judged, torch.ones_like(judged))
        loss = class_loss + lam * adv_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

        features = features.detach()
        noise_logits = self.discriminator(self.sample_uniform(features)).squeeze(1)
        feature_logits = self.discriminator(features).squeeze(1)
        real_targets = self.targets(noise_logits, real=True)
        fake_targets = self.targets(feature_logits, real=False)
        disc_loss = F.binary_cross_entropy_with_logits(noise_logits, real_targets) + \
            lam * F.binary_cross_entropy_with_logits(feature_logits, fake_targets)
        self.discriminator_opt.zero_grad(set_to_none=True)
        disc_loss.backward()
        self.discriminator_opt.step()
        return {"loss": loss.detach(), "class_loss": class_loss.detach(), "adv_loss": adv_loss.detach(),
                "disc_loss": disc_loss.detach()}
