"""Mutation testing of the algorithm files: does each file's own fast test selection notice small bugs?

For every file of ``TESTS`` (or the files named on the command line) this script enumerates *mutants*, one
small change each (``+`` for ``-``, ``<`` for ``<=``, ``and`` for ``or``, a numeric constant plus one, a
dropped unary minus or ``not``, ``return None``, a dropped call statement such as ``optimizer.step()``), and
runs the file's test selection once per mutant with ``pytest -x -q``: a failing run *kills* the mutant, a
run past ``--timeout-factor`` times the clean run's time is a *timeout* (also detected), a passing run lets
it *survive*. The score of a file is detected / (mutants - judged equivalent), where the mutants the team
has judged equivalent (same observable behaviour) are listed with a reason in ``bench/mutation_equivalent.json``.

The source file is never written. A test run sees the mutant through an import hook: a finder put first on
the meta path builds the target module (say ``dg_meta.algorithms.erm``) from the mutated syntax tree of a
snapshot of the file, compiled under the file's own name. One worker process per file imports torch and
pytest once, then forks a child per mutant that installs the finder and calls ``pytest.main``; the run's
``PYTHONPATH`` also starts with a temporary folder whose ``sitecustomize.py`` installs the same finder in
every Python process a test starts (the CLI tests' ``python -m dg_meta.train``). Nothing on disk changes, so
a killed or timed-out run cannot leave a mutant behind, and other people's test runs and edits going on at
the same time are unaffected. (mutmut 3 was tried first; docs/quality.md says why it cannot run here.)

Writes the per-mutant outcome of each file run to ``--results`` (JSON, other files' entries kept) and the
per-file table and the survivors to the ``mutation`` block of ``--doc``. Too slow for CI: seconds per mutant,
minutes per file (docs/quality.md). Example: ``OMP_NUM_THREADS=1 python bench/mutation.py algorithms/erm.py``.
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import importlib.abc
import importlib.util
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from dg_meta.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "mutation.json"
EQUIVALENT = REPO / "bench" / "mutation_equivalent.json"
DOC = REPO / "docs" / "quality.md"
SECTION = "mutation"
SPEC_ENV = "DG_META_MUTANT"
TARGET = 0.85
# imported once by the worker, before any fork: what takes seconds to import; no algorithm module, which the
# worker refuses to preload
PRELOAD = ("torch", "torchvision", "pytest", "dg_meta.train")

# Each algorithm file's own fast tests (pytest node ids or files, relative to the repository root).
TESTS: dict[str, list[str]] = {
    "algorithms/erm.py": ["tests/test_erm.py"],
    "algorithms/erm_plus_plus.py": ["tests/test_erm_plus_plus.py"],
    "algorithms/fishr.py": ["tests/test_fishr.py"],
    "algorithms/iga.py": ["tests/test_iga.py"],
    "algorithms/and_mask.py": ["tests/test_and_mask.py"],
    "algorithms/sand_mask.py": ["tests/test_sand_mask.py"],
    "algorithms/selfreg.py": ["tests/test_selfreg.py"],
    "algorithms/rsc.py": ["tests/test_rsc.py"],
    "algorithms/arm.py": ["tests/test_arm.py"],
    "algorithms/mtl.py": ["tests/test_mtl.py"],
    "algorithms/dann.py": ["tests/test_dann.py", "tests/test_cdann.py"],  # CDANN's tests cover the conditional branch
    "algorithms/cdann.py": ["tests/test_cdann.py"],
    "algorithms/urm.py": ["tests/test_urm.py"],
    "algorithms/fewshot_pretrain.py": ["tests/test_fewshot_pretrain.py"],
    "algorithms/protonet.py": [
        "tests/test_protonet.py",
        "tests/test_fewshot_metric.py::test_protonet_logits_match_hand_computed_values_on_2way_2shot"],
    "algorithms/dica.py": ["tests/test_dica.py", "-m", "not slow"],
    "algorithms/mldg.py": ["tests/test_mldg.py", "-k", "not test_trainer_resume_equals_uninterrupted"],  # no Trainer
    "algorithms/maml.py": ["tests/test_maml.py", "-m", "not slow"],
    "algorithms/anil.py": ["tests/test_anil.py"],
    "algorithms/boil.py": ["tests/test_boil.py"],
    "algorithms/meta_sgd.py": ["tests/test_meta_sgd.py"],
    # with the engines' equality tests (batched inner SGD, test-time adaptation, resume) of tests/test_batched_tasks.py
    "algorithms/reptile.py": ["tests/test_reptile.py", "tests/test_batched_tasks.py", "-k", "reptile"],
    "algorithms/unicorn_maml.py": ["tests/test_unicorn.py"],
    "algorithms/imaml.py": ["tests/test_imaml.py", "tests/test_batched_tasks.py", "-k", "imaml or implicit"],
    "algorithms/crossgrad.py": [  # all but the CLI test (marked slow)
        "tests/test_crossgrad.py::test_perturbation_is_eps_times_clipped_gradient_of_the_batch_mean_loss",
        "tests/test_crossgrad.py::test_defaults_are_the_authors_constants",
        "tests/test_crossgrad.py::test_random_search_ranges_contain_the_authors_constants",
        "tests/test_crossgrad.py::test_predict_is_the_label_network",
        "tests/test_crossgrad.py::test_two_updates_equal_an_independent_reimplementation"],
    "algorithms/mmdaae.py": [  # the MMD-AAE tests but the CLI one (marked slow)
        "tests/test_mmd.py::test_mmdaae_defaults_are_the_documented_ones",
        "tests/test_mmd.py::test_mmdaae_random_search_ranges",
        "tests/test_mmd.py::test_mmd_sigmas_accepts_any_non_empty_list_of_positive_numbers",
        "tests/test_mmd.py::test_mmd_sigmas_refuses_anything_else",
        "tests/test_mmd.py::test_mmdaae_networks_and_what_predict_and_embed_return",
        "tests/test_mmd.py::test_mmdaae_step_updates_discriminator_with_its_own_optimizer",
        "tests/test_mmd.py::test_prior_is_laplace_with_the_configured_scale",
        "tests/test_mmd.py::test_two_updates_equal_an_independent_reimplementation"],
    "algorithms/ensemble.py": ["tests/test_ensemble.py"],
    "algorithms/rdm.py": ["tests/test_rdm.py"],
    "algorithms/trm.py": ["tests/test_trm.py"],
    "algorithms/sagnet.py": ["tests/test_sagnet.py"],
    "algorithms/fish.py": ["tests/test_fish.py"],
    "algorithms/coral.py": ["tests/test_coral.py"],
    "algorithms/mmd.py": ["tests/test_mmd_algorithm.py"],
    "algorithms/causirl_coral.py": ["tests/test_causirl_coral.py"],
    "algorithms/causirl_mmd.py": ["tests/test_causirl_mmd.py"],
    "algorithms/adrmx.py": ["tests/test_adrmx.py"],
    "algorithms/transfer.py": ["tests/test_transfer.py"],
    "algorithms/cond_cad.py": ["tests/test_cond_cad.py"],
    "algorithms/cad.py": ["tests/test_cad.py", "tests/test_cond_cad.py"],
    "algorithms/group_dro.py": ["tests/test_group_dro.py"],
    "algorithms/mixup.py": ["tests/test_mixup.py"],
    "algorithms/sd.py": ["tests/test_sd.py"],
    "algorithms/eqrm.py": ["tests/test_eqrm.py"],
    "algorithms/feature_critic.py": ["tests/test_feature_critic.py"],
    "algorithms/matchingnet.py": ["tests/test_matchingnet.py"],
    "algorithms/r2d2.py": ["tests/test_r2d2.py"],
    "algorithms/metaoptnet.py": ["tests/test_metaoptnet.py"],
    "dg_meta/episode_solvers.py": ["tests/test_episode_solvers.py"],
    "algorithms/relationnet.py": ["tests/test_relationnet.py"],
    "algorithms/feat.py": ["tests/test_feat.py"],
    "algorithms/irm.py": ["tests/test_irm.py"],
    "algorithms/vrex.py": ["tests/test_vrex.py"],
    "algorithms/ib_erm.py": ["tests/test_ib_erm.py"],
    "algorithms/ib_irm.py": ["tests/test_ib_irm.py"],
    "algorithms/baseline.py": ["tests/test_baseline.py"],
    "algorithms/baseline_plus_plus.py": ["tests/test_baseline_plus_plus.py"],
    "algorithms/rfs.py": ["tests/test_rfs.py"],
    "algorithms/meta_baseline.py": ["tests/test_meta_baseline.py"],
    "dg_meta/support_heads.py": [*(f"tests/test_{n}.py" for n in ("support_heads", "baseline", "rfs", "meta_baseline")),
                                 "tests/test_lastshot.py::test_logistic_regression_solver_settings_and_convergence"],
    "dg_meta/invariance.py": [f"tests/test_{name}.py" for name in ("irm", "vrex", "ib_erm", "ib_irm")],
    # LastShot's unit tests (the file's --init-from and CLI tests are not LastShot's, or too slow per mutant)
    "algorithms/lastshot.py": [f"tests/test_lastshot.py::{name}" for name in (
        "test_loss_is_raw_ce_plus_calibrated_kl_to_dot_product_with_normalised_centres",
        "test_adapt_uses_raw_student_logits_and_never_the_teacher_or_calibration",
        "test_logreg_teacher_matches_sklearn_logistic_regression",
        "test_teacher_and_student_start_from_the_pretraining_run",
        "test_teacher_embeds_each_class_once",
        "test_missing_or_unfit_teacher_is_a_usage_error",
        "test_student_of_another_architecture_is_reported_not_initialised",
        "test_defaults_are_the_official_ones_and_the_search_space_is_the_declared_one",
        "test_teacher_is_rebuilt_with_its_runs_number_of_training_domains",
        "test_a_run_without_a_featurizer_is_refused",
        "test_train_and_eval_switch_the_student_while_the_teacher_stays_in_eval_mode",
        "test_calibration_is_trained_by_the_students_adam_at_its_learning_rate",
        "test_logreg_teacher_is_fitted_on_at_most_50_repository_examples_per_class",
        "test_embed_class_embeds_every_example_in_order_in_batches_of_256",
        "test_logistic_regression_solver_settings_and_convergence",)],
}

BINOP_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
              ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.MatMult: ast.Mult}
COMPARE_FLIP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
# fields never evaluated at run time under ``from __future__ import annotations``, or not worth mutating
SKIPPED_FIELDS = {"annotation", "returns", "decorator_list", "type_comment"}


class Mutant(NamedTuple):
    """One mutation of a file: ``id`` is stable across edits elsewhere in the file (no line number in it)."""

    id: str
    line: int
    operator: str
    original: str
    replacement: str


class _Site(NamedTuple):
    parent: ast.AST
    field: str
    index: int | None
    new: ast.AST
    operator: str
    scope: str
    old: ast.AST


def _flat(text: str) -> str:
    return " ".join(text.split())


def _mutations(node: ast.AST) -> Iterator[tuple[str, ast.AST]]:
    """(operator, replacement node) for each mutation of ``node`` itself."""
    if isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAP:
        yield "binop", ast.BinOp(node.left, BINOP_SWAP[type(node.op)](), node.right)
    elif isinstance(node, ast.AugAssign) and type(node.op) in BINOP_SWAP:
        yield "augassign", ast.AugAssign(node.target, BINOP_SWAP[type(node.op)](), node.value)
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            ops = list(node.ops)
            ops[i] = COMPARE_FLIP[type(op)]()
            yield "compare", ast.Compare(node.left, ops, node.comparators)
    elif isinstance(node, ast.BoolOp):
        yield "boolop", ast.BoolOp(ast.Or() if isinstance(node.op, ast.And) else ast.And(), node.values)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        yield "unary", node.operand
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        yield "constant", ast.Constant(not node.value)
    elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        yield "constant", ast.Constant(node.value + 1)
    elif isinstance(node, ast.Return) and node.value is not None and not (
            isinstance(node.value, ast.Constant) and node.value.value is None):
        yield "return", ast.Return(ast.Constant(None))
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        yield "statement", ast.Pass()


def _is_docstring(node: ast.AST) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _sites(node: ast.AST, scope: str) -> Iterator[_Site]:
    """Every mutation site under ``node``, in a fixed order (the same for every parse of the same text)."""
    for field, value in ast.iter_fields(node):
        if field in SKIPPED_FIELDS:
            continue
        children = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for index, child in children:
            if not isinstance(child, ast.AST) or isinstance(child, (ast.Import, ast.ImportFrom, ast.JoinedStr)):
                continue
            if _is_docstring(child):
                continue
            for operator, new in _mutations(child):
                yield _Site(node, field, index, new, operator, scope, child)
            inner = scope
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = child.name if scope == "<module>" else f"{scope}.{child.name}"
            yield from _sites(child, inner)


def _text(node: ast.AST) -> str:
    if isinstance(node, ast.Pass):
        return "pass"
    return _flat(ast.unparse(node))


def enumerate_mutants(source: str, relpath: str) -> list[Mutant]:
    """The mutants of the Python source ``source`` (named ``relpath`` in their ids), in a fixed order."""
    mutants, seen = [], {}
    for site in _sites(ast.parse(source), "<module>"):
        original = _flat(ast.get_source_segment(source, site.old) or ast.unparse(site.old))
        key = f"{relpath}::{site.scope}::{site.operator}::{original} -> {_text(site.new)}"
        seen[key] = seen.get(key, 0) + 1
        mutant_id = key if seen[key] == 1 else f"{key} #{seen[key]}"
        mutants.append(Mutant(mutant_id, site.old.lineno, site.operator, original, _text(site.new)))
    return mutants


def mutated_code(source: str, filename: str, index: int):
    """The code object of ``source`` with mutant number ``index`` applied, compiled under ``filename``."""
    tree = ast.parse(source)
    site = next(itertools.islice(_sites(tree, "<module>"), index, None), None)
    if site is None:
        raise IndexError(f"{filename} has no mutant number {index}")
    ast.copy_location(site.new, site.old)
    if site.index is None:
        setattr(site.parent, site.field, site.new)
    else:
        getattr(site.parent, site.field)[site.index] = site.new
    return compile(ast.fix_missing_locations(tree), filename, "exec")


class _MutantLoader(importlib.abc.Loader):
    def __init__(self, spec: dict):
        self.spec = spec

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        Path(self.spec["flag"]).touch()
        source = Path(self.spec["snapshot"]).read_text()
        exec(mutated_code(source, self.spec["origin"], self.spec["index"]), module.__dict__)


class _MutantFinder(importlib.abc.MetaPathFinder):
    def __init__(self, spec: dict):
        self.spec = spec

    def find_spec(self, fullname, path, target=None):
        if fullname != self.spec["module"]:
            return None
        return importlib.util.spec_from_file_location(fullname, self.spec["origin"], loader=_MutantLoader(self.spec))


def install_from_env() -> None:
    """Put the finder of the mutant that ``$DG_META_MUTANT`` describes first on the meta path (test side)."""
    sys.meta_path.insert(0, _MutantFinder(json.loads(os.environ[SPEC_ENV])))


SITECUSTOMIZE = """\
import importlib.util, os, sys
if os.environ.get({env!r}):
    _spec = importlib.util.spec_from_file_location("_dg_meta_mutation", {path!r})
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    _module.install_from_env()
"""


PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider"]


def _forked_pytest(job: dict, index: int | None, timeout: float | None) -> dict:
    """One ``pytest -x -q`` run in a forked child (its own process group, killed whole on timeout) with
    mutant ``index`` importable (``None``: the clean run)."""
    log, flag = tempfile.TemporaryFile(), Path(job["spec"]["flag"])
    flag.unlink(missing_ok=True)
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            os.setsid()
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the worker
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            if index is not None:
                os.environ[SPEC_ENV] = json.dumps({**job["spec"], "index": index})
                install_from_env()
            import pytest

            code = pytest.main(PYTEST_ARGS + job["tests"])
        finally:
            os._exit(int(code))
    deadline = None if timeout is None else start + timeout
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        if deadline is not None and time.perf_counter() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"status": "timeout", "seconds": time.perf_counter() - start, "failed_test": None}
        time.sleep(0.02)
    seconds, code = time.perf_counter() - start, os.waitstatus_to_exitcode(done[1])
    if code == 0:
        return {"status": "passed" if index is None or flag.exists() else "not_imported", "seconds": seconds,
                "failed_test": None}
    log.seek(0)
    lines = log.read().decode(errors="replace").splitlines()
    failed = [line.split()[1] for line in lines if line.startswith(("FAILED ", "ERROR ")) and " " in line]
    return {"status": "failed", "seconds": seconds, "failed_test": failed[0] if failed else f"exit code {code}"}


def serve(job: dict) -> None:
    """The worker process: import ``job["preload"]`` once, run the clean tests, then every mutant of
    ``job["indices"]`` in a fork of itself; one JSON line per run on stdout."""
    sys.path[0] = os.getcwd()  # as under ``python -m pytest``, not this copy's folder
    for name in job["preload"]:
        importlib.import_module(name)
    if job["spec"]["module"] in sys.modules:
        sys.exit(f"preloading {', '.join(job['preload'])} imported {job['spec']['module']}: drop it from preload")
    baseline = _forked_pytest(job, None, None)
    print(json.dumps(baseline), flush=True)
    if baseline["status"] != "passed":
        return
    timeout = max(job["timeout_factor"] * baseline["seconds"], job["min_timeout"])
    for index in job["indices"]:
        print(json.dumps({**_forked_pytest(job, index, timeout), "timeout": timeout}), flush=True)


def mutate_file(path: Path, module: str, tests: list[str], cwd: Path, relpath: str, timeout_factor: float = 10.0,
                min_timeout: float = 10.0, only: list[int] | None = None, preload: tuple[str, ...] = (),
                log=None) -> dict:
    """Run ``tests`` (from ``cwd``) once clean and once per mutant of ``path`` (imported as ``module``), in a
    worker that imports ``preload`` once and forks for each run."""
    source = path.read_text()
    mutants = enumerate_mutants(source, relpath)
    indices = [i for i in range(len(mutants)) if only is None or i in only]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        hook_dir, snapshot, flag = Path(tmp) / "hook", Path(tmp) / "snapshot" / path.name, Path(tmp) / "imported"
        hook_dir.mkdir()
        snapshot.parent.mkdir()
        runner = Path(tmp) / "runner.py"  # a copy: editing this file during a run cannot renumber the mutants
        shutil.copyfile(__file__, runner)
        (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE.format(env=SPEC_ENV, path=str(runner)))
        snapshot.write_text(source)
        job = {"tests": tests, "preload": list(preload), "indices": indices, "timeout_factor": timeout_factor,
               "min_timeout": min_timeout, "spec": {"module": module, "origin": str(path.resolve()),
                                                    "snapshot": str(snapshot), "flag": str(flag)}}
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(hook_dir), os.environ.get("PYTHONPATH", "")) if p)}
        env.pop(SPEC_ENV, None)
        worker = subprocess.Popen([sys.executable, str(runner), "--worker", json.dumps(job)], cwd=cwd, env=env,
                                  stdout=subprocess.PIPE, text=True)
        baseline = json.loads(worker.stdout.readline() or "null")
        if baseline is None:
            raise UsageError(f"the mutation worker for {relpath} exited with code {worker.wait()} (its error is "
                             "printed above)")
        if baseline["status"] != "passed":
            worker.wait()
            raise UsageError(f"the tests of {relpath} fail without any mutant ({baseline['failed_test']}): "
                             "fix them first")
        records = []
        for index in indices:
            outcome = json.loads(worker.stdout.readline())
            status = {"failed": "killed", "passed": "survived"}.get(outcome["status"], outcome["status"])
            mutant = mutants[index]
            records.append({**mutant._asdict(), "status": status, "killed_by": outcome["failed_test"],
                            "seconds": round(outcome["seconds"], 2)})
            if log is not None:
                log(f"{relpath} {index + 1}/{len(mutants)} {status:>12} line {mutant.line}: "
                    f"{mutant.original[:60]} -> {mutant.replacement[:60]}")
        worker.wait()
    return {"tests": tests, "baseline_s": round(baseline["seconds"], 2),
            "timeout_s": round(outcome["timeout"], 2) if records else None,
            "run_s": round(time.perf_counter() - start, 1), "date": time.strftime("%Y-%m-%d"), "mutants": records}


def module_name(relpath: str) -> str:
    """The import name of a repository file: ``algorithms/`` installs as ``dg_meta.algorithms``."""
    parts = Path(relpath).with_suffix("").parts
    return ".".join(("dg_meta", *parts) if parts[0] in ("algorithms", "datasets", "launch") else parts)


def summary(entry: dict, equivalent: dict[str, str]) -> dict:
    """Counts of one file's mutants and its score, detected / (mutants - equivalent)."""
    counts = {"mutants": len(entry["mutants"]), "killed": 0, "timeout": 0, "survived": 0, "not_imported": 0,
              "equivalent": 0}
    for m in entry["mutants"]:
        counts["equivalent" if m["id"] in equivalent and m["status"] in ("survived", "not_imported")
               else m["status"]] += 1
    judged = counts["mutants"] - counts["equivalent"]
    counts["score"] = (counts["killed"] + counts["timeout"]) / judged if judged else 1.0
    return counts


