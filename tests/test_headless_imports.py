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


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -c code args`` in the repository, without a startup file or a user config."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSTARTUP", "TOKENTOP_CONFIG")}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_headless_modules_import_without_textual() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in HEADLESS)
        + "bad = sorted(m for m in sys.modules if m == 'textual' or m.startswith('textual.'))\n"
        + "print(bad)\n"
        + "sys.exit(1 if bad else 0)\n"
    )
    result = _python(code)
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


HEAVY_FOR_STATUS = ("textual", "httpx", "sqlite_utils", "genai_prices")
"""What a status bar must not pay for every few seconds: the TUI, the HTTP client, the store's
writer and the price data."""

_MODULES_AFTER_MAIN = (
    "import json, runpy, sys\n"
    "sys.argv = ['tokentop', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_module('tokentop', run_name='__main__', alter_sys=True)\n"
    "except SystemExit as exc:\n"
    "    code = exc.code\n"
    "print(json.dumps({'code': code, 'modules': sorted(sys.modules)}))\n"
)
"""``python -m tokentop ARGS``, then the exit code and every module it imported, as JSON."""


def _run_main(*args: str) -> tuple[int, list[str], str]:
    result = _python(_MODULES_AFTER_MAIN, *args)
    import json

    last = result.stdout.strip().splitlines()[-1]
    data = json.loads(last)
    return data["code"], data["modules"], result.stdout + result.stderr


def _heavy(modules: list[str], packages: tuple[str, ...]) -> list[str]:
    return sorted({m.split(".")[0] for m in modules} & set(packages))


@pytest.fixture
def status_db(tmp_path: Path) -> tuple[Path, Path]:
    """A database with a few dollars spent today, and a config with a budget and a rule."""
    from datetime import UTC, datetime

    from tokentop.store.db import Store
    from tokentop.store.records import Batch, SourceHealth, UsageBucket

    now = datetime.now(UTC)
    db = tmp_path / "status.db"
    with Store(db) as store:
        store.record_health(
            SourceHealth(name="demo", kind="demo", state="ok", last_success=now), now=now
        )
        usage = UsageBucket(
            source="demo",
            provider="openai",
            model="gpt-4o",
            start=now.replace(second=0, microsecond=0),
            requests=3,
            cost_nano=12_000_000_000,
            priced=True,
            price_ref="test",
        )
        store.write_batch(Batch(usage=(usage,)))
    config = tmp_path / "config.toml"  # read in full, as every command does
    config.write_text(
        "budget_daily_usd = 100\n[retention]\nminutes_days = 7\n"
        '[[alert]]\nname = "daily-budget"\nkind = "budget"\nperiod = "day"\n',
        encoding="utf-8",
    )
    return db, config


def test_status_imports_no_textual_httpx_sqlite_utils_or_price_data(
    status_db: tuple[Path, Path],
) -> None:
    db, config = status_db
    code, modules, output = _run_main("status", "--db", str(db), "--config", str(config))
    assert code == 0, output
    assert "today $12.00 (12%)" in output, output  # it did read the database
    assert "tokentop.store.status" in modules
    assert _heavy(modules, HEAVY_FOR_STATUS) == []
    # Nor what only writing, pricing or the collector need: the store's writer and its record
    # classes, the price book, the event loop.
    slow = {"tokentop.store.db", "tokentop.store.records", "tokentop.pricing.book", "asyncio"}
    assert sorted(slow & set(modules)) == []


def test_check_imports_no_textual_httpx_or_price_data(status_db: tuple[Path, Path]) -> None:
    """``check`` opens the store (sqlite-utils) to evaluate the rules, but loads no TUI, no HTTP
    client and no price data."""
    db, config = status_db
    code, modules, output = _run_main("check", "--db", str(db), "--config", str(config))
    assert code == 0, output  # OK: $12 of $100
    assert output.startswith("OK"), output
    assert _heavy(modules, ("textual", "httpx", "genai_prices")) == []
