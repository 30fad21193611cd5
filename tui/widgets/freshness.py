"""A badge that says how old the data behind a pane is: ``live · 3s ago`` or ``stale · 12m``."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from textual.reactive import reactive
from textual.widgets import Static

from tokentop.tui.format import age
from tokentop.tui.widgets.quiet import update_static

if TYPE_CHECKING:
    from tokentop.tui.snapshot import Feed


BADGE_WIDTH = 16
"""Text cells within the badge's least width (``paused · 59s ago``)."""


class FreshnessBadge(Static):
    """How fresh a pane's data is, measured on the app's clock.

    The age is recomputed by :meth:`tick` without any query, so a paused or starved view still
    shows its data getting older. States are CSS classes: ``-live``, ``-stale``, ``-dead`` (stale
    for ten times the limit) and ``-empty`` (no data at all).

    Fed with :meth:`show_feed`, staleness is that of the sources behind the pane: stale once the
    freshest of them has not succeeded for its own limit (three of its intervals, at least 10 s),
    or at once when the collector feeding the screen stopped. Without source health it falls
    back to the age of the data against ``stale_after``.
    """

    DEFAULT_CSS = """
    FreshnessBadge {
        width: auto;
        min-width: 18;
        height: 1;
        padding: 0 1;
        color: $success;
        text-align: right;
    }
    FreshnessBadge.-stale { color: $warning; text-style: bold; }
    FreshnessBadge.-dead { color: $error; text-style: bold; }
    FreshnessBadge.-empty { color: $text-muted; }
    FreshnessBadge.-loading { color: $accent; text-style: bold; }
    FreshnessBadge.-paused { color: $warning; text-style: bold; }
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
        loading_text: str = "",
        id: str | None = None,
        classes: str | None = None,
    ) -> None:
        super().__init__("", id=id, classes=classes, markup=False)
        self.set_reactive(FreshnessBadge.stale_after, stale_after)
        self.empty_text = empty_text
        self.loading_text = loading_text
        """Said instead of the age while the sources are still loading (``backfill 40%``), or
        until the first refresh returns (``loading…``)."""
        self.paused = False
        """The app does not refresh: ``paused`` replaces ``live`` (stale stays stale)."""
        self.fed_at: datetime | None = None
        """The last successful poll of the freshest source behind the pane, if known."""
        self.feed_limit: float | None = None
        """That source's staleness limit in seconds."""
        self.stopped = ""
        """Why the feed is known dead (the collector stopped), or ``""``."""

    def on_mount(self) -> None:
        self._render_state()

    def show(self, newest: datetime | None, now: datetime) -> None:
        """Set the newest data time and the clock together (one repaint)."""
        self.set_reactive(FreshnessBadge.newest, newest)
        self.set_reactive(FreshnessBadge.now, now)
        self._render_state()

    def show_feed(self, feed: Feed, now: datetime) -> None:
        """Show a pane's :class:`~tokentop.tui.snapshot.Feed` at ``now``."""
        self.fed_at = feed.fed_at
        self.feed_limit = feed.stale_after
        self.stopped = feed.stopped
        self.show(feed.newest, now)

    def set_paused(self, paused: bool) -> None:
        """Say ``paused`` instead of ``live`` while the app does not refresh."""
        if paused != self.paused:
            self.paused = paused
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
    def stale_age_s(self) -> float | None:
        """Seconds since the feed last succeeded (the data's age without source health)."""
        if self.fed_at is None or self.feed_limit is None or self.now is None:
            return self.age_s
        return max(0.0, (self.now - self.fed_at).total_seconds())

    @property
    def limit_s(self) -> float:
        """Seconds after which the feed counts as stale."""
        if self.fed_at is None or self.feed_limit is None:
            return self.stale_after
        return self.feed_limit

    @property
    def state(self) -> str:
        """``live``, ``stale``, ``dead`` or ``empty``."""
        if self.age_s is None:
            return "empty"
        seconds = self.stale_age_s or 0.0
        if seconds <= self.limit_s and not self.stopped:
            return "live"
        return "stale" if seconds <= 10 * self.limit_s else "dead"

    @property
    def is_stale(self) -> bool:
        """Whether the figures behind this badge are stale (rates are then unknown)."""
        return self.state in ("stale", "dead")

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
            word = "paused" if self.paused else "live"
            text = f"{word} · now" if (seconds or 0) < 1 else f"{word} · {age(seconds)} ago"
        else:
            text = f"stale · {age(self.stale_age_s)}"
        for name in ("live", "stale", "dead", "empty"):
            self.set_class(name == state, f"-{name}")
        self.set_class(self.paused and state == "live" and not self.loading_text, "-paused")
        # Within its least width the badge keeps its size: "live · now" becoming
        # "live · 1s ago" repaints the badge, not the layout of the pane (every second).
        shown = getattr(self, "_tokentop_shape", (1, BADGE_WIDTH + 1))[1]
        update_static(self, text, layout=max(len(text), shown) > BADGE_WIDTH)
