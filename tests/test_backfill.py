"""``backfill_hours`` is honoured: a first start reads that much history, in chunks, with
progress, against the local fake of the provider admin APIs."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.fakes import KEY_ENV, KEYS, FakeProviderServer
from tokentop.collectors.config import ProviderConfig
from tokentop.collectors.openai import OpenAICollector
from tokentop.collectors.runner import Runner
from tokentop.pricing.book import PriceBook
from tokentop.store.db import Store
from tokentop.store.records import to_epoch

NOW = datetime(2025, 8, 1, 12, 30, 20, tzinfo=UTC)
OPEN_MINUTE = NOW.replace(second=0)


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV["openai"], KEYS["openai"])


@pytest.fixture
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(now=NOW) as fake:
        fake.seed(hours=60)  # more history than asked for
        yield fake


def stored(store: Store) -> tuple[int, int, int, int]:
    row = store.query("SELECT SUM(requests), SUM(output), MIN(start), MAX(start) FROM usage")[0]
    return row[0], row[1], row[2], row[3]


@pytest.mark.parametrize("hours", [40.0, 2.5])
async def test_backfill_hours_is_read_exactly(
    server: FakeProviderServer, db_path: Path, hours: float
) -> None:
    config = ProviderConfig(
        name="openai",
        key_env=KEY_ENV["openai"],
        base_url=server.openai_base_url,
        costs=False,
        backfill_hours=hours,
    )
    collector = OpenAICollector(config, timeout_s=5.0, backoff_s=0.01, clock=server.now)
    progress: list[float] = []
    with Store(db_path) as store:
        # The runner's own default (24 h) applies only to sources without a backfill setting.
        runner = Runner(
            store,
            [collector],
            PriceBook(),
            clock=server.now,
            on_progress=lambda _name, fraction: progress.append(fraction),
        )
        assert runner.backfill_of(collector) == timedelta(hours=hours)
        assert await runner.run_once_and_close() == {"openai": True}
        requests, output, first, last = stored(store)
    start = OPEN_MINUTE - timedelta(hours=hours)
    truth = server.usage_totals("openai", start)
    assert (requests, output) == (truth["requests"], truth["output"])
    assert to_epoch(start) <= first and last <= to_epoch(OPEN_MINUTE)
    # The fake has older traffic that was rightly left out.
    older = server.usage_totals("openai", start - timedelta(hours=1))
    assert older["requests"] > truth["requests"]
    if hours > 26:  # longer than one poll reads: paged in chunks, with progress
        assert len(progress) >= 2 and 0 < progress[0] < 1 and progress[-1] == 1.0
        assert progress == sorted(progress)
    else:
        assert progress == []


async def test_the_longest_backfill_is_read_whole(
    server: FakeProviderServer, db_path: Path
) -> None:
    config = ProviderConfig(
        name="openai",
        key_env=KEY_ENV["openai"],
        base_url=server.openai_base_url,
        costs=False,
        backfill_hours=720,
    )
    collector = OpenAICollector(config, timeout_s=5.0, backoff_s=0.01, clock=server.now)
    progress: list[float] = []
    with Store(db_path) as store:
        runner = Runner(
            store,
            [collector],
            PriceBook(),
            clock=server.now,
            on_progress=lambda _name, fraction: progress.append(fraction),
        )
        assert await runner.run_once_and_close() == {"openai": True}
        requests, output, _first, _last = stored(store)
    truth = server.usage_totals("openai")
    assert (requests, output) == (truth["requests"], truth["output"])
    # 30 days in 26-hour chunks, each a poll of its own, with progress after each.
    assert len(progress) >= 28 and progress[-1] == 1.0
