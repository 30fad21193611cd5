"""The tokentop Textual app: five panes refreshed from the store by a thread worker.

The app reads its own connection to the database. Collectors, when the app runs them, write
through another connection (the runner's); without a runner the app watches a file that another
process (``tokentop collect``) fills. Either way the panes only ever see store queries, run off
the event loop and delivered as one immutable :class:`~tokentop.tui.snapshot.Snapshot` per refresh.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Protocol

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Container
from textual.pilot import Pilot
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Input
from textual.worker import Worker, WorkerState, get_current_worker

from tokentop.collectors.base import utcnow
from tokentop.collectors.config import Config
from tokentop.pricing.book import PriceBook
from tokentop.store.db import Store
from tokentop.store.queries import GROUPS
from tokentop.store.report import build_report, render
from tokentop.tui.messages import SnapshotExported, SnapshotReady
from tokentop.tui.panes.base import Pane
from tokentop.tui.panes.cost_per_query import CostPerQueryPane
from tokentop.tui.panes.gpu import GpuPane
from tokentop.tui.panes.model_mix import ModelMixPane
from tokentop.tui.panes.sources import SourcesPane
from tokentop.tui.panes.spend import SpendPane
from tokentop.tui.snapshot import (
    PANES,
    WINDOWS,
    RefreshRequest,
    Snapshot,
    build_snapshot,
    window_name,
)
from tokentop.tui.widgets.help_screen import HelpScreen
from tokentop.tui.widgets.top_bar import TopBar

log = logging.getLogger(__name__)

LABELS = {"demo": "DEMO — simulated traffic"}
"""How a source label is shown in the top bar."""

USAGE_STALE_S = 300.0
"""Usage older than this (or three provider polls, if longer) is stale."""


class Runner(Protocol):
    """What the app needs of a collector runner."""

    async def run(self) -> None: ...

    def stop(self) -> Any: ...


class FilterInput(Input):
    """The filter box: a substring over provider, model, project, tag and API key."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "clear_filter", "Clear filter", id="filter-clear"),
    ]

    def action_clear_filter(self) -> None:
        """Clear the filter and close the box."""
        self.value = ""
        self.app.call_later(self.app.action_close_filter)  # type: ignore[attr-defined]


