"""MMD: ERM plus a Gaussian-kernel MMD penalty between the features of every pair of training domains."""

from __future__ import annotations

from dg_meta.algorithms.coral import CORAL

from dg_meta.feature_alignment import gaussian_mmd
from dg_meta.registry import register_algorithm


@register_algorithm
class MMD(CORAL):
    """The MMD regulariser of MMD-AAE (Li, Pan, Wang & Kot, "Domain Generalization with Adversarial Feature
    Learning", CVPR 2018) on its own, in DomainBed's form (``domainbed/algorithms.py``, ``AbstractMMD`` with
    ``gaussian=True``, registered there as ``MMD``).

    One step minimises, with Adam over the featurizer ``phi`` and the head ``w``,
    ``L = (1/D) sum_i CE_i + mmd_gamma * (2 / (D (D - 1))) sum_{i<j} MMD^2(z_i, z_j)`` over the ``D``
    training domains, ``z_i = phi(x_i)`` and ``CE_i`` the mean cross-entropy on domain ``i`` (``CORAL``'s
    update, whose docstring gives the details). ``MMD^2(a, b) = mean k(a, a') + mean k(b, b') - 2 mean k(a, b)``
    is the biased estimate (means over all pairs of rows, diagonal included) under DomainBed's kernel
    ``k(a, b) = sum_g exp(-g ||a - b||^2)``, ``g`` in ``{1e-3, 1e-2, ..., 1e3}`` (``AbstractMMD.gaussian_kernel``;
    ``dg_meta.feature_alignment.gaussian_mmd``).

    Departure of DomainBed from the paper, followed here: only the MMD term is kept, on the featurizer's
    output (no autoencoder, no adversarial prior on the codes: those are ``MMDAAE``, ``algorithms/mmdaae.py``).
    The kernel is DomainBed's; the paper's own kernel choice was not checked here.

    Hparams: ``mmd_gamma`` (default 1, random search ``10 ** U(-1, 1)``, DomainBed's ``hparams_registry.py``,
    the same for every dataset); ``lr`` and ``weight_decay`` are ERM's.
    """

    distance = staticmethod(gaussian_mmd)
    data_parallel = "gather"  # CORAL's update: the kernels see every domain's whole minibatch
