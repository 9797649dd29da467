"""Atomic writes keep the user's umask (not mkstemp's 0600) and leave no temporary file behind."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import sys
from dg_meta.atomic import atomic_write_json, atomic_write_text
atomic_write_text(sys.argv[1] + "/a.txt", "x")
atomic_write_json(sys.argv[1] + "/b.json", {"k": 1})
"""


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_permissions_of_the_users_umask(tmp_path: Path, umask: int, mode: int):
    subprocess.run([sys.executable, "-c", f"import os; os.umask({umask}); exec({SCRIPT!r})", str(tmp_path)],
                   check=True)
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.json"]
    for name in ("a.txt", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode
