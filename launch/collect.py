"""Collect a sweep: every finished run's ``results.jsonl`` -> model-selection tables (markdown or LaTeX), plots.

For each selection method of :mod:`dg_meta.selection` and each dataset, a table has the algorithms as rows
and the held-out domains as columns plus their average; a cell is the mean ± standard error (sample standard
deviation over ``sqrt(n)``) over trials of the selected test accuracy, in percent; a single trial shows its
mean alone, and a missing value shows ``–``. The average column averages the domains within each trial that
has them all, then over trials. Runs that evaluate few-shot episodes add a table of the held-out domain's
episode accuracy ± its 95% CI (last checkpoint; hparams chosen by the training domains' episode accuracy;
mean over trials). Every cell ends with the number of trials it averages, ``55.0 ± 10.0 (2)``; a
single-trial cell has no error (``80.0 (1)``). A leave-one-domain-out table whose cells are all empty says
that the sweep lacks the ``--lodo-pairs`` runs. Runs without a ``done`` file are left out and counted in a
footnote line.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from dg_meta import registry
from dg_meta.errors import UsageError
from dg_meta.selection import METHODS, algorithm_label, select

METHOD_TITLES = {"training_domain": "Training-domain validation",
                 "leave_one_domain_out": "Leave-one-domain-out validation",
                 "oracle": "Test-domain validation (oracle)"}
FEWSHOT_TITLE = "Cross-domain few-shot episode accuracy (95% CI)"
MISSING = "–"
# (mean, error, trials) in percent; error None for a single trial; trials None for a published number
Cell = tuple[float, float | None, int | None]
LODO_HINT = ("no leave-one-domain-out cells: that selection needs the runs holding out each pair of domains; "
             "launch the sweep again with --lodo-pairs (finished runs are skipped)")


@dataclass
class Table:
    """One table: ``cells[algorithm]`` holds one ``Cell`` (or None) per column, the last being the average."""

    title: str
    dataset: str
    columns: list[str]
    cells: dict[str, list[Cell | None]]


@dataclass
class Collection:
    records: list[dict]
    finished_runs: int
    unfinished_runs: int
    unfinished_records: int


def load_records(sweep_dir: str | Path) -> Collection:
    """Records of every finished run (``done`` present) under ``sweep_dir``; unfinished ones are counted."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UsageError(f"sweep folder {sweep_dir} does not exist")
    records: list[dict] = []
    finished = unfinished = unfinished_records = 0
    for path in sorted(sweep_dir.rglob("results.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if (path.parent / "done").exists():
            records += lines
            finished += 1
        else:
            unfinished += 1
            unfinished_records += len(lines)
    return Collection(records, finished, unfinished, unfinished_records)


def mean_se(values: list[float]) -> Cell:
    """Mean, standard error (sample std / sqrt(n); None for one value), in percent, and n."""
    mean = 100 * sum(values) / len(values)
    if len(values) < 2:
        return mean, None, 1
    return mean, 100 * statistics.stdev(values) / math.sqrt(len(values)), len(values)


def env_names(dataset: str, n: int) -> list[str]:
    try:
        names = list(registry.get_dataset(dataset).ENVIRONMENTS)
    except UsageError:
        names = []
    return names if len(names) >= n else [f"env{i}" for i in range(n)]


def _single_test_envs(records: list[dict], dataset: str) -> list[int]:
    return sorted({r["args"]["test_envs"][0] for r in records
                   if r["args"]["dataset"] == dataset and len(r["args"]["test_envs"]) == 1})


def _columns(records: list[dict], dataset: str, envs: list[int]) -> list[str]:
    n = max([int(k[3:].split("_")[0]) + 1 for r in records if r["args"]["dataset"] == dataset
             for k in r if k.startswith("env") and k.endswith("_acc")] + [max(envs, default=-1) + 1])
    names = env_names(dataset, n)
    return [names[e] for e in envs] + ["Avg"]


def _row(per_env: list[dict[int, float]]) -> list[Cell | None]:
    """Cells for one algorithm from ``{trial: accuracy}`` per held-out domain, plus the average."""
    cells: list[Cell | None] = [mean_se(list(trials.values())) if trials else None for trials in per_env]
    complete = set.intersection(*(set(t) for t in per_env)) if per_env else set()
    averages = [sum(t[trial] for t in per_env) / len(per_env) for trial in sorted(complete)]
    return cells + [mean_se(averages) if averages else None]


def selection_tables(records: list[dict], method: str) -> list[Table]:
    """One table per dataset of the test accuracies that ``method`` selects (``dg_meta.selection``)."""
    records = [r for r in records if any(k.endswith("_in_acc") for k in r)]
    selected = select(records, method)
    tables = []
    for dataset in sorted({r["args"]["dataset"] for r in records}):
        envs = _single_test_envs(records, dataset)
        if not envs:
            continue
        algorithms = sorted({algorithm_label(r["args"]) for r in records if r["args"]["dataset"] == dataset})
        cells = {a: _row([selected.get((dataset, a, e), {}) for e in envs]) for a in algorithms}
        tables.append(Table(METHOD_TITLES[method], dataset, _columns(records, dataset, envs), cells))
    return tables


def fewshot_tables(records: list[dict]) -> list[Table]:
    """Held-out-domain episode accuracy ± 95% CI at each run's last checkpoint (see the module doc)."""
    last: dict[tuple, dict] = {}
    for r in records:
        a = r["args"]
        if len(a["test_envs"]) != 1 or f"env{a['test_envs'][0]}_fs_acc" not in r:
            continue
        key = (a["dataset"], algorithm_label(a), a["test_envs"][0], a["trial_seed"], a["hparams_seed"])
        if key not in last or r["step"] > last[key]["step"]:
            last[key] = r
    best: dict[tuple, dict[int, tuple[float, float, float]]] = defaultdict(dict)
    for (dataset, algorithm, env, trial, _hseed), r in sorted(last.items(), key=lambda kv: kv[0]):
        val = [v for k, v in r.items() if k.endswith("_fs_acc") and k != f"env{env}_fs_acc"]
        choice = (sum(val) / len(val) if val else 0.0, r[f"env{env}_fs_acc"], r.get(f"env{env}_fs_ci", 0.0))
        current = best[(dataset, algorithm, env)].get(trial)
        if current is None or choice[0] > current[0]:
            best[(dataset, algorithm, env)][trial] = choice
    tables = []
    for dataset in sorted({k[0] for k in best}):
        envs = sorted({k[2] for k in best if k[0] == dataset})
        cells: dict[str, list[Cell | None]] = {}
        for algorithm in sorted({k[1] for k in best if k[0] == dataset}):
            row: list[Cell | None] = []
            for env in envs:
                trials = list(best.get((dataset, algorithm, env), {}).values())
                row.append((100 * statistics.mean(t[1] for t in trials), 100 * statistics.mean(t[2] for t in trials),
                            len(trials)) if trials else None)
            present = [c for c in row if c is not None]
            row.append((statistics.mean(c[0] for c in present), None, min(c[2] for c in present))
                       if len(present) == len(envs) else None)
            cells[algorithm] = row
        tables.append(Table(FEWSHOT_TITLE, dataset, _columns(records, dataset, envs), cells))
    return tables


def all_tables(records: list[dict]) -> list[Table]:
    """The selection tables of every method (``dg_meta.selection.METHODS``), then the few-shot tables."""
    return [t for method in METHODS for t in selection_tables(records, method)] + fewshot_tables(records)


def format_cell(cell: Cell | None, pm: str = "±") -> str:
    """``mean ± error (trials)``; ``mean (1)`` for a single trial; ``–`` for no value; no count for a
    published number."""
    if cell is None:
        return MISSING
    mean, err, n = cell
    text = f"{mean:.1f}" if err is None else f"{mean:.1f} {pm} {err:.1f}"
    return text if n is None else f"{text} ({n})"


def is_empty(table: Table) -> bool:
    return all(c is None for cells in table.cells.values() for c in cells)


def table_note(table: Table) -> str | None:
    """The line printed under a table that is empty for a reason the user can fix."""
    if table.title == METHOD_TITLES["leave_one_domain_out"] and is_empty(table):
        return LODO_HINT
    return None


def to_markdown(table: Table) -> str:
    lines = [f"### {table.title}: {table.dataset}", "",
             "| Algorithm | " + " | ".join(table.columns) + " |",
             "|" + " --- |" * (len(table.columns) + 1)]
    lines += [f"| {a} | " + " | ".join(format_cell(c) for c in cells) + " |" for a, cells in table.cells.items()]
    note = table_note(table)
    return "\n".join(lines + ([f"\n_{note}._"] if note else []))


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "°": r"$^\circ$", "±": r"$\pm$", "–": "--"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    """A ``tabular`` (plain LaTeX, no packages needed) preceded by a comment naming the table."""
    lines = [f"% {latex_escape(table.title)}: {latex_escape(table.dataset)}",
             r"\begin{tabular}{l" + "c" * len(table.columns) + "}", r"\hline",
             " & ".join(["Algorithm"] + [latex_escape(c) for c in table.columns]) + r" \\", r"\hline"]
    lines += [" & ".join([latex_escape(a)] + [latex_escape(format_cell(c)) for c in cells]) + r" \\"
              for a, cells in table.cells.items()]
    lines += [r"\hline", r"\end{tabular}"]
    note = table_note(table)
    return "\n".join(lines + ([f"% {latex_escape(note)}"] if note else []))


def footnote(collection: Collection) -> str:
    return (f"{collection.unfinished_records} records of {collection.unfinished_runs} unfinished runs "
            "(no done file) left out")


def report(collection: Collection, latex: bool = False) -> str:
    """Every table, as markdown (or LaTeX), and the footnote line about unfinished runs."""
    tables = all_tables(collection.records)
    if not tables:
        body = "no finished runs with results"
    else:
        body = "\n\n".join(to_latex(t) if latex else to_markdown(t) for t in tables)
    note = footnote(collection)
    return body + "\n\n" + (f"% {note}" if latex else f"_{note}._")


def plot(tables: list[Table], path: str | Path) -> None:
    """Per-domain accuracy bars per algorithm, one panel per table, the value written on each bar. Error bars:
    standard error (95% CI for few-shot); none for single-trial cells; missing cells draw no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not tables:
        raise UsageError("nothing to plot: the sweep has no finished runs with results")
    fig, axes = plt.subplots(len(tables), 1, figsize=(max(6.0, 1.2 * len(tables[0].columns) + 3), 3.2 * len(tables)),
                             squeeze=False)
    for ax, table in zip(axes[:, 0], tables):
        n = max(len(table.cells), 1)
        width = 0.8 / n
        for i, (algorithm, cells) in enumerate(table.cells.items()):
            present = [(j + (i - (n - 1) / 2) * width, c) for j, c in enumerate(cells) if c is not None]
            bars = ax.bar([x for x, _ in present], [c[0] for _, c in present], width, label=algorithm,
                          color=f"C{i % 10}")
            for (x, (mean, err, _)) in present:
                if err is not None:
                    ax.errorbar(x, mean, yerr=err, color="black", capsize=2, linewidth=1)
            ax.bar_label(bars, labels=[f"{c[0]:.1f}" for _, c in present], fontsize=6, padding=1)
        ax.set_xticks(range(len(table.columns)), table.columns)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{table.title}: {table.dataset}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
