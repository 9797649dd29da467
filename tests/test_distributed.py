"""One run on several processes (``dg_meta.distributed``): two gloo processes on the CPU against one.

The torchrun launch of ``distributed_harness.py`` (module fixture, float64 through ``distributed_plugin.py``)
gives the gradients of the first update on two processes and on one, the records of short runs of ERM, CORAL,
MAML (second order) and ProtoNet both ways, and the refusals. Then a launch whose rank 1 kills itself
(SIGKILL) after the first checkpoint, its re-run on two processes, and its resumption on one; and, when a
Slurm cluster answers, the same run as a 2-task Slurm job. Measured (float64): gradients within 6e-16 of the
single-process ones, records within 3e-15 (ProtoNet's identical); the killed run ends 1-7 s after the kill.
Under pytest-xdist the launches run once per session (``_once``), whichever worker needs them first.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import REPO
from distributed_harness import CASES, PLUGIN, REFUSED, RUN_ALGORITHMS, argv
from filelock import FileLock

from dg_meta import distributed
from dg_meta.errors import UsageError
from dg_meta.train import TIMING_KEYS

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--monitor-interval", "0.5"]
GRADIENT_TOLERANCE = 1e-6  # float64; measured <= 6e-16
RECORD_TOLERANCE = 1e-9  # float64, relative; measured <= 3e-15 (summation order of the averaged gradients)
KILL_STEP = 4  # rank 1 dies before step 5, after the checkpoint of step 3
DIED = "error: process 1 of 2 died without reporting an error"
EXIT_BOUND_S = 60  # after the kill; measured about 1 s (gloo sees the closed connection at the next collective)


def _slurm_missing() -> str | None:
    """Why the Slurm test cannot run (as ``tests/test_slurm.py`` decides), or None."""
    if shutil.which("sinfo") is None:
        return "Slurm is not available (no sinfo on PATH): run bash ../shared/slurm/start_local_slurm.sh"
    probe = subprocess.run(["sinfo", "-h"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"sinfo fails ({probe.stderr.strip()}): is slurmctld running?"


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def _assert_close_records(ours: list[dict], reference: list[dict], tolerance: float) -> None:
    assert [r["step"] for r in ours] == [r["step"] for r in reference]
    for mine, theirs in zip(ours, reference):
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            if isinstance(value, float):
                assert math.isclose(mine[key], value, rel_tol=tolerance, abs_tol=tolerance), (mine["step"], key)
            else:
                assert mine[key] == value, key


def _once(tmp_path_factory, worker_id: str, name: str, build: Callable[[Path], dict]) -> dict:
    """``build(folder)`` once per test session: under pytest-xdist the workers share the first one's result
    (the folder next to their own temporary folders, under a file lock), so the launches are not repeated."""
    if worker_id == "master":
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent
    with FileLock(str(shared / f"{name}.lock")):
        result = shared / f"{name}.json"
        if not result.is_file():
            (shared / name).mkdir()
            result.write_text(json.dumps(build(shared / name)))
        return json.loads(result.read_text())


def _run_harness(out: Path) -> dict:
    proc = subprocess.run([*TORCHRUN, str(REPO / "tests" / "distributed_harness.py"), str(out)], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=600)
    return {"out": str(out), "code": proc.returncode, "stderr": proc.stderr[-3000:]}


@pytest.fixture(scope="module")
def harness(tmp_path_factory, worker_id: str) -> Path:
    launch = _once(tmp_path_factory, worker_id, "harness", _run_harness)
    assert launch["code"] == 0, launch["stderr"]
    return Path(launch["out"])


def _report(harness: Path, rank: int) -> dict:
    return json.loads((harness / f"rank{rank}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", list(CASES))
def test_two_processes_give_the_single_process_gradient(harness: Path, algorithm: str):
    """Sharded batch, averaged gradients (CORAL: gathered features): the union of the shards' batches gives
    the single-process gradient (MAML second order; Reptile: its new meta-weights) on both ranks."""
    for rank in (0, 1):
        report = _report(harness, rank)
        assert report["gradients"][algorithm] < GRADIENT_TOLERANCE, report["gradients"]
        assert report["scale"][algorithm] > 1e-3  # the gradients compared are not all zero


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", RUN_ALGORITHMS)
def test_two_processes_write_the_single_process_records(harness: Path, algorithm: str):
    """Losses (averaged over the ranks), accuracies and few-shot scores (ProtoNet's on batch-norm running
    statistics merged over the ranks) of a 2-process run equal the single-process run's."""
    _assert_close_records(_records(harness / "dist" / algorithm), _records(harness / "single" / algorithm),
                          RECORD_TOLERANCE)
    assert not list((harness / "dist" / algorithm).glob("rank*"))


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(REFUSED)))
def test_refused_runs_end_with_one_line_from_rank_0(harness: Path, case: int):
    """An algorithm without a data-parallel form, hparams that keep one on one process, and batches that do
    not split evenly are refused before anything is written, in one line printed once."""
    expected = REFUSED[case][1]
    first, second = _report(harness, 0)["refused"][str(case)], _report(harness, 1)["refused"][str(case)]
    assert first["code"] == second["code"] == 2
    assert first["stderr"].startswith(expected) and first["stderr"].count("\n") == 1, first["stderr"]
    assert second["stderr"] == ""
    assert not (harness / f"refused{case}").exists()


