"""``report`` and ``export`` take the TUI's view: ``--filter``, ``--group-by``, ``--sort``,
``--until``; the view is recorded in the file and its ``command`` gives the same figures."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tokentop.tui.cli import build_parser


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokentop", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=120,
    )


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "demo.db"
    result = run("collect", "--demo", "--once", "--interval", "600", "--db", str(path))
    assert result.returncode == 0, result.stderr
    return path


def export(db: Path, *extra: str) -> dict[str, Any]:
    result = run("export", "--db", str(db), "--format", "json", *extra)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_filter_and_grouping_are_applied_and_recorded(demo_db: Path) -> None:
    everything = export(demo_db, "--since", "2h")
    data = export(demo_db, "--since", "2h", "--filter", "gpt", "--group-by", "project")
    assert data["view"]["filter"] == "gpt" and data["view"]["group_by"] == "project"
    assert data["view"]["sort"] == "cost:desc"
    assert all("gpt" in row["model"] for row in data["by_model"])
    assert 0 < data["total_usd"] < everything["total_usd"]
    # The group rows are the screen's table: they add up to the total, dearest first.
    groups = data["by_group"]
    assert groups and all(row["group_by"] == "project" for row in groups)
    assert sum(row["requests"] for row in groups) == data["requests"]
    assert abs(sum(row["cost_usd"] or 0 for row in groups) - data["total_usd"]) < 1e-6
    costs = [row["cost_usd"] for row in groups]
    assert costs == sorted(costs, reverse=True)


def test_the_recorded_command_gives_the_same_figures(demo_db: Path) -> None:
    first = export(demo_db, "--since", "3h", "--filter", "model:o3-mini", "--sort", "requests")
    command = shlex.split(first["view"]["command"])
    assert command[:2] == ["tokentop", "export"] and "--until" in command
    again = run(*command[1:])
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    assert second["total_usd"] == first["total_usd"] and second["requests"] == first["requests"]
    assert [r["key"] for r in second["by_group"]] == [r["key"] for r in first["by_group"]]
    assert first["by_group"] and {r["key"] for r in first["by_group"]} == {"o3-mini"}


def test_sort_orders_the_group_rows(demo_db: Path) -> None:
    data = export(demo_db, "--since", "2h", "--sort", "name")
    keys = [row["key"].lower() for row in data["by_group"]]
    assert keys == sorted(keys)
    data = export(demo_db, "--since", "2h", "--sort", "requests:asc")
    requests = [row["requests"] for row in data["by_group"]]
    assert requests == sorted(requests)


def test_report_takes_the_view_too(demo_db: Path) -> None:
    result = run("report", "--db", str(demo_db), "--filter", "claude", "--group-by", "tag")
    assert result.returncode == 0, result.stderr
    assert "Filter: `claude`; by tag" in result.stdout and "## By tag" in result.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--group-by", "colour"), "--group-by"),
        (("--sort", "colour"), "--sort"),
        (("--since", "2h", "--until", "2001-01-01T00:00:00Z"), "--until"),
        (("--until", "yesterday"), "--until"),
    ],
)
def test_bad_view_options_are_one_line_exit_2(
    demo_db: Path, args: tuple[str, ...], needle: str
) -> None:
    result = run("export", "--db", str(demo_db), "--format", "json", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokentop: error: ") and needle in lines[0]


def test_tui_export_options() -> None:
    args = build_parser().parse_args(["--export-dir", "/tmp/x", "--export-format", "json,md"])
    assert args.export_dir == Path("/tmp/x") and args.export_format == ("json", "md")
    with pytest.raises(Exception, match="--export-format"):
        build_parser().parse_args(["--export-format", "xml"])
