"""A badge that says how old the data behind a pane is: ``live · 3s ago`` or ``stale · 12m``."""

from __future__ import annotations

from datetime import datetime

from textual.reactive import reactive
from textual.widgets import Static

from tokentop.tui.format import age
from tokentop.tui.widgets.quiet import update_static


class FreshnessBadge(Static):
    """How fresh a pane's data is, measured on the app's clock.

    The age is recomputed by :meth:`tick` without any query, so a paused or starved view still
    shows its data getting older. States are CSS classes: ``-live``, ``-stale`` (older than
    ``stale_after``), ``-dead`` (older than ten times that) and ``-empty`` (no data at all).
    """

    DEFAULT_CSS = """
    FreshnessBadge {
        width: auto;
        height: 1;
        padding: 0 1;
        color: $success;
    }
    FreshnessBadge.-stale { color: $warning; text-style: bold; }
    FreshnessBadge.-dead { color: $error; text-style: bold; }
    FreshnessBadge.-empty { color: $text-muted; }
    FreshnessBadge.-loading { color: $accent; text-style: bold; }
    """

    newest: reactive[datetime | None] = reactive(None, init=False)
    """Time of the newest data point behind the pane."""
    now: reactive[datetime | None] = reactive(None, init=False)
    """The app's clock at the last tick."""
    stale_after: reactive[float] = reactive(300.0, init=False)
    """Seconds after which the data counts as stale."""

    def __init__(
        self,
        *,
        stale_after: float = 300.0,
        empty_text: str = "no data",
        id: str | None = None,
        classes: str | None = None,
    ) -> None:
        super().__init__("", id=id, classes=classes, markup=False)
        self.set_reactive(FreshnessBadge.stale_after, stale_after)
        self.empty_text = empty_text
        self.loading_text = ""
        """Said instead of the age while the sources are still loading (``backfill 40%``)."""

    def on_mount(self) -> None:
        self._render_state()

    def show(self, newest: datetime | None, now: datetime) -> None:
        """Set the newest data time and the clock together (one repaint)."""
        self.set_reactive(FreshnessBadge.newest, newest)
        self.set_reactive(FreshnessBadge.now, now)
        self._render_state()

    def tick(self, now: datetime) -> None:
        """Age the badge to ``now``."""
        self.set_reactive(FreshnessBadge.now, now)
        self._render_state()

    @property
    def age_s(self) -> float | None:
        """Age of the data in seconds; ``None`` without data."""
        if self.newest is None or self.now is None:
            return None
        return max(0.0, (self.now - self.newest).total_seconds())

    @property
    def state(self) -> str:
        """``live``, ``stale``, ``dead`` or ``empty``."""
        seconds = self.age_s
        if seconds is None:
            return "empty"
        if seconds <= self.stale_after:
            return "live"
        return "stale" if seconds <= 10 * self.stale_after else "dead"

    def watch_stale_after(self) -> None:
        self._render_state()

    def _render_state(self) -> None:
        state = self.state
        seconds = self.age_s
        self.set_class(bool(self.loading_text), "-loading")
        if self.loading_text:
            text = self.loading_text
        elif state == "empty":
            text = self.empty_text
        elif state == "live":
            text = "live · now" if (seconds or 0) < 1 else f"live · {age(seconds)} ago"
        else:
            text = f"stale · {age(seconds)}"
        for name in ("live", "stale", "dead", "empty"):
            self.set_class(name == state, f"-{name}")
        update_static(self, text)
