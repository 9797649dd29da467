"""SagNet: style-agnostic networks, a content head on style-randomised features and an adversarial style head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dg_meta.algorithm import Algorithm, Losses
from dg_meta.hparams import HParam, log_uniform, positive
from dg_meta.networks import classifier, featurizer_for
from dg_meta.registry import register_algorithm

EPS = 1e-5  # added to the variances before their square roots (DomainBed's ``randomize(eps=1e-5)``)


def randomize(z: Tensor, what: str) -> Tensor:
    """DomainBed's ``SagNet.randomize`` on features ``z`` of shape ``[n, d]``: each row is standardised with
    its own mean ``mu`` and unbiased variance ``s2`` over its ``d`` entries, ``u = (z - mu) / sqrt(s2 + eps)``.

    ``"style"``: the statistics are mixed with those of a random partner row ``pi(i)``, ``mu' = a mu + (1 - a)
    mu[pi]``, ``s2' = a s2 + (1 - a) s2[pi]`` with ``a ~ U(0, 1)`` per row, and the result is
    ``u sqrt(s2' + eps) + mu'``. ``"content"``: the standardised rows are swapped and detached,
    ``u[pi].detach() sqrt(s2 + eps) + mu`` (gradients reach ``z`` through its own statistics only). Both
    draw ``a`` then ``pi`` (``torch.rand``, ``torch.randperm``, on ``z``'s device), in that order.
    """
    alpha = torch.rand(len(z), 1, dtype=z.dtype, device=z.device)
    mean = z.mean(1, keepdim=True)
    var = z.var(1, keepdim=True)
    standard = (z - mean) / (var + EPS).sqrt()
    swap = torch.randperm(len(z), device=z.device)
    if what == "style":
        mean = alpha * mean + (1 - alpha) * mean[swap]
        var = alpha * var + (1 - alpha) * var[swap]
    else:
        standard = standard[swap].detach()
    return standard * (var + EPS).sqrt() + mean


@register_algorithm
class SagNet(Algorithm):
    """Style-Agnostic Networks (Nam, Lee, Park, Yoon & Yoo, "Reducing Domain Gap by Reducing Style Bias",
    CVPR 2021).

    A featurizer ``f`` feeds a content head ``c`` and a style head ``s``. Every update takes three steps,
    each with a fresh ``randomize`` of ``f(x)`` on the pooled minibatch of all training domains:
    1. content: ``L_c = CE(c(randomize(f(x), "style")), y)``; Adam steps on ``f`` and ``c``;
    2. style: ``L_s = CE(s(randomize(f(x), "content")), y)``; Adam steps on ``s``;
    3. adversary: ``L_adv = -sag_w_adv mean_i mean_k log softmax(s(randomize(f(x), "content")))_ik`` (the
       cross-entropy of the style head against the uniform distribution); Adam steps on ``f`` only, so that
       the style of the features stops predicting the class.
    Prediction is ``c(f(x))`` without randomisation.

    Follows DomainBed's ``SagNet`` (``domainbed/algorithms.py``): three Adams (``lr``, ``weight_decay``) over
    ``f``, ``c`` and ``s``, the steps in the order above; ``f`` and ``c`` are ``featurizer_for``'s choice and
    the library's ``classifier`` (DomainBed's ``Featurizer`` and ``Classifier``, ``nonlinear_classifier`` for
    both heads). ``sag_w_adv``: default 0.1, random search ``10 ** U(-2, 1)`` (``hparams_registry.py``).

    DomainBed departs from the paper and its code (github.com/hyseob/SagNet, ``train.py``,
    ``modules/sag_resnet.py``, ``modules/randomizations.py``, ``modules/loss.py``): there the randomisations
    act on an intermediate ResNet feature map (statistics per channel over space, ``--style-stage 3``), the
    content network is the ResNet's remaining stages and the style network a copy of them, one forward pass
    serves the three losses (style, then adversary, then content), the adversary updates only the
    batch-norm parameters of the stages before the randomisation (``adv_params``) with its gradient clipped
    to norm 0.1 (``--clip-adv``), its loss is ``-log(softmax + 1e-5)``, and the optimizers are SGD with
    momentum and a cosine schedule. DomainBed randomises the final feature vector (statistics over its
    entries; its comment says the paper's split is ResNet-specific) and the adversary updates the whole
    featurizer. One departure from DomainBed: the random draws are made on the features' device and
    in their dtype (DomainBed draws float32 on the CPU and copies to the GPU), so CUDA runs use the CUDA
    generator; on the CPU in float32 the draws are DomainBed's.
    """

    HPARAMS = {
        "sag_w_adv": HParam(0.1, log_uniform(-2, 1), positive, "positive", "weight of the adversarial style loss"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer = featurizer_for(self.input_shape, hparams)
        self.classifier = classifier(self.featurizer.n_outputs, num_classes, hparams["nonlinear_classifier"])
        self.style_classifier = classifier(self.featurizer.n_outputs, num_classes, hparams["nonlinear_classifier"])
        self.network = nn.Sequential(self.featurizer, self.classifier)
        self.optimizer_f = self._adam(self.featurizer)
        self.optimizer_c = self._adam(self.classifier)
        self.optimizer_s = self._adam(self.style_classifier)

    def _adam(self, module: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(module.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        x = torch.cat([x for x, _ in batch])
        y = torch.cat([y for _, y in batch])

        self.optimizer_f.zero_grad(set_to_none=True)
        self.optimizer_c.zero_grad(set_to_none=True)
        loss_c = F.cross_entropy(self.classifier(randomize(self.featurizer(x), "style")), y)
        loss_c.backward()
        self.optimizer_f.step()
        self.optimizer_c.step()

        self.optimizer_s.zero_grad(set_to_none=True)
        loss_s = F.cross_entropy(self.style_classifier(randomize(self.featurizer(x), "content")), y)
        loss_s.backward()
        self.optimizer_s.step()

        self.optimizer_f.zero_grad(set_to_none=True)
        style_logits = self.style_classifier(randomize(self.featurizer(x), "content"))
        loss_adv = -self.hparams["sag_w_adv"] * F.log_softmax(style_logits, dim=1).mean(1).mean()
        loss_adv.backward()
        self.optimizer_f.step()
        return {"loss_c": loss_c.detach(), "loss_s": loss_s.detach(), "loss_adv": loss_adv.detach()}

    def predict(self, x: Tensor) -> Tensor:
        return self.classifier(self.featurizer(x))
