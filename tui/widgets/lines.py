"""Lines of text that a pane lays out itself, redrawn one line at a time.

A ``Static`` draws its whole text again when any of it changes: every line goes through
Textual's wrapping and formatting, and the compositor restyles every line. The figures of a live
pane tick every second, a few lines at a time, so that was a fair part of an idle repaint. The
panes lay their lines out for their own width (nothing wraps: a label never parts from its
value), so this widget only keeps each line's drawing until that line changes, and asks for a
repaint of the changed lines alone.

Text from outside must be cleaned before it gets here (:func:`~tokentop.store.text.clean`);
it is never parsed as markup. A line wider than the widget ends in ``…``.
"""

from __future__ import annotations

from collections.abc import Sequence

from textual.content import Content
from textual.geometry import Region, Size
from textual.strip import Strip
from textual.widget import Widget

from tokentop.tui.widgets.quiet import content_key


class Lines(Widget):
    """Lines of :class:`~textual.content.Content`, one per row, as tall as there are lines."""

    DEFAULT_CSS = """
    Lines {
        height: auto;
    }
    """

    ALLOW_SELECT = False
    """Lines are drawn without the offsets that Textual's mouse selection reads."""

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._lines: list[Content] = []
        self._keys: list[object] = []
        self._strips: dict[int, Strip] = {}
        """Drawn lines by row, for :attr:`_drawn_for`."""
        self._drawn_for: object = None
        """(width, theme) the drawn lines were drawn for."""

    @property
    def lines(self) -> list[Content]:
        """The lines shown."""
        return list(self._lines)

    def render(self) -> Content:
        """All the lines as one text (what tests and a text selection read)."""
        return Content("\n").join(self._lines)

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return len(self._lines)

    def get_content_width(self, container: Size, viewport: Size) -> int:
        return max((line.cell_length for line in self._lines), default=0)

    def set_lines(self, lines: Sequence[Content | str]) -> None:
        """Show ``lines``; only the rows whose text or styles changed are drawn again."""
        new = [Content(line) if isinstance(line, str) else line for line in lines]
        keys = [content_key(line) for line in new]
        if keys == self._keys:
            return
        old = self._keys
        self._lines, self._keys = new, keys
        if len(keys) != len(old):
            self._strips.clear()
            self.refresh(layout=True)  # as tall as its lines
            return
        width = self.size.width
        changed = [y for y, (a, b) in enumerate(zip(old, keys, strict=True)) if a != b]
        for y in changed:
            self._strips.pop(y, None)
        self.refresh(*(Region(0, y, width, 1) for y in changed))

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._strips.clear()

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        drawn_for = (width, self.app.theme)
        if drawn_for != self._drawn_for:
            self._strips.clear()
            self._drawn_for = drawn_for
        strip = self._strips.get(y)
        if strip is None:
            style = self.visual_style
            if y < len(self._lines):
                line = self._lines[y]
                if line.cell_length > width:
                    line = line.truncate(width, ellipsis=True)
                strip = Strip(line.render_segments(style), line.cell_length)
                strip = strip.extend_cell_length(width, style.rich_style)
            else:
                strip = Strip.blank(width, style.rich_style)
            self._strips[y] = strip
        return strip
