"""OpenAI embeddings usage: read beside completions in the same window, against the local fake
(in process, and end to end through the CLI)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
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
from tokentop.collectors.base import SourceError
from tokentop.collectors.http import AdminApiCollector
from tokentop.collectors.openai import OpenAICollector
from tokentop.pricing.book import PriceBook, TokenCounts
from tokentop.store.records import UsageBucket

NOW = datetime(2025, 8, 1, 12, 30, 20, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
OPEN_MINUTE = NOW.replace(second=0)
EMBEDDINGS = "/v1/organization/usage/embeddings"
COMPLETIONS = "/v1/organization/usage/completions"
COSTS = "/v1/organization/costs"
TRANSIENT = ["500", "529", "timeout", "truncate", "malformed", "reset"]
ROOT = Path(__file__).resolve().parents[1]


class Sleeps:
    """Records backoff waits instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


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
    c = make_collector(server, "openai", timeout_s=0.25, sleep=Sleeps())
    yield c
    await c.aclose()


def paths(server: FakeProviderServer) -> list[str]:
    return [r.path for r in server.requests]


async def test_embeddings_buckets_are_read_exactly(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    at = OPEN_MINUTE - 5 * MINUTE
    server.add_openai_embeddings(
        at, "text-embedding-3-small", 1200, 3, project_id="proj_abc", api_key_id="key_abc"
    )
    server.add_openai_embeddings(
        at, "text-embedding-3-small", 800, 1, project_id="proj_abc", api_key_id="key_abc"
    )
    server.add_openai_embeddings(at, "text-embedding-3-large", 20, 2, user_id="user_x")
    server.add_openai_embeddings(OPEN_MINUTE, "text-embedding-3-small", 5, 1)  # the open minute
    server.add_openai_usage(
        at,
        "gpt-4o-mini-2024-07-18",
        project_id="proj_abc",
        api_key_id="key_abc",
        batch=False,
        service_tier="default",
        input_tokens=100,
        output_tokens=10,
        num_model_requests=1,
    )
    batch = await collector.poll(poll_context(NOW))

    (window,) = batch.windows
    assert (window.source, window.start, window.end) == (
        "openai",
        OPEN_MINUTE - timedelta(hours=2),
        OPEN_MINUTE + MINUTE,
    )
    embedded = sorted(
        (b for b in batch.usage if b.model.startswith("text-embedding")),
        key=lambda b: (b.start, b.model),
    )
    assert embedded == [
        UsageBucket(
            source="openai",
            provider="openai",
            model="text-embedding-3-large",
            start=at,
            input_uncached=20,
            requests=2,
        ),
        UsageBucket(
            source="openai",
            provider="openai",
            model="text-embedding-3-small",
            start=at,
            project="proj_abc",
            api_key="key_abc",
            input_uncached=2000,
            requests=4,
        ),
        UsageBucket(
            source="openai",
            provider="openai",
            model="text-embedding-3-small",
            start=OPEN_MINUTE,
            input_uncached=5,
            requests=1,
        ),
    ]
    (completion,) = [b for b in batch.usage if b.model == "gpt-4o-mini-2024-07-18"]
    assert (completion.batch, completion.service_tier) == ("false", "default")
    assert sum_usage(batch.usage) == server.usage_totals("openai", window.start, window.end)
    assert "detail" not in batch.extra

    assert collector.calls == len(server.requests) == 3
    assert paths(server) == [COMPLETIONS, EMBEDDINGS, COSTS]
    usage, embeddings = server.requests_to(COMPLETIONS)[0], server.requests_to(EMBEDDINGS)[0]
    assert embeddings.query["group_by"] == ["model", "project_id", "api_key_id"]
    assert "group_by%5B%5D=model" in embeddings.raw_query
    assert embeddings.headers["authorization"] == f"Bearer {KEYS['openai']}"
    for name in ("start_time", "bucket_width", "limit"):
        assert embeddings.param(name) == usage.param(name), name
    assert embeddings.param("bucket_width") == "1m"
    assert embeddings.param("limit") == "1440"
    assert "end_time" not in embeddings.query


async def test_many_pages_and_empty_buckets(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    server.seed(hours=2, embeddings=True)
    server.behaviour.max_page_buckets = 7
    store = ReplacingStore()
    batch = await collector.poll(poll_context(NOW, backfill_hours=2))
    store.apply(batch)
    (window,) = batch.windows
    assert sum_usage(batch.usage) == server.usage_totals("openai", window.start, window.end)
    pages = server.requests_to(EMBEDDINGS)
    assert len(pages) == -(-121 // 7)
    cursors = [p.param("page") for p in pages]
    assert cursors[0] is None
    assert len(set(cursors[1:])) == len(cursors) - 1
    assert {b.model for b in batch.usage} >= {"text-embedding-3-small", "text-embedding-3-large"}

    # Re-polls replace the window: embeddings are not counted twice.
    later = server.advance(30)
    store.apply(await collector.poll(poll_context(later, store.watermark)))
    assert store.totals() == server.usage_totals("openai", window.start)

    # Only empty buckets: a window and no records.
    with FakeProviderServer(now=NOW) as empty:
        fresh = make_collector(empty, "openai")
        batch = await fresh.poll(poll_context(NOW))
        await fresh.aclose()
        assert batch.usage == ()
        assert len(batch.windows) == 1
        (page,) = empty.requests_to(EMBEDDINGS)
        assert page.status == 200


async def test_seeding_embeddings_leaves_the_rest_of_the_traffic_alone() -> None:
    with FakeProviderServer(now=NOW) as plain, FakeProviderServer(now=NOW) as both:
        plain.seed(hours=2)
        both.seed(hours=2, embeddings=True)
        assert plain._openai == both._openai
        assert plain._anthropic == both._anthropic
        assert plain._openai_embeddings == {}
        assert both._openai_embeddings
        assert both.cost_total("openai") > plain.cost_total("openai")


async def test_a_long_backfill_reads_embeddings_in_every_chunk(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    server.seed(hours=30, embeddings=True, openai_models=(), anthropic_models=())
    store = ReplacingStore()
    for _ in range(5):
        batch = await collector.poll(poll_context(NOW, store.watermark, backfill_hours=30))
        store.apply(batch)
        if batch.progress in (None, 1.0):
            break
        assert server.requests_to(EMBEDDINGS)[-1].param("end_time") == str(
            int(batch.windows[0].end.timestamp())
        )
    assert batch.progress == 1.0
    assert store.totals() == server.usage_totals("openai")
    assert store.totals()["requests"] > 0


async def test_an_endpoint_that_is_missing_is_skipped_from_then_on(
    server: FakeProviderServer,
    collector: AdminApiCollector,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server.seed(hours=2)
    server.add_openai_embeddings(OPEN_MINUTE - MINUTE, "text-embedding-3-small", 100, 1)
    server.behaviour.openai_embeddings_404 = True
    caplog.set_level(logging.WARNING, logger="tokentop.openai")

    batch = await collector.poll(poll_context(NOW, backfill_hours=2))
    (window,) = batch.windows
    assert not any(b.model.startswith("text-embedding") for b in batch.usage)
    completions_only = server.usage_totals("openai", window.start, window.end)
    completions_only["input_uncached"] -= 100
    completions_only["requests"] -= 1
    assert sum_usage(batch.usage) == completions_only
    assert "embeddings" in batch.extra["detail"] and "404" in batch.extra["detail"]
    assert batch.billed_days, "the poll went on to the costs"
    assert collector.calls == len(server.requests) == 3
    assert [r.status for r in server.requests] == [200, 404, 200]
    assert isinstance(collector, OpenAICollector) and not collector.read_embeddings
    warnings = [r for r in caplog.records if r.name == "tokentop.openai"]
    assert len(warnings) == 1
    assert "embeddings" in warnings[0].getMessage()

    server.behaviour.openai_embeddings_404 = False  # not asked again anyway
    for seconds in (60, 60):
        later = server.advance(seconds)
        batch = await collector.poll(poll_context(later, batch.watermark))
        assert "detail" not in batch.extra
    assert len(server.requests_to(EMBEDDINGS)) == 1
    assert collector.calls == len(server.requests) == 5
    assert len([r for r in caplog.records if r.name == "tokentop.openai"]) == 1


async def test_a_missing_completions_endpoint_still_fails_the_poll(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    server.fault("404", path="usage/completions")
    with pytest.raises(SourceError, match="base URL"):
        await collector.poll(poll_context(NOW))
    assert paths(server) == [COMPLETIONS]


async def test_a_missing_endpoint_is_noted_on_the_next_good_poll(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    server.behaviour.openai_embeddings_404 = True
    server.fault("500", times=3, path="costs")
    with pytest.raises(SourceError, match="500"):
        await collector.poll(poll_context(NOW))
    batch = await collector.poll(poll_context(NOW))
    assert "404" in batch.extra["detail"]
    assert len(server.requests_to(EMBEDDINGS)) == 1


@pytest.mark.parametrize("kind", TRANSIENT)
async def test_a_transient_failure_of_embeddings_is_retried(
    server: FakeProviderServer, kind: str
) -> None:
    server.seed(hours=2, embeddings=True)
    sleeps = Sleeps()
    collector = make_collector(server, "openai", timeout_s=0.25, sleep=sleeps)
    server.fault(kind, path="embeddings", delay_s=1.0)
    batch = await collector.poll(poll_context(NOW, backfill_hours=2))
    await collector.aclose()
    (window,) = batch.windows
    assert sum_usage(batch.usage) == server.usage_totals("openai", window.start, window.end)
    assert collector.calls == len(server.requests) == 4
    assert [r.fault for r in server.requests] == ["", kind, "", ""]
    assert paths(server) == [COMPLETIONS, EMBEDDINGS, EMBEDDINGS, COSTS]
    assert len(sleeps.delays) == 1


@pytest.mark.parametrize("kind", [*TRANSIENT, "400"])
async def test_a_failing_embeddings_page_fails_the_whole_poll(
    server: FakeProviderServer, kind: str
) -> None:
    server.seed(hours=2, embeddings=True)
    server.behaviour.max_page_buckets = 20
    collector = make_collector(server, "openai", timeout_s=0.25, sleep=Sleeps())
    store = ReplacingStore()
    tries = 1 if kind == "400" else 3
    server.fault(kind, nth=3, times=tries, path="embeddings", delay_s=1.0)
    with pytest.raises(SourceError) as caught:
        store.apply(await collector.poll(poll_context(NOW, backfill_hours=2)))
    error = caught.value
    assert "embeddings" in error.message
    assert "\n" not in error.message
    completion_pages = -(-121 // 20)
    assert collector.calls == len(server.requests) == completion_pages + 2 + tries
    assert store.usage == {}, "nothing of the window was returned"
    assert isinstance(collector, OpenAICollector) and collector.read_embeddings

    batch = await collector.poll(poll_context(NOW, backfill_hours=2))
    await collector.aclose()
    store.apply(batch)
    (window,) = batch.windows
    assert store.totals() == server.usage_totals("openai", window.start, window.end)


@pytest.mark.parametrize(
    ("kind", "check"),
    [
        ("429", lambda e: e.retry_after == 5.0 and not e.auth),
        ("401", lambda e: e.auth),
        ("403", lambda e: e.auth),
    ],
)
async def test_rate_limits_and_refusals_of_embeddings_fail_the_poll(
    server: FakeProviderServer,
    collector: AdminApiCollector,
    kind: str,
    check: Callable[[SourceError], bool],
) -> None:
    server.seed(hours=1, embeddings=True)
    server.fault(kind, path="embeddings", retry_after="5")
    with pytest.raises(SourceError) as caught:
        await collector.poll(poll_context(NOW))
    assert check(caught.value)
    assert collector.calls == 2, "not retried"
    assert KEYS["openai"] not in repr(vars(caught.value))


async def test_a_model_in_both_endpoints_is_summed_not_lost(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    # Cannot happen with real models (embedding models are never completions models, and a
    # completions bucket carries its batch and tier); if it did, nothing is lost.
    at = OPEN_MINUTE - 3 * MINUTE
    server.add_openai_usage(at, "m", input_tokens=10, output_tokens=1, num_model_requests=1)
    server.add_openai_embeddings(at, "m", 5, 2)
    batch = await collector.poll(poll_context(NOW))
    (bucket,) = batch.usage
    assert (bucket.input_uncached, bucket.output, bucket.requests) == (15, 1, 3)


def test_fake_refuses_completions_only_groupings() -> None:
    with FakeProviderServer(now=NOW) as server:
        query = "start_time=0&bucket_width=1m&group_by[]=batch"
        headers = {"Authorization": f"Bearer {KEYS['openai']}"}
        got = httpx.get(
            f"{server.openai_base_url}/organization/usage/embeddings?{query}", headers=headers
        )
        assert got.status_code == 400
        assert "group_by" in got.json()["error"]["message"]


# ----- end to end: the CLI in subprocesses


def tokentop(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokentop", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_reports_embeddings_with_exact_tokens_and_list_price(tmp_path: Path) -> None:
    with FakeProviderServer() as server:
        server.seed(hours=3, embeddings=True)
        config = tmp_path / "config.toml"
        config.write_text("nvml = false\n")
        env = {
            "OPENAI_ADMIN_KEY": server.openai_key,
            "ANTHROPIC_ADMIN_KEY": server.anthropic_key,
            "TOKENTOP_OPENAI_BASE_URL": server.openai_base_url,
            "TOKENTOP_ANTHROPIC_BASE_URL": server.anthropic_base_url,
            "TOKENTOP_CONFIG": str(config),
            "TOKENTOP_DB": str(tmp_path / "tokentop.db"),
        }
        result = tokentop("collect", "--once", env=env)
        assert result.returncode == 0, result.stderr
        result = tokentop("report", "--since", "6h", "--json", env=env)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)

        truth: dict[str, dict[str, int]] = {}
        with server._lock:
            for (_minute, dims), c in server._openai_embeddings.items():
                t = truth.setdefault(dims[0], {"input": 0, "requests": 0})
                t["input"] += c["input_tokens"]
                t["requests"] += c["num_model_requests"]
        assert set(truth) == {"text-embedding-3-small", "text-embedding-3-large"}
        rows = {r["model"]: r for r in report["by_model"]}
        assert "gpt-4o-mini-2024-07-18" in rows and "claude-sonnet-4-20250514" in rows
        book = PriceBook()
        now = datetime.fromisoformat(report["tokentop"]["generated_at"])
        for model, t in truth.items():
            row = rows[model]
            assert row["provider"] == "openai"
            assert row["input_tokens"] == t["input"], model
            assert row["cached_input_tokens"] == 0, model
            assert row["output_tokens"] == 0, model
            assert row["requests"] == t["requests"], model
            quote = book.quote("openai", model, TokenCounts(input_uncached=t["input"]), now)
            assert quote.cost is not None and quote.cost > 0
            assert abs(Decimal(str(row["cost_usd"])) - quote.cost) <= Decimal("0.000001"), model
        since, until = (datetime.fromisoformat(report["window"][k]) for k in ("start", "end"))
        openai_requests = sum(
            r["requests"] for r in report["by_model"] if r["provider"] == "openai"
        )
        assert openai_requests == server.usage_totals("openai", since, until)["requests"]
