"""The one-line bar at the top: product name, source label, window, grouping, filter, pause."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.widgets import Static

from tokentop.store.text import clean
from tokentop.tui.widgets.quiet import update_static


class TopBar(Vertical):
    """Shows what the screen is looking at; every value is set by the app.

    One line when it fits, laid out for the width: when it does not, the window list shrinks to
    the current window, then the label to its first word, and then the filter moves to a second
    line of its own, where it is shown in full.
    """

    DEFAULT_CSS = """
    TopBar {
        height: auto;
        width: 1fr;
        background: $panel;
    }
    TopBar > Horizontal { height: 1; width: 1fr; }
    TopBar Static { width: auto; height: 1; padding: 0 1; text-wrap: nowrap; }
    TopBar #top-brand { text-style: bold; color: $accent; }
    TopBar #top-label { background: $warning; color: $text; text-style: bold; }
    TopBar #top-feed { color: $text-muted; text-overflow: ellipsis; }
    TopBar #top-feed.-error { background: $error; color: $text; text-style: bold; }
    TopBar #top-feed.-warning { color: $warning; text-style: bold; }
    TopBar #top-windows { width: 1fr; }
    TopBar #top-state { text-align: right; text-overflow: ellipsis; }
    TopBar #top-filter { width: 1fr; height: auto; text-wrap: wrap; display: none; }
    """

    def __init__(self) -> None:
        super().__init__()
        self._state: dict[str, Any] = {}

    def compose(self) -> ComposeResult:
        with Horizontal(id="top-line"):
            yield Static("tokentop", id="top-brand")
            yield Static("", id="top-label", markup=False)
            yield Static("", id="top-feed", markup=False)
            yield Static("", id="top-windows")
            yield Static("", id="top-state")
        yield Static("", id="top-filter")

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
        feed: str = "",
        feed_role: str = "",
    ) -> None:
        """Redraw from the app's state.

        ``feed`` says who collects (``watching collector pid 123``, ``collector pid 123 stopped
        14s ago``); ``feed_role`` colours it: ``error``, ``warning`` or ``""``.
        """
        self._state = {
            "label": clean(label),
            "windows": list(windows),
            "window": window,
            "group": group,
            "text": clean(text),
            "paused": paused,
            "error": clean(error),
            "feed": clean(feed),
            "feed_role": feed_role,
        }
        self._draw()

    def on_resize(self) -> None:
        if self._state:
            self._draw()

    def _draw(self) -> None:
        st = self._state
        width = self.size.width or self.app.size.width
        label_widget = self.query_one("#top-label", Static)
        feed_widget = self.query_one("#top-feed", Static)
        feed_widget.display = bool(st["feed"])
        feed_widget.set_class(st["feed_role"] == "error", "-error")
        feed_widget.set_class(st["feed_role"] == "warning", "-warning")
        update_static(feed_widget, st["feed"])
        label = st["label"]
        short_label = label.split(" ")[0] if label else ""
        by = f"   by {st['group']}"
        full = Content.assemble(
            "window ",
            *(
                Content.from_markup("[reverse $accent] $w [/]", w=w)
                if w == st["window"]
                else Content.from_markup("[$text-muted] $w [/]", w=w)
                for w in st["windows"]
            ),
            by,
        )
        compact = Content.assemble(
            "window ", Content.from_markup("[reverse $accent] $w [/]", w=st["window"]), by
        )
        filter_part = (
            Content.from_markup("filter [b $accent]$t[/]", t=st["text"]) if st["text"] else None
        )
        rest: list[Content] = []
        if st["error"]:
            rest.append(Content.from_markup("[b $error]$e[/]", e=st["error"]))
        if st["paused"]:
            rest.append(Content.from_markup("[reverse b $warning] PAUSED [/]"))

        def length(windows: Content, label: str, state: list[Content]) -> int:
            used = 10 + windows.cell_length + 2  # the brand, the windows and their padding
            used += len(label) + 2 if label else 0
            used += len(st["feed"]) + 2 if st["feed"] else 0
            state_text = Content(" · ").join(state)
            return used + (state_text.cell_length + 2 if state else 0)

        state = [p for p in (filter_part, *rest) if p is not None]
        windows, shown_label, second = full, label, False
        for windows, shown_label in ((full, label), (compact, label), (compact, short_label)):
            if length(windows, shown_label, state) <= width:
                break
        else:
            second = filter_part is not None
        label_widget.display = bool(shown_label)
        update_static(label_widget, shown_label)
        update_static(self.query_one("#top-windows", Static), windows)
        line_state = rest if second else state
        update_static(self.query_one("#top-state", Static), Content(" · ").join(line_state))
        filter_line = self.query_one("#top-filter", Static)
        filter_line.display = second
        if second and filter_part is not None:
            update_static(filter_line, filter_part)
