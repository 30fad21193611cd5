"""The SQLite store: WAL, idempotent bucket replacement, rollups, health, watermarks, atomicity."""

from __future__ import annotations

import dataclasses
import random
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from tests.helpers import (
    T0,
    USAGE_FLAT,
    at,
    bucket,
    fine_totals,
    nano,
    usage_day_expected,
    usage_day_rows,
    usage_hour_expected,
    usage_hour_rows,
)
from tokentop.store import queries
from tokentop.store.db import SERIES_COLUMNS, Store, StoreError
from tokentop.store.records import (
    Batch,
    BilledCost,
    GpuSample,
    InferenceSample,
    MeteredRequest,
    SourceHealth,
    UsageBucket,
    UsageWindow,
    from_epoch,
    nano_to_usd,
    to_epoch,
    usd_to_nano,
)


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store(db_path)
    yield s
    s.close()


def test_money_and_time_conversions_are_exact() -> None:
    from decimal import Decimal

    assert usd_to_nano(Decimal("0.008")) == 8_000_000
    assert usd_to_nano(Decimal("0.0000000005")) == 0  # half to even
    assert usd_to_nano(Decimal("0.0000000015")) == 2
    assert nano_to_usd(8_000_000) == Decimal("0.008")
    assert from_epoch(to_epoch(T0)) == T0
    with pytest.raises(ValueError, match="naive"):
        to_epoch(datetime(2025, 1, 1))  # noqa: DTZ001


def test_wal_mode_and_schema(store: Store) -> None:
    assert store.query("PRAGMA journal_mode")[0][0] == "wal"
    assert store.get_meta("schema_version") == "3"
    tables = {r[0] for r in store.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"series", "usage", "usage_hour", "usage_day", "billed", "gpu", "gpu_hour"} <= tables
    assert "inference" in tables
    assert {"inference_hour", "request", "source", "source_calls", "meta"} <= tables


def test_schema_shape_and_connection_settings(store: Store) -> None:
    # sqlite-utils makes the rowid tables; every other table stays clustered on its key.
    rows = store.query("SELECT name, sql FROM sqlite_master WHERE type = 'table'")
    rowid = {r["name"] for r in rows if not r["sql"].rstrip().endswith("WITHOUT ROWID")}
    assert rowid == {"meta", "series", "source", "origin", "stream", "price"}
    (unique,) = [r for r in store.query("PRAGMA index_list(series)") if r["unique"]]
    columns = [r["name"] for r in store.query(f"PRAGMA index_info('{unique['name']}')")]
    assert tuple(columns) == SERIES_COLUMNS
    # Wrapping the connection in sqlite-utils left it as the store set it up.
    assert store.conn.isolation_level is None and not store.conn.in_transaction
    assert store.conn.row_factory is None
    assert store.query("PRAGMA recursive_triggers")[0][0] == 0


def test_same_batch_written_many_times_leaves_totals_unchanged(store: Store) -> None:
    batch = Batch(
        usage=(
            bucket(at(0), cost="0.50", requests=5, input_uncached=100, output=10),
            bucket(at(1), cost="0.25", requests=2, model="gpt-4o-mini", project="p"),
            bucket(at(61), cost=None, requests=3, model="mystery", output=7),
        ),
        windows=(UsageWindow("src", 60, at(0), at(62)),),
    )
    store.write_batch(batch)
    once = queries.totals(store, at(-600), at(600))
    for _ in range(4):
        store.write_batch(batch)
    again = queries.totals(store, at(-600), at(600))
    assert again == once
    assert once.cost == nano_to_usd(nano("0.75"))
    assert once.requests == 10
    assert once.unpriced_requests == 3
    assert once.unpriced_tokens == 7
    assert store.query("SELECT COUNT(*) FROM usage")[0][0] == 3
    assert usage_hour_rows(store) == usage_hour_expected(store)
    assert usage_day_rows(store) == usage_day_expected(store)


def test_growing_open_bucket_is_replaced_not_added(store: Store) -> None:
    for requests, cost in ((1, "0.01"), (4, "0.04"), (9, "0.09")):
        store.write_usage([bucket(at(5), cost=cost, requests=requests)])
    t = queries.totals(store, at(0), at(60))
    assert t.requests == 9
    assert t.cost == nano_to_usd(nano("0.09"))
    assert store.query("SELECT SUM(requests) FROM usage_hour")[0][0] == 9


