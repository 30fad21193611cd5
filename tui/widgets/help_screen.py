"""A modal listing the keys."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static


class HelpScreen(ModalScreen[None]):
    """Every key of the app with what it does; any of escape, ``?`` or ``q`` closes it."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Vertical {
        width: auto;
        max-width: 100%;
        height: auto;
        max-height: 90%;
        border: round $accent;
        background: $surface;
        padding: 0 1;
    }
    HelpScreen DataTable { height: auto; max-height: 30; width: auto; }
    HelpScreen #help-foot { color: $text-muted; padding-top: 1; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss", "Close", id="help-close"),
        Binding("question_mark", "dismiss", "Close", show=False, id="help-close-2"),
        Binding("q", "dismiss", "Close", show=False, id="help-close-3"),
    ]

    def __init__(self, keys: Iterable[tuple[str, str]]) -> None:
        super().__init__()
        self.keys = list(keys)

    def compose(self) -> ComposeResult:
        with Vertical() as box:
            box.border_title = "tokentop keys"
            table: DataTable[str] = DataTable(show_cursor=False, zebra_stripes=True, id="help-keys")
            # As wide as the longest line, so that no description is cut (the box is centred
            # and may take the whole screen; a longer line scrolls rather than lose words).
            key_w = max([3, *(len(k) for k, _ in self.keys)])
            action_w = max([6, *(len(d) for _, d in self.keys)])
            table.add_column("Key", key="key", width=key_w)
            table.add_column("Action", key="action", width=action_w)
            for i, (key, description) in enumerate(self.keys):
                table.add_row(key, description, key=str(i))
            yield table
            yield Static(
                "Ctrl+P opens the command palette: every action is there too.", id="help-foot"
            )

    async def action_dismiss(self, result: None = None) -> None:
        """Close the help."""
        self.dismiss(result)
