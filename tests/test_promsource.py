"""The Prometheus source without a server: the PromQL it sends, how it reads answers, and that
every failure is a source error (never a figure of $0). The real server is exercised by
``test_prometheus_fleet.py``."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from tests.fakes.prometheus_api import FakePrometheusAPI, _batch_parts
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


def client(handler: Any, metered: tuple[str, ...] = ()) -> PromClient:
    """A client of a fake server: ``handler`` answers the queries; the label endpoints answer
    that ``metered`` are the providers of the meter's series."""

    def route(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/api/v1/label/provider/"):
            return httpx.Response(200, json={"status": "success", "data": list(metered)})
        if request.url.path.startswith("/api/v1/label"):
            return httpx.Response(200, json={"status": "success", "data": []})
        return handler(request)  # type: ignore[no-any-return]

    return PromClient("http://prom.test:9090", transport=httpx.MockTransport(route))


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
    # About a hundred steps, each dividing an hour or whole hours: 30 days in 8-hour steps.
    assert over("increase", "x", 30 * 86400) == "increase(x[2592000000ms:28800s])"
    assert over("increase", "x", 15 * 3600) == "increase(x[54000000ms:600s])"
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


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "until-close"])
def test_a_too_large_answer_is_a_source_error_naming_the_limit(declared: bool) -> None:
    with FakePrometheusAPI(lambda _q, _at: [({"model": "m"}, 1.0)]) as fake:
        source = PromSource(PromClient(fake.url, max_response_mb=0.2))
        try:
            fake.flood_bytes, fake.flood_length = 5_000_000, declared
            with pytest.raises(PromError) as info:
                source.client.query("sum(x)", NOW)
            assert "larger than the 0.2 MB limit" in info.value.message
            with pytest.raises(PromError, match=r"0\.2 MB limit"):
                prometheus_report(source, NOW.replace(minute=0), NOW)
            with pytest.raises(PromError, match=r"0\.2 MB limit"):
                build_prometheus_snapshot(source, RefreshRequest(seq=1, now=NOW, window="1h"))
            fake.flood_bytes = None
            (sample,) = source.client.query("sum(x)", NOW)
            assert (sample.labels, sample.value) == ({"model": "m"}, Decimal(1))
        finally:
            source.close()


def test_totals_fold_costs_tokens_and_unpriced() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        q = parse_qs(request.content.decode())["query"][0]
        if q.startswith("sum(") and "tokentop_cost_usd_total" in q:
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
            "prometheus": {
                "url": "http://prom:9090/",
                "gpu_metrics": "external",
                "max_response_mb": 0.5,
            },
        }
    )
    assert config.prometheus.max_response_mb == 0.5
    assert parse_config({"prometheus": {}}).prometheus.max_response_mb == 20.0
    for bad in (0, -1, 5000, "big", True):
        with pytest.raises(ConfigError, match=r"prometheus\.max_response_mb must be from"):
            parse_config({"prometheus": {"url": "http://prom:9090", "max_response_mb": bad}})
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


def test_counted_leaves_out_the_meter_rule_when_nothing_is_metered() -> None:
    plain = counted(COST, ['kind="estimated"'], 60, ("provider", "model"), meter=())
    assert plain == (
        'sum by (model, provider) (increase(tokentop_cost_usd_total{kind="estimated",'
        ' metered="false"}[60000ms]))'
    )
    assert counted(COST, [], 60, (), meter=()).startswith("sum(sum by (provider) (")
    assert counted(COST, [], 60, (), scope="metered", meter=()) == "vector(0) > 1"
    # Metered providers: the covered-provider lookup reads only theirs.
    some = counted(COST, [], 60, (), meter=("openai", "a.b"))
    assert 'group by (provider) (tokentop_requests_total{metered="false",' in some
    assert 'provider=~"a\\\\.b|openai"' in some
    assert counted(COST, [], 60, (), meter=None) == counted(COST, [], 60, ())


def _recording(answer: Any) -> tuple[list[str], Any]:
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        q = parse_qs(request.content.decode())["query"][0]
        if request.url.path.endswith("/query_range"):
            matrix = {"resultType": "matrix", "result": []}
            return httpx.Response(200, json={"status": "success", "data": matrix})
        sent.append(q)
        return httpx.Response(200, json=vector(*answer(q)))

    return sent, handler


