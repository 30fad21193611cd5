"""``tokentop status`` and ``tokentop check`` over a fleet's Prometheus (``--prometheus URL`` or
``[prometheus] url``), against a fake Prometheus HTTP API: the status line from the fleet's
figures, the rules evaluated on PromQL answers, rules the fleet cannot answer UNKNOWN with their
reason, and an unreachable server a source error (never $0). The real server is exercised by
``test_prometheus_fleet.py``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.prometheus_api import FakePrometheusAPI
from tests.fakes.prometheus_server import free_port
from tokentop.tui.cli import main

COST = "tokentop_cost_usd_total"
LAST_POLL = "tokentop_source_last_success_timestamp_seconds"


class Fleet:
    """What the fake fleet answers: $12.50 spent in every window (all of it this hour), 10
    requests, one unpriced model, sources polled 30 s ago, and any firing alerts."""

    def __init__(self) -> None:
        self.cost = 12.5
        self.alerts: list[tuple[dict[str, str], float]] = []
        self.host_alerts: list[tuple[dict[str, str], float]] = []

    def __call__(self, promql: str, at: float) -> list[tuple[dict[str, str], float]]:
        if "ALERTS{" in promql:
            return self.alerts
        if "tokentop_alerts_firing" in promql:
            return self.host_alerts
        host = {"source": "demo", "kind": "demo", "instance": "h1:9464"}
        if LAST_POLL in promql:
            return [({} if promql.startswith("max(") else host, at - 30)]
        if promql.startswith("up == 0"):
            return []  # every exporter scraped
        if "tokentop_source_up" in promql:
            return [(host, 1)]
        if promql.startswith("count(last_over_time(tokentop_requests_total"):
            return [({}, 4)]  # usage history at any time asked
        if promql.startswith("count(tokentop_requests_total offset"):
            return [({}, 4)]
        if at % 3600 == 0:
            return []  # nothing in the day's whole hours (asked at the hour): all this hour
        if COST in promql:
            by_model = "model" in promql.split("(", 2)[1]
            labels = {"provider": "openai", "model": "gpt-4o"} if by_model else {}
            return [(labels, self.cost)]
        if "tokentop_tokens_total" in promql:
            labels = {"provider": "acme", "model": "mystery", "kind": "output", "priced": "false"}
            return [(labels, 1234)]
        if "tokentop_requests_total" in promql:
            return [({"priced": "true", "provider": "openai", "model": "gpt-4o"}, 10)]
        return []


@pytest.fixture
def fleet() -> Iterator[tuple[Fleet, FakePrometheusAPI]]:
    answers = Fleet()
    with FakePrometheusAPI(answers) as api:
        yield answers, api


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _config(tmp_path: Path, text: str = "") -> str:
    path = tmp_path / "config.toml"
    path.write_text("budget_daily_usd = 100\n" + text, encoding="utf-8")
    return str(path)


def test_status_line_from_the_fleet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fleet: tuple[Fleet, FakePrometheusAPI]
) -> None:
    answers, api = fleet
    answers.alerts = [({"alertname": "TokentopSpendSpike", "severity": "warning"}, 1)]
    answers.host_alerts = [({"instance": "h1:9464", "severity": "critical"}, 1)]
    config = _config(tmp_path)
    # No database anywhere: the fleet is the source.
    db = str(tmp_path / "none.db")
    code, out, err = _run(capsys, "--db", db, "--config", config, "status", "--prometheus", api.url)
    assert code == 0, err
    # Burn over 15 minutes: $12.50 in 15 min = $50/h; today $12.50 of the $100 budget.
    assert out == "$50.00/h · today $12.50 (12%) · 2 alerts\n"
    code, out, err = _run(
        capsys, "--db", db, "--config", config, "status", "--prometheus", api.url, "--json"
    )
    fields = json.loads(out)
    assert fields["firing"] == "tokentop@h1:9464,TokentopSpendSpike"
    assert fields["critical"] == "1"
    assert fields["unpriced"] == "1,234 unpriced tokens"
    assert fields["stale"] == "" and 25 <= int(fields["age_s"]) <= 60
    assert not (tmp_path / "none.db").exists()


def test_status_from_the_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fleet: tuple[Fleet, FakePrometheusAPI]
) -> None:
    _, api = fleet
    config = _config(tmp_path, f'[prometheus]\nurl = "{api.url}"\n')
    code, out, _ = _run(capsys, "--db", str(tmp_path / "x.db"), "--config", config, "status")
    assert code == 0 and out.startswith("$50.00/h · today $12.50")


def test_status_of_an_unreachable_prometheus_is_an_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, _ = _run(capsys, "--config", _config(tmp_path), "status", "--prometheus", url)
    assert code == 1
    assert out.startswith(f"Prometheus error: {url}: unreachable") and "$" not in out
    assert len(out.strip().splitlines()) == 1
    code, out, _ = _run(
        capsys, "--config", _config(tmp_path), "status", "--prometheus", url, "--json"
    )
    assert code == 1 and json.loads(out)["prometheus"] == url


RULES = """
[[alert]]
name = "daily"
kind = "budget"
period = "day"

