"""The demo sources: deterministic, backfilled, growing open minute, restart-safe."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import T0, USAGE_FLAT, Clock
from tokentop.collectors.base import PollContext
from tokentop.collectors.demo import (
    DEMO_GPUS,
    SERIES,
    DemoCollector,
    DemoGpuCollector,
    demo_backfill,
    minute_usage,
)
from tokentop.collectors.runner import Runner
from tokentop.pricing.book import PriceBook, TokenCounts
from tokentop.pricing.gpu import GpuCostModel
from tokentop.store import queries
from tokentop.store.db import Store
from tokentop.store.records import to_epoch

# Mid-afternoon, a few seconds into a minute: traffic is high and the open minute is partial.
START = T0.replace(hour=15) + timedelta(seconds=5)


def ctx(now: datetime, watermark: datetime | None = None) -> PollContext:
    return PollContext(now=now, watermark=watermark, backfill_start=now - demo_backfill())


async def test_same_seed_and_clock_give_the_same_batch() -> None:
    a = await DemoCollector(seed=3).poll(ctx(START))
    b = await DemoCollector(seed=3).poll(ctx(START))
    assert a == b
    other = await DemoCollector(seed=4).poll(ctx(START))
    assert other.usage != a.usage


async def test_first_poll_backfills_a_day_from_its_midnight() -> None:
    batch = await DemoCollector().poll(ctx(START))
    assert demo_backfill() == timedelta(hours=24)
    # The backfill starts at the midnight before "24 h ago", so that every day is whole.
    first_minute = (to_epoch(START) - 86400) // 86400 * 86400
    current_minute = to_epoch(START) // 60 * 60
    starts = {to_epoch(b.start) for b in batch.usage}
    assert min(starts) == first_minute
    assert max(starts) == current_minute
    # Every minute had traffic, the open one included.
    assert len(starts) == (current_minute - first_minute) // 60 + 1
    [window] = batch.windows
    assert (to_epoch(window.start), to_epoch(window.end)) == (first_minute, current_minute + 60)
    assert (window.source, window.width_s) == ("demo", 60)
    assert batch.watermark is not None and to_epoch(batch.watermark) == current_minute
    assert {b.source for b in batch.usage} == {"demo"}
    assert all(b.width_s == 60 and not b.priced and b.cost_nano == 0 for b in batch.usage)


async def test_open_minute_grows_as_it_elapses() -> None:
    minute_start = START.replace(second=0)
    c = DemoCollector()

    def open_requests(batch: Any) -> int:
        return sum(b.requests for b in batch.usage if b.start == minute_start)

    early = open_requests(await c.poll(ctx(minute_start + timedelta(seconds=5), minute_start)))
    later = open_requests(await c.poll(ctx(minute_start + timedelta(seconds=45), minute_start)))
    full = open_requests(await c.poll(ctx(minute_start + timedelta(seconds=59), minute_start)))
    complete = sum(
        minute_usage(7, i, to_epoch(minute_start) // 60).get("requests", 0)
        for i in range(len(SERIES))
    )
    assert 0 < early < later < full == complete


def usage_rows(store: Store, since: datetime) -> list[tuple[Any, ...]]:
    return [
        tuple(r)
        for r in store.query(
            f"SELECT * FROM {USAGE_FLAT} WHERE start >= ?"
            " ORDER BY start, provider, model, project, tag",
            (to_epoch(since),),
        )
    ]


async def run_polls(db: Path, times: Sequence[datetime], restart_every_poll: bool) -> None:
    clock = Clock(times[0])
    store = Store(db)
    collector = DemoCollector(clock=clock)
    runner = Runner(store, [collector], PriceBook(), clock=clock, backfill=demo_backfill())
    for t in times:
        clock.now = t
        if restart_every_poll:
            store.close()
            store = Store(db)
            collector = DemoCollector(clock=clock)
            runner = Runner(store, [collector], PriceBook(), clock=clock, backfill=demo_backfill())
        assert await runner.poll(collector) is True
    store.close()


@pytest.mark.parametrize("offset", [0, 50], ids=["within-a-minute", "across-a-minute"])
async def test_repolling_does_not_double_count(tmp_path: Path, offset: int) -> None:
    t = START + timedelta(seconds=offset)
    times = [t, t + timedelta(seconds=10), t + timedelta(seconds=20)]
    await run_polls(tmp_path / "three.db", times, restart_every_poll=False)
    await run_polls(tmp_path / "one.db", times[-1:], restart_every_poll=False)
    # The single poll's backfill may start a minute later; compare from there on.
    since = times[-1] - demo_backfill()
    with Store(tmp_path / "three.db") as three, Store(tmp_path / "one.db") as one:
        assert usage_rows(three, since) == usage_rows(one, since)
        end = times[-1] + timedelta(minutes=1)
        assert queries.totals(three, since, end) == queries.totals(one, since, end)
        assert queries.totals(one, since, end).requests > 0


async def test_restart_from_watermark_reproduces_identical_totals(tmp_path: Path) -> None:
    times = [START, START + timedelta(seconds=30), START + timedelta(minutes=7, seconds=12)]
    await run_polls(tmp_path / "kept.db", times, restart_every_poll=False)
    await run_polls(tmp_path / "restarted.db", times, restart_every_poll=True)
    with Store(tmp_path / "kept.db") as kept, Store(tmp_path / "restarted.db") as restarted:
        assert usage_rows(kept, START - demo_backfill()) == usage_rows(
            restarted, START - demo_backfill()
        )
        lo, hi = START - demo_backfill(), times[-1] + timedelta(minutes=1)
        assert queries.totals(kept, lo, hi) == queries.totals(restarted, lo, hi)
        assert restarted.get_watermark("demo") == times[-1].replace(second=0)


async def test_demo_includes_an_unpriced_model(db_path: Path) -> None:
    await run_polls(db_path, [START], restart_every_poll=False)
    with Store(db_path) as store:
        lo, hi = START - demo_backfill(), START + timedelta(minutes=1)
        unpriced = queries.unpriced(store, lo, hi)
        assert list(unpriced) == ["acme/acme-llm-70b-ft"]
        assert unpriced["acme/acme-llm-70b-ft"] > 0
        rows = {r.key: r for r in queries.cost_by(store, lo, hi)}
        assert rows["acme-llm-70b-ft"].priced is False
        assert rows["acme-llm-70b-ft"].totals.cost == 0
        priced = [r for r in rows.values() if r.priced]
        assert len(priced) == len({s.model for s in SERIES}) - 1
        assert all(r.totals.cost > 0 for r in priced)
        t = queries.totals(store, lo, hi)
        assert t.cost_per_request == t.cost / (t.requests - t.unpriced_requests)


def gpu_intervals(store: Store, device: str) -> list[tuple[int, int]]:
    rows = store.query(
        "SELECT ts - interval_ms, ts FROM gpu WHERE device = ? ORDER BY ts", (device,)
    )
    return [(r[0], r[1]) for r in rows]


async def test_gpu_demo_intervals_never_overlap_across_restart(db_path: Path) -> None:
    clock = Clock(START)
    backfill = timedelta(hours=2)
    moments = [
        (START, False),
        (START + timedelta(seconds=5), False),
        (START + timedelta(seconds=5), False),  # frozen clock: nothing new
        (START + timedelta(minutes=3, seconds=7), True),  # restart
        (START + timedelta(minutes=3, seconds=9), False),
    ]
    store = Store(db_path)
    collector = DemoGpuCollector(GpuCostModel(), clock=clock)
    runner = Runner(store, [collector], PriceBook(), clock=clock, backfill=backfill)
    for now, restart in moments:
        clock.now = now
        if restart:
            store.close()
            store = Store(db_path)
            collector = DemoGpuCollector(GpuCostModel(), clock=clock)
            runner = Runner(store, [collector], PriceBook(), clock=clock, backfill=backfill)
        assert await runner.poll(collector) is True
    try:
        for gpu in DEMO_GPUS:
            intervals = gpu_intervals(store, gpu.device)
            assert intervals[0][0] == to_epoch(START - backfill) * 1000
            assert intervals[-1][1] == to_epoch(moments[-1][0]) * 1000
            for (_, prev_end), (start, end) in itertools.pairwise(intervals):
                assert start == prev_end  # contiguous: no overlap, no gap
                assert end > start
        inference = store.query("SELECT SUM(interval_ms) FROM inference")[0][0]
        assert inference == (2 * 3600 + 3 * 60 + 9) * 1000
        ov = queries.gpu_overview(store, START - backfill, moments[-1][0] + timedelta(seconds=1))
        assert ov.inferences > 0
        assert ov.cost_per_inference is not None and ov.cost_per_inference > 0
        assert all("estimated" in d.cost_ref for d in ov.devices)  # default H100 rate
    finally:
        store.close()


async def test_gpu_demo_is_deterministic() -> None:
    a = await DemoGpuCollector(GpuCostModel()).poll(ctx(START))
    b = await DemoGpuCollector(GpuCostModel()).poll(ctx(START))
    assert a == b
    assert len(a.gpu) == len(DEMO_GPUS) * 24 * 60  # one sample per GPU and minute of the day


async def test_openai_series_have_no_cache_writes_and_settled_days_get_a_bill() -> None:
    book = PriceBook()
    batch = await DemoCollector(book=book).poll(ctx(START))
    assert not [
        b for b in batch.usage if b.provider == "openai" and b.cache_write_5m + b.cache_write_1h
    ]
    day = START.replace(hour=0, minute=0, second=0) - timedelta(days=1)
    assert {(b.provider, b.day) for b in batch.billed} == {("openai", day), ("anthropic", day)}
    assert batch.billed_days == (("demo", day, day + timedelta(days=1)),)
    # Within a few percent of the day's list price, as a real bill would be.
    estimate = {
        p: sum(
            (
                book.quote(b.provider, b.model, _tokens(b), b.start).cost or 0
                for b in batch.usage
                if b.provider == p and day <= b.start < day + timedelta(days=1)
            ),
            start=Decimal(0),
        )
        for p in ("openai", "anthropic")
    }
    for bill in batch.billed:
        ratio = Decimal(bill.amount_nano) / 10**9 / estimate[bill.provider]
        assert Decimal("0.97") <= ratio <= Decimal("1.03")
    # The next poll, the same day: nothing new is billed.
    later = await DemoCollector(book=book).poll(ctx(START + timedelta(minutes=1), START))
    assert later.billed == () and later.billed_days == ()


def _tokens(b: Any) -> TokenCounts:
    return TokenCounts(
        b.input_uncached, b.cache_read, b.cache_write_5m, b.cache_write_1h, b.output, b.web_searches
    )
