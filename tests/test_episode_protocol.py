"""The episode protocol a dataset declares (``EPISODE_PROTOCOL``): honoured by the CLI's training and
evaluation episodes, overridden by ``--episode-protocol`` and recorded in ``args.json``; the few-shot Omniglot
benchmark draws exactly the CLI's training episodes for the same seed."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO
from dg_meta.datasets.digits import RotatedDigits
from dg_meta.datasets.miniimagenet import MiniImageNet
from dg_meta.datasets.omniglot import SMALL1_ALPHABETS, SMALL2_ONLY_ALPHABETS, Omniglot, OmniglotSmall
from test_fewshot_data import write_alphabets

from dg_meta import registry
from dg_meta.dataset import MultiDomainDataset, TensorDomain
from dg_meta.errors import UsageError
from dg_meta.samplers import EpisodeSampler, evaluation_episode_samplers
from dg_meta.train import Trainer, main, parse_args, resolve_run

PER_CLASS = 20


class TinyClassSplit(MultiDomainDataset):
    """4 domains of 4 globally numbered classes (domain d holds classes 4d..4d+3), 20 examples each, 16x16;
    pixel (0, 0) holds the domain and pixel (0, 1) the example's index, so episodes can be traced back."""

    ENVIRONMENTS = ["a", "b", "c", "d"]
    INPUT_SHAPE = (1, 16, 16)
    NUM_CLASSES = 16
    DEFAULT_TEST_ENVS = [2, 3]
    EPISODE_PROTOCOL = "class_pool"
    N_STEPS = 2
    CHECKPOINT_FREQ = 2

    def __init__(self, root: str | None, hparams: dict):
        super().__init__(root, hparams)
        generator = torch.Generator().manual_seed(0)
        for d, name in enumerate(self.ENVIRONMENTS):
            labels = (4 * d + torch.arange(4)).repeat_interleave(PER_CLASS)
            x = torch.rand(len(labels), 1, 16, 16, generator=generator)
            x[:, 0, 0, 0] = d
            x[:, 0, 0, 1] = torch.arange(len(labels)).float()
            self.domains.append(TensorDomain(name, x, labels))


registry.register_dataset(TinyClassSplit)


def tiny_argv(out: Path, *extra: str) -> list[str]:
    return ["--algorithm", "ProtoNet", "--dataset", "TinyClassSplit", "--device", "cpu", "--no-progress",
            "--output-dir", str(out), "--fs-episodes", "4", "--fs-way", "3", "--fs-query", "2",
            "--hparams", json.dumps({"n_way": 3, "n_query": 2}), *extra]


def tiny_trainer(tmp_path: Path, *extra: str) -> Trainer:
    run = resolve_run(parse_args(tiny_argv(tmp_path / "run", *extra)))
    return Trainer(run, str(tmp_path), tmp_path / "run", "cpu")


def test_datasets_declare_their_protocol():
    assert MultiDomainDataset.EPISODE_PROTOCOL == "per_domain" and RotatedDigits.EPISODE_PROTOCOL == "per_domain"
    assert Omniglot.EPISODE_PROTOCOL == OmniglotSmall.EPISODE_PROTOCOL == "class_pool"
    assert MiniImageNet.EPISODE_PROTOCOL == "per_domain"  # each domain is a whole class split


