"""``tokentop check`` (the monitoring-plugin convention) and ``tokentop status`` (one line).

Most tests call the command line in-process with the clock frozen at 23:59:30 UTC on 31 December
(``utcnow`` is looked up at call time); the last ones run it in a subprocess with data whose
verdict does not depend on the hour.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.helpers import bucket
from tokentop.collectors import base
from tokentop.collectors.alerts import AlertEngine
from tokentop.collectors.config import load_config
from tokentop.store.db import Store
from tokentop.store.records import Batch, SourceHealth
from tokentop.tui.cli import main

NOW = datetime(2025, 12, 31, 23, 59, 30, tzinfo=UTC)

RULES = """
budget_daily_usd = 1

[[alert]]
name = "daily-budget"
kind = "budget"

[[alert]]
name = "spike"
kind = "spike"
min_usd_per_hour = 1000
"""


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "utcnow", lambda: NOW)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(RULES, encoding="utf-8")
    return path


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store(db_path)
    yield s
    s.close()


def polled(store: Store, ago: float = 30) -> None:
    store.record_health(
        SourceHealth(
            name="demo", kind="demo", state="ok", last_success=NOW - timedelta(seconds=ago)
        ),
        now=NOW,
    )


def spend(store: Store, usd: str) -> None:
    store.write_batch(Batch(usage=(bucket(NOW - timedelta(minutes=10), cost=usd),)))


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def check(
    capsys: pytest.CaptureFixture[str], config: Path, db: Path, *args: str
) -> tuple[int, str, str]:
    return cli(capsys, "check", "--config", str(config), "--db", str(db), *args)


def test_check_critical(
    frozen: None, store: Store, config: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    polled(store)
    spend(store, "2")
    code, out, err = check(capsys, config, db_path)
    assert code == 2, err
    assert out == (
        "CRITICAL - daily-budget: $2.00 of $1.00 today (200%), burn $2.00/h"
        " | today_usd=2.00;0.80;1.00 burn_usd_per_h=2.00 spike_usd_per_h=8.00;;0.00"
        " spike_baseline_usd_per_h=0.00\n"
    )


def test_check_warning_and_ok(
    frozen: None, store: Store, config: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    polled(store)
    spend(store, "0.85")
    code, out, _ = check(capsys, config, db_path)
    assert code == 1 and out.startswith("WARNING - daily-budget: $0.85 of $1.00 today (85%)")
    code, out, _ = check(capsys, config, db_path, "--rule", "spike")
    assert code == 0 and out.startswith("OK - spike: burn $3.40/h over 15m")
    assert out.count("|") == 1 and "spike_usd_per_h=3.40" in out


def test_check_ok_with_several_rules(
    frozen: None, store: Store, config: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    polled(store)
    spend(store, "0.10")
    code, out, _ = check(capsys, config, db_path)
    assert code == 0
    assert out.startswith("OK - 2 rules, none firing; today $0.10, burn $0.10/h | today_usd=0.10")


def test_check_json(
    frozen: None, store: Store, config: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    polled(store)
    spend(store, "2")
    code, out, _ = check(capsys, config, db_path, "--json")
    data = json.loads(out)
    assert code == 2 and data["status"] == "CRITICAL" and data["code"] == 2
    assert data["line"].startswith("CRITICAL - daily-budget")
    budget = data["rules"][0]
    assert budget["name"] == "daily-budget" and budget["status"] == "CRITICAL"
    assert budget["findings"][0]["severity"] == "critical" and budget["value"] == 200.0
    assert data["rules"][1]["status"] == "OK"
    assert data["stored"] == []  # no collector has evaluated yet


def test_check_unknown_cases(
    frozen: None,
    store: Store,
    config: Path,
    db_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = check(capsys, config, tmp_path / "absent.db")
    assert code == 3 and out.startswith("UNKNOWN - no database at ")
    code, out, _ = check(capsys, config, db_path)
    assert code == 3 and out.startswith("UNKNOWN - no data: no source has been polled")
    polled(store, ago=3600)
    code, out, _ = check(capsys, config, db_path)
    assert code == 3
    assert out.startswith("UNKNOWN - database stale: the newest successful poll was 1h ago")
    code, out, _ = check(capsys, config, db_path, "--stale-after", "2h")
    assert code == 0
    code, out, _ = check(capsys, config, db_path, "--rule", "nope")
    assert code == 3
    assert out == "UNKNOWN - --rule: no rule 'nope' (rules: daily-budget, spike)\n"


def test_check_usage_errors_are_unknown(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, "check", "--bogus")
    assert code == 3 and out == "UNKNOWN - unrecognized arguments: --bogus\n" and err == ""
    code, out, _ = cli(capsys, "--db", "x.db", "check", "--stale-after", "soon")
    assert code == 3 and out.startswith("UNKNOWN - argument --stale-after: expected a duration")
    bad = tmp_path / "bad.toml"
    bad.write_text('[[alert]]\nname = "x"\nkind = "nope"\n', encoding="utf-8")
    code, out, _ = cli(capsys, "--config", str(bad), "check")
    assert code == 3 and "alert[0].kind must be one of" in out
    # Elsewhere a bad config stays a usage error, exit 2.
    code, out, err = cli(capsys, "--config", str(bad), "status")
    assert code == 2 and out == "" and "alert[0].kind must be one of" in err


def test_status_line(
    frozen: None, store: Store, config: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    polled(store)
    spend(store, "2")
    code, out, _ = cli(capsys, "status", "--config", str(config), "--db", str(db_path))
    assert code == 0 and out == "$8.00/h · today $2.00 (200%)\n"
    # The collector's state machine fires: the line counts it.
    AlertEngine(store, load_config(config).alerts, clock=lambda: NOW).step(NOW)
    code, out, _ = cli(capsys, "status", "--config", str(config), "--db", str(db_path))
    assert out == "$8.00/h · today $2.00 (200%) · 1 alert\n"
    code, out, _ = cli(
        capsys,
        "status",
        "--config",
        str(config),
        "--db",
        str(db_path),
        "--format",
        "{today_usd}/{budget} {alerts} {firing} {critical}{stale}",
    )
    assert out == "2.00/$1.00 1 daily-budget 1\n"
    code, out, _ = cli(capsys, "status", "--config", str(config), "--db", str(db_path), "--json")
    data = json.loads(out)
    assert data["today_usd"] == "2.00" and data["alerts"] == "1" and data["stale"] == ""


def test_status_says_stale_instead_of_a_rate(
    frozen: None, store: Store, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    polled(store, ago=7200)
    spend(store, "250")
    code, out, _ = cli(capsys, "status", "--db", str(db_path))
    assert code == 0 and out == "stale 2h · today $250\n"


def test_status_usage_errors(
    frozen: None, store: Store, db_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    polled(store)
    code, out, err = cli(capsys, "status", "--db", str(db_path), "--format", "{burnrate}")
    assert code == 2 and out == ""
    assert err.startswith("tokentop: error: --format: unknown field {burnrate} (fields: burn,")
    code, _, err = cli(capsys, "status", "--db", str(tmp_path / "absent.db"))
    assert code == 2 and "no database at" in err


# As scripts and status bars run it.


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokentop", *args],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=120,
    )


def test_check_and_status_in_a_subprocess(tmp_path: Path, db_path: Path) -> None:
    now = datetime.now(UTC)
    store = Store(db_path)
    store.record_health(
        SourceHealth(name="demo", kind="demo", state="ok", last_success=now), now=now
    )
    # $5 in the last ten minutes: projected past $1 today at any hour.
    store.write_batch(Batch(usage=(bucket(now - timedelta(minutes=10), cost="5"),)))
    store.close()
    config = tmp_path / "c.toml"
    config.write_text(RULES.replace('kind = "budget"', 'kind = "budget"\nbasis = "projected"'))
    result = run("check", "--config", str(config), "--db", str(db_path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout.startswith("CRITICAL - daily-budget: projected $")
    assert len(result.stdout.splitlines()) == 1
    missing = run("check", "--db", str(tmp_path / "none.db"))
    assert missing.returncode == 3 and missing.stdout.startswith("UNKNOWN - no database")
    status = run("status", "--config", str(config), "--db", str(db_path))
    assert status.returncode == 0, status.stderr
    assert len(status.stdout.splitlines()) == 1 and "today $" in status.stdout


def test_check_judges_the_sources_the_collector_runs(
    frozen: None, store: Store, tmp_path: Path, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "down.toml"
    config.write_text('[[alert]]\nname = "down"\nkind = "source_down"\n', encoding="utf-8")
    polled(store)
    store.record_health(
        SourceHealth(name="retired", kind="openai", state="error", last_error="HTTP 500"), now=NOW
    )
    code, out, _ = check(capsys, config, db_path)
    assert code == 1 and out.startswith("WARNING - down: source retired error: HTTP 500")
    # The collector says what it runs: a source no longer configured is not an outage.
    AlertEngine(store, load_config(config).alerts, sources={"demo"}).step(NOW)
    code, out, _ = check(capsys, config, db_path)
    assert code == 0 and out.startswith("OK - down: 1 source(s) up")
