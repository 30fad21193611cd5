"""Updates that skip work when nothing changed.

Every refresh re-applies a whole snapshot; most of it is unchanged from the last second. An
update of a ``Static`` asks Textual for a new layout and repaint, so re-sending identical content
costs CPU for nothing (the idle TUI's main cost). These helpers compare first.
"""

from __future__ import annotations

from typing import Any

from rich.cells import cell_len
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


def _shape(widget: Static, value: Content | Text | str) -> tuple[int, int]:
    """What the widget's size depends on: the value's number of lines if its height is
    ``auto``, its widest line if its width is (0 for a dimension the layout fixes)."""
    plain = value if isinstance(value, str) else value.plain
    lines = plain.split("\n")
    width, height = widget.styles.width, widget.styles.height
    auto_w = width is not None and width.is_auto
    auto_h = height is None or height.is_auto
    return (len(lines) if auto_h else 0), (max(cell_len(line) for line in lines) if auto_w else 0)


def update_static(
    widget: Static,
    value: Content | Text | str,
    *,
    layout: bool | None = None,
    links: bool = False,
) -> None:
    """``widget.update(value)`` unless it already shows exactly that.

    A new layout of the screen (the dearest part of a repaint) is asked for only when the
    value's shape changed (its number of lines or its widest line), since only then can a
    widget sized to its content change size; a figure that ticks from ``$1.20`` to ``$1.21``
    repaints its own line and nothing else. ``layout`` overrides that guess (a widget that
    knows its size cannot change passes ``False``).

    ``links``: the value has clickable parts (``@click``). Without them the widget's
    ``auto_links`` is turned off, or Textual would look for links in every segment of every
    line it draws (decoding each segment's metadata), a fair part of a live repaint.
    """
    if widget.auto_links != links:
        widget.auto_links = links
    key = content_key(value)
    if getattr(widget, "_tokentop_shown", _UNSET) == key:
        return
    widget._tokentop_shown = key  # type: ignore[attr-defined]
    shape = _shape(widget, value)
    if layout is None:
        layout = getattr(widget, "_tokentop_shape", None) != shape
    widget._tokentop_shape = shape  # type: ignore[attr-defined]
    widget.update(value, layout=layout)
