"""Model selection over result records, with DomainBed's three definitions.

A record is one line of a run's ``results.jsonl``: ``step``, ``env{i}_in_acc``, ``env{i}_out_acc`` and
``args`` (``dataset``, ``algorithm``, ``test_envs``, ``hparams_seed``, ``trial_seed``). For one held-out
domain ``t`` and one trial seed, each method scores every hparams seed by a validation accuracy and
reports the test accuracy (``env{t}_in_acc``) of the best one:

- ``training_domain``: per run, the checkpoint with the best mean ``out`` accuracy of the training
  domains; the hparams with the best such value win.
- ``leave_one_domain_out``: per hparams seed and checkpoint step, the mean over every other domain ``v``
  of ``env{v}_in_acc`` in the run holding out both ``t`` and ``v``; needs those pair runs.
- ``oracle``: per run, the last checkpoint; hparams chosen by the test domain's ``out`` accuracy.

A run trained with ``--swad`` ends with the record of its averaged model (``"swad": true``); SWAD replaces
checkpoint selection, so the methods score only that record, and such runs form their own rows
(``ALGORITHM+SWAD``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

Record = dict
Choice = tuple[float, float]  # (validation accuracy, test accuracy)


def _test_envs(record: Record) -> list[int]:
    return list(record["args"]["test_envs"])


def _n_envs(record: Record) -> int:
    return len({k.split("_")[0] for k in record if k.startswith("env") and k.endswith("_in_acc")})


def _scored(records: list[Record]) -> list[Record]:
    """The SWAD records if there are any (SWAD's average is the model), else every record."""
    return [r for r in records if r.get("swad")] or records


def algorithm_label(args: dict) -> str:
    """The row name of a run: its algorithm, ``+SWAD`` when trained with ``--swad``."""
    return args["algorithm"] + ("+SWAD" if args.get("swad") else "")


def _argmax(choices: list[Choice]) -> Choice | None:
    return max(choices, key=lambda c: c[0]) if choices else None


def training_domain(records: list[Record], test_env: int) -> Choice | None:
    """Best checkpoint by mean training-domain ``out`` accuracy of the run holding out ``test_env``."""
    choices = []
    for r in _scored(records):
        if _test_envs(r) != [test_env]:
            continue
        train = [i for i in range(_n_envs(r)) if i != test_env]
        if any(f"env{i}_out_acc" not in r for i in train):  # trained with --holdout-fraction 0
            continue
        choices.append((sum(r[f"env{i}_out_acc"] for i in train) / len(train), r[f"env{test_env}_in_acc"]))
    return _argmax(choices)


def oracle(records: list[Record], test_env: int) -> Choice | None:
    """The last checkpoint of the run holding out ``test_env``, validated on its ``out`` split."""
    runs = [r for r in _scored(records) if _test_envs(r) == [test_env]]
    if not runs:
        return None
    last = max(runs, key=lambda r: r["step"])
    if f"env{test_env}_out_acc" not in last:  # trained with --holdout-fraction 0
        return None
    return last[f"env{test_env}_out_acc"], last[f"env{test_env}_in_acc"]


def leave_one_domain_out(records: list[Record], test_env: int) -> Choice | None:
    """Per step: validate on each other domain ``v`` held out together with ``test_env``."""
    by_step: dict[int, dict] = defaultdict(lambda: {"test": None, "val": {}})
    n_envs = 0
    for r in _scored(records):
        envs = _test_envs(r)
        n_envs = max(n_envs, _n_envs(r))
        if envs == [test_env]:
            by_step[r["step"]]["test"] = r[f"env{test_env}_in_acc"]
        elif len(envs) == 2 and test_env in envs:
            other = envs[1] if envs[0] == test_env else envs[0]
            by_step[r["step"]]["val"][other] = r[f"env{other}_in_acc"]
    choices = []
    for entry in by_step.values():
        if entry["test"] is not None and len(entry["val"]) == n_envs - 1:
            choices.append((sum(entry["val"].values()) / len(entry["val"]), entry["test"]))
    return _argmax(choices)


METHODS: dict[str, Callable[[list[Record], int], Choice | None]] = {
    "training_domain": training_domain,
    "leave_one_domain_out": leave_one_domain_out,
    "oracle": oracle,
}


def select(records: list[Record], method: str) -> dict[tuple[str, str, int], dict[int, float]]:
    """``{(dataset, algorithm, test_env): {trial_seed: selected test accuracy}}`` under ``method``.

    For each group the hparams seed with the best validation accuracy wins; groups that ``method``
    cannot score (e.g. missing leave-one-out pair runs) are left out.
    """
    score = METHODS[method]
    grouped: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        a = r["args"]
        grouped[(a["dataset"], algorithm_label(a), a["trial_seed"], a["hparams_seed"])].append(r)
    best: dict[tuple, dict[int, Choice]] = defaultdict(dict)
    for (dataset, algorithm, trial, _hseed), runs in sorted(grouped.items(), key=lambda kv: kv[0]):
        test_envs = sorted({e for r in runs for e in _test_envs(r) if len(_test_envs(r)) == 1})
        for env in test_envs:
            choice = score(runs, env)
            if choice is None:
                continue
            current = best[(dataset, algorithm, env)].get(trial)
            if current is None or choice[0] > current[0]:
                best[(dataset, algorithm, env)][trial] = choice
    return {key: {trial: c[1] for trial, c in trials.items()} for key, trials in best.items()}
