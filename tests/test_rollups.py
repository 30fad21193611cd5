"""Every rollup equals a recomputation from the buckets, whatever was written and compacted.

A seeded generator runs 1,200 random operations (12 seeds x 100, tens of thousands of buckets):
new buckets (one source or several; one-minute, hourly and daily widths; priced and unpriced),
re-polls of the same batch, revised windows that replace what they re-read, batches that repeat
a key, metered requests, and compaction at a moving "now" (so later writes also land behind the
retention horizon). After each one, every rollup must equal an independent recomputation from
``usage`` (:func:`tests.rollup_check.rollup_mismatches`), and compaction must leave the totals of
a window that starts before the history alone. The queries served by the rollups summed over
series must give what plain SQL over the buckets gives.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import T0, USAGE_FLAT, bucket, fine_totals
from tests.rollup_check import rollup_mismatches
from tokentop.store import queries
from tokentop.store.db import Store
from tokentop.store.records import (
    Batch,
    MeteredRequest,
    SourceHealth,
    UsageBucket,
    UsageWindow,
    nano_to_usd,
    to_epoch,
)
from tokentop.store.retention import Retention, compact_step

BASE = T0 - timedelta(days=3)
"""Where the generated history starts (three days before the fixed ``T0``)."""
SPAN_MIN = 5 * 24 * 60
"""Minutes the history covers."""


def _bucket(rng: random.Random, start: datetime | None = None, source: str = "") -> UsageBucket:
    priced = rng.random() < 0.8
    width = rng.choices((60, 3600, 86400), weights=(90, 7, 3))[0]
    if start is None:
        start = BASE + timedelta(minutes=rng.randrange(SPAN_MIN))
    start = datetime.fromtimestamp(to_epoch(start) // width * width, start.tzinfo)
    return bucket(
        start,
        source=source or rng.choice(("s1", "s2", "s3")),
        provider=rng.choice(("openai", "anthropic")),
        model=rng.choice(("m1", "m2", "m3", "m4")),
        project=rng.choice(("", "p1", "p2")),
        api_key=rng.choice(("", "k1", "k2", "k3")),
        tag=rng.choice(("", "prod", "dev")),
        width_s=width,
        cost=Decimal(rng.randrange(0, 10**7)) / 10**5 if priced else None,
        requests=rng.randrange(0, 50),
        input_uncached=rng.randrange(0, 10**5),
        cache_read=rng.randrange(0, 10**4),
        cache_write_5m=rng.randrange(0, 10**3),
        cache_write_1h=rng.randrange(0, 10**3),
        output=rng.randrange(0, 10**4),
        web_searches=rng.randrange(0, 3),
    )


def _operation(rng: random.Random, store: Store, now: datetime, last: list[Batch]) -> str:
    """Apply one random operation; returns its name (for the failure message)."""
    kind = rng.choices(
        ("append", "repoll", "revise", "duplicate", "meter", "compact"),
        weights=(30, 10, 25, 10, 10, 15),
    )[0]
    if kind == "append":
        source = rng.choice(("", "s1"))  # one source (a poll) or several
        batch = Batch(usage=tuple(_bucket(rng, source=source) for _ in range(rng.randrange(1, 60))))
    elif kind == "repoll" and last:
        batch = last[-1]
    elif kind in ("revise", "repoll"):
        source = rng.choice(("s1", "s2", "s3"))
        lo = BASE + timedelta(minutes=rng.randrange(SPAN_MIN))
        hi = lo + timedelta(minutes=rng.randrange(1, 600))
        inside = [
            _bucket(
                rng, lo + timedelta(minutes=rng.randrange(int((hi - lo).total_seconds()) // 60))
            )
            for _ in range(rng.randrange(0, 30))
        ]
        usage = tuple(
            UsageBucket(**{**_fields(b), "source": source, "width_s": 60})
            for b in inside
            if b.width_s == 60
        )
        batch = Batch(usage=usage, windows=(UsageWindow(source, 60, lo, hi),))
    elif kind == "duplicate":
        b = _bucket(rng)
        batch = Batch(usage=(b, UsageBucket(**{**_fields(b), "requests": b.requests + 7})))
    elif kind == "meter":
        at = BASE + timedelta(seconds=rng.randrange(SPAN_MIN * 60))
        batch = Batch(
            requests=tuple(
                MeteredRequest(
                    ts=at + timedelta(seconds=rng.randrange(300)),
                    provider=rng.choice(("openai", "mistral")),
                    model=rng.choice(("m1", "m2")),
                    request_id=f"r{rng.randrange(40)}",
                    output=rng.randrange(1, 500),
                    cost_nano=rng.randrange(10**6),
                    priced=rng.random() < 0.9,
                    tag=rng.choice(("", "t1")),
                )
                for _ in range(rng.randrange(1, 6))
            )
        )
    else:
        retention = Retention(minutes_days=rng.choice((1, 2)), hours_days=rng.choice((2, 3)))
        for _ in range(rng.randrange(1, 4)):
            if compact_step(store, now, retention, max_rows=rng.choice((50, 400, 5000))) is None:
                break
        return kind
    store.write_batch(batch)
    last.append(batch)
    return kind


def _fields(b: UsageBucket) -> dict[str, Any]:
    return {f: getattr(b, f) for f in UsageBucket.__slots__}


def _whole(store: Store) -> tuple[int, int, int, Decimal]:
    t = queries.totals(store, BASE - timedelta(days=2), BASE + timedelta(days=9), scope="all")
    return t.requests, t.input_total, t.output, t.cost


@pytest.mark.parametrize("seed", range(12))
def test_rollups_equal_the_buckets_after_random_writes_and_compaction(
    db_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    last: list[Batch] = []
    with Store(db_path) as store:
        store.record_health(SourceHealth("meter", "meter", "ok"), now=T0)
        now = BASE + timedelta(days=2)
        for i in range(100):  # 12 seeds x 100 operations, each one checked
            now += timedelta(minutes=rng.randrange(0, 90))
            before = _whole(store)
            kind = _operation(rng, store, now, last)
            assert rollup_mismatches(store) == {}, (seed, i, kind)
            if kind == "compact":
                assert _whole(store) == before, (seed, i)
        assert store.query("SELECT COUNT(*) FROM usage")[0][0] > 0


def _independent(store: Store, lo: datetime, hi: datetime, key: str) -> dict[str, tuple[Any, ...]]:
    """Per group, the sums a grouped table shows, straight from the buckets (counted scope:
    no meter source here)."""
    rows = store.query(
        f"SELECT {key}, SUM(cost_nano), SUM(requests),"
        " SUM(input_uncached + cache_read + cache_write_5m + cache_write_1h), SUM(output),"
        " MIN(priced) FROM " + USAGE_FLAT + " WHERE start >= ? AND start < ? GROUP BY 1",
        (to_epoch(lo), to_epoch(hi)),
    )
    return {r[0]: (nano_to_usd(r[1]), r[2], r[3], r[4]) for r in rows}


@pytest.mark.parametrize("seed", range(6))
def test_queries_from_summed_rollups_equal_sql_over_the_buckets(db_path: Path, seed: int) -> None:
    rng = random.Random(100 + seed)
    with Store(db_path) as store:
        for _ in range(30):
            batch = Batch(usage=tuple(_bucket(rng) for _ in range(rng.randrange(1, 80))))
            store.write_batch(batch)
        for _ in range(40):
            lo = BASE + timedelta(seconds=rng.randrange(SPAN_MIN * 60))
            hi = lo + timedelta(seconds=rng.choice((900, 3600, 5 * 3600, 86400, 3 * 86400)))
            hi += timedelta(seconds=rng.randrange(3600))
            assert queries.totals(store, lo, hi) == fine_totals(store, lo, hi)
            for group in queries.GROUPS:
                column = "provider || '/' || model" if group == "model" else group
                expected = _independent(store, lo, hi, column)
                rows = queries.cost_by(store, lo, hi, group)
                got = {
                    (f"{r.provider}/{r.key}" if group == "model" else r.key): (
                        r.totals.cost,
                        r.totals.requests,
                        r.totals.input_total,
                        r.totals.output,
                    )
                    for r in rows
                }
                assert got == expected, (group, lo, hi)
            series = queries.spend_series(store, lo, hi, queries.series_step(lo, hi))
            assert (
                sum(v for _, v in series)
                == fine_totals(
                    store,
                    datetime.fromtimestamp(
                        to_epoch(lo) // queries.series_step(lo, hi) * queries.series_step(lo, hi),
                        lo.tzinfo,
                    ),
                    hi,
                ).cost
            )


def test_top_groups_and_others_add_up(db_path: Path) -> None:
    rng = random.Random(7)
    with Store(db_path) as store:
        for _ in range(20):
            store.write_batch(Batch(usage=tuple(_bucket(rng) for _ in range(60))))
        lo, hi = BASE + timedelta(hours=30), BASE + timedelta(hours=80)
        for group in queries.GROUPS:
            full = queries.cost_by(store, lo, hi, group)
            top = queries.cost_by(store, lo, hi, group, limit=1)
            assert len(full) > 2
            assert top[:1] == full[:1]
            others = top[1]
            assert others.key == queries.OTHERS and others.others == len(full) - 1
            assert others.totals.cost == sum((r.totals.cost for r in full[1:]), Decimal(0))
            assert others.totals.requests == sum(r.totals.requests for r in full[1:])
            before = queries.totals(store, lo - (hi - lo), lo)
            assert others.previous.cost == before.cost - top[0].previous.cost
            assert queries.cost_by(store, lo, hi, group, limit=len(full)) == full
        mix = queries.model_mix(store, lo, hi)
        top_mix = queries.model_mix(store, lo, hi, limit=3)
        assert top_mix[:3] == mix[:3] and top_mix[3].model == queries.OTHERS
        assert sum(m.cost for m in top_mix) == sum(m.cost for m in mix)
        assert abs(sum(m.cost_share for m in top_mix) - 1.0) < 1e-9
