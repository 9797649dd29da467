"""CausIRL-MMD: ERM plus a Gaussian-kernel MMD penalty between the features of two random parts of the batch."""

from __future__ import annotations

from dg_meta.algorithms.causirl_coral import CausIRL_CORAL

from dg_meta.feature_alignment import gaussian_mmd
from dg_meta.registry import register_algorithm


@register_algorithm
class CausIRL_MMD(CausIRL_CORAL):
    """CausIRL with the MMD distance (Chevalley, Bunne, Krause & Bauer, "Invariant Causal Mechanisms through
    Distribution Matching", arXiv:2206.11646, 2022), as in DomainBed (``domainbed/algorithms.py``,
    ``AbstractCausIRL`` with ``gaussian=True``, registered there as ``CausIRL_MMD``).

    ``CausIRL_CORAL``'s update (its docstring gives the random split of the pooled batch into heads ``A`` and
    tails ``B``, the objective ``(1/D) sum_i CE_i + mmd_gamma * P`` and where it follows DomainBed) with
    ``P = nan_to_num(MMD^2(A, B))``, and ``P = 0`` unless both parts have at least two rows (DomainBed's rule
    for both distances). ``MMD^2`` is the biased estimate under DomainBed's kernel
    ``k(a, b) = sum_g exp(-g ||a - b||^2)``, ``g`` in ``{1e-3, 1e-2, ..., 1e3}``
    (``dg_meta.feature_alignment.gaussian_mmd``, the same as ``MMD``'s).

    Hparams: ``mmd_gamma`` (default 1, random search ``10 ** U(-1, 1)``, DomainBed's ``hparams_registry.py``,
    the same for every dataset); ``lr`` and ``weight_decay`` are ERM's.
    """

    distance = staticmethod(gaussian_mmd)
