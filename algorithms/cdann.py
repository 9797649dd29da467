"""CDANN: conditional domain-adversarial training, the discriminator told each example's class."""

from __future__ import annotations

from dg_meta.algorithms.dann import DANN

from dg_meta.registry import register_algorithm


@register_algorithm
class CDANN(DANN):
    """Conditional DANN (Li, Tian, Gong, Liu, Liu, Zhang & Tao, "Deep Domain Generalization via Conditional
    Invariant Adversarial Networks", ECCV 2018), in DomainBed's form (``domainbed/algorithms.py``, class
    ``AbstractDANN`` with ``conditional=True, class_balance=True``, registered as ``CDANN``).

    The paper learns, with a conditional invariant adversarial network, features ``phi(x)`` invariant across
    domains with respect to the joint distribution ``P(phi(x), y)`` (its abstract: when the target domain is
    not severely class-unbalanced), not only the marginal ``P(phi(x))`` that DANN aligns. DomainBed implements
    that conditioning with DANN's single discriminator (``DANN``: same alternation, optimizers, gradient
    penalty and hparams) fed ``u = phi(x) + e(y)``, ``e`` a learned class embedding (``nn.Embedding(K,
    n_features)``, trained by the discriminator's Adam, ``lr_d``), and a class-balanced domain loss
    ``L_d = sum_i CE(D(u_i), d_i) / (n_{y_i} K)``, ``n_c`` the number of examples of class ``c`` in the step's
    batch and ``K`` the largest label in the batch plus one (the width of DomainBed's ``F.one_hot(all_y)``;
    the number of classes whenever every class is present). The gradient penalty differentiates with respect
    to ``u``. A generator step minimises ``CE(w(phi(x)), y) - lambda L_D`` over the featurizer and classifier;
    it fills ``e``'s gradient too, but ``e`` moves only on discriminator steps.

    Departure from the paper (DomainBed's): the one discriminator on ``phi(x) + e(y)`` with class-balanced
    weights stands in for the paper's conditional adversarial networks; the paper's own training schedule
    and optimizer are not reproduced (DomainBed's alternating Adam steps are, see ``DANN``). DomainBed's
    README cites this ECCV paper for CDANN (an earlier README cited an MMD-based paper by Li et al., arXiv
    1807.08479: facebookresearch/DomainBed issue #42). Departure from DomainBed: only CDANN has the class
    embedding (DomainBed builds an unused one for DANN too), which changes no update.
    """

    conditional = True
    class_balance = True
