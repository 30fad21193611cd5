"""The Anthropic admin-API collector against the local fake server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

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
from tokentop.collectors.anthropic import AnthropicCollector
from tokentop.collectors.base import Collector
from tokentop.collectors.config import ProviderConfig
from tokentop.collectors.http import AdminApiCollector
from tokentop.store.records import UsageBucket

NOW = datetime(2025, 8, 1, 12, 30, 20, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
OPEN_MINUTE = NOW.replace(second=0)
MIDNIGHT = datetime(2025, 8, 1, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for provider, env in KEY_ENV.items():
        monkeypatch.setenv(env, KEYS[provider])
    monkeypatch.delenv("TOKENTOP_ANTHROPIC_BASE_URL", raising=False)


@pytest.fixture
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(now=NOW) as fake:
        yield fake


@pytest.fixture
async def collector(server: FakeProviderServer) -> AsyncIterator[AdminApiCollector]:
    c = make_collector(server, "anthropic")
    yield c
    await c.aclose()


async def test_contract_attributes(collector: AdminApiCollector) -> None:
    assert isinstance(collector, Collector)
    assert isinstance(collector, AnthropicCollector)
    assert (collector.name, collector.kind, collector.calls) == ("anthropic", "anthropic", 0)
    bare = ProviderConfig(name="anthropic", key_env="ANTHROPIC_ADMIN_KEY", interval_s=120)
    default = AnthropicCollector(bare)
    assert default.base_url == "https://api.anthropic.com"
    assert default.interval_s == 120
    await default.aclose()


async def test_backfill_headers_and_parameters(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    server.seed(hours=3)
    batch = await collector.poll(poll_context(NOW, backfill_hours=2))
    (window,) = batch.windows
    assert window.start == OPEN_MINUTE - timedelta(hours=2)
    assert window.end == OPEN_MINUTE + MINUTE
    assert sum_usage(batch.usage) == server.usage_totals("anthropic", window.start, window.end)
    assert batch.watermark == NOW

    (usage,) = server.requests_to("usage_report")
    assert usage.headers["x-api-key"] == KEYS["anthropic"]
    assert usage.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in usage.headers
    assert usage.param("starting_at") == "2025-08-01T10:30:00Z"
    assert "ending_at" not in usage.query
    assert usage.param("bucket_width") == "1m"
    assert usage.param("limit") == "1440"
    assert usage.query["group_by"] == [
        "model",
        "api_key_id",
        "workspace_id",
        "service_tier",
        "context_window",
    ]
    assert "group_by%5B%5D=workspace_id" in usage.raw_query
    (cost,) = server.requests_to("cost_report")
    assert cost.param("starting_at") == "2025-07-25T00:00:00Z"
    assert cost.query["group_by"] == ["workspace_id", "description"]
    assert int(cost.param("limit") or 0) <= 31


async def test_token_kinds_and_dimensions(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    at = OPEN_MINUTE - 3 * MINUTE
    server.add_anthropic_usage(
        at,
        "claude-sonnet-4-20250514",
        api_key_id="apikey_01A",
        workspace_id="wrkspc_01B",
        service_tier="batch",
        context_window="200k-1M",
        uncached_input_tokens=1500,
        cache_read_input_tokens=200,
        ephemeral_5m_input_tokens=500,
        ephemeral_1h_input_tokens=1000,
        output_tokens=500,
        web_search_requests=10,
    )
    server.add_anthropic_usage(at, "claude-3-5-haiku-20241022", output_tokens=7)
    batch = await collector.poll(poll_context(NOW))
    got = sorted(batch.usage, key=lambda b: b.model)
    assert got == [
        UsageBucket(
            source="anthropic",
            provider="anthropic",
            model="claude-3-5-haiku-20241022",
            start=at,
            output=7,
        ),
        UsageBucket(
            source="anthropic",
            provider="anthropic",
            model="claude-sonnet-4-20250514",
            start=at,
            api_key="apikey_01A",
            workspace="wrkspc_01B",
            service_tier="batch",
            batch="true",
            context_window="200k-1M",
            input_uncached=1500,
            cache_read=200,
            cache_write_5m=500,
            cache_write_1h=1000,
            output=500,
            web_searches=10,
        ),
    ]
    assert got[1].input_total == 3200
    assert all(b.requests == 0 for b in got), "the usage report has no request count"


async def test_many_pages(server: FakeProviderServer, collector: AdminApiCollector) -> None:
    server.seed(hours=2)
    server.behaviour.max_page_buckets = 10
    batch = await collector.poll(poll_context(NOW, backfill_hours=2))
    assert sum_usage(batch.usage) == server.usage_totals("anthropic", batch.windows[0].start)
    assert len(server.requests_to("usage_report")) == 13


@pytest.mark.parametrize("partial", [True, False])
@pytest.mark.parametrize("empty", [True, False])
async def test_partial_and_empty_buckets_either_way(
    server: FakeProviderServer, collector: AdminApiCollector, partial: bool, empty: bool
) -> None:
    server.behaviour.anthropic_partial_bucket = partial
    server.behaviour.anthropic_empty_buckets = empty
    server.seed(hours=1, density=0.5)
    store = ReplacingStore()
    store.apply(await collector.poll(poll_context(NOW, backfill_hours=1)))
    closed = server.usage_totals("anthropic", end=OPEN_MINUTE)
    upto = store.totals(end=OPEN_MINUTE)
    assert upto == closed
    assert store.totals() == (server.usage_totals("anthropic") if partial else closed)

    server.grow_newest(output_tokens=10)
    later = server.advance(60)
    store.apply(await collector.poll(poll_context(later, store.watermark)))
    assert store.totals(end=OPEN_MINUTE + MINUTE) == server.usage_totals("anthropic")


async def test_data_lag_is_caught_by_the_trailing_reread(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    server.seed(hours=2)
    server.behaviour.lag_s = 300
    store = ReplacingStore()
    store.apply(await collector.poll(poll_context(NOW, backfill_hours=2)))
    assert store.totals() != server.usage_totals("anthropic")
    later = server.advance(360)
    store.apply(await collector.poll(poll_context(later, store.watermark)))
    assert store.totals() == server.usage_totals("anthropic", end=OPEN_MINUTE + MINUTE)


async def test_idempotent_and_revisions_replace(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    server.seed(hours=2)
    store = ReplacingStore()
    batch = await collector.poll(poll_context(NOW, backfill_hours=2))
    store.apply(batch)
    store.apply(batch)
    assert store.totals() == server.usage_totals("anthropic")

    server.remove_usage("anthropic", OPEN_MINUTE - 7 * MINUTE, "claude-sonnet-4-20250514")
    server.add_anthropic_usage(
        OPEN_MINUTE - 8 * MINUTE, "claude-sonnet-4-20250514", output_tokens=5, replace=True
    )
    for seconds in (20, 20):
        now = server.advance(seconds)
        store.apply(await collector.poll(poll_context(now, store.watermark)))
        assert store.totals() == server.usage_totals("anthropic")


async def test_catchup_chunks_send_a_past_ending_at(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    server.seed(hours=30)
    server.behaviour.reject_future_end = True
    store = ReplacingStore()
    first = await collector.poll(poll_context(NOW, backfill_hours=30))
    assert first.progress is not None and 0 < first.progress < 1
    pages = server.requests_to("usage_report")
    assert len(pages) == 2, "26 h of minutes is two pages of 1440"
    assert {r.param("ending_at") for r in pages} == {"2025-08-01T08:30:00Z"}
    store.apply(first)
    second = await collector.poll(poll_context(NOW, store.watermark, backfill_hours=30))
    assert second.progress == 1.0
    store.apply(second)
    assert store.totals() == server.usage_totals("anthropic")


async def test_costs_are_cents_strings_summed_per_line(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    day = MIDNIGHT - timedelta(days=1)
    server.add_anthropic_cost(
        day,
        "123.78912",
        description="Claude Sonnet 4 Usage - Input Tokens",
        cost_type="tokens",
        model="claude-sonnet-4-20250514",
        service_tier="standard",
        token_type="uncached_input_tokens",
    )
    server.add_anthropic_cost(
        day,
        "0.00001",
        description="Claude Sonnet 4 Usage - Input Tokens",
        cost_type="tokens",
        model="claude-sonnet-4-20250514",
        service_tier="batch",
        token_type="uncached_input_tokens",
    )
    server.add_anthropic_cost(
        day - timedelta(days=1),
        "1000",
        workspace_id="wrkspc_01X",
        description="Web Search Usage",
        cost_type="web_search",
    )
    server.add_anthropic_cost(NOW, "5", description="today, not reported yet")
    batch = await collector.poll(poll_context(NOW))

    got = {(c.day, c.workspace, c.line_item): c.amount_nano for c in batch.billed}
    assert got == {
        (day, "", "Claude Sonnet 4 Usage - Input Tokens"): 1_237_891_300,
        (day - timedelta(days=1), "wrkspc_01X", "Web Search Usage"): 10_000_000_000,
    }
    assert {(c.currency, c.project, c.provider) for c in batch.billed} == {("usd", "", "anthropic")}
    assert batch.billed_days == (
        ("anthropic", MIDNIGHT - timedelta(days=7), MIDNIGHT + timedelta(days=1)),
    )


@pytest.mark.parametrize("knob", ["extra_fields", "omit_optional"])
async def test_unknown_fields_and_missing_optional_ones(
    server: FakeProviderServer, collector: AdminApiCollector, knob: str
) -> None:
    server.seed(hours=1)
    server.add_anthropic_cost(MIDNIGHT - timedelta(days=1), "250", description="Code Execution")
    setattr(server.behaviour, knob, True)
    batch = await collector.poll(poll_context(NOW, backfill_hours=1))
    assert sum_usage(batch.usage) == server.usage_totals("anthropic", batch.windows[0].start)
    (_, first_day, _) = batch.billed_days[0]
    expected = server.cost_total("anthropic", first_day, MIDNIGHT)
    assert sum(c.amount_nano for c in batch.billed) == int(expected * 10**9)
    assert any(c.workspace == "" for c in batch.billed)
