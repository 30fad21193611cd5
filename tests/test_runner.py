"""The runner: pricing, health, backoff, isolation of failures, chained polls, stop, restart."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import genai_prices
import pytest

from tests.helpers import T0, USAGE_FLAT, Clock, FakeCollector, at, auth_error, bucket
from tokentop.collectors.base import Collector, PollContext, SourceError
from tokentop.collectors.runner import Runner, price_batch
from tokentop.pricing.book import PriceBook
from tokentop.store import queries
from tokentop.store.db import Store
from tokentop.store.records import (
    Batch,
    MeteredRequest,
    SourceHealth,
    UsageBucket,
    UsageWindow,
    from_epoch,
    to_epoch,
)

GPT4O = "gpt-4o-2024-05-13"
REF = f"genai-prices {genai_prices.__version__} openai/{GPT4O}"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store(db_path)
    yield s
    s.close()


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


def runner(store: Store, *collectors: Collector, clock: Clock, **kwargs: object) -> Runner:
    return Runner(store, list(collectors), PriceBook(), clock=clock, **kwargs)  # type: ignore[arg-type]


def health(store: Store, name: str, now: datetime) -> SourceHealth:
    return {h.name: h for h in queries.sources(store, now)}[name]


def raw_usage(
    start: datetime,
    model: str = GPT4O,
    source: str = "fake",
    *,
    requests: int = 1,
    output: int = 200,
) -> UsageBucket:
    """An unpriced bucket, as a collector returns it: 1,000 tokens in, 200 out by default."""
    return UsageBucket(
        source=source,
        provider="openai",
        model=model,
        start=start,
        input_uncached=1000,
        output=output,
        requests=requests,
    )


def test_fake_collector_satisfies_the_protocol() -> None:
    assert isinstance(FakeCollector(), Collector)


async def test_usage_is_priced_through_the_book(store: Store, clock: Clock) -> None:
    prepriced = bucket(at(-3), source="fake", model="custom", cost="1.5", requests=2)
    c = FakeCollector(
        outcomes=[
            Batch(
                usage=(raw_usage(at(-2)), raw_usage(at(-2), model="no-such-model"), prepriced),
                requests=(
                    MeteredRequest(
                        ts=at(-1),
                        provider="openai",
                        model=GPT4O,
                        request_id="r1",
                        input_uncached=1000,
                        output=200,
                    ),
                ),
                watermark=at(-1),
            )
        ]
    )
    assert await runner(store, c, clock=clock).poll(c) is True
    rows = store.query(
        f"SELECT source, model, cost_nano, priced, price_ref FROM {USAGE_FLAT}"
        " ORDER BY start, model"
    )
    assert [tuple(r) for r in rows] == [
        ("fake", "custom", 1_500_000_000, 1, "test openai/custom"),
        ("fake", GPT4O, 8_000_000, 1, REF),
        ("fake", "no-such-model", 0, 0, "unpriced openai/no-such-model"),
        ("meter", GPT4O, 8_000_000, 1, REF),  # the metered request, as its minute's bucket
    ]
    request = store.query("SELECT cost_nano, priced, price_ref FROM request")[0]
    assert tuple(request) == (8_000_000, 1, REF)
    t = queries.totals(store, at(-10), at(10))
    # "fake" covers openai, so the metered request is inside its figures, not added to them.
    assert t.requests == 4
    assert queries.totals(store, at(-10), at(10), scope="metered").requests == 1
    assert t.unpriced_requests == 1
    assert t.unpriced_tokens == 1200


def test_price_batch_leaves_batches_without_usage_alone() -> None:
    batch = Batch(watermark=T0)
    assert price_batch(PriceBook(), batch) is batch


async def test_success_records_health(store: Store, clock: Clock) -> None:
    c = FakeCollector(
        calls_per_poll=3,
        default=Batch(usage=(raw_usage(at(-2)),), watermark=at(-1), extra={"detail": "2 pages"}),
    )
    r = runner(store, c, clock=clock)
    await r.poll(c)
    clock.advance(60)
    await r.poll(c)
    h = health(store, "fake", clock.now)
    assert h.kind == "fake"
    assert h.state == "ok"
    assert h.last_success == clock.now
    assert h.lag_s == 120.0  # from the watermark
    assert h.watermark == at(-1)
    assert h.newest_data == at(-1)  # end of the newest bucket
    assert h.detail == "2 pages"
    assert (h.calls, h.calls_last_hour) == (6, 6)
    assert h.last_error == ""
    assert c.contexts[1].now == clock.now


async def test_backfill_progress_is_reported(store: Store, clock: Clock) -> None:
    seen: list[tuple[str, float]] = []
    c = FakeCollector(outcomes=[Batch(progress=0.25), Batch(progress=1.0)])
    r = runner(store, c, clock=clock, on_progress=lambda n, p: seen.append((n, p)))
    await r.poll(c)
    h = health(store, "fake", clock.now)
    assert (h.state, h.detail) == ("backfilling", "backfill 25%")
    await r.poll(c)
    assert health(store, "fake", clock.now).state == "ok"
    assert seen == [("fake", 0.25), ("fake", 1.0)]


@pytest.mark.parametrize(
    ("error", "state", "message"),
    [
        (SourceError("HTTP 500: upstream error"), "error", "HTTP 500: upstream error"),
        (auth_error(), "auth failed", "HTTP 401: invalid admin key"),
        (SourceError("HTTP 429: slow down", retry_after=30), "rate limited", "HTTP 429: slow down"),
        (SourceError("NVML driver not found", fatal=True), "unavailable", "NVML driver not found"),
        (KeyError("data"), "error", "internal error: KeyError: 'data'"),
        (RuntimeError("boom"), "error", "internal error: RuntimeError: boom"),
    ],
)
async def test_failures_record_health_states(
    store: Store, clock: Clock, error: Exception, state: str, message: str
) -> None:
    c = FakeCollector(outcomes=[Batch(watermark=at(-1)), error, error], calls_per_poll=1)
    r = runner(store, c, clock=clock)
    assert await r.poll(c) is True
    succeeded = clock.now
    clock.advance(30)
    assert await r.poll(c) is False
    clock.advance(30)
    assert await r.poll(c) is False
    h = health(store, "fake", clock.now)
    assert h.state == state
    assert h.last_error == message
    assert "\n" not in h.last_error
    assert h.last_error_at == clock.now
    assert h.last_success == succeeded  # kept through failures
    assert h.detail == "2 failure(s) in a row"
    assert h.lag_s == 120.0  # measured from the last watermark
    assert h.calls == 3
    assert r.failures["fake"] == 2


async def test_internal_error_message_is_one_line(store: Store, clock: Clock) -> None:
    c = FakeCollector(outcomes=[ValueError("bad payload:\n{'data': [\n]}")])
    await runner(store, c, clock=clock).poll(c)
    assert "\n" not in health(store, "fake", clock.now).last_error


@pytest.fixture
def no_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "uniform", lambda a, b: 1.0)


async def test_backoff_grows_with_failures_and_resets(
    store: Store, clock: Clock, no_jitter: None
) -> None:
    c = FakeCollector(interval_s=10, outcomes=[SourceError("down")] * 8 + [Batch()])
    r = runner(store, c, clock=clock, max_backoff_s=600)
    assert r.next_delay(c) == 10
    delays = []
    for _ in range(8):
        await r.poll(c)
        delays.append(r.next_delay(c))
    assert delays == [10, 20, 40, 80, 160, 320, 600, 600]
    await r.poll(c)
    assert r.next_delay(c) == 10


async def test_jitter_stays_within_a_fifth(store: Store, clock: Clock) -> None:
    random.seed(1)
    c = FakeCollector(interval_s=10, outcomes=[SourceError("down")] * 3)
    r = runner(store, c, clock=clock)
    for _ in range(3):
        await r.poll(c)
    for _ in range(50):
        assert 32 <= r.next_delay(c) <= 48


async def test_retry_after_is_honoured(store: Store, clock: Clock, no_jitter: None) -> None:
    c = FakeCollector(
        interval_s=10,
        outcomes=[
            SourceError("429", retry_after=90),
            SourceError("429", retry_after=5),
            SourceError("429", retry_after=5),
            SourceError("429", retry_after=5000),
        ],
    )
    r = runner(store, c, clock=clock, max_backoff_s=600)
    await r.poll(c)
    assert r.next_delay(c) == 90  # longer than the backoff: the source's word wins
    await r.poll(c)
    assert r.next_delay(c) == 20  # shorter: the backoff wins
    await r.poll(c)
    assert r.next_delay(c) == 40
    await r.poll(c)
    assert r.next_delay(c) == 5000  # beyond the ceiling, still honoured


async def test_backoff_never_exceeds_its_ceiling(
    store: Store, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(random, "uniform", lambda a, b: b)
    c = FakeCollector(interval_s=10, outcomes=[SourceError("down")] * 10)
    r = runner(store, c, clock=clock, max_backoff_s=600)
    for _ in range(10):
        await r.poll(c)
    assert r.next_delay(c) <= 600


async def test_auth_failure_waits_at_least_five_minutes(store: Store, clock: Clock) -> None:
    c = FakeCollector(interval_s=1, outcomes=[auth_error()])
    r = runner(store, c, clock=clock)
    await r.poll(c)
    for _ in range(20):
        assert r.next_delay(c) >= 300
    slow = FakeCollector(name="slow", interval_s=900, outcomes=[auth_error()])
    r = runner(store, slow, clock=clock)
    await r.poll(slow)
    assert r.next_delay(slow) >= 900 * 0.8


async def test_fatal_failure_waits_at_least_ten_minutes(store: Store, clock: Clock) -> None:
    c = FakeCollector(interval_s=1, outcomes=[SourceError("no driver", fatal=True)])
    r = runner(store, c, clock=clock)
    await r.poll(c)
    assert r.next_delay(c) >= 600


async def test_one_collector_crashing_does_not_stop_others(store: Store, clock: Clock) -> None:
    boom = FakeCollector(name="boom", outcomes=[ZeroDivisionError("x")])
    ok = FakeCollector(name="ok", default=Batch(usage=(raw_usage(at(-1), source="ok"),)))
    r = runner(store, boom, ok, clock=clock)
    assert await r.run_once() == {"boom": False, "ok": True}
    assert queries.totals(store, at(-5), at(5)).requests == 1


async def test_collector_raising_midway_writes_nothing(store: Store, clock: Clock) -> None:
    class HalfWay(FakeCollector):
        async def poll(self, ctx: PollContext) -> Batch:
            usage = [raw_usage(at(m)) for m in range(3)]
            if len(self.contexts) >= 1:
                raise SourceError("HTTP 502 on page 2")
            self.contexts.append(ctx)
            return Batch(usage=tuple(usage), windows=(UsageWindow("fake", 60, at(0), at(3)),))

    c = HalfWay()
    r = runner(store, c, clock=clock)
    assert await r.poll(c) is True
    before = [tuple(x) for x in store.query("SELECT * FROM usage")]
    assert await r.poll(c) is False
    assert [tuple(x) for x in store.query("SELECT * FROM usage")] == before


async def test_batch_the_store_rejects_is_a_recorded_failure(store: Store, clock: Clock) -> None:
    naive = datetime(2025, 3, 15, 12, 0)  # noqa: DTZ001
    bad = FakeCollector(name="bad", outcomes=[Batch(usage=(raw_usage(naive, source="bad"),))])
    ok = FakeCollector(name="ok")
    r = runner(store, bad, ok, clock=clock)
    assert await r.run_once() == {"bad": False, "ok": True}
    assert health(store, "bad", clock.now).state == "error"
    assert store.query("SELECT COUNT(*) FROM usage")[0][0] == 0


async def test_run_polls_each_source_without_overlap(store: Store, clock: Clock) -> None:
    r: Runner

    def stop_after(n: int) -> object:
        def hook(c: FakeCollector) -> None:
            if c.polls >= n:
                r.stop()

        return hook

    slow = FakeCollector(name="slow", interval_s=0.0001, delay_s=0.003)
    fast = FakeCollector(name="fast", interval_s=0.0001, on_poll=stop_after(25))  # type: ignore[arg-type]
    r = runner(store, slow, fast, clock=clock)
    await asyncio.wait_for(r.run(), timeout=10)
    assert slow.max_active == 1
    assert fast.max_active == 1
    assert slow.polls >= 1
    assert fast.polls >= 25
    assert slow.closed == 1 and fast.closed == 1
    assert r.stopping


async def test_a_crashing_collector_keeps_being_polled_beside_others(
    store: Store, clock: Clock
) -> None:
    r: Runner

    def hook(c: FakeCollector) -> None:
        if c.polls >= 10:
            r.stop()

    bad = FakeCollector(name="bad", interval_s=0.0001)
    bad.outcomes = [RuntimeError("bug")] * 1000
    good = FakeCollector(name="good", interval_s=0.0001, on_poll=hook)
    r = runner(store, bad, good, clock=clock, max_backoff_s=0.001)
    await asyncio.wait_for(r.run(), timeout=10)
    assert good.polls >= 10
    assert bad.polls >= 2  # retried after the crash
    assert health(store, "bad", clock.now).state == "error"
    assert health(store, "good", clock.now).state == "ok"


async def test_stop_ends_run_promptly_and_closes_collectors(store: Store, clock: Clock) -> None:
    both_polled = asyncio.Event()

    def hook(_: FakeCollector) -> None:
        if a.polls and b.polls:
            both_polled.set()

    a = FakeCollector(name="a", interval_s=3600, on_poll=hook)
    b = FakeCollector(name="b", interval_s=3600, on_poll=hook)
    r = runner(store, a, b, clock=clock)
    task = asyncio.create_task(r.run())
    await asyncio.wait_for(both_polled.wait(), timeout=2)
    r.stop()  # each loop finishes its poll, then would wait an hour: it must not
    await asyncio.wait_for(task, timeout=2)  # a guard against hanging, not a timing check
    assert (a.polls, b.polls) == (1, 1)
    assert (a.closed, b.closed) == (1, 1)


async def test_stop_before_run_returns_at_once(store: Store, clock: Clock) -> None:
    a = FakeCollector(interval_s=3600)
    r = runner(store, a, clock=clock)
    r.stop()
    await asyncio.wait_for(r.run(), timeout=2)
    assert a.polls == 0
    assert a.closed == 1


async def test_poll_in_flight_at_stop_lands_its_batch(store: Store, clock: Clock) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    class Slow(FakeCollector):
        async def poll(self, ctx: PollContext) -> Batch:
            entered.set()
            await release.wait()
            return Batch(usage=(raw_usage(at(0)),))

    c = Slow(interval_s=3600)
    r = runner(store, c, clock=clock)
    task = asyncio.create_task(r.run())
    await asyncio.wait_for(entered.wait(), timeout=2)
    r.stop()
    release.set()
    await asyncio.wait_for(task, timeout=2)
    assert queries.totals(store, at(0), at(1)).requests == 1
    assert c.closed == 1


async def test_poll_still_in_flight_after_the_grace_is_cancelled(
    store: Store, clock: Clock
) -> None:
    entered = asyncio.Event()
    cancelled: list[bool] = []

    class Stuck(FakeCollector):
        async def poll(self, ctx: PollContext) -> Batch:
            entered.set()
            try:
                await asyncio.Event().wait()  # never lands
            except asyncio.CancelledError:
                cancelled.append(True)
                raise
            raise AssertionError

    c = Stuck(interval_s=3600)
    r = runner(store, c, clock=clock, stop_grace_s=0.01)
    task = asyncio.create_task(r.run())
    await asyncio.wait_for(entered.wait(), timeout=2)
    r.stop()
    await asyncio.wait_for(task, timeout=2)  # a guard against hanging, not a timing check
    assert cancelled == [True]
    assert c.closed == 1
    assert queries.totals(store, at(0), at(1)).requests == 0


def test_source_names_must_be_unique(store: Store) -> None:
    with pytest.raises(ValueError, match="unique"):
        Runner(store, [FakeCollector(), FakeCollector()], PriceBook())


class MinuteSource(FakeCollector):
    """Like a provider: re-reads every minute from its watermark (or the backfill start) and
    replaces that window; the open minute grows with the clock."""

    async def poll(self, ctx: PollContext) -> Batch:
        self.contexts.append(ctx)
        now_s = to_epoch(ctx.now)
        first = to_epoch(ctx.watermark or ctx.backfill_start) // 60
        current = now_s // 60
        usage = []
        for minute in range(first, current + 1):
            done = 60 if minute < current else now_s % 60 + 1
            usage.append(raw_usage(from_epoch(minute * 60), requests=done, output=done * 10))
        return Batch(
            usage=tuple(usage),
            windows=(
                UsageWindow(self.name, 60, from_epoch(first * 60), from_epoch((current + 1) * 60)),
            ),
            watermark=from_epoch(current * 60),
        )


async def test_watermark_survives_restart_without_double_counting(db_path: Path) -> None:
    clock = Clock(T0 + timedelta(seconds=15))
    backfill = timedelta(hours=2)
    with Store(db_path) as store:
        first = MinuteSource(name="fake")
        r = Runner(store, [first], PriceBook(), clock=clock, backfill=backfill)
        await r.poll(first)
        clock.advance(40)
        await r.poll(first)
        assert first.contexts[0].watermark is None
        assert first.contexts[0].backfill_start == clock.now - timedelta(seconds=40) - backfill
        assert first.contexts[1].watermark == T0
    clock.advance(125)  # restart, two minutes later
    with Store(db_path) as store:
        second = MinuteSource(name="fake")
        r = Runner(store, [second], PriceBook(), clock=clock, backfill=backfill)
        await r.poll(second)
        assert second.contexts[0].watermark == T0  # read back from the database
        restarted = queries.totals(store, T0 - backfill, clock.now + timedelta(minutes=1))
    with Store(db_path.with_name("continuous.db")) as store:
        clock.now = T0 + timedelta(seconds=15)
        c = MinuteSource(name="fake")
        r = Runner(store, [c], PriceBook(), clock=clock, backfill=backfill)
        for step in (0, 40, 125):
            clock.advance(step)
            await r.poll(c)
        continuous = queries.totals(store, T0 - backfill, clock.now + timedelta(minutes=1))
    assert restarted == continuous
    assert restarted.requests == 120 * 60 + 60 + 60 + 60 + 1
