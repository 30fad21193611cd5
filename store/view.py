"""What a screen or a report looks at besides the filter: the order of a group table.

The TUI, ``tokentop report`` and ``tokentop export`` share it, so that a snapshot written from the
screen and the same command run by hand list the same rows in the same order. Filters are in
:mod:`tokentop.store.filters`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tokentop.store.queries import CostRow

SORT_COLUMNS: dict[str, str] = {
    "name": "name",
    "per_request": "$/request",
    "change": "change of $/request",
    "requests": "requests",
    "cost": "cost",
    "in": "input tokens/request",
    "out": "output tokens/request",
    "cache": "cache hit rate",
}
"""Columns a group table can be sorted by, and how each is said."""

DEFAULT_SORT: tuple[str, bool] = ("cost", True)
"""Dearest first, as the store returns the rows."""


def _per(total: int, requests: int) -> float | None:
    return total / requests if requests else None


_KEYS: dict[str, Callable[[CostRow], Any]] = {
    "name": lambda r: (r.key or "").lower(),
    "per_request": lambda r: r.totals.cost_per_request,
    "change": lambda r: r.change,
    "requests": lambda r: r.totals.requests,
    # An unpriced group's cost is unknown, not $0: it sorts with the unknowns.
    "cost": lambda r: r.totals.cost if r.priced or r.totals.cost > 0 else None,
    "in": lambda r: _per(r.totals.input_total, r.totals.requests),
    "out": lambda r: _per(r.totals.output, r.totals.requests),
    "cache": lambda r: r.cache_hit_rate,
}


def parse_sort(text: str) -> tuple[str, bool]:
    """``cost``, ``-cost`` (descending) or ``cost:desc`` / ``cost:asc`` as (column, descending).

    A bare name sorts names ascending and figures descending, as the table does on a first click.
    """
    value = text.strip()
    descending: bool | None = None
    if value.startswith("-"):
        value, descending = value[1:], True
    elif value.startswith("+"):
        value, descending = value[1:], False
    name, _, direction = value.partition(":")
    if direction:
        if direction.lower() not in ("asc", "desc"):
            raise ValueError(f"sort direction {direction!r}: use asc or desc")
        descending = direction.lower() == "desc"
    if name not in _KEYS:
        raise ValueError(f"cannot sort by {name!r}; choose one of {', '.join(_KEYS)}")
    return name, default_descending(name) if descending is None else descending


def default_descending(column: str) -> bool:
    """The first direction of a column: names A to Z, figures largest first."""
    return column != "name"


def sort_name(sort: tuple[str, bool]) -> str:
    """``cost:desc``: how a sort is recorded in a report."""
    return f"{sort[0]}:{'desc' if sort[1] else 'asc'}"


def sort_rows(rows: Sequence[CostRow], sort: tuple[str, bool] = DEFAULT_SORT) -> list[CostRow]:
    """``rows`` ordered by ``sort``; unknown values (``None``) last either way, ties in the
    store's order (dearest first)."""
    column, descending = sort
    key = _KEYS[column]
    # The row that sums the groups beyond a table's limit ("others") stays last.
    rest = [r for r in rows if getattr(r, "others", 0)]
    rows = [r for r in rows if not getattr(r, "others", 0)]
    known = [r for r in rows if key(r) is not None]
    unknown = [r for r in rows if key(r) is None]
    known.sort(key=key, reverse=descending)  # stable: ties keep the store's order
    return known + unknown + rest
