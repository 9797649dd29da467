"""Baseline++ (Chen et al., ICLR 2019): Baseline with cosine-similarity heads, in training and on the support
set."""

from __future__ import annotations

from dg_meta.algorithms.baseline import Baseline
from torch import nn

from dg_meta.registry import register_algorithm
from dg_meta.support_heads import CosineHead, cosine_head_scale


@register_algorithm
class BaselinePlusPlus(Baseline):
    """Baseline++ of "A Closer Look at Few-shot Classification" (Chen, Liu, Kira, Wang & Huang, ICLR 2019).

    Official code: github.com/wyharveychen/CloserLookFewShot (``BaselineTrain`` and ``BaselineFinetune`` with
    ``loss_type='dist'``). ``Baseline`` with both heads replaced by ``backbone.distLinear``
    (``support_heads.CosineHead``): logits ``s * (f(x) / (||f(x)|| + 1e-5)) . g_k v_k / ||v_k||``, a cosine
    similarity to a weight-normalised class direction ``v_k`` times its learnable norm ``g_k`` and a fixed scale
    ``s``, 2 for at most 200 classes and 10 above (``distLinear.__init__``). Training: that head over every
    training class, its scale from their number (the official code's from ``--num_classes``, 200 by default on
    miniImageNet and CUB, above 4112 on Omniglot), Adam at lr 1e-3 on the cross-entropy. Evaluation: a new one
    over the episode's ``N`` classes (scale 2), fitted on the frozen support features by ``Baseline``'s SGD loop
    (100 epochs, minibatches of 4, lr 0.01, momentum 0.9, dampening 0.9, weight decay 1e-3 on ``g`` and ``v``).
    Departures: those of ``Baseline``.
    """

    def training_head(self, n_features: int, n_classes: int) -> nn.Module:
        return CosineHead(n_features, n_classes, cosine_head_scale(n_classes))

    def support_head(self, n_features: int, n_way: int) -> nn.Module:
        return CosineHead(n_features, n_way, cosine_head_scale(n_way))
