"""The strip of firing alerts under the top bar, in the error colour; hidden when none fire.

The collector (``tokentop collect``, or this app's own runner) evaluates the rules and keeps
their state in the database; the strip reads that state in a thread worker, on its own timer or
fed by the app's refresh (one worker a second instead of two), so it shows the same alerts
whether this process collects or watches. Acknowledging an alert
hides it here only (Alertmanager's silences stay Alertmanager's); a new firing of the same
rule shows again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from textual import work
from textual.content import Content
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Static
from textual.worker import get_current_worker

from tokentop.store.alerts import AlertState
from tokentop.store.text import clean
from tokentop.tui.format import age
from tokentop.tui.widgets.quiet import update_static

AckKey = tuple[str, str, datetime | None]
"""An acknowledgement: (rule, key, when that firing started)."""


def ack_key(state: AlertState) -> AckKey:
    """What an acknowledgement is tied to: this firing of this alert, not the next one."""
    return (state.rule, state.key, state.fired_at)


class AlertsRead(Message):
    """The strip's worker read the alert states (``None``: the read failed)."""

    def __init__(self, states: tuple[AlertState, ...] | None) -> None:
        super().__init__()
        self.states = states

    def can_replace(self, message: Message) -> bool:
        """Only the newest read matters."""
        return isinstance(message, AlertsRead)


class AlertStrip(Static):
    """Firing alerts: severity, rule, the figure and how long it has fired.

    Args:
        read: returns every alert state (blocking; called in a thread worker).
        clock: the app's clock, for "firing 12m".
        interval_s: seconds between reads; ``None``: no timer of its own, the app reads the
            states in its refresh worker (:meth:`read_now`) and hands them over (:meth:`feed`).
        stale_after_s: an alert the collector has not re-evaluated for this long is shown with
            its age ("as of 12m ago"): the collector may have stopped.
    """

    DEFAULT_CSS = """
    AlertStrip {
        display: none;
        height: auto;
        max-height: 3;
        padding: 0 1;
        background: $error 15%;
        color: $error;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    AlertStrip.-firing { display: block; }
    """

    states: reactive[tuple[AlertState, ...]] = reactive((), init=False, always_update=True)
    """Every alert not inactive, as last read (firing, pending, resolved)."""

    def __init__(
        self,
        read: Callable[[], Sequence[AlertState]],
        clock: Callable[[], datetime],
        *,
        interval_s: float | None = 1.0,
        stale_after_s: float = 300.0,
        id: str | None = "alert-strip",
    ) -> None:
        super().__init__("", id=id, markup=False)
        self._read = read
        self._clock = clock
        self.interval_s = interval_s
        self.stale_after_s = stale_after_s
        self.acked: set[AckKey] = set()
        """Alerts acknowledged in this app (hidden from the strip)."""

    @property
    def firing(self) -> list[AlertState]:
        """The firing alerts, acknowledged or not."""
        return [s for s in self.states if s.state == "firing"]

    @property
    def shown(self) -> list[AlertState]:
        """The firing alerts not acknowledged."""
        return [s for s in self.firing if ack_key(s) not in self.acked]

    def on_mount(self) -> None:
        if self.interval_s:
            self.set_interval(self.interval_s, self.poll, name="alerts")
        self.poll()

    def poll(self) -> None:
        """Read the states now (in a worker)."""
        self._poll()

    def read_now(self) -> tuple[AlertState, ...] | None:
        """Read the states (blocking: call it from a thread); ``None`` when the read failed."""
        try:
            return tuple(self._read())
        except Exception:
            return None  # a busy database: the next read tries again

    def feed(self, states: tuple[AlertState, ...] | None) -> None:
        """Show states read elsewhere (thread-safe), as if this strip had read them."""
        self.post_message(AlertsRead(states))

    @work(thread=True, exclusive=True, group="alerts", exit_on_error=False)
    def _poll(self) -> None:
        states = self.read_now()
        if not get_current_worker().is_cancelled:
            self.post_message(AlertsRead(states))

    def on_alerts_read(self, message: AlertsRead) -> None:
        message.stop()
        if message.states is None:
            return
        if message.states != self.states:
            self.states = message.states
        else:
            self.redraw()  # the same alerts: only their ages may read differently

    def watch_states(self) -> None:
        self.redraw()

    def acknowledge(self, state: AlertState) -> None:
        """Hide this firing of ``state`` from the strip."""
        self.acked.add(ack_key(state))
        self.redraw()

    def unacknowledge(self, state: AlertState) -> None:
        """Show it again."""
        self.acked.discard(ack_key(state))
        self.redraw()

    def redraw(self) -> None:
        """Draw the strip from :attr:`states` and the acknowledgements."""
        live = {ack_key(s) for s in self.firing}
        self.acked &= live  # a resolved alert's acknowledgement goes with it
        shown = self.shown
        self.set_class(bool(shown), "-firing")
        if not shown:
            update_static(self, "")
            return
        now = self._clock()
        hidden = len(self.firing) - len(shown)
        lines = shown if len(shown) <= 3 else shown[:2]
        parts = []
        for s in lines:
            since = s.fired_at or s.active_since
            seen = (now - s.updated_at).total_seconds()
            line = Content.from_markup(
                "[reverse b] $sev [/] [b]$rule[/] $figure [dim]· firing $age[/]",
                sev=s.severity.upper(),
                rule=clean(s.rule),
                figure=clean(s.summary),
                age=age((now - since).total_seconds()),
            )
            if seen > self.stale_after_s:
                line += Content.from_markup("[b $warning] · as of $ago ago[/]", ago=age(seen))
            parts.append(line)
        more = [f"+{len(shown) - len(lines)} more"] if len(lines) < len(shown) else []
        more += [f"{hidden} acknowledged"] if hidden else []
        tail = Content.from_markup("[dim]$t[/]", t=" · ".join([*more, "a: alerts"]))
        if more:
            parts.append(tail)
        else:
            parts[-1] = parts[-1] + Content.from_markup("[dim] · [/]") + tail
        update_static(self, Content("\n").join(parts))
