"""bench/dg_table.py on a tiny configuration: runs, table, idempotent section of the benchmarks doc."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("dg_table", REPO / "bench" / "dg_table.py")
dg_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dg_table)


def test_replace_section_is_idempotent_and_keeps_other_sections():
    text = "# Benchmarks\n\n## Other\n\nkeep me\n"
    once = dg_table.replace_section(text, "table v1")
    assert once.startswith(text.rstrip("\n")) and once.count("<!-- dg-table:start -->") == 1
    twice = dg_table.replace_section(once + "\n## Later\n\nalso kept\n", "table v2")
    assert "table v1" not in twice and "table v2" in twice
    assert "keep me" in twice and twice.endswith("## Later\n\nalso kept\n")
    assert dg_table.replace_section(twice, "table v2") == twice
    assert dg_table.replace_section("", "t").startswith("# Benchmarks\n\n<!-- dg-table:start -->\nt\n")


def test_tiny_benchmark_writes_the_table(tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Few-shot\n\nother helper's table\n")
    argv = ["--algorithms", "ERM", "Ensemble", "--datasets", "RotatedDigits", "--trials", "1", "--steps", "1",
            "--test-envs", "0", "--output-dir", str(tmp_path / "runs"), "--doc", str(doc)]
    assert dg_table.main(argv) == 0
    text = doc.read_text()
    assert "other helper's table" in text
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0] == "| Algorithm | 0° | Avg |"
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| ERM", "| Ensemble"]
    assert "±" not in "".join(lines[2:])  # one trial: a mean without an error
    assert len(list((tmp_path / "runs").glob("*/done"))) == 2
    assert dg_table.main(argv) == 0  # finished runs are skipped; the section is replaced, not appended
    assert doc.read_text().count("<!-- dg-table:start -->") == 1


def test_unknown_algorithm_is_a_usage_error(tmp_path, capsys):
    assert dg_table.main(["--algorithms", "MLDX", "--output-dir", str(tmp_path), "--doc", str(tmp_path / "b.md")]) == 2
    assert "did you mean MLDG" in capsys.readouterr().err


def test_quick_sets_one_trial_and_twenty_steps():
    args = dg_table.build_parser().parse_args(["--quick", "--algorithms", "ERM", "--datasets", "RotatedDigits"])
    for key, value in dg_table.QUICK.items():
        setattr(args, key, value)
    runs = dg_table.job_runs(args)
    assert len(runs) == 6 and {r["steps"] for r in runs} == {20} and {r["trial_seed"] for r in runs} == {0}


def test_shards_split_the_runs_and_collect_only_writes_the_table(tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    common = ["--algorithms", "ERM", "Ensemble", "--datasets", "RotatedDigits", "--trials", "2", "--steps", "1",
              "--test-envs", "0", "--output-dir", str(tmp_path / "runs"), "--doc", str(doc)]
    assert dg_table.main([*common, "--shard", "1/3"]) == 0
    assert not doc.exists()  # a shard's table would be partial
    assert sorted(p.parent.name.split("-")[1] for p in (tmp_path / "runs").glob("*/done")) == ["ERM"]
    assert dg_table.main([*common, "--collect-only"]) == 0  # trains nothing: one run of four in the table
    assert len(list((tmp_path / "runs").glob("*/done"))) == 1
    assert [line for line in doc.read_text().splitlines() if line.startswith("| ERM")] == [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| ERM")]
    for shard in ("0/3", "2/3"):
        assert dg_table.main([*common, "--shard", shard]) == 0
    assert len(list((tmp_path / "runs").glob("*/done"))) == 4
    assert dg_table.main([*common, "--collect-only"]) == 0
    rows = [line for line in doc.read_text().splitlines() if line.startswith("| E")]
    assert [row.count("(2)") for row in rows] == [2, 2]  # both trials of both algorithms


@pytest.mark.parametrize("shard", ["3/3", "1", "a/2", "0/0"])
def test_a_malformed_shard_is_a_usage_error(tmp_path, capsys, shard):
    assert dg_table.main(["--algorithms", "ERM", "--shard", shard, "--output-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: --shard {shard}: expected I/N with 0 <= I < N, e.g. --shard 0/4\n"
    assert not any(tmp_path.iterdir())


def test_run_seconds_add_each_records_steps_and_evaluation():
    records = [{"step": 50, "step_time": 0.2, "eval_time": 1.0}, {"step": 200, "step_time": 0.1, "eval_time": 2.0}]
    assert dg_table.run_seconds(records) == pytest.approx(50 * 0.2 + 1.0 + 150 * 0.1 + 2.0)
