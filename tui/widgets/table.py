"""A ``DataTable`` whose cells can take theme colours.

Cells are Rich renderables, which know nothing of ``$warning`` and friends; component classes
resolve the theme variables through CSS, so light and dark themes both work. Plain strings are
wrapped in ``Text`` so that a model or tag name is never parsed as markup.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from rich.text import Text
from textual.widgets import DataTable

from tokentop.store.text import clean
from tokentop.tui.widgets.quiet import content_key

Role = Literal["", "error", "warning", "success", "accent", "muted", "bold"]


class ThemedTable(DataTable[Text]):
    """A data table with :meth:`cell` to make theme-coloured cells."""

    DEFAULT_CSS = """
    ThemedTable > .themed--error { color: $error; text-style: bold; }
    ThemedTable > .themed--warning { color: $warning; }
    ThemedTable > .themed--success { color: $success; }
    ThemedTable > .themed--accent { color: $accent; }
    ThemedTable > .themed--muted { text-style: dim; }
    ThemedTable > .themed--bold { text-style: bold; }
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "themed--error",
        "themed--warning",
        "themed--success",
        "themed--accent",
        "themed--muted",
        "themed--bold",
    }

    def on_mount(self) -> None:
        self.show_cursor = self.has_focus

    def on_focus(self) -> None:
        # The cursor only shows where the keys go; otherwise it hides a row's colours.
        self.show_cursor = True

    def on_blur(self) -> None:
        self.show_cursor = False

    def cell(self, text: str, role: Role = "", *, right: bool = False) -> Text:
        """A cell of ``text`` in the colour of ``role``, right-aligned for figures."""
        style = self.get_component_rich_style(f"themed--{role}", partial=True) if role else ""
        return Text(clean(text), style=style, justify="right" if right else "left", no_wrap=True)

    def set_cell(self, row_key: str, column_key: str, value: Text) -> None:
        """``update_cell`` unless the cell already holds exactly ``value`` (saves a repaint)."""
        current = self.get_cell(row_key, column_key)
        if content_key(current) != content_key(value):
            self.update_cell(row_key, column_key, value)
