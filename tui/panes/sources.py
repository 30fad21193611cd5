"""Sources: each collector's state, last success, lag and errors; the monitor's own cost."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from textual.content import Content
from textual.widget import Widget
from textual.widgets import Static

from tokentop.store.records import HEARTBEAT_KINDS, LIVE_STATES, SourceHealth
from tokentop.tui import format as fmt
from tokentop.tui.columns import width_of
from tokentop.tui.panes.base import Pane
from tokentop.tui.snapshot import Snapshot
from tokentop.tui.widgets.quiet import update_static
from tokentop.tui.widgets.table import Cell, Column, Role, ThemedTable, sort_label

COLUMNS: tuple[tuple[str, str, int, bool], ...] = (
    ("name", "Source", 6, False),
    ("kind", "Kind", 4, False),
    ("state", "State", 5, False),
    ("last_ok", "Last ok", 5, True),
    ("lag", "Lag", 4, True),
    ("calls", "Calls/h", 4, True),
    ("error", "Last error", 0, False),
)
"""Key, heading, least width (0: the rest of the pane), right-aligned."""

DROP_ORDER: tuple[str, ...] = ("kind", "calls", "lag")
"""What a narrow pane leaves out, first to last, to keep 24 cells for the last error."""

ERROR_FLOOR = 24
NAME_MAX = 24
PAD = 2

_ROLE_ORDER = {"error": 0, "warning": 1, "": 2, "success": 2}


def state_role(state: str) -> Role:
    """Colour role of a source state: failures red, healthy green, anything else amber."""
    s = state.lower()
    if any(word in s for word in ("auth", "error", "fail", "dead")):
        return "error"
    if s in ("ok", "live", "running", "idle", "healthy"):
        return "success"
    return "warning"


class CpuMeter:
    """The monitor process's CPU use (all threads, runner included), measured over at least
    ``every_s`` seconds: a steadier figure than one refresh's, and one that does not repaint
    its line every second."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self._last: tuple[float, float] | None = None
        self._value: float | None = None

    def sample(self) -> float | None:
        """Percent of one core used over the last period; ``None`` until one has passed."""
        now = (time.monotonic(), time.process_time())
        if self._last is None:
            self._last = now
            return None
        if now[0] - self._last[0] >= self.every_s:
            self._value = (now[1] - self._last[1]) / (now[0] - self._last[0]) * 100
            self._last = now
        return self._value


