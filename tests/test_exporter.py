"""The Prometheus exposition (``collect``/``proxy --metrics-port``): exact totals read from the
store, counters that never go down, restarts that start from the stored totals."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import Clock, at, bucket, nano
from tokentop.collectors.exporter import (
    HELD_KEY,
    MetricsServer,
    StoreCollector,
    parse_text,
    render_text,
)
from tokentop.collectors.metrics_config import MetricsConfig
from tokentop.store.db import Store
from tokentop.store.records import (
    Batch,
    BilledCost,
    GpuSample,
    InferenceSample,
    MeteredRequest,
    SourceHealth,
    UsageWindow,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(collector: StoreCollector) -> Samples:
    return parse_text(render_text(collector))


def total(samples: Samples, metric: str, /, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == metric and all(dict(ls).get(k) == want for k, want in labels.items())
    )


def fine_sum(store: Store, column: str, where: str = "1", params: tuple[object, ...] = ()) -> int:
    """An independent sum over the fine ``usage`` table joined to its series."""
    row = store.query(
        f"SELECT SUM(u.{column}) FROM usage AS u JOIN series AS s ON s.id = u.series_id"
        f" WHERE {where}",
        params,
    )[0]
    return int(row[0] or 0)


@pytest.fixture
def store(db_path: Path) -> Store:
    s = Store(db_path)
    yield s  # type: ignore[misc]
    s.close()


def _history(store: Store) -> None:
    """Forty days of buckets over several series, priced and unpriced, plus a meter source."""
    buckets = []
    for day in range(40):
        for minute in (0, 61, 600):
            start = at(minute - day * 1440)
            buckets += [
                bucket(
                    start,
                    cost="0.012345678",
                    requests=3,
                    input_uncached=100,
                    output=20,
                    project="search",
                    tag="prod",
                    api_key="key_a",
                ),
                bucket(
                    start,
                    model="gpt-4o-mini",
                    cost="0.000001",
                    requests=1,
                    cache_read=50,
                    cache_write_5m=7,
                    project="bot",
                    tag="eval",
                    api_key="key_b",
                ),
                bucket(
                    start,
                    provider="acme",
                    model="acme-70b",
                    cost=None,
                    requests=2,
                    input_uncached=30,
                    output=5,
                ),
            ]
    store.write_batch(Batch(usage=tuple(buckets)))
    store.write_batch(
        Batch(
            requests=(
                MeteredRequest(
                    at(1),
                    "openai",
                    "gpt-4o",
                    source="proxy",
                    request_id="r1",
                    input_uncached=10,
                    output=2,
                    cost_nano=nano("0.0001"),
                    priced=True,
                    tag="feature-x",
                ),
            )
        )
    )
    store.record_health(SourceHealth("proxy", "meter", "ok", last_success=at(1)), now=at(1))
    store.record_health(
        SourceHealth("src", "openai", "ok", last_success=at(0), interval_s=60), now=at(0)
    )


def test_totals_are_the_stores_exact_sums(store: Store) -> None:
    _history(store)
    samples = scrape(StoreCollector(store, clock=lambda: at(2)))
    cost = total(samples, "tokentop_cost_usd_total")
    assert round(cost * 1e9) == fine_sum(store, "cost_nano", "u.priced = 1")
    assert total(samples, "tokentop_requests_total") == fine_sum(store, "requests")
    for kind in ("input_uncached", "cache_read", "cache_write_5m", "cache_write_1h", "output"):
        assert total(samples, "tokentop_tokens_total", kind=kind) == fine_sum(store, kind)
    # Unpriced usage has tokens and requests, never a cost of $0.
    assert total(samples, "tokentop_requests_total", priced="false") == fine_sum(
        store, "requests", "u.priced = 0"
    )
    assert not any(
        n == "tokentop_cost_usd_total" and dict(ls)["model"] == "acme-70b" for n, ls in samples
    )
    # The meter's series say so (the counted-once rule is applied by the reader).
    assert total(samples, "tokentop_requests_total", metered="true", source="proxy") == 1
    assert total(samples, "tokentop_requests_total", metered="false", source="src") == fine_sum(
        store, "requests", "s.source = 'src'"
    )
    # Labels: source, provider, model, project, tag by default; no api_key.
    names = {k for n, ls in samples if n == "tokentop_cost_usd_total" for k, _ in ls}
    assert names == {"source", "provider", "model", "project", "tag", "metered", "kind"}
    assert total(samples, "tokentop_cost_usd_total", kind="estimated") == cost


def test_api_key_label_when_configured(store: Store) -> None:
    _history(store)
    config = MetricsConfig(labels=("project", "tag", "api_key"))
    samples = scrape(StoreCollector(store, config, clock=lambda: at(2)))
    assert total(samples, "tokentop_requests_total", api_key="key_b") == fine_sum(
        store, "requests", "s.api_key = 'key_b'"
    )


def test_a_scrape_reads_the_daily_rollup_not_the_fine_rows(store: Store) -> None:
    _history(store)
    collector = StoreCollector(store, clock=lambda: at(2))
    seen: list[str] = []
    store.conn.set_trace_callback(seen.append)
    try:
        scrape(collector)
    finally:
        store.conn.set_trace_callback(None)
    usage_reads = [q for q in seen if re.search(r"\bFROM usage\b", q)]
    # Only the newest-bucket lookup (one index seek, LIMIT 1) touches the fine table.
    assert all("LIMIT 1" in q for q in usage_reads), usage_reads
    assert any("FROM usage_day" in q for q in seen)


def test_repoll_that_replaces_buckets_never_counts_twice(store: Store) -> None:
    collector = StoreCollector(store, clock=lambda: at(5))
    window = UsageWindow("src", 60, at(0), at(5))
    values = []
    for requests in (1, 4, 4, 9):  # the open bucket grows; the same poll is repeated
        store.write_batch(
            Batch(usage=(bucket(at(0), cost="0.5", requests=requests),), windows=(window,))
        )
        values.append(total(scrape(collector), "tokentop_requests_total"))
    assert values == [1, 4, 4, 9]


def test_counters_never_go_down_while_replacing_concurrently(store: Store, db_path: Path) -> None:
    """A writer re-polls (replaces) a window over and over, growing; scrapes on another
    connection never see a total go down or a bucket counted twice."""
    reader = Store(db_path, readonly=True)
    collector = StoreCollector(reader, clock=lambda: at(10), persist=False)
    stop = threading.Event()
    window = UsageWindow("src", 60, at(0), at(10))

    def write() -> None:
        n = 1
        while not stop.is_set() and n < 400:
            buckets = tuple(bucket(at(m), cost=str(n), requests=n) for m in range(10))
            store.write_batch(Batch(usage=buckets, windows=(window,)))
            n += 1

    writer = threading.Thread(target=write)
    writer.start()
    seen: list[float] = []
    try:
        for _ in range(60):
            seen.append(total(scrape(collector), "tokentop_requests_total"))
    finally:
        stop.set()
        writer.join()
        reader.close()
    assert seen == sorted(seen)
    assert all(v % 10 == 0 for v in seen)  # ten buckets of n each: never a half-replaced window


def test_a_downward_revision_is_held_and_survives_a_restart(store: Store) -> None:
    window = UsageWindow("src", 60, at(0), at(1))
    store.write_batch(Batch(usage=(bucket(at(0), cost="1", requests=10),), windows=(window,)))
    first = StoreCollector(store, clock=lambda: at(1))
    assert total(scrape(first), "tokentop_requests_total") == 10
    # The provider revises the bucket down: Prometheus would read 10 -> 7 as a reset.
    store.write_batch(Batch(usage=(bucket(at(0), cost="0.7", requests=7),), windows=(window,)))
    held = scrape(first)
    assert total(held, "tokentop_requests_total") == 10
    assert total(held, "tokentop_cost_usd_total") == 1.0
    assert store.get_meta(HELD_KEY)
    # A restart keeps holding (the held values are in the database).
    again = StoreCollector(store, clock=lambda: at(2))
    assert total(scrape(again), "tokentop_requests_total") == 10
    # Later growth absorbs the revision; then the counter follows the store again.
    store.write_batch(Batch(usage=(bucket(at(1), cost="0.5", requests=5),)))
    assert total(scrape(again), "tokentop_requests_total") == 12
    assert total(scrape(again), "tokentop_cost_usd_total") == pytest.approx(1.2)
    assert store.get_meta(HELD_KEY) == "[]"


def test_a_restart_starts_from_the_stored_totals(store: Store) -> None:
    _history(store)
    before = scrape(StoreCollector(store, clock=lambda: at(2)))
    after = scrape(StoreCollector(store, clock=lambda: at(3)))
    counters = {k: v for k, v in before.items() if k[0].endswith("_total")}
    assert counters
    assert {k: after[k] for k in counters} == counters


def test_a_new_series_shows_its_history_first_then_its_total(store: Store) -> None:
    clock = Clock(at(10))
    collector = StoreCollector(store, MetricsConfig(new_series_hold_s=30), clock=clock)
    assert total(scrape(collector), "tokentop_requests_total") == 0  # first scrape: empty
    # A backfill (old buckets) and new traffic of a model nobody used before.
    store.write_batch(
        Batch(usage=(bucket(at(-120), cost="1", requests=5), bucket(at(10), cost="2", requests=3)))
    )
    clock.advance(5)
    # History (before this exporter's minute) shows at once; the new spend waits ...
    held = scrape(collector)
    assert total(held, "tokentop_requests_total") == 5
    assert total(held, "tokentop_cost_usd_total") == 1.0
    # ... until a scrape interval has surely seen the series, then it is an increase.
    clock.advance(30)
    grown = scrape(collector)
    assert total(grown, "tokentop_requests_total") == 8
    assert total(grown, "tokentop_cost_usd_total") == 3.0


def test_gpu_inference_billed_and_health_metrics(store: Store) -> None:
    now = at(30)
    store.write_batch(
        Batch(
            gpu=tuple(
                GpuSample(
                    "nvml",
                    "GPU-1",
                    at(m),
                    60.0,
                    name="NVIDIA H100 80GB HBM3",
                    util_pct=50.0,
                    power_mw=300_000,
                    mem_used_bytes=10,
                    mem_total_bytes=80,
                    cost_nano=nano("0.05"),
                    idle_cost_nano=nano("0.01") if m else 0,
                )
                for m in range(0, 30, 5)
            ),
            inference=(
                InferenceSample(
                    "vllm",
                    "http://x:8000",
                    at(29),
                    60.0,
                    kind="vllm",
                    requests=40,
                    prompt_tokens=400,
                    generation_tokens=80,
                ),
            ),
            billed=(BilledCost("src", "openai", at(-1440).replace(hour=0), nano("12.5")),),
        )
    )
    store.record_health(
        SourceHealth("nvml", "nvml", "ok", last_success=at(29.9), interval_s=5), now=at(29.9)
    )
    store.record_health(SourceHealth("src", "openai", "error", last_error="HTTP 500"), now=at(29))
    samples = scrape(StoreCollector(store, clock=lambda: now))
    gpu = {"gpu": "GPU-1", "name": "NVIDIA H100 80GB HBM3", "mode": "rented", "source": "nvml"}
    assert total(samples, "tokentop_gpu_cost_usd_total", **gpu) == pytest.approx(0.30)
    assert total(samples, "tokentop_gpu_idle_cost_usd_total", **gpu) == pytest.approx(0.05)
    assert total(samples, "tokentop_gpu_seconds_total", **gpu) == 360
    assert total(samples, "tokentop_inferences_total", endpoint="http://x:8000") == 40
    assert total(samples, "tokentop_inference_tokens_total", kind="generation") == 80
    assert total(samples, "tokentop_billed_cost_usd_total", provider="openai") == 12.5
    assert total(samples, "tokentop_gpu_utilization_ratio", gpu="GPU-1") == 0.5
    assert total(samples, "tokentop_gpu_power_watts", gpu="GPU-1") == 300
    assert total(samples, "tokentop_source_up", source="nvml", kind="nvml") == 1
    assert total(samples, "tokentop_source_up", source="src") == 0
    assert total(samples, "tokentop_source_last_success_timestamp_seconds", source="nvml") == (
        at(29.9).timestamp()
    )


def test_metrics_server_serves_text_and_openmetrics(store: Store, db_path: Path) -> None:
    _history(store)
    with MetricsServer(db_path, MetricsConfig(), port=0, clock=lambda: at(2)) as server:
        text = httpx.get(server.url).text
        om = httpx.get(
            server.url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert "# TYPE tokentop_cost_usd_total counter" in text
    assert "process_cpu_seconds_total" in text
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")


def _tokentop(*args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tokentop", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        **kw,  # type: ignore[arg-type]
    )


def metrics_url(proc: subprocess.Popen[str], timeout: float = 60.0) -> str:
    """Read a ``collect``/``proxy`` process's stderr until it says where /metrics is."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before serving metrics")
        m = re.search(r"metrics on (http://\S+)", line)
        if m:
            return m.group(1)
    raise AssertionError("no metrics URL printed")


