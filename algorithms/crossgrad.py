"""CrossGrad: cross-gradient training of a label network and a domain network (Shankar et al., ICLR 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dg_meta.algorithm import Algorithm, Losses
from dg_meta.hparams import HParam, log_uniform, positive, uniform, unit_interval
from dg_meta.networks import classifier, featurizer_for
from dg_meta.registry import register_algorithm


def cross_perturbation(net: nn.Module, x: Tensor, targets: Tensor, eps: float, clip: float) -> Tensor:
    """``x + eps * clip(grad_x J(x))`` (detached), where ``J`` is ``net``'s cross-entropy on ``targets``
    averaged over the batch and the input gradient is clipped element-wise to ``[-clip, clip]``."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(net(x), targets), x)
    return (x + eps * grad.clamp(-clip, clip)).detach()


@register_algorithm
class CrossGrad(Algorithm):
    """Cross-gradient training (Shankar, Piratla, Chakrabarti, Chaudhuri, Jyothi & Sarawagi, ICLR 2018).

    A label network (loss ``J_l``) and a domain network over the training domains (loss ``J_d``) augment
    each other's data along the other's loss gradient: ``x_d = x + eps clip(grad_x J_d(x))`` and
    ``x_l = x + eps clip(grad_x J_l(x))`` (both detached, both from the current parameters). The label
    network minimises ``(1 - a) J_l(x) + a J_l(x_d)`` and the domain network ``(1 - a) J_d(x) + a J_d(x_l)``,
    each with its own Adam.

    Losses, perturbations and constants follow the authors' code (vihari/crossgrad, ``nets/lenet_crossgrad.py``):
    - ``J_l``, ``J_d`` are batch means (``tf.reduce_mean`` of the softmax cross-entropy in ``add_losses``),
      and the perturbation uses the input gradient of that mean (``tf.gradients(style_loss, inputs)``), so an
      example moves by ``eps / B`` times its own loss gradient before clipping, ``B`` the whole step's batch
      (every training domain's minibatch together);
    - the input gradient is clipped element-wise to ``[-0.1, 0.1]`` (``tf.clip_by_value`` in ``add_losses``)
      and scaled by ``EPSILON = 10``; the perturbed losses are weighted by ``PERTURB_LOSS_COEFF = 0.5`` and the
      clean ones by ``1 - 0.5`` (module constants, one pair for both networks): defaults ``crossgrad_eps = 10``,
      ``crossgrad_clip = 0.1``, ``crossgrad_alpha = 0.5``. That code has this one setting (its experiment
      script ``lenet_run.sh`` is for GFonts); it has no MNIST or rotation setting.
    - the two networks are separate (``lenet`` for labels, ``stylenet`` for domains, ``adaptive_lenet``), and
      the label network sees ``x`` only: that code does not feed the domain network's embedding to the label
      network, and neither does this file.
    The authors' code adds the four weighted losses to one total (``tf.losses.add_loss`` in ``add_losses``), one
    optimizer steps on it (``model_deploy.optimize_clones`` in ``train_image_classifier.py``); the perturbations
    are constants (``tf.stop_gradient``) and the parameters disjoint, so two element-wise optimizers match it.

    Departures from that code: the library's Adam (``lr``, ``weight_decay``) instead of its training script's
    RMSProp (``train_image_classifier.py``, learning rate 0.02 in ``lenet_run.sh``, exponential decay) with
    every parameter gradient clipped to ``[-0.1, 0.1]`` (``clones_gradients`` in ``train_image_classifier.py``,
    applied there to every model); the networks are ``featurizer_for``'s choice plus a ``classifier`` head,
    so linear logits where its ``label_model``/``style_model`` end with a ReLU.

    Dassl (KaiyangZhou/Dassl.pytorch, ``dassl/engine/dg/crossgrad.py``, ``CrossGrad.forward_backward``) also
    takes the gradient of the batch-mean loss, clips it to ``[-0.1, 0.1]`` and trains each network with its own
    optimizer, but defaults to ``EPS_F = EPS_D = 1.0`` (``dassl/config/defaults.py``), a step ten times
    smaller than the authors'; ``ALPHA_F = ALPHA_D = 0.5`` as here. The paper's Algorithm 1 allows separate
    ``eps``/``a`` per network; both codes use one value of each, hence one of each here.
    """

    HPARAMS = {
        "crossgrad_eps": HParam(10.0, log_uniform(0, 1.5), positive, "positive", "perturbation step eps"),
        "crossgrad_alpha": HParam(0.5, uniform(0.1, 0.9), unit_interval, "in [0, 1]",
                                  "weight a of the loss on perturbed inputs"),
        "crossgrad_clip": HParam(0.1, log_uniform(-2, 0), positive, "positive",
                                 "element-wise clip of the input gradient of the batch-mean loss"),
    }

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.featurizer = featurizer_for(self.input_shape, hparams)
        self.label_net = nn.Sequential(
            self.featurizer, classifier(self.featurizer.n_outputs, num_classes, hparams["nonlinear_classifier"]))
        domain_featurizer = featurizer_for(self.input_shape, hparams)
        self.domain_net = nn.Sequential(
            domain_featurizer, classifier(domain_featurizer.n_outputs, num_domains, hparams["nonlinear_classifier"]))
        self.label_optimizer = torch.optim.Adam(self.label_net.parameters(), lr=hparams["lr"],
                                                weight_decay=hparams["weight_decay"])
        self.domain_optimizer = torch.optim.Adam(self.domain_net.parameters(), lr=hparams["lr"],
                                                 weight_decay=hparams["weight_decay"])

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        x = torch.cat([x for x, _ in batch])
        y = torch.cat([y for _, y in batch])
        d = torch.cat([torch.full_like(y, i) for i, (_, y) in enumerate(batch)])
        eps, alpha, clip = (self.hparams[k] for k in ("crossgrad_eps", "crossgrad_alpha", "crossgrad_clip"))
        x_d = cross_perturbation(self.domain_net, x, d, eps, clip)
        x_l = cross_perturbation(self.label_net, x, y, eps, clip)
        label_loss = (1 - alpha) * F.cross_entropy(self.label_net(x), y) + alpha * F.cross_entropy(
            self.label_net(x_d), y)
        self.label_optimizer.zero_grad(set_to_none=True)
        label_loss.backward()
        self.label_optimizer.step()
        domain_loss = (1 - alpha) * F.cross_entropy(self.domain_net(x), d) + alpha * F.cross_entropy(
            self.domain_net(x_l), d)
        self.domain_optimizer.zero_grad(set_to_none=True)
        domain_loss.backward()
        self.domain_optimizer.step()
        return {"loss": label_loss.detach(), "domain_loss": domain_loss.detach()}

    def predict(self, x: Tensor) -> Tensor:
        return self.label_net(x)
