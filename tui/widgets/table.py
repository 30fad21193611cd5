"""A light table for the panes: theme-coloured cells, a cursor, sortable headings, no scrollbar.

Textual's ``DataTable`` re-renders every cell through Rich whenever any cell changes; a live
pane changes a few cells every second, which made the tables the idle TUI's main cost. This one
draws each line straight from padded strings (the panes fit the columns to the width before,
see :mod:`tokentop.tui.columns`) and keeps each drawn line until its cells change.

Cells are plain text (from outside, so :func:`~tokentop.store.text.clean` is applied, and never
parsed as markup) with a colour *role*; component classes resolve the roles through the theme,
so light and dark themes both work.

Keys: up/down, page up/down, home/end move the cursor (shown while the table has the focus);
``enter`` posts :class:`ThemedTable.RowSelected`. A click on a heading posts
:class:`ThemedTable.HeaderSelected`; a click on a row moves the cursor, a second click on it
selects it. Rows beyond the height scroll with the cursor and the mouse wheel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal, NamedTuple

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Region
from textual.message import Message
from textual.strip import Strip
from textual.widget import Widget

from tokentop.store.text import clean
from tokentop.tui.format import fit

Role = Literal["", "error", "warning", "success", "accent", "muted", "bold"]

ARROWS = {True: "▼", False: "▲"}
"""The sort arrow of a heading: descending, ascending."""


def sort_label(label: str, key: str, sort: tuple[str, bool]) -> str:
    """A column heading, with the sort arrow when the table is sorted by ``key``."""
    return f"{label} {ARROWS[sort[1]]}" if sort[0] == key else label


class Cell(NamedTuple):
    """A cell: its text (already clean), colour role and alignment."""

    plain: str
    role: Role = ""
    right: bool = False

    @property
    def cell_len(self) -> int:
        """Width in terminal cells."""
        return cell_len(self.plain)


class Column(NamedTuple):
    """A column: its key, heading, width in cells (padding excluded) and alignment."""

    key: str
    label: str
    width: int
    right: bool = False


PAD = 1
"""Cells of padding on each side of a column (as ``DataTable``'s ``cell_padding``)."""


class ThemedTable(Widget, can_focus=True):
    """Rows of cells under a heading line; see the module's docstring."""

    DEFAULT_CSS = """
    ThemedTable {
        background: $surface;
        color: $foreground;
        height: auto;
    }
    ThemedTable > .table--header { text-style: bold; background: $panel; color: $foreground; }
    ThemedTable > .table--even { background: $surface-lighten-1 50%; }
    ThemedTable:dark > .table--even { background: $surface-darken-1 40%; }
    ThemedTable > .table--cursor {
        background: $block-cursor-background;
        color: $block-cursor-foreground;
        text-style: $block-cursor-text-style;
    }
    ThemedTable > .themed--error { color: $error; text-style: bold; }
    ThemedTable > .themed--warning { color: $warning; }
    ThemedTable > .themed--success { color: $success; }
    ThemedTable > .themed--accent { color: $accent; }
    ThemedTable > .themed--muted { text-style: dim; }
    ThemedTable > .themed--bold { text-style: bold; }
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "table--header",
        "table--even",
        "table--cursor",
        "themed--error",
        "themed--warning",
        "themed--success",
        "themed--accent",
        "themed--muted",
        "themed--bold",
    }

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "select_cursor", "Select", show=False),
        Binding("up", "cursor_up", "Up", show=False),
        Binding("down", "cursor_down", "Down", show=False),
        Binding("pageup", "page_up", "Page up", show=False),
        Binding("pagedown", "page_down", "Page down", show=False),
        Binding("home", "cursor_home", "First row", show=False),
        Binding("end", "cursor_end", "Last row", show=False),
    ]

    class RowSelected(Message):
        """``enter`` (or a second click) on a row."""

        def __init__(self, table: ThemedTable, row_key: str) -> None:
            super().__init__()
            self.table = table
            self.row_key = row_key

        @property
        def control(self) -> ThemedTable:
            """The table."""
            return self.table

    class HeaderSelected(Message):
        """A click on a column heading."""

        def __init__(self, table: ThemedTable, column_key: str) -> None:
            super().__init__()
            self.table = table
            self.column_key = column_key

        @property
        def control(self) -> ThemedTable:
            """The table."""
            return self.table

    class Resized(Message):
        """The table's size changed (so did the number of rows it shows)."""

        def __init__(self, table: ThemedTable) -> None:
            super().__init__()
            self.table = table

        @property
        def control(self) -> ThemedTable:
            """The table."""
            return self.table

        def can_replace(self, message: Message) -> bool:
            """Only the last size matters."""
            return isinstance(message, ThemedTable.Resized) and message.table is self.table

    def __init__(self, *, id: str | None = None, zebra_stripes: bool = True) -> None:
        super().__init__(id=id)
        self.zebra_stripes = zebra_stripes
        self.columns: list[Column] = []
        """The columns shown, in order."""
        self._keys: list[str] = []
        self._rows: dict[str, dict[str, Cell]] = {}
        self.cursor_row = 0
        """Index of the row under the cursor."""
        self._top = 0
        self._lines: dict[tuple[object, ...], Strip] = {}
        self._styles: dict[str, Style] = {}
        """Rich styles by name (see :meth:`_style`), resolved once per theme:
        looking a component class up through the stylesheet for every cell of every line was
        most of a repaint's cost."""
        self._styles_key: object = None

    # -- content -------------------------------------------------------------------------------

    @staticmethod
    def cell(text: str, role: Role = "", *, right: bool = False) -> Cell:
        """A cell of ``text`` (cleaned: text from outside is never markup nor control codes)
        in the colour of ``role``, right-aligned for figures."""
        return Cell(clean(text), role, right)

    @property
    def row_keys(self) -> list[str]:
        """Keys of the rows, in order."""
        return list(self._keys)

    @property
    def row_count(self) -> int:
        """How many rows the table has."""
        return len(self._keys)

    @property
    def column_keys(self) -> list[str]:
        """Keys of the columns, in order."""
        return [c.key for c in self.columns]

    def get_cell(self, row_key: str, column_key: str) -> Cell:
        """The cell at ``row_key`` and ``column_key``."""
        return self._rows[row_key][column_key]

    def set_columns(self, columns: Sequence[Column]) -> None:
        """Show ``columns`` (the rows keep their cells)."""
        columns = list(columns)
        if columns != self.columns:
            self.columns = columns
            self._lines.clear()
            self.refresh()

    def set_rows(self, rows: Sequence[tuple[str, dict[str, Cell]]]) -> None:
        """Show ``rows`` ((key, cells by column key), in order); the cursor stays on the row
        it was on when that row is still there."""
        selected = self._keys[self.cursor_row] if 0 <= self.cursor_row < len(self._keys) else None
        keys = [key for key, _ in rows]
        cells = {key: dict(row) for key, row in rows}
        if keys == self._keys and cells == self._rows:
            return
        if len(self._lines) > 4096:
            self._lines.clear()
        if keys == self._keys:
            # Same rows in the same order: repaint only the lines whose cells changed.
            changed = [i for i, key in enumerate(keys) if cells[key] != self._rows[key]]
            self._rows = cells
            width = self.size.width
            regions = [
                Region(0, i - self._top + 1, width, 1)
                for i in changed
                if 0 <= i - self._top < self._visible_rows
            ]
            if regions:
                self.refresh(*regions)
            return
        self._keys, self._rows = keys, cells
        if selected in cells:
            self.cursor_row = keys.index(selected)
        self.cursor_row = max(0, min(self.cursor_row, len(keys) - 1))
        self._scroll_to_cursor()
        self.refresh()

    def move_cursor(self, row: int) -> None:
        """Put the cursor on row ``row`` (clamped) and scroll it into view."""
        row = max(0, min(row, len(self._keys) - 1))
        if row != self.cursor_row:
            self.cursor_row = row
            self._scroll_to_cursor()
            self.refresh()

    # -- drawing -------------------------------------------------------------------------------

    @property
    def _visible_rows(self) -> int:
        return max(1, self.size.height - 1)

    def _scroll_to_cursor(self) -> None:
        visible = self._visible_rows
        if self.cursor_row < self._top:
            self._top = self.cursor_row
        elif self.cursor_row >= self._top + visible:
            self._top = self.cursor_row - visible + 1
        self._top = max(0, min(self._top, max(0, len(self._keys) - visible)))

    def on_resize(self) -> None:
        self._scroll_to_cursor()
        self.post_message(self.Resized(self))

    def on_focus(self) -> None:
        self.refresh()  # the cursor shows only where the keys go

    def on_blur(self) -> None:
        self.refresh()

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._styles.clear()
        self._lines.clear()

    def _style(self, name: str) -> Style:
        """The rich style called ``name``: ``base`` (the table's own), ``header``, ``cursor``,
        ``even`` (the line kinds) or ``role-`` and a :data:`Role` (partial: laid over a line's
        style)."""
        theme = self.app.theme
        if theme != self._styles_key:
            self._styles.clear()
            self._styles_key = theme
        style = self._styles.get(name)
        if style is None:
            if name == "base":
                style = self.rich_style
            elif name in ("header", "cursor", "even"):
                style = self.get_component_rich_style(f"table--{name}")
            elif name != "role-":
                style = self.get_component_rich_style(f"themed--{name[5:]}", partial=True)
            else:
                style = Style()
            self._styles[name] = style
        return style

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        if y == 0:
            return self._line(("header",), [(c.label, "", c.right) for c in self.columns], width)
        index = self._top + y - 1
        if index >= len(self._keys):
            return Strip.blank(width, self._style("base"))
        key = self._keys[index]
        row = self._rows[key]
        cursor = self.has_focus and index == self.cursor_row
        kind = "cursor" if cursor else "even" if self.zebra_stripes and index % 2 else "odd"
        cells = [row.get(c.key, Cell("")) for c in self.columns]
        return self._line((kind,), [(c.plain, c.role, c.right) for c in cells], width)

    def _line(self, kind: tuple[str], cells: list[tuple[str, Role, bool]], width: int) -> Strip:
        key = (kind, tuple(cells), width, tuple(self.columns), self.app.theme, self.has_focus)
        strip = self._lines.get(key)
        if strip is not None:
            return strip
        base = self._style("base")
        row_style = base + self._style(kind[0]) if kind[0] != "odd" else base
        segments: list[Segment] = []
        for column, (text, role, right) in zip(self.columns, cells, strict=False):
            text = fit(text, column.width)
            padding = " " * (column.width - cell_len(text))
            body = padding + text if right else text + padding
            style = row_style + self._style("role-" + role) if kind[0] != "cursor" else row_style
            segments += [
                Segment(" " * PAD, row_style),
                Segment(body, style),
                Segment(" " * PAD, row_style),
            ]
        strip = Strip(segments).crop_extend(0, width, row_style)
        self._lines[key] = strip
        return strip

    # -- keys and mouse ------------------------------------------------------------------------

    def action_cursor_up(self) -> None:
        """One row up."""
        self.move_cursor(self.cursor_row - 1)

    def action_cursor_down(self) -> None:
        """One row down."""
        self.move_cursor(self.cursor_row + 1)

    def action_page_up(self) -> None:
        """One screen up."""
        self.move_cursor(self.cursor_row - self._visible_rows)

    def action_page_down(self) -> None:
        """One screen down."""
        self.move_cursor(self.cursor_row + self._visible_rows)

    def action_cursor_home(self) -> None:
        """The first row."""
        self.move_cursor(0)

    def action_cursor_end(self) -> None:
        """The last row."""
        self.move_cursor(len(self._keys) - 1)

    def action_select_cursor(self) -> None:
        """Select the row under the cursor."""
        if 0 <= self.cursor_row < len(self._keys):
            self.post_message(self.RowSelected(self, self._keys[self.cursor_row]))

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None:
            return
        x, y = offset
        if y == 0:
            left = 0
            for column in self.columns:
                right = left + column.width + 2 * PAD
                if left <= x < right:
                    self.post_message(self.HeaderSelected(self, column.key))
                    break
                left = right
            return
        index = self._top + y - 1
        if 0 <= index < len(self._keys):
            if index == self.cursor_row and self.has_focus:
                self.post_message(self.RowSelected(self, self._keys[index]))
            self.move_cursor(index)

    def on_mouse_scroll_down(self, event: events.MouseScrollDown) -> None:
        event.stop()
        self._scroll(1)

    def on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        event.stop()
        self._scroll(-1)

    def _scroll(self, rows: int) -> None:
        top = max(0, min(self._top + rows, max(0, len(self._keys) - self._visible_rows)))
        if top != self._top:
            self._top = top
            self.refresh()
