"""TensorBoard in the protocol's terms, read back through TensorBoard's own loading (``EventAccumulator`` and a
``tensorboard`` server's HTTP data API on 127.0.0.1): readable run names, tags that name domains by their role,
the paper numbers, loss points every N steps (one host read-back each, none duplicated on resume), an HParams
column for every registered hparam with typed sentinels, and HParams metrics equal to what ``results.jsonl``
implies, computed here by hand."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from dg_meta.algorithms.erm import ERM
from dg_meta.launch.sweep import main as sweep_main
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dg_meta.train as train_mod
from dg_meta import registry
from dg_meta.hparams import declared_hparams
from dg_meta.tensorboard_log import RunLog, hparam_columns
from dg_meta.train import main, parse_args, resolve_run

DOMAINS = ["0°", "15°", "30°", "45°", "60°", "75°"]  # RotatedDigits; domain 0 is held out below
METRICS = ["selected/training_domain_test_acc", "selected/training_domain_val_acc", "selected/oracle_test_acc",
           "selected/oracle_val_acc", "paper/test_acc", "paper/val_acc", "paper/test_fs_acc", "paper/val_fs_acc"]
RUN_COLUMNS = {"algorithm", "dataset", "test_envs", "hparams_seed", "trial_seed", "seed"}
SERVER_WAIT_S = 120


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def val_acc(record: dict) -> float:
    """Training-domain validation: the mean ``out`` accuracy of domains 1..5."""
    return sum(record[f"env{i}_out_acc"] for i in range(1, 6)) / 5


def training_domain_so_far(recs: list[dict]) -> list[tuple[float, float]]:
    """(val, test) of the best checkpoint by training-domain validation among the first k, for every k (the
    first of equal maxima wins)."""
    best, out = None, []
    for r in recs:
        if best is None or val_acc(r) > best[0]:
            best = (val_acc(r), r["env0_in_acc"])
        out.append(best)
    return out


def all_hparam_names() -> set[str]:
    owners = [*map(registry.get_algorithm, registry.algorithm_names()),
              *map(registry.get_dataset, registry.dataset_names())]
    return set().union(*(declared_hparams(owner) for owner in owners))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tb_sweep")
    assert sweep_main(["launch", "--output-dir", str(folder), "--algorithms", "ERM", "MLDG", "--test-envs", "0",
                       "--steps", "6", "--checkpoint-freq", "2", "--fs-episodes", "2"]) == 0
    return folder


def run_dir(sweep: Path, algorithm: str) -> Path:
    (run,) = sweep.glob(f"{algorithm}/RotatedDigits/te0/hp0/trial0-*")
    return run


@pytest.mark.slow  # its fixture trains two runs
def test_tags_name_domains_by_their_role_and_carry_the_records(sweep: Path):
    run = run_dir(sweep, "ERM")
    recs, series = records(run), scalars(run)
    steps = [r["step"] for r in recs]
    assert steps == [2, 4, 6]
    fs_val = [f"val_fs/{DOMAINS[i]}" for i in range(1, 6) if f"env{i}_fs_acc" in recs[0]]
    assert set(series) == {"test/0°", "test_fs/0°", *fs_val, *(f"{role}/{d}" for role in ("train", "val")
                                                              for d in DOMAINS[1:]),
                           *(m for m in METRICS if m != "paper/val_fs_acc" or fs_val),
                           "loss/loss", "time/step_time", "time/eval_time"}

    def check(tag: str, values: list[float]) -> None:
        assert series[tag] == [(s, pytest.approx(v, rel=1e-6)) for s, v in zip(steps, values)], tag

    check("test/0°", [r["env0_in_acc"] for r in recs])
    check("test_fs/0°", [r["env0_fs_acc"] for r in recs])
    check("train/30°", [r["env2_in_acc"] for r in recs])
    check("val/30°", [r["env2_out_acc"] for r in recs])
    check("paper/test_acc", [r["env0_in_acc"] for r in recs])
    check("paper/val_acc", [val_acc(r) for r in recs])
    check("paper/test_fs_acc", [r["env0_fs_acc"] for r in recs])
    check("selected/training_domain_test_acc", [test for _, test in training_domain_so_far(recs)])
    check("selected/training_domain_val_acc", [val for val, _ in training_domain_so_far(recs)])
    check("selected/oracle_val_acc", [r["env0_out_acc"] for r in recs])


class CountingERM(ERM):
    """ERM that also returns its update count (a buffer, so it is checkpointed): a known loss per step."""

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        self.register_buffer("updates", torch.zeros(()))

    def update(self, batch):
        losses = super().update(batch)
        self.updates += 1
        return {**losses, "count": self.updates.clone()}


def test_losses_are_window_means_every_n_steps_and_resume_duplicates_none(tmp_path: Path, monkeypatch):
    registry.discover()
    monkeypatch.setitem(registry.ALGORITHMS, "CountingERM", CountingERM)
    run = resolve_run(parse_args(["--algorithm", "CountingERM", "--test-envs", "0", "--steps", "10",
                                  "--checkpoint-freq", "5"]))
    save = train_mod.atomic_torch_save

    def killed_while_saving_step_10(path, state):
        if state["step"] == 10:
            raise RuntimeError("killed")
        save(path, state)

    monkeypatch.setattr(train_mod, "atomic_torch_save", killed_while_saving_step_10)
    with pytest.raises(RuntimeError, match="killed"):
        train_mod.train(run, "data", tmp_path, "cpu", progress=False, log_every=3)
    monkeypatch.setattr(train_mod, "atomic_torch_save", save)
    train_mod.train(run, "data", tmp_path, "cpu", progress=False, log_every=3)
    series = scalars(tmp_path)
    # windows end every 3 steps and at each checkpoint (5, 10): steps 1-3, 4-5, 6, 7-9, 10; the killed attempt's
    # points after step 5 (its last checkpoint) are purged and written once by the resumed one
    assert series["loss/count"] == [(3, 2.0), (5, 4.5), (6, 6.0), (9, 8.0), (10, 10.0)]
    assert [s for s, _ in series["loss/loss"]] == [3, 5, 6, 9, 10]
    assert [s for s, _ in series["test/0°"]] == [5, 10]


class CountingReads(torch.Tensor):
    """A tensor that counts reads back to the host (``float``, ``item``, ``tolist``)."""

    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__float__, torch.Tensor.item, torch.Tensor.tolist):
            CountingReads.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_loss_points_read_the_device_once_per_window(tmp_path: Path):
    log = RunLog(tmp_path, {"checkpoint_freq": 100, "steps": 100, "test_envs": [0]}, DOMAINS, 0, log_every=5)
    CountingReads.reads = 0
    for step in range(1, 11):
        log.add_losses({"loss": torch.tensor(float(step)).as_subclass(CountingReads),
                        "penalty": torch.tensor(2.0 * step).as_subclass(CountingReads), "weight": 0.5}, step)
    assert CountingReads.reads == 2  # one read for both losses, per window of 5 steps
    log.writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss/loss")] == [(5, 3.0), (10, 8.0)]
    assert [(e.step, e.value) for e in acc.Scalars("loss/penalty")] == [(5, 6.0), (10, 16.0)]
    assert [(e.step, e.value) for e in acc.Scalars("loss/weight")] == [(5, 0.5), (10, 0.5)]


def test_hparam_columns_cover_every_registered_hparam_with_typed_sentinels():
    registry.discover()
    erm = hparam_columns(resolve_run(parse_args(["--algorithm", "ERM"])), DOMAINS)
    mldg_run = resolve_run(parse_args(["--algorithm", "MLDG", "--hparams-seed", "2"]))
    mldg = hparam_columns(mldg_run, DOMAINS)
    assert set(erm) == set(mldg) == all_hparam_names() | RUN_COLUMNS
    assert [n for n in erm if isinstance(erm[n], str) != isinstance(mldg[n], str)] == []  # one type per column
    assert (erm["beta"], erm["n_meta_test"], erm["second_order"], erm["dica_input"]) == (-1, -1, "n/a", "n/a")
    assert (mldg["beta"], mldg["n_meta_test"]) == (mldg_run["hparams"]["beta"], 1)
    assert mldg["second_order"] == ("true" if mldg_run["hparams"]["second_order"] else "false")
    assert (erm["nonlinear_classifier"], erm["lr"], erm["mmd_sigmas"]) == ("false", 1e-3, "n/a")
    assert (mldg["algorithm"], mldg["test_envs"], mldg["hparams_seed"], mldg["trial_seed"]) == ("MLDG", "0°", 2, 0)


def test_the_number_sentinel_is_no_value_a_declared_hparam_can_take():
    registry.discover()
    owners = [*map(registry.get_algorithm, registry.algorithm_names()),
              *map(registry.get_dataset, registry.dataset_names())]
    for owner in owners:
        for name, hp in declared_hparams(owner).items():
            if isinstance(hp.default, (int, float)) and not isinstance(hp.default, bool):
                draws = [hp.draw(np.random.default_rng(seed)) for seed in range(20)]
                assert min([hp.default, *draws]) >= 0, f"{owner.__name__}.{name} can be negative"


def test_log_every_below_one_is_a_one_line_error(tmp_path: Path, capsys):
    assert main(["--algorithm", "ERM", "--log-every", "0", "--output-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == "error: --log-every must be >= 1, got 0\n"
    assert not (tmp_path / "run").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(port: int, route: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{route}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


SESSION_GROUPS = {"experimentName": "", "allowedStatuses": ["STATUS_SUCCESS"], "colParams": [], "startIndex": 0,
                  "sliceSize": 100}


@pytest.mark.slow
def test_tensorboard_server_shows_run_names_tags_and_hparams_metrics(sweep: Path):
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(sweep),
                               "--host", "127.0.0.1", "--port", str(port), "--load_fast=false"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + SERVER_WAIT_S
        groups = None
        while groups is None or groups["totalSize"] < 2:
            assert time.monotonic() < deadline and server.poll() is None, "tensorboard did not load the sweep"
            time.sleep(1)
            try:
                groups = fetch(port, "/data/plugin/hparams/session_groups", SESSION_GROUPS)
            except (urllib.error.URLError, ConnectionError):
                continue
        runs = {algorithm: run_dir(sweep, algorithm) for algorithm in ("ERM", "MLDG")}
        names = {a: f"{run.relative_to(sweep).as_posix()}/tb" for a, run in runs.items()}
        assert sorted(fetch(port, "/data/runs")) == sorted(names.values())
        assert names["ERM"].startswith("ERM/RotatedDigits/te0/hp0/trial0-")
        tags = fetch(port, "/data/plugin/scalars/tags")
        assert {"test/0°", "val/15°", "train/15°", "paper/test_acc", "loss/loss"} <= set(tags[names["ERM"]])
        assert not [t for t in tags[names["ERM"]] if t.startswith(("final/", "hparams/"))]

        experiment = fetch(port, "/data/plugin/hparams/experiment", {"experimentName": ""})
        assert [m["name"]["tag"] for m in experiment["metricInfos"]] == METRICS
        columns = {h["name"]: h["type"] for h in experiment["hparamInfos"]}
        assert set(columns) == all_hparam_names() | RUN_COLUMNS
        assert (columns["beta"], columns["dica_input"], columns["second_order"]) == \
            ("DATA_TYPE_FLOAT64", "DATA_TYPE_STRING", "DATA_TYPE_STRING")

        by_run = {g["name"]: g for g in groups["sessionGroups"]}
        assert sorted(by_run) == sorted(names.values())
        for algorithm, run in runs.items():
            group = by_run[names[algorithm]]
            assert set(group["hparams"]) == set(columns)  # every column set: parallel coordinates keep the run
            recs = records(run)
            selected_val, selected_test = training_domain_so_far(recs)[-1]
            last = recs[-1]
            expected = {"selected/training_domain_test_acc": selected_test,
                        "selected/training_domain_val_acc": selected_val,
                        "selected/oracle_test_acc": last["env0_in_acc"],
                        "selected/oracle_val_acc": last["env0_out_acc"],
                        "paper/test_acc": last["env0_in_acc"], "paper/val_acc": val_acc(last),
                        "paper/test_fs_acc": last["env0_fs_acc"]}
            fs_val = [last[f"env{i}_fs_acc"] for i in range(1, 6) if f"env{i}_fs_acc" in last]
            if fs_val:
                expected["paper/val_fs_acc"] = sum(fs_val) / len(fs_val)
            values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
            assert values == {k: pytest.approx(v, rel=1e-6) for k, v in expected.items()}
        erm, mldg = by_run[names["ERM"]]["hparams"], by_run[names["MLDG"]]["hparams"]
        assert (erm["algorithm"], erm["beta"], erm["second_order"], erm["lr"]) == ("ERM", -1, "n/a", 1e-3)
        assert (mldg["algorithm"], mldg["beta"], mldg["second_order"]) == ("MLDG", 1.0, "true")
    finally:
        server.kill()
        server.wait(timeout=30)
