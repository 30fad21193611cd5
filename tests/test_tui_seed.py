"""Test data for the TUI tests: a store with a few hours of usage, GPUs and source health.

Imported by the other ``test_tui_*`` modules; the one test here checks the seed itself.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from tokentop.store import queries
from tokentop.store.db import Store
from tokentop.store.records import (
    Batch,
    BilledCost,
    GpuSample,
    InferenceSample,
    SourceHealth,
    UsageBucket,
)

FROZEN = datetime(2025, 6, 15, 12, 30, tzinfo=UTC)
"""The tests' "now"."""

HOURS = 6


def frozen_clock() -> datetime:
    """A clock stopped at :data:`FROZEN`."""
    return FROZEN


def _usage(now: datetime) -> list[UsageBucket]:
    out = []
    for m in range(1, HOURS * 60 + 1):
        start = now - timedelta(minutes=m)
        recent = m <= 5
        out.append(
            UsageBucket(
                source="openai",
                provider="openai",
                model="gpt-4o-mini",
                start=start,
                project="checkout",
                api_key="key_ci",
                tag="search",
                input_uncached=1500,
                cache_read=500,
                output=300,
                requests=5,
                cost_nano=2_250_000,
                priced=True,
                price_ref="genai-prices:openai/gpt-4o-mini",
            )
        )
        out.append(
            UsageBucket(
                source="anthropic",
                provider="anthropic",
                model="claude-sonnet-4",
                start=start,
                project="support",
                api_key="key_support",
                tag="chat",
                input_uncached=4000,
                cache_read=2000 if m <= 60 else 0,
                output=800,
                requests=8 if recent else 2,
                # An hour ago each request cost more: the 1h "change" column shows it.
                cost_nano=(400_000_000 if recent else 50_000_000) if m <= 60 else 60_000_000,
                priced=True,
                price_ref="genai-prices:anthropic/claude-sonnet-4",
            )
        )
        out.append(
            UsageBucket(
                source="openai",
                provider="openai",
                model="ft:acme-internal",
                start=start,
                project="research",
                api_key="key_ci",
                tag="eval",
                input_uncached=1000,
                output=200,
                requests=1,
                priced=False,
            )
        )
    return out


def _gpu(now: datetime) -> tuple[list[GpuSample], list[InferenceSample]]:
    gpus, inf = [], []
    for m in range(0, 60):
        ts = now - timedelta(minutes=m, seconds=5)
        for idx, util in ((0, 87.0), (1, 4.0)):
            idle = 41_500_000 if util < 10 else 2_000_000
            gpus.append(
                GpuSample(
                    source="nvml",
                    device=f"GPU-{idx}",
                    ts=ts,
                    interval_s=60,
                    name="NVIDIA H100 80GB HBM3",
                    index=idx,
                    util_pct=util,
                    mem_used_bytes=60 * 2**30,
                    mem_total_bytes=80 * 2**30,
                    power_mw=612_000 if util > 50 else 71_000,
                    temp_c=61,
                    cost_nano=41_500_000,
                    idle_cost_nano=idle,
                    cost_ref="rented:$2.49/h",
                )
            )
        inf.append(
            InferenceSample(
                source="vllm",
                endpoint="http://gpu-1:8000",
                ts=ts,
                interval_s=60,
                kind="vllm",
                requests=600 + (m % 7) * 40,
                prompt_tokens=300_000,
                generation_tokens=90_000,
            )
        )
    return gpus, inf


def seed_store(path: Path, *, now: datetime = FROZEN, gpu: bool = True) -> Path:
    """Fill a database at ``path`` and return the path."""
    store = Store(path)
    try:
        gpus, inf = _gpu(now) if gpu else ([], [])
        day = now.replace(hour=0, minute=0)
        store.write_batch(
            Batch(
                usage=tuple(_usage(now)),
                gpu=tuple(gpus),
                inference=tuple(inf),
                billed=(
                    BilledCost("openai-costs", "openai", day, amount_nano=1_900_000_000),
                    BilledCost(
                        "openai-costs", "openai", day - timedelta(days=1), amount_nano=3_000_000_000
                    ),
                ),
            )
        )
        health = [
            SourceHealth(
                "openai", "openai", "ok", last_success=now - timedelta(seconds=20), lag_s=65
            ),
            SourceHealth(
                "anthropic",
                "anthropic",
                "auth failed",
                last_success=now - timedelta(hours=2),
                last_error="401 invalid x-api-key",
                last_error_at=now - timedelta(seconds=40),
            ),
            SourceHealth(
                "vllm", "prometheus", "ok", last_success=now - timedelta(seconds=4), lag_s=1
            ),
        ]
        if gpu:
            health.append(
                SourceHealth(
                    "nvml", "nvml", "ok", last_success=now - timedelta(seconds=5), lag_s=0.2
                )
            )
        else:
            health.append(
                SourceHealth(
                    "nvml",
                    "nvml",
                    "unavailable",
                    detail="no NVIDIA driver",
                    last_error_at=now - timedelta(minutes=1),
                )
            )
        for i, h in enumerate(health):
            store.record_health(h, calls_delta=12 - i * 3, now=now - timedelta(minutes=i))
    finally:
        store.close()
    return path


def test_seed_has_what_the_panes_need(tmp_path: Path) -> None:
    path = seed_store(tmp_path / "t.db")
    with Store(path) as store:
        end = FROZEN
        start = end - timedelta(hours=1)
        rows = queries.cost_by(store, start, end)
        assert {r.key for r in rows} == {"gpt-4o-mini", "claude-sonnet-4", "ft:acme-internal"}
        assert not next(r for r in rows if r.key == "ft:acme-internal").priced
        assert queries.gpu_overview(store, start, end).devices
        assert {s.state for s in queries.sources(store, FROZEN)} >= {"auth failed", "ok"}
        assert queries.spend_summary(store, FROZEN).spike
        assert queries.billed_vs_estimated(store, start, end)
