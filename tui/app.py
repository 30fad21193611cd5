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
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Protocol

from textual import events, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Container
from textual.geometry import Size
from textual.pilot import Pilot
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Input
from textual.worker import Worker, WorkerCancelled, WorkerState, get_current_worker

from tokentop.collectors.base import utcnow
from tokentop.collectors.config import APP, Config
from tokentop.collectors.runner import HANDOVER_WAIT_S, Holder
from tokentop.pricing.book import PriceBook
from tokentop.store.db import Store
from tokentop.store.filters import add_term, drill_term, filtered_groups
from tokentop.store.queries import GROUPS
from tokentop.store.records import stale_after, to_epoch
from tokentop.store.report import build_report, render
from tokentop.store.view import DEFAULT_SORT, default_descending
from tokentop.tui import format as fmt
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
from tokentop.tui.widgets.alert_strip import AlertStrip
from tokentop.tui.widgets.alerts_screen import AlertsScreen
from tokentop.tui.widgets.help_screen import HelpScreen
from tokentop.tui.widgets.pane_bar import PaneBar
from tokentop.tui.widgets.table import ThemedTable
from tokentop.tui.widgets.top_bar import TopBar

log = logging.getLogger(__name__)

LABELS = {"demo": "DEMO — simulated traffic"}
"""How a source label is shown in the top bar."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

REQUERY_S = 15.0
"""At most this long between full queries while nothing in the database changes."""

TAB_PANES = ("mix", "gpu", "sources")
"""Panes that share one place, as tabs, in the medium layout (Spend and Cost per query stay)."""


def layout_for(width: int, height: int) -> str:
    """The layout for a terminal of ``width`` x ``height`` cells.

    - ``large`` (130x40 and up): all five panes.
    - ``medium`` (100x28 and up, or 40 rows at any width): Spend and Cost per query, and one of
      Model mix, GPU and Sources below them (side by side from 100 columns, else stacked).
    - ``compact`` (smaller, down to 80x24): one pane at a time.

    In the medium and compact layouts the pane bar names every pane; ``tab`` reaches each.
    """
    if width >= 130 and height >= 40:
        return "large"
    if height >= 28 and (width >= 100 or height >= 40):
        return "medium"
    return "compact"


def bucket_edges(request: RefreshRequest) -> tuple[int, int]:
    """Which minute buckets the window of ``request`` sums, as the store decides it.

    The store compares whole seconds (:func:`~tokentop.store.records.to_epoch`): a bucket is in
    the window when its start is in ``[start, end)``. So the rows change when an end passes the
    first whole second after a minute's edge (``12:00:01``), not at the edge itself; the
    minute of the first bucket start at or after each end says which rows a window sums.
    """
    return -(-to_epoch(request.start) // 60), -(-to_epoch(request.end) // 60)


def default_export_dir() -> Path:
    """Where ``e`` writes snapshots by default: the user data folder's ``snapshots/``."""
    import platformdirs

    return Path(platformdirs.user_data_dir(APP)) / "snapshots"


class Runner(Protocol):
    """What the app needs of a collector runner.

    A real one (:class:`tokentop.collectors.runner.Runner`) also says why it stopped on its
    own: ``lost_to`` (another live collector held the file) or ``handed_over_to`` (a
    ``tokentop collect`` asked for it); the app then watches that process.
    """

    async def run(self) -> None: ...

    def stop(self) -> Any: ...


