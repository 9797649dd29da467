"""CausIRL-CORAL: ERM plus a CORAL penalty between the features of two random parts of the pooled batch."""

from __future__ import annotations

import torch
from dg_meta.algorithms.coral import CORAL
from torch import Tensor

from dg_meta.registry import register_algorithm


@register_algorithm
class CausIRL_CORAL(CORAL):
    """CausIRL with the CORAL distance (Chevalley, Bunne, Krause & Bauer, "Invariant Causal Mechanisms through
    Distribution Matching", arXiv:2206.11646, 2022), as in DomainBed (``domainbed/algorithms.py``,
    ``AbstractCausIRL`` with ``gaussian=False``, registered there as ``CausIRL_CORAL``; contributed to
    DomainBed by the paper's first author, README).

    Every step draws, for each training domain ``i`` with minibatch features ``z_i = phi(x_i)`` of ``n_i``
    rows, a cut ``c_i`` uniformly in ``{0, ..., n_i - 1}`` (torch's global RNG, after the forward pass, in
    training-domain order) and pools the heads and the tails:
    ``A = concat_i z_i[:c_i]``, ``B = concat_i z_i[c_i:]``. Both parts mix the domains in random proportions.
    One step minimises, with Adam over ``phi`` and the head ``w``,
    ``L = (1/D) sum_i CE_i + mmd_gamma * P``, ``CE_i`` the mean cross-entropy on domain ``i``, and
    ``P = nan_to_num(dist(A, B))`` if ``A`` and ``B`` both have at least two rows, else ``P = 0`` (a
    covariance needs two rows); ``dist`` is ``CORAL``'s (squared differences of means and unbiased
    covariances, averaged over entries) and ``nan_to_num`` maps NaN to 0 and +-inf to the largest finite
    values, as in DomainBed. ``update`` returns ``loss`` (the classification term) and ``penalty`` (``P``).

    This follows DomainBed's code; the paper's text beyond its abstract was not available to check against
    here, so no claim on how the two differ is made. DomainBed adds ``1e-16`` to the logits before the
    cross-entropy: the cross-entropy does not change when a constant is added to every logit, so it is left
    out.

    Hparams: ``mmd_gamma`` (default 1, random search ``10 ** U(-1, 1)``, DomainBed's ``hparams_registry.py``,
    the same for every dataset); ``lr`` and ``weight_decay`` are ERM's.
    """

    def alignment_penalty(self, features: list[Tensor]) -> Tensor:
        """``distance`` between the pooled heads and the pooled tails of the domains' features, cut at random."""
        cuts = [int(torch.randint(len(z), ())) for z in features]
        first = torch.cat([z[:c] for z, c in zip(features, cuts)])
        second = torch.cat([z[c:] for z, c in zip(features, cuts)])
        if len(first) < 2 or len(second) < 2:
            return features[0].new_zeros(())
        return torch.nan_to_num(self.distance(first, second))
