"""Every figure says what it covers: $/request over the same rows, billed vs estimated over the
same settled days, complete data for freshness, a spike only with history and money."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from tests.helpers import T0, at, bucket, nano
from tokentop.store import queries
from tokentop.store.db import Store
from tokentop.store.records import Batch, BilledCost
from tokentop.store.report import build_report, render

PRICES = {"source": "test", "version": "0", "online_updates": False, "overrides": []}


def _burst(store: Store, now: datetime, history_min: int, base: str, burst: str) -> None:
    """``history_min`` minutes at ``base`` $/min, the last 5 of them at ``burst`` $/min."""
    store.write_usage(
        [
            bucket(now - timedelta(minutes=m), cost=burst if m <= 5 else base)
            for m in range(1, history_min + 1)
        ]
    )


def test_no_spike_without_an_hour_of_history(db_path: Path) -> None:
    with Store(db_path) as store:
        _burst(store, T0, 90, "0.1", "5")  # 90 min: less than 60 + an hour before it
        assert not queries.spend_summary(store, T0).spike


def test_no_spike_below_the_floor(db_path: Path) -> None:
    with Store(db_path) as store:
        _burst(store, T0, 180, "0.0001", "0.01")  # x100, but $0.60/h
        s = queries.spend_summary(store, T0)
        assert s.burn_per_hour[5] == Decimal("0.6") and not s.spike
        assert queries.spend_summary(store, T0, spike_floor=Decimal("0.5")).spike


def test_a_spike_with_history_and_money(db_path: Path) -> None:
    with Store(db_path) as store:
        _burst(store, T0, 180, "0.1", "5")
        assert queries.spend_summary(store, T0).spike


def test_billed_vs_estimated_compares_settled_days_only(db_path: Path) -> None:
    day1 = datetime(2025, 3, 14, tzinfo=UTC)
    with Store(db_path) as store:
        store.write_usage(
            [
                bucket(day1 + timedelta(hours=3), cost="10"),
                bucket(T0, cost="7"),  # 2025-03-15: not billed yet
            ]
        )
        store.write_batch(Batch(billed=(BilledCost("costs", "openai", day1, nano("10.5")),)))
        report = build_report(store, day1, T0 + timedelta(hours=1), T0 + timedelta(hours=1), PRICES)
    (p,) = report["by_provider"]
    assert (p["days"], p["estimated_usd"], p["billed_usd"], p["gap_usd"]) == (1, 10.0, 10.5, 0.5)
    assert report["not_billed_yet"] == [
        {"provider": "openai", "day": "2025-03-15", "estimated_usd": 7.0}
    ]
    assert report["total_usd"] == 17.0
    md = render({**report, "prices": {**PRICES, "refs": []}}, "md")
    assert "Not billed yet (left out of both sides): openai 2025-03-15" in md


def test_cost_per_request_says_what_it_leaves_out(db_path: Path) -> None:
    with Store(db_path) as store:
        store.write_usage(
            [
                bucket(at(1), cost="1", requests=4),
                bucket(at(2), provider="acme", model="x", cost=None, requests=6),
            ]
        )
        report = build_report(store, T0, at(60), at(60), PRICES)
    assert report["cost_per_request_usd"] == 0.25
    assert report["cost_per_request_excludes_unpriced_requests"] == 6
    md = render({**report, "prices": {**PRICES, "refs": []}}, "md")
    assert "$0.250000 (excl. 6 unpriced requests)" in md


def test_freshness_is_the_newest_complete_minute(db_path: Path) -> None:
    with Store(db_path) as store:
        store.write_usage([bucket(at(0), cost="1"), bucket(at(1), cost="1")])
        # 30 s into the minute at(1): that minute is still open.
        now = at(1) + timedelta(seconds=30)
        assert queries.newest_complete_usage(store, now) == at(1)
        report = build_report(store, T0, now, now, PRICES)
    assert report["freshness"]["usage_age_s"] == 30.0