def test_collect_demo_serves_metrics_with_the_documented_labels(tmp_path: Path) -> None:
    proc = _tokentop("--db", str(tmp_path / "a.db"), "collect", "--demo", "--metrics-port", "0")
    try:
        url = metrics_url(proc)
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline and 'model="gpt-4o-2024-08-06"' not in text:
            time.sleep(0.3)
            text = httpx.get(url).text
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    samples = parse_text(text)
    cost = [dict(ls) for n, ls in samples if n == "tokentop_cost_usd_total"]
    assert cost and all(
        {"source", "provider", "model", "project", "tag", "kind"} <= set(labels) for labels in cost
    )
    kinds = {dict(ls)["kind"] for n, ls in samples if n == "tokentop_tokens_total"}
    assert kinds == {"input_uncached", "cache_read", "cache_write_5m", "cache_write_1h", "output"}
    for name in (
        "tokentop_requests_total",
        "tokentop_gpu_cost_usd_total",
        "tokentop_gpu_idle_cost_usd_total",
        "tokentop_inferences_total",
        "tokentop_source_up",
        "tokentop_source_last_success_timestamp_seconds",
    ):
        assert any(n == name for n, _ in samples), name


def test_metrics_port_with_once_is_a_usage_error(tmp_path: Path) -> None:
    proc = _tokentop(
        "--db", str(tmp_path / "a.db"), "collect", "--demo", "--once", "--metrics-port", "0"
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "--metrics-port" in err and len(err.strip().splitlines()) == 1


def test_proxy_serves_its_metered_requests(tmp_path: Path) -> None:
    from tests.fakes.upstream import FakeUpstream

    config = tmp_path / "config.toml"
    config.write_text("[metrics]\nnew_series_hold_s = 1\n", encoding="utf-8")
    with FakeUpstream() as upstream:
        proc = _tokentop(
            "--config",
            str(config),
            "--db",
            str(tmp_path / "p.db"),
            "proxy",
            "--port",
            "0",
            "--upstream-openai",
            upstream.url,
            "--metrics-port",
            "0",
            "--tag",
            "feature-x",
        )
        try:
            url = metrics_url(proc)
            assert proc.stderr is not None
            line = ""
            while "listening on" not in line:
                line = proc.stderr.readline()
            proxy = re.search(r"listening on (http://\S+)", line).group(1)  # type: ignore[union-attr]
            httpx.get(url)  # a first scrape: the requests below make new series
            for _ in range(3):
                r = httpx.post(
                    f"{proxy}/v1/chat/completions",
                    json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"Authorization": "Bearer sk-test"},
                )
                assert r.status_code == 200
            deadline = time.monotonic() + 30
            value = 0.0
            while time.monotonic() < deadline and value < 3:
                samples = parse_text(httpx.get(url).text)
                value = total(samples, "tokentop_requests_total", metered="true", tag="feature-x")
                time.sleep(0.2)
        finally:
            proc.terminate()
            proc.communicate(timeout=30)
    assert value == 3
