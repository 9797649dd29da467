"""The bad-input battery of ``python -m dg_meta.train``, run in-process: every refusal is exit 2 and one ``error:``
line, writes nothing (no empty run folder) and changes no file that was there before. Also: a diverging run stops
within ``FINITE_CHECK_EVERY`` steps of its first non-finite loss and says truthfully whether a checkpoint exists;
Ctrl-C exits 130 with one line naming the checkpoint kept and the command that resumes from it (run here: it
resumes); the files a run writes keep the user's umask; ``--threads`` sets torch's threads outside the run's
identity."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from torch import nn

import dg_meta.train as train_module
from dg_meta import registry
from dg_meta.algorithm import Algorithm
from dg_meta.hparams import HParam, positive
from dg_meta.train import FINITE_CHECK_EVERY, main, parse_args, resolve_run

ERM = ["--algorithm", "ERM", "--device", "cpu", "--no-progress"]


def snapshot(root: Path) -> dict[str, str | None]:
    """Every path below ``root``: a file's sha256, ``None`` for a folder."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def run_of(argv: list[str]) -> dict:
    return json.loads(json.dumps(resolve_run(parse_args(argv))))


def write_args(out: Path, argv: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps({"run": run_of(argv)}))


# each case: (set up the folder tmp, return (argv, the expected stderr line)); the output folder is tmp/"out"

def output_dir_is_a_file(tmp):
    (tmp / "out").write_text("my notes\n")
    return [*ERM, "--output-dir", str(tmp / "out")], (f"--output-dir {tmp / 'out'} is a file; choose another "
                                                      "--output-dir")


def output_dir_below_a_file(tmp):
    (tmp / "notes").write_text("my notes\n")
    out = tmp / "notes" / "run"
    return [*ERM, "--output-dir", str(out)], (f"--output-dir {out} cannot be created: {tmp / 'notes'} is a file; "
                                             "choose another --output-dir")


def checkpoint_without_args_json(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "checkpoint.pt").write_bytes(b"someone's checkpoint")
    (tmp / "out" / "results.jsonl").write_text('{"step": 10}\n')
    return [*ERM, "--output-dir", str(tmp / "out")], (
        f"{tmp / 'out'} holds checkpoint.pt, results.jsonl but no args.json, so it is not a complete dg_meta run "
        "folder; choose another --output-dir or delete that folder")


def unreadable_args_json(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "args.json").write_text('{"run": ')
    return [*ERM, "--output-dir", str(tmp / "out")], (
        f'{tmp / "out" / "args.json"} is not the args.json of a dg_meta run (unreadable, or no "run" object); '
        "choose another --output-dir or delete that folder")


def folder_of_a_run_with_other_arguments(tmp):
    argv = [*ERM, "--output-dir", str(tmp / "out")]
    write_args(tmp / "out", [*argv, "--seed", "1", "--steps", "7"])
    (tmp / "out" / "checkpoint.pt").write_bytes(b"its checkpoint")
    return argv, (f"{tmp / 'out'} holds a run with different arguments (seed, steps): choose another --output-dir "
                  "or delete that folder")


def done_without_results(tmp):
    argv = [*ERM, "--output-dir", str(tmp / "out")]
    write_args(tmp / "out", argv)
    (tmp / "out" / "done").write_text("")
    return argv, (f"{tmp / 'out'} is marked done but holds no results.jsonl records; delete that folder to run it "
                  "again")


def fs_way_above_the_classes_of_a_domain(tmp):
    return [*ERM, "--output-dir", str(tmp / "out"), "--fs-episodes", "2", "--fs-way", "12"], (
        "--fs-way 12: domain 0° has only 10 classes; lower --fs-way to at most 10")


def fs_query_above_the_examples_of_the_held_out_domain(tmp):
    return [*ERM, "--output-dir", str(tmp / "out"), "--fs-episodes", "2", "--test-envs", "3", "--fs-query", "99"], (
        "--fs-shot 1 + --fs-query 99: held-out domain 45° has only 0 classes with 100 examples, fewer than "
        "--fs-way 5; lower --fs-query or --fs-shot")


def fs_way_zero(tmp):
    return [*ERM, "--output-dir", str(tmp / "out"), "--fs-way", "0"], (
        "--fs-episodes must be >= 0 and --fs-way, --fs-shot, --fs-query >= 1, got 0, 0, 1, 15")


def missing_data_dir(tmp):  # a nested output folder: none of its parents may be left behind either
    return ["--algorithm", "ERM", "--dataset", "RotatedMNIST", "--data-dir", str(tmp / "nowhere"), "--no-progress",
            "--output-dir", str(tmp / "a" / "b" / "out")], "MNIST not found: expected train-images-idx3-ubyte, "


