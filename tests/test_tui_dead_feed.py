"""A dead feed never looks like $0: the viewer notices the collector it watches stop, marks every
figure stale with rates unknown, and takes the collecting over (unless it only watches).

The app runs on a frozen, injected clock; the collector it watches is another process whose
heartbeat the test writes (a live ``sleep`` process, killed to play ``kill -9``)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from textual.widgets import Static

from tokentop.collectors.runner import COLLECTOR_KEY, Holder, this_host
from tokentop.store.db import Store
from tokentop.store.records import Batch, GpuSample, SourceHealth, UsageBucket
from tokentop.tui.app import TokentopApp
from tokentop.tui.panes.sources import SourcesPane
from tokentop.tui.widgets.freshness import FreshnessBadge

try:
    from tests.test_tui_app import SIZE, FakeRunner, make_app, settle, text_of
    from tests.test_tui_seed import FROZEN
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from test_tui_app import SIZE, FakeRunner, make_app, settle, text_of  # type: ignore[no-redef]
    from test_tui_seed import FROZEN  # type: ignore[no-redef]


@pytest.fixture
def collector() -> Iterator[subprocess.Popen[bytes]]:
    """A process standing for ``tokentop collect``: alive until the test kills it."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def beat(db: Path, pid: int, at: datetime) -> None:
    with Store(db) as store:
        store.set_meta(
            COLLECTOR_KEY, Holder(pid, at.timestamp(), 2.0, this_host(), "collect").encode()
        )


