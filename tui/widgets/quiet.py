"""Updates that skip work when nothing changed.

Every refresh re-applies a whole snapshot; most of it is unchanged from the last second. An
update of a ``Static`` asks Textual for a new layout and repaint, so re-sending identical content
costs CPU for nothing (the idle TUI's main cost). These helpers compare first.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.content import Content
from textual.widgets import Static

_UNSET = object()


def content_key(value: Any) -> Any:
    """A comparable key of a renderable: text *and* styles (``Content.__eq__`` ignores styles)."""
    if isinstance(value, Content):
        return ("content", value.plain, tuple((s.start, s.end, str(s.style)) for s in value.spans))
    if isinstance(value, Text):
        return (
            "text",
            value.plain,
            str(value.style),
            value.justify,
            tuple((s.start, s.end, str(s.style)) for s in value.spans),
        )
    return ("other", value)


def update_static(widget: Static, value: Content | Text | str) -> None:
    """``widget.update(value)`` unless it already shows exactly that."""
    key = content_key(value)
    if getattr(widget, "_tokentop_shown", _UNSET) == key:
        return
    widget._tokentop_shown = key  # type: ignore[attr-defined]
    widget.update(value)
