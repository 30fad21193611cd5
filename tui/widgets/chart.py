"""A small time chart drawn with block characters on a zero baseline.

The built-in ``Sparkline`` scales from the series minimum, which makes a steady spend look
jagged; money needs a zero baseline. This widget is the one place to swap in another chart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from textual.content import Content, Span
from textual.reactive import reactive
from textual.style import Style
from textual.widget import Widget

_EIGHTHS = " ▁▂▃▄▅▆▇█"


def downsample(values: Sequence[float | None], width: int) -> list[float | None]:
    """Average ``values`` into at most ``width`` columns (``None`` counts as a gap)."""
    n = len(values)
    if width <= 0 or n == 0:
        return []
    if n <= width:
        return list(values)
    out: list[float | None] = []
    for i in range(width):
        part = [v for v in values[i * n // width : (i + 1) * n // width] if v is not None]
        out.append(sum(part) / len(part) if part else None)
    return out


class TimeChart(Widget):
    """A column chart of a series, oldest on the left, scaled from zero to its peak.

    A series shorter than the width is stretched (each point gets several columns); a longer
    one is averaged down. ``None`` points are drawn as gaps.
    """

    DEFAULT_CSS = """
    TimeChart {
        height: 3;
        width: 1fr;
    }
    TimeChart > .timechart--bar { color: $accent; }
    TimeChart > .timechart--base { color: $foreground 25%; }
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = {"timechart--bar", "timechart--base"}

    data: reactive[tuple[float | None, ...]] = reactive(tuple, layout=False, repaint=False)
    """The series, oldest first. A new series repaints the chart only when it draws
    differently (a live minute that grows by a cent mostly does not)."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._rendered_key: object = None
        self._rendered: Content | None = None
        self._drawn: tuple[int | None, ...] | None = None

    def watch_data(self) -> None:
        if self._levels(self.size.width, max(1, self.size.height)) != self._drawn:
            self.refresh()

    def _levels(self, width: int, height: int) -> tuple[int | None, ...]:
        """Eighths of a cell filled in each column (``None``: a gap), as drawn."""
        cols = self.columns(width)
        peak = max((v for v in cols if v is not None), default=0.0)
        # Any spend at all gets at least the lowest block, so it never reads as zero.
        return tuple(
            None if v is None else (max(1, round(v / peak * height * 8)) if v > 0 else 0)
            for v in cols
        )

    def columns(self, width: int) -> list[float | None]:
        """The values drawn in each of ``width`` columns (right-aligned when stretched)."""
        values = downsample(self.data, width)
        if not values:
            return []
        repeat = max(1, width // len(values))
        return [v for v in values for _ in range(repeat)]

    def render(self) -> Content:
        width, height = self.size.width, max(1, self.size.height)
        levels = self._levels(width, height)
        self._drawn = levels
        key = (width, height, levels, self.app.theme)
        if key == self._rendered_key and self._rendered is not None:
            return self._rendered  # a repaint of the screen around it: nothing to redo
        pad = width - len(levels)
        lines = []
        for row in range(height - 1, -1, -1):
            # One span per run of the same style (not one per cell): cheap to build and paint.
            chars: list[str] = [" "] * pad
            kinds: list[str] = [""] * pad
            for level in levels:
                if level is None:
                    chars.append(" ")
                    kinds.append("")
                    continue
                cell = max(0, min(8, level - row * 8))
                if row == 0 and cell == 0:
                    chars.append("▁")
                    kinds.append("timechart--base")
                else:
                    chars.append(_EIGHTHS[cell])
                    kinds.append("timechart--bar")
            spans = []
            start = 0
            for i in range(1, len(kinds) + 1):
                if i == len(kinds) or kinds[i] != kinds[start]:
                    if kinds[start]:
                        spans.append(Span(start, i, self._style(kinds[start])))
                    start = i
            lines.append(Content("".join(chars), spans))
        self._rendered_key, self._rendered = key, Content("\n").join(lines)
        return self._rendered

    def _style(self, component: str) -> Style:
        return Style.from_rich_style(self.get_component_rich_style(component))
