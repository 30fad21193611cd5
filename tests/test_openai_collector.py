"""The OpenAI admin-API collector against the local fake server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from tests.fakes import (
    KEY_ENV,
    KEYS,
    FakeProviderServer,
    ReplacingStore,
    make_collector,
    poll_context,
    sum_usage,
)
from tokentop.collectors.base import Collector
from tokentop.collectors.config import ProviderConfig
from tokentop.collectors.http import AdminApiCollector
from tokentop.collectors.openai import OpenAICollector
from tokentop.store.records import UsageBucket

NOW = datetime(2025, 8, 1, 12, 30, 20, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
OPEN_MINUTE = NOW.replace(second=0)


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for provider, env in KEY_ENV.items():
        monkeypatch.setenv(env, KEYS[provider])
    monkeypatch.delenv("TOKENTOP_OPENAI_BASE_URL", raising=False)


@pytest.fixture
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(now=NOW) as fake:
        yield fake


@pytest.fixture
async def collector(server: FakeProviderServer) -> AsyncIterator[AdminApiCollector]:
    c = make_collector(server, "openai")
    yield c
    await c.aclose()


async def test_contract_attributes(collector: AdminApiCollector) -> None:
    assert isinstance(collector, Collector)
    assert isinstance(collector, OpenAICollector)
    assert (collector.name, collector.kind, collector.interval_s, collector.calls) == (
        "openai",
        "openai",
        60.0,
        0,
    )


async def test_backfill_reads_every_bucket_of_the_range(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    server.seed(hours=3)
    batch = await collector.poll(poll_context(NOW, backfill_hours=2))

    (window,) = batch.windows
    assert (window.source, window.width_s) == ("openai", 60)
    assert window.start == OPEN_MINUTE - timedelta(hours=2)
    assert window.end == OPEN_MINUTE + MINUTE
    assert sum_usage(batch.usage) == server.usage_totals("openai", window.start, window.end)
    assert all(window.start <= b.start < window.end for b in batch.usage)
    assert any(b.start == OPEN_MINUTE for b in batch.usage), "the open minute is read too"
    assert batch.watermark == NOW
    assert batch.progress is None
    assert all(b.cost_nano == 0 and not b.priced and b.price_ref == "" for b in batch.usage)

    usage = server.requests_to("usage/completions")
    assert len(usage) == 1
    (request,) = usage
    assert request.headers["authorization"] == f"Bearer {KEYS['openai']}"
    assert request.param("bucket_width") == "1m"
    assert request.param("limit") == "1440"
    assert request.param("start_time") == str(int(window.start.timestamp()))
    assert "end_time" not in request.query
    assert request.query["group_by"] == [
        "model",
        "project_id",
        "api_key_id",
        "batch",
        "service_tier",
    ]
    assert "group_by%5B%5D=model" in request.raw_query
    assert collector.calls == len(server.requests) == 3  # completions, embeddings, costs
    assert [r.path for r in server.requests] == [
        "/v1/organization/usage/completions",
        "/v1/organization/usage/embeddings",
        "/v1/organization/costs",
    ]


async def test_first_start_reads_from_the_backfill_start(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    batch = await collector.poll(poll_context(NOW, backfill_hours=0.25))
    assert batch.windows[0].start == OPEN_MINUTE - timedelta(minutes=15)
    later = server.advance(60)
    batch = await collector.poll(poll_context(later, batch.watermark, backfill_hours=0.25))
    assert batch.windows[0].start == OPEN_MINUTE - timedelta(hours=1), "then the trailing hour"


async def test_token_kinds_and_dimensions(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    at = OPEN_MINUTE - 5 * MINUTE
    server.add_openai_usage(
        at,
        "gpt-4o-mini-2024-07-18",
        project_id="proj_abc",
        api_key_id="key_abc",
        batch=True,
        service_tier="default",
        input_tokens=5000,
        input_cached_tokens=1800,
        input_cache_write_tokens=200,
        output_tokens=1000,
        num_model_requests=5,
    )
    server.add_openai_usage(
        at, "gpt-4o-2024-08-06", batch=False, input_tokens=10, output_tokens=3, num_model_requests=1
    )
    batch = await collector.poll(poll_context(NOW))
    got = sorted(batch.usage, key=lambda b: b.model)
    assert got == [
        UsageBucket(
            source="openai",
            provider="openai",
            model="gpt-4o-2024-08-06",
            start=at,
            batch="false",
            input_uncached=10,
            output=3,
            requests=1,
        ),
        UsageBucket(
            source="openai",
            provider="openai",
            model="gpt-4o-mini-2024-07-18",
            start=at,
            project="proj_abc",
            api_key="key_abc",
            service_tier="default",
            batch="true",
            input_uncached=3000,
            cache_read=1800,
            cache_write_5m=200,
            output=1000,
            requests=5,
        ),
    ]


async def test_many_pages(server: FakeProviderServer, collector: AdminApiCollector) -> None:
    server.seed(hours=2)
    server.behaviour.max_page_buckets = 7
    batch = await collector.poll(poll_context(NOW, backfill_hours=2))
    (window,) = batch.windows
    assert sum_usage(batch.usage) == server.usage_totals("openai", window.start, window.end)
    pages = server.requests_to("usage/completions")
    assert len(pages) == -(-121 // 7)
    cursors = [p.param("page") for p in pages]
    assert cursors[0] is None
    assert len(set(cursors[1:])) == len(cursors) - 1


async def test_empty_buckets_give_a_window_and_no_records(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    batch = await collector.poll(poll_context(NOW))
    assert batch.usage == ()
    assert len(batch.windows) == 1
    assert batch.billed == ()
    assert len(batch.billed_days) == 1


async def test_open_bucket_grows_between_polls(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    server.seed(hours=1)
    store = ReplacingStore()
    store.apply(await collector.poll(poll_context(NOW)))
    before = store.totals(OPEN_MINUTE, OPEN_MINUTE + MINUTE)

    server.grow_newest(output_tokens=250, num_model_requests=1)
    later = server.advance(25)
    store.apply(await collector.poll(poll_context(later, store.watermark)))
    after = store.totals(OPEN_MINUTE, OPEN_MINUTE + MINUTE)

    groups = len(server._seeded_openai)
    assert after["output"] == before["output"] + 250 * groups
    assert after["requests"] == before["requests"] + groups
    assert store.totals() == server.usage_totals("openai", NOW - timedelta(hours=2))


async def test_revised_buckets_are_replaced(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    server.seed(hours=2)
    store = ReplacingStore()
    store.apply(await collector.poll(poll_context(NOW, backfill_hours=2)))

    revised = OPEN_MINUTE - 10 * MINUTE
    server.add_openai_usage(
        revised, "gpt-4o-mini-2024-07-18", project_id="proj_alpha", input_tokens=7, replace=True
    )
    server.remove_usage("openai", OPEN_MINUTE - 20 * MINUTE)
    later = server.advance(60)
    store.apply(await collector.poll(poll_context(later, store.watermark)))

    assert store.totals() == server.usage_totals("openai")
    assert not any(b.start == OPEN_MINUTE - 20 * MINUTE for b in store.usage.values())


async def test_repolling_overlapping_windows_is_idempotent(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    server.seed(hours=3)
    store = ReplacingStore()
    first = await collector.poll(poll_context(NOW, backfill_hours=2))
    store.apply(first)
    totals = store.totals()
    for seconds in (0, 10, 30):
        now = server.advance(seconds)
        batch = await collector.poll(poll_context(now, store.watermark))
        assert batch.windows[0].start < first.windows[0].end, "windows overlap"
        store.apply(batch)
        store.apply(batch)
        assert store.totals() == totals
    assert totals == server.usage_totals("openai", first.windows[0].start)


async def test_restart_resumes_from_the_stored_watermark(server: FakeProviderServer) -> None:
    server.seed(hours=8)
    store = ReplacingStore()
    first = make_collector(server, "openai")
    store.apply(await first.poll(poll_context(NOW, backfill_hours=1)))
    await first.aclose()

    later = server.advance(3 * 3600)
    restarted = make_collector(server, "openai")
    batch = await restarted.poll(poll_context(later, store.watermark, backfill_hours=1))
    await restarted.aclose()
    (window,) = batch.windows
    assert window.start == OPEN_MINUTE - timedelta(hours=1), "from the watermark minus the overlap"
    store.apply(batch)
    assert store.totals() == server.usage_totals("openai", OPEN_MINUTE - timedelta(hours=1))


async def test_long_backfill_is_split_over_polls(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    server.seed(hours=50)
    store = ReplacingStore()
    progress: list[float | None] = []
    for _ in range(10):
        batch = await collector.poll(poll_context(NOW, store.watermark, backfill_hours=50))
        store.apply(batch)
        progress.append(batch.progress)
        if batch.progress in (None, 1.0):
            break
        (window,) = batch.windows
        assert window.end - window.start == timedelta(hours=26)
        assert batch.watermark == window.end
        for endpoint in ("usage/completions", "usage/embeddings"):
            request = server.requests_to(endpoint)[-1]
            assert request.param("end_time") == str(int(window.end.timestamp()))
    assert progress[-1] == 1.0
    partial = [p for p in progress[:-1] if p is not None]
    assert len(partial) >= 1
    assert partial == sorted(partial)
    assert all(0 < p < 1 for p in partial)
    assert store.watermark == NOW
    assert store.totals() == server.usage_totals("openai")


async def test_costs_exact_from_numbers_and_strings(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    day = NOW - timedelta(days=2)
    server.add_openai_cost(day, "0.0042", project_id="proj_a", line_item="input_tokens")
    server.add_openai_cost(day, "12.5", project_id="proj_a", line_item="Text tokens")
    server.add_openai_cost(NOW, "0.123456789", project_id="proj_b", line_item="Image models")
    server.add_openai_cost(NOW - timedelta(days=30), "99", project_id="proj_a")
    server.behaviour.openai_amount_as_string = None  # alternate number and string
    batch = await collector.poll(poll_context(NOW))

    midnight = datetime(2025, 8, 1, tzinfo=UTC)
    got = {(c.day, c.project, c.line_item): c.amount_nano for c in batch.billed}
    assert got == {
        (midnight - timedelta(days=2), "proj_a", "input_tokens"): 4_200_000,
        (midnight - timedelta(days=2), "proj_a", "Text tokens"): 12_500_000_000,
        (midnight, "proj_b", "Image models"): 123_456_789,
    }
    assert {(c.source, c.provider, c.currency, c.workspace) for c in batch.billed} == {
        ("openai", "openai", "usd", "")
    }
    assert batch.billed_days == (("openai", midnight - timedelta(days=7), midnight + timedelta(1)),)
    (request,) = server.requests_to("costs")
    assert request.param("bucket_width") == "1d"
    assert request.query["group_by"] == ["project_id", "line_item"]
    assert int(request.param("limit") or 0) <= 180


async def test_costs_on_the_first_poll_then_every_interval(server: FakeProviderServer) -> None:
    collector = make_collector(server, "openai", cost_interval_s=900)
    server.add_openai_cost(NOW, Decimal("1.5"))
    seen = []
    for offset in (0, 60, 899, 900, 960):
        batch = await collector.poll(poll_context(NOW + timedelta(seconds=offset)))
        seen.append((len(batch.billed), len(batch.billed_days)))
    await collector.aclose()
    assert seen == [(1, 1), (0, 0), (0, 0), (1, 1), (0, 0)]
    assert len(server.requests_to("costs")) == 2

    no_costs = make_collector(server, "openai", costs=False)
    batch = await no_costs.poll(poll_context(NOW))
    await no_costs.aclose()
    assert batch.billed_days == ()
    assert len(server.requests_to("costs")) == 2


@pytest.mark.parametrize("knob", ["extra_fields", "omit_optional"])
async def test_unknown_fields_and_missing_optional_ones(
    server: FakeProviderServer, collector: AdminApiCollector, knob: str
) -> None:
    server.seed(hours=1)
    server.add_openai_cost(NOW, "2.25", project_id="proj_a")
    setattr(server.behaviour, knob, True)
    batch = await collector.poll(poll_context(NOW, backfill_hours=1))
    assert sum_usage(batch.usage) == server.usage_totals("openai", batch.windows[0].start)
    (_, first_day, end_day) = batch.billed_days[0]
    expected = server.cost_total("openai", first_day, end_day)
    assert sum(c.amount_nano for c in batch.billed) == int(expected * 10**9)
    assert all(c.project in ("proj_a", "proj_alpha", "proj_beta") for c in batch.billed)


async def test_base_url_and_key_sources(
    server: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = ProviderConfig(name="openai", key_env="OPENAI_ADMIN_KEY")
    assert OpenAICollector(bare).base_url == "https://api.openai.com/v1"
    monkeypatch.setenv("TOKENTOP_OPENAI_BASE_URL", server.openai_base_url)
    via_env = OpenAICollector(bare, clock=server.now, name="oa-prod")
    batch = await via_env.poll(poll_context(NOW))
    await via_env.aclose()
    assert via_env.name == "oa-prod"
    assert batch.windows[0].source == "oa-prod"
    assert len(server.requests) == 3
