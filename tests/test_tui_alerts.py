"""Alerts in the TUI: the strip under the top bar, the list behind ``a``, and acknowledging
(which hides an alert in this TUI only)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from textual.pilot import Pilot
from textual.widgets import DataTable

from tokentop.collectors.alerts import AlertEngine
from tokentop.collectors.config import parse_config
from tokentop.store import alerts as alert_store
from tokentop.store.db import Store
from tokentop.tui.app import TokentopApp
from tokentop.tui.widgets.alert_strip import AlertStrip
from tokentop.tui.widgets.alerts_screen import AlertsScreen

try:
    from tests.test_tui_seed import FROZEN, frozen_clock, seed_store
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from test_tui_seed import FROZEN, frozen_clock, seed_store  # type: ignore[no-redef]

SIZE = (160, 48)
RULES = """
budget_daily_usd = 1
[[alert]]
name = "daily-budget"
kind = "budget"
[[alert]]
name = "unpriced"
kind = "unpriced"
"""


def fire(db: Path) -> None:
    """What the collector does: evaluate the rules and store their state."""
    store = Store(db)
    try:
        config = parse_config(tomllib.loads(RULES)).alerts
        AlertEngine(store, config, clock=frozen_clock).step(FROZEN)
    finally:
        store.close()


async def settle(pilot: Pilot[None]) -> None:
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


def app_for(db: Path) -> TokentopApp:
    return TokentopApp(db, clock=frozen_clock, refresh_s=3600)


async def test_no_alert_no_strip(tmp_path: Path) -> None:
    app = app_for(seed_store(tmp_path / "t.db"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        strip = app.query_one(AlertStrip)
        assert strip.states == () and not strip.has_class("-firing")
        assert strip.region.height == 0


async def test_firing_alerts_show_under_the_top_bar(tmp_path: Path) -> None:
    db = seed_store(tmp_path / "t.db")
    fire(db)
    app = app_for(db)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        strip = app.query_one(AlertStrip)
        assert strip.has_class("-firing") and strip.region.height == 2
        text = str(strip.render())
        assert " CRITICAL  daily-budget $23.56 of $1.00 today (2356%)" in text
        assert " WARNING  unpriced openai/ft:acme-internal" in text
        assert text.count("· firing now") == 2
        assert text.endswith("firing now · a: alerts")


async def test_the_alert_list_and_acknowledging(tmp_path: Path) -> None:
    db = seed_store(tmp_path / "t.db")
    fire(db)
    app = app_for(db)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("a")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, AlertsScreen)
        now = screen.query_one("#alerts-now", DataTable)
        assert now.row_count == 2
        assert [str(c) for c in now.get_row_at(0)[:3]] == ["firing", "critical", "daily-budget"]
        history = screen.query_one("#alerts-history", DataTable)
        assert history.row_count == 2
        await pilot.press("enter")  # acknowledge daily-budget
        await pilot.pause()
        assert str(now.get_row_at(0)[5]) == "yes"
        await pilot.press("escape")
        await pilot.pause()
        strip = app.query_one(AlertStrip)
        text = str(strip.render())
        assert "daily-budget" not in text and "unpriced" in text
        assert "1 acknowledged" in text
    # The collector's state is untouched: acknowledging is the TUI's own business.
    store = Store(db)
    try:
        assert [s.state for s in alert_store.states(store)] == ["firing", "firing"]
    finally:
        store.close()
