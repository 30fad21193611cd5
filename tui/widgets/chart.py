"""A small time chart drawn with block characters on a zero baseline.

The built-in ``Sparkline`` scales from the series minimum, which makes a steady spend look
jagged; money needs a zero baseline. This widget is the one place to swap in another chart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.text import Text
from textual.reactive import reactive
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

    data: reactive[tuple[float | None, ...]] = reactive(tuple, layout=False)
    """The series, oldest first."""

    def columns(self, width: int) -> list[float | None]:
        """The values drawn in each of ``width`` columns (right-aligned when stretched)."""
        values = downsample(self.data, width)
        if not values:
            return []
        repeat = max(1, width // len(values))
        return [v for v in values for _ in range(repeat)]

    def render(self) -> Text:
        width, height = self.size.width, max(1, self.size.height)
        cols = self.columns(width)
        peak = max((v for v in cols if v is not None), default=0.0)
        bar_style = self.get_component_rich_style("timechart--bar")
        base_style = self.get_component_rich_style("timechart--base")
        pad = width - len(cols)
        # Any spend at all gets at least the lowest block, so it never reads as zero.
        levels = [
            None if v is None else (max(1, round(v / peak * height * 8)) if v > 0 else 0)
            for v in cols
        ]
        lines = []
        for row in range(height - 1, -1, -1):
            line = Text(" " * pad)
            for level in levels:
                if level is None:
                    line.append(" ")
                    continue
                cell = max(0, min(8, level - row * 8))
                if row == 0 and cell == 0:
                    line.append("▁", base_style)
                else:
                    line.append(_EIGHTHS[cell], bar_style)
            lines.append(line)
        return Text("\n").join(lines)
