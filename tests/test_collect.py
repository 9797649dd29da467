"""``collect`` on a hand-made sweep folder: the numbers of all three selection methods, computed by hand,
the unfinished-run footnote, the few-shot table, the LaTeX structure and the plot."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from dg_meta.launch import collect
from dg_meta.launch.sweep import main as sweep_main

KEYS = [f"env{i}_{s}_acc" for i in range(3) for s in ("in", "out")]


def _record(alg: str, envs: list[int], hseed: int, trial: int, step: int, acc: dict[str, float]) -> dict:
    values = {} if alg == "P" else dict.fromkeys(KEYS, 0.0)
    values.update(acc)
    return {**values, "step": step, "loss": 0.1, "step_time": 0.01, "eval_time": 0.01, "hparams": {},
            "args": {"dataset": "Toy", "algorithm": alg, "test_envs": envs, "hparams_seed": hseed,
                     "trial_seed": trial, "seed": trial}}


def _acc(in_: dict[int, float] | None = None, out: dict[int, float] | None = None) -> dict[str, float]:
    acc = {f"env{i}_in_acc": v for i, v in (in_ or {}).items()}
    acc.update({f"env{i}_out_acc": v for i, v in (out or {}).items()})
    return acc


# (algorithm, test envs, hparams seed, trial) -> accuracies at steps 1 and 2
RUNS = {
    ("A", (0,), 0, 0): [_acc({0: .40}, {0: .50, 1: .60, 2: .70}), _acc({0: .45}, {0: .55, 1: .80, 2: .80})],
    ("A", (0,), 1, 0): [_acc({0: .90}, {0: .90, 1: .50, 2: .50}), _acc({0: .30}, {0: .95, 1: .90, 2: .60})],
    ("A", (0, 1), 0, 0): [_acc({1: .2}), _acc({1: .6})],
    ("A", (0, 2), 0, 0): [_acc({2: .4}), _acc({2: .6})],
    ("A", (0, 1), 1, 0): [_acc({1: .7}), _acc({1: .1})],
    ("A", (0, 2), 1, 0): [_acc({2: .9}), _acc({2: .1})],
    ("A", (1,), 0, 0): [_acc({1: .60}, {0: .50, 1: .70, 2: .50}), _acc({1: .70}, {0: .60, 1: .65, 2: .60})],
    ("A", (1,), 1, 0): [_acc({1: .80}, {0: .70, 1: .60, 2: .70}), _acc({1: .20}, {0: .40, 1: .90, 2: .40})],
    ("A", (0,), 0, 1): [_acc({0: .55}, {0: .60, 1: .50, 2: .50}), _acc({0: .65}, {0: .40, 1: .70, 2: .70})],
    ("My_B", (0,), 0, 0): [_acc({0: .20}, {0: .20, 1: .30, 2: .30}), _acc({0: .25}, {0: .30, 1: .20, 2: .20})],
    ("P", (0,), 0, 0): [{"env0_fs_acc": .1, "env0_fs_ci": .01, "env1_fs_acc": .9, "env2_fs_acc": .9},
                        {"env0_fs_acc": .6, "env0_fs_ci": .05, "env1_fs_acc": .7, "env2_fs_acc": .8}],
    ("P", (0,), 1, 0): [{"env0_fs_acc": .9, "env0_fs_ci": .02, "env1_fs_acc": .5, "env2_fs_acc": .5}],
}


def _write_run(folder: Path, records: list[dict], done: bool = True) -> None:
    folder.mkdir(parents=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if done:
        (folder / "done").write_text("")


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    for i, ((alg, envs, hseed, trial), steps) in enumerate(RUNS.items()):
        records = [_record(alg, list(envs), hseed, trial, s + 1, a) for s, a in enumerate(steps)]
        _write_run(tmp_path / f"run{i}", records)
    unfinished = [_record("A", [1], 0, 1, s, _acc({1: 1.0}, {0: 1.0, 1: 1.0, 2: 1.0})) for s in (1, 2, 3)]
    _write_run(tmp_path / "unfinished", unfinished, done=False)
    return tmp_path


# Hand computation (percent). Training-domain validation picks, per hparams seed, the checkpoint with the best
# mean out-accuracy of the training domains, then the best seed: A/env0 trial 0: seed 0 -> step 2 (val .80,
# test .45), seed 1 -> step 2 (val .75, test .30) -> .45; trial 1 -> step 2 (.70) -> .65; A/env1: seed 0 ->
# (.60, .70), seed 1 -> (.70, .80) -> .80; My_B/env0 -> step 1 (.30) -> .20.
# Oracle takes the last step, chosen by the test domain's out accuracy: A/env0 trial 0: seed 0 (.55, .45) vs
# seed 1 (.95, .30) -> .30; trial 1 -> .65; A/env1: (.65, .70) vs (.90, .20) -> .20; My_B -> .25.
# Leave-one-domain-out (pairs only for A, trial 0, env0): seed 0 steps: (.2+.4)/2=.3 -> .40, (.6+.6)/2=.6 ->
# .45; seed 1: (.7+.9)/2=.8 -> .90, (.1+.1)/2=.1 -> .30; best .8 -> .90.
EXPECTED = {
    "training_domain": {"A": ["55.0 ± 10.0 (2)", "80.0 (1)", "62.5 (1)"], "My_B": ["20.0 (1)", "–", "–"]},
    "oracle": {"A": ["47.5 ± 17.5 (2)", "20.0 (1)", "25.0 (1)"], "My_B": ["25.0 (1)", "–", "–"]},
    "leave_one_domain_out": {"A": ["90.0 (1)", "–", "–"], "My_B": ["–", "–", "–"]},
}


@pytest.mark.parametrize("method", list(EXPECTED))
def test_selection_tables_match_hand_computation(sweep: Path, method: str):
    collection = collect.load_records(sweep)
    (table,) = collect.selection_tables(collection.records, method)
    assert table.columns == ["env0", "env1", "Avg"]
    assert {a: [collect.format_cell(c) for c in cells] for a, cells in table.cells.items()} == EXPECTED[method]
    if method == "training_domain":
        mean, se, n = table.cells["A"][0]
        assert mean == pytest.approx(55.0) and se == pytest.approx(10.0) and n == 2
        assert table.cells["A"][2] == (pytest.approx(62.5), None, 1)


def test_unfinished_runs_left_out_and_counted(sweep: Path):
    collection = collect.load_records(sweep)
    assert (collection.finished_runs, collection.unfinished_runs, collection.unfinished_records) == (12, 1, 3)
    assert all(r["args"]["trial_seed"] == 0 or r["args"]["test_envs"] == [0] for r in collection.records)
    assert collect.report(collection).splitlines()[-1] == "_3 records of 1 unfinished runs (no done file) left out._"


def test_fewshot_table_uses_last_checkpoint_and_training_domain_episodes(sweep: Path):
    # P seed 0's last step: val (.7+.8)/2=.75 beats seed 1's .5 -> env0 episode accuracy .6 ± .05
    (table,) = collect.fewshot_tables(collect.load_records(sweep).records)
    assert table.title == collect.FEWSHOT_TITLE and table.columns == ["env0", "Avg"]
    assert list(table.cells) == ["P"]
    assert [collect.format_cell(c) for c in table.cells["P"]] == ["60.0 ± 5.0 (1)", "60.0 (1)"]


def test_markdown_output(sweep: Path, capsys):
    assert sweep_main(["collect", "--output-dir", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "### Training-domain validation: Toy\n\n| Algorithm | env0 | env1 | Avg |\n| --- | --- | --- | --- |\n" \
           "| A | 55.0 ± 10.0 (2) | 80.0 (1) | 62.5 (1) |\n| My_B | 20.0 (1) | – | – |" in out
    assert out.count("### ") == 4


def test_latex_tabular_structure(sweep: Path, capsys):
    assert sweep_main(["collect", "--output-dir", str(sweep), "--latex"]) == 0
    out = capsys.readouterr().out
    blocks = re.findall(r"\\begin\{tabular\}\{(lc+)\}\n(.*?)\n\\end\{tabular\}", out, flags=re.S)
    assert len(blocks) == 4 == out.count(r"\begin{tabular}") == out.count(r"\end{tabular}")
    for spec, body in blocks:
        n_cols = len(spec)
        rows = [line for line in body.splitlines() if line != r"\hline"]
        assert body.splitlines()[0] == r"\hline" and body.splitlines()[-1] == r"\hline"
        for row in rows:
            assert row.endswith(r" \\")
            assert row.count(" & ") == n_cols - 1
    assert r"A & 55.0 $\pm$ 10.0 (2) & 80.0 (1) & 62.5 (1) \\" in out
    assert r"My\_B & 20.0 (1) & -- & -- \\" in out
    assert "±" not in out and "–" not in out
    assert out.splitlines()[-1] == "% 3 records of 1 unfinished runs (no done file) left out"


def test_latex_escapes_special_characters():
    assert collect.latex_escape("15° a_b 5% x&y ±") == r"15$^\circ$ a\_b 5\% x\&y $\pm$"


def test_plot_writes_png(sweep: Path, tmp_path: Path):
    out = tmp_path / "bars.png"
    assert sweep_main(["collect", "--output-dir", str(sweep), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_collect_missing_folder_is_one_line_error(tmp_path: Path, capsys):
    assert sweep_main(["collect", "--output-dir", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"error: sweep folder {tmp_path / 'nope'} does not exist\n"


def test_empty_lodo_table_says_lodo_pairs_are_needed(sweep: Path, capsys):
    for pair_run in [i for i, key in enumerate(RUNS) if len(key[1]) == 2]:
        (sweep / f"run{pair_run}" / "done").unlink()
    assert sweep_main(["collect", "--output-dir", str(sweep)]) == 0
    out = capsys.readouterr().out
    lodo = out.split("### Leave-one-domain-out validation: Toy")[1].split("###")[0]
    assert f"_{collect.LODO_HINT}._" in lodo
    assert out.count("--lodo-pairs") == 1


def test_lodo_table_with_pairs_has_no_hint(sweep: Path, capsys):
    assert sweep_main(["collect", "--output-dir", str(sweep)]) == 0
    assert "--lodo-pairs" not in capsys.readouterr().out


def test_plot_skips_missing_cells_and_single_trial_error_bars(sweep: Path, tmp_path: Path, monkeypatch):
    import matplotlib.axes

    drawn: dict[str, list] = {"bars": [], "errors": [], "labels": []}
    real_bar, real_errorbar, real_label = (matplotlib.axes.Axes.bar, matplotlib.axes.Axes.errorbar,
                                           matplotlib.axes.Axes.bar_label)

    def bar(self, x, height, *args, **kwargs):
        drawn["bars"].append((kwargs.get("label"), list(height)))
        return real_bar(self, x, height, *args, **kwargs)

    def errorbar(self, x, y, *args, **kwargs):
        drawn["errors"].append((y, kwargs["yerr"]))
        return real_errorbar(self, x, y, *args, **kwargs)

    def bar_label(self, container, *args, **kwargs):
        drawn["labels"].append(list(kwargs["labels"]))
        return real_label(self, container, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", errorbar)
    monkeypatch.setattr(matplotlib.axes.Axes, "bar_label", bar_label)
    collection = collect.load_records(sweep)
    (table,) = collect.selection_tables(collection.records, "training_domain")
    collect.plot([table], tmp_path / "p.png")
    # A: 55.0 ± 10.0 (2), 80.0 (1), 62.5 (1) -> three bars, one error bar; My_B: one bar (two cells missing)
    assert [(label, [round(h, 1) for h in heights]) for label, heights in drawn["bars"]] == \
        [("A", [55.0, 80.0, 62.5]), ("My_B", [20.0])]
    assert [(round(y, 1), round(e, 1)) for y, e in drawn["errors"]] == [(55.0, 10.0)]
    assert drawn["labels"] == [["55.0", "80.0", "62.5"], ["20.0"]]