def test_every_dimension_is_part_of_the_key(store: Store) -> None:
    base = bucket(at(0), cost="1", requests=1)
    variants = [
        base,
        *(
            dataclasses.replace(base, **cast(dict[str, Any], {dim: "x"}))
            for dim in (
                "project",
                "api_key",
                "workspace",
                "tag",
                "service_tier",
                "batch",
                "context_window",
            )
        ),
        bucket(at(0), cost="1", requests=1, width_s=3600),
        bucket(at(0), cost="1", requests=1, model="other"),
        bucket(at(0), cost="1", requests=1, source="other"),
    ]
    store.write_usage(variants)
    assert queries.totals(store, at(0), at(1)).requests == len(variants)


def test_revised_window_drops_a_group_that_disappeared(store: Store) -> None:
    first = Batch(
        usage=(
            bucket(at(0), cost="1", requests=1, project="a"),
            bucket(at(0), cost="2", requests=2, project="b"),
            bucket(at(1), cost="4", requests=4, project="b"),
        ),
        windows=(UsageWindow("src", 60, at(0), at(2)),),
    )
    store.write_batch(first)
    revised = Batch(
        usage=(bucket(at(0), cost="3", requests=3, project="a"),),
        windows=(UsageWindow("src", 60, at(0), at(2)),),
    )
    store.write_batch(revised)
    rows = store.query(f"SELECT project, requests FROM {USAGE_FLAT} ORDER BY start, project")
    assert [tuple(r) for r in rows] == [("a", 3)]
    assert queries.totals(store, at(-300), at(300)).cost == 3
    assert usage_hour_rows(store) == usage_hour_expected(store)
    assert usage_day_rows(store) == usage_day_expected(store)


def test_window_replaces_only_its_source_width_and_span(store: Store) -> None:
    store.write_usage(
        [
            bucket(at(0), cost="1"),
            bucket(at(0), cost="1", source="other"),
            bucket(at(0), cost="1", width_s=3600),
            bucket(at(10), cost="1"),  # outside the window below (end is exclusive)
            bucket(at(-1), cost="1"),
        ]
    )
    store.write_batch(Batch(windows=(UsageWindow("src", 60, at(0), at(10)),)))
    rows = store.query(
        f"SELECT start, source, width FROM {USAGE_FLAT} ORDER BY start, source, width"
    )
    assert [tuple(r) for r in rows] == [
        (to_epoch(at(-1)), "src", 60),
        (to_epoch(at(0)), "other", 60),
        (to_epoch(at(0)), "src", 3600),
        (to_epoch(at(10)), "src", 60),
    ]
    assert usage_hour_rows(store) == usage_hour_expected(store)
    assert usage_day_rows(store) == usage_day_expected(store)


def _random_bucket(rng: random.Random, base: datetime) -> UsageBucket:
    minute = rng.randrange(-90, 8 * 60)
    priced = rng.random() < 0.8
    return bucket(
        base + timedelta(minutes=minute),
        source=rng.choice(("s1", "s2")),
        provider=rng.choice(("openai", "anthropic")),
        model=rng.choice(("m1", "m2", "m3")),
        project=rng.choice(("", "p1", "p2")),
        tag=rng.choice(("", "prod")),
        cost=rng.randrange(0, 10**7) if priced else None,
        requests=rng.randrange(0, 50),
        input_uncached=rng.randrange(0, 10**5),
        cache_read=rng.randrange(0, 10**4),
        cache_write_5m=rng.randrange(0, 10**3),
        cache_write_1h=rng.randrange(0, 10**3),
        output=rng.randrange(0, 10**4),
        web_searches=rng.randrange(0, 3),
    )


