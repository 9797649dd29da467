"""``python -m dg_meta.evaluate``: the training-time few-shot numbers reproduced exactly from a run folder (ProtoNet,
MAML and a DG algorithm), several shots in one call, the JSON beside the run, an unfinished run, ``--data-dir``,
and the one-line refusals with exit code 2."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_episode_protocol import tiny_argv
from test_fewshot_loaders import write_cifar100

from dg_meta import registry
from dg_meta.evaluate import evaluate_run, main
from dg_meta.hparams import name_seed
from dg_meta.samplers import EpisodeSampler, split_cells
from dg_meta.train import Trainer, episode_metrics
from dg_meta.train import main as train_main

TINY = ["--way", "3", "--query", "2", "--episodes", "4"]  # tiny_argv's evaluation setting (fs-shot 1)


def last_record(run: Path) -> dict:
    return json.loads((run / "results.jsonl").read_text().splitlines()[-1])


def report(run: Path, name: str) -> dict:
    return json.loads((run / name).read_text())


@pytest.fixture(scope="module")
def protonet_run(tmp_path_factory) -> Path:
    """ProtoNet on TinyClassSplit (class_pool: pools val and test), 2 steps, scored on 4 episodes of 3-way 1-shot
    2-query at its checkpoint."""
    run = tmp_path_factory.mktemp("evaluate") / "protonet"
    assert train_main(tiny_argv(run)) == 0
    return run


def test_reproduces_the_training_time_record_exactly(protonet_run, capsys):
    assert main([str(protonet_run), *TINY, "--shot", "1", "--domains", "all", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    record, written = last_record(protonet_run), report(protonet_run, "evaluate_3w1s2q_4.json")
    assert set(written["pools"]) == {"val", "test"}
    for prefix in ("val", "test"):
        assert written["pools"][prefix]["acc"] == record[f"{prefix}_fs_acc"]  # exactly: same episodes, same model
        assert written["pools"][prefix]["ci"] == record[f"{prefix}_fs_ci"]
    assert (written["step"], written["finished"], written["seed"], written["protocol"]) == (2, True, 0, "class_pool")
    assert (written["way"], written["shot"], written["query"], written["episodes"]) == (3, 1, 2, 4)
    assert written["pools"]["test"]["held_out"] and not written["pools"]["val"]["held_out"]
    lines = out.splitlines()
    assert lines[0].startswith("ProtoNet on TinyClassSplit, checkpoint of step 2 (finished): 3-way")
    test_acc = 100 * record["test_fs_acc"]
    assert any(line.split()[0] == "1" and line.split()[1] == "test:" and f"{test_acc:.2f}%" in line for line in lines)
    assert lines[-1] == f"results: {protonet_run / 'evaluate_3w1s2q_4.json'}"


def hand_prototype_accuracy(run: Path, shot: int, query: int, episodes: int) -> tuple[float, float]:
    """ProtoNet's held-out score recomputed by hand: the checkpoint's featurizer, class means of the support
    features, nearest mean in squared Euclidean distance; mean and 1.96 * sample std / sqrt(n)."""
    args = json.loads((run / "args.json").read_text())
    trainer = Trainer(args["run"], "unused", run, "cpu")
    trainer.algorithm.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=True)["algorithm"]["model"])
    featurizer = trainer.algorithm.featurizer.eval()
    cells = split_cells(trainer.dataset, trainer.splits, trainer.splits.test_envs, "all")
    sampler = EpisodeSampler(cells, 3, shot, query, name_seed(0, "fs-eval-test"), "class_pool")
    accs = []
    with torch.no_grad():
        for _ in range(episodes):
            ep = next(sampler)
            z = featurizer(ep.support_x).view(3, shot, -1).mean(1)
            q = featurizer(ep.query_x)
            distances = ((q[:, None, :] - z[None]) ** 2).sum(-1)
            accs.append(float((distances.argmin(1) == ep.query_y).float().mean()))
    mean = sum(accs) / len(accs)
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1))
    return mean, 1.96 * std / math.sqrt(len(accs))


def test_episode_metrics_scores_only_the_prefixes_asked(protonet_run):
    args = json.loads((protonet_run / "args.json").read_text())
    trainer = Trainer(args["run"], "unused", protonet_run, "cpu")
    everything = episode_metrics(trainer.algorithm, trainer.dataset, trainer.splits, "class_pool", 3, 1, 2, 0, 2)
    assert set(everything) == {"val_fs_acc", "val_fs_ci", "test_fs_acc", "test_fs_ci"}
    only = episode_metrics(trainer.algorithm, trainer.dataset, trainer.splits, "class_pool", 3, 1, 2, 0, 2, ["test"])
    assert only == {k: v for k, v in everything.items() if k.startswith("test")}


def test_one_and_five_shot_in_one_call_each_from_the_checkpoint_rng(protonet_run, capsys):
    assert main([str(protonet_run), "--way", "3", "--query", "2", "--episodes", "6", "--shot", "1", "5"]) == 0
    one, five = (report(protonet_run, f"evaluate_3w{s}s2q_6.json") for s in (1, 5))
    assert set(one["pools"]) == set(five["pools"]) == {"test"}  # default: the held-out pools
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[2:4]] == ["1", "5"]
    assert main([str(protonet_run), "--way", "3", "--query", "2", "--episodes", "6", "--shot", "5"]) == 0
    assert report(protonet_run, "evaluate_3w5s2q_6.json")["pools"] == five["pools"]  # alone = after the 1-shot row
    mean, ci = hand_prototype_accuracy(protonet_run, 5, 2, 6)
    assert five["pools"]["test"]["acc"] == pytest.approx(mean, abs=1e-12)
    assert five["pools"]["test"]["ci"] == pytest.approx(ci, rel=1e-9)
    mean, ci = hand_prototype_accuracy(protonet_run, 1, 2, 6)
    assert one["pools"]["test"]["acc"] == pytest.approx(mean, abs=1e-12)


class NoisyProtoNet(registry.get_algorithm("ProtoNet")):
    """ProtoNet whose query logits carry noise from the global RNG: its scores depend on the RNG state."""

    def episode_logits(self, support_z, support_y, query_z, n_way):
        logits = super().episode_logits(support_z, support_y, query_z, n_way)
        return logits + 1e3 * torch.randn(logits.shape, dtype=logits.dtype, device=logits.device)


def test_a_random_adapt_is_scored_from_the_checkpoint_rng(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.ALGORITHMS, "NoisyProtoNet", NoisyProtoNet)
    run = tmp_path / "noisy"
    assert train_main(tiny_argv(run, "--algorithm", "NoisyProtoNet", "--fs-episodes", "8")) == 0
    record = last_record(run)
    setting = ["--way", "3", "--query", "2", "--episodes", "8", "--domains", "all"]
    assert main([str(run), *setting, "--shot", "1", "5"]) == 0
    one, five = (report(run, f"evaluate_3w{s}s2q_8.json")["pools"] for s in (1, 5))
    assert {k: (v["acc"], v["ci"]) for k, v in one.items()} == {
        k: (record[f"{k}_fs_acc"], record[f"{k}_fs_ci"]) for k in ("val", "test")}
    assert main([str(run), *setting, "--shot", "5", "--seed", "0"]) == 0
    assert report(run, "evaluate_3w5s2q_8.json")["pools"] == five
    assert main([str(run), *setting, "--shot", "1", "--seed", "1"]) == 0  # other episodes, other numbers
    assert report(run, "evaluate_3w1s2q_8.json")["pools"] != one


@pytest.mark.parametrize("algorithm, extra, names", [
    ("MAML", ["--hparams", json.dumps({"n_way": 3, "n_query": 2, "meta_batch_size": 2, "inner_steps_test": 2})],
     ["15°", "0"]),
    # a DG algorithm, scored by the default prototype adapt on its features
    ("ERM", ["--dataset", "TinyClassSplit", "--episode-protocol", "per_domain", "--hparams", '{"batch_size": 8}'],
     ["b", "0"]),
])
def test_other_algorithms_reproduce_their_per_domain_records(algorithm, extra, names, tmp_path):
    run = tmp_path / algorithm
    assert train_main(["--algorithm", algorithm, *extra, "--steps", "2", "--checkpoint-freq", "2", "--fs-episodes",
                       "3", "--fs-way", "3", "--fs-query", "2", "--test-envs", "0", "--output-dir", str(run),
                       "--no-progress", "--device", "cpu"]) == 0
    record = last_record(run)
    prefixes = sorted(k[:-len("_fs_acc")] for k in record if k.endswith("_fs_acc"))
    assert "env0" in prefixes
    (written,) = evaluate_run(run, way=3, shots=[1], query=2, episodes=3, domains=["all"])
    assert sorted(written["pools"]) == prefixes and written["protocol"] == "per_domain"
    for prefix in prefixes:
        assert (written["pools"][prefix]["acc"], written["pools"][prefix]["ci"]) == (
            record[f"{prefix}_fs_acc"], record[f"{prefix}_fs_ci"])
    by_name = evaluate_run(run, way=3, shots=[1], query=2, episodes=3, domains=names)[0]
    assert sorted(by_name["pools"]) == ["env0", "env1"] and by_name["pools"]["env0"] == written["pools"]["env0"]


def test_a_checkpointed_unfinished_run(tmp_path, monkeypatch, capsys):
    protonet = registry.get_algorithm("ProtoNet")
    update, calls = protonet.update, []

    def interrupted_after_two(self, batch):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return update(self, batch)

    monkeypatch.setattr(protonet, "update", interrupted_after_two)
    run = tmp_path / "killed"
    assert train_main(tiny_argv(run, "--steps", "4")) == 130
    monkeypatch.undo()
    assert not (run / "done").exists() and last_record(run)["step"] == 2
    assert main([str(run), *TINY, "--shot", "1", "--domains", "test"]) == 0
    written = report(run, "evaluate_3w1s2q_4.json")
    assert (written["step"], written["finished"]) == (2, False)
    assert written["pools"]["test"]["acc"] == last_record(run)["test_fs_acc"]
    assert "checkpoint of step 2 (not finished)" in capsys.readouterr().out


def test_data_dir_override(tmp_path, capsys):
    write_cifar100(tmp_path / "a")
    run = tmp_path / "run"
    assert train_main(["--algorithm", "ProtoNet", "--dataset", "CIFARFS", "--data-dir", str(tmp_path / "a"),
                       "--steps", "1", "--checkpoint-freq", "1", "--fs-episodes", "2", "--fs-way", "3",
                       "--fs-query", "1", "--hparams", json.dumps({"n_way": 3, "n_query": 1, "meta_batch_size": 1}),
                       "--output-dir", str(run), "--no-progress", "--device", "cpu"]) == 0
    shutil.move(tmp_path / "a", tmp_path / "b")
    capsys.readouterr()
    assert main([str(run), "--way", "3", "--shot", "1", "--query", "1", "--episodes", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: CIFAR-100 not found: expected train, test, meta in ")
    assert main([str(run), "--way", "3", "--shot", "1", "--query", "1", "--episodes", "2", "--data-dir",
                 str(tmp_path / "b")]) == 0
    written = report(run, "evaluate_3w1s1q_2.json")
    record = last_record(run)
    assert written["data_dir"] == str(tmp_path / "b")
    assert {k: v["acc"] for k, v in written["pools"].items()} == {"env1": record["env1_fs_acc"],
                                                                  "env2": record["env2_fs_acc"]}


def no_checkpoint(tmp_path: Path) -> Path:
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"run": {"algorithm": "ProtoNet"}}))
    return run


@pytest.mark.parametrize("make, extra, message", [
    (lambda tmp, run: tmp / "nowhere", [], r"^error: .*nowhere: no such folder; pass the output folder of a run of "
                                           r"python -m dg_meta.train \(its --output-dir\)$"),
    (lambda tmp, run: tmp, [], r"^error: .* holds no args.json, so it is not a run folder of python -m dg_meta.train"),
    (lambda tmp, run: no_checkpoint(tmp), [], r"^error: .*fresh holds no checkpoint.pt: the run has not reached its "
                                              r"first checkpoint"),
    (lambda tmp, run: run, ["--shot", "1", "19", "--query", "2"],
     r"^error: --shot 19 \+ --query 2: the pool of held-out domains has only 0 classes with 21 examples \(its largest "
     r"has 20\), fewer than --way 3; lower --shot or --query$"),
    (lambda tmp, run: run, ["--way", "9"], r"^error: --way 9: the pool of held-out domains has only 8 classes; lower "
                                           r"--way to at most 8$"),
    (lambda tmp, run: run, ["--domains", "env2"], r"^error: --domains env2: not an evaluation pool of this run "
                                                  r"\(class_pool episodes\); choose from val \(the pool of training "
                                                  r"domains\), test \(the pool of held-out domains\), or all$"),
    (lambda tmp, run: run, ["--episodes", "0"], r"^error: --way, --shot, --query and --episodes must be >= 1"),
    (lambda tmp, run: run, ["--episodes", "x"], r"^error: argument --episodes: invalid int value: 'x' \(see python -m "
                                                r"dg_meta.evaluate --help\)$"),
])
def test_bad_input_is_one_line_and_exit_code_2(make, extra, message, protonet_run, tmp_path, capsys):
    target = make(tmp_path, protonet_run)
    before = sorted(p.name for p in protonet_run.iterdir())
    assert main([str(target), "--way", "3", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.match(message, err.rstrip("\n")), err
    assert sorted(p.name for p in protonet_run.iterdir()) == before  # a refusal writes nothing


def test_cli_process_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dg_meta.evaluate", str(tmp_path / "none")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: ") and "no such folder" in proc.stderr