def test_class_pool_training_episodes_mix_training_domains(tmp_path):
    trainer = tiny_trainer(tmp_path)
    assert trainer.run["episode_protocol"] == "class_pool"
    episodes = [next(trainer.sampler) for _ in range(30)]
    for ep in episodes:
        assert set(ep.domains.tolist()) <= {0, 1} and (ep.classes // 4 == ep.domains).all()
        assert ep.support_x[:, 0, 0, 0].tolist() == ep.domains.tolist()  # 1-shot: one support example per class
    assert any(len(set(ep.domains.tolist())) > 1 for ep in episodes)


def test_per_domain_override_keeps_each_episode_in_one_domain(tmp_path):
    trainer = tiny_trainer(tmp_path, "--episode-protocol", "per_domain")
    assert trainer.run["episode_protocol"] == "per_domain"
    episodes = [next(trainer.sampler) for _ in range(30)]
    assert all(len(set(ep.domains.tolist())) == 1 for ep in episodes)
    assert {int(ep.domains[0]) for ep in episodes} == {0, 1}


def test_class_pool_evaluation_pools_the_held_out_classes(tmp_path):
    trainer = tiny_trainer(tmp_path)
    samplers = evaluation_episode_samplers(trainer.dataset, trainer.splits, "class_pool", 3, 1, 2, seed=0)
    assert set(samplers) == {"val", "test"}
    test = samplers["test"]
    for cell in test.cells:  # every example of every held-out class: the in part, then the out part
        idx = torch.cat([trainer.splits.in_idx[cell.domain_id], trainer.splits.out_idx[cell.domain_id]])
        assert torch.equal(cell.indices, idx[trainer.dataset.domains[cell.domain_id].labels[idx] == cell.class_id])
    assert sorted({c.class_id for c in test.cells}) == list(range(8, 16))
    episodes = [next(test) for _ in range(30)]
    assert all(set(ep.domains.tolist()) <= {2, 3} for ep in episodes)
    assert any(len(set(ep.domains.tolist())) > 1 for ep in episodes)
    val = samplers["val"]
    assert {c.domain_id for c in val.cells} == {0, 1}
    assert all(set(c.indices.tolist()) <= set(trainer.splits.out_idx[c.domain_id].tolist()) for c in val.cells)
    metrics = trainer.evaluate()
    assert set(metrics) == {"val_fs_acc", "val_fs_ci", "test_fs_acc", "test_fs_ci"}


def test_per_domain_evaluation_scores_each_domain(tmp_path):
    trainer = tiny_trainer(tmp_path, "--episode-protocol", "per_domain")
    samplers = evaluation_episode_samplers(trainer.dataset, trainer.splits, "per_domain", 3, 1, 2, seed=0)
    assert {"env2", "env3"} <= set(samplers) <= {"env0", "env1", "env2", "env3"}
    for name, sampler in samplers.items():
        assert all(next(sampler).domains.tolist() == [int(name[3:])] * 3 for _ in range(10))
    assert set(trainer.evaluate()) == {f"{name}_fs_{m}" for name in samplers for m in ("acc", "ci")}


def test_flag_overrides_the_dataset_and_is_recorded(tmp_path, capsys):
    assert main(tiny_argv(tmp_path / "pool")) == 0
    assert re.match(r"ProtoNet on TinyClassSplit step 2: training classes val \d+\.\d% \| held-out classes test "
                    r"\d+\.\d%\n", capsys.readouterr().out)
    assert main(tiny_argv(tmp_path / "domain", "--episode-protocol", "per_domain")) == 0
    pool, domain = (json.loads((tmp_path / n / "args.json").read_text())["run"] for n in ("pool", "domain"))
    assert pool["episode_protocol"] == "class_pool" and domain["episode_protocol"] == "per_domain"
    record = json.loads((tmp_path / "pool" / "results.jsonl").read_text().splitlines()[-1])
    assert {"test_fs_acc", "test_fs_ci"} <= set(record) and not any(k.startswith("env") for k in record
                                                                    if k.endswith("_fs_acc"))
    record = json.loads((tmp_path / "domain" / "results.jsonl").read_text().splitlines()[-1])
    assert {"env2_fs_acc", "env3_fs_acc"} <= set(record) and "test_fs_acc" not in record
    # a run that draws no episodes keeps the identity (and folder name) it had before the protocol existed
    dg = resolve_run(parse_args(["--algorithm", "ERM"]))
    assert "episode_protocol" not in dg
    assert resolve_run(parse_args(["--algorithm", "ERM", "--fs-episodes", "1"]))["episode_protocol"] == "per_domain"


def test_invalid_protocol_is_one_line(tmp_path, capsys):
    assert main(tiny_argv(tmp_path / "bad", "--episode-protocol", "pooled")) == 2
    err = capsys.readouterr().err  # argparse quotes the choices before Python 3.12.8, not after
    assert err.count("\n") == 1 and err.replace("'class_pool', 'per_domain'", "class_pool, per_domain") == (
        "error: argument --episode-protocol: invalid choice: 'pooled' (choose from class_pool, per_domain) "
        "(see python -m dg_meta.train --help)\n")
    with pytest.raises(UsageError, match=r"^unknown episode protocol 'pooled': choose one of class_pool, per_domain$"):
        EpisodeSampler([], 1, 1, 1, seed=0, protocol="pooled")
    with pytest.raises(UsageError, match="unknown episode protocol 'pooled'"):
        evaluation_episode_samplers(TinyClassSplit(None, {}), TinyClassSplit(None, {}).split([3], 0, 0.2),
                                    "pooled", 3, 1, 1, seed=0)


def load_bench():
    spec = importlib.util.spec_from_file_location("fewshot_omniglot", REPO / "bench" / "fewshot_omniglot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_episodes(bench, dataset: OmniglotSmall, seed: int, steps: int, monkeypatch) -> list:
    """The episodes ``bench.train_and_test`` feeds ProtoNet (5-way 1-shot) in ``steps`` training steps."""
    fed = []
    cls = registry.get_algorithm("ProtoNet")
    monkeypatch.setattr(cls, "update", lambda self, batch: fed.append(batch) or {})
    monkeypatch.setattr(bench, "episode_accuracy", lambda *args: (0.0, 0.0))
    args = argparse.Namespace(steps=steps, minutes=10.0, episodes=1, seed=seed, hparams=None, device="cpu")
    key = bench.cell_key("ProtoNet", "5w1s", args, bench.smallest_training_cell(dataset))
    bench.train_and_test(key, dataset, None, args, torch.device("cpu"))
    monkeypatch.undo()
    return fed


def assert_same_episodes(cli_batches: list, bench_batches: list) -> None:
    assert len(cli_batches) == len(bench_batches)
    for cli, bench in zip(cli_batches, bench_batches):
        for a, b in zip(cli, bench, strict=True):
            assert torch.equal(a.classes, b.classes) and torch.equal(a.domains, b.domains)
            assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)


def cli_trainer(data: Path, out: Path, seed: int) -> Trainer:
    run = resolve_run(parse_args(["--algorithm", "ProtoNet", "--dataset", "OmniglotSmall", "--seed", str(seed),
                                  "--data-dir", str(data), "--hparams", json.dumps({"n_way": 5, "k_shot": 1})]))
    return Trainer(run, str(data), out, "cpu")


def test_bench_draws_the_cli_training_episodes(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_alphabets(data / "images_background_small1", SMALL1_ALPHABETS, 3, 10)  # the n_query cap does not bind
    write_alphabets(data / "images_background_small2", ["Greek"] + SMALL2_ONLY_ALPHABETS, 3, 16)
    bench = load_bench()
    trainer = cli_trainer(data, tmp_path / "run", seed=3)
    cli = [trainer.next_batch() for _ in range(4)]
    fed = bench_episodes(bench, trainer.dataset, seed=3, steps=4, monkeypatch=monkeypatch)
    assert_same_episodes(cli, fed)
    assert any(len(set(ep.domains.tolist())) > 1 for batch in cli for ep in batch)  # alphabets mixed
    other = bench_episodes(bench, trainer.dataset, seed=4, steps=1, monkeypatch=monkeypatch)
    assert not torch.equal(other[0][0].support_x, cli[0][0].support_x)



def test_bench_feeds_minibatch_learners_the_cli_training_minibatches(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_alphabets(data / "images_background_small1", SMALL1_ALPHABETS, 3, 8)
    write_alphabets(data / "images_background_small2", ["Greek"] + SMALL2_ONLY_ALPHABETS, 3, 16)
    bench = load_bench()
    run = resolve_run(parse_args(["--algorithm", "Baseline", "--dataset", "OmniglotSmall", "--seed", "3",
                                  "--data-dir", str(data)]))
    trainer = Trainer(run, str(data), tmp_path / "run", "cpu")
    cli = [trainer.next_batch() for _ in range(3)]
    fed = []
    monkeypatch.setattr(registry.get_algorithm("Baseline"), "update", lambda self, batch: fed.append(batch) or {})
    args = argparse.Namespace(steps=3, minutes=10.0, episodes=1, seed=3, hparams=None, device="cpu")
    bench.train(bench.cell_key("Baseline", "5w1s", args,
                               bench.smallest_training_cell(trainer.dataset)), trainer.dataset, args,
                torch.device("cpu"))
    assert len(fed) == len(cli) == 3
    for ours, theirs in zip(fed, cli):
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ours, theirs, strict=True))


def test_bench_caps_n_query_so_that_no_training_class_is_left_out(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    write_alphabets(data / "images_background_small1", SMALL1_ALPHABETS, 3, 12)
    write_alphabets(data / "images_background_small2", ["Greek"] + SMALL2_ONLY_ALPHABETS, 3, 16)
    bench = load_bench()
    dataset = OmniglotSmall(str(data), {"rotation_classes": True})
    sizes = [len(c.indices) for c in bench.split_cells(dataset, bench.splits_of(dataset), bench.TRAIN_ENVS, "in")]
    smallest = min(sizes)
    assert bench.smallest_training_cell(dataset) == smallest
    assert 5 < smallest < max(sizes) and smallest - 1 < 15  # the cap binds for MAML's n_query 15 at 1-shot
    assert bench.training_n_query("MAML", "5w1s", smallest, {}) == smallest - 1
    assert bench.training_n_query("MAML", "5w5s", smallest, {}) == smallest - 5
    assert bench.training_n_query("MAML", "5w1s", smallest, {"n_query": 2}) == 2  # below the cap: kept
    assert bench.training_n_query("Baseline", "5w1s", smallest, {}) is None
    fed = []
    monkeypatch.setattr(registry.get_algorithm("ProtoNet"), "update", lambda self, batch: fed.append(batch) or {})
    args = argparse.Namespace(steps=1, minutes=10.0, episodes=1, seed=0, hparams='{"ProtoNet": {"n_query": 15}}',
                              device="cpu")
    key = bench.cell_key("ProtoNet", "5w5s", args, bench.smallest_training_cell(dataset))
    assert key["n_query"] == smallest - 5 and key["hparams"] == {"n_query": 15}
    bench.train(key, dataset, args, torch.device("cpu"))
    assert fed[0][0].query_x.shape[0] == 5 * (smallest - 5)
    assert "left out" not in capsys.readouterr().err  # every training class is in the episodes
