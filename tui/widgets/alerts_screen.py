"""The alert list (``a``): alerts now, with their history; ``enter`` acknowledges in the TUI.

Acknowledging only hides an alert from this app's strip: the collector's state, Alertmanager
and the webhook are untouched (silences are Alertmanager's job).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.content import Content
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static
from textual.worker import get_current_worker

from tokentop.store.alerts import AlertState, Episode
from tokentop.store.text import clean
from tokentop.tui.format import age
from tokentop.tui.widgets.alert_strip import AlertStrip, ack_key


class HistoryRead(Message):
    """The screen's worker read the alert history."""

    def __init__(self, episodes: tuple[Episode, ...]) -> None:
        super().__init__()
        self.episodes = episodes


class AlertsScreen(ModalScreen[None]):
    """Every alert that is not inactive, and the latest firings.

    Args:
        strip: the app's strip (its states and acknowledgements are shared).
        read_history: returns the latest episodes (blocking; run in a thread worker).
        clock: the app's clock.
    """

    DEFAULT_CSS = """
    AlertsScreen { align: center middle; }
    AlertsScreen > Vertical {
        width: 96%;
        max-width: 150;
        height: 90%;
        border: round $error;
        background: $surface;
        padding: 0 1;
    }
    AlertsScreen .alerts-title { text-style: bold; color: $accent; padding-top: 1; }
    AlertsScreen #alerts-now { height: auto; max-height: 12; }
    AlertsScreen #alerts-history { height: 1fr; }
    AlertsScreen #alerts-foot { color: $text-muted; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss", "Close", id="alerts-close"),
        Binding("a", "dismiss", "Close", show=False, id="alerts-close-2"),
        Binding("q", "dismiss", "Close", show=False, id="alerts-close-3"),
        Binding(
            "enter",
            "acknowledge",
            "Acknowledge",
            id="alerts-ack",
            tooltip="Hide (or show again) the selected alert in this TUI only",
        ),
    ]

    def __init__(
        self,
        strip: AlertStrip,
        read_history: Callable[[], Sequence[Episode]],
        clock: Callable[[], datetime],
    ) -> None:
        super().__init__()
        self.strip = strip
        self._read_history = read_history
        self._clock = clock
        self.episodes: tuple[Episode, ...] = ()
        self._rows: list[AlertState] = []

    def compose(self) -> ComposeResult:
        with Vertical() as box:
            box.border_title = "alerts"
            yield Static("Now", classes="alerts-title")
            now: DataTable[Content | str] = DataTable(cursor_type="row", id="alerts-now")
            now.add_column("State", key="state", width=9)
            now.add_column("Severity", key="severity", width=9)
            now.add_column("Rule", key="rule", width=22)
            now.add_column("Figure", key="figure", width=64)
            now.add_column("Since", key="since", width=7)
            now.add_column("Ack", key="ack", width=4)
            yield now
            yield Static("History", classes="alerts-title")
            past: DataTable[Content | str] = DataTable(
                cursor_type="row", zebra_stripes=True, id="alerts-history"
            )
            past.add_column("Fired", key="fired", width=12)
            past.add_column("Rule", key="rule", width=22)
            past.add_column("Severity", key="severity", width=9)
            past.add_column("When it fired", key="summary", width=60)
            past.add_column("Lasted", key="lasted", width=9)
            yield past
            yield Static(
                "enter: acknowledge (this TUI only; Alertmanager keeps its silences) · esc: close",
                id="alerts-foot",
            )

    def on_mount(self) -> None:
        self.fill_now()
        self._load_history()

    @work(thread=True, exclusive=True, group="alert-history", exit_on_error=False)
    def _load_history(self) -> None:
        episodes = tuple(self._read_history())
        if not get_current_worker().is_cancelled:
            self.post_message(HistoryRead(episodes))

    def on_history_read(self, message: HistoryRead) -> None:
        self.episodes = message.episodes
        self.fill_history()

    def fill_now(self) -> None:
        """The alerts that are not inactive, from the strip's last read."""
        table = self.query_one("#alerts-now", DataTable)
        row = table.cursor_row
        table.clear()
        now = self._clock()
        self._rows = list(self.strip.states)
        for i, s in enumerate(self._rows):
            since = s.fired_at or s.active_since
            if s.state == "resolved" and s.resolved_at:
                since = s.resolved_at
            style = "$error" if s.state == "firing" and s.severity == "critical" else "$warning"
            table.add_row(
                Content.from_markup(f"[b {style}]$s[/]", s=s.state),
                s.severity,
                clean(s.rule),
                clean(s.summary),
                age((now - since).total_seconds()),
                "yes" if ack_key(s) in self.strip.acked else "",
                key=str(i),
            )
        if not self._rows:
            table.add_row("", "", "none", "no alert is pending or firing", "", "", key="none")
        if self._rows:
            table.move_cursor(row=min(row, len(self._rows) - 1))

    def fill_history(self) -> None:
        """The latest firings, newest first."""
        table = self.query_one("#alerts-history", DataTable)
        table.clear()
        for e in self.episodes:
            lasted = "firing"
            if e.resolved_at is not None:
                lasted = age((e.resolved_at - e.fired_at).total_seconds())
            table.add_row(
                e.fired_at.astimezone().strftime("%m-%d %H:%M"),
                clean(e.rule),
                e.severity,
                clean(e.summary),
                lasted,
                key=str(e.id),
            )

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        # The table has the focus, so its own enter binding (select) wins over the screen's.
        if event.data_table.id == "alerts-now":
            event.stop()
            self.action_acknowledge()

    def action_acknowledge(self) -> None:
        """Acknowledge the selected firing alert (or take the acknowledgement back)."""
        table = self.query_one("#alerts-now", DataTable)
        if not self._rows or not 0 <= table.cursor_row < len(self._rows):
            return
        state = self._rows[table.cursor_row]
        if state.state != "firing":
            self.notify("only a firing alert can be acknowledged", timeout=3)
            return
        if ack_key(state) in self.strip.acked:
            self.strip.unacknowledge(state)
        else:
            self.strip.acknowledge(state)
        self.fill_now()
