"""Which columns of a table fit a width, and how wide each is: pure arithmetic, no Textual.

A table states its columns in order and which of them go first when space runs out; the name
column (the first) takes the width left over, up to its longest value, and names that still do
not fit end in ``…`` (:func:`tokentop.tui.format.fit`). Money columns are never in a drop order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from rich.cells import cell_len

PADDING = 2
"""Cells a ``DataTable`` column adds around its content (``cell_padding`` 1 on each side)."""


@dataclass(frozen=True, slots=True)
class Column:
    """A column after the name: its key, heading and the least width it gets."""

    key: str
    label: str
    floor: int = 0
    right: bool = True


@dataclass(frozen=True, slots=True)
class Fitted:
    """The columns that fit and their widths (the name column first, under ``name``)."""

    keys: tuple[str, ...]
    widths: Mapping[str, int]
    dropped: tuple[str, ...] = ()

    @property
    def name_width(self) -> int:
        """Width of the name column."""
        return self.widths["name"]


def width_of(label: str, values: Iterable[str], floor: int = 0) -> int:
    """The cells a column needs: its heading and its widest value, at least ``floor``."""
    return max([floor, cell_len(label), *(cell_len(v) for v in values)])


def fit_columns(
    total: int,
    name: tuple[str, Sequence[str]],
    columns: Sequence[tuple[Column, Sequence[str]]],
    drop_order: Sequence[str],
    *,
    name_floor: int = 12,
    padding: int = PADDING,
) -> Fitted:
    """Fit a table into ``total`` cells.

    Args:
        total: the width of the table.
        name: the name column's heading and values.
        columns: every other column with its values (cells as shown), in order.
        drop_order: keys of the columns to leave out, first to last, while the name column
            would get fewer than ``name_floor`` cells.
        name_floor: the narrowest the name column gets while any column can still go.
        padding: cells each column adds around its content.
    """
    label, values = name
    need_name = width_of(label, values, 4)
    widths = {c.key: width_of(c.label, vals, c.floor) for c, vals in columns}
    kept = [c.key for c, _ in columns]
    dropped: list[str] = []
    for key in (None, *drop_order):
        if key is not None and key in kept:
            kept.remove(key)
            dropped.append(key)
        free = total - sum(widths[k] + padding for k in kept) - padding
        if free >= min(name_floor, need_name):
            break
    free = total - sum(widths[k] + padding for k in kept) - padding
    name_w = max(1, min(need_name, free))
    return Fitted(("name", *kept), {"name": name_w, **{k: widths[k] for k in kept}}, tuple(dropped))
