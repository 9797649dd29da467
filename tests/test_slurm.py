"""Sweeps on a real Slurm cluster (start one with ``bash ../shared/slurm/start_local_slurm.sh``).

One module-scoped sweep on RotatedDigits, held-out domain 0, 1 trial: first the test plug-in ``Brittle`` x 2
hparams seeds while it refuses seed 1's learning rate (a failure), then ERM and ``Brittle`` after the fix, which
re-runs only the failed and the unstarted jobs (5 jobs in all: the fixture is the suite's longest wait). Then a
preemption (``scontrol requeue`` of a running task) and the local and multiprocess launchers, all compared on one
job's ``results.jsonl``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from dg_meta.launch import collect, launchers
from dg_meta.launch.jobs import manifest_jobs
from dg_meta.launch.sweep import main as sweep_main
from test_sweep import results, run_dirs, write_plugin


def _slurm_missing() -> str | None:
    if shutil.which("sinfo") is None:
        return "Slurm is not available (no sinfo on PATH): run bash ../shared/slurm/start_local_slurm.sh"
    probe = subprocess.run(["sinfo", "-h"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"sinfo fails ({probe.stderr.strip()}): is slurmctld running?"


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_slurm_missing() is not None, reason=str(_slurm_missing()))]

JOB = ["--steps", "20", "--checkpoint-freq", "10"]
SLURM = ["--launcher", "slurm", "--cpus", "1", "--time", "15"]
WAIT_S = 600


def _sweep(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = sweep_main(list(argv))
    return code, out.getvalue()


def _launch_args(sweep: Path, *algorithms: str) -> list[str]:
    return ["launch", "--output-dir", str(sweep), "--algorithms", *algorithms, "--plugin", "brittle_plugin",
            "--n-hparams", "2", "--test-envs", "0", *JOB, *SLURM, "--wait"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("slurm")
    flag = write_plugin(root)
    sweep_dir = root / "sweep"
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        mp.setenv("PYTHONPATH", str(root))
        mp.setenv("BRITTLE_FLAG", str(flag))
        first_code, first = _sweep(*_launch_args(sweep_dir, "Brittle"))
        _, status = _sweep("status", "--output-dir", str(sweep_dir))
        attempts = {n: json.loads((d / "attempt.json").read_text())["attempt"] for n, d in run_dirs(sweep_dir).items()}
        flag.unlink()
        second_code, second = _sweep(*_launch_args(sweep_dir, "ERM", "Brittle"))
    return {"dir": sweep_dir, "first": (first_code, first), "status": status, "attempts": attempts,
            "second": (second_code, second)}


def _erm_te0_seed0(sweep_dir: Path) -> Path:
    (run,) = sweep_dir.glob("ERM/RotatedDigits/te0/hp0/trial0-*")
    return run


def test_failure_is_reported_by_status_and_the_others_finish(sweep: dict):
    code, out = sweep["first"]
    assert code == 1 and re.search(r"submitted job array \d+ \(2 tasks\)", out)
    lines = sweep["status"].splitlines()
    assert lines[0] == "2 jobs: 1 done, 0 pending, 0 running, 1 failed, 0 not started"
    assert lines[1].startswith("failed: Brittle/RotatedDigits/te0/hp1/trial0-")
    log = Path(lines[2].removeprefix("  log: "))
    assert log.name.endswith("_log.err") and "ValueError: bad hparam lr=" in log.read_text()
    out = log.with_name(log.name.replace("_log.err", "_log.out")).read_text()
    assert f"dg_meta run {sweep['dir'].resolve() / lines[1].removeprefix('failed: ')}" in out
    assert lines[3].startswith("  error: ValueError: bad hparam lr=")


def test_relaunch_reruns_only_failed_and_unstarted_jobs(sweep: dict):
    code, out = sweep["second"]
    assert code == 0
    assert out.splitlines()[0] == ("4 jobs: 1 done, 0 pending and 0 running (left alone); "
                                   "launching 1 failed and 2 not started "
                                   "with --launcher slurm")
    assert out.splitlines()[-1] == "3 jobs: 3 done, 0 pending, 0 running, 0 failed, 0 not started"
    after = {n: json.loads((d / "attempt.json").read_text())["attempt"] for n, d in run_dirs(sweep["dir"]).items()}
    first = sweep["attempts"]
    assert len(first) == 2 and len(after) == 4
    failed = sweep["status"].splitlines()[1].removeprefix("failed: ")
    assert {n: a for n, a in after.items() if n in first} == {n: 2 if n == failed else 1 for n in first}
    assert all(a == 1 for n, a in after.items() if n not in first)


def test_collected_tables_have_every_cell_filled(sweep: dict):
    records = collect.load_records(sweep["dir"]).records
    for method in ("training_domain", "oracle"):
        (table,) = collect.selection_tables(records, method)
        assert table.columns == ["0°", "Avg"] and sorted(table.cells) == ["Brittle", "ERM"]
        assert all(cell is not None and 0 <= cell[0] <= 100 for cells in table.cells.values() for cell in cells)
    code, out = _sweep("collect", "--output-dir", str(sweep["dir"]))
    assert code == 0 and re.search(r"\| ERM \| \d+\.\d \(1\) \| \d+\.\d \(1\) \|$", out, re.M)


def test_sacct_shows_the_job_arrays(sweep: dict):
    ids = {json.loads((d / "job.json").read_text())["slurm_job_id"] for d in run_dirs(sweep["dir"]).values()}
    arrays = sorted({i.split("_")[0] for i in ids}, key=int)
    assert len(arrays) == 2
    for array, n_tasks, names in zip(arrays, (2, 3), ("Brittle", "ERM,Brittle")):
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,JobName,State", "-j", array],
                             capture_output=True, text=True, check=True).stdout
        rows = [line.split("|") for line in out.splitlines()]
        assert sorted(r[0] for r in rows) == sorted(f"{array}_{i}" for i in range(n_tasks))
        assert {r[1] for r in rows} == {f"dg_meta:{names}:RotatedDigits"}
    assert {i for i in ids if i.startswith(arrays[1] + "_")}  # the relaunched jobs ran in the second array


# Loaded by the job's interpreter (PYTHONPATH): while the hold file exists, training waits after its first
# checkpoint, so the requeue always lands mid-run however fast the machine is. Results are unaffected.
HOLD_SITECUSTOMIZE = """
import os, time
hold = os.environ.get("DG_META_TEST_HOLD")
if hold:
    import dg_meta.train as train
    next_batch = train.Trainer.next_batch
    def held_next_batch(self):
        while self.step >= 10 and os.path.exists(hold):
            time.sleep(0.1)
        return next_batch(self)
    train.Trainer.next_batch = held_next_batch
