"""Layers point down: cli -> evaluation / calib / export -> runtime -> core (style.md, "Layers point down").

Read from the source, not from ``sys.modules``: every ``import`` / ``from ... import`` statement of every module
(at any depth: inside functions and ``if TYPE_CHECKING:`` blocks too, relative imports resolved), and every
``importlib.import_module("...")`` / ``__import__("...")`` called with a literal name.

The backend registry (``segsentry.runtime.backends.BACKENDS``) names the torch backend's module, which lives
beside the exporter, as data; it is imported only when that backend is created, which
``tests/runtime/test_no_torch.py`` checks by running the runtime and looking at what it loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import segsentry

PACKAGE = Path(segsentry.__file__).parent
ABOVE_RUNTIME = ("segsentry.evaluation", "segsentry.export", "segsentry.calib", "segsentry.dicom",
                 "segsentry.distributed", "segsentry.cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """``(line, module)`` for everything ``path`` (or ``source``, read as if it were ``path``) imports;
    ``from a import b`` yields ``a`` and ``a.b``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    text = path.read_text(encoding="utf-8") if source is None else source
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found.extend((node.lineno, f"{module}.{alias.name}") for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def _offences(paths: list[Path], forbidden: tuple[str, ...], source: str | None = None) -> list[str]:
    return [f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
            for path in paths for line, module in imported_modules(path, source)
            if any(module == f or module.startswith(f + ".") for f in forbidden)]


def test_the_runtime_imports_nothing_above_it():
    modules = sorted((PACKAGE / "runtime").rglob("*.py"))
    assert len(modules) > 10  # the walk found the runtime
    assert _offences(modules, ABOVE_RUNTIME) == []


def test_nothing_in_the_package_imports_the_cli():
    modules = [p for p in sorted(PACKAGE.rglob("*.py")) if p != PACKAGE / "cli.py"]
    assert _offences(modules, ("segsentry.cli",)) == []


@pytest.mark.parametrize("source,module", [
    ("import segsentry.export.nnunet\n", "segsentry.export.nnunet"),
    ("from segsentry.evaluation import metrics\n", "segsentry.evaluation.metrics"),
    ("from segsentry import calib\n", "segsentry.calib"),
    ("def f():\n    from segsentry.cli import app\n", "segsentry.cli"),
    ("from ...export import api\n", "segsentry.export"),  # relative, from segsentry/runtime/backends/
    ("import importlib\nimportlib.import_module('segsentry.export.torch_backend')\n", "segsentry.export.torch_backend"),
])
def test_the_walk_sees_every_form_of_import(source, module):
    """The check can fail: each form of import, as if written in a runtime module, is reported."""
    probe = PACKAGE / "runtime" / "backends" / "probe.py"  # never written: only its name places the source
    offences = _offences([probe], ABOVE_RUNTIME, source)
    assert any(o.endswith(f"imports {module}") for o in offences), offences


def test_allowed_imports_are_not_reported():
    probe = PACKAGE / "runtime" / "backends" / "probe.py"
    source = "import segsentry.runtime.io\nfrom ..bundle import load_bundle\nfrom segsentry.errors import BackendError\n"
    assert _offences([probe], ABOVE_RUNTIME, source) == []
    assert ("segsentry.runtime.bundle" in {m for _, m in imported_modules(probe, source)})
