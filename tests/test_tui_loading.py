"""While spend sources load or backfill, the usage panes say so instead of a data age."""

from __future__ import annotations

from pathlib import Path

from tokentop.collectors.runner import Runner
from tokentop.pricing.book import PriceBook
from tokentop.store.db import Store
from tokentop.store.records import SourceHealth
from tokentop.tui.app import TokentopApp
from tokentop.tui.panes.spend import SpendPane
from tokentop.tui.snapshot import usage_loading

try:
    from tests.test_tui_seed import FROZEN, frozen_clock
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from test_tui_seed import FROZEN, frozen_clock  # type: ignore[no-redef]


def test_usage_loading_rules() -> None:
    ok = SourceHealth("openai", "openai", state="ok", last_success=FROZEN)
    back = SourceHealth(
        "anthropic", "anthropic", state="backfilling", detail="backfill 40%", last_success=FROZEN
    )
    failed = SourceHealth("anthropic", "anthropic", state="auth failed", last_error="auth failed")
    gpu = SourceHealth("gpu", "nvml", state="unavailable")
    assert usage_loading((ok,), ()) == ""
    assert usage_loading((ok, back), ()) == "backfill 40%"
    # A configured source that has not reported yet is loading; a failed one is not.
    assert usage_loading((ok,), (("openai", "openai"), ("anthropic", "anthropic"))) == "loading…"
    assert usage_loading((ok, failed), (("anthropic", "anthropic"),)) == ""
    assert usage_loading((gpu,), (("gpu", "nvml"),)) == ""


class _SlowCollector:
    name = "openai"
    kind = "openai"
    interval_s = 3600.0
    calls = 0

    async def poll(self, ctx: object) -> object:
        import asyncio

        await asyncio.Event().wait()  # never returns: the first poll is still running
        raise AssertionError

    async def aclose(self) -> None:
        pass


async def test_spend_pane_says_loading_before_the_first_poll(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    store = Store(db)
    # The poll never lands: at quit the runner cancels it after a short grace, not 5 s.
    runner = Runner(store, [_SlowCollector()], PriceBook(), clock=frozen_clock, stop_grace_s=0.05)
    app = TokentopApp(db, runner=runner, clock=frozen_clock, refresh_s=3600)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        badge = app.query_one(SpendPane).badge
        assert str(badge.render()) == "loading…"
        assert badge.has_class("-loading")
    store.close()


async def test_spend_pane_shows_backfill_progress(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    store = Store(db)
    store.record_health(
        SourceHealth(
            "openai", "openai", state="backfilling", detail="backfill 40%", last_success=FROZEN
        ),
        now=FROZEN,
    )
    store.close()
    app = TokentopApp(db, clock=frozen_clock, refresh_s=3600)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert str(app.query_one(SpendPane).badge.render()) == "backfill 40%"
