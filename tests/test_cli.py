"""The command line end to end, in subprocesses, as scripts use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tokentop.store.db import Store


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tokentop", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=120,
    )


def assert_usage_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tokentop: error: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_price_worked_example_from_the_article() -> None:
    result = run("price", "gpt-4o-2024-05-13", "--input", "1000", "--output", "200", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["total_usd"] == 0.008
    assert data["priced"] is True
    assert data["breakdown_usd"]["input_uncached"] == 0.005
    assert data["breakdown_usd"]["output"] == 0.003
    assert data["prices"]["source"] == "genai-prices"
    assert data["prices"]["online_updates"] is False


def test_price_cached_tokens_are_priced_at_the_cache_rate() -> None:
    result = run(
        "price",
        "claude-sonnet-4-20250514",
        "--provider",
        "anthropic",
        "--input",
        "1000",
        "--cached",
        "500",
        "--cache-write",
        "100",
        "--output",
        "200",
        "--json",
    )
    data = json.loads(result.stdout)
    # 400 x $3 + 500 x $0.30 + 100 x $3.75 + 200 x $15 per million
    assert data["total_usd"] == pytest.approx(0.004725, abs=1e-12)


def test_price_unknown_model_is_unpriced_never_zero() -> None:
    result = run("price", "acme-llm-70b-ft", "--input", "10", "--output", "5", "--json")
    assert result.returncode == 0
    data = json.loads(result.stdout)
    assert data["priced"] is False
    assert data["total_usd"] is None
    human = run("price", "acme-llm-70b-ft", "--input", "10", "--output", "5")
    assert "unpriced" in human.stdout
    assert "$0" not in human.stdout


def test_price_input_file_offline_is_marked_approximate(tmp_path: Path) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Summarise the quarterly report in three bullet points.\n" * 10)
    result = run("price", "gpt-4o", "--input-file", str(prompt), "--output", "100", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["approximate"] is True
    assert "offline" in data["token_count_method"]
    assert data["input_tokens"] > 0


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("price", "gpt-4o", "--input", "-5", "--output", "3"), ("--input", "'-5'")),
        (("price", "gpt-4o", "--input", "lots", "--output", "3"), ("--input", "'lots'")),
        (("price", "gpt-4o", "--input", "10", "--output", "1.5"), ("--output", "'1.5'")),
        (("price", "gpt-4o", "--input", "10", "--cached", "20"), ("--cached", "20")),
        (("price", "gpt-4o", "--input", "10", "--at", "yesterday"), ("--at", "'yesterday'")),
        (("price", "gpt-4o"), ("--input",)),
        (("report", "--since", "1x"), ("--since", "'1x'")),
        (("report", "--since", "2999-01-01"), ("--since", "future")),
        (("collect", "--interval", "-1"), ("--interval", "'-1'")),
        (("frobnicate",), ("frobnicate",)),
    ],
)
def test_bad_input_is_one_line_exit_2(args: tuple[str, ...], needles: tuple[str, ...]) -> None:
    assert_usage_error(run(*args), *needles)


def test_broken_config_file(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("budget_daily_usd = [\n")
    assert_usage_error(run("--config", str(config), "report"), str(config), "not valid TOML")
    config.write_text('budget_daily_usd = "lots"\n')
    assert_usage_error(run("--config", str(config), "report"), "budget_daily_usd", "'lots'")
    assert_usage_error(
        run("report", env={"TOKENTOP_CONFIG": str(tmp_path / "nope.toml")}), "nope.toml"
    )


def test_missing_database_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "none.db"
    assert_usage_error(run("--db", str(missing), "report"), str(missing))
    assert not missing.exists()


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "demo.db"
    # A 10-minute interval: the sources stay fresh (30 min) for every test of this module; at
    # the demo's 1 s they would be stale 10 s after this one-shot collect.
    result = run("collect", "--demo", "--once", "--interval", "600", "--db", str(path))
    assert result.returncode == 0, result.stderr
    return path


def report(db: Path, *extra: str) -> dict[str, Any]:
    result = run("report", "--db", str(db), "--json", *extra)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_report_json_contract(demo_db: Path) -> None:
    data = report(demo_db, "--since", "1h")
    for key in (
        "window",
        "total_usd",
        "billed_usd",
        "requests",
        "cost_per_request_usd",
        "by_model",
        "unpriced",
        "gpu",
        "sources",
        "prices",
    ):
        assert key in data
    assert set(data["window"]) == {"start", "end"}
    # The demo bills a UTC day once it has ended, so the last hour is unbilled, unless it
    # reaches back past midnight into a day that ended before the collect.
    start = datetime.fromisoformat(data["window"]["start"])
    if start.date() == datetime.fromisoformat(data["tokentop"]["generated_at"]).date():
        assert data["billed_usd"] is None
    else:
        assert data["billed_usd"] is None or data["billed_usd"] > 0
    assert data["requests"] > 0
    assert data["total_usd"] > 0
    assert data["tokentop"]["demo"] is True
    row_keys = {
        "provider",
        "model",
        "requests",
        "input_tokens",
        "cached_input_tokens",
        "cache_write_tokens",
        "output_tokens",
        "cost_usd",
        "priced",
    }
    for row in data["by_model"]:
        assert row_keys <= set(row)
    unpriced = [r for r in data["by_model"] if not r["priced"]]
    assert unpriced and all(r["cost_usd"] is None for r in unpriced)
    assert data["unpriced"] == {
        f"{r['provider']}/{r['model']}": r["input_tokens"] + r["output_tokens"] for r in unpriced
    }
    priced_sum = sum(r["cost_usd"] for r in data["by_model"] if r["priced"])
    assert priced_sum == pytest.approx(data["total_usd"], abs=1e-6)
    gpu = data["gpu"]
    for key in (
        "cost_usd",
        "inferences",
        "cost_per_inference_usd",
        "cost_per_1m_tokens_usd",
        "idle_cost_usd",
        "devices",
    ):
        assert key in gpu
    assert len(gpu["devices"]) == 2
    assert {s["name"] for s in data["sources"]} == {"demo", "demo-gpu"}
    assert all(s["state"] == "ok" for s in data["sources"])
    assert data["prices"]["source"] == "genai-prices"
    assert any(ref.startswith("genai-prices") for ref in data["prices"]["refs"])


def test_repeated_collects_never_count_twice(demo_db: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.db"
    source = Store(demo_db)
    source.conn.execute(f"VACUUM INTO '{copy}'")
    source.close()

    def closed_totals(path: Path) -> tuple[int, int, int]:
        store = Store(path)
        try:
            mark = store.query("SELECT watermark FROM source WHERE name = 'demo'")[0][0]
            row = store.query(
                "SELECT SUM(requests), SUM(cost_nano), COUNT(*) FROM usage WHERE start < ?",
                (mark,),
            )[0]
            return row[0], row[1], row[2]
        finally:
            store.close()

    before = closed_totals(copy)
    for _ in range(2):
        assert run("collect", "--demo", "--once", "--db", str(copy)).returncode == 0
    # Every minute that was closed before: unchanged after two more collects.
    store = Store(demo_db)
    old_mark = store.query("SELECT watermark FROM source WHERE name = 'demo'")[0][0]
    store.close()
    store = Store(copy)
    try:
        row = store.query(
            "SELECT SUM(requests), SUM(cost_nano), COUNT(*) FROM usage WHERE start < ?",
            (old_mark,),
        )[0]
    finally:
        store.close()
    assert (row[0], row[1], row[2]) == before


@pytest.mark.parametrize("fmt", ["json", "csv", "md"])
def test_export_is_self_describing(demo_db: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"snap.{fmt}"
    result = run("export", "--db", str(demo_db), "--since", "2h", "--format", fmt, "-o", str(out))
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    if fmt == "json":
        data = json.loads(text)
        assert data["window"]["start"] and data["by_model"] and data["prices"]["version"]
        assert data["freshness"]["newest_usage"]
        assert data["tokentop"]["demo"] is True
    else:
        for needle in ("DEMO", "window", "gpt-4o-mini-2024-07-18", "genai-prices", "demo-gpu"):
            assert needle.lower() in text.lower(), needle
        assert "unpriced" in text.lower() or fmt == "csv"


def test_export_unknown_format(demo_db: Path) -> None:
    assert_usage_error(run("export", "--db", str(demo_db), "--format", "xml"), "'xml'")


def test_export_unwritable_output(demo_db: Path, tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "x.json"
    assert_usage_error(
        run("export", "--db", str(demo_db), "--format", "json", "-o", str(target)), str(target)
    )


def test_sources_json(demo_db: Path) -> None:
    result = run("sources", "--db", str(demo_db), "--demo", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)["sources"]}
    assert rows["demo"]["state"] == "ok"
    assert rows["demo-gpu"]["last_success"]
    text = run("sources", "--db", str(demo_db), "--demo")
    assert "demo-gpu" in text.stdout and "ok" in text.stdout


def test_demo_flag_before_the_subcommand_is_kept(tmp_path: Path) -> None:
    env = {"XDG_DATA_HOME": str(tmp_path / "data")}
    assert run("--demo", "collect", "--once", env=env).returncode == 0
    demo_files = list((tmp_path / "data").rglob("demo.db"))
    assert len(demo_files) == 1
    result = run("--demo", "report", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tokentop"]["demo"] is True


def test_failed_command_loses_nothing(demo_db: Path) -> None:
    before = report(demo_db, "--since", "30d")["requests"]
    assert run("export", "--db", str(demo_db), "--format", "nope").returncode == 2
    assert run("--db", str(demo_db), "report", "--since", "soon").returncode == 2
    assert report(demo_db, "--since", "30d")["requests"] == before


def test_collect_without_sources_says_what_to_do(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("nvml = false\n")
    result = run("--config", str(config), "--db", str(tmp_path / "x.db"), "collect", "--once")
    # Nothing to collect is a runtime failure (1), in one line saying how to get a source.
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokentop: error: no sources configured")
    for needle in ("OPENAI_ADMIN_KEY", "ANTHROPIC_ADMIN_KEY", "tokentop proxy", "--demo"):
        assert needle in lines[0]


def test_sources_exit_code_says_whether_every_source_is_ok(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from tokentop.store.records import SourceHealth

    db = tmp_path / "s.db"
    now = datetime.now(UTC)
    with Store(db) as store:
        for name in ("demo", "demo-gpu"):
            store.record_health(
                SourceHealth(name, "demo", "ok", last_success=now, interval_s=3600.0), now=now
            )
    args = ("sources", "--demo", "--db", str(db))
    fresh = run(*args, "--json")
    assert fresh.returncode == 0, fresh.stderr
    shape = json.loads(fresh.stdout)
    # A collector killed two hours ago: its 1 s source still says "ok" in the file.
    killed = now - timedelta(hours=2)
    with Store(db) as store:
        store.record_health(
            SourceHealth("demo", "demo", "ok", last_success=killed, interval_s=1.0), now=killed
        )
    stale = run(*args, "--json")
    assert stale.returncode == 1
    data = json.loads(stale.stdout)
    assert data.keys() == shape.keys()
    assert [r.keys() for r in data["sources"]] == [r.keys() for r in shape["sources"]]
    rows = {r["name"]: r for r in data["sources"]}
    assert rows["demo"]["state"] == "stale" and rows["demo"]["age_s"] >= 7200
    assert rows["demo-gpu"]["state"] == "ok"
    text = run(*args)
    assert text.returncode == 1
    line = next(x for x in text.stdout.splitlines() if x.startswith("demo "))
    assert "stale" in line and "2.0h ago" in line and "no successful poll for 2.0h" in line
    # A failing source fails the check too.
    with Store(db) as store:
        store.record_health(
            SourceHealth("demo", "demo", "error", last_error="boom", interval_s=1.0), now=now
        )
    assert run(*args).returncode == 1


def test_machine_without_gpus_is_not_a_failure(tmp_path: Path) -> None:
    from tests.fakes.metrics_server import MetricsServer

    with MetricsServer("vllm") as server:
        config = tmp_path / "c.toml"
        config.write_text(f'[[inference]]\nurl = "{server.url}"\n')
        result = run("--config", str(config), "--db", str(tmp_path / "x.db"), "collect", "--once")
    # NVML is only tried (nvml is not set): no driver here, or GPUs read; either way exit 0.
    assert result.returncode == 0, result.stderr
    assert "inference: ok" in result.stderr
    sources = json.loads(
        run("--db", str(tmp_path / "x.db"), "sources", "--json", "--config", str(config)).stdout
    )["sources"]
    gpu = next(s for s in sources if s["name"] == "gpu")
    assert gpu["state"] in ("ok", "unavailable")


def test_watch_only_is_a_flag_of_the_tui() -> None:
    from tokentop.tui.cli import build_parser

    assert build_parser().parse_args(["--watch-only", "--demo"]).watch_only is True
    assert build_parser().parse_args([]).watch_only is False
    assert "--watch-only" in run("--help").stdout
