"""RSC: representation self-challenging, training the classifier with its most predictive features muted."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dg_meta.algorithms.erm import ERM
from torch import Tensor

from dg_meta.algorithm import Losses
from dg_meta.hparams import HParam, uniform, unit_interval
from dg_meta.registry import register_algorithm


def feature_keep_mask(feature_grads: Tensor, f_drop_factor: float) -> Tensor:
    """Per example (row), keep (``True``) the features whose gradient is strictly below the row's
    ``(1 - f_drop_factor)``-quantile (linear interpolation, as ``np.percentile``); the rest are muted."""
    threshold = torch.quantile(feature_grads, 1 - f_drop_factor, dim=1, keepdim=True)
    return feature_grads < threshold


def example_keep_mask(confidence_drop: Tensor, b_drop_factor: float) -> Tensor:
    """Keep (``True``) every feature of the examples whose confidence drop is strictly below the batch's
    ``(1 - b_drop_factor)``-quantile; the others (the largest drops) are the ones challenged."""
    return confidence_drop < torch.quantile(confidence_drop, 1 - b_drop_factor)


@register_algorithm
class RSC(ERM):
    """Representation Self-Challenging (Huang, Wang, Xing, Huang, ECCV 2020), in DomainBed's form.

    On the pooled batch ``(x, y)`` of all training domains, with features ``z = phi(x)`` and logits
    ``p = w(z)``:

    1. ``g = d(sum_i p_{i, y_i}) / dz``: the gradient of each example's correct-class logit w.r.t. its
       features;
    2. ``m_f[i, j] = [g_ij < q_{1-f}(g_i)]`` with ``q_{1-f}(g_i)`` the ``(1 - rsc_f_drop_factor)``-quantile of
       row ``g_i``: the top ``f`` fraction of each example's features by gradient is muted;
    3. ``delta_i = softmax(w(z_i))_{y_i} - softmax(w(z_i * m_f[i]))_{y_i}``, the drop of the correct-class
       probability when muting (the paper's batch percentage, Section 3.3), and ``m_b[i] = [delta_i < q_{1-b}(delta)]``
       with ``q_{1-b}`` the ``(1 - rsc_b_drop_factor)``-quantile over the batch;
    4. ``mask = m_f OR m_b``: only the examples with the largest drops (``m_b = 0``) have features muted;
    5. one Adam step (``lr``) on ``CE(w(z * mask), y)``; the mask is a constant, the gradient flows into
       ``w`` and ``phi`` through ``z``.

    Follows DomainBed's ``RSC`` (``domainbed/algorithms.py``) step for step; its ``np.percentile`` (linear
    interpolation) is ``torch.quantile`` here (same interpolation), computed on the device. DomainBed departs
    from the paper and its official code (DeLightCMU/RSC, ``models/resnet.py``), and so does this class: the
    mask acts on the featurizer's output vector, not on the last convolutional feature map, with neither the
    official code's random choice between spatial and channel-wise muting nor its per-epoch schedule of the
    batch percentage.

    Hparams (DomainBed's ``hparams_registry.py``, the same for every dataset): ``rsc_f_drop_factor`` (the
    fraction of features muted per example) and ``rsc_b_drop_factor`` (the fraction of the batch challenged),
    both default 1/3, random search ``U(0, 0.5)``.
    """

    HPARAMS = {
        "rsc_f_drop_factor": HParam(1 / 3, uniform(0, 0.5), unit_interval, "in [0, 1]",
                                    "fraction of each example's features (highest gradient) that is muted"),
        "rsc_b_drop_factor": HParam(1 / 3, uniform(0, 0.5), unit_interval, "in [0, 1]",
                                    "fraction of the batch (largest confidence drop) whose features are muted"),
    }

    def update(self, batch: list[tuple[Tensor, Tensor]]) -> Losses:
        hp = self.hparams
        x = torch.cat([x for x, _ in batch])
        y = torch.cat([y for _, y in batch])
        features = self.featurizer(x)
        logits = self.classifier(features)
        one_hot = F.one_hot(y, self.num_classes).to(logits.dtype)
        feature_grads = torch.autograd.grad((logits * one_hot).sum(), features)[0]
        keep_feature = feature_keep_mask(feature_grads, hp["rsc_f_drop_factor"])
        with torch.no_grad():
            muted_logits = self.classifier(features * keep_feature)
            confidence_drop = ((F.softmax(logits, 1) - F.softmax(muted_logits, 1)) * one_hot).sum(1)
        keep_example = example_keep_mask(confidence_drop, hp["rsc_b_drop_factor"])
        mask = (keep_feature | keep_example.unsqueeze(1)).to(features.dtype)
        loss = F.cross_entropy(self.classifier(features * mask), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}