class TokentopApp(App[None]):
    """htop for LLM spend.

    Args:
        db_path: the SQLite database the panes read (created when missing).
        config: budgets and intervals; defaults when ``None``.
        runner: an object with ``async run()`` and ``stop()`` (sync or async) that collects into
            the same database; started on mount, stopped and awaited on quit.
        clock: "now" for every window and age (tests freeze it).
        label: what feeds the screen, e.g. ``"demo"``; shown in the top bar.
        refresh_s: seconds between refreshes of the panes.
        start_window: the initial window, one of :data:`~tui.snapshot.WINDOWS`.
        window_span: an initial window of any length (``tokentop export --since 90m``); it
            joins the windows that ``w`` cycles through and replaces ``start_window``.
        export_dir: where ``e`` writes snapshots; the current directory when ``None``.
    """

    CSS_PATH = "app.tcss"
    AUTO_FOCUS = "#cost-table"
    TITLE = "tokentop"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (130, "-wide")]  # noqa: RUF012 (Textual's own)
    VERTICAL_BREAKPOINTS = [(0, "-short"), (40, "-tall")]  # noqa: RUF012

    BINDINGS: ClassVar[list[BindingType]] = [
        *(
            Binding(
                str(i),
                f"set_window('{name}')",
                name,
                show=False,
                id=f"window-{name}",
                tooltip=f"Show the last {name}",
            )
            for i, name in enumerate(WINDOWS, start=1)
        ),
        Binding("w", "cycle_window", "Window", id="cycle-window", tooltip="Next time window"),
        Binding(
            "slash",
            "filter",
            "Filter",
            id="filter",
            tooltip="Filter by provider, model, project, tag or API key",
        ),
        Binding(
            "g",
            "cycle_group",
            "Group",
            id="cycle-group",
            tooltip="Cost per query by model, project, API key or tag",
        ),
        Binding("p", "toggle_pause", "Pause", id="pause", tooltip="Stop or resume refreshing"),
        Binding(
            "e",
            "export_snapshot",
            "Export",
            id="export",
            tooltip="Write a JSON report and an SVG of the screen",
        ),
        Binding("z", "zoom", "Zoom", id="zoom", tooltip="Show one pane full screen, in turn"),
        Binding("question_mark", "help", "Help", id="help", tooltip="List the keys"),
        Binding("q", "quit", "Quit", id="quit", tooltip="Quit tokentop"),
        # As in htop, nvitop and k9s (Textual's default only says how to quit); priority, so
        # that it quits from the filter box too. ctrl+q stays Textual's quit.
        Binding(
            "ctrl+c",
            "quit",
            "Quit",
            show=False,
            priority=True,
            id="quit-ctrl-c",
            tooltip="Quit tokentop",
        ),
    ]

    window: reactive[str] = reactive("1h", init=False)
    """The time window shown: a key of :attr:`windows`."""
    filter_text: reactive[str] = reactive("", init=False)
    """Substring filter over provider, model, project, tag and API key."""
    group: reactive[str] = reactive("model", init=False)
    """Cost per query grouping: ``model``, ``project``, ``api_key`` or ``tag``."""
    paused: reactive[bool] = reactive(False, init=False)
    """Refreshing stopped (collection, if the app runs it, goes on)."""
    zoomed: reactive[str] = reactive("", init=False)
    """The id of the pane shown alone, or ``""`` for all five."""
    refresh_error: reactive[str] = reactive("", init=False)
    """The last refresh failure, cleared by the next success."""

    def __init__(
        self,
        db_path: Path,
        *,
        config: Config | None = None,
        runner: Runner | None = None,
        clock: Callable[[], datetime] = utcnow,
        label: str = "",
        refresh_s: float = 1.0,
        start_window: str = "1h",
        export_dir: Path | None = None,
        window_span: timedelta | None = None,
        note: str = "",
    ) -> None:
        if start_window not in WINDOWS:
            raise ValueError(f"unknown window {start_window!r}; choose one of {', '.join(WINDOWS)}")
        if refresh_s <= 0:
            raise ValueError(f"refresh_s must be positive, got {refresh_s!r}")
        super().__init__()
        self.db_path = Path(db_path)
        self.config = config or Config()
        self.runner = runner
        self.clock = clock
        self.label = label
        self.note = note
        """Said beside the label, e.g. that another process collects and this one watches."""
        self.refresh_s = refresh_s
        self.export_dir = export_dir
        self.store: Store | None = None
        """The app's read connection, once opened (see :meth:`open_store`)."""
        self._store_lock = threading.Lock()
        self.snapshot: Snapshot | None = None
        """The snapshot on screen."""
        self.refresh_count = 0
        """Snapshots applied so far."""
        self.exported: tuple[str, ...] = ()
        """Paths written by the last export."""
        self._seq = 0
        self._applied_seq = -1
        self._runner_task: asyncio.Task[None] | None = None
        self.windows: dict[str, int] = dict(WINDOWS)
        """Window names and lengths in seconds, shortest first."""
        if window_span is not None:
            seconds = int(window_span.total_seconds())
            if seconds <= 0:
                raise ValueError(f"window_span must be positive, got {window_span}")
            start_window = next(
                (n for n, s in WINDOWS.items() if s == seconds), window_name(seconds)
            )
            self.windows[start_window] = seconds
            self.windows = dict(sorted(self.windows.items(), key=lambda item: item[1]))
        self.set_reactive(TokentopApp.window, start_window)
        self._panes_ready = False
        usage_polls = (self.config.openai.interval_s, self.config.anthropic.interval_s)
        self.usage_stale_s = max(USAGE_STALE_S, 3 * max(usage_polls))
        self.gpu_stale_s = max(15.0, 3 * self.config.gpu_interval_s, 3 * refresh_s)

    def compose(self) -> ComposeResult:
        yield TopBar()
        with Container(id="panes"):
            yield SpendPane(stale_after=self.usage_stale_s)
            yield CostPerQueryPane(stale_after=self.usage_stale_s)
            yield ModelMixPane(stale_after=self.usage_stale_s)
            yield GpuPane(stale_after=self.gpu_stale_s)
            yield SourcesPane(stale_after=self.usage_stale_s)
        yield FilterInput(
            placeholder="filter: provider, model, project, tag or key · Enter keeps it, Esc clears",
            id="filter",
            disabled=True,
        )
        yield Footer()

    @property
    def panes(self) -> list[Pane]:
        """The five panes, in layout order."""
        return list(self.query(Pane))

    def pane(self, pane_id: str) -> Pane:
        """One pane by id (``spend``, ``cost``, ``mix``, ``gpu``, ``sources``)."""
        return self.query_one(f"#{pane_id}", Pane)

    def open_store(self) -> Store:
        """The app's own connection, opened on first use (from a worker thread: opening may
        wait on the runner's write lock, which must not block the event loop)."""
        with self._store_lock:
            if self.store is None:
                self.store = Store(self.db_path)
            return self.store

    def on_mount(self) -> None:
        if self.runner is not None:
            self._runner_task = asyncio.create_task(self._run_runner(), name="tokentop-runner")
        self._panes_ready = True
        self.screen.set_class(self.paused, "-paused")
        if self.zoomed:
            self.watch_zoomed(self.zoomed)
        self._update_top_bar()
        self.theme_changed_signal.subscribe(self, self._on_theme_changed)
        self.set_interval(self.refresh_s, self.refresh_tick, name="refresh")
        # After the first layout, so that breakpoints have decided which panes are visible.
        self.call_after_refresh(self.request_refresh)

    async def _run_runner(self) -> None:
        assert self.runner is not None
        try:
            await self.runner.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("collector runner failed")
            self.notify(f"collectors stopped: {exc}", severity="error", timeout=15)

    async def stop_runner(self, grace_s: float = 5.0) -> None:
        """Ask the runner to stop and wait for it (cancelled after ``grace_s`` seconds)."""
        task, self._runner_task = self._runner_task, None
        if task is None or self.runner is None:
            return
        try:
            result = self.runner.stop()
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("runner.stop() failed")
        try:
            await asyncio.wait_for(task, grace_s)
        except (TimeoutError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("collector runner failed while stopping")

    async def action_quit(self) -> None:
        """Stop the collectors (if the app runs them), then quit."""
        await self.stop_runner()
        self.exit()

    async def on_unmount(self) -> None:
        await self.stop_runner()
        with self._store_lock:
            if self.store is not None:
                self.store.close()

    def visible_panes(self) -> frozenset[str]:
        """Ids of the panes on screen (the others' queries are skipped)."""
        if not self._panes_ready:
            return frozenset(PANES)
        return frozenset(p.id for p in self.panes if p.id and p.display)

    def on_resize(self) -> None:
        # A breakpoint may have shown a pane that has not been fed yet.
        self.call_after_refresh(self._refresh_if_more_visible)

    def _refresh_if_more_visible(self) -> None:
        shown = self.snapshot.request.panes if self.snapshot else frozenset()
        if self.visible_panes() - shown:
            self.request_refresh()

    def refreshing(self) -> bool:
        """Whether a refresh worker is queued or running."""
        return any(
            w.group == "refresh" and w.state in (WorkerState.PENDING, WorkerState.RUNNING)
            for w in self.workers
        )

    def refresh_tick(self) -> None:
        """Every ``refresh_s``: age the badges; query unless paused or still querying."""
        now = self.clock()
        for pane in self.panes:
            pane.tick(now)
        if not self.paused and not self.refreshing():
            self.request_refresh()

    def request_refresh(self) -> None:
        """Start a refresh now with the current window, filter and grouping.

        A refresh already running is superseded (its result is dropped).
        """
        if not self._panes_ready:
            return  # state set before the app runs is picked up by the first refresh
        self._seq += 1
        request = RefreshRequest(
            seq=self._seq,
            now=self.clock(),
            window=self.window,
            span_s=self.windows[self.window],
            text=self.filter_text,
            group=self.group,
            panes=self.visible_panes(),
            budget_daily=self.config.budget_daily_usd,
            budget_monthly=self.config.budget_monthly_usd,
            expected=tuple((c.name, c.kind) for c in getattr(self.runner, "collectors", ())),
        )
        self._refresh(request)

    @work(thread=True, exclusive=True, group="refresh", exit_on_error=False)
    def _refresh(self, request: RefreshRequest) -> None:
        snapshot = build_snapshot(self.open_store(), request)
        if not get_current_worker().is_cancelled:
            self.post_message(SnapshotReady(snapshot))

    def on_snapshot_ready(self, message: SnapshotReady) -> None:
        snapshot = message.snapshot
        if snapshot.request.seq <= self._applied_seq:
            return
        self._applied_seq = snapshot.request.seq
        self.snapshot = snapshot
        self.refresh_count += 1
        self._apply(snapshot)
        self.refresh_error = ""

    def _apply(self, snapshot: Snapshot) -> None:
        with self.batch_update():
            for pane in self.panes:
                if pane.id in snapshot.request.panes:
                    pane.apply(snapshot)

    def _on_theme_changed(self, _theme: object) -> None:
        # Table cells hold colours resolved from the old theme: redraw them (after the new
        # stylesheet applies), even while paused.
        def reapply() -> None:
            if self.snapshot is not None:
                self._apply(self.snapshot)

        self.call_after_refresh(reapply)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        worker = event.worker
        if event.state != WorkerState.ERROR:
            return
        error = worker.error
        if worker.group == "refresh":
            text = f"refresh failed: {error}"
            if text != self.refresh_error:
                self.notify(str(error), title="Refresh failed", severity="error", timeout=8)
            self.refresh_error = text
        elif worker.group == "export":
            self.notify(str(error), title="Export failed", severity="error", timeout=10)

    def _update_top_bar(self) -> None:
        if not self._panes_ready:
            return
        self.query_one(TopBar).show(
            label=" · ".join(
                part for part in (LABELS.get(self.label, self.label.upper()), self.note) if part
            ),
            windows=list(self.windows),
            window=self.window,
            group=self.group.replace("_", " "),
            text=self.filter_text,
            paused=self.paused,
            error=self.refresh_error,
        )
        self.sub_title = LABELS.get(self.label, self.label)

    def watch_window(self) -> None:
        self._update_top_bar()
        self.request_refresh()

    def watch_filter_text(self) -> None:
        self._update_top_bar()
        self.request_refresh()

    def watch_group(self) -> None:
        self._update_top_bar()
        self.request_refresh()

    def watch_paused(self, paused: bool) -> None:
        if not self._panes_ready:
            return
        self.screen.set_class(paused, "-paused")
        self._update_top_bar()
        if not paused:
            self.request_refresh()

    def watch_refresh_error(self) -> None:
        self._update_top_bar()

    def watch_zoomed(self, zoomed: str) -> None:
        if not self._panes_ready:
            return
        grid = self.query_one("#panes")
        grid.set_class(bool(zoomed), "-zoomed")
        for pane in self.panes:
            pane.set_class(pane.id == zoomed, "-zoom")
        # The new classes take effect on the next refresh; query what is visible then.
        self.call_after_refresh(self.request_refresh)

    def action_set_window(self, name: str) -> None:
        """Show the last ``name`` (15m, 1h, 6h, 24h, 7d, 30d)."""
        if name in self.windows:
            self.window = name

    def action_cycle_window(self) -> None:
        """Switch to the next time window."""
        names = list(self.windows)
        self.window = names[(names.index(self.window) + 1) % len(names)]

    def action_filter(self) -> None:
        """Open the filter box."""
        box = self.query_one(FilterInput)
        box.disabled = False
        box.display = True
        box.focus()

    def action_close_filter(self) -> None:
        """Close the filter box, keeping its text as the filter."""
        box = self.query_one(FilterInput)
        box.display = False
        box.disabled = True  # hidden, it must not take the focus (and the keys)
        self.pane("cost").query_one("#cost-table").focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self.filter_text = event.value.strip()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            self.filter_text = event.value.strip()
            self.action_close_filter()

    def action_cycle_group(self) -> None:
        """Group Cost per query by the next dimension (model, project, API key, tag)."""
        self.group = GROUPS[(GROUPS.index(self.group) + 1) % len(GROUPS)]

    def action_toggle_pause(self) -> None:
        """Stop or resume refreshing the panes."""
        self.paused = not self.paused

    def action_zoom(self) -> None:
        """Show the next pane alone; after the last, show all five again."""
        order = ["", *PANES]
        self.zoomed = order[(order.index(self.zoomed) + 1) % len(order)]

    def action_help(self) -> None:
        """Show the keys."""
        if isinstance(self.screen, HelpScreen):
            return
        self.push_screen(HelpScreen(self.key_help()))

    def key_help(self) -> list[tuple[str, str]]:
        """(key, description) for every app binding, with the window keys folded into one."""
        rows: list[tuple[str, str]] = [("1…6", "window: " + ", ".join(WINDOWS))]
        for binding in self._bindings_list():
            if binding.id and binding.id.startswith("window-"):
                continue
            rows.append((self.get_key_display(binding), binding.tooltip or binding.description))
        rows.append(("^p", "command palette"))
        return rows

    def _bindings_list(self) -> list[Binding]:
        return [b for b in self.BINDINGS if isinstance(b, Binding)]

    def action_export_snapshot(self) -> None:
        """Write ``tokentop-YYYYmmdd-HHMMSS.json`` and ``.svg`` (the screen) to the export
        folder and say where."""
        now = self.clock()
        stamp = now.astimezone().strftime("%Y%m%d-%H%M%S")
        folder = self.export_dir or Path.cwd()
        svg = self.export_screenshot(title=f"tokentop {self.window} {stamp}")
        start = now - timedelta(seconds=self.windows[self.window])
        self._export(folder, f"tokentop-{stamp}", svg, start, now)

    @work(thread=True, group="export", exit_on_error=False)
    def _export(self, folder: Path, stem: str, svg: str, start: datetime, now: datetime) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        json_path = folder / f"{stem}.json"
        svg_path = folder / f"{stem}.svg"
        json_path.write_text(self._report_json(start, now), encoding="utf-8")
        svg_path.write_text(svg, encoding="utf-8")
        self.post_message(SnapshotExported((str(json_path), str(svg_path))))

    def _report_json(self, start: datetime, now: datetime) -> str:
        """The same report as ``tokentop export --format json`` for the window on screen."""
        rates = [
            {
                "match": r.match,
                "usd_per_hour": str(r.usd_per_hour),
                "mode": r.mode,
                "usd_per_kwh": str(r.usd_per_kwh),
                "pue": str(r.pue),
            }
            for r in self.config.gpu_rates
        ]
        prices = PriceBook(self.config.pricing).describe()
        data = build_report(self.open_store(), start, now, now, prices, self.label, rates)
        return render(data, "json")

    def on_snapshot_exported(self, message: SnapshotExported) -> None:
        self.exported = message.paths
        self.notify("\n".join(message.paths), title="Snapshot exported", timeout=8)

    def render_svg(self, size: tuple[int, int] = (160, 48)) -> str:
        """Run the app headless (no runner), apply one snapshot and return the screen as SVG.

        For ``tokentop export --format svg``; call it outside any running event loop.
        """
        captured: list[str] = []

        async def auto_pilot(pilot: Pilot[object]) -> None:
            await pilot.pause()
            await pilot.app.workers.wait_for_complete()
            await pilot.pause()
            captured.append(pilot.app.export_screenshot())
            pilot.app.exit()

        asyncio.run(self.run_async(headless=True, size=size, auto_pilot=auto_pilot))
        if not captured:
            raise RuntimeError("the screen could not be rendered")
        return captured[0]

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for name in WINDOWS:
            yield SystemCommand(
                f"Window: {name}",
                f"Show the last {name}",
                lambda name=name: self.action_set_window(name),
                discover=False,
            )
        yield SystemCommand(
            "Cycle window", "Switch to the next time window", self.action_cycle_window
        )
        yield SystemCommand(
            "Filter", "Filter by provider, model, project, tag or API key", self.action_filter
        )
        yield SystemCommand(
            "Cycle grouping",
            "Cost per query by model, project, API key or tag",
            self.action_cycle_group,
        )
        yield SystemCommand(
            "Pause / resume", "Stop or resume refreshing the panes", self.action_toggle_pause
        )
        yield SystemCommand(
            "Export snapshot",
            "Write a JSON report and an SVG of the screen",
            self.action_export_snapshot,
        )
        yield SystemCommand("Zoom pane", "Show one pane alone, in turn", self.action_zoom)
        yield SystemCommand("Help: keys", "List tokentop's keys", self.action_help)
