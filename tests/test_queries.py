"""The pane queries: window splitting, spend summary, series, cost per query, mix, billed, GPU."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from tests.helpers import T0, at, bucket, fine_totals, nano
from tokentop.store import queries
from tokentop.store.db import HOUR, Store
from tokentop.store.queries import _parts
from tokentop.store.records import (
    Batch,
    BilledCost,
    GpuSample,
    InferenceSample,
    nano_to_usd,
    to_epoch,
)


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store(db_path)
    yield s
    s.close()


def usd(value: str) -> Decimal:
    return nano_to_usd(nano(value))


# _parts


H = HOUR


F, R, D = "fine", "hour", "day"
DAY = 24 * H


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [
        (0, 0, [(F, 0, 0)]),
        (10, 20, [(F, 10, 20)]),
        # Under three whole hours: the fine table only.
        (0, 3 * H - 1, [(F, 0, 3 * H - 1)]),
        (1, 4 * H - 1, [(F, 1, 4 * H - 1)]),  # whole hours 1..3: two only
        # Exactly three whole aligned hours: the rollup only.
        (0, 3 * H, [(R, 0, 3 * H)]),
        # Ragged both ends.
        (H - 1, 4 * H + 1, [(F, H - 1, H), (R, H, 4 * H), (F, 4 * H, 4 * H + 1)]),
        # Aligned start, ragged end; ragged start, aligned end.
        (0, 5 * H + 30, [(R, 0, 5 * H), (F, 5 * H, 5 * H + 30)]),
        (30, 4 * H, [(F, 30, H), (R, H, 4 * H)]),
        # A whole UTC day: the daily rollup; hours and minutes around it.
        (0, DAY, [(D, 0, DAY)]),
        (
            DAY - 90,
            3 * DAY + 2 * H + 5,
            [
                (F, DAY - 90, DAY),
                (D, DAY, 3 * DAY),
                (R, 3 * DAY, 3 * DAY + 2 * H),
                (F, 3 * DAY + 2 * H, 3 * DAY + 2 * H + 5),
            ],
        ),
        (
            DAY - 5 * H - 1,
            2 * DAY + 4 * H,
            [
                (F, DAY - 5 * H - 1, DAY - 5 * H),
                (R, DAY - 5 * H, DAY),
                (D, DAY, 2 * DAY),
                (R, 2 * DAY, 2 * DAY + 4 * H),
            ],
        ),
        # A day's worth of hours that is not one UTC day: hours only.
        (H, DAY + H, [(R, H, DAY + H)]),
    ],
)
def test_parts_splits_windows_at_whole_days_and_hours(
    lo: int, hi: int, expected: list[tuple[str, int, int]]
) -> None:
    assert _parts(lo, hi) == expected


def test_parts_without_days_or_rollups() -> None:
    assert _parts(30, 2 * DAY, days=False) == [(F, 30, H), (R, H, 2 * DAY)]
    assert _parts(30, 2 * DAY, rollup=False) == [(F, 30, 2 * DAY)]


def test_parts_pieces_tile_the_window() -> None:
    for lo in [*range(0, 2 * H, 997), *range(DAY - 2 * H, DAY + H, 1103)]:
        for hi in [*range(lo, lo + 7 * H, 1499), *range(lo + DAY - H, lo + 3 * DAY, 4099)]:
            pieces = _parts(lo, hi)
            assert pieces[0][1] == lo and pieces[-1][2] == hi
            for (_, _, a_hi), (_, b_lo, _) in itertools.pairwise(pieces):
                assert a_hi == b_lo
            for level, p_lo, p_hi in pieces:
                if level == R:
                    assert p_lo % H == 0 and p_hi % H == 0
                if level == D:
                    assert p_lo % DAY == 0 and p_hi % DAY == 0 and p_hi > p_lo
            if any(level != F for level, _, _ in pieces):
                assert hi // H * H - -(-lo // H) * H >= 3 * H


# spend_summary

NOW = datetime(2025, 3, 15, 12, 30, tzinfo=UTC)


@pytest.fixture
def spend(store: Store) -> Store:
    store.write_usage(
        [
            bucket(datetime(2025, 2, 28, 23, 59, tzinfo=UTC), cost="100"),  # last month
            bucket(datetime(2025, 3, 1, 0, 0, tzinfo=UTC), cost="10"),  # month only
            bucket(datetime(2025, 3, 14, 23, 59, tzinfo=UTC), cost="20"),  # yesterday
            bucket(datetime(2025, 3, 15, 0, 0, tzinfo=UTC), cost="1"),  # today
            bucket(datetime(2025, 3, 15, 11, 59, tzinfo=UTC), cost="2"),  # last 60 min
            bucket(datetime(2025, 3, 15, 12, 0, tzinfo=UTC), cost="4"),  # this hour
            bucket(datetime(2025, 3, 15, 12, 26, tzinfo=UTC), cost="8"),  # last 5 min
            bucket(datetime(2025, 3, 15, 12, 26, tzinfo=UTC), cost=None, model="mystery", output=9),
            bucket(datetime(2025, 3, 15, 12, 31, tzinfo=UTC), cost="1000"),  # after now
        ]
    )
    return store


def test_spend_summary_utc_boundaries_burn_and_projection(spend: Store) -> None:
    s = queries.spend_summary(spend, NOW, budget_daily=Decimal(50))
    assert s.hour == 12
    assert s.today == 15
    assert s.month == 45
    assert s.burn_per_hour == {5: Decimal(96), 15: Decimal(32), 60: Decimal(14)}
    assert s.projected_today == Decimal(15) + Decimal(14) * Decimal("11.5")
    elapsed = Decimal("348.5")  # 14 days 12.5 hours into March
    left = Decimal("395.5")  # to 1 April 00:00
    assert s.projected_month == Decimal(45) + Decimal(45) / elapsed * left
    assert s.spike is True
    assert s.requests_today == 5
    assert s.unpriced_tokens_today == 9
    assert s.runway_hours == 2.5
    assert s.budget_daily == 50


def test_spend_summary_takes_any_timezone_as_utc(spend: Store) -> None:
    local = NOW.astimezone(timezone(timedelta(hours=-7)))  # 05:30 local, same instant
    assert queries.spend_summary(spend, local) == queries.spend_summary(spend, NOW)


def test_spend_summary_without_data(store: Store) -> None:
    s = queries.spend_summary(store, NOW)
    assert (s.hour, s.today, s.month) == (Decimal(0), Decimal(0), Decimal(0))
    assert s.burn_per_hour == {5: 0, 15: 0, 60: 0}
    assert s.spike is False
    assert s.newest_data is None
    assert s.runway_hours is None


def test_no_spike_for_a_flat_burn(store: Store) -> None:
    store.write_usage([bucket(NOW - timedelta(minutes=m), cost="1") for m in range(1, 61)])
    s = queries.spend_summary(store, NOW)
    assert s.burn_per_hour[60] == 60
    assert s.spike is False


def test_newest_usage_is_capped_at_now(store: Store) -> None:
    store.write_usage([bucket(at(0), cost="1"), bucket(at(5), cost="1")])
    assert queries.newest_usage(store) == at(6)
    assert queries.newest_usage(
        store,
        at(
            5,
        )
        + timedelta(seconds=20),
    ) == at(5) + timedelta(seconds=20)
    assert queries.newest_usage(store, at(30)) == at(6)


# series


@pytest.mark.parametrize(
    ("span", "step"),
    [
        (timedelta(minutes=15), 60),
        (timedelta(hours=1), 60),
        (timedelta(hours=6), 300),
        (timedelta(hours=24), 900),
        (timedelta(days=7), 7200),
        (timedelta(days=30), 21600),
        (timedelta(days=3650), 86400),
    ],
)
def test_series_step(span: timedelta, step: int) -> None:
    assert queries.series_step(T0, T0 + span) == step
    assert span.total_seconds() / step <= 120 or step == 86400


def test_spend_series_zero_fills_oldest_first(store: Store) -> None:
    store.write_usage(
        [bucket(at(2), cost="1"), bucket(at(5), cost="2"), bucket(at(5), cost="3", model="b")]
    )
    series = queries.spend_series(store, at(0), at(10), 60)
    assert [t for t, _ in series] == [at(m) for m in range(10)]
    assert [v for _, v in series] == [0, 0, 1, 0, 0, 5, 0, 0, 0, 0]
    coarse = queries.spend_series(store, at(0), at(10), 300)
    assert coarse == [(at(0), Decimal(1)), (at(5), Decimal(5))]


def test_spend_series_shape_on_a_long_window_with_short_steps(store: Store) -> None:
    store.write_usage([bucket(at(m), cost="0.001") for m in range(6 * 60)])
    series = queries.spend_series(store, at(0), at(6 * 60), 300)
    assert len(series) == 72
    assert all(v == Decimal("0.005") for _, v in series), series[:13]


def test_gpu_series_shape_on_a_long_window_with_short_steps(store: Store) -> None:
    store.write_batch(
        Batch(
            gpu=tuple(_gpu_sample(at(m), "0.01") for m in range(1, 6 * 60 + 1)),
            inference=tuple(_inf_sample(at(m), 1) for m in range(1, 6 * 60 + 1)),
        )
    )
    series = queries.gpu_series(store, at(0), at(6 * 60), 300)
    assert {v for _, v in series[1:-1]} == {Decimal("0.01")}, series[:13]


# cost_by


@pytest.fixture
def two_windows(store: Store) -> Store:
    """Previous window [T0, T0+1h), current [T0+1h, T0+2h)."""
    store.write_usage(
        [
            # gpt-4o: $1/request before, $1.50 now
            bucket(
                at(10),
                model="gpt-4o",
                cost="2",
                requests=2,
                project="search",
                tag="prod",
                api_key="k1",
                input_uncached=100,
                cache_read=100,
            ),
            bucket(
                at(70),
                model="gpt-4o",
                cost="6",
                requests=4,
                project="search",
                tag="prod",
                api_key="k1",
                input_uncached=300,
                cache_read=100,
                cache_write_5m=50,
                cache_write_1h=50,
                output=40,
            ),
            # claude: only now, same project as gpt-4o
            bucket(
                at(80),
                provider="anthropic",
                model="claude",
                cost="3",
                requests=1,
                project="search",
                tag="eval",
                api_key="k2",
                input_uncached=10,
                output=5,
            ),
            # unpriced model: tokens counted, cost unknown
            bucket(
                at(90),
                provider="acme",
                model="acme-ft",
                cost=None,
                requests=5,
                project="bot",
                tag="eval",
                api_key="k3",
                input_uncached=1000,
                output=100,
            ),
        ]
    )
    return store


def test_cost_by_model_with_previous_window(two_windows: Store) -> None:
    rows = queries.cost_by(two_windows, at(60), at(120), "model")
    assert [(r.provider, r.key) for r in rows] == [
        ("openai", "gpt-4o"),
        ("anthropic", "claude"),
        ("acme", "acme-ft"),
    ]
    gpt, claude, acme = rows
    assert gpt.totals.cost == 6 and gpt.totals.requests == 4
    assert gpt.totals.cost_per_request == Decimal("1.5")
    assert gpt.previous.cost_per_request == 1
    assert gpt.change == pytest.approx(0.5)
    assert gpt.totals.input_total == 500
    assert gpt.totals.cache_write == 100
    assert gpt.cache_hit_rate == pytest.approx(0.2)
    assert gpt.priced is True
    assert claude.previous.requests == 0 and claude.change is None
    assert acme.priced is False
    assert acme.totals.cost_per_request is None  # never $0
    assert acme.totals.unpriced_tokens == 1100
    assert acme.totals.unpriced_requests == 5


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        ("project", {"search": (Decimal(9), 5), "bot": (Decimal(0), 5)}),
        ("api_key", {"k1": (Decimal(6), 4), "k2": (Decimal(3), 1), "k3": (Decimal(0), 5)}),
        ("tag", {"prod": (Decimal(6), 4), "eval": (Decimal(3), 6)}),
    ],
)
def test_cost_by_other_groups_merge_providers(
    two_windows: Store, group: str, expected: dict[str, tuple[Decimal, int]]
) -> None:
    rows = queries.cost_by(two_windows, at(60), at(120), group)
    assert {r.key: (r.totals.cost, r.totals.requests) for r in rows} == expected
    assert all(r.provider == "" for r in rows)
    assert [r.key for r in rows] == sorted(expected, key=lambda k: -expected[k][0])


def test_cost_by_group_mixing_priced_and_unpriced(two_windows: Store) -> None:
    rows = {r.key: r for r in queries.cost_by(two_windows, at(60), at(120), "tag")}
    eval_ = rows["eval"]
    assert eval_.priced is False  # part of it is unpriced: flagged
    assert eval_.totals.cost_per_request == Decimal(3)  # over the one priced request only
    assert eval_.totals.unpriced_requests == 5


def test_cost_by_rejects_an_unknown_group(store: Store) -> None:
    with pytest.raises(ValueError, match="'workspace'"):
        queries.cost_by(store, at(0), at(60), "workspace")


def test_totals_exclude_unpriced_from_cost_per_request(two_windows: Store) -> None:
    t = queries.totals(two_windows, at(60), at(120))
    assert t.cost == 9
    assert t.requests == 10
    assert t.unpriced_requests == 5
    assert t.cost_per_request == Decimal(9) / 5
    assert queries.unpriced(two_windows, at(60), at(120)) == {"acme/acme-ft": 1100}
    only_unpriced = queries.totals(two_windows, at(90), at(91))
    assert only_unpriced.cost_per_request is None


def test_filters_match_provider_model_project_tag_key(two_windows: Store) -> None:
    def requests(text: str) -> int:
        return queries.totals(two_windows, at(0), at(120), text).requests

    assert requests("") == 12
    assert requests("anthropic") == 1
    assert requests("GPT-4") == 6  # LIKE is case-insensitive for ASCII
    assert requests("bot") == 5
    assert requests("eval") == 6
    assert requests("k2") == 1
    assert requests("nothing-matches") == 0
    rows = queries.cost_by(two_windows, at(60), at(120), "model", text="search")
    assert [r.key for r in rows] == ["gpt-4o", "claude"]
    assert [m.model for m in queries.model_mix(two_windows, at(60), at(120), "acme")] == ["acme-ft"]
    assert queries.spend_summary(two_windows, at(119), text="claude").hour == 3


def test_filter_text_is_literal(store: Store) -> None:
    store.write_usage([bucket(at(0), model="o3-mini", cost="1"), bucket(at(0), model="o3_mini")])
    assert [r.key for r in queries.cost_by(store, at(0), at(1), text="o3_mini")] == ["o3_mini"]


# model mix


def test_model_mix_shares_sum_to_one(two_windows: Store) -> None:
    mix = queries.model_mix(two_windows, at(0), at(120))
    assert [(m.model, m.cost, m.requests, m.priced) for m in mix] == [
        ("gpt-4o", Decimal(8), 6, True),
        ("claude", Decimal(3), 1, True),
        ("acme-ft", Decimal(0), 5, False),
    ]
    assert math.fsum(m.cost_share for m in mix) == pytest.approx(1.0)
    assert math.fsum(m.request_share for m in mix) == pytest.approx(1.0)
    assert mix[0].cost_share == pytest.approx(8 / 11)
    assert mix[2].request_share == pytest.approx(5 / 12)


def test_model_mix_of_an_empty_window(store: Store) -> None:
    assert queries.model_mix(store, at(0), at(60)) == []


# billed vs estimated


def test_billed_vs_estimated_gap(store: Store) -> None:
    d1 = datetime(2025, 3, 14, tzinfo=UTC)
    d2 = datetime(2025, 3, 15, tzinfo=UTC)
    store.write_usage(
        [
            bucket(d1 + timedelta(hours=1), cost="10"),
            bucket(d1 + timedelta(hours=2), cost="0.5", model="gpt-4o-mini"),
            bucket(d2 + timedelta(hours=1), cost="4"),
            bucket(d1 + timedelta(hours=1), cost="7", provider="anthropic", model="claude"),
        ]
    )
    store.write_batch(
        Batch(
            billed=(
                BilledCost("oa-costs", "openai", d1, nano("11"), line_item="input"),
                BilledCost("oa-costs", "openai", d1, nano("1"), line_item="output"),
            )
        )
    )
    days = queries.billed_vs_estimated(store, d1, d2 + timedelta(days=1))
    assert [(d.provider, d.day, d.estimated, d.billed, d.gap) for d in days] == [
        ("openai", d1, Decimal("10.5"), Decimal(12), Decimal("1.5")),
        ("openai", d2, Decimal(4), None, None),
    ]
    assert queries.billed_total(store, d1, d2 + timedelta(days=1)) == 12
    assert queries.billed_total(store, d2, d2 + timedelta(days=1)) is None
    # A window starting mid-day still counts that day's bill.
    assert queries.billed_total(store, d1 + timedelta(hours=5), d2) == 12
    # A window that ends mid-day compares the day's bill with the day's whole estimate, not
    # with the hours of it inside the window.
    part = queries.billed_vs_estimated(store, d1, d1 + timedelta(hours=1, minutes=30))
    assert [(d.provider, d.estimated, d.billed) for d in part] == [
        ("openai", Decimal("10.5"), Decimal(12))
    ]


# GPU overview


def _gpu_sample(
    ts: datetime, cost: str, idle: str = "0", device: str = "GPU-0", index: int = 0
) -> GpuSample:
    return GpuSample(
        source="nvml",
        device=device,
        ts=ts,
        interval_s=60.0,
        name="NVIDIA H100 80GB HBM3",
        index=index,
        util_pct=40.0,
        mem_used_bytes=10,
        mem_total_bytes=80,
        power_mw=250_000,
        temp_c=50,
        cost_nano=nano(cost),
        idle_cost_nano=nano(idle),
        cost_ref="rented $3/h",
    )


def _inf_sample(ts: datetime, requests: int) -> InferenceSample:
    return InferenceSample(
        source="vllm",
        endpoint="http://127.0.0.1:8000/metrics",
        ts=ts,
        interval_s=60.0,
        kind="vllm",
        requests=requests,
        prompt_tokens=requests * 800,
        generation_tokens=requests * 200,
    )


def test_gpu_overview_cost_per_inference_and_idle(store: Store) -> None:
    store.write_batch(
        Batch(
            gpu=(
                _gpu_sample(at(1), "0.05"),
                _gpu_sample(at(2), "0.05", idle="0.05"),
                _gpu_sample(at(1), "0.02", device="GPU-1", index=1),
                _gpu_sample(at(2), "0.02", device="GPU-1", index=1),
            ),
            inference=(_inf_sample(at(1), 10), _inf_sample(at(2), 0)),
        )
    )
    o = queries.gpu_overview(store, at(0), at(10))
    assert o.cost == Decimal("0.14")
    assert o.idle_cost == Decimal("0.05")
    assert o.inferences == 10
    assert o.cost_per_inference == Decimal("0.014")
    assert o.cost_per_1m_tokens == Decimal("0.14") * 1_000_000 / 10_000
    assert [d.device for d in o.devices] == ["GPU-0", "GPU-1"]
    g0 = o.devices[0]
    assert (g0.cost, g0.idle_cost, g0.seconds) == (Decimal("0.1"), Decimal("0.05"), 120.0)
    assert g0.usd_per_hour == Decimal("0.05") * 60
    assert g0.power_w == 250.0
    assert g0.last_seen == at(2)
    assert o.newest == at(2)
    [e] = o.endpoints
    assert (e.requests, e.seconds, e.per_second) == (10, 120.0, 10 / 120)


def test_gpu_overview_with_no_inferences_is_unknown_not_zero(store: Store) -> None:
    store.write_batch(Batch(gpu=(_gpu_sample(at(1), "0.05", idle="0.05"),)))
    o = queries.gpu_overview(store, at(0), at(10))
    assert o.cost == Decimal("0.05")
    assert o.cost_per_inference is None
    assert o.cost_per_1m_tokens is None


def test_queries_agree_with_fine_table_on_long_windows(store: Store) -> None:
    store.write_usage(
        [bucket(at(m), cost=f"0.00{m % 7 + 1}", requests=m % 3) for m in range(-30, 8 * 60, 7)]
    )
    for lo, hi in ((at(-17), at(7 * 60 + 3)), (at(0), at(6 * 60)), (at(59), at(4 * 60 + 1))):
        assert queries.totals(store, lo, hi) == fine_totals(store, lo, hi)
        total = sum(v for _, v in queries.spend_series(store, lo, hi, HOUR))
        aligned_lo = datetime.fromtimestamp(to_epoch(lo) // HOUR * HOUR, tz=UTC)
        assert total == fine_totals(store, aligned_lo, hi).cost