def n_way_above_the_training_classes(tmp):
    return ["--algorithm", "ProtoNet", "--device", "cpu", "--no-progress", "--output-dir", str(tmp / "out"),
            "--fs-episodes", "0", "--hparams", '{"n_way": 11}'], (
        "no domain has 11 classes with at least 6 examples each: lower n_way, k_shot or n_query")


def unknown_algorithm(tmp):
    return ["--algorithm", "MLGD", "--output-dir", str(tmp / "out")], "unknown algorithm 'MLGD': did you mean "


def unknown_dataset(tmp):
    return [*ERM, "--dataset", "RotatedMNSIT", "--output-dir", str(tmp / "out")], (
        "unknown dataset 'RotatedMNSIT': did you mean RotatedMNIST")


def hparams_not_json(tmp):
    return [*ERM, "--hparams", "{lr: 1}", "--output-dir", str(tmp / "out")], "--hparams is not valid JSON"


def unknown_hparam(tmp):
    return [*ERM, "--hparams", '{"lrr": 1}', "--output-dir", str(tmp / "out")], "unknown hparam 'lrr': did you mean lr?"


def held_out_domain_out_of_range(tmp):
    return [*ERM, "--test-envs", "6", "--output-dir", str(tmp / "out")], (
        "--test-envs 6 is out of range: this dataset has domains 0=0°, 1=15°")


def zero_steps(tmp):
    return [*ERM, "--steps", "0", "--output-dir", str(tmp / "out")], (
        "--steps and --checkpoint-freq must be >= 1, got 0 and 50")


def zero_threads(tmp):
    return [*ERM, "--threads", "0", "--output-dir", str(tmp / "out")], "--threads must be >= 1, got 0"


def compile_unsupported(tmp):
    return ["--algorithm", "MLDG", "--compile", "--output-dir", str(tmp / "out")], (
        "--compile: MLDG does not support torch.compile")


def init_from_a_folder_without_checkpoint(tmp):
    (tmp / "other").mkdir()
    return [*ERM, "--init-from", str(tmp / "other"), "--output-dir", str(tmp / "out")], (
        f"--init-from {tmp / 'other'}: the folder holds no checkpoint.pt")


CASES = [output_dir_is_a_file, output_dir_below_a_file, checkpoint_without_args_json, unreadable_args_json,
         folder_of_a_run_with_other_arguments, done_without_results, fs_way_above_the_classes_of_a_domain,
         fs_query_above_the_examples_of_the_held_out_domain, fs_way_zero, missing_data_dir,
         n_way_above_the_training_classes, unknown_algorithm, unknown_dataset, hparams_not_json, unknown_hparam,
         held_out_domain_out_of_range, zero_steps, zero_threads, compile_unsupported,
         init_from_a_folder_without_checkpoint]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default output folder would land here too
    (tmp_path / "keep.txt").write_text("a file that was there before\n")
    argv, expected = case(tmp_path)
    before = snapshot(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}"), err
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err
    assert snapshot(tmp_path) == before  # nothing created (no empty folder), nothing changed or lost


class NaNFromStep(Algorithm):
    """Test-only: a linear classifier whose update returns a NaN loss from step ``nan_at`` on (and a finite
    ``aux``); ``updates`` counts the calls, so a test sees where training stopped."""

    HPARAMS = {"nan_at": HParam(23, None, positive, "a positive integer", "first step with a NaN loss")}
    updates = 0

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.linear = nn.Linear(int(torch.tensor(input_shape).prod()), num_classes)

    def update(self, batch):
        type(self).updates += 1
        nan = type(self).updates >= self.hparams["nan_at"]
        return {"loss": torch.tensor(float("nan") if nan else 1.0), "aux": 0.5}

    def predict(self, x):
        return self.linear(x.flatten(1))


@pytest.fixture
def nan_algorithm(monkeypatch):
    monkeypatch.setitem(registry.ALGORITHMS, "NaNFromStep", NaNFromStep)
    monkeypatch.setattr(NaNFromStep, "updates", 0)
    return NaNFromStep


@pytest.mark.parametrize("nan_at, stop, kept", [
    (23, 30, "no checkpoint was saved before it"),
    (63, 70, "the checkpoint of step 50 in {out} is kept"),
])
def test_non_finite_loss_stops_within_the_check_interval(nan_at, stop, kept, nan_algorithm, tmp_path, capsys):
    out = tmp_path / "out"
    assert FINITE_CHECK_EVERY == 10
    argv = ["--algorithm", "NaNFromStep", "--device", "cpu", "--no-progress", "--steps", "200",
            "--checkpoint-freq", "50", "--hparams", json.dumps({"nan_at": nan_at}), "--output-dir", str(out)]
    assert main(argv) == 1
    assert nan_algorithm.updates == stop  # not the next checkpoint (50 or 100)
    assert capsys.readouterr().err == (
        f"error: loss became non-finite in steps {stop - 9}-{stop}: lower the learning rate (--hparams "
        f"'{{\"lr\": ...}}') and start a new run; {kept.format(out=out)}\n")
    if nan_at < 50:
        assert not (out / "checkpoint.pt").exists()
    else:
        assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 50
        assert [json.loads(line)["step"] for line in (out / "results.jsonl").read_text().splitlines()] == [50]


