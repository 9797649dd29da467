"""bench/mutation.py on a tiny module: the mutants found, killed / survived / timeout, the source never touched."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from dg_meta.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mutation", REPO / "bench" / "mutation.py")
mutation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mutation)

MODULE = '''"""A tiny module."""


def double(x: int) -> int:
    return x * 2


def spin(n):
    i = 0
    while i < n:
        i += 1
    return i
'''
TESTS = '''from tinymod import double, spin


def test_double():
    assert double(3) == 6


def test_spin():
    assert spin(2) == 2
'''
# (operator, original, replacement, expected outcome with TESTS)
EXPECTED = [
    ("return", "return x * 2", "return None", "killed"),
    ("binop", "x * 2", "x / 2", "killed"),
    ("constant", "2", "3", "killed"),
    ("constant", "0", "1", "survived"),  # 1 -> 2 in one step: spin(2) is still 2
    ("compare", "i < n", "i <= n", "killed"),
    ("augassign", "i += 1", "i -= 1", "timeout"),  # i never reaches n
    ("constant", "1", "2", "survived"),  # 0 -> 2 in one step
    ("return", "return i", "return None", "killed"),
]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "tinymod.py").write_text(MODULE)
    (tmp_path / "test_tiny.py").write_text(TESTS)
    return tmp_path


def test_mutants_found_with_stable_ids_and_applied_in_code():
    mutants = mutation.enumerate_mutants(MODULE, "tinymod.py")
    assert [(m.operator, m.original, m.replacement) for m in mutants] == [e[:3] for e in EXPECTED]
    assert mutants[1].id == "tinymod.py::double::binop::x * 2 -> x / 2" and mutants[1].line == 5
    # the annotations and the docstring are not mutated; an edit above a function keeps its mutants' ids
    moved = mutation.enumerate_mutants("import os\n\n" + MODULE, "tinymod.py")
    assert [m.id for m in moved] == [m.id for m in mutants] and moved[0].line == 7
    namespace: dict = {}
    exec(mutation.mutated_code(MODULE, "tinymod.py", 1), namespace)
    assert namespace["double"](3) == 1.5


def test_duplicate_mutants_in_one_scope_get_distinct_ids():
    ids = [m.id for m in mutation.enumerate_mutants("def f(x):\n    return (x + 1) * (x + 1)\n", "m.py")]
    assert ids.count("m.py::f::constant::1 -> 2") == 1 and "m.py::f::constant::1 -> 2 #2" in ids


def test_outcomes_classified_and_the_source_never_written(project: Path):
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in project.iterdir()}
    chosen = [1, 3, 5, 6]  # one killed, one timeout, two survivors: the rest are slow to run, not different
    entry = mutation.mutate_file(project / "tinymod.py", "tinymod", ["test_tiny.py"], project, "tinymod.py",
                                 timeout_factor=3.0, min_timeout=1.5, only=chosen)
    assert [m["status"] for m in entry["mutants"]] == [EXPECTED[i][3] for i in chosen]
    assert entry["mutants"][0]["killed_by"] == "test_tiny.py::test_double"
    # killed, timed-out (process group SIGKILLed) and surviving runs alike leave the folder as it was
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in project.iterdir()} == before
    equivalent = {entry["mutants"][1]["id"]: "judged equivalent"}
    counts = mutation.summary(entry, equivalent)
    assert counts == {"mutants": 4, "killed": 1, "timeout": 1, "survived": 1, "not_imported": 0, "equivalent": 1,
                      "score": 2 / 3}
    doc = mutation.markdown({"tinymod.py": entry}, equivalent)
    assert "| `tinymod.py` | 4 | 1 | 1 | 1 | 1 | 67% | **no** |" in doc
    assert "line 9 (constant): `0` → `1`: equivalent: judged equivalent" in doc
    assert "line 11 (constant): `1` → `2`: **not judged yet**" in doc


def test_module_the_tests_never_import_is_reported_not_survived(project: Path):
    (project / "other.py").write_text("def f():\n    return 1\n")
    entry = mutation.mutate_file(project / "other.py", "other", ["test_tiny.py"], project, "other.py", only=[0])
    assert [m["status"] for m in entry["mutants"]] == ["not_imported"]


def test_failing_tests_without_mutants_are_refused(project: Path):
    (project / "test_tiny.py").write_text(TESTS.replace("== 6", "== 7"))
    with pytest.raises(UsageError, match=r"^the tests of tinymod.py fail without any mutant "
                                         r"\(test_tiny.py::test_double\): fix them first$"):
        mutation.mutate_file(project / "tinymod.py", "tinymod", ["test_tiny.py"], project, "tinymod.py")


def test_preloading_the_mutated_module_is_refused(project: Path, capfd):
    with pytest.raises(UsageError, match=r"^the mutation worker for tinymod.py exited with code 1 \(its error is "
                                         r"printed above\)$"):
        mutation.mutate_file(project / "tinymod.py", "tinymod", ["test_tiny.py"], project, "tinymod.py",
                             preload=("tinymod",))
    assert "preloading tinymod imported tinymod: drop it from preload" in capfd.readouterr().err


def test_file_without_a_test_selection_is_a_usage_error(capsys, tmp_path):
    assert mutation.main(["algorithms/nope.py", "--results", str(tmp_path / "r.json"),
                          "--doc", str(tmp_path / "q.md")]) == 2
    assert capsys.readouterr().err.startswith("error: no test selection for algorithms/nope.py: add it to TESTS "
                                              "in bench/mutation.py (known: algorithms/erm.py, ")
    assert not os.path.exists(tmp_path / "r.json")
