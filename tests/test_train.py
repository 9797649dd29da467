"""The training CLI: bad input, determinism, resume-equals-uninterrupted, atomic checkpoints."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, run_cli
from dg_meta.datasets.digits import RotatedDigits

from dg_meta import registry
from dg_meta.train import TIMING_KEYS, main


def records(folder):
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def untimed(recs):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in recs]


def short(out, *extra):
    return ["--algorithm", "ERM", "--steps", "20", "--checkpoint-freq", "10", "--output-dir", str(out),
            "--no-progress", *extra]


@pytest.mark.parametrize("argv, message", [
    (["--algorithm", "MLGD"], "error: unknown algorithm 'MLGD': did you mean "),
    (["--algorithm", "ERM", "--dataset", "RotatedMNSIT"], "error: unknown dataset 'RotatedMNSIT': did you mean "
                                                           "RotatedMNIST"),
    (["--algorithm", "ERM", "--test-envs", "6"], "error: --test-envs 6 is out of range: this dataset has domains "
                                                 "0=0°, 1=15°"),
    (["--algorithm", "ERM", "--hparams", "{lr: 1}"], "error: --hparams is not valid JSON"),
    (["--algorithm", "ERM", "--hparams", '{"lrr": 1}'], "error: unknown hparam 'lrr': did you mean lr?"),
    (["--algorithm", "ERM", "--steps", "x"], "error: argument --steps: invalid int value: 'x'"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capsys, tmp_path):
    assert main(argv + ["--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_data_dir_names_files_and_layout(capsys, tmp_path):
    assert main(["--algorithm", "ERM", "--dataset", "RotatedMNIST", "--data-dir", str(tmp_path / "nowhere"),
                 "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: MNIST not found: expected train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                          "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (or .gz) in ")
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in err and err.count("\n") == 1


def test_cli_process_exit_code_and_help():
    proc = run_cli("--algorithm", "MLGD")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: unknown algorithm 'MLGD'")
    help_text = run_cli("--help").stdout
    assert "algorithms: " in help_text and "ERM" in help_text and "RotatedDigits" in help_text


def test_same_seeds_same_records_and_trial_seed_changes_split(tmp_path):
    assert main(short(tmp_path / "a")) == 0
    assert main(short(tmp_path / "b")) == 0
    assert main(short(tmp_path / "c", "--trial-seed", "1")) == 0
    a, b, c = records(tmp_path / "a"), records(tmp_path / "b"), records(tmp_path / "c")
    assert [r["step"] for r in a] == [10, 20]
    # seed 0, 20 ERM steps: mean loss of steps 11-20 2.11 (ln 10 = 2.30 is chance; no optimizer step 2.35,
    # gradient ascent 7.07); training domains' out accuracy 0.22 on average (chance 0.10; no optimizer
    # step 0.10, gradient ascent 0.12)
    assert a[-1]["loss"] < 2.25, a[-1]["loss"]
    assert sum(a[-1][f"env{i}_out_acc"] for i in range(1, 6)) / 5 > 0.16
    assert untimed(a) == untimed(b)
    assert untimed(a) != untimed(c)
    expected = {f"env{i}_{s}_acc" for i in range(6) for s in ("in", "out")} | {"loss", "step", "step_time",
                                                                              "eval_time", "args", "hparams"}
    assert set(a[0]) == expected
    assert (tmp_path / "a" / "done").exists() and list((tmp_path / "a" / "tb").iterdir())
    args = json.loads((tmp_path / "a" / "args.json").read_text())
    assert args["run"]["hparams"]["batch_size"] == 16 and args["versions"]["torch"] == torch.__version__


def test_finished_run_is_not_rerun_and_mismatched_args_refused(tmp_path, capsys):
    out = tmp_path / "a"
    assert main(short(out)) == 0
    stamp = (out / "results.jsonl").stat().st_mtime_ns
    assert main(short(out)) == 0
    assert (out / "results.jsonl").stat().st_mtime_ns == stamp
    assert main(short(out, "--seed", "3")) == 2
    assert "holds a run with different arguments (seed)" in capsys.readouterr().err


def _wait_for(path, proc, timeout=120):
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - start < timeout
        time.sleep(0.05)


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    def argv_of(out):  # 40 steps, a checkpoint every 20, small batches: the kill lands between the two checkpoints
        argv = short(out, "--hparams", '{"batch_size": 4}')
        argv[3], argv[5] = "40", "20"
        return argv

    argv = argv_of(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "dg_meta.train", *argv], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "killed" / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["step"]
    assert resumed_from == 20
    assert main(argv) == 0
    assert main(argv_of(tmp_path / "straight")) == 0
    assert untimed(records(tmp_path / "killed")) == untimed(records(tmp_path / "straight"))


KILL_DURING_SECOND_SAVE = """
import os, signal, sys
import dg_meta.train as t
from dg_meta.atomic import atomic_write
calls = []
original = t.atomic_torch_save
def save(path, obj):
    calls.append(path)
    if len(calls) == 2:
        atomic_write(path, lambda f: (f.write(b"half a checkpoint"), f.flush(), os.kill(os.getpid(), signal.SIGKILL)))
    original(path, obj)
