"""The Prometheus source without a server: the PromQL it sends, how it reads answers, and that
every failure is a source error (never a figure of $0). The real server is exercised by
``test_prometheus_fleet.py``."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from tests.fakes.prometheus_server import free_port
from tokentop.collectors.config import ConfigError, parse_config
from tokentop.collectors.promql import PromClient, PromError
from tokentop.collectors.promsource import (
    COST,
    PromSource,
    counted,
    increase,
    over,
    prometheus_report,
    window_seconds,
    window_start,
)
from tokentop.tui.snapshot import RefreshRequest
from tokentop.tui.snapshot_prometheus import build_prometheus_snapshot

NOW = datetime(2025, 12, 31, 23, 59, 30, tzinfo=UTC)


def vector(*samples: tuple[dict[str, str], str]) -> dict[str, Any]:
    return {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [{"metric": m, "value": [NOW.timestamp(), v]} for m, v in samples],
        },
    }


def client(handler: Any) -> PromClient:
    return PromClient("http://prom.test:9090", transport=httpx.MockTransport(handler))


def test_window_starts_on_the_first_whole_minute() -> None:
    assert window_start(NOW) == datetime(2026, 1, 1, 0, 0, tzinfo=UTC)
    assert window_start(NOW.replace(second=0)) == NOW.replace(second=0)
    assert window_seconds(datetime(2025, 12, 31, 23, 57, 30, tzinfo=UTC), NOW) == 90.0


def test_counted_once_promql() -> None:
    q = counted(COST, ['kind="estimated"'], 90, ("provider", "model"))
    # Admin sources' series, or the meter's for providers no admin source reports.
    assert q == (
        '(sum by (model, provider) (increase(tokentop_cost_usd_total{kind="estimated",'
        ' metered="false"}[90000ms]))) or ((sum by (model, provider) (increase('
        'tokentop_cost_usd_total{kind="estimated", metered="true"}[90000ms]))) unless on'
        ' (provider) group by (provider) (tokentop_requests_total{metered="false"}))'
    )
    assert counted(COST, [], 60, ()).startswith("sum((")
    assert counted(COST, [], 60, ("tag",)).startswith("sum by (tag) (")
    metered = counted(COST, [], 60, (), scope="metered")
    assert 'metered="true"' in metered and "and on (provider)" in metered


def test_long_windows_use_a_subquery_and_filters_match_any_label() -> None:
    assert over("increase", "x", 3600) == "increase(x[3600000ms])"
    assert over("increase", "x", 30 * 86400) == "increase(x[2592000000ms:25920s])"
    assert over("increase", "x", 4 * 3600) == "increase(x[14400000ms:300s])"
    q = increase(COST, [], 60, text='a.b"c')
    assert q.count(" or ") == 4
    assert 'model=~"(?i).*a\\\\.b\\"c.*"' in q


def test_answers_are_read_exactly_and_nan_is_unknown() -> None:
    sent: list[dict[str, list[str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(parse_qs(request.content.decode()))
        return httpx.Response(200, json=vector(({"model": "m"}, "1.25"), ({"model": "n"}, "NaN")))

    with client(handler) as c:
        found = c.query("sum(x)", NOW)
    assert [s.value for s in found] == [Decimal("1.25"), None]
    assert sent[0]["query"] == ["sum(x)"] and sent[0]["time"] == [f"{NOW.timestamp():.3f}"]


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(503, text="overloaded"),
        httpx.Response(400, json={"status": "error", "errorType": "bad_data", "error": "parse"}),
        httpx.Response(200, json={"status": "success", "data": {"resultType": "matrix"}}),
        httpx.Response(200, text="<html>a login page</html>"),
    ],
)
def test_every_failure_is_a_source_error(response: httpx.Response) -> None:
    source = PromSource(client(lambda _r: response))
    try:
        with pytest.raises(PromError):
            source.totals(NOW.replace(minute=0), NOW)
        with pytest.raises(PromError):
            prometheus_report(source, NOW.replace(minute=0), NOW)
        with pytest.raises(PromError):
            build_prometheus_snapshot(source, RefreshRequest(seq=1, now=NOW, window="1h"))
    finally:
        source.close()


def test_totals_fold_costs_tokens_and_unpriced() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        q = parse_qs(request.content.decode())["query"][0]
        if q.startswith("sum((") and "tokentop_cost_usd_total" in q:
            return httpx.Response(200, json=vector(({}, "2.000000001")))
        if "tokentop_tokens_total" in q:
            return httpx.Response(
                200,
                json=vector(
                    ({"kind": "input_uncached", "priced": "true"}, "100"),
                    ({"kind": "cache_read", "priced": "true"}, "50.4"),
                    ({"kind": "output", "priced": "false"}, "7"),
                ),
            )
        if "tokentop_requests_total" in q:
            return httpx.Response(
                200, json=vector(({"priced": "true"}, "9.6"), ({"priced": "false"}, "1"))
            )
        return httpx.Response(200, json=vector())

    source = PromSource(client(handler))
    try:
        t = source.totals(NOW.replace(minute=0), NOW)
    finally:
        source.close()
    assert t.cost == Decimal("2.000000001")
    assert (t.input_total, t.cache_read, t.output) == (150, 50, 7)
    assert (t.requests, t.unpriced_requests, t.unpriced_tokens) == (11, 1, 7)
    assert t.cost_per_request == Decimal("0.2000000001")


def test_config_tables() -> None:
    config = parse_config(
        {
            "metrics": {"port": 9464, "labels": ["api_key", "model"]},
            "prometheus": {"url": "http://prom:9090/", "gpu_metrics": "external"},
        }
    )
    assert config.metrics.port == 9464
    assert config.metrics.usage_labels == ("source", "provider", "model", "api_key")
    assert config.prometheus.url == "http://prom:9090"
    for bad in (
        {"metrics": {"labels": ["secret"]}},
        {"metrics": {"port": 70000}},
        {"metrics": {"colour": 1}},
        {"prometheus": {"url": "prom:9090"}},
        {"prometheus": {"gpu_metrics": "dcgm"}},
    ):
        with pytest.raises(ConfigError):
            parse_config(bad)


def _tokentop(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokentop", *args], capture_output=True, text=True, timeout=60
    )


def test_report_from_an_unreachable_prometheus_is_an_error_not_zero(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = _tokentop("report", "--prometheus", url, "--json")
    assert result.returncode == 1
    assert result.stdout == ""
    assert url in result.stderr and "unreachable" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_sources_from_an_unreachable_prometheus_fail() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = _tokentop("sources", "--prometheus", url, "--json")
    assert result.returncode == 1 and result.stdout == "" and url in result.stderr


def test_prometheus_from_the_config_file(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    config = tmp_path / "config.toml"
    config.write_text(f'[prometheus]\nurl = "{url}"\n', encoding="utf-8")
    result = _tokentop("--config", str(config), "export", "--format", "md")
    assert result.returncode == 1 and url in result.stderr


def test_bad_prometheus_flag_is_a_usage_error() -> None:
    result = _tokentop("report", "--prometheus", "prom:9090")
    assert result.returncode == 2
    assert "--prometheus" in result.stderr and "'prom:9090'" in result.stderr
    svg = _tokentop("export", "--prometheus", f"http://127.0.0.1:{free_port()}", "--format", "svg")
    assert svg.returncode == 1 and svg.stdout == ""


def test_report_shape_matches_the_local_report(tmp_path: Path) -> None:
    """Every field of the database's report is in the Prometheus one (some empty)."""
    from tokentop.store.db import Store
    from tokentop.store.report import build_report

    with Store(tmp_path / "t.db") as store:
        local = build_report(store, NOW.replace(minute=0), NOW, NOW, {"source": "x"})
    source = PromSource(client(lambda _r: httpx.Response(200, json=vector())))
    try:
        remote = prometheus_report(source, NOW.replace(minute=0), NOW)
    finally:
        source.close()
    # ``view`` and ``by_group`` (the TUI's filter, grouping and sort, exported with the screen)
    # and ``resolution`` (what retention left of the window's start) are the newest fields of
    # the local report; the Prometheus report has not caught up yet.
    assert set(local) - set(remote) <= {"view", "by_group", "resolution"}
    assert set(local["gpu"]) <= set(remote["gpu"])
    assert set(local["freshness"]) <= set(remote["freshness"])
    assert remote["total_usd"] == 0.0 and remote["requests"] == 0
    json.dumps(remote)
