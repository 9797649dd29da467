"""The registry: lookups with suggestions, and third-party plug-ins (--plugin, entry points)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO

from dg_meta import registry
from dg_meta.algorithm import Algorithm
from dg_meta.errors import UsageError

PLUGIN = textwrap.dedent('''
    """A third-party algorithm living outside dg-meta."""
    from dg_meta.registry import register_algorithm
    from dg_meta.algorithms.erm import ERM

    @register_algorithm
    class MyERM(ERM):
        """ERM under another name."""
''')


def test_unknown_name_suggests_closest_and_lists_all(monkeypatch):
    registry.discover()
    monkeypatch.setitem(registry.ALGORITHMS, "MLDG", Algorithm)
    with pytest.raises(UsageError) as info:
        registry.get_algorithm("MLGD")
    message = str(info.value)
    assert message.startswith("unknown algorithm 'MLGD': did you mean MLDG")
    assert message.endswith("registered: " + ", ".join(sorted(registry.ALGORITHMS)))
    assert "\n" not in message
    with pytest.raises(UsageError, match="did you mean ERM"):
        registry.get_algorithm("erm")


def test_duplicate_registration_of_a_different_class_is_refused():
    class ERM(Algorithm):
        pass

    registry.discover()
    with pytest.raises(UsageError) as info:
        registry.register_algorithm(ERM)
    assert str(info.value) == ("algorithm name 'ERM' is already registered by dg_meta.algorithms.erm; test_registry "
                               "must register its class under another name (@register_algorithm(name=...))")


def _env(path):
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")]))


def test_plugin_flag_loads_a_module(tmp_path):
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    cmd = [sys.executable, "-m", "dg_meta.train", "--plugin", "my_plugin", "--algorithm", "MyERM", "--steps", "2",
           "--checkpoint-freq", "2", "--output-dir", str(tmp_path / "out"), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("MyERM on RotatedDigits step 2: 0° test ")
    bad = subprocess.run([sys.executable, "-m", "dg_meta.train", "--plugin", "no_such_mod", "--algorithm", "ERM"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: --plugin no_such_mod: cannot import it (No module named 'no_such_mod')")


def test_entry_point_group_registers_without_core_edits(tmp_path):
    (tmp_path / "ep_plugin.py").write_text(PLUGIN.replace("MyERM", "EntryPointERM"))
    dist = tmp_path / "ep_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dg_meta.algorithms]\nEntryPointERM = ep_plugin\n")
    proc = subprocess.run([sys.executable, "-m", "dg_meta.train", "--help"], cwd=REPO, env=_env(tmp_path),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    algorithms_line = next(line for line in proc.stdout.splitlines() if line.startswith("algorithms:"))
    assert "EntryPointERM" in algorithms_line.replace(",", " ").split()


BAD_PLUGINS = {
    "syntax": ("class Broken(:\n    pass\n",
               "--plugin {p}: syntax error in {p} line 1: invalid syntax; fix the plug-in"),
    "dependency": ("import not_installed_dependency_xyz\n",
                   "--plugin {p} imports 'not_installed_dependency_xyz', which is not installed: pip install the "
                   "package that provides it"),
    "duplicate": ("from dg_meta.algorithms.erm import ERM as Base\nfrom dg_meta.registry import register_algorithm\n"
                  "@register_algorithm\nclass ERM(Base):\n    pass\n",
                  "--plugin {p}: algorithm name 'ERM' is already registered by dg_meta.algorithms.erm; {m} must "
                  "register its class under another name (@register_algorithm(name=...))"),
    "no_predict": ("import torch\nfrom dg_meta.algorithm import Algorithm\nfrom dg_meta.registry import "
                   "register_algorithm\n@register_algorithm\nclass NoPredict(Algorithm):\n"
                   "    def update(self, batch):\n        return {}\n",
                   "--plugin {p}: algorithm 'NoPredict' does not implement predict(): define it on the class "
                   "(see the README's 'Adding an algorithm')"),
    "raises": ("x = 1\nraise RuntimeError('boom')\n",
               "--plugin {p} failed while importing ({p} line 2): RuntimeError: boom"),
}


@pytest.mark.parametrize("kind", list(BAD_PLUGINS))
def test_bad_plugins_are_one_line_exit_2_before_training(kind, tmp_path, capsys):
    from dg_meta.train import main

    source, message = BAD_PLUGINS[kind]
    path = tmp_path / f"bad_{kind}.py"
    path.write_text(source)
    out = tmp_path / "run"
    registered = dict(registry.ALGORITHMS)
    assert main(["--plugin", str(path), "--algorithm", "ERM", "--steps", "2", "--output-dir", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: " + message.format(p=path, m=f"bad_{kind}") + "\n"
    assert captured.out == "" and not out.exists()
    assert registry.ALGORITHMS == registered


def test_plugin_as_a_file_path(tmp_path):
    path = tmp_path / "file_plugin.py"
    path.write_text(PLUGIN.replace("MyERM", "FileERM"))
    registry.load_plugin(str(path))
    assert registry.get_algorithm("FileERM").__module__ == "file_plugin"
    with pytest.raises(UsageError, match=r"^--plugin nope\.py: no such file; pass an existing \.py file"):
        registry.load_plugin("nope.py")


def test_readme_plugin_example_runs_and_honours_the_inherited_hparams(tmp_path):
    readme = (REPO / "README.md").read_text()
    source = readme.split("# my_algorithms.py\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "readme_example_plugin.py"
    path.write_text(source.replace("class MyERM", "class ReadmeERM"))
    registry.load_plugin(str(path))
    cls = registry.get_algorithm("ReadmeERM")
    hparams = {"lr": 0.01, "weight_decay": 0.1, "nonlinear_classifier": True, "my_weight": 1.0}
    algorithm = cls((1, 16, 16), 10, 2, hparams)
    assert isinstance(algorithm.head, torch.nn.Sequential)
    assert algorithm.optimizer.param_groups[0]["weight_decay"] == 0.1
    batch = [(torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))) for _ in range(2)]
    assert torch.isfinite(algorithm.update(batch)["loss"])
