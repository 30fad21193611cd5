"""The pane switcher: every pane's name on one line, so a pane that does not fit is a tab away.

Shown whenever some pane is off screen (a small terminal, or a zoomed pane). The pane with the
focus is highlighted, the others on screen are bold, those off screen muted; a click on a name
shows that pane (``app.show_pane``).
"""

from __future__ import annotations

from collections.abc import Sequence

from textual.content import Content
from textual.widgets import Static

from tokentop.tui.widgets.quiet import update_static


class PaneBar(Static):
    """``Spend │ Cost per query │ Model mix │ GPU │ Sources`` with the current pane marked."""

    DEFAULT_CSS = """
    PaneBar {
        height: 1;
        width: 1fr;
        background: $panel;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    """

    def show_panes(
        self,
        panes: Sequence[tuple[str, str]],
        visible: frozenset[str],
        active: str,
        hint: str = "",
    ) -> None:
        """Draw ``panes`` ((id, title) in order): ``active`` highlighted, ``visible`` bold.

        ``hint`` is said after the names when they leave room for it.
        """
        parts: list[Content] = []
        for pane_id, title in panes:
            style = (
                "reverse bold $accent"
                if pane_id == active
                else "bold $text"
                if pane_id in visible
                else "$text-muted"
            )
            # Pane ids are the app's own words (never outside text): safe in the action.
            action = f"[@click=app.show_pane('{pane_id}')]$title[/]"
            parts.append(Content.from_markup(action, title=f" {title} ").stylize(style))
        line = Content("│").join(parts)
        width = self.size.width or self.app.size.width
        if hint and line.cell_length + 2 + len(hint) <= width:
            pad = width - line.cell_length - len(hint) - 1
            line = line + " " * pad + Content.styled(hint, "$text-muted")
        update_static(self, line, links=True)