class SourcesPane(Pane):
    """A table of sources (state, last success, lag, calls per hour, last error) and a line
    with the monitor's CPU and total API-call rate."""

    PANE_ID = "sources"
    TITLE = "Sources"

    def __init__(self, *, stale_after: float = 300.0) -> None:
        super().__init__(stale_after=stale_after, empty_text="no sources")
        self.cpu = CpuMeter()
        self._table: ThemedTable | None = None
        self._layout: tuple[tuple[str, int], ...] = ()
        self.sort: tuple[str, bool] = ("state", False)
        """(column key, descending); by state: failing first."""

    def compose_body(self) -> Iterable[Widget]:
        yield ThemedTable(id="sources-table", zebra_stripes=True)
        yield Static("", id="sources-monitor")

    @property
    def focus_target(self) -> Widget:
        """The table."""
        return self.table

    @property
    def sort_columns(self) -> tuple[str, ...]:
        """Columns shown, which ``s`` cycles through."""
        return tuple(k for k, _ in self._layout) or tuple(c[0] for c in COLUMNS)

    def set_sort(self, sort: tuple[str, bool]) -> None:
        """Order the rows by ``sort`` and show it in the heading."""
        if sort != self.sort:
            self.sort = sort
            if self.snapshot is not None:
                self.show(self.snapshot)

    def _fit(self, cells: list[dict[str, Cell]]) -> tuple[tuple[str, int], ...]:
        """(key, width) of the columns that fit; the last error takes what is left."""
        total = self.table.size.width or self.inner_width
        widths: dict[str, int] = {}
        for key, label, floor, _ in COLUMNS[:-1]:
            heading = sort_label(label, key, self.sort)
            widths[key] = width_of(heading, (c[key].plain for c in cells), floor)
        widths["name"] = min(widths["name"], max(NAME_MAX, total // 4))
        kept = [c[0] for c in COLUMNS[:-1]]
        for drop in (None, *DROP_ORDER):
            if drop is not None:
                kept.remove(drop)
            rest = total - sum(widths[k] + PAD for k in kept) - PAD
            if rest >= ERROR_FLOOR:
                break
        rest = max(4, total - sum(widths[k] + PAD for k in kept) - PAD)
        return (*((k, widths[k]) for k in kept), ("error", rest))

    def _set_columns(self, layout: tuple[tuple[str, int], ...]) -> None:
        spec = {c[0]: c for c in COLUMNS}
        self.table.set_columns(
            [
                Column(key, sort_label(spec[key][1], key, self.sort), width, spec[key][3])
                for key, width in layout
            ]
        )
        self._layout = layout

    @property
    def table(self) -> ThemedTable:
        """The table of sources."""
        if self._table is None:
            self._table = self.query_one("#sources-table", ThemedTable)
        return self._table

    def _sorted(self, rows: list[SourceHealth], now: datetime) -> list[SourceHealth]:
        def role(s: SourceHealth) -> str:
            return "error" if s.stale(now) else state_role(s.state)

        # Failing sources first by default: in a short terminal only the top rows show.
        rows = sorted(rows, key=lambda s: (_ROLE_ORDER[role(s)], s.name))
        column, descending = self.sort
        keys: dict[str, Callable[[SourceHealth], Any]] = {
            "name": lambda s: s.name.lower(),
            "kind": lambda s: s.kind,
            "state": lambda s: _ROLE_ORDER[role(s)],
            "last_ok": lambda s: s.age_s(now),
            "lag": lambda s: s.lag_s,
            "calls": lambda s: s.calls_last_hour,
            "error": lambda s: (s.last_error or s.detail or "").lower(),
        }
        key = keys[column]
        known = sorted((s for s in rows if key(s) is not None), key=key, reverse=descending)
        return known + [s for s in rows if key(s) is None]

    def _cells(self, s: SourceHealth, snapshot: Snapshot) -> dict[str, Cell]:
        cell = self.table.cell
        now = snapshot.now
        ok_age = s.age_s(now)
        error = s.last_error or s.detail
        # The collector that stopped polled every source but the meter's own writers.
        stale = s.stale(now) or bool(
            snapshot.feed_stopped and s.state in LIVE_STATES and s.kind not in HEARTBEAT_KINDS
        )
        if stale:
            # Its own words (``listening on ...``) are no longer true: say how long it is silent.
            error = f"no successful poll for {fmt.age(ok_age)}"
            if s.kind in HEARTBEAT_KINDS:
                error = f"no heartbeat for {fmt.age(ok_age)}" + (
                    f" (was: {s.detail})" if s.detail else ""
                )
        state = s.shown_state(now)
        if stale and state in LIVE_STATES:
            state = "stale"
        return {
            "name": cell(s.name, "bold"),
            "kind": cell(s.kind, "muted"),
            "state": cell(state, "error" if stale else state_role(s.state)),
            "last_ok": cell(
                "never" if ok_age is None else fmt.age(ok_age),
                "error" if stale else "warning" if ok_age is None or ok_age > 600 else "",
                right=True,
            ),
            "lag": cell(fmt.age(s.lag_s), right=True),
            "calls": cell(fmt.count(s.calls_last_hour), right=True),
            "error": cell(error, "error" if s.last_error or stale else "muted"),
        }

    def apply(self, snapshot: Snapshot) -> None:
        now = snapshot.now
        rows = self._sorted(list(snapshot.sources), now)
        newest = max((s.last_success for s in rows if s.last_success), default=None)
        # One count: the badge speaks of the same sources as the line beside it.
        self.badge.empty_text = "no sources" if not rows else "none ok yet"
        self.show_freshness(snapshot.feed(None, newest), now)
        failing = sum(state_role(s.state) == "error" for s in rows)
        stale = sum(s.stale(now) and state_role(s.state) != "error" for s in rows)
        self.set_info(
            Content.assemble(
                (str(len(rows)), "bold"),
                f" source{'s' if len(rows) != 1 else ''}",
                (f" · {failing} failing", "bold $error") if failing else "",
                (f" · {stale} stale", "bold $error") if stale else "",
            )
        )
        all_cells = [self._cells(s, snapshot) for s in rows]
        layout = self._fit(all_cells)
        if layout != self._layout:
            self._set_columns(layout)
        # The table cuts what does not fit with "…" (names and the last error).
        self.table.set_rows([(s.name, cells) for s, cells in zip(rows, all_cells, strict=True)])
        cpu = self.cpu.sample()
        calls = sum(s.calls_last_hour for s in rows)
        muted = "$text-muted"
        # Without any source of spend, say how to get one rather than show an empty monitor.
        spend_kinds = {"openai", "anthropic", "demo", "meter"}
        hint = (
            ()
            if any(s.kind in spend_kinds for s in rows)
            else (
                (
                    "no spend source: set OPENAI_ADMIN_KEY or ANTHROPIC_ADMIN_KEY, or try "
                    "tokentop --demo  ",
                    "$warning",
                ),
            )
        )
        update_static(
            self.query_one("#sources-monitor", Static),
            Content.assemble(
                *hint,
                ("monitor cpu ", muted),
                ("—" if cpu is None else f"{cpu:.1f}%", "bold"),
                ("  api calls ", muted),
                (f"{fmt.count(calls)}/h", "bold"),
                (f" ({calls / 60:.1f}/min)", muted),
            ),
        )