class FilterInput(Input):
    """The filter box: a substring over provider, model, project, tag and API key."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "clear_filter", "Clear filter", id="filter-clear"),
    ]

    def action_clear_filter(self) -> None:
        """Clear the filter and close the box."""
        self.app.drills.clear()  # type: ignore[attr-defined]
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
        export_dir: where ``e`` writes snapshots; the user data folder's ``snapshots/`` when
            ``None`` (:func:`default_export_dir`).
        export_formats: what ``e`` writes beside the SVG: ``json``, ``csv``, ``md``.
        collector_factory: builds a runner for this database; when the collector this app
            watches stops, the app takes the collecting over with one (``None``: never).
        watch_only: never collect; say so when the collector watched stops.
        readonly: open the database read-only (``mode=ro``: it must exist, and is never
            written); for viewers that never collect, e.g. ``--watch-only`` and ``export``.
    """

    CSS_PATH = "app.tcss"
    AUTO_FOCUS = None  # the active pane takes the focus once the layout is known (on_mount)
    TITLE = "tokentop"
    # Textual's breakpoints put these classes on the screen for the stylesheet; which panes
    # are on screen is decided from the same size by layout_for().
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-medium"), (130, "-wide")]  # noqa: RUF012
    VERTICAL_BREAKPOINTS = [  # noqa: RUF012
        (0, "-short"),
        (28, "-medium-height"),
        (40, "-tall"),
        (60, "-very-tall"),
    ]

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
        Binding(
            "s",
            "sort_next",
            "Sort",
            id="sort",
            tooltip="Sort the table by its next column (a click on a heading sorts by it)",
        ),
        Binding(
            "S",
            "sort_reverse",
            "Reverse sort",
            show=False,
            id="sort-reverse",
            tooltip="Reverse the table's sort",
        ),
        Binding("p", "toggle_pause", "Pause", id="pause", tooltip="Stop or resume refreshing"),
        Binding(
            "e",
            "export_snapshot",
            "Export",
            id="export",
            tooltip="Write a JSON report and an SVG of the screen",
        ),
        Binding(
            "z", "zoom", "Zoom", id="zoom", tooltip="Show the focused pane alone, or all again"
        ),
        # Priority, so that they move between panes rather than between widgets; the filter
        # box and dialogs keep their own tab (check_action lets the key through there).
        Binding(
            "tab",
            "next_pane",
            "Next pane",
            show=False,
            priority=True,
            id="next-pane",
            tooltip="Go to the next pane (shows it when it is off screen)",
        ),
        Binding(
            "shift+tab",
            "previous_pane",
            "Previous pane",
            show=False,
            priority=True,
            id="previous-pane",
            tooltip="Go to the previous pane",
        ),
        Binding(
            "escape",
            "go_back",
            "Back",
            show=False,
            id="back",
            tooltip="Undo the last drill-down (enter on a row), else leave the zoom",
        ),
        Binding(
            "a",
            "alerts",
            "Alerts",
            show=False,
            id="alerts",
            tooltip="Alerts firing now and their history; enter acknowledges (TUI only)",
        ),
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
    """The id of the pane shown alone (``z``), or ``""``."""
    active: reactive[str] = reactive("cost", init=False)
    """The pane with the focus, which ``tab`` moves: shown in every layout."""
    sort: reactive[tuple[str, bool]] = reactive(DEFAULT_SORT, init=False)
    """(column, descending) of the Cost per query table (and of an export's group rows)."""
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
        export_formats: Iterable[str] = ("json",),
        window_span: timedelta | None = None,
        note: str = "",
        collector_factory: Callable[[], Runner] | None = None,
        watch_only: bool = False,
        readonly: bool = False,
        snapshot_builder: Callable[[RefreshRequest], Snapshot] | None = None,
        via: Callable[[Snapshot | None], str] | None = None,
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
        self.collector_factory = None if watch_only else collector_factory
        self.watch_only = watch_only
        self.readonly = readonly
        """The app's own connection is read-only (it never collects)."""
        self.snapshot_builder = snapshot_builder
        """Builds each refresh instead of the database (``--prometheus``: from PromQL)."""
        self.via = via
        """What every pane says under its border about where its figures come from."""
        self.feed_text = ""
        """Who collects, as the top bar says it (``watching collector pid 123``)."""
        self.feed_role = ""
        """How that is coloured: ``error`` (the feed is dead), ``warning`` or ``""``."""
        self.took_over_from: Holder | None = None
        """The collector whose work this app took over, once it has."""
        self._watched: Holder | None = None
        """The other collector last seen alive."""
        self._runner_failed = False
        self._handed_over_at: float | None = None
        """When this app's runner handed the file over (monotonic), until the new one shows."""
        self.export_dir = export_dir
        self.export_formats = tuple(export_formats)
        bad = [f for f in self.export_formats if f not in ("json", "csv", "md")]
        if bad:
            raise ValueError(f"unknown export format {bad[0]!r}; choose json, csv or md")
        self.layout = ""
        """``large``, ``medium`` or ``compact`` (:func:`layout_for`), once mounted."""
        self._slot = "mix"
        """Which of :data:`TAB_PANES` the medium layout shows."""
        self.drills: list[tuple[str, str]] = []
        """(filter, grouping) before each drill-down, so ``escape`` goes back."""
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
        self._last_request: RefreshRequest | None = None
        self._last_build: tuple[Any, float, Snapshot] | None = None
        """(what it was made from, when, the snapshot) of the last full query."""
        self._pane_list: list[Pane] = []
        self._alert_strip: AlertStrip | None = None
        self._exporting = False
        """An export is querying or writing: refreshes wait, so the SVG shows its figures."""
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
        # Used only where no source health says better (see FreshnessBadge).
        usage_polls = (self.config.openai.interval_s, self.config.anthropic.interval_s)
        self.usage_stale_s = stale_after(max(usage_polls))
        self.gpu_stale_s = max(stale_after(self.config.gpu_interval_s), 3 * refresh_s)

    def compose(self) -> ComposeResult:
        yield TopBar()
        yield PaneBar(id="pane-bar")
        # No timer of its own: each refresh reads the alerts too (see _refresh).
        yield AlertStrip(self._read_alerts, self.clock, interval_s=None)
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
        """The five panes, in layout order (found once: a DOM query every refresh adds up)."""
        if not self._pane_list:
            self._pane_list = list(self.query(Pane))
        return self._pane_list

    def pane(self, pane_id: str) -> Pane:
        """One pane by id (``spend``, ``cost``, ``mix``, ``gpu``, ``sources``)."""
        return self.query_one(f"#{pane_id}", Pane)

    def open_store(self) -> Store:
        """The app's own connection, opened on first use (from a worker thread: opening may
        wait on the runner's write lock, which must not block the event loop)."""
        with self._store_lock:
            if self.store is None:
                self.store = Store(self.db_path, readonly=self.readonly)
            return self.store

    def on_mount(self) -> None:
        if self.runner is not None:
            self._start_runner(self.runner)
        self._alert_strip = self.query_one(AlertStrip)  # before a refresh worker feeds it
        self._panes_ready = True
        self.screen.set_class(self.paused, "-paused")
        for pane in self.panes:
            pane.set_paused(self.paused)
        if layout_for(*self.size) == "compact" and self.active == "cost":
            # One pane at a time: the first question is what is being spent.
            self.set_reactive(TokentopApp.active, "spend")
        self._apply_layout()
        # Now: the layout (and so which panes to query) follows from the size alone, so the
        # first queries run while Textual lays out and paints the empty panes.
        self.request_refresh()
        self.pane(self.active).focus_target.focus()
        self.watch(self.screen, "focused", self._on_focus_changed, init=False)
        self._update_top_bar()
        self.theme_changed_signal.subscribe(self, self._on_theme_changed)
        self.set_interval(self.refresh_s, self.refresh_tick, name="refresh")

    def _start_runner(self, runner: Runner) -> None:
        self.runner = runner
        self._runner_task = asyncio.create_task(self._run_runner(runner), name="tokentop-runner")

    @property
    def collecting(self) -> bool:
        """Whether this app runs the collectors now."""
        return self._runner_task is not None and not self._runner_task.done()

    async def _run_runner(self, runner: Runner) -> None:
        try:
            await runner.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("collector runner failed")
            self._runner_failed = True
            self.notify(f"collectors stopped: {exc}", severity="error", timeout=15)
            return
        # It stopped on its own: another process collects now (the next refresh shows which).
        lost: Holder | None = getattr(runner, "lost_to", None)
        handed: int | None = getattr(runner, "handed_over_to", None)
        if (lost is not None or handed is not None) and self.runner is runner:
            self.runner = None
            self.took_over_from = None
            pid = lost.pid if lost is not None else handed
            if lost is not None:
                self._watched = lost
            if handed is not None:
                self._handed_over_at = time.monotonic()
            self._set_feed(f"watching collector pid {pid}", "")

    def _set_feed(self, text: str, role: str) -> None:
        if (text, role) != (self.feed_text, self.feed_role):
            self.feed_text, self.feed_role = text, role
            self._update_top_bar()

    def _follow_collector(self, snapshot: Snapshot) -> str:
        """Keep up with who collects into the file; returns why the feed is dead, or ``""``.

        A viewer watching a live collector says so. When that collector stops (its pid gone on
        this host, or three heartbeats missed), the top bar says so in the error colour and
        every pane goes stale; then the app takes the collecting over (``collector_factory``),
        unless it only watches.
        """
        if self.collecting:
            return ""
        holder, now = snapshot.holder, snapshot.now
        if holder is not None and not holder.mine() and snapshot.holder_alive:
            self._watched = holder
            self._handed_over_at = None
            if holder.late(now):
                # Alive on this host but silent: busy or hung; not taken over before STALL_S.
                silent = fmt.age(holder.age_s(now))
                self._set_feed(f"collector pid {holder.pid}: no heartbeat for {silent}", "warning")
            else:
                self._set_feed(f"watching collector pid {holder.pid}", "")
            return ""
        handing = self._handed_over_at
        if handing is not None and time.monotonic() - handing < HANDOVER_WAIT_S:
            return ""  # the collector this app handed over to has not taken the lock yet
        # The dead holder's own last heartbeat, if it is the one this app watched; one it
        # never saw alive is worth saying only to a pure viewer.
        dead = holder if holder is not None and not holder.mine() else None
        if dead is not None and (self.watch_only or dead.pid == getattr(self._watched, "pid", 0)):
            gone: Holder | None = dead
        else:
            gone = self._watched
        if gone is None:
            if self.watch_only:
                self._set_feed("watch only: no collector is writing this file", "warning")
            elif self.collector_factory is not None and not self._runner_failed:
                self._take_over(None)
            return ""
        stopped = f"collector pid {gone.pid} stopped {fmt.age(gone.age_s(now))} ago"
        if self.collector_factory is not None and not self._runner_failed:
            self._take_over(gone)
            return stopped
        self._set_feed(stopped + (" · watch only" if self.watch_only else ""), "error")
        return stopped

    def _take_over(self, gone: Holder | None) -> None:
        """Start collecting here: the runner takes the file's lock first (or finds that another
        process was quicker, and the app watches that one)."""
        assert self.collector_factory is not None
        runner = self.collector_factory()
        if not getattr(runner, "collectors", True):
            self._runner_failed = True  # nothing configured to collect: keep watching
            return
        self._watched = None
        self.took_over_from = gone
        if gone is not None:
            self._set_feed(f"collector pid {gone.pid} stopped · collecting here now", "warning")
        else:
            self._set_feed("collecting here now", "warning")
        self._start_runner(runner)

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

    def panes_for_layout(self) -> frozenset[str]:
        """The panes the current layout, zoom and active pane put on screen."""
        if self.zoomed:
            return frozenset({self.zoomed})
        if self.layout == "large":
            return frozenset(PANES)
        if self.layout == "medium":
            return frozenset({"spend", "cost", self._slot})
        return frozenset({self.active})

    def _apply_layout(self, size: Size | None = None) -> None:
        """Show the panes that the size, the zoom and the active pane call for.

        ``size``: the terminal's new size, from a resize event (Textual updates ``App.size``
        only after the app's own ``on_resize`` has run).
        """
        if not self._panes_ready:
            return
        width, height = size or self.size
        self.layout = layout_for(width, height)
        if self.active in TAB_PANES:
            self._slot = self.active
        shown = self.panes_for_layout()
        grid = self.query_one("#panes")
        mode = "zoomed" if self.zoomed else self.layout
        for name in ("large", "medium", "compact", "zoomed"):
            grid.set_class(name == mode, f"-{name}")
        grid.set_class(width < 100, "-stacked")
        with self.batch_update():
            for pane in self.panes:
                pane.display = pane.id in shown
                pane.set_class(pane.id == self._slot, "-slot")
            footer = self.query_one(Footer)
            footer.compact = width < 100
            footer.show_command_palette = width >= 100  # ? lists ^p at any width
            bar = self.query_one(PaneBar)
            bar.display = len(shown) < len(PANES)
            if bar.display:
                hint = "tab: next pane" + ("  z: all panes" if self.zoomed else "")
                bar.show_panes(
                    [(p.id or "", p.TITLE) for p in self.panes], shown, self.active, hint
                )
        # A pane shown now may not have been fed yet.
        self.call_after_refresh(self._refresh_if_more_visible)

    def on_resize(self, event: events.Resize) -> None:
        self._apply_layout(event.size)

    def _on_focus_changed(self, focused: Any) -> None:
        """A click (or a dialog closing) moved the focus: that pane is the active one."""
        node = focused
        while node is not None and not isinstance(node, Pane):
            node = node.parent
        if isinstance(node, Pane) and node.id and node.id != self.active:
            self.active = node.id

    def watch_active(self, active: str) -> None:
        if self.zoomed and self.zoomed != active:
            self.zoomed = active  # the zoom follows tab
        self._apply_layout()
        target = self.pane(active).focus_target
        if self.screen is self.screen_stack[0] and self.focused is not target:
            focused = self.focused
            if not isinstance(focused, Input):
                target.focus()

    def action_show_pane(self, pane_id: str) -> None:
        """Show ``pane_id`` and give it the focus."""
        if pane_id in PANES:
            if self.active == pane_id:
                self.pane(pane_id).focus_target.focus()
            self.active = pane_id

    def action_next_pane(self) -> None:
        """Go to the next pane, showing it when the layout has no room for all five."""
        self.active = PANES[(PANES.index(self.active) + 1) % len(PANES)]

    def action_previous_pane(self) -> None:
        """Go to the previous pane."""
        self.active = PANES[(PANES.index(self.active) - 1) % len(PANES)]

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("next_pane", "previous_pane"):
            # In the filter box and in dialogs, tab keeps its usual meaning.
            return self.screen is self.screen_stack[0] and not isinstance(self.focused, Input)
        return True

    def _refresh_if_more_visible(self) -> None:
        """Query again when a pane came on screen, or a table got room for another number of
        rows (a resize, a zoom, a layout switch), than the last request asked for."""
        # Against the last request, not the last snapshot: the first may still be running.
        last = self._last_request
        if last is None:
            return
        if self.visible_panes() - last.panes:
            self.request_refresh()
        elif self.table_room(last.panes) != (last.top_n, last.mix_top_n) and not self.refreshing():
            # While a refresh runs (the first paint, say) it is let be shown: the check after
            # each snapshot is shown asks again (a request can also have been made before the
            # layout settled).
            self.request_refresh()

    def on_pane_resized(self, _message: Pane.Resized) -> None:
        self._refresh_if_more_visible()

    def on_themed_table_resized(self, _message: ThemedTable.Resized) -> None:
        # A note line shown or gone under the table changes its room too.
        self._refresh_if_more_visible()

    def table_room(self, panes: frozenset[str]) -> tuple[int, int]:
        """Groups the Cost per query table and the Model mix pane have room for, besides the
        row that sums the rest (0: not on screen, or not laid out yet: every group)."""
        if not self._panes_ready:
            return 0, 0
        cost = self.query_one(CostPerQueryPane).top_n if "cost" in panes else 0
        mix = self.query_one(ModelMixPane).top_n if "mix" in panes else 0
        return cost, mix

    def refreshing(self) -> bool:
        """Whether a refresh worker is queued or running."""
        return any(
            w.group == "refresh" and w.state in (WorkerState.PENDING, WorkerState.RUNNING)
            for w in self.workers
        )

    def refresh_tick(self) -> None:
        """Every ``refresh_s``: query unless paused or still querying (the new snapshot ages
        the badges as it is applied: one repaint a second, not two); else age the badges."""
        if not self.paused and not self.refreshing() and not self._exporting and self._panes_ready:
            self._refresh(self._request(self.clock()), reuse=True)
            return
        now = self.clock()
        for pane in self.panes:
            if pane.display:
                pane.tick(now)
        if not self.refreshing():
            self.alert_strip.poll()  # alerts stay live while the panes are paused

    def request_refresh(self) -> None:
        """Start a refresh now with the current window, filter and grouping.

        A refresh already running is superseded (its result is dropped).
        """
        if not self._panes_ready or self._exporting:
            return  # state set before the app runs is picked up by the first refresh
        self._refresh(self._request(self.clock()))

    def _request(self, now: datetime) -> RefreshRequest:
        """What the screen shows now: window, filter, grouping and the panes on screen."""
        self._seq += 1
        panes = self.visible_panes()
        top_n, mix_top_n = self.table_room(panes)
        self._last_request = RefreshRequest(
            seq=self._seq,
            now=now,
            window=self.window,
            span_s=self.windows[self.window],
            text=self.filter_text,
            group=self.group,
            panes=panes,
            top_n=top_n,
            mix_top_n=mix_top_n,
            budget_daily=self.config.budget_daily_usd,
            budget_monthly=self.config.budget_monthly_usd,
            expected=tuple(
                (getattr(c, "name", str(c)), getattr(c, "kind", ""))
                for c in getattr(self.runner, "collectors", ())
            ),
        )
        return self._last_request

    @work(thread=True, exclusive=True, group="refresh", exit_on_error=False)
    def _refresh(self, request: RefreshRequest, reuse: bool = False) -> None:
        if self.snapshot_builder is not None:
            snapshot = self.snapshot_builder(request)
        else:
            snapshot = self._build(self.open_store(), request, reuse)
        if not get_current_worker().is_cancelled:
            self.post_message(SnapshotReady(snapshot))
            # The alert strip's read, in this worker: one thread hop a second, not two.
            strip = self.alert_strip
            strip.feed(strip.read_now())

    @property
    def alert_strip(self) -> AlertStrip:
        """The strip of firing alerts (on the main screen, whatever screen is on top)."""
        if self._alert_strip is None:
            self._alert_strip = self.screen_stack[0].query_one(AlertStrip)
        return self._alert_strip

    def _build(self, store: Store, request: RefreshRequest, reuse: bool) -> Snapshot:
        """The snapshot of ``request``; with ``reuse``, the last one moved to the new time when
        nothing it was made from can have changed.

        That is: no other connection committed to the database since (SQLite's
        ``data_version``), the window's ends are between the same minute-bucket edges (usage
        buckets are whole minutes, so a window that slid a few seconds sums the same rows; see
        :func:`bucket_edges`), the view is the same, and the last full query is under
        :data:`REQUERY_S` old. Ages (badges, Sources) follow the new time; a collector that
        died stops writing, so its heartbeat is re-judged here too. (GPU samples are not
        minute buckets: one that slides out of the window shows up to :data:`REQUERY_S`
        longer.) An idle screen on a still database then costs a query at each new minute (at
        least every :data:`REQUERY_S`), not every second; a live one queries every second.
        """
        version = store.query("PRAGMA data_version")[0][0]
        key = (version, bucket_edges(request), replace(request, seq=0, now=_EPOCH))
        last = self._last_build
        if reuse and last is not None and last[0] == key and time.monotonic() - last[1] < REQUERY_S:
            previous = last[2]
            holder = previous.holder
            return replace(
                previous,
                request=request,
                holder_alive=holder is not None and holder.alive(request.now),
                elapsed_s=0.0,
            )
        with store.read_snapshot():  # every pane's figures from one state of the file
            snapshot = build_snapshot(store, request)
        self._last_build = (key, time.monotonic(), snapshot)
        return snapshot

    def on_snapshot_ready(self, message: SnapshotReady) -> None:
        snapshot = message.snapshot
        if snapshot.request.seq <= self._applied_seq or (
            self._exporting and not message.for_export
        ):
            return
        self._applied_seq = snapshot.request.seq
        stopped = self._follow_collector(snapshot)
        if stopped:
            snapshot = replace(snapshot, feed_stopped=stopped)
        self.snapshot = snapshot
        self.refresh_count += 1
        self._apply(snapshot)
        self.refresh_error = ""
        self.call_after_refresh(self._refresh_if_more_visible)
        if message.for_export is not None:
            self.call_after_refresh(self._export_shown, snapshot, message.for_export)

    def _apply(self, snapshot: Snapshot) -> None:
        with self.batch_update():
            for pane in self.panes:
                if pane.id in snapshot.request.panes:
                    pane.show(snapshot)
                if self.via is not None:
                    pane.border_subtitle = self.via(snapshot)

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
            feed=self.feed_text,
            feed_role=self.feed_role,
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
        for pane in self.panes:
            pane.set_paused(paused)
        self._update_top_bar()
        if not paused:
            self.request_refresh()

    def watch_refresh_error(self) -> None:
        self._update_top_bar()

    def watch_zoomed(self, zoomed: str) -> None:
        if zoomed and zoomed != self.active:
            self.active = zoomed
        self._apply_layout()

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
        self.pane(self.active).focus_target.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self.filter_text = event.value.strip()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            self.drills.clear()  # a filter typed by hand replaces the drill-downs
            self.filter_text = event.value.strip()
            self.action_close_filter()

    def action_cycle_group(self) -> None:
        """Group Cost per query by the next dimension (model, project, API key, tag)."""
        self.group = GROUPS[(GROUPS.index(self.group) + 1) % len(GROUPS)]

    def action_toggle_pause(self) -> None:
        """Stop or resume refreshing the panes."""
        self.paused = not self.paused

    def action_zoom(self) -> None:
        """Show the focused pane alone, at the full size of the screen; again: the layout."""
        self.zoomed = "" if self.zoomed else self.active

    def _sort_target(self) -> Pane:
        """The table that ``s`` sorts: the focused pane's, else Cost per query's (brought on
        screen when the layout had it off)."""
        pane = self.pane(self.active)
        if hasattr(pane, "set_sort"):
            return pane
        cost = self.pane("cost")
        if not cost.display:
            self.active = "cost"
        return cost

    def _set_sort(self, pane: Pane, sort: tuple[str, bool]) -> None:
        if pane.id == "cost":
            self.sort = sort
        else:
            pane.set_sort(sort)  # type: ignore[attr-defined]

    def action_sort_next(self) -> None:
        """Sort the table by its next column (names A-Z, figures largest first)."""
        pane = self._sort_target()
        columns: tuple[str, ...] = pane.sort_columns  # type: ignore[attr-defined]
        current = pane.sort[0]  # type: ignore[attr-defined]
        following = (
            columns[(columns.index(current) + 1) % len(columns)]
            if current in columns
            else columns[0]
        )
        self._set_sort(pane, (following, default_descending(following)))

    def action_sort_reverse(self) -> None:
        """Reverse the table's sort."""
        pane = self._sort_target()
        column, descending = pane.sort  # type: ignore[attr-defined]
        self._set_sort(pane, (column, not descending))

    def on_themed_table_header_selected(self, event: ThemedTable.HeaderSelected) -> None:
        """A click on a heading sorts by that column; a second click reverses it."""
        pane: Any = event.table.parent
        while pane is not None and not isinstance(pane, Pane):
            pane = pane.parent
        if pane is None or not hasattr(pane, "set_sort"):
            return
        column = event.column_key
        column_now, descending = pane.sort  # type: ignore[attr-defined]
        sort = (
            (column, not descending)
            if column == column_now
            else (column, default_descending(column))
        )
        self._set_sort(pane, sort)

    def watch_sort(self, sort: tuple[str, bool]) -> None:
        if self._panes_ready:
            self.query_one(CostPerQueryPane).set_sort(sort)

    def on_themed_table_row_selected(self, event: ThemedTable.RowSelected) -> None:
        """``enter`` on a Cost per query row: show only that model, project, key or tag."""
        if event.table.id != "cost-table":
            return
        provider, _, value = event.row_key.rpartition("\x1f")
        rows = self.snapshot.cost_rows if self.snapshot is not None else ()
        row = next((r for r in rows if (r.provider, r.key) == (provider, value)), None)
        if row is not None and getattr(row, "others", 0):
            # The row that sums the groups beyond the table's room is no one group.
            self.notify("the others row sums several groups: filter (/) or zoom (z) to see them")
            return
        self.drill(self.group, value)

    def drill(self, group: str, value: str) -> None:
        """Filter the whole screen to ``value`` of ``group`` and group by the next dimension
        that is not pinned yet (``escape`` goes back)."""
        self.drills.append((self.filter_text, self.group))
        text = add_term(self.filter_text, drill_term(group, value))
        pinned = filtered_groups(text)
        following = [g for g in GROUPS[GROUPS.index(group) + 1 :] + GROUPS if g not in pinned]
        with self.batch_update():
            self.query_one(FilterInput).value = text
            self.filter_text = text
            if following:
                self.group = following[0]

    def action_go_back(self) -> None:
        """Undo the last drill-down; with none, leave the zoom; else clear the filter."""
        if self.drills:
            text, group = self.drills.pop()
            self.query_one(FilterInput).value = text
            self.filter_text = text
            self.group = group
        elif self.zoomed:
            self.zoomed = ""
        elif self.filter_text:
            self.query_one(FilterInput).value = ""
            self.filter_text = ""

    def _read_alerts(self) -> list[Any]:
        """The alert states the collector keeps (read by the strip's thread worker)."""
        from tokentop.store.alerts import states

        return states(self.open_store())

    def _read_alert_history(self) -> list[Any]:
        from tokentop.store.alerts import history

        return history(self.open_store())

    def action_alerts(self) -> None:
        """Open the alert list (with history); ``enter`` there acknowledges, in this TUI only."""
        if isinstance(self.screen, AlertsScreen):
            return
        strip = self.alert_strip
        strip.poll()
        self.push_screen(AlertsScreen(strip, self._read_alert_history, self.clock))

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
        rows.append(("enter", "on a table row: show only that model, project, key or tag"))
        rows.append(("↑ ↓", "move in a table; a click on a heading sorts by it"))
        rows.append(("^p", "command palette"))
        return rows

    def _bindings_list(self) -> list[Binding]:
        return [b for b in self.BINDINGS if isinstance(b, Binding)]

    def action_export_snapshot(self) -> None:
        """Write the screen as SVG and its report (JSON, and CSV or Markdown if asked) with
        the same window, filter, grouping and sort, to the export folder, and say where.

        The figures of both come from one read of the database: the export queries the screen's
        panes and the report in one transaction, shows that snapshot, then takes the SVG, so
        the totals in the report are the ones in the picture. While paused, the window is the
        one on screen (it ends where the paused snapshot ended).
        """
        if self._exporting or not self._panes_ready:
            return
        self._exporting = True
        now = self.snapshot.now if self.paused and self.snapshot is not None else self.clock()
        self._export_query(self._request(now), self.sort)

    @work(thread=True, group="export", exit_on_error=False)
    def _export_query(self, request: RefreshRequest, sort: tuple[str, bool]) -> None:
        try:
            if self.snapshot_builder is not None:
                snapshot = self.snapshot_builder(request)
                texts = self._report_texts(self.open_store(), request, sort)
            else:
                # Its own connection, so its transaction cannot mix with a refresh's queries.
                store = Store(self.db_path, readonly=True)
                try:
                    with store.read_snapshot():  # one read for the panes and the report
                        snapshot = build_snapshot(store, request)
                        texts = self._report_texts(store, request, sort)
                finally:
                    store.close()
        except BaseException:
            self.call_from_thread(self._export_done)
            raise
        self.post_message(SnapshotReady(snapshot, for_export=texts))

    def _report_texts(
        self, store: Store, request: RefreshRequest, sort: tuple[str, bool]
    ) -> dict[str, str]:
        """The report of the screen's view, in each export format."""
        rates = [r.describe() for r in self.config.gpu_rates]
        prices = PriceBook(self.config.pricing).describe()
        data = build_report(
            store,
            request.start,
            request.end,
            request.now,
            prices,
            self.label,
            rates,
            text=request.text,
            group=request.group,
            sort=sort,
            window=request.window,
        )
        return {fmt: render(data, fmt) for fmt in self.export_formats}

    def _export_shown(self, snapshot: Snapshot, texts: dict[str, str]) -> None:
        """The export's snapshot is on screen: picture it and write the files."""
        try:
            stamp = snapshot.now.astimezone().strftime("%Y%m%d-%H%M%S")
            svg = self.export_screenshot(title=f"tokentop {snapshot.request.window} {stamp}")
            folder = self.export_dir or default_export_dir()
        except BaseException:
            self._export_done()
            raise
        self._export_write(folder, f"tokentop-{stamp}", {**texts, "svg": svg})

    def _export_done(self) -> None:
        self._exporting = False

    @work(thread=True, group="export", exit_on_error=False)
    def _export_write(self, folder: Path, stem: str, texts: dict[str, str]) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            paths = []
            for fmt_name, text in texts.items():
                path = folder / f"{stem}.{fmt_name}"
                path.write_text(text, encoding="utf-8")
                paths.append(str(path))
        finally:
            self.call_from_thread(self._export_done)
        self.post_message(SnapshotExported(tuple(paths)))

    def on_snapshot_exported(self, message: SnapshotExported) -> None:
        self.exported = message.paths
        folder = str(Path(message.paths[0]).parent) if message.paths else ""
        names = ", ".join(Path(p).name for p in message.paths)
        self.notify(
            f"{folder}{os.sep}\n{names}", title="Snapshot exported", timeout=10, markup=False
        )

    def render_svg(self, size: tuple[int, int] = (160, 48)) -> str:
        """Run the app headless (no runner), apply one snapshot and return the screen as SVG.

        For ``tokentop export --format svg``; call it outside any running event loop.
        """
        captured: list[str] = []

        async def auto_pilot(pilot: Pilot[object]) -> None:
            await pilot.pause()
            # A refresh asked for while one runs (a table given more room, say) cancels it:
            # wait until none is left rather than fail on the cancelled one.
            for _ in range(50):
                running = [w for w in pilot.app.workers if not w.is_finished]
                if not running:
                    break
                results = await asyncio.gather(*(w.wait() for w in running), return_exceptions=True)
                for result in results:
                    if isinstance(result, BaseException) and not isinstance(
                        result, WorkerCancelled
                    ):
                        raise result
                await pilot.pause()
            await pilot.pause()
            captured.append(pilot.app.export_screenshot())
            pilot.app.exit()

        asyncio.run(self.run_async(headless=True, size=size, auto_pilot=auto_pilot))
        if not captured:
            raise RuntimeError("the screen could not be rendered")
        return captured[0]

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        """Each action once, with its key: tokentop's, then Textual's that tokentop does not
        replace (its "Keys" is our help, its "Screenshot" our export, its "Maximize" our zoom,
        its "Quit" our quit)."""
        keys: dict[str, str] = {}
        for binding in self._bindings_list():
            keys.setdefault(binding.action, self.get_key_display(binding))  # q before ctrl+c

        def title(name: str, action: str) -> str:
            key = keys.get(action)
            return f"{name} ({key})" if key else name

        for name in self.windows:
            yield SystemCommand(
                title(f"Window: {name}", f"set_window('{name}')"),
                f"Show the last {name}",
                lambda name=name: self.action_set_window(name),
                discover=False,
            )
        own = [
            ("Cycle window", "cycle_window", "Switch to the next time window"),
            ("Filter", "filter", "Filter by provider, model, project, tag or API key"),
            ("Cycle grouping", "cycle_group", "Cost per query by model, project, API key or tag"),
            ("Sort", "sort_next", "Sort the table by its next column"),
            ("Reverse sort", "sort_reverse", "Reverse the table's sort"),
            ("Back", "go_back", "Undo the last drill-down (enter on a row), else leave the zoom"),
            ("Pause / resume", "toggle_pause", "Stop or resume refreshing the panes"),
            (
                "Export snapshot",
                "export_snapshot",
                "Write the screen as SVG and its report (JSON) to the snapshots folder",
            ),
            ("Zoom pane", "zoom", "Show the focused pane alone, or all panes again"),
            ("Next pane", "next_pane", "Go to the next pane"),
            ("Previous pane", "previous_pane", "Go to the previous pane"),
            ("Alerts", "alerts", "Alerts firing now and their history (acknowledge in the TUI)"),
            ("Help: keys", "help", "List tokentop's keys"),
            ("Quit", "quit", "Stop the collectors (if this app runs them) and quit"),
        ]
        for name, action, help_text in own:
            method = getattr(self, f"action_{action}")
            yield SystemCommand(title(name, action), help_text, method)
        yield SystemCommand("Theme", "Change the current theme", self.action_change_theme)