"""


def _wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_preempted_job_resumes_from_its_checkpoint_and_matches(sweep: dict, tmp_path: Path):
    sweep_dir = tmp_path / "preempt"
    (tmp_path / "sitecustomize.py").write_text(HOLD_SITECUSTOMIZE)
    hold = tmp_path / "hold"
    hold.write_text("")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(tmp_path))
        mp.setenv("DG_META_TEST_HOLD", str(hold))
        code, _ = _sweep("launch", "--output-dir", str(sweep_dir), "--algorithms", "ERM", "--test-envs", "0", *JOB,
                         *SLURM)
    assert code == 0
    (job,) = manifest_jobs(sweep_dir)
    run = job.output_dir
    _wait_until(lambda: (run / "results.jsonl").exists() and (run / "results.jsonl").read_text().strip(),
                "the job wrote no checkpoint in time")
    slurm_id = json.loads((run / "job.json").read_text())["slurm_job_id"]
    subprocess.run(["scontrol", "requeue", slurm_id], check=True, capture_output=True)
    _wait_until(lambda: "attempt 2" in (run / "log.txt").read_text(), "the requeued job did not start again")
    hold.unlink()
    launchers.wait([job], poll_s=2, timeout_s=WAIT_S)
    log = (run / "log.txt").read_text()
    assert re.search(rf"attempt [2-9] on \S+ \(slurm job {slurm_id}\): resuming from checkpoint.pt at step 10", log)
    assert (run / "done").exists()
    assert results(run) == results(_erm_te0_seed0(sweep["dir"]))


@pytest.mark.parametrize("launcher", ["local", "multiprocess"])
def test_local_and_multiprocess_launchers_match_slurm(sweep: dict, tmp_path: Path, launcher: str):
    code, _ = _sweep("launch", "--output-dir", str(tmp_path), "--algorithms", "ERM", "--test-envs", "0", *JOB,
                     "--launcher", launcher)
    assert code == 0
    reference = _erm_te0_seed0(sweep["dir"])
    run = tmp_path / reference.relative_to(sweep["dir"])
    assert results(run) == results(reference)
    assert json.loads((run / "job.json").read_text())["launcher"] == launcher