t.atomic_torch_save = save
sys.exit(t.main(sys.argv[1:]))
"""


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_SAVE, *short(out)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 10
    assert [p for p in out.iterdir() if p.name.endswith(".tmp")]  # the half-written file is there
    assert main(short(out)) == 0
    assert [r["step"] for r in records(out)] == [10, 20]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


class ShuffledTestLabels(RotatedDigits):
    """RotatedDigits whose held-out domain 0 has its labels permuted (test-only dataset)."""

    def __init__(self, root, hparams):
        super().__init__(root, hparams)
        labels = self.domains[0].labels
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))
        self.domains[0].labels = labels[perm]
        self.domains[0]._labels_dev = labels[perm]


def test_test_domain_labels_do_not_affect_training_or_validation(tmp_path):
    registry.register_dataset(ShuffledTestLabels)
    assert main(short(tmp_path / "plain")) == 0
    assert main(short(tmp_path / "shuffled", "--dataset", "ShuffledTestLabels")) == 0
    plain, shuffled = records(tmp_path / "plain"), records(tmp_path / "shuffled")
    for p, s in zip(plain, shuffled):
        assert p["loss"] == s["loss"]
        assert all(p[f"env{i}_out_acc"] == s[f"env{i}_out_acc"] for i in range(1, 6))
    assert any(p["env0_in_acc"] != s["env0_in_acc"] for p, s in zip(plain, shuffled))


@pytest.mark.slow
def test_erm_reaches_90_percent_on_held_out_30_degrees(tmp_path):
    assert main(["--algorithm", "ERM", "--test-envs", "2", "--checkpoint-freq", str(RotatedDigits.N_STEPS),
                 "--output-dir", str(tmp_path / "erm"), "--no-progress"]) == 0  # one evaluation, at the end
    final = records(tmp_path / "erm")[-1]
    assert final["step"] == RotatedDigits.N_STEPS
    assert final["env2_in_acc"] >= 0.90, final["env2_in_acc"]


@pytest.mark.slow
def test_compile_changes_speed_not_the_run(tmp_path, capsys, monkeypatch):
    common = ["--algorithm", "ERM", "--steps", "4", "--checkpoint-freq", "2", "--no-progress"]
    assert main([*common, "--output-dir", str(tmp_path / "eager")]) == 0
    compiled_modules, original = [], torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *a, **k: (compiled_modules.append(type(self).__name__), original(self, *a, **k)))
    assert main([*common, "--output-dir", str(tmp_path / "compiled"), "--compile"]) == 0
    assert compiled_modules == ["Sequential"]  # ERM's network
    eager, compiled = ([json.loads(line) for line in (tmp_path / name / "results.jsonl").read_text().splitlines()]
                       for name in ("eager", "compiled"))
    for a, b in zip(eager, compiled, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert all(b[k] == pytest.approx(a[k], abs=0.02) for k in a if k.endswith("_acc"))
    capsys.readouterr()
    assert main(["--algorithm", "MLDG", "--compile", "--output-dir", str(tmp_path / "mldg")]) == 2
    assert capsys.readouterr().err == ("error: --compile: MLDG does not support torch.compile (it differentiates "
                                       "through its networks twice, or is unchecked); run it without --compile\n")
    assert not (tmp_path / "mldg").exists()