@pytest.mark.parametrize("seed", range(12))
def test_rollup_matches_fine_table_after_random_rewrites(db_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    base = T0 + timedelta(seconds=rng.randrange(0, 3600))
    with Store(db_path) as store:
        for _ in range(8):
            usage = tuple(_random_bucket(rng, base) for _ in range(rng.randrange(0, 40)))
            windows: tuple[UsageWindow, ...] = ()
            if rng.random() < 0.6:
                lo = base + timedelta(minutes=rng.randrange(-90, 8 * 60))
                hi = lo + timedelta(minutes=rng.randrange(1, 240))
                source = rng.choice(("s1", "s2"))
                windows = (UsageWindow(source, 60, lo, hi),)
                # A poll only returns buckets inside the window it re-read.
                usage = tuple(
                    b
                    for b in usage
                    if b.source != source or lo <= b.start < hi or rng.random() < 0.5
                )
            batch = Batch(usage=usage, windows=windows)
            for _ in range(rng.randrange(1, 3)):
                store.write_batch(batch)
            assert usage_hour_rows(store) == usage_hour_expected(store)
            assert usage_day_rows(store) == usage_day_expected(store)
            for _ in range(6):
                lo = base + timedelta(seconds=rng.randrange(-2 * 3600, 9 * 3600))
                hi = lo + timedelta(seconds=rng.randrange(0, 10 * 3600))
                assert queries.totals(store, lo, hi) == fine_totals(store, lo, hi), (lo, hi)
        # Whole-range windows take the rollup path for most hours.
        lo, hi = base - timedelta(hours=3), base + timedelta(hours=10)
        assert queries.totals(store, lo, hi) == fine_totals(store, lo, hi)


def test_rebuild_rollups_equals_incremental_rollups(store: Store) -> None:
    rng = random.Random(99)
    store.write_usage([_random_bucket(rng, T0) for _ in range(200)])
    incremental = usage_hour_rows(store), usage_day_rows(store)
    store.rebuild_rollups()
    assert usage_hour_rows(store) == incremental[0] == usage_hour_expected(store)
    assert usage_day_rows(store) == incremental[1] == usage_day_expected(store)


def test_billed_days_replace_their_days_of_one_source(store: Store) -> None:
    d1, d2, d3 = (datetime(2025, 3, d, tzinfo=T0.tzinfo) for d in (1, 2, 3))
    store.write_batch(
        Batch(
            billed=(
                BilledCost("oa", "openai", d1, nano("5"), project="p1"),
                BilledCost("oa", "openai", d1, nano("6"), project="p2"),
                BilledCost("oa", "openai", d2, nano("7"), project="p1"),
                BilledCost("oa", "openai", d3, nano("8"), project="p1"),
                BilledCost("an", "anthropic", d1, nano("9")),
            )
        )
    )
    store.write_batch(
        Batch(
            billed=(BilledCost("oa", "openai", d1, nano("5.5"), project="p1"),),
            billed_days=(("oa", d1, d3),),
        )
    )
    rows = store.query("SELECT day, source, project, amount_nano FROM billed ORDER BY day, source")
    assert [tuple(r) for r in rows] == [
        (to_epoch(d1), "an", "", nano("9")),
        (to_epoch(d1), "oa", "p1", nano("5.5")),
        (to_epoch(d3), "oa", "p1", nano("8")),
    ]


def _gpu(ts: datetime, device: str = "GPU-0", cost: str = "0.01", idle: str = "0") -> GpuSample:
    return GpuSample(
        source="gpu",
        device=device,
        ts=ts,
        interval_s=60.0,
        name="NVIDIA H100",
        util_pct=50.0,
        power_mw=300_000,
        cost_nano=nano(cost),
        idle_cost_nano=nano(idle),
    )


def _inf(ts: datetime, requests: int = 10) -> InferenceSample:
    return InferenceSample(
        source="vllm",
        endpoint="http://127.0.0.1:8000/metrics",
        ts=ts,
        interval_s=60.0,
        kind="vllm",
        requests=requests,
        prompt_tokens=requests * 100,
        generation_tokens=requests * 20,
        devices=("GPU-0",),
    )


def test_gpu_and_inference_writes_and_rollups(store: Store) -> None:
    times = [at(m) for m in range(1, 5 * 60 + 1)]  # 300 one-minute samples over five hours
    batch = Batch(
        gpu=tuple(_gpu(t, idle="0.01" if i % 3 == 0 else "0") for i, t in enumerate(times)),
        inference=tuple(_inf(t) for t in times),
    )
    store.write_batch(batch)
    store.write_batch(batch)  # idempotent
    assert store.query("SELECT COUNT(*) FROM gpu")[0][0] == 300
    assert store.query("SELECT COUNT(*) FROM inference")[0][0] == 300
    gpu_hour = store.query(
        "SELECT start, SUM(interval_ms), SUM(cost_nano) FROM gpu_hour GROUP BY start"
    )
    expected = store.query(
        "SELECT (ts / 3600000) * 3600 AS h, SUM(interval_ms), SUM(cost_nano) FROM gpu GROUP BY h"
    )
    assert [tuple(r) for r in gpu_hour] == [tuple(r) for r in expected]
    inf_hour = store.query("SELECT SUM(requests), SUM(prompt_tokens) FROM inference_hour")[0]
    assert tuple(inf_hour) == (3000, 300_000)
    # Over a window long enough to use the rollups, the overview matches the samples.
    overview = queries.gpu_overview(store, at(0), at(5 * 60 + 1))
    assert overview.cost == nano_to_usd(nano("3"))
    assert overview.idle_cost == nano_to_usd(nano("1"))
    assert overview.inferences == 3000
    assert overview.prompt_tokens == 300_000
    assert overview.generation_tokens == 60_000
    [device] = overview.devices
    assert device.seconds == 300 * 60
    # A rewritten sample replaces the old one, and its hour is recomputed.
    store.write_batch(Batch(gpu=(_gpu(times[0], cost="1.01"),)))
    overview = queries.gpu_overview(store, at(0), at(5 * 60 + 1))
    assert overview.cost == nano_to_usd(nano("4"))


def test_metered_requests_are_upserted_by_id_and_roll_into_usage(store: Store) -> None:
    r = MeteredRequest(
        ts=at(0.5),
        provider="openai",
        model="gpt-4o",
        request_id="req-1",
        output=5,
        cost_nano=nano("0.001"),
        priced=True,
        tag="feature-x",
    )
    store.write_batch(Batch(requests=(r, r)))
    store.write_batch(Batch(requests=(r,)))
    assert tuple(store.query("SELECT COUNT(*), SUM(output) FROM request")[0]) == (1, 5)
    other = MeteredRequest(
        ts=at(0.75),
        provider="openai",
        model="gpt-4o",
        request_id="req-2",
        output=7,
        cost_nano=nano("0.002"),
        priced=True,
        tag="feature-x",
    )
    store.write_batch(Batch(requests=(other,)))
    rows = store.query(
        f"SELECT start, source, width, tag, requests, output, cost_nano FROM {USAGE_FLAT}"
    )
    assert [tuple(x) for x in rows] == [
        (to_epoch(at(0)), "meter", 60, "feature-x", 2, 12, nano("0.003"))
    ]
    t = queries.totals(store, at(0), at(1))
    assert (t.requests, t.output, t.cost) == (2, 12, nano_to_usd(nano("0.003")))
    assert usage_hour_rows(store) == usage_hour_expected(store)
    assert usage_day_rows(store) == usage_day_expected(store)


def test_metered_minutes_added_to_match_summing_them_whole(store: Store) -> None:
    """New requests add to their minutes' buckets; rewritten ones make the minutes be summed
    again. Either way the buckets are what summing every request of the minute gives."""
    rng = random.Random(7)
    written: list[MeteredRequest] = []
    for n in range(30):
        batch = []
        for i in range(rng.randint(1, 12)):
            if written and rng.random() < 0.05:  # the same id again, with other figures
                batch.append(dataclasses.replace(rng.choice(written), output=rng.randint(0, 9)))
                continue
            priced = rng.random() < 0.8
            batch.append(
                MeteredRequest(
                    ts=at(rng.uniform(0, 4)),
                    provider=rng.choice(("openai", "anthropic")),
                    model=rng.choice(("gpt-4o", "claude")),
                    request_id=f"req-{n}-{i}",
                    input_uncached=rng.randint(0, 99),
                    cache_read=rng.randint(0, 9),
                    output=rng.randint(0, 99),
                    web_searches=rng.randint(0, 2),
                    cost_nano=rng.randint(0, 10**6) if priced else 0,
                    priced=priced,
                    price_ref=rng.choice(("genai-prices a", "genai-prices b")) if priced else "",
                    tag=rng.choice(("", "x")),
                )
            )
        store.write_batch(Batch(requests=tuple(batch)))
        written += batch
    rows = store.query(
        f"SELECT start, provider, model, tag, input_uncached, cache_read, output, requests,"
        f" web_searches, cost_nano, priced, price_ref FROM {USAGE_FLAT}"
        " WHERE source = 'meter' AND width = 60"
    )
    summed = store.query(
        "SELECT (ts / 60000) * 60, provider, model, tag, SUM(input_uncached), SUM(cache_read),"
        " SUM(output), COUNT(*), SUM(web_searches), SUM(cost_nano), MIN(priced), MAX(price_ref)"
        " FROM request GROUP BY 1, 2, 3, 4"
    )
    assert sorted(tuple(r) for r in rows) == sorted(tuple(r) for r in summed)
    assert usage_hour_rows(store) == usage_hour_expected(store)
    assert usage_day_rows(store) == usage_day_expected(store)


def test_source_health_upsert_keeps_last_success_and_counts_calls(store: Store) -> None:
    ok = SourceHealth(
        name="oa",
        kind="openai",
        state="ok",
        last_success=at(0),
        lag_s=12.5,
        watermark=at(-1),
        newest_data=at(-1),
    )
    store.record_health(ok, calls_delta=3, now=at(0))
    failed = SourceHealth(
        name="oa",
        kind="openai",
        state="error",
        last_error="HTTP 500: server error",
        last_error_at=at(10),
    )
    store.record_health(failed, calls_delta=2, now=at(10))
    [h] = queries.sources(store, at(10))
    assert h.state == "error"
    assert h.last_success == at(0)
    assert h.last_error == "HTTP 500: server error"
    assert h.last_error_at == at(10)
    assert h.watermark == at(-1)
    assert h.newest_data == at(-1)
    assert h.calls == 5
    assert h.calls_last_hour == 5
    # An hour and a half later the calls have aged out of the hourly count, not the total.
    store.record_health(failed, calls_delta=1, now=at(100))
    [h] = queries.sources(store, at(100))
    assert h.calls == 6
    assert h.calls_last_hour == 1
    # A success clears the error text but keeps when it last happened.
    store.record_health(ok, now=at(101))
    [h] = queries.sources(store, at(101))
    assert (h.state, h.last_error, h.last_error_at) == ("ok", "", at(10))


def test_watermark_survives_reopening_the_file(db_path: Path) -> None:
    with Store(db_path) as store:
        assert store.get_watermark("demo") is None
        store.record_health(SourceHealth("demo", "demo", watermark=at(3)), now=at(3))
        store.record_health(SourceHealth("demo", "demo"), now=at(4))  # no watermark: kept
    with Store(db_path) as store:
        assert store.get_watermark("demo") == at(3)
        assert store.get_watermark("other") is None


def test_reader_sees_committed_data_while_writer_is_open(db_path: Path) -> None:
    writer = Store(db_path)
    reader = Store(db_path, readonly=True)
    try:
        writer.write_usage([bucket(at(0), cost="1", requests=2)])
        assert queries.totals(reader, at(0), at(1)).requests == 2
        with writer.transaction() as conn:
            conn.execute("INSERT INTO meta(key, value) VALUES ('pending', 'x')")
            assert reader.get_meta("pending") is None  # not committed yet
        assert reader.get_meta("pending") == "x"
        writer.write_usage([bucket(at(0), cost="1", requests=7)])
        assert queries.totals(reader, at(0), at(1)).requests == 7
        with pytest.raises(sqlite3.OperationalError):
            reader.conn.execute("INSERT INTO meta(key, value) VALUES ('no', 'no')")
    finally:
        reader.close()
        writer.close()


def test_reader_opens_a_path_with_uri_characters(tmp_path: Path) -> None:
    path = tmp_path / "team #1?x" / "tokentop.db"
    with Store(path) as writer:
        writer.set_meta("hello", "world")
        with Store(path, readonly=True) as reader:
            assert reader.get_meta("hello") == "world"


def test_failing_batch_rolls_back_completely(store: Store) -> None:
    store.write_batch(
        Batch(
            usage=(bucket(at(0), cost="1", requests=1), bucket(at(1), cost="2", requests=2)),
            gpu=(_gpu(at(1)),),
        )
    )
    before_usage = [tuple(r) for r in store.query("SELECT * FROM usage ORDER BY start")]
    before_hour = usage_hour_rows(store), usage_day_rows(store)
    before_gpu = [tuple(r) for r in store.query("SELECT * FROM gpu")]
    naive = datetime(2025, 3, 15, 12, 3)  # noqa: DTZ001
    bad = Batch(
        usage=(bucket(at(2), cost="5", requests=5),),
        windows=(UsageWindow("src", 60, at(0), at(60)),),  # would delete both rows above
        billed=(BilledCost("src", "openai", at(0), nano("1")),),
        gpu=(_gpu(at(2)), _gpu(naive)),  # the second sample fails mid-write
    )
    with pytest.raises(ValueError, match="naive"):
        store.write_batch(bad)
    assert [tuple(r) for r in store.query("SELECT * FROM usage ORDER BY start")] == before_usage
    assert (usage_hour_rows(store), usage_day_rows(store)) == before_hour
    assert [tuple(r) for r in store.query("SELECT * FROM gpu")] == before_gpu
    assert store.query("SELECT COUNT(*) FROM billed")[0][0] == 0
    # The connection is usable afterwards.
    store.write_usage([bucket(at(2), cost="5", requests=5)])
    assert queries.totals(store, at(0), at(60)).requests == 8


def test_constraint_violation_rolls_back(store: Store) -> None:
    store.write_usage([bucket(at(0), cost="1", requests=1)])
    broken = UsageBucket(source="src", provider=None, model="m", start=at(1))  # type: ignore[arg-type]
    with pytest.raises(sqlite3.IntegrityError):
        store.write_batch(
            Batch(
                usage=(bucket(at(2), cost="1"), broken),
                windows=(UsageWindow("src", 60, at(0), at(5)),),
            )
        )
    assert store.query("SELECT COUNT(*) FROM usage")[0][0] == 1
    assert usage_hour_rows(store) == usage_hour_expected(store)
    assert usage_day_rows(store) == usage_day_expected(store)


def test_usage_day_rollup_serves_multi_day_windows(db_path: Path) -> None:
    rng = random.Random(7)
    base = T0.replace(hour=0) - timedelta(days=3)
    with Store(db_path) as store:
        for _ in range(6):
            usage = tuple(
                dataclasses.replace(
                    _random_bucket(rng, base),
                    start=base + timedelta(minutes=rng.randrange(0, 6 * 24 * 60)),
                )
                for _ in range(80)
            )
            lo = base + timedelta(minutes=rng.randrange(0, 6 * 24 * 60))
            windows = (UsageWindow("s1", 60, lo, lo + timedelta(hours=rng.randrange(1, 40))),)
            store.write_batch(Batch(usage=usage, windows=windows))
            assert usage_hour_rows(store) == usage_hour_expected(store)
            assert usage_day_rows(store) == usage_day_expected(store)
        for _ in range(20):
            lo = base + timedelta(seconds=rng.randrange(-DAY_S, 3 * DAY_S))
            hi = lo + timedelta(seconds=rng.randrange(DAY_S, 5 * DAY_S))
            assert queries.totals(store, lo, hi) == fine_totals(store, lo, hi), (lo, hi)
        # A daily chart step reads the daily rollup and matches the fine table day by day.
        series = queries.spend_series(store, base, base + timedelta(days=6), 86400)
        for day, cost in series:
            assert cost == fine_totals(store, day, day + timedelta(days=1)).cost


DAY_S = 86400


def test_series_are_stored_once_and_shared_between_writers(db_path: Path) -> None:
    with Store(db_path) as one, Store(db_path) as two:
        one.write_usage([bucket(at(0), cost="1", project="a")])
        two.write_usage(
            [bucket(at(1), cost="2", project="b"), bucket(at(2), cost="4", project="a")]
        )
        one.write_usage([bucket(at(3), cost="8", project="b")])
        series = one.query("SELECT id, project FROM series ORDER BY id")
        assert [tuple(r) for r in series] == [(1, "a"), (2, "b")]
        assert queries.totals(two, at(0), at(4)).cost == 15
        by_project = {r.key: r.totals.cost for r in queries.cost_by(one, at(0), at(4), "project")}
        assert by_project == {"a": 5, "b": 10}


def test_series_of_a_rolled_back_batch_is_not_remembered(store: Store) -> None:
    naive = datetime(2025, 3, 15, 12, 3)  # noqa: DTZ001
    with pytest.raises(ValueError, match="naive"):
        store.write_batch(
            Batch(usage=(bucket(at(0), cost="1", project="new"),), gpu=(_gpu(naive),))
        )
    assert store.query("SELECT COUNT(*) FROM series")[0][0] == 0
    store.write_usage([bucket(at(0), cost="1", project="new")])
    rows = store.query(f"SELECT project, cost_nano FROM {USAGE_FLAT}")
    assert [tuple(r) for r in rows] == [("new", nano("1"))]


# Version 1 of the schema: one wide usage table keyed on every dimension.
_V1_DIMS = "project, api_key, workspace, tag, service_tier, batch, context_window"
_V1_SUMS = (
    "input_uncached, cache_read, cache_write_5m, cache_write_1h, output, requests,"
    " web_searches, cost_nano"
)
_V1_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta(key, value) VALUES ('schema_version', '1');
CREATE TABLE usage (
    start INTEGER NOT NULL, source TEXT NOT NULL, width INTEGER NOT NULL,
    provider TEXT NOT NULL, model TEXT NOT NULL,
    project TEXT NOT NULL DEFAULT '', api_key TEXT NOT NULL DEFAULT '',
    workspace TEXT NOT NULL DEFAULT '', tag TEXT NOT NULL DEFAULT '',
    service_tier TEXT NOT NULL DEFAULT '', batch TEXT NOT NULL DEFAULT '',
    context_window TEXT NOT NULL DEFAULT '',
    input_uncached INTEGER NOT NULL DEFAULT 0, cache_read INTEGER NOT NULL DEFAULT 0,
    cache_write_5m INTEGER NOT NULL DEFAULT 0, cache_write_1h INTEGER NOT NULL DEFAULT 0,
    output INTEGER NOT NULL DEFAULT 0, requests INTEGER NOT NULL DEFAULT 0,
    web_searches INTEGER NOT NULL DEFAULT 0, cost_nano INTEGER NOT NULL DEFAULT 0,
    priced INTEGER NOT NULL, price_ref TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (start, source, width, provider, model, {_V1_DIMS})
) WITHOUT ROWID;
CREATE TABLE usage_hour (
    start INTEGER NOT NULL, source TEXT NOT NULL, provider TEXT NOT NULL, model TEXT NOT NULL,
    project TEXT NOT NULL DEFAULT '', api_key TEXT NOT NULL DEFAULT '',
    workspace TEXT NOT NULL DEFAULT '', tag TEXT NOT NULL DEFAULT '',
    service_tier TEXT NOT NULL DEFAULT '', batch TEXT NOT NULL DEFAULT '',
    context_window TEXT NOT NULL DEFAULT '', priced INTEGER NOT NULL,
    input_uncached INTEGER NOT NULL DEFAULT 0, cache_read INTEGER NOT NULL DEFAULT 0,
    cache_write_5m INTEGER NOT NULL DEFAULT 0, cache_write_1h INTEGER NOT NULL DEFAULT 0,
    output INTEGER NOT NULL DEFAULT 0, requests INTEGER NOT NULL DEFAULT 0,
    web_searches INTEGER NOT NULL DEFAULT 0, cost_nano INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (start, source, provider, model, {_V1_DIMS}, priced)
) WITHOUT ROWID;
CREATE TABLE billed (
    day INTEGER NOT NULL, source TEXT NOT NULL, provider TEXT NOT NULL,
    project TEXT NOT NULL DEFAULT '', line_item TEXT NOT NULL DEFAULT '',
    workspace TEXT NOT NULL DEFAULT '', amount_nano INTEGER NOT NULL,
    currency TEXT NOT NULL DEFAULT 'usd',
    PRIMARY KEY (day, source, project, line_item, workspace)
) WITHOUT ROWID;
"""
_V1_COLUMNS = f"start, source, width, provider, model, {_V1_DIMS}, {_V1_SUMS}, priced, price_ref"


def _v1_file(path: Path) -> list[tuple[Any, ...]]:
    """A version 1 database with a few days of varied usage; returns its usage rows."""
    rng = random.Random(5)
    base = T0 - timedelta(days=2)
    buckets = {}
    for _ in range(600):
        b = _random_bucket(rng, base + timedelta(days=rng.randrange(0, 4)))
        b = dataclasses.replace(
            b,
            width_s=rng.choice((60, 60, 60, 3600)),
            api_key=rng.choice(("", "key-1")),
            service_tier=rng.choice(("", "flex")),
            context_window=rng.choice(("", "long")),
        )
        buckets[(b.start, b.source, b.width_s, b.provider, b.model, b.project, b.tag)] = b
    rows = [
        (
            to_epoch(b.start),
            b.source,
            b.width_s,
            b.provider,
            b.model,
            b.project,
            b.api_key,
            b.workspace,
            b.tag,
            b.service_tier,
            b.batch,
            b.context_window,
            b.input_uncached,
            b.cache_read,
            b.cache_write_5m,
            b.cache_write_1h,
            b.output,
            b.requests,
            b.web_searches,
            b.cost_nano,
            int(b.priced),
            b.price_ref,
        )
        for b in buckets.values()
    ]
    conn = sqlite3.connect(path)
    conn.executescript(_V1_SCHEMA)
    conn.executemany(f"INSERT INTO usage ({_V1_COLUMNS}) VALUES ({', '.join('?' * 22)})", rows)
    keys = f"source, provider, model, {_V1_DIMS}, priced"
    sums = ", ".join(f"SUM({c})" for c in _V1_SUMS.split(", "))
    conn.execute(
        f"INSERT INTO usage_hour (start, {keys}, {_V1_SUMS}) SELECT (start / 3600) * 3600 AS h,"
        f" {keys}, {sums} FROM usage GROUP BY h, {keys}"
    )
    conn.execute(
        "INSERT INTO billed (day, source, provider, amount_nano) VALUES (?, 'oa', 'openai', 7)",
        (to_epoch(base),),
    )
    conn.commit()
    conn.close()
    return sorted(rows)


def test_version_1_file_is_migrated_by_a_writer_without_losing_anything(db_path: Path) -> None:
    rows = _v1_file(db_path)
    base = T0 - timedelta(days=2)
    windows = [(base - timedelta(hours=2), base + timedelta(days=5))] + [
        (base + timedelta(minutes=m), base + timedelta(minutes=m + length))
        for m, length in ((0, 90), (77, 600), (1000, 2 * 1440), (2000, 3 * 1440 + 7))
    ]
    # Totals as version 1 sums them (its fine table), before any migration.
    v1 = sqlite3.connect(db_path)
    shim = cast(
        Store, SimpleNamespace(query=lambda sql, params=(): v1.execute(sql, params).fetchall())
    )
    expected_totals = [fine_totals(shim, lo, hi) for lo, hi in windows]
    v1.close()
    with Store(db_path) as store:
        assert store.get_meta("schema_version") == "3"
        migrated = store.query(f"SELECT {_V1_COLUMNS} FROM {USAGE_FLAT}")
        assert sorted(tuple(r) for r in migrated) == rows
        assert store.query("SELECT COUNT(*) FROM usage")[0][0] == len(rows)
        assert usage_hour_rows(store) == usage_hour_expected(store)
        assert usage_day_rows(store) == usage_day_expected(store)
        assert [queries.totals(store, lo, hi) for lo, hi in windows] == expected_totals
        total = queries.totals(store, *windows[0])
        assert total.requests == sum(r[17] for r in rows)
        assert total.cost == nano_to_usd(sum(r[19] for r in rows if r[20]))
        assert store.query("SELECT SUM(amount_nano) FROM billed")[0][0] == 7
        tables = {r[0] for r in store.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "usage_v1" not in tables
    # Opening again changes nothing; the migrated series take new writes.
    with Store(db_path) as store:
        again = store.query(f"SELECT {_V1_COLUMNS} FROM {USAGE_FLAT}")
        assert sorted(tuple(r) for r in again) == rows
        before = store.query("SELECT COUNT(*) FROM series")[0][0]
        first = dict(zip(_V1_COLUMNS.split(", "), rows[0], strict=True))
        first["start"], first["width_s"] = from_epoch(first["start"]), first.pop("width")
        first["priced"] = bool(first["priced"])
        store.write_usage([dataclasses.replace(UsageBucket(**first), requests=10**6)])
        assert store.query("SELECT COUNT(*) FROM series")[0][0] == before
        assert store.query("SELECT COUNT(*) FROM usage")[0][0] == len(rows)
        replaced = queries.totals(store, *windows[0]).requests
        assert replaced == sum(r[17] for r in rows) - rows[0][17] + 10**6


def test_version_1_file_opened_read_only_says_how_to_upgrade(db_path: Path) -> None:
    _v1_file(db_path)
    with pytest.raises(StoreError, match="collect --once") as raised:
        Store(db_path, readonly=True)
    assert str(db_path) in str(raised.value) and "\n" not in str(raised.value)
    with Store(db_path) as writer:  # a writer upgrades it ...
        count = writer.query("SELECT COUNT(*) FROM usage")[0][0]
    with Store(db_path, readonly=True) as reader:  # ... and viewers read it
        assert reader.query("SELECT COUNT(*) FROM usage")[0][0] == count > 0


def test_a_newer_schema_is_refused(db_path: Path) -> None:
    with Store(db_path) as store:
        store.set_meta("schema_version", "99")
    for readonly in (False, True):
        with pytest.raises(StoreError, match="newer"):
            Store(db_path, readonly=readonly)
