"""The registry: every algorithm and dataset is found here by name.

Built-in plug-ins are discovered by importing every module of ``dg_meta.algorithms`` and
``dg_meta.datasets``; third-party ones through the entry-point groups ``dg_meta.algorithms`` and
``dg_meta.datasets`` or an explicit ``load_plugin("some.module")`` (the CLI's ``--plugin``). Registering
is a class decorator, so a new algorithm is one file with ``@register_algorithm`` on its class.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import pkgutil
import sys
import traceback
from importlib.metadata import entry_points
from pathlib import Path
from typing import TypeVar

from dg_meta.errors import UsageError

T = TypeVar("T", bound=type)

ALGORITHMS: dict[str, type] = {}
DATASETS: dict[str, type] = {}
_discovered = False


def _register(table: dict[str, type], kind: str, cls: T, name: str | None) -> T:
    """Register ``cls``; the same class re-imported (same module and qualified name) replaces itself, any
    other class under a taken name is refused with a one-line ``UsageError``."""
    key = name or cls.__name__
    existing = table.get(key)
    if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
        raise UsageError(f"{kind} name '{key}' is already registered by {existing.__module__}; {cls.__module__} "
                         f"must register its class under another name (@register_{kind}(name=...))")
    table[key] = cls
    return cls


def register_algorithm(cls: T | None = None, *, name: str | None = None):
    """Class decorator: make an ``Algorithm`` subclass available under ``name`` (default: class name)."""
    if cls is None:
        return lambda c: _register(ALGORITHMS, "algorithm", c, name)
    return _register(ALGORITHMS, "algorithm", cls, name)


def register_dataset(cls: T | None = None, *, name: str | None = None):
    """Class decorator: make a ``MultiDomainDataset`` subclass available under ``name``."""
    if cls is None:
        return lambda c: _register(DATASETS, "dataset", c, name)
    return _register(DATASETS, "dataset", cls, name)


def _import_package_modules(package_name: str) -> None:
    package = importlib.import_module(package_name)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")


def discover() -> None:
    """Import the built-in plug-in packages and every installed entry point (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    _import_package_modules("dg_meta.algorithms")
    _import_package_modules("dg_meta.datasets")
    for group in ("dg_meta.algorithms", "dg_meta.datasets"):
        for ep in entry_points(group=group):
            ep.load()


def load_plugin(module: str) -> None:
    """Import ``module`` (a module name, or the path of a ``.py`` file) so that its ``@register_*`` decorators
    run (the CLI's ``--plugin``). Every way it can fail is one ``UsageError`` line naming the fix: not found,
    a syntax error, a module it imports that is not installed, a name already registered, an error while
    importing, or an algorithm that does not implement the interface. A plug-in that fails registers nothing."""
    discover()
    before = dict(ALGORITHMS), dict(DATASETS)
    try:
        _load_plugin(module)
    except UsageError:
        for table, saved in zip((ALGORITHMS, DATASETS), before):
            table.clear()
            table.update(saved)
        raise


def _load_plugin(module: str) -> None:
    before = dict(ALGORITHMS)
    is_file = module.endswith(".py")
    if is_file and not Path(module).is_file():
        raise UsageError(f"--plugin {module}: no such file; pass an existing .py file or an importable module name")
    try:
        if is_file:
            _import_file(Path(module))
        else:
            importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if is_file or (exc.name is not None and exc.name != module and not module.startswith(f"{exc.name}.")):
            raise UsageError(f"--plugin {module} imports '{exc.name}', which is not installed: pip install the "
                             "package that provides it") from None
        raise UsageError(
            f"--plugin {module}: cannot import it ({exc}); make it importable (pip install it or add "
            "its folder to PYTHONPATH), or pass the path of its .py file"
        ) from None
    except SyntaxError as exc:
        raise UsageError(f"--plugin {module}: syntax error in {exc.filename} line {exc.lineno}: {exc.msg}; fix "
                         "the plug-in") from None
    except UsageError as exc:
        raise UsageError(f"--plugin {module}: {exc}") from None
    except Exception as exc:  # any error in third-party code becomes one line
        where = _last_frame_in(exc)
        raise UsageError(f"--plugin {module} failed while importing{where}: {type(exc).__name__}: {exc}") from None
    for key, cls in ALGORITHMS.items():
        if before.get(key) is not cls:
            _check_algorithm(module, key, cls)


def _import_file(path: Path) -> None:
    """Import a plug-in file as a module named after it (so pickling and re-registration work)."""
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"--plugin {path}: not a Python file that can be imported")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise


def _last_frame_in(exc: BaseException) -> str:
    """`` (FILE line N)`` of the innermost frame of ``exc``'s traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f" ({frames[-1].filename} line {frames[-1].lineno})" if frames else ""


def _check_algorithm(module: str, key: str, cls: type) -> None:
    """A plug-in algorithm must override ``update``, and ``predict`` unless it is episodic (``adapt``)."""
    from dg_meta.algorithm import Algorithm

    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise UsageError(f"--plugin {module}: algorithm '{key}' is not a subclass of dg_meta.algorithm.Algorithm")
    missing = [m for m in ("update", "predict") if getattr(cls, m) is getattr(Algorithm, m)
               and (m == "update" or cls.predicts_classes)]
    if missing:
        raise UsageError(f"--plugin {module}: algorithm '{key}' does not implement {' and '.join(missing)}(): "
                         "define it on the class (see the README's 'Adding an algorithm')")


def _lookup(table: dict[str, type], kind: str, name: str) -> type:
    discover()
    if name in table:
        return table[name]
    folded = {k.lower(): k for k in table}
    close = difflib.get_close_matches(name, list(table), n=3, cutoff=0.5)
    if name.lower() in folded:
        close = [folded[name.lower()]]
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise UsageError(f"unknown {kind} '{name}': {hint}registered: {', '.join(sorted(table))}")


def get_algorithm(name: str) -> type:
    """The algorithm class registered as ``name``; unknown names raise a one-line ``UsageError``."""
    return _lookup(ALGORITHMS, "algorithm", name)


def get_dataset(name: str) -> type:
    """The dataset class registered as ``name``; unknown names raise a one-line ``UsageError``."""
    return _lookup(DATASETS, "dataset", name)


def algorithm_names() -> list[str]:
    discover()
    return sorted(ALGORITHMS)


def dataset_names() -> list[str]:
    discover()
    return sorted(DATASETS)
