"""Sweeps without Slurm: job definition and naming, the local and multiprocess launchers (same numbers),
idempotent relaunch, status of failures, relaunching only failed and unstarted jobs, TensorBoard read-back."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from dg_meta.launch import jobs as jobs_mod
from dg_meta.launch import launchers
from dg_meta.launch.launchers import SlurmJob, slurm_array_name
from dg_meta.launch.sweep import main as sweep_main
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from dg_meta.train import parse_args, resolve_run, run_name

PLUGIN = '''"""Test plug-in: ERM that refuses a non-default learning rate while the file $BRITTLE_FLAG exists."""
import os

from dg_meta.algorithms.erm import ERM
from dg_meta.registry import register_algorithm


@register_algorithm
class Brittle(ERM):
    def __init__(self, input_shape, num_classes, num_domains, hparams):
        flag = os.environ.get("BRITTLE_FLAG", "")
        if flag and os.path.exists(flag) and hparams["lr"] != 1e-3:
            raise ValueError(f"bad hparam lr={hparams['lr']:.2e}")
        super().__init__(input_shape, num_classes, num_domains, hparams)
'''
SMALL = ["--steps", "4", "--checkpoint-freq", "2"]


def write_plugin(folder: Path) -> Path:
    """Write the ``brittle_plugin`` module and a flag file that makes it fail; return the flag's path."""
    (folder / "brittle_plugin.py").write_text(PLUGIN)
    flag = folder / "brittle.flag"
    flag.write_text("")
    return flag


def results(run_dir: Path) -> list[dict]:
    """``results.jsonl`` without the wall-time keys (``*_time``)."""
    records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_time")} for r in records]


def run_dirs(sweep: Path) -> dict[str, Path]:
    """``{job name: run folder}``: every folder holding a ``job.json``, named by its path in the sweep."""
    return {p.parent.relative_to(sweep).as_posix(): p.parent for p in sorted(sweep.rglob("job.json"))}


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory) -> Path:
    sweep = tmp_path_factory.mktemp("local_sweep")
    assert sweep_main(["launch", "--output-dir", str(sweep), "--algorithms", "ERM", "--test-envs", "0", "1",
                       *SMALL]) == 0
    return sweep


def test_jobs_are_named_by_the_hash_of_their_train_arguments(tmp_path: Path):
    jobs = jobs_mod.sweep_jobs(tmp_path, ["ERM"], ["RotatedDigits"], test_envs=[0, 1], n_hparams=2, steps=4)
    assert len(jobs) == 4 == len({j.name for j in jobs})
    for job in jobs:
        assert job.output_dir == tmp_path.resolve() / run_name(resolve_run(parse_args(list(job.argv))))
        assert job.output_dir == tmp_path.resolve() / job.name
    assert [j.name.rsplit("-", 1)[0] for j in jobs] == [
        "ERM/RotatedDigits/te0/hp0/trial0", "ERM/RotatedDigits/te0/hp1/trial0",
        "ERM/RotatedDigits/te1/hp0/trial0", "ERM/RotatedDigits/te1/hp1/trial0"]
    assert all(len(j.name.rsplit("-", 1)[1]) == 10 for j in jobs)
    assert [job.argv[job.argv.index("--hparams-seed") + 1] for job in jobs] == ["0", "1", "0", "1"]
    assert {job.run["hparams"]["lr"] for job in jobs if job.run["hparams_seed"] == 0} == {1e-3}


