"""Smoke tests of bench/train_speed.py, bench/maml_speed.py and bench/reproduce_domainbed.py: CLI, JSON, collected
tables, doc."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_speed = _load("train_speed")
reproduce = _load("reproduce_domainbed")
maml_speed = _load("maml_speed")


def test_train_speed_json_and_identical_sync_variant(tmp_path, capsys):
    out = tmp_path / "speed.json"
    code = train_speed.main(["--dataset", "RotatedDigits", "--device", "cpu", "--steps", "2", "--warmup", "1",
                             "--batch-size", "4", "--workers", "0", "--variants", "sync", "--output", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert report["batch"] == "4 x 5 domains"
    assert set(report["results"]) == {"memory", "dataloader", "sync"}
    assert report["ratio_memory_vs_dataloader"] == pytest.approx(
        report["results"]["memory"]["steps_per_s"] / report["results"]["dataloader"]["steps_per_s"])
    # same initialisation and the same batches: a synchronisation alone changes nothing
    assert report["results"]["sync"]["max_param_diff"] == 0.0
    assert report["results"]["sync"]["final_loss"] == report["results"]["memory"]["final_loss"]


def test_maml_speed_reports_every_path_with_the_loops_meta_gradient(tmp_path):
    out = tmp_path / "maml.json"
    report = maml_speed.main(["--device", "cpu", "--repeats", "1", "--shots", "1", "--meta-batches", "2",
                              "--orders", "first", "--inner-steps", "1", "--paths", "loop", "threads", "batched",
                              "higher", "--no-memory", "--output", str(out)])
    assert json.loads(out.read_text()) == report
    paths = report["maml"][0]["paths"]
    assert set(paths) == {"loop", "threads", "batched", "higher"}
    assert paths["loop"]["speed_vs_loop"] == 1.0 and paths["higher"]["speed_vs_higher"] == 1.0
    assert all(p["max_grad_rel_diff_vs_loop"] < 1e-4 for p in paths.values())  # float32 rounding only


def test_train_speed_fused_needs_cuda(capsys):
    code = train_speed.main(["--dataset", "RotatedDigits", "--device", "cpu", "--steps", "1", "--warmup", "0",
                             "--workers", "0", "--variants", "fused"])
    assert code == 2
    assert "the fused variant needs --device cuda" in capsys.readouterr().err


def test_reproduce_rejects_zero_trials(capsys):
    assert reproduce.main(["--trials", "0", "--collect-only", "--no-doc"]) == 2
    assert "--trials must be >= 1, got 0" in capsys.readouterr().err


def _fake_run(folder: Path, algorithm: str, test_env: int, trial: int, accs: list[float]) -> None:
    """A finished RotatedMNIST run with two checkpoints (steps 100 and 200)."""
    folder.mkdir(parents=True)
    records = []
    for step, acc in ((100, accs[0]), (200, accs[1])):
        record = {"step": step, "step_time": 0.5, "eval_time": 10.0, "loss": 0.1,
                  "args": {"algorithm": algorithm, "dataset": "RotatedMNIST", "test_envs": [test_env],
                           "hparams_seed": 0, "trial_seed": trial, "seed": trial}, "hparams": {}}
        for env in range(6):
            record[f"env{env}_in_acc"] = acc if env == test_env else 0.9
            record[f"env{env}_out_acc"] = acc if env == test_env else (0.8 if step == 100 else 0.85)
        records.append(record)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "done").write_text("")


def test_reproduce_collect_only_writes_its_section(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for trial, accs in enumerate(([0.5, 0.96], [0.5, 0.94])):
        _fake_run(sweep / f"erm{trial}", "ERM", 0, trial, accs)
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    assert reproduce.main(["--collect-only", "--output-dir", str(sweep), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "<!-- other:start -->\nkept\n<!-- other:end -->" in text
    assert "<!-- domainbed-reproduction:start -->" in text and "<!-- domainbed-reproduction:end -->" in text
    # training-domain validation picks step 200 (val 0.85 > 0.80): held-out 96 and 94 -> 95.0 ± 1.0
    assert "| ERM (ours) | 95.0 ± 1.0 (2) |" in text
    assert "| ERM (DomainBed) | 95.9 |" in text
    # 200 steps x 0.5 s + 2 evaluations x 10 s = 120 s per run, 500 ms per step
    assert "| RotatedMNIST | ERM | 2 | 120 | 500.0 |" in text


def test_reproduce_launches_a_tiny_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    argv = ["--datasets", "RotatedDigits", "--algorithms", "ERM", "--test-envs", "0", "--trials", "1",
            "--steps", "2", "--checkpoint-freq", "1", "--workers", "1", "--output-dir", str(sweep), "--no-doc"]
    assert reproduce.main(argv) == 0
    assert len(list(sweep.glob("**/done"))) == 1
    launches = json.loads((sweep / "reproduce.json").read_text())["launches"]
    assert len(launches) == 1 and launches[0]["stopped_by_time_limit"] is False


def test_fewshot_omniglot_table_and_resume(tmp_path, monkeypatch):
    from test_fewshot_data import SMALL1_ALPHABETS, SMALL2_ONLY_ALPHABETS, write_alphabets

    fewshot = _load("fewshot_omniglot")
    data = tmp_path / "data"
    write_alphabets(data / "images_background_small1", SMALL1_ALPHABETS, 2, 3)
    write_alphabets(data / "images_background_small2", ["Greek"] + SMALL2_ONLY_ALPHABETS, 2, 16)
    doc, results = tmp_path / "benchmarks.md", tmp_path / "cells.jsonl"
    doc.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    argv = ["--data-dir", str(data), "--algorithms", "ProtoNet", "--settings", "5w1s", "--steps", "2",
            "--episodes", "3", "--device", "cpu", "--hparams", '{"ProtoNet": {"n_query": 1}}',
            "--output", str(doc), "--results", str(results)]
    assert fewshot.main(argv) == 0
    (cell,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert (cell["algorithm"], cell["setting"], cell["steps"], cell["hparams"]) == ("ProtoNet", "5w1s", 2,
                                                                                  {"n_query": 1})
    assert "## Other\n\nkept" in doc.read_text()
    assert f"| ProtoNet | {100 * cell['acc']:.1f} ± {100 * cell['ci95']:.1f} |" in doc.read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a stored cell was trained again")

    monkeypatch.setattr(fewshot, "train_and_test", no_training)
    assert fewshot.main(argv) == 0  # the same cell is reused
    with pytest.raises(AssertionError, match="trained again"):
        fewshot.main([*argv[:7], "3", *argv[8:]])  # another step budget is another cell
    assert fewshot.main([*argv[:3], "ProtoNet", "MatchingNet", *argv[4:], "--collect-only"]) == 0
    assert "| MatchingNet | not run |  |  |  |  |" in doc.read_text()


def test_fewshot_omniglot_trains_a_minibatch_learner_once_for_all_its_settings(tmp_path, monkeypatch, capsys):
    from test_fewshot_data import SMALL1_ALPHABETS, SMALL2_ONLY_ALPHABETS, write_alphabets

    fewshot = _load("fewshot_omniglot")
    assert {"Baseline", "BaselinePlusPlus", "RFS", "FewShotPretrain", "ProtoNet"} <= set(fewshot.few_shot_learners())
    assert "ERM" not in fewshot.few_shot_learners()
    data = tmp_path / "data"
    write_alphabets(data / "images_background_small1", SMALL1_ALPHABETS, 2, 8)  # 80% in split: 6 per class
    write_alphabets(data / "images_background_small2", ["Greek"] + SMALL2_ONLY_ALPHABETS, 2, 20)  # 5 shots + 15 queries
    trainings = []
    train = fewshot.train
    monkeypatch.setattr(fewshot, "train", lambda key, *a: trainings.append(key["setting"]) or train(key, *a))
    argv = ["--data-dir", str(data), "--algorithms", "Baseline", "ProtoNet", "--settings", "5w1s", "5w5s",
            "--steps", "2", "--episodes", "2", "--device", "cpu", "--hparams", '{"ProtoNet": {"n_query": 1}}',
            "--output", str(tmp_path / "doc.md"), "--results", str(tmp_path / "cells.jsonl")]
    assert fewshot.main(argv) == 0
    assert trainings == ["5w1s", "5w1s", "5w5s"]  # Baseline once, ProtoNet once per setting
    cells = [json.loads(line) for line in (tmp_path / "cells.jsonl").read_text().splitlines()]
    baseline = [c for c in cells if c["algorithm"] == "Baseline"]
    assert [c["setting"] for c in baseline] == ["5w1s", "5w5s"] and {c["steps"] for c in baseline} == {2}
    assert baseline[0]["train_s"] == baseline[1]["train_s"]  # one training, scored twice
    capsys.readouterr()
    assert fewshot.main([*argv[:3], "ERM", *argv[5:]]) == 2
    assert capsys.readouterr().err.startswith("error: ERM is not a few-shot learner (a meta-learner or "
                                              "FewShotPretrain's family): choose from ")


irm_cmnist = _load("irm_colored_mnist")


def test_irm_colored_mnist_runs_carry_the_papers_settings_and_refuse_no_seeds(capsys):
    runs = irm_cmnist.job_runs(irm_cmnist.build_parser().parse_args(["--seeds", "2"]))
    assert [(r["algorithm"], r["seed"]) for r in runs] == [("ERM", 0), ("ERM", 1), ("IRM", 0), ("IRM", 1),
                                                           ("VREx", 0), ("VREx", 1)]
    irm = runs[2]
    assert (irm["dataset"], irm["steps"], irm["holdout_fraction"]) == ("ColoredMNIST_IRM", 500, 0)
    assert irm["test_envs"] == [2]
    hp = irm["hparams"]
    assert (hp["hidden_dim"], hp["irm_lambda"], hp["irm_penalty_anneal_iters"]) == (390, 91257.18613115903, 190)
    assert hp["divide_loss_by_penalty_weight"] and not hp["irm_unbiased_penalty"] and hp["batch_size"] == 25000
    assert hp["weight_decay"] == pytest.approx(2 * 0.00110794568)
    assert runs[4]["hparams"]["vrex_lambda"] == 20000.0
    assert irm_cmnist.main(["--seeds", "0"]) == 2
    assert "--seeds and --steps must be >= 1" in capsys.readouterr().err
    assert irm_cmnist.mean_se([1.0, 3.0]) == "2.0 ± 1.0" and irm_cmnist.mean_se([4.0]) == "4.0"