def test_small_queries_go_as_one_request_and_come_back_apart() -> None:
    def answer(q: str) -> list[tuple[dict[str, str], str]]:
        if q.startswith("label_replace("):
            return [
                ({"source": "demo", "tokentop_query": "src.up"}, "1"),
                ({"tokentop_query": "fresh.usage"}, "1767225500"),
            ]
        return [({"model": "m"}, "2")]

    sent, handler = _recording(answer)
    source = PromSource(client(handler))
    try:
        answers = source.run(
            {
                "src.up": ("last_over_time(tokentop_source_up[1h])", NOW),
                "fresh.usage": ("max(tokentop_usage_newest_timestamp_seconds)", NOW),
                "now.cost": ("sum by (model) (x)", NOW),
            }
        )
    finally:
        source.close()
    assert len(sent) == 2
    batch = next(q for q in sent if q.startswith("label_replace("))
    assert batch == (
        'label_replace(last_over_time(tokentop_source_up[1h]), "tokentop_query", "src.up", "",'
        ' "") or label_replace(max(tokentop_usage_newest_timestamp_seconds), "tokentop_query",'
        ' "fresh.usage", "", "")'
    )
    assert [dict(s.labels) for s in answers["src.up"]] == [{"source": "demo"}]
    assert [s.value for s in answers["fresh.usage"]] == [Decimal(1767225500)]
    assert [dict(s.labels) for s in answers["now.cost"]] == [{"model": "m"}]


def test_the_window_before_is_asked_once_a_minute() -> None:
    sent, handler = _recording(lambda q: [])
    source = PromSource(client(handler))
    try:
        for second in (1, 20, 59):
            now = NOW.replace(minute=10, second=second)
            build_prometheus_snapshot(source, RefreshRequest(seq=second, now=now, window="1h"))

        def before_window(q: str) -> bool:
            return q.startswith("sum by (model, ") and "[3600000ms]" in q

        before = [q for q in sent if before_window(q)]
        # Cost and requests of 22:10 - 23:10 (the window before 23:10:xx - 00:10:xx) once;
        # the window itself every refresh.
        assert len(before) == 2
        # The window itself, in the batch of the window's figures, each time.
        assert len([q for q in sent if '"tokentop_query", "now.cost"' in q]) == 3
        # A new minute: a new window before.
        build_prometheus_snapshot(
            source, RefreshRequest(seq=9, now=NOW.replace(minute=11, second=1), window="1h")
        )
        assert len([q for q in sent if before_window(q)]) == 2 + 2
    finally:
        source.close()


def test_a_refresh_with_metered_providers_keeps_the_counted_once_rule() -> None:
    sent, handler = _recording(lambda q: [])
    source = PromSource(client(handler, metered=("openai",)))
    try:
        build_prometheus_snapshot(source, RefreshRequest(seq=1, now=NOW, window="1h"))
        usage = [q for q in sent if "tokentop_cost_usd_total" in q]
        assert usage and all("unless on (provider)" in q for q in usage)
        assert all('provider=~"openai"' in q for q in usage)
    finally:
        source.close()
    sent, handler = _recording(lambda q: [])
    source = PromSource(client(handler))
    try:
        build_prometheus_snapshot(source, RefreshRequest(seq=1, now=NOW, window="1h"))
        assert sent and not any("unless" in q for q in sent)
        # The 1h burn rate is the window's own cost: not asked twice.
        spend = "sum(sum by (provider) (increase(tokentop_cost_usd_total"
        assert sum(q.count(spend) for q in sent) == 5  # hour, 5m, 15m, today, month
    finally:
        source.close()