def test_slurm_array_is_named_after_the_sweep(tmp_path: Path, monkeypatch):
    jobs = jobs_mod.sweep_jobs(tmp_path, ["ERM", "MLDG"], ["RotatedDigits"], test_envs=[0, 1], steps=4)
    assert slurm_array_name(jobs) == "dg_meta:ERM,MLDG:RotatedDigits"
    parameters = {}

    class Executor:  # records what launch_slurm asks submitit for, submits nothing
        def __init__(self, **kwargs):
            pass

        def update_parameters(self, **params):
            parameters.update(params)

        def map_array(self, function, folders, *args):
            return [SimpleNamespace(job_id=f"7_{i}", paths=SimpleNamespace(stderr=tmp_path / f"7_{i}.err"))
                    for i in range(len(folders))]

    monkeypatch.setattr(launchers.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(launchers.submitit, "AutoExecutor", Executor)
    launchers.launch_slurm(jobs, tmp_path / ".submitit", launchers.SlurmOptions())
    assert parameters["name"] == "dg_meta:ERM,MLDG:RotatedDigits"
    many = [jobs_mod.Job(("--algorithm", f"Algorithm{i}", "--dataset", "RotatedDigits"), tmp_path / str(i), {})
            for i in range(9)]
    name = slurm_array_name(many)
    assert len(name) == 64 and name.startswith("dg_meta:Algorithm0,Algorithm1,") and name.endswith("...")


def test_test_env_choices_default_every_domain_and_lodo_pairs():
    assert jobs_mod.test_env_choices(3, None, False) == [[0], [1], [2]]
    assert jobs_mod.test_env_choices(3, None, True) == [[0], [1], [2], [0, 1], [0, 2], [1, 2]]
    assert jobs_mod.test_env_choices(4, [2], True) == [[2], [0, 2], [1, 2], [2, 3]]


@pytest.mark.parametrize("argv, message", [
    (["--algorithms", "ERN"], "did you mean ERM"),
    (["--algorithms", "ERM", "--test-envs", "9"], "--test-envs [9] out of range: the dataset has domains 0..5"),
    (["--algorithms", "ERM", "--n-hparams", "0"], "--n-hparams and --n-trials must be >= 1, got 0 and 1"),
])
def test_launch_usage_errors_are_one_line(tmp_path: Path, capsys, argv: list[str], message: str):
    assert sweep_main(["launch", "--output-dir", str(tmp_path), *argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_status_of_missing_sweep_is_one_line(tmp_path: Path, capsys):
    assert sweep_main(["status", "--output-dir", str(tmp_path / "nope")]) == 2
    assert "does not exist: launch a sweep there first" in capsys.readouterr().err


def test_dry_run_lists_jobs_and_runs_nothing(tmp_path: Path, capsys):
    assert sweep_main(["launch", "--output-dir", str(tmp_path), "--algorithms", "ERM", "--test-envs", "2",
                       "--dry-run", *SMALL]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("1 jobs: 0 done, 0 pending and 0 running (left alone); "
                        "launching 0 failed and 1 not started with --launcher local")
    assert lines[1].startswith("not started  python -m dg_meta.train --algorithm ERM --dataset RotatedDigits "
                               "--test-envs 2 --hparams-seed 0")
    assert list(tmp_path.iterdir()) == []


def test_local_sweep_finishes_and_relaunch_starts_nothing(local_sweep: Path, capsys):
    assert sweep_main(["status", "--output-dir", str(local_sweep)]) == 0
    assert capsys.readouterr().out == "2 jobs: 2 done, 0 pending, 0 running, 0 failed, 0 not started\n"
    assert sweep_main(["launch", "--output-dir", str(local_sweep), "--algorithms", "ERM", "--test-envs", "0", "1",
                       *SMALL]) == 0
    assert "launching 0 failed and 0 not started" in capsys.readouterr().out
    for run in run_dirs(local_sweep).values():
        assert json.loads((run / "attempt.json").read_text())["attempt"] == 1
        assert [r["step"] for r in results(run)] == [2, 4]
        assert "attempt 1 on" in (run / "log.txt").read_text()


def test_tensorboard_event_files_hold_scalars_and_hparams(local_sweep: Path):
    name, run = next(iter(run_dirs(local_sweep).items()))
    assert name.startswith("ERM/RotatedDigits/te0/hp0/trial0-")
    records = results(run)
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss/loss", "test/0°", "val/75°", "train/15°", "paper/test_acc", "time/step_time"} <= set(tags)
    assert not [t for t in tags if t.startswith(("final/", "acc/"))]
    assert [(e.step, e.value) for e in acc.Scalars("val/15°")] == \
        [(r["step"], pytest.approx(r["env1_out_acc"])) for r in records]
    content = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(content)
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["algorithm"].string_value == "ERM" and hparams["lr"].number_value == pytest.approx(1e-3)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert "selected/training_domain_test_acc" in {m.name.tag for m in experiment.metric_infos}


def test_multiprocess_launcher_gives_the_same_results(local_sweep: Path, tmp_path: Path, capsys):
    assert sweep_main(["launch", "--output-dir", str(tmp_path), "--algorithms", "ERM", "--test-envs", "0", "1",
                       "--launcher", "multiprocess", "--workers", "2", *SMALL]) == 0
    assert "2 jobs: 2 done, 0 pending, 0 running, 0 failed, 0 not started" in capsys.readouterr().out
    local, multi = run_dirs(local_sweep), run_dirs(tmp_path)
    assert sorted(local) == sorted(multi)
    for name in local:
        assert results(multi[name]) == results(local[name])


def test_failure_is_reported_and_relaunch_reruns_only_failed_and_unstarted(tmp_path: Path, monkeypatch, capsys):
    flag = write_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("BRITTLE_FLAG", str(flag))
    sweep = tmp_path / "sweep"
    base = ["launch", "--output-dir", str(sweep), "--algorithms", "Brittle", "--plugin", "brittle_plugin",
            "--n-hparams", "2", "--steps", "2", "--checkpoint-freq", "2", "--test-envs"]
    assert sweep_main(base + ["0"]) == 1
    capsys.readouterr()
    assert sweep_main(["status", "--output-dir", str(sweep)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "2 jobs: 1 done, 0 pending, 0 running, 1 failed, 0 not started"
    assert lines[1].startswith("failed: Brittle/RotatedDigits/te0/hp1/trial0-")
    failed_name = lines[1].split(": ")[1]
    failed = sweep / failed_name
    assert lines[2] == f"  log: {failed / 'log.txt'}"
    assert lines[3].startswith("  error: ValueError: bad hparam lr=")
    assert "Traceback" in (failed / "log.txt").read_text()
    done_before = {n: d for n, d in run_dirs(sweep).items() if (d / "done").exists()}

    flag.unlink()
    assert sweep_main(base + ["0", "1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == ("4 jobs: 1 done, 0 pending and 0 running (left alone); "
                                   "launching 1 failed and 2 not started "
                                   "with --launcher local")
    assert out.splitlines()[-1] == "3 jobs: 3 done, 0 pending, 0 running, 0 failed, 0 not started"
    attempts = {n: json.loads((d / "attempt.json").read_text())["attempt"] for n, d in run_dirs(sweep).items()}
    assert attempts == {n: 2 if n == failed_name else 1 for n in attempts}
    assert set(done_before) <= set(attempts) and not (failed / "error.txt").exists()


def test_status_of_a_vanished_process_and_delete_incomplete(tmp_path: Path, capsys):
    (job,) = jobs_mod.sweep_jobs(tmp_path, ["ERM"], ["RotatedDigits"], test_envs=[3], steps=4)
    jobs_mod.record_manifest(tmp_path, [job])
    jobs_mod.write_job_file(job, cpus=1, launcher="local")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    (job.output_dir / "attempt.json").write_text(json.dumps({"attempt": 1, "host": os.uname().nodename, "pid": pid}))
    (state,) = jobs_mod.job_states([job])
    assert (state.state, state.detail) == ("failed", f"process {pid} ended without finishing (killed?)")
    assert sweep_main(["delete-incomplete", "--output-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "deleted 1 incomplete run folders; 0 pending or running jobs left alone\n"
    assert not job.output_dir.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.json"]  # the emptied ERM/... folders went too
    assert sweep_main(["status", "--output-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "1 jobs: 0 done, 0 pending, 0 running, 0 failed, 1 not started\n"


@pytest.mark.parametrize("state, submitted_ago, expected", [
    ("RUNNING", 999, ("running", "slurm job 7_1 RUNNING, no checkpoint yet")),
    ("PENDING", 999, ("pending", "slurm job 7_1 PENDING")),
    ("REQUEUED", 999, ("pending", "slurm job 7_1 REQUEUED")),
    ("FAILED", 999, ("failed", "slurm job 7_1 ended FAILED without a traceback")),
    (None, 5, ("pending", "slurm job 7_1 UNKNOWN")),
    (None, 999, ("failed", "slurm job 7_1 ended UNKNOWN without a traceback")),
])
def test_slurm_states_map_to_job_states(tmp_path: Path, state, submitted_ago, expected):
    job = jobs_mod.Job(("--algorithm", "ERM"), tmp_path / "run", {})
    info = {"slurm_job_id": "7_1", "submitted": jobs_mod.time.time() - submitted_ago, "slurm_log": "x.err"}
    result = jobs_mod._job_state(job, info, {} if state is None else {"7_1": state})
    assert (result.state, result.detail) == expected and result.log == Path("x.err")


def test_compressed_array_ids_expand():
    assert jobs_mod._expand_array("12_[0-2,5%2]") == ["12_0", "12_1", "12_2", "12_5"]
    assert jobs_mod._expand_array("12_3") == ["12_3"]


def test_slurm_job_checkpoint_requeues_the_same_call(tmp_path: Path):
    job = SlurmJob()
    delayed = job.checkpoint(str(tmp_path), ["--algorithm", "ERM"], 1)
    assert delayed.function is job and delayed.args == (str(tmp_path), ["--algorithm", "ERM"], 1)
    assert "preempted or timed out: requeueing" in (tmp_path / "log.txt").read_text()


def test_slurm_launcher_without_sbatch_is_one_line_error(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert sweep_main(["launch", "--output-dir", str(tmp_path / "s"), "--algorithms", "ERM", "--test-envs", "0",
                       "--launcher", "slurm", *SMALL]) == 2
    assert capsys.readouterr().err.startswith("error: --launcher slurm needs Slurm's sbatch on PATH")


def test_running_job_shows_step_and_eta_from_its_heartbeat(tmp_path: Path, capsys, monkeypatch):
    from dg_meta import heartbeat

    run = tmp_path / "ERM-run"
    run.mkdir()
    # 40 of 100 steps done in this attempt, which started 80 s ago at step 0 -> 2 s/step; 60 left -> 120 s
    monkeypatch.setattr(heartbeat.time, "time", lambda: 1000.0)
    heartbeat.write_heartbeat(run, 40, 100, 0, 920.0)
    beat = heartbeat.read_heartbeat(run)
    assert (beat.step, beat.steps, beat.seconds_per_step) == (40, 100, 2.0)
    assert beat.eta_seconds(now=1030.0) == 90.0
    (run / "job.json").write_text(json.dumps({"argv": ["--algorithm", "ERM"], "slurm_job_id": "9_3",
                                              "submitted": 0}))
    monkeypatch.setattr(jobs_mod, "slurm_states", lambda ids: {"9_3": "RUNNING"})
    assert sweep_main(["status", "--output-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "1 jobs: 0 done, 0 pending, 1 running, 0 failed, 0 not started",
        "running: ERM-run: slurm job 9_3 RUNNING, step 40/100, ETA 2m00s"]


def test_jobs_queued_in_a_live_launcher_are_pending(tmp_path: Path):
    job = jobs_mod.Job(("--algorithm", "ERM"), tmp_path / "run", {})
    here = {"launcher_pid": os.getpid(), "launcher_host": socket.gethostname()}
    assert jobs_mod._job_state(job, here, {}).state == "pending"
    assert jobs_mod._job_state(job, {**here, "launcher_pid": 2 ** 22 + 7}, {}).state == "not started"


def test_durations_read_as_a_person_writes_them():
    from dg_meta.heartbeat import format_duration

    assert [format_duration(s) for s in (45, 725, 11220)] == ["45s", "12m05s", "3h07m"]


def test_finished_runs_leave_a_final_heartbeat(local_sweep: Path):
    from dg_meta.heartbeat import read_heartbeat

    folders = sorted(p.parent for p in local_sweep.rglob("done"))
    assert len(folders) == 2
    for folder in folders:
        beat = read_heartbeat(folder)
        steps = json.loads((folder / "args.json").read_text())["run"]["steps"]
        assert (beat.step, beat.steps) == (steps, steps) and beat.seconds_per_step > 0


@pytest.mark.parametrize("cpus, workers, cores, gpus, expected", [
    (None, None, 8, 0, (1, 8)), (None, 2, 8, 0, (4, 2)), (None, 3, 8, 0, (2, 3)), (2, None, 8, 0, (2, 4)),
    (3, 2, 8, 0, (3, 2)), (None, None, 8, 2, (4, 2)), (None, 16, 8, 0, (1, 16)),
])
def test_multiprocess_jobs_get_their_share_of_the_cores(cpus, workers, cores, gpus, expected):
    from dg_meta.launch.launchers import share_of_cores

    assert share_of_cores(cpus, workers, cores, gpus) == expected
