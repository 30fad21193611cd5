"""What every pane has: a border with its title, a header line with a freshness badge."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import ClassVar

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.widget import Widget
from textual.widgets import Static

from tokentop.tui.snapshot import Snapshot
from tokentop.tui.widgets.freshness import FreshnessBadge
from tokentop.tui.widgets.quiet import update_static


class Pane(Vertical):
    """A bordered pane fed by :class:`~tokentop.tui.snapshot.Snapshot` objects.

    Subclasses set ``PANE_ID`` and ``TITLE``, yield their widgets from :meth:`compose_body` and
    copy values in :meth:`apply`, which runs on the event loop inside a batch update.
    """

    PANE_ID: ClassVar[str] = ""
    TITLE: ClassVar[str] = ""

    def __init__(self, *, stale_after: float = 300.0, empty_text: str = "no data") -> None:
        super().__init__(id=self.PANE_ID, classes="pane")
        self.border_title = self.TITLE
        self._stale_after = stale_after
        self._empty_text = empty_text

    def compose(self) -> ComposeResult:
        with Horizontal(classes="pane-header"):
            yield Static("", classes="pane-info")
            yield FreshnessBadge(stale_after=self._stale_after, empty_text=self._empty_text)
        yield from self.compose_body()

    def compose_body(self) -> Iterable[Widget]:
        """The pane's own widgets."""
        return ()

    @property
    def badge(self) -> FreshnessBadge:
        """This pane's freshness badge."""
        return self.query_one(FreshnessBadge)

    def set_info(self, content: Content | str) -> None:
        """Text on the left of the header line."""
        update_static(self.query_one(".pane-info", Static), content)

    def apply(self, snapshot: Snapshot) -> None:
        """Show ``snapshot``."""

    def tick(self, now: datetime) -> None:
        """Age the freshness badge without new data."""
        self.badge.tick(now)

    @property
    def inner_width(self) -> int:
        """Width available to text lines (falls back before the first layout)."""
        return max(20, self.content_size.width or 60)
