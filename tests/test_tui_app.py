"""The app driven through its keys, on an injected store with a frozen clock and no runner."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from textual.pilot import Pilot
from textual.widgets import Input, Static

from tokentop.collectors.config import Config
from tokentop.store.db import Store
from tokentop.store.records import Batch, SourceHealth, UsageBucket
from tokentop.tui.app import FilterInput, TokentopApp
from tokentop.tui.panes.cost_per_query import CostPerQueryPane
from tokentop.tui.panes.gpu import GpuPane
from tokentop.tui.panes.sources import SourcesPane
from tokentop.tui.snapshot import PANES
from tokentop.tui.widgets.freshness import FreshnessBadge
from tokentop.tui.widgets.help_screen import HelpScreen
from tokentop.tui.widgets.top_bar import TopBar

try:
    from tests.test_tui_seed import FROZEN, frozen_clock, seed_store
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from test_tui_seed import FROZEN, frozen_clock, seed_store  # type: ignore[no-redef]

SIZE = (160, 48)


async def settle(pilot: Pilot[None]) -> None:
    """Let pending refreshes finish and their snapshots be applied."""
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


def make_app(tmp_path: Path, **kwargs: object) -> TokentopApp:
    db = seed_store(tmp_path / "tokentop.db", gpu=bool(kwargs.pop("gpu", True)))
    kwargs.setdefault("clock", frozen_clock)
    kwargs.setdefault("refresh_s", 3600)  # tests drive refreshes themselves
    return TokentopApp(db, **kwargs)  # type: ignore[arg-type]


def text_of(app: TokentopApp, selector: str) -> str:
    """The text a ``Static`` (or the panes' ``Lines``) shows."""
    return str(app.query_one(selector).render())


def cost_keys(app: TokentopApp) -> list[str]:
    return [k.split("\x1f")[-1] for k in app.query_one(CostPerQueryPane).row_keys]


async def test_panes_show_the_seeded_data(tmp_path: Path) -> None:
    app = make_app(tmp_path, label="demo")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.snapshot is not None
        assert app.snapshot.request.panes == frozenset(PANES)
        assert "DEMO — simulated traffic" in text_of(app, "#top-label")
        spend = text_of(app, "#spend-figures")
        assert "$23.56" in spend  # today: 6 h of seeded spend
        assert "unpriced 432k tokens today" in spend
        assert "no budget set" in spend
        assert "SPIKE" in spend
        assert "openai" in spend and "+$1.09" in spend  # billed vs estimated
        assert app.query_one("#spend").has_class("-spike")
        assert set(cost_keys(app)) == {"gpt-4o-mini", "claude-sonnet-4", "ft:acme-internal"}
        table = app.query_one(CostPerQueryPane).table
        key = "openai\x1fft:acme-internal"
        assert table.get_cell(key, "per_request").plain == "unpriced"
        assert table.get_cell("anthropic\x1fclaude-sonnet-4", "change").plain == "▲ 5.6%"
        mix = text_of(app, "#mix-lines")
        assert "unpriced" in mix and "97%" in mix
        gpu = text_of(app, "#gpu-lines")
        assert "NVIDIA H100" in gpu and "$/inference" in gpu
        sources = app.query_one(SourcesPane).table
        assert sources.get_cell("anthropic", "state").plain == "auth failed"
        assert sources.get_cell("anthropic", "error").plain == "401 invalid x-api-key"
        assert "1 failing" in text_of(app, "#sources .pane-info")
        badge = app.query_one("#gpu", GpuPane).badge
        assert (badge.state, str(badge.render())) == ("live", "live · 5s ago")


async def test_window_keys_change_the_window_and_the_figures(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.window == "1h"
        one_hour = app.snapshot.window_totals.requests if app.snapshot else 0
        assert one_hour == 60 * 8 + 5 * 6  # 5 + 2 + 1 per minute, and the spike
        await pilot.press("1")
        await settle(pilot)
        assert app.window == "15m"
        assert app.snapshot is not None and app.snapshot.request.window == "15m"
        assert app.snapshot.window_totals.requests == 15 * 8 + 5 * 6
        assert app.snapshot.window_totals.requests < one_hour
        await pilot.press("w")
        await settle(pilot)
        assert app.window == "1h"
        await pilot.press("4")
        await settle(pilot)
        assert app.snapshot.request.window == "24h"
        assert app.snapshot.window_totals.requests == 360 * 8 + 5 * 6
        assert " 24h " in str(app.query_one("#top-windows", Static).render())


async def test_filter_narrows_rows_and_escape_clears_it(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        box = app.query_one(FilterInput)
        assert not box.display and box.disabled
        await pilot.press("slash")
        assert box.display and box.has_focus
        await pilot.press(*"claude")
        await pilot.press("enter")
        await settle(pilot)
        assert app.filter_text == "claude"
        assert not box.display
        assert cost_keys(app) == ["claude-sonnet-4"]
        assert "claude" in str(app.query_one("#top-state", Static).render())
        # Letters typed in the box never reached the app's bindings.
        assert app.window == "1h" and app.group == "model"
        await pilot.press("slash", "escape")
        await settle(pilot)
        assert app.filter_text == ""
        assert len(cost_keys(app)) == 3


async def test_filter_matches_projects_and_keys(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        app.filter_text = "key_ci"
        await settle(pilot)
        assert set(cost_keys(app)) == {"gpt-4o-mini", "ft:acme-internal"}


async def test_pause_stops_refreshes(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        before = app.refresh_count
        await pilot.press("p")
        assert app.paused and app.screen.has_class("-paused")
        assert "PAUSED" in str(app.query_one("#top-state", Static).render())
        for _ in range(3):
            app.refresh_tick()
        await settle(pilot)
        assert app.refresh_count == before
        await pilot.press("p")
        await settle(pilot)
        assert not app.paused and app.refresh_count == before + 1
        app.refresh_tick()
        await settle(pilot)
        assert app.refresh_count == before + 2


async def test_g_cycles_the_grouping(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        pane = app.query_one(CostPerQueryPane)
        await pilot.press("g")
        await settle(pilot)
        assert app.group == "project"
        assert set(cost_keys(app)) == {"checkout", "support", "research"}
        assert pane.table.columns[0].label == "Project"
        await pilot.press("g")
        await settle(pilot)
        assert app.group == "api_key"
        assert set(cost_keys(app)) == {"key_ci", "key_support"}
        await pilot.press("g", "g")
        await settle(pilot)
        assert app.group == "model"
        assert len(cost_keys(app)) == 3


async def test_export_writes_json_and_svg(tmp_path: Path) -> None:
    out = tmp_path / "exports"
    app = make_app(tmp_path, export_dir=out)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("e")
        await settle(pilot)
        stamp = FROZEN.astimezone().strftime("%Y%m%d-%H%M%S")
        json_path = out / f"tokentop-{stamp}.json"
        svg_path = out / f"tokentop-{stamp}.svg"
        assert app.exported == (str(json_path), str(svg_path))
        report = json.loads(json_path.read_text())
        assert report["prices"]["source"] == "genai-prices"
        svg = svg_path.read_text()
        assert svg.startswith("<svg") and "Cost&#160;per&#160;query" in svg


async def test_help_opens_and_closes(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        keys = [k for k, _ in app.screen.keys]
        assert {"w", "/", "g", "p", "e", "?", "q", "z"} <= set(keys)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


async def test_q_quits(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.is_running
        await pilot.press("q")
        await app.workers.wait_for_complete()
        assert not app.is_running
    assert app.return_code == 0


async def test_every_action_is_in_the_command_palette(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        commands = list(app.get_system_commands(app.screen))
        titles = [c.title for c in commands]
        for title in (
            "Window: 15m (1)",
            "Window: 30d (6)",
            "Cycle window (w)",
            "Filter (/)",
            "Cycle grouping (g)",
            "Sort (s)",
            "Pause / resume (p)",
            "Export snapshot (e)",
            "Zoom pane (z)",
            "Next pane (tab)",
            "Back (esc)",
            "Help: keys (?)",
            "Quit (q)",
            "Theme",
        ):
            assert title in titles
        # Each action once: Textual's own Keys, Screenshot, Maximize and Quit are replaced.
        names = [t.split(" (")[0] for t in titles]
        assert len(names) == len(set(names))
        assert not {"Keys", "Screenshot", "Maximize", "Minimize"} & set(names)
        bindings = {b.id: b for b in app.BINDINGS if hasattr(b, "id")}  # type: ignore[union-attr]
        assert all(bindings.values()) and "export" in bindings


async def test_zoom_shows_the_focused_pane_and_skips_the_others_queries(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.active == "cost"  # the table has the focus at start
        await pilot.press("z")
        await settle(pilot)
        assert app.zoomed == "cost"
        app.refresh_tick()  # the next refresh queries the zoomed pane only
        await settle(pilot)
        assert app.snapshot is not None and app.snapshot.request.panes == {"cost"}
        assert not app.query_one("#spend").display
        assert app.snapshot.spend is None  # not queried
        # The zoomed pane has the whole width: no column is left out, no name cut.
        cost = app.query_one(CostPerQueryPane)
        assert cost.region.width == SIZE[0]
        assert cost.fitted is not None and not cost.fitted.dropped
        await pilot.press("z")
        await settle(pilot)
        assert app.zoomed == ""
        assert app.snapshot.request.panes == frozenset(PANES)


async def test_medium_terminal_shows_the_other_panes_as_tabs(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        assert app.layout == "medium"
        assert app.visible_panes() == {"spend", "cost", "mix"}
        bar = str(app.query_one("#pane-bar", Static).render())
        for title in ("Spend", "Cost per query", "Model mix", "GPU", "Sources"):
            assert title in bar
        assert app.snapshot is not None and "gpu" not in app.snapshot.request.panes
        await pilot.press("tab", "tab")  # cost -> mix -> gpu: GPU takes Model mix's place
        await settle(pilot)
        assert app.active == "gpu"
        assert app.visible_panes() == {"spend", "cost", "gpu"}
        assert "gpu" in app.snapshot.request.panes
        assert "NVIDIA H100" in text_of(app, "#gpu-lines")


async def test_budget_bar_and_runway(tmp_path: Path) -> None:
    config = Config(budget_daily_usd=Decimal(50), budget_monthly_usd=Decimal(1000))
    app = make_app(tmp_path, config=config)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        spend = text_of(app, "#spend-figures")
        assert "47% of $50.00/day" in spend
        assert "runway" in spend and "at the 60m burn" in spend
        assert "2.4% of $1,000.00/mo" in spend


async def test_gpu_pane_says_why_it_is_empty(tmp_path: Path) -> None:
    app = make_app(tmp_path, gpu=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert "nvml: no NVIDIA driver" in text_of(app, "#gpu-lines")
        assert app.query_one("#gpu", GpuPane).badge.state == "empty"


async def test_badges_go_stale_on_the_clock_even_when_paused(tmp_path: Path) -> None:
    now = [FROZEN]
    app = make_app(tmp_path, clock=lambda: now[0])
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        badge = app.query_one("#spend").query_one(FreshnessBadge)
        assert badge.state == "live"
        await pilot.press("p")
        now[0] = FROZEN + timedelta(minutes=20)
        app.refresh_tick()
        await pilot.pause()
        assert badge.state == "stale" and badge.has_class("-stale")
        assert str(badge.render()) == "stale · 20m"


async def test_a_failed_refresh_is_reported_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)

        def broken(*args: object) -> None:
            raise RuntimeError("database is locked")

        monkeypatch.setattr("tokentop.tui.app.build_snapshot", broken)
        app.request_refresh()
        await settle(pilot)
        assert app.refresh_error == "refresh failed: database is locked"
        assert "database is locked" in str(app.query_one(TopBar).query_one("#top-state").render())
        monkeypatch.undo()
        app.request_refresh()
        await settle(pilot)
        assert app.refresh_error == ""


class FakeRunner:
    """Writes one batch through its own connection, then waits to be stopped."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.wrote = asyncio.Event()
        self._stop = asyncio.Event()
        self.stopped = False
        self.finished = False

    async def run(self) -> None:
        with Store(self.db) as store:
            store.write_batch(
                Batch(
                    usage=(
                        UsageBucket(
                            "demo",
                            "openai",
                            "gpt-4o",
                            FROZEN - timedelta(minutes=2),
                            input_uncached=1000,
                            output=200,
                            requests=1,
                            cost_nano=8_000_000,
                            priced=True,
                        ),
                    )
                )
            )
            store.record_health(
                SourceHealth("demo", "demo", "ok", last_success=FROZEN), calls_delta=1, now=FROZEN
            )
        self.wrote.set()
        await self._stop.wait()
        self.finished = True

    async def stop(self) -> None:
        self.stopped = True
        self._stop.set()


async def test_runner_starts_on_mount_and_stops_on_quit(tmp_path: Path) -> None:
    db = tmp_path / "fresh.db"
    runner = FakeRunner(db)
    app = TokentopApp(db, runner=runner, clock=frozen_clock, refresh_s=3600, label="demo")
    async with app.run_test(size=SIZE) as pilot:
        await asyncio.wait_for(runner.wrote.wait(), 5)
        app.request_refresh()
        await settle(pilot)
        assert cost_keys(app) == ["gpt-4o"]
        assert (
            app.query_one(CostPerQueryPane).table.get_cell("openai\x1fgpt-4o", "per_request").plain
            == "$0.00800"
        )
        assert not runner.stopped
        await pilot.press("q")
        await pilot.pause()
    assert runner.stopped and runner.finished


async def test_runner_is_stopped_when_the_app_exits_another_way(tmp_path: Path) -> None:
    db = tmp_path / "fresh.db"
    runner = FakeRunner(db)
    app = TokentopApp(db, runner=runner, clock=frozen_clock, refresh_s=3600)
    async with app.run_test(size=SIZE):
        await asyncio.wait_for(runner.wrote.wait(), 5)
        app.exit()
    assert runner.stopped and runner.finished


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown window"):
        TokentopApp(tmp_path / "x.db", start_window="2h")
    with pytest.raises(ValueError, match="refresh_s"):
        TokentopApp(tmp_path / "x.db", refresh_s=0)


def test_input_is_the_filter_box() -> None:
    assert issubclass(FilterInput, Input)


def test_start_window_is_used(tmp_path: Path) -> None:
    app = TokentopApp(tmp_path / "x.db", start_window="7d")
    assert app.window == "7d"
    assert isinstance(FROZEN, datetime)


async def test_an_empty_database_shows_unknowns_not_zero(tmp_path: Path) -> None:
    app = TokentopApp(tmp_path / "empty.db", clock=frozen_clock, refresh_s=3600)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        spend = text_of(app, "#spend-figures")
        assert "no usage recorded yet" in spend and "$0.00" not in spend
        assert app.query_one("#spend").query_one(FreshnessBadge).state == "empty"
        assert "no usage in this window" in text_of(app, "#cost-note")
        assert "no GPU source configured" in text_of(app, "#gpu-lines")


def test_render_svg_with_a_custom_window(tmp_path: Path) -> None:
    db = seed_store(tmp_path / "tokentop.db")
    app = TokentopApp(db, clock=frozen_clock, window_span=timedelta(minutes=90), refresh_s=3600)
    assert app.window == "90m" and list(app.windows)[:3] == ["15m", "1h", "90m"]
    svg = app.render_svg(size=(160, 48))
    assert svg.startswith("<svg") and "90m" in svg and "claude-sonnet-4" in svg
    assert TokentopApp(db, window_span=timedelta(hours=6)).window == "6h"


async def test_state_set_before_running_is_used(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    app.group = "tag"
    app.filter_text = "support"
    app.paused = True
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.screen.has_class("-paused")
        assert cost_keys(app) == ["chat"]