def kill_9(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


def feed(app: TokentopApp) -> Static:
    return app.query_one("#top-feed", Static)


def burn_5m(app: TokentopApp) -> str:
    line = next(x for x in text_of(app, "#spend-figures").splitlines() if "burn  5m" in x)
    return line.split("burn  5m")[1].strip()


async def refresh(app: TokentopApp, pilot: object) -> None:
    app.request_refresh()
    await settle(pilot)  # type: ignore[arg-type]


async def test_the_viewer_says_when_the_collector_it_watches_stops(
    tmp_path: Path, collector: subprocess.Popen[bytes]
) -> None:
    app = make_app(tmp_path, label="demo", watch_only=True)
    beat(app.db_path, collector.pid, FROZEN - timedelta(seconds=1))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert str(feed(app).render()) == f"watching collector pid {collector.pid}"
        assert not feed(app).has_class("-error")
        assert burn_5m(app).startswith("$")
        spend_badge = app.query_one("#spend").query_one(FreshnessBadge)
        assert spend_badge.state == "live"

        # kill -9, 14 s after its last heartbeat: the pid is gone on this host.
        kill_9(collector)
        beat(app.db_path, collector.pid, FROZEN - timedelta(seconds=14))
        await refresh(app, pilot)
        text = str(feed(app).render())
        assert text == f"collector pid {collector.pid} stopped 14s ago · watch only"
        assert "watching" not in str(app.query_one("TopBar").query_one("#top-label").render())
        assert feed(app).has_class("-error")
        # Every pane is stale, with the age, and no rate reads as $0.
        for pane in app.panes:
            assert pane.badge.state in ("stale", "dead"), pane.id
            assert pane.has_class("-stale"), pane.id
        assert str(spend_badge.render()) == "stale · 20s"  # the last poll was 20 s ago
        assert burn_5m(app) == "—"
        spend = text_of(app, "#spend-figures")
        assert "$0.00/h" not in spend and "rates unknown" in spend
        assert f"collector pid {collector.pid} stopped 14s ago" in spend
        assert "day — at 60m burn" in spend and "month — at MTD average" in spend
        gpu = text_of(app, "#gpu-lines")
        assert "$2.49" not in gpu  # the $/h of each GPU: unknown, not its last value
        sources = app.query_one(SourcesPane).table
        assert sources.get_cell("openai", "state").plain == "stale"
        # A viewer that only watches stays a viewer.
        assert app.runner is None and not app.collecting
        await refresh(app, pilot)
        assert app.runner is None and feed(app).has_class("-error")


async def test_the_viewer_takes_over_and_the_figures_come_back(
    tmp_path: Path, collector: subprocess.Popen[bytes]
) -> None:
    runners: list[FakeRunner] = []

    def factory() -> FakeRunner:
        runners.append(FakeRunner(tmp_path / "tokentop.db"))
        return runners[-1]

    app = make_app(tmp_path, label="demo", collector_factory=factory)
    beat(app.db_path, collector.pid, FROZEN - timedelta(seconds=1))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert str(feed(app).render()) == f"watching collector pid {collector.pid}"
        assert runners == []

        kill_9(collector)
        await refresh(app, pilot)
        # The refresh that saw it stop shows the figures stale, then collecting starts here.
        assert burn_5m(app) == "—"
        assert len(runners) == 1 and app.runner is runners[0] and app.collecting
        assert str(feed(app).render()) == (
            f"collector pid {collector.pid} stopped · collecting here now"
        )
        assert app.took_over_from is not None and app.took_over_from.pid == collector.pid
        await asyncio.wait_for(runners[0].wrote.wait(), 5)

        await refresh(app, pilot)
        assert burn_5m(app).startswith("$")
        assert app.query_one("#spend").query_one(FreshnessBadge).state == "live"
        assert not app.query_one("#spend").has_class("-stale")
        assert len(runners) == 1  # one takeover, not one per refresh
        await pilot.press("q")
        await pilot.pause()
    assert runners[0].stopped and runners[0].finished


async def test_a_viewer_that_collects_watches_whoever_took_the_file(
    tmp_path: Path, collector: subprocess.Popen[bytes]
) -> None:
    """A runner that found the lock taken (or handed it to `tokentop collect`) stops on its own;
    the app then watches that process, and takes over again only when it stops."""

    class LosingRunner:
        collectors = ("demo",)

        def __init__(self) -> None:
            self.lost_to = Holder(collector.pid, FROZEN.timestamp(), 2.0, this_host(), "collect")
            self.handed_over_to = None

        async def run(self) -> None:
            return None

        def stop(self) -> None:
            pass

    made: list[LosingRunner] = []

    def factory() -> LosingRunner:
        made.append(LosingRunner())
        return made[-1]

    app = make_app(tmp_path, runner=factory(), collector_factory=factory)
    beat(app.db_path, collector.pid, FROZEN)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert str(feed(app).render()) == f"watching collector pid {collector.pid}"
        assert app.runner is None and not app.collecting
        await refresh(app, pilot)
        assert str(feed(app).render()) == f"watching collector pid {collector.pid}"
        assert len(made) == 1
        # When that one stops in turn, this viewer takes over again.
        kill_9(collector)
        await refresh(app, pilot)
        assert len(made) == 2


async def test_a_late_heartbeat_of_a_live_process_is_a_warning_not_a_takeover(
    tmp_path: Path, collector: subprocess.Popen[bytes]
) -> None:
    made: list[FakeRunner] = []
    app = make_app(
        tmp_path,
        collector_factory=lambda: made.append(FakeRunner(tmp_path / "x.db")) or made[-1],
    )
    beat(app.db_path, collector.pid, FROZEN - timedelta(seconds=9))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert str(feed(app).render()) == f"collector pid {collector.pid}: no heartbeat for 9s"
        assert feed(app).has_class("-warning")
        assert made == [] and app.runner is None


def _one_source(db: Path, kind: str, interval_s: float) -> Path:
    """A file with an hour of steady usage and GPU samples, and one source that last polled at
    FROZEN with the given interval."""
    gpus = [
        GpuSample("demo", "GPU-0", FROZEN - timedelta(minutes=m), 60, name="H100", cost_nano=10**8)
        for m in range(60)
    ]
    usage = [
        UsageBucket(
            "src",
            "openai",
            "gpt-4o",
            FROZEN - timedelta(minutes=m + 1),
            input_uncached=1000,
            requests=2,
            cost_nano=50_000_000,
            priced=True,
        )
        for m in range(60)
    ]
    with Store(db) as store:
        store.write_batch(Batch(usage=tuple(usage), gpu=tuple(gpus)))
        store.record_health(
            SourceHealth("src", kind, "ok", last_success=FROZEN, interval_s=interval_s), now=FROZEN
        )
    return db


@pytest.mark.parametrize(
    ("kind", "interval_s", "fresh_s", "stale_s", "badge"),
    [
        ("demo", 1.0, 10, 11, "stale · 11s"),
        ("openai", 60.0, 180, 181, "stale · 3m"),
    ],
)
async def test_each_source_goes_stale_on_its_own_interval(
    tmp_path: Path, kind: str, interval_s: float, fresh_s: int, stale_s: int, badge: str
) -> None:
    now = [FROZEN]
    db = _one_source(tmp_path / "one.db", kind, interval_s)
    app = TokentopApp(db, clock=lambda: now[0], refresh_s=3600)
    async with app.run_test(size=SIZE) as pilot:
        now[0] = FROZEN + timedelta(seconds=fresh_s)
        await refresh(app, pilot)
        spend = app.query_one("#spend").query_one(FreshnessBadge)
        assert spend.state == "live" and burn_5m(app).startswith("$")
        now[0] = FROZEN + timedelta(seconds=stale_s)
        await refresh(app, pilot)
        assert (spend.state, str(spend.render())) == ("stale", badge)
        assert burn_5m(app) == "—"
        assert app.query_one(SourcesPane).table.get_cell("src", "state").plain == "stale"
        if kind == "demo":  # the demo feeds the GPU pane too: its rates are unknown as well
            assert app.query_one("#gpu").query_one(FreshnessBadge).state == "stale"
            device = next(x for x in text_of(app, "#gpu-lines").splitlines() if "H100" in x)
            assert "$" not in device and device.split()[-4:] == ["—"] * 4  # util, W, $/h, idle
        # No top-bar claim about a collector: none was ever watched in this file.
        assert not feed(app).display