def test_erm_with_a_huge_learning_rate_stops_at_the_first_check(tmp_path, capsys):
    argv = [*ERM, "--steps", "200", "--hparams", '{"lr": 1e30}', "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 1
    assert capsys.readouterr().err.startswith("error: loss became non-finite in steps 1-10: ")


def test_threads_sets_torch_threads_and_is_not_part_of_the_run(nan_algorithm, tmp_path, capsys):
    argv = ["--algorithm", "NaNFromStep", "--device", "cpu", "--no-progress", "--steps", "1",
            "--hparams", '{"nan_at": 5}', "--output-dir", str(tmp_path / "out")]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main([*argv, "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "out" / "args.json").read_text())["run"] == run_of(argv)
    assert main(argv) == 0  # the same run without --threads: finished, not refused
    assert "error" not in capsys.readouterr().err


def interrupt(*_args, **_kwargs):
    raise KeyboardInterrupt


def main_interrupted(argv: list[str]) -> int:
    """``main(argv)``, failing the test (not ending pytest) if the interrupt escapes it."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("main let KeyboardInterrupt through")


def test_interrupt_before_anything_was_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_module, "train", interrupt)
    assert main_interrupted([*ERM, "--output-dir", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err == "interrupted before the run started: nothing was written\n"


def test_interrupt_before_the_first_checkpoint_gives_the_command_with_the_default_folder(tmp_path, capsys,
                                                                                       monkeypatch):
    def started_then_interrupted(run, data_dir, output_dir, *args, **kwargs):
        write_args(output_dir, ERM)
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_module, "train", started_then_interrupted)
    assert main_interrupted(ERM) == 130
    out = train_module.default_output_dir(resolve_run(parse_args(ERM)))
    command = shlex.join([sys.executable, "-m", "dg_meta.train", *ERM, "--output-dir", str(out)])
    assert capsys.readouterr().err == (f"interrupted before the first checkpoint: nothing to resume in {out}; "
                                       f"start over with: {command}\n")


INTERRUPTED = re.compile(r"interrupted: the checkpoint of step (\d+) in (.+) is kept; resume with: (.+)\n")


def _interrupt_after_a_new_checkpoint(command: list[str], ckpt: Path) -> tuple[int, str]:
    """Start ``command`` (umask 027), send SIGINT once it has replaced ``ckpt``; return (exit code, stderr)."""
    old = ckpt.stat().st_ino if ckpt.exists() else None
    # a user's Ctrl-C reaches a process whose SIGINT is not ignored; a runner started in the background (a
    # non-interactive shell's `cmd &`) passes SIGINT down ignored, so restore the default in the child
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            umask=0o027, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        start = time.time()
        while not ckpt.exists() or ckpt.stat().st_ino == old:
            assert proc.poll() is None, proc.communicate()
            assert time.time() - start < 300
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # a failed check must not leave a 100000-step run behind
            proc.kill()
            proc.communicate()
    return proc.returncode, err


def test_ctrl_c_prints_the_checkpoint_and_the_command_that_resumes(tmp_path):
    out = tmp_path / "run"
    argv = [*ERM, "--steps", "100000", "--checkpoint-freq", "2", "--output-dir", str(out)]
    command = [sys.executable, "-m", "dg_meta.train", *argv]
    code, err = _interrupt_after_a_new_checkpoint(command, out / "checkpoint.pt")
    assert code == 130 and "Traceback" not in err, err
    step, folder, resume = INTERRUPTED.fullmatch(err).groups()
    assert int(step) == torch.load(out / "checkpoint.pt", weights_only=True)["step"] and folder == str(out)
    assert resume == shlex.join(command)
    first = (out / "results.jsonl").read_text().splitlines()
    assert len(first) == int(step) // 2

    code, err = _interrupt_after_a_new_checkpoint(shlex.split(resume), out / "checkpoint.pt")
    assert code == 130, err
    later = int(INTERRUPTED.fullmatch(err).group(1))
    assert later > int(step)
    # resumed, not restarted: the records before the interrupt are kept byte for byte (their timings too)
    assert (out / "results.jsonl").read_text().splitlines()[:len(first)] == first
    # every file and folder the run made keeps the umask (027): rw-r----- and rwxr-x---
    modes = {p.relative_to(out): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert modes and all(mode == (0o750 if (out / p).is_dir() else 0o640) for p, mode in modes.items()), modes
