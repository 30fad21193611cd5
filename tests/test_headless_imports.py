"""The headless core never imports Textual, and dependencies point one way:
``tui -> collectors -> (pricing, store)``; ``pricing`` and ``store`` import nothing of the project
(``store`` not even ``pricing``)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADLESS = (
    "tokentop",
    "tokentop.collectors",
    "tokentop.collectors.runner",
    "tokentop.collectors.demo",
    "tokentop.collectors.config",
    "tokentop.collectors.sources",
    "tokentop.collectors.exporter",
    "tokentop.collectors.promsource",
    "tokentop.tui.snapshot_prometheus",
    "tokentop.pricing.book",
    "tokentop.pricing.gpu",
    "tokentop.pricing.tokens",
    "tokentop.store.db",
    "tokentop.store.queries",
    "tokentop.store.report",
)


def test_headless_modules_import_without_textual() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in HEADLESS)
        + "bad = sorted(m for m in sys.modules if m == 'textual' or m.startswith('textual.'))\n"
        + "print(bad)\n"
        + "sys.exit(1 if bad else 0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "[]"


def _top(module: str) -> str:
    """The package a module belongs to: ``tokentop.store.db`` -> ``store``, ``textual.app`` ->
    ``textual``."""
    parts = module.split(".")
    return parts[1] if parts[0] == "tokentop" and len(parts) > 1 else parts[0]


def _imports(path: Path) -> list[tuple[int, str]]:
    """Packages named by every absolute import in a file (inside functions too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, _top(alias.name)) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, _top(node.module)))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, _top(node.args[0].value)))
    return found


FORBIDDEN = {
    "collectors": {"textual", "tui"},
    "pricing": {"textual", "tui", "collectors", "store"},
    "store": {"textual", "tui", "collectors", "pricing"},
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    offences = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in files
        for line, name in _imports(path)
        if name in FORBIDDEN[package]
    ]
    assert offences == []


def test_the_import_scanner_sees_lazy_and_aliased_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import textual.app as t\n"
        "def f():\n"
        "    from tokentop.tui.app import App\n"
        "    import importlib\n"
        "    importlib.import_module('tokentop.collectors.demo')\n"
        "from . import sibling\n",
        encoding="utf-8",
    )
    assert [name for _, name in _imports(sample)] == ["textual", "tui", "importlib", "collectors"]