def test_a_failing_meter_probe_is_a_source_error() -> None:
    def route(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/api/v1/label"):
            return httpx.Response(503, text="overloaded")
        return httpx.Response(200, json=vector())

    source = PromSource(PromClient("http://prom.test:9090", transport=httpx.MockTransport(route)))
    try:
        with pytest.raises(PromError, match="HTTP 503"):
            build_prometheus_snapshot(source, RefreshRequest(seq=1, now=NOW, window="1h"))
        with pytest.raises(PromError):
            prometheus_report(source, NOW.replace(minute=0), NOW)
    finally:
        source.close()


def test_a_charts_settled_steps_are_asked_once() -> None:
    asked: list[tuple[float, float]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        form = parse_qs(request.content.decode())
        start, end, step = (float(form[k][0]) for k in ("start", "end", "step"))
        asked.append((start, end))
        points = [[start + i * step, "0.5"] for i in range(int((end - start) // step) + 1)]
        matrix = {"resultType": "matrix", "result": [{"metric": {}, "values": points}]}
        return httpx.Response(200, json={"status": "success", "data": matrix})

    source = PromSource(client(handler))
    try:
        now = NOW.replace(minute=30, second=10)  # 23:30:10
        settled = now - timedelta(minutes=5)
        first = source.spend_series(now - timedelta(hours=1), now, 60, settled=settled)
        later = now + timedelta(seconds=40)
        second = source.spend_series(
            later - timedelta(hours=1), later, 60, settled=later - timedelta(minutes=5)
        )
    finally:
        source.close()
    assert len(first) == len(second) == 61
    assert all(v == Decimal("0.5") for _, v in first + second)
    minute = NOW.replace(minute=0, second=0).timestamp() - 3600  # 22:00
    # The first call asks for the whole hour (the steps ending 22:31 to 23:31), the second only
    # for the steps after the last settled one (23:25, five minutes before the first call).
    assert asked == [(minute + 31 * 60, minute + 91 * 60), (minute + 86 * 60, minute + 91 * 60)]


def test_today_is_its_whole_hours_and_the_hour_so_far() -> None:
    now = NOW.replace(hour=15, minute=20, second=0)  # 15:20 UTC on the 31st

    sent: list[tuple[str, float]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        form = parse_qs(request.content.decode())
        q, at = form["query"][0], float(form["time"][0])
        sent.append((q, at))
        value = "7" if at == now.replace(minute=0).timestamp() else "2"
        found = []
        for tag, name, part in _batch_parts(q) or [("", "", q)]:
            if part.startswith("sum(") and "tokentop_cost_usd_total" in part:
                found.append(({tag: name} if tag else {}, value))
        return httpx.Response(200, json=vector(*found))

    source = PromSource(client(handler))
    try:
        spend = source.spend_summary(now)
    finally:
        source.close()
    assert spend.hour == Decimal(2)
    assert spend.today == Decimal(7 + 2)  # 00:00-15:00, then 15:00-15:20
    assert spend.month == Decimal(7 + 2)  # the 1st 00:00 - 15:00 (one answer here), then 15:xx
    hour_start = now.replace(minute=0).timestamp()
    # The whole hours (00:00-15:00, in 10-minute steps) asked at the hour.
    assert {at for q, at in sent if "[54000000ms:600s]" in q} == {hour_start}


@pytest.mark.parametrize(
    ("now", "today", "month"),
    [
        # 15:02: the hour before is not settled: whole hours to 14:00, then every sample.
        (NOW.replace(hour=15, minute=2, second=0), 7 + 3, 7 + 3),
        # 00:02 on the 31st: today is this hour only; the month's whole hours end at 23:00.
        (NOW.replace(hour=0, minute=2, second=0), 2, 7 + 3),
        # 00:02 on the 1st: this hour is the day and the month.
        (datetime(2026, 1, 1, 0, 2, tzinfo=UTC), 2, 2),
    ],
)
def test_in_an_hours_first_minutes_the_hour_before_is_read_with_it(
    now: datetime, today: int, month: int
) -> None:
    settled = (now - timedelta(minutes=5)).replace(minute=0).timestamp()
    recent = f"[{round((now.timestamp() - settled) * 1000)}ms]"

    def handler(request: httpx.Request) -> httpx.Response:
        form = parse_qs(request.content.decode())
        q, at = form["query"][0], float(form["time"][0])
        found = []
        for tag, name, part in _batch_parts(q) or [("", "", q)]:
            if part.startswith("sum(") and "tokentop_cost_usd_total" in part:
                value = "7" if at == settled else "3" if recent in part else "2"
                found.append(({tag: name} if tag else {}, value))
        return httpx.Response(200, json=vector(*found))

    source = PromSource(client(handler))
    try:
        spend = source.spend_summary(now)
    finally:
        source.close()
    assert (spend.hour, spend.today, spend.month) == (2, today, month)