def markdown(results: dict, equivalent: dict[str, str]) -> str:
    """The doc block: one table row per file, then every surviving mutant with its verdict."""
    lines = ["| file | mutants | killed | timeout | survived | equivalent | score | target 85% | tests | run time |",
             "|---|---:|---:|---:|---:|---:|---:|:-:|---|---:|"]
    survivors = []
    for relpath in sorted(results):
        entry = results[relpath]
        c = summary(entry, equivalent)
        lines.append(f"| `{relpath}` | {c['mutants']} | {c['killed']} | {c['timeout']} | "
                     f"{c['survived'] + c['not_imported']} | {c['equivalent']} | {100 * c['score']:.0f}% | "
                     f"{'yes' if c['score'] >= TARGET else '**no**'} | {len(entry['tests'])} selection(s) | "
                     f"{entry['run_s'] / 60:.1f} min ({entry['date']}) |")
        for m in entry["mutants"]:
            if m["status"] in ("survived", "not_imported"):
                verdict = f"equivalent: {equivalent[m['id']]}" if m["id"] in equivalent else "**not judged yet**"
                survivors.append(f"- `{relpath}` line {m['line']} ({m['operator']}): `{m['original']}` → "
                                 f"`{m['replacement']}`: {verdict}")
    body = "\n".join(lines)
    if survivors:
        body += "\n\nSurviving mutants:\n\n" + "\n".join(survivors)
    return body


