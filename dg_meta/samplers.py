"""Every way training and evaluation data is drawn, each seeded and checkpointable.

- ``DomainBatchSampler``: an infinite stream of one minibatch per training domain (DG algorithms).
- ``EpisodeSampler``: N-way K-shot Q-query episodes from a pool of (domain, class) cells, labels remapped
  to ``0..N-1`` with the global class ids kept (meta-learners, few-shot evaluation), under an episode
  protocol: one domain per episode (``per_domain``) or the whole pool of classes (``class_pool``).
- ``split_cells``, ``training_episode_sampler``, ``evaluation_pools``, ``evaluation_episode_samplers``: the
  episodes of a run,
  built from its dataset, splits, protocol and seed; ``dg_meta.train`` and the benchmarks both use them,
  so the same seed gives the same episodes.
- ``meta_domain_split``: a random meta-train / meta-test split of the training domains (MLDG, Feature-Critic).
- ``MetaDomainSplitter``: a seeded stream of such splits, checkpointable like the samplers.
- ``stack_episodes``: E same-shape episodes stacked into one task batch (vmap over tasks).

Samplers own a ``torch.Generator``; ``state_dict``/``load_state_dict`` make resumed runs draw exactly
the batches an uninterrupted run would.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dg_meta.dataset import EPISODE_PROTOCOLS, Domain, MultiDomainDataset
from dg_meta.errors import UsageError
from dg_meta.hparams import name_seed
from dg_meta.splits import DomainSplits, class_cells


class _Seeded:
    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu())  # a checkpoint may be loaded onto a GPU


class DomainBatchSampler(_Seeded):
    """Yields ``[(x_d, y_d) for each domain]`` forever; each minibatch has distinct examples.

    ``part`` (a function of a minibatch's size, ``dg_meta.distributed.shard`` on several processes) keeps one
    contiguous slice of every domain's minibatch: each process draws the same minibatches and fetches only its
    share, so the shares of all processes are the single-process minibatch."""

    def __init__(self, domains: list[Domain], indices: list[Tensor], batch_size: int, seed: int,
                 part: Callable[[int], slice] | None = None):
        super().__init__(seed)
        for domain, idx in zip(domains, indices):
            if len(idx) == 0:
                raise UsageError(f"domain {domain.name} has no training examples")
        self.domains = domains
        self.indices = indices
        self.batch_size = batch_size
        self.part = part

    def batch_sizes(self) -> list[int]:
        """Every domain's minibatch size: ``batch_size``, or all of a smaller domain."""
        return [min(self.batch_size, len(idx)) for idx in self.indices]

    def __iter__(self) -> DomainBatchSampler:
        return self

    def __next__(self) -> list[tuple[Tensor, Tensor]]:
        batch = []
        for domain, idx in zip(self.domains, self.indices):
            take = idx[torch.randperm(len(idx), generator=self.generator)[: self.batch_size]]
            batch.append(domain.batch(take) if self.part is None else domain.batch_part(take, self.part(len(take))))
        return batch


@dataclass
class Cell:
    """The examples of one class in one domain."""

    domain: Domain
    domain_id: int
    class_id: int
    indices: Tensor


def check_protocol(protocol: str) -> str:
    """``protocol`` if it is one of ``EPISODE_PROTOCOLS``, else a ``UsageError`` naming them."""
    if protocol not in EPISODE_PROTOCOLS:
        raise UsageError(f"unknown episode protocol {protocol!r}: choose one of {', '.join(EPISODE_PROTOCOLS)}")
    return protocol


@dataclass
class Episode:
    """One N-way K-shot task. Support and query are class-major; labels are ``0..N-1``."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    classes: Tensor
    domains: Tensor

    @property
    def n_way(self) -> int:
        return len(self.classes)

    def to(self, device: torch.device | str) -> Episode:
        return Episode(*(t.to(device) for t in (self.support_x, self.support_y, self.query_x,
                                                  self.query_y, self.classes, self.domains)))


class EpisodeSampler(_Seeded):
    """Draws N-way K-shot Q-query episodes from ``cells``.

    With ``protocol="per_domain"`` (the default) an episode first picks one domain, then N of its classes;
    with ``"class_pool"`` it picks N cells with distinct class ids anywhere in the pool. Support and query
    never share an example. Cells with fewer than K+Q examples are never drawn.
    """

    def __init__(self, cells: list[Cell], n_way: int, k_shot: int, n_query: int, seed: int,
                 protocol: str = "per_domain"):
        super().__init__(seed)
        check_protocol(protocol)
        if n_way < 1 or k_shot < 1 or n_query < 1:
            raise UsageError(f"episodes need n_way, k_shot, n_query >= 1, got {n_way}, {k_shot}, {n_query}")
        self.cells = [c for c in cells if len(c.indices) >= k_shot + n_query]
        self.left_out = len(cells) - len(self.cells)  # cells too small for one class of an episode
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query
        same_domain = protocol == "per_domain"
        groups: dict[int, list[int]] = {}
        for i, cell in enumerate(self.cells):
            groups.setdefault(cell.domain_id if same_domain else 0, []).append(i)
        self.groups = [g for g in groups.values() if len({self.cells[i].class_id for i in g}) >= n_way]
        if not self.groups:
            raise UsageError(
                f"no {'domain' if same_domain else 'pool'} has {n_way} classes with at least "
                f"{k_shot + n_query} examples each: lower n_way, k_shot or n_query"
            )

    def __iter__(self) -> EpisodeSampler:
        return self

    def _pick_cells(self) -> list[Cell]:
        group = self.groups[int(torch.randint(len(self.groups), (1,), generator=self.generator))]
        order = torch.randperm(len(group), generator=self.generator).tolist()
        picked, seen = [], set()
        for j in order:
            cell = self.cells[group[j]]
            if cell.class_id not in seen:
                seen.add(cell.class_id)
                picked.append(cell)
            if len(picked) == self.n_way:
                break
        return picked

    def __next__(self) -> Episode:
        episode = self.draw()
        assert episode is not None
        return episode

    def take(self, n: int, part: slice = slice(None)) -> list[Episode]:
        """The episodes ``part`` of the next ``n`` (a meta-batch's share on one of several processes): every
        episode is drawn, so the stream moves on as it would for all ``n``; only those of ``part`` are fetched."""
        keep = range(n)[part]
        return [e for i in range(n) if (e := self.draw(fetch=i in keep)) is not None]

    def draw(self, fetch: bool = True) -> Episode | None:
        """The next episode; with ``fetch=False`` its draws are made (the generator and, for augmented image
        folders, the global RNG move on as if fetched) but nothing is loaded, and None is returned."""
        k, q = self.k_shot, self.n_query
        cells = self._pick_cells()
        support_x, query_x = [], []
        for cell in cells:
            take = cell.indices[torch.randperm(len(cell.indices), generator=self.generator)[: k + q]]
            if not fetch:
                cell.domain.fetch_part(take, slice(0))
                continue
            x = cell.domain.fetch(take)
            support_x.append(x[:k])
            query_x.append(x[k:])
        if not fetch:
            return None
        labels = torch.arange(self.n_way)
        device = support_x[0].device
        return Episode(
            support_x=torch.cat(support_x),
            support_y=labels.repeat_interleave(k).to(device),
            query_x=torch.cat(query_x),
            query_y=labels.repeat_interleave(q).to(device),
            classes=torch.tensor([c.class_id for c in cells], device=device),
            domains=torch.tensor([c.domain_id for c in cells], device=device),
        )


def split_cells(dataset: MultiDomainDataset, splits: DomainSplits, envs: list[int], part: str) -> list[Cell]:
    """One cell per (domain, class) of ``envs``, over each domain's ``"in"`` or ``"out"`` split or ``"all"``
    of it (the in part, then the out part, of each class)."""
    cells = []
    for env in envs:
        domain = dataset.domains[env]
        if part == "all":
            idx = torch.cat([splits.in_idx[env], splits.out_idx[env]])
        else:
            idx = {"in": splits.in_idx, "out": splits.out_idx}[part][env]
        cells += [Cell(domain, env, c, i) for c, i in class_cells(domain.labels, idx).items()]
    return cells


def training_episode_sampler(dataset: MultiDomainDataset, splits: DomainSplits, protocol: str, n_way: int,
                             k_shot: int, n_query: int, seed: int) -> EpisodeSampler:
    """The training episodes of a run seeded ``seed``: the ``in`` splits of the training domains, with their
    training-time augmentation, drawn under ``protocol`` from the stream ``name_seed(seed, "sampler")``."""
    cells = [Cell(c.domain.for_training(), c.domain_id, c.class_id, c.indices)
             for c in split_cells(dataset, splits, splits.train_envs, "in")]
    sampler = EpisodeSampler(cells, n_way, k_shot, n_query, name_seed(seed, "sampler"), protocol)
    if sampler.left_out:  # the training class pool shrinks: say so
        print(f"warning: {sampler.left_out} of {len(cells)} training (domain, class) cells have fewer than k_shot + "
              f"n_query = {k_shot + n_query} examples in the in split and are left out of the training episodes; "
              "lower hparam n_query or k_shot to keep them", file=sys.stderr)
    return sampler


def training_minibatch_sampler(dataset: MultiDomainDataset, splits: DomainSplits, batch_size: int, seed: int,
                               purpose: str = "sampler", part: Callable[[int], slice] | None = None
                               ) -> DomainBatchSampler:
    """The training minibatches of a run seeded ``seed``: ``batch_size`` examples of every training domain's ``in``
    split, with its training-time augmentation, from the stream ``name_seed(seed, purpose)``; ``part`` as in
    ``DomainBatchSampler``."""
    envs = splits.train_envs
    return DomainBatchSampler([dataset.domains[e].for_training() for e in envs], [splits.in_idx[e] for e in envs],
                              batch_size, name_seed(seed, purpose), part)


@dataclass
class EvaluationPool:
    """The cells one few-shot metric draws its episodes from; ``label`` names them in messages."""

    label: str
    cells: list[Cell]
    held_out: bool


def evaluation_pools(dataset: MultiDomainDataset, splits: DomainSplits, protocol: str) -> dict[str, EvaluationPool]:
    """The few-shot evaluation pools of a run, by metric prefix.

    ``per_domain``: ``env{i}`` for every domain, over all examples of a held-out domain and the ``out`` split
    of a training domain. ``class_pool``: ``val`` over the ``out`` splits of all training domains and ``test``
    over all examples of all held-out domains, each pooling the classes of its domains.
    """
    test_envs, train_envs = splits.test_envs, splits.train_envs
    if check_protocol(protocol) == "class_pool":
        return {"val": EvaluationPool("the pool of training domains",
                                      split_cells(dataset, splits, train_envs, "out"), False),
                "test": EvaluationPool("the pool of held-out domains",
                                       split_cells(dataset, splits, test_envs, "all"), True)}
    return {f"env{env}": EvaluationPool(f"domain {dataset.domains[env].name}",
                                        split_cells(dataset, splits, [env], "all" if env in test_envs else "out"),
                                        env in test_envs)
            for env in range(len(dataset.domains))}


def evaluation_episode_samplers(dataset: MultiDomainDataset, splits: DomainSplits, protocol: str, n_way: int,
                                k_shot: int, n_query: int, seed: int) -> dict[str, EpisodeSampler]:
    """A sampler per pool of ``evaluation_pools``, by metric prefix, each seeded by its prefix so every
    checkpoint is scored on the same episodes; a pool without ``n_way`` classes of ``k_shot + n_query``
    examples has no sampler (``dg_meta.train`` refuses such flags for the held-out pools up front)."""
    samplers = {}
    for name, pool in evaluation_pools(dataset, splits, protocol).items():
        try:
            samplers[name] = EpisodeSampler(pool.cells, n_way, k_shot, n_query, name_seed(seed, f"fs-eval-{name}"),
                                            protocol)
        except UsageError:
            continue
    return samplers


def meta_domain_split(domains: list[int], n_meta_test: int, generator: torch.Generator
                      ) -> tuple[list[int], list[int]]:
    """Randomly split training ``domains`` into (meta-train, meta-test) with ``n_meta_test`` in the latter."""
    if not 1 <= n_meta_test < len(domains):
        raise UsageError(
            f"a meta-train/meta-test split needs 1 <= n_meta_test < {len(domains)} training domains, "
            f"got {n_meta_test}"
        )
    perm = torch.randperm(len(domains), generator=generator).tolist()
    test = sorted(domains[i] for i in perm[:n_meta_test])
    train = sorted(domains[i] for i in perm[n_meta_test:])
    return train, test


class MetaDomainSplitter(_Seeded):
    """A fresh ``meta_domain_split`` of training domains ``0..n_domains-1`` per call, from its own
    checkpointable generator (MLDG, Feature-Critic); a split that cannot exist fails at construction."""

    def __init__(self, n_domains: int, n_meta_test: int, seed: int):
        super().__init__(seed)
        self.domains = list(range(n_domains))
        self.n_meta_test = n_meta_test
        if not 1 <= n_meta_test < n_domains:
            raise UsageError(
                f"a meta-train/meta-test split needs 1 <= n_meta_test < {n_domains} training domains, "
                f"got n_meta_test={n_meta_test}: lower n_meta_test or train on more domains"
            )

    def __call__(self) -> tuple[list[int], list[int]]:
        return meta_domain_split(self.domains, self.n_meta_test, self.generator)


@dataclass
class TaskBatch:
    """E episodes stacked along a leading task dimension: ``support_x`` is ``[E, N*K, ...]``."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    classes: Tensor


def stack_episodes(episodes: list[Episode]) -> TaskBatch:
    """Stack same-shape episodes into a ``TaskBatch``; shapes that differ raise a ``ValueError``."""
    shapes = {(e.support_x.shape, e.query_x.shape) for e in episodes}
    if len(shapes) != 1:
        raise ValueError(f"cannot stack episodes of different shapes: {sorted(map(str, shapes))}")
    return TaskBatch(
        support_x=torch.stack([e.support_x for e in episodes]),
        support_y=torch.stack([e.support_y for e in episodes]),
        query_x=torch.stack([e.query_x for e in episodes]),
        query_y=torch.stack([e.query_y for e in episodes]),
        classes=torch.stack([e.classes for e in episodes]),
    )
