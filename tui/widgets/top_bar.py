"""The one-line bar at the top: product name, source label, window, grouping, filter, pause."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.content import Content
from textual.widgets import Static

from tokentop.store.text import clean
from tokentop.tui.widgets.quiet import update_static


class TopBar(Horizontal):
    """Shows what the screen is looking at; every value is set by the app."""

    DEFAULT_CSS = """
    TopBar {
        height: 1;
        width: 1fr;
        background: $panel;
    }
    TopBar > Static { width: auto; height: 1; padding: 0 1; }
    TopBar #top-brand { text-style: bold; color: $accent; }
    TopBar #top-label { background: $warning; color: $text; text-style: bold; }
    TopBar #top-windows { width: 1fr; }
    TopBar #top-state { text-align: right; }
    """

    def compose(self) -> ComposeResult:
        yield Static("tokentop", id="top-brand")
        yield Static("", id="top-label", markup=False)
        yield Static("", id="top-windows")
        yield Static("", id="top-state")

    def show(
        self,
        *,
        label: str,
        windows: list[str],
        window: str,
        group: str,
        text: str,
        paused: bool,
        error: str,
    ) -> None:
        """Redraw from the app's state."""
        label_widget = self.query_one("#top-label", Static)
        label_widget.display = bool(label)
        update_static(label_widget, clean(label))
        parts = [
            Content.from_markup("[reverse $accent] $w [/]", w=w)
            if w == window
            else Content.from_markup("[$text-muted] $w [/]", w=w)
            for w in windows
        ]
        update_static(
            self.query_one("#top-windows", Static),
            Content.assemble("window ", *parts, f"   by {group}"),
        )
        state: list[Content] = []
        if text:
            state.append(Content.from_markup("filter [b $accent]$t[/]", t=clean(text)))
        if error:
            state.append(Content.from_markup("[b $error]$e[/]", e=clean(error)))
        if paused:
            state.append(Content.from_markup("[reverse b $warning] PAUSED [/]"))
        update_static(self.query_one("#top-state", Static), Content(" · ").join(state))