def load_json(path: Path, default):
    return json.loads(path.read_text()) if path.exists() else default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="*", help="algorithm files relative to the repository (default: every file of TESTS)")
    p.add_argument("--list", action="store_true", help="print the mutants and exit; runs nothing")
    p.add_argument("--render", action="store_true", help="rewrite the doc block from --results only; runs nothing")
    p.add_argument("--timeout-factor", type=float, default=10.0,
                   help="a mutant's run may take this many times the clean run (default: %(default)s)")
    p.add_argument("--results", default=str(RESULTS), help="JSON of every file's mutants (default: %(default)s)")
    p.add_argument("--equivalent", default=str(EQUIVALENT), help="judged-equivalent mutant ids (default: %(default)s)")
    p.add_argument("--doc", default=str(DOC), help="markdown file whose mutation block is rewritten")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    files = args.files or list(TESTS)
    unknown = [f for f in files if f not in TESTS]
    if unknown:
        print(f"error: no test selection for {', '.join(unknown)}: add it to TESTS in bench/mutation.py "
              f"(known: {', '.join(TESTS)})", file=sys.stderr)
        return 2
    if args.list:
        for relpath in files:
            for m in enumerate_mutants((REPO / relpath).read_text(), relpath):
                print(f"{m.line:4d} {m.id}")
        return 0
    # imported here, not at the top: every test process loads this file, and these import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dg_table import update_doc  # bench/ is not a package

    from dg_meta.atomic import atomic_write_json

    results_path, equivalent = Path(args.results), load_json(Path(args.equivalent), {})
    results = load_json(results_path, {})
    for relpath in [] if args.render else files:
        try:
            results[relpath] = mutate_file(REPO / relpath, module_name(relpath), TESTS[relpath], REPO, relpath,
                                           args.timeout_factor, preload=PRELOAD,
                                           log=lambda line: print(line, file=sys.stderr))
        except UsageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        atomic_write_json(results_path, results)
        c = summary(results[relpath], equivalent)
        print(f"{relpath}: {c['killed'] + c['timeout']}/{c['mutants'] - c['equivalent']} detected "
              f"({100 * c['score']:.0f}%), {results[relpath]['run_s'] / 60:.1f} min")
    update_doc(Path(args.doc), markdown(results, equivalent), SECTION)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        serve(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