[[alert]]
name = "project-x"
kind = "budget"
period = "day"
budget_usd = 5
project = "x"

[[alert]]
name = "openai-day"
kind = "budget"
period = "day"
budget_usd = 10
provider = "openai"

[[alert]]
name = "unpriced"
kind = "unpriced"

[[alert]]
name = "down"
kind = "source_down"
"""


def _check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = _run(capsys, *args, "--json")
    return code, json.loads(out)


def test_check_evaluates_the_rules_on_the_fleet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fleet: tuple[Fleet, FakePrometheusAPI]
) -> None:
    _, api = fleet
    config = _config(tmp_path, RULES)
    code, data = _check(capsys, "--config", config, "check", "--prometheus", api.url)
    rules = {r["name"]: r for r in data["rules"]}
    assert data["prometheus"] == api.url and data["stored"] == []
    assert rules["daily"]["status"] == "OK"  # $12.50 of $100
    assert rules["openai-day"]["status"] == "CRITICAL"  # $12.50 of $10, openai's usage only
    assert rules["unpriced"]["status"] == "WARNING"
    assert "acme/mystery: 1,234 tokens" in rules["unpriced"]["summary"]
    assert rules["down"]["status"] == "OK" and "1 source(s) up" in rules["down"]["summary"]
    # The hosts export no project label: UNKNOWN, and why.
    assert rules["project-x"]["status"] == "UNKNOWN"
    assert "no project label" in rules["project-x"]["error"]
    assert code == 2  # the worst: critical
    scoped = [q for q in api.queries() if 'provider=~"(?s).*openai.*"' in q]
    assert scoped and all(COST in q or "tokentop_" in q for q in scoped)

    # With the label exported, the scope is a label matcher.
    api.labels.append("project")
    code, data = _check(
        capsys, "--config", config, "check", "--prometheus", api.url, "--rule", "project-x"
    )
    assert data["rules"][0]["status"] == "CRITICAL"  # $12.50 of $5
    assert any('project=~"(?s).*x.*"' in q for q in api.queries())
    code, out, _ = _run(capsys, "--config", config, "check", "--prometheus", api.url)
    assert out.startswith("CRITICAL - ") and "today_usd=12.50" in out


def test_check_of_an_unreachable_or_failing_prometheus_is_unknown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, RULES)
    url = f"http://127.0.0.1:{free_port()}"
    code, out, _ = _run(capsys, "--config", config, "check", "--prometheus", url)
    assert code == 3
    assert out.startswith(f"UNKNOWN - Prometheus {url}: unreachable") and "$" not in out

    def broken(promql: str, at: float) -> list[tuple[dict[str, str], float]]:
        if LAST_POLL in promql:
            return [({}, at)]
        raise ValueError("query processing would load too many samples")

    with FakePrometheusAPI(broken) as api:
        code, out, _ = _run(capsys, "--config", config, "check", "--prometheus", api.url)
    assert code == 3
    assert out.startswith(f"UNKNOWN - Prometheus {api.url}: HTTP 400: bad_data: query")


def test_check_of_a_silent_fleet_is_unknown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def stale(promql: str, at: float) -> list[tuple[dict[str, str], float]]:
        return [({}, at - 3600)] if LAST_POLL in promql else []

    config = _config(tmp_path, RULES)
    with FakePrometheusAPI(stale) as api:
        code, out, _ = _run(capsys, "--config", config, "check", "--prometheus", api.url)
        assert code == 3 and out.startswith("UNKNOWN - fleet stale: the newest successful poll")
    with FakePrometheusAPI(lambda q, at: []) as api:
        code, out, _ = _run(capsys, "--config", config, "check", "--prometheus", api.url)
        assert code == 3 and out.startswith("UNKNOWN - no data: no tokentop source")


def test_a_bad_prometheus_url_for_check_is_unknown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, RULES)
    for args in (
        ("--config", config, "--prometheus", "prom:9090", "check"),
        ("--config", config, "check", "--prometheus", "prom:9090"),
    ):
        code, out, _ = _run(capsys, *args)
        assert code == 3, args
        assert out.startswith("UNKNOWN - --prometheus") and "'prom:9090'" in out
