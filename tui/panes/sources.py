"""Sources: each collector's state, last success, lag and errors; the monitor's own cost."""

from __future__ import annotations

import time
from collections.abc import Iterable

from rich.text import Text
from textual.content import Content
from textual.widget import Widget
from textual.widgets import Static

from tokentop.store.records import SourceHealth
from tokentop.tui import format as fmt
from tokentop.tui.panes.base import Pane
from tokentop.tui.snapshot import Snapshot
from tokentop.tui.widgets.quiet import update_static
from tokentop.tui.widgets.table import Role, ThemedTable

COLUMNS: tuple[tuple[str, str, int, bool], ...] = (
    ("name", "Source", 14, False),
    ("kind", "Kind", 10, False),
    ("state", "State", 12, False),
    ("last_ok", "Last ok", 7, True),
    ("lag", "Lag", 6, True),
    ("calls", "Calls/h", 7, True),
    ("error", "Last error", 0, False),
)
"""Key, heading, width (0: the rest of the pane), right-aligned."""


def state_role(state: str) -> Role:
    """Colour role of a source state: failures red, healthy green, anything else amber."""
    s = state.lower()
    if any(word in s for word in ("auth", "error", "fail", "dead")):
        return "error"
    if s in ("ok", "live", "running", "idle", "healthy"):
        return "success"
    return "warning"


class CpuMeter:
    """The monitor process's CPU use between two samples (all threads, runner included)."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None

    def sample(self) -> float | None:
        """Percent of one core used since the previous sample; ``None`` the first time."""
        now = (time.monotonic(), time.process_time())
        last, self._last = self._last, now
        if last is None or now[0] <= last[0]:
            return None
        return (now[1] - last[1]) / (now[0] - last[0]) * 100


class SourcesPane(Pane):
    """A table of sources (state, last success, lag, calls per hour, last error) and a line
    with the monitor's CPU and total API-call rate."""

    PANE_ID = "sources"
    TITLE = "Sources"

    def __init__(self, *, stale_after: float = 300.0) -> None:
        super().__init__(stale_after=stale_after, empty_text="no sources")
        self.cpu = CpuMeter()
        self._row_keys: list[str] = []
        self._error_w = 0

    def compose_body(self) -> Iterable[Widget]:
        yield ThemedTable(id="sources-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="sources-monitor")

    def _error_width(self) -> int:
        fixed = sum(w + 2 for _, _, w, _ in COLUMNS) + 2 + 1
        return max(20, self.inner_width - fixed - 2)

    def _set_columns(self) -> None:
        table = self.table
        table.clear(columns=True)
        self._row_keys = []
        self._error_w = self._error_width()
        for key, label, width, right in COLUMNS:
            table.add_column(
                Text(label, justify="right" if right else "left"),
                key=key,
                width=width or self._error_w,
            )

    def on_mount(self) -> None:
        self._set_columns()

    @property
    def table(self) -> ThemedTable:
        """The table of sources."""
        return self.query_one("#sources-table", ThemedTable)

    def _cells(self, s: SourceHealth, snapshot: Snapshot) -> dict[str, Text]:
        cell = self.table.cell
        now = snapshot.now
        ok_age = None if s.last_success is None else (now - s.last_success).total_seconds()
        error = s.last_error or s.detail
        return {
            "name": cell(s.name, "bold"),
            "kind": cell(s.kind, "muted"),
            "state": cell(s.state, state_role(s.state)),
            "last_ok": cell(
                "never" if ok_age is None else fmt.age(ok_age),
                "warning" if ok_age is None or ok_age > 600 else "",
                right=True,
            ),
            "lag": cell(fmt.age(s.lag_s), right=True),
            "calls": cell(fmt.count(s.calls_last_hour), right=True),
            "error": cell(error, "error" if s.last_error else "muted"),
        }

    def apply(self, snapshot: Snapshot) -> None:
        # Failing sources first: in a short terminal only the top rows show.
        order = {"error": 0, "warning": 1, "": 2, "success": 2}
        rows = sorted(snapshot.sources, key=lambda s: (order[state_role(s.state)], s.name))
        newest = max((s.last_success for s in rows if s.last_success), default=None)
        self.badge.show(newest, snapshot.now)
        failing = sum(state_role(s.state) == "error" for s in rows)
        self.set_info(
            Content.assemble(
                (str(len(rows)), "bold"),
                f" source{'s' if len(rows) != 1 else ''}",
                (f" · {failing} failing", "bold $error") if failing else "",
            )
        )
        if self._error_w != self._error_width():
            self._set_columns()
        table = self.table
        keys = [s.name for s in rows]
        if keys == self._row_keys:
            for s in rows:
                for column, value in self._cells(s, snapshot).items():
                    table.set_cell(s.name, column, value)
        else:
            table.clear()
            for s in rows:
                cells = self._cells(s, snapshot)
                table.add_row(*(cells[c[0]] for c in COLUMNS), key=s.name)
            self._row_keys = keys
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