def _run_killed(root: Path) -> dict:
    command = [*TORCHRUN, "-m", "dg_meta.train", *argv("ERM", root / "run"), "--plugin", str(PLUGIN)]
    stamp = root / "killed_at"
    proc = subprocess.run(command, cwd=REPO, env=_env(DG_META_TEST_KILL=f"1:{KILL_STEP}",
                                                      DG_META_TEST_KILL_STAMP=str(stamp)),
                          capture_output=True, text=True, timeout=600)
    seconds = time.time() - float(stamp.read_text()) if stamp.is_file() else math.inf
    shutil.copytree(root / "run", root / "copy")
    return {"code": proc.returncode, "stderr": proc.stderr, "seconds": seconds, "command": command,
            "root": str(root)}


@pytest.fixture(scope="module")
def killed(tmp_path_factory, worker_id: str) -> dict:
    """A 2-process ERM run whose rank 1 kills itself (SIGKILL) before step ``KILL_STEP + 1``; ``run`` is its
    folder, ``copy`` a copy made right after it ended."""
    launch = _once(tmp_path_factory, worker_id, "killed", _run_killed)
    return {**launch, "root": Path(launch["root"])}


@pytest.mark.slow
def test_a_killed_process_ends_the_run_in_one_line_and_a_rerun_resumes(killed: dict, harness: Path):
    assert killed["code"] != 0 and killed["seconds"] < EXIT_BOUND_S, killed["seconds"]  # seconds after the kill
    lines = [line for line in killed["stderr"].splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(DIED), killed["stderr"][-3000:]
    run = killed["root"] / "run"
    assert f"the checkpoint of step 3 in {run} is kept" in lines[0]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 3
    assert not (run / "done").exists() and [r["step"] for r in _records(run)] == [3]
    again = subprocess.run(killed["command"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _records(run) == _records(harness / "dist" / "ERM")  # same world size: the same numbers exactly


@pytest.mark.slow
def test_a_run_of_two_processes_resumes_on_one(killed: dict, harness: Path):
    run = killed["root"] / "copy"
    proc = subprocess.run([sys.executable, "-m", "dg_meta.train", *argv("ERM", run), "--plugin", str(PLUGIN)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_close_records(_records(run), _records(harness / "dist" / "ERM"), RECORD_TOLERANCE)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(_slurm_missing() is not None, reason=str(_slurm_missing()))
def test_a_two_task_slurm_job_runs_the_two_process_run(harness: Path, tmp_path: Path):
    """``--tasks-per-job 2``: one Slurm job of two tasks on the node, each a process of the run (ranks from
    Slurm's variables), gives the records of the torchrun launch."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "dg_meta.launch.sweep", "launch", "--output-dir", str(sweep), "--algorithms", "ERM",
         "--datasets", "FlatDigits64", "--plugin", str(PLUGIN), "--test-envs", "0", "--steps", "6",
         "--checkpoint-freq", "3", "--hparams", json.dumps(CASES["ERM"]), "--launcher", "slurm", "--cpus", "1",
         "--time", "15", "--tasks-per-job", "2", "--wait"], cwd=REPO, env=_env(), capture_output=True, text=True,
        timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (run,) = sweep.glob("ERM/FlatDigits64/te0/hp0/trial0-*")
    assert _records(run) == _records(harness / "dist" / "ERM")
    logs = sorted((sweep / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2 and all(f"dg_meta run {run}" in log.read_text() for log in logs)


def test_environment_from_torchrun_and_slurm(monkeypatch: pytest.MonkeyPatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                 "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_STEP_NODELIST",
                 "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.environment() is None
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert distributed.environment() is None  # a one-task Slurm job is a plain process
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("PATH", "")  # no scontrol: the node list is read by first_host
    assert distributed.environment() == distributed.Environment(3, 4, 1, "gpu07", 21234)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert distributed.environment() == distributed.Environment(1, 2, 1, None, None)


@pytest.mark.parametrize("nodes, first", [("node[03-05,07],gpu1", "node03"), ("a1", "a1"), ("gpu[1,3]", "gpu1")])
def test_first_host_of_a_slurm_node_list(nodes: str, first: str):
    assert distributed.first_host(nodes) == first


@pytest.mark.slow
def test_scaling_benchmark_reports_steps_per_second(tmp_path: Path):
    out = tmp_path / "scaling.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "scaling.py"), "--processes", "2", "--workloads", "erm",
                           "--steps", "4", "--batch-size", "4", "--threads", "1", "--output", str(out)], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["workloads"]["erm"]["runs"]
    assert row["processes"] == 2 and row["steps_per_s"] > 0 and row["examples_per_s"] == pytest.approx(
        row["steps_per_s"] * 20, rel=0.01)


def test_slurm_job_sizes_from_the_sweep_flags():
    from dg_meta.launch.sweep import slurm_tasks

    assert slurm_tasks(0, 0, None) == (1, 0) and slurm_tasks(2, 0, None) == (1, 2)  # one process, its GPUs
    assert slurm_tasks(0, 4, None) == (4, 1) == slurm_tasks(0, 4, 4)  # one process per GPU
    assert slurm_tasks(0, 0, 2) == (2, 0)  # CPU processes
    for bad in ((1, 2, None), (0, 2, 3), (0, 0, 0), (-1, 0, None)):
        with pytest.raises(UsageError):
            slurm_tasks(*bad)
