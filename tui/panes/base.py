"""What every pane has: a border with its title, a header line with a freshness badge."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import ClassVar

from textual import events
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Static

from tokentop.tui.snapshot import Feed, Snapshot
from tokentop.tui.widgets.freshness import FreshnessBadge
from tokentop.tui.widgets.quiet import update_static


class Pane(Vertical):
    """A bordered pane fed by :class:`~tokentop.tui.snapshot.Snapshot` objects.

    Subclasses set ``PANE_ID`` and ``TITLE``, yield their widgets from :meth:`compose_body` and
    copy values in :meth:`apply`, which runs on the event loop inside a batch update. A pane
    lays its text out for its own size: it is applied again, from the snapshot it last showed,
    whenever its size changes (a resize, a zoom, a layout switch), so nothing is cut at a
    width measured earlier.

    A pane without a focusable widget of its own (a table) takes the focus itself, so that
    ``tab`` can visit every pane.
    """

    PANE_ID: ClassVar[str] = ""
    TITLE: ClassVar[str] = ""

    def __init__(self, *, stale_after: float = 300.0, empty_text: str = "no data") -> None:
        super().__init__(id=self.PANE_ID, classes="pane")
        self.border_title = self.TITLE
        self._stale_after = stale_after
        self._empty_text = empty_text
        self.snapshot: Snapshot | None = None
        """The snapshot on show (``None`` until the first refresh that included this pane)."""
        self._shown_size = (0, 0)
        self._badge: FreshnessBadge | None = None
        self._info: Static | None = None

    @property
    def focus_target(self) -> Widget:
        """What takes the focus when ``tab`` comes to this pane."""
        return self

    def on_mount(self) -> None:
        self.can_focus = self.focus_target is self
        self.set_info(Content.styled("loading…", "$text-muted"))

    def show(self, snapshot: Snapshot) -> None:
        """Show ``snapshot`` and keep it, to lay it out again at another width."""
        if self.snapshot is None:
            self.badge.loading_text = ""  # the first refresh returned: no longer loading
        self.snapshot = snapshot
        self._shown_size = (self.content_size.width, self.content_size.height)
        self.apply(snapshot)

    class Resized(Message):
        """The pane's size changed: the app checks whether its tables have room for another
        number of rows than it last queried."""

        def __init__(self, pane: Pane) -> None:
            super().__init__()
            self.pane = pane

        @property
        def control(self) -> Pane:
            """The pane."""
            return self.pane

        def can_replace(self, message: Message) -> bool:
            """Only the last size matters."""
            return isinstance(message, Pane.Resized) and message.pane is self.pane

    def on_resize(self, event: events.Resize) -> None:
        # After this refresh: a layout asked for from inside one can be lost.
        self.call_after_refresh(self._reshow)
        self.post_message(self.Resized(self))

    def _reshow(self) -> None:
        size = (self.content_size.width, self.content_size.height)
        if self.snapshot is not None and size != self._shown_size:
            self.show(self.snapshot)

    def set_paused(self, paused: bool) -> None:
        """Say ``paused`` instead of ``live`` on the badge while the app does not refresh."""
        self.badge.set_paused(paused)

    def compose(self) -> ComposeResult:
        with Horizontal(classes="pane-header"):
            yield Static("", classes="pane-info")
            yield FreshnessBadge(
                stale_after=self._stale_after, empty_text=self._empty_text, loading_text="loading…"
            )
        yield from self.compose_body()

    def compose_body(self) -> Iterable[Widget]:
        """The pane's own widgets."""
        return ()

    @property
    def badge(self) -> FreshnessBadge:
        """This pane's freshness badge (found once: every refresh asks for it)."""
        if self._badge is None:
            self._badge = self.query_one(FreshnessBadge)
        return self._badge

    def set_info(self, content: Content | str) -> None:
        """Text on the left of the header line."""
        if self._info is None:
            self._info = self.query_one(".pane-info", Static)
        update_static(self._info, content)

    def apply(self, snapshot: Snapshot) -> None:
        """Show ``snapshot``."""

    def show_freshness(self, feed: Feed, now: datetime) -> bool:
        """Show how fresh the pane's sources are; returns whether its figures are stale (the
        pane is then marked ``-stale`` and its rates must read as unknown)."""
        self.badge.show_feed(feed, now)
        stale = self.badge.is_stale
        self.set_class(stale, "-stale")
        return stale

    def tick(self, now: datetime) -> None:
        """Age the freshness badge without new data."""
        self.badge.tick(now)
        self.set_class(self.badge.is_stale, "-stale")

    @property
    def inner_width(self) -> int:
        """Width available to text lines (falls back before the first layout)."""
        return max(20, self.content_size.width or 60)


def flow(items: list[Content], width: int, gap: str = "  ") -> list[Content]:
    """Lay ``items`` (each a label with its value) on as few lines of ``width`` as they take,
    breaking only between items: a label never ends a line whose value starts the next."""
    lines: list[Content] = []
    line: Content | None = None
    for item in items:
        if line is None:
            line = item
        elif line.cell_length + len(gap) + item.cell_length <= width:
            line = line + gap + item
        else:
            lines.append(line)
            line = item
    if line is not None:
        lines.append(line)
    return lines
