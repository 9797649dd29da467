"""Samplers: domain minibatches, N-way K-shot episodes, meta-domain splits, task batches."""

import pytest
import torch

from dg_meta.dataset import TensorDomain
from dg_meta.errors import UsageError
from dg_meta.samplers import Cell, DomainBatchSampler, EpisodeSampler, meta_domain_split, stack_episodes
from dg_meta.splits import class_cells


def make_domains(n_domains=3, n_classes=6, per_class=12):
    domains = []
    for d in range(n_domains):
        labels = torch.arange(n_classes).repeat_interleave(per_class)
        # each example's input encodes (domain, position) so examples can be traced back
        x = torch.stack([torch.full((len(labels),), float(d)), torch.arange(len(labels)).float()], 1)
        domains.append(TensorDomain(f"d{d}", x, labels))
    return domains


def cells_of(domains):
    return [Cell(dom, i, c, idx) for i, dom in enumerate(domains)
            for c, idx in class_cells(dom.labels, torch.arange(len(dom))).items()]


def test_episode_shapes_labels_and_disjointness():
    domains = make_domains()
    sampler = EpisodeSampler(cells_of(domains), n_way=5, k_shot=2, n_query=3, seed=0)
    for _ in range(20):
        ep = next(sampler)
        assert ep.support_x.shape == (10, 2) and ep.query_x.shape == (15, 2)
        assert ep.support_y.tolist() == [i for i in range(5) for _ in range(2)]
        assert ep.query_y.tolist() == [i for i in range(5) for _ in range(3)]
        assert len(set(ep.classes.tolist())) == 5
        assert len(set(ep.domains.tolist())) == 1  # same-domain episodes by default
        dom = domains[int(ep.domains[0])]
        support = {int(v) for v in ep.support_x[:, 1]}
        query = {int(v) for v in ep.query_x[:, 1]}
        assert len(support) == 10 and len(query) == 15 and not support & query
        for label, cls in enumerate(ep.classes.tolist()):
            got = dom.labels[ep.support_x[ep.support_y == label, 1].long()]
            assert (got == cls).all()


def test_episodes_deterministic_per_seed_and_resumable():
    cells = cells_of(make_domains())
    a = EpisodeSampler(cells, 3, 1, 2, seed=7)
    b = EpisodeSampler(cells, 3, 1, 2, seed=7)
    c = EpisodeSampler(cells, 3, 1, 2, seed=8)
    ea, eb, ec = next(a), next(b), next(c)
    assert torch.equal(ea.support_x, eb.support_x) and torch.equal(ea.classes, eb.classes)
    assert not torch.equal(ea.query_x, ec.query_x)
    state = a.state_dict()
    after = next(a)
    b.load_state_dict(state)
    assert torch.equal(next(b).query_x, after.query_x)


def test_cross_domain_pool_has_distinct_classes():
    sampler = EpisodeSampler(cells_of(make_domains()), 6, 1, 1, seed=0, protocol="class_pool")
    for _ in range(10):
        assert sorted(next(sampler).classes.tolist()) == list(range(6))


def test_protocols_on_globally_numbered_classes():
    cells = [Cell(c.domain, c.domain_id, c.class_id + 6 * c.domain_id, c.indices) for c in cells_of(make_domains())]
    per_domain = EpisodeSampler(cells, 4, 1, 1, seed=0)
    pooled = EpisodeSampler(cells, 4, 1, 1, seed=0, protocol="class_pool")
    assert all(len(set(next(per_domain).domains.tolist())) == 1 for _ in range(20))
    mixed = [len(set(next(pooled).domains.tolist())) > 1 for _ in range(20)]
    assert sum(mixed) > 10  # 4 of 18 classes all from one of 3 domains: about 1 episode in 30
    with pytest.raises(UsageError, match="no pool has 19 classes"):
        EpisodeSampler(cells, 19, 1, 1, seed=0, protocol="class_pool")


def test_episode_errors():
    with pytest.raises(UsageError, match="no domain has 7 classes with at least 2 examples each"):
        EpisodeSampler(cells_of(make_domains()), 7, 1, 1, seed=0)
    with pytest.raises(UsageError, match="n_way, k_shot, n_query >= 1"):
        EpisodeSampler(cells_of(make_domains()), 5, 0, 1, seed=0)


def test_domain_batches_distinct_seeded_and_resumable():
    domains = make_domains()
    idx = [torch.arange(0, 72, 2)] * 3
    s1 = DomainBatchSampler(domains, idx, batch_size=8, seed=1)
    s2 = DomainBatchSampler(domains, idx, batch_size=8, seed=1)
    b1, b2 = next(s1), next(s2)
    for (x1, y1), (x2, _), dom in zip(b1, b2, domains):
        assert torch.equal(x1, x2) and len(set(x1[:, 1].tolist())) == 8
        assert all(int(v) % 2 == 0 for v in x1[:, 1])
        assert torch.equal(y1, dom.labels[x1[:, 1].long()])
    state = s1.state_dict()
    nxt = next(s1)
    s2.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(nxt, next(s2)))


def test_meta_domain_split_and_stack():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(30):
        train, test = meta_domain_split([1, 2, 3, 4], 1, g)
        assert len(test) == 1 and sorted(train + test) == [1, 2, 3, 4]
        seen.add(test[0])
    assert seen == {1, 2, 3, 4}
    with pytest.raises(UsageError, match="needs 1 <= n_meta_test < 2"):
        meta_domain_split([1, 2], 2, g)
    sampler = EpisodeSampler(cells_of(make_domains()), 5, 1, 2, seed=0)
    batch = stack_episodes([next(sampler) for _ in range(4)])
    assert batch.support_x.shape == (4, 5, 2) and batch.query_y.shape == (4, 10)


def test_training_episodes_say_in_one_line_which_cells_are_too_small_for_them(capsys):
    from dg_meta.datasets.digits import RotatedDigits

    from dg_meta.samplers import split_cells, training_episode_sampler

    dataset = RotatedDigits("unused", {})
    splits = dataset.split([0], 0, 0.2)
    sizes = [len(c.indices) for c in split_cells(dataset, splits, splits.train_envs, "in")]
    need = sorted(sizes)[len(sizes) // 2]  # about half the cells are smaller
    short = sum(s < need for s in sizes)
    assert 0 < short < len(sizes)
    training_episode_sampler(dataset, splits, "per_domain", 5, 1, need - 1, seed=0)
    assert capsys.readouterr().err == (
        f"warning: {short} of {len(sizes)} training (domain, class) cells have fewer than k_shot + n_query = {need} "
        "examples in the in split and are left out of the training episodes; lower hparam n_query or k_shot to keep "
        "them\n")
    training_episode_sampler(dataset, splits, "per_domain", 5, 1, min(sizes) - 1, seed=0)
    assert capsys.readouterr().err == ""
