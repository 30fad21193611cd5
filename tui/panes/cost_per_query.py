"""Cost per query: per model, project, API key or tag, against the previous window."""

from __future__ import annotations

from collections.abc import Iterable

from textual.content import Content
from textual.widget import Widget
from textual.widgets import Static

from tokentop.store.queries import CostRow
from tokentop.store.text import clean
from tokentop.store.view import DEFAULT_SORT, sort_rows
from tokentop.tui import format as fmt
from tokentop.tui.columns import Column, Fitted, fit_columns
from tokentop.tui.panes.base import Pane
from tokentop.tui.snapshot import USAGE_KINDS, Snapshot
from tokentop.tui.widgets.quiet import update_static
from tokentop.tui.widgets.table import Cell, Role, ThemedTable, sort_label
from tokentop.tui.widgets.table import Column as TableColumn

GROUP_LABELS = {"model": "Model", "project": "Project", "api_key": "API key", "tag": "Tag"}
"""Column heading of the first column for each grouping."""

COLUMNS: tuple[Column, ...] = (
    Column("per_request", "$/req", 7),
    Column("change", "Δ $/req", 7),
    Column("requests", "Reqs", 4),
    Column("cost", "Cost", 6),
    Column("in", "In/req", 6),
    Column("out", "Out/req", 6),
    Column("cache", "Cache", 5),
)
"""Columns after the name, most telling first."""

DROP_ORDER: tuple[str, ...] = ("cache", "out", "in", "requests", "change")
"""What a narrow pane leaves out, first to last, to keep at least :data:`NAME_FLOOR` cells for
names: the token shapes (cache hit rate, output and input tokens per request), then the request
count, then the change. The money ($/req and Cost) always stays."""

NAME_FLOOR = 18
"""The least width of the name column while a column can still go."""


def others_name(count: int) -> str:
    """The name of the row that sums the ``count`` groups the table has no room for."""
    return f"+{count} others"


class CostPerQueryPane(Pane):
    """A table of requests, $/request, tokens per request in and out, cache hit rate and the
    change of $/request against the previous window of equal length.

    Sorted by any column (``sort``; the app sets it from ``s``, ``S`` and header clicks), the
    sort shown by an arrow in the heading. ``enter`` on a row drills down (the app's job).
    """

    PANE_ID = "cost"
    TITLE = "Cost per query"

    def __init__(self, *, stale_after: float = 300.0) -> None:
        super().__init__(stale_after=stale_after)
        self.group = "model"
        self._table: ThemedTable | None = None
        self.sort: tuple[str, bool] = DEFAULT_SORT
        """(column key, descending) of the rows."""
        self._layout: tuple[str, tuple[str, bool], Fitted] | None = None
        self.fitted: Fitted | None = None
        """The columns shown and their widths, after the last layout."""

    def compose_body(self) -> Iterable[Widget]:
        yield ThemedTable(id="cost-table", zebra_stripes=True)
        yield Static("", id="cost-note")
        yield Static("", id="cost-metered")

    @property
    def focus_target(self) -> Widget:
        """The table."""
        return self.table

    @property
    def table(self) -> ThemedTable:
        """The table of groups."""
        if self._table is None:
            self._table = self.query_one("#cost-table", ThemedTable)
        return self._table

    @property
    def row_keys(self) -> list[str]:
        """Keys of the rows shown, in order (``provider\x1fkey``)."""
        return self.table.row_keys

    @property
    def top_n(self) -> int:
        """Groups the table has room for besides an "others" row (0 before the first layout):
        one row under the heading stays for the row that sums the rest."""
        rows = self.table.size.height - 1
        return max(1, rows - 1) if rows > 0 else 0

    @property
    def sort_columns(self) -> tuple[str, ...]:
        """Columns shown, which ``s`` cycles through."""
        return self.fitted.keys if self.fitted else ("name", *(c.key for c in COLUMNS))

    def set_sort(self, sort: tuple[str, bool]) -> None:
        """Order the rows by ``sort`` and show it in the heading."""
        if sort != self.sort:
            self.sort = sort
            if self.snapshot is not None:
                self.show(self.snapshot)

    def _cells(self, row: CostRow) -> dict[str, Cell]:
        cell = self.table.cell
        t = row.totals
        partial = not row.priced and t.cost > 0
        cells: dict[str, Cell] = {}
        if not row.priced and t.cost == 0:
            cells["cost"] = cell("unpriced", "warning", right=True)
            cells["per_request"] = cell("unpriced", "warning", right=True)
        else:
            mark = "*" if partial else ""
            cells["cost"] = cell(fmt.usd(t.cost) + mark, right=True)
            cells["per_request"] = cell(fmt.usd_unit(t.cost_per_request) + mark, "bold", right=True)
        per = t.requests or None
        cells["requests"] = cell(fmt.count(t.requests), right=True)
        cells["in"] = cell(fmt.tokens(t.input_total / per) if per else fmt.MISSING, right=True)
        cells["out"] = cell(fmt.tokens(t.output / per) if per else fmt.MISSING, right=True)
        cells["cache"] = cell(fmt.pct(row.cache_hit_rate), right=True)
        change = row.change
        if change is None:
            text = "new" if row.previous.requests == 0 else fmt.MISSING
            cells["change"] = cell(text, "muted", right=True)
        else:
            # Dearer per request is bad news: red; cheaper is green.
            role: Role = "error" if change > 0.0005 else "success" if change < -0.0005 else ""
            cells["change"] = cell(fmt.change(change), role, right=True)
        return cells

    def _fit(self, group: str, names: list[str], cells: list[dict[str, Cell]]) -> Fitted:
        """Which columns fit the table's width, with the sort arrow in its heading."""
        width = self.table.size.width or self.inner_width
        heading = GROUP_LABELS.get(group, group)
        return fit_columns(
            width,
            (sort_label(heading, "name", self.sort), names),
            [
                (
                    Column(c.key, sort_label(c.label, c.key, self.sort), c.floor),
                    [row[c.key].plain for row in cells],
                )
                for c in COLUMNS
            ],
            DROP_ORDER,
            name_floor=NAME_FLOOR,
        )

    def _set_columns(self, group: str, fitted: Fitted) -> None:
        heading = GROUP_LABELS.get(group, group)
        labels = {c.key: c.label for c in COLUMNS}
        self.table.set_columns(
            [TableColumn("name", sort_label(heading, "name", self.sort), fitted.name_width)]
            + [
                TableColumn(key, sort_label(labels[key], key, self.sort), fitted.widths[key], True)
                for key in fitted.keys[1:]
            ]
        )
        self.group = group
        self.fitted = fitted

    def apply(self, snapshot: Snapshot) -> None:
        req = snapshot.request
        self.badge.loading_text = snapshot.usage_loading
        self.show_freshness(snapshot.feed(USAGE_KINDS, snapshot.newest_usage), snapshot.now)
        rows = sort_rows(snapshot.cost_rows, self.sort)
        groups = sum(r.others or 1 for r in rows)
        counted = Content.assemble(
            (f"{groups} ", "bold"),
            GROUP_LABELS.get(req.group, req.group).lower() + ("s" if groups != 1 else ""),
        )
        if not rows and snapshot.usage_loading:
            counted = Content.styled("loading…", "$text-muted")
        self.set_info(counted + f" · {req.window} vs previous {req.window}")
        cells = [self._cells(r) for r in rows]
        names = [others_name(r.others) if r.others else clean(r.key) or "(none)" for r in rows]
        fitted = self._fit(req.group, names, cells)
        layout = (req.group, self.sort, fitted)
        if layout != self._layout:
            self._set_columns(req.group, fitted)
            self._layout = layout
        name_w, cell = fitted.name_width, self.table.cell
        for name, row_cells, row in zip(names, cells, rows, strict=True):
            role: Role = "muted" if row.others else ""
            row_cells["name"] = cell(fmt.fit(name, name_w), role if row.priced else "warning")
        self.table.set_rows(
            [
                (f"{r.provider}\x1f{r.key}", row_cells)
                for r, row_cells in zip(rows, cells, strict=True)
            ]
        )
        note = self.query_one("#cost-note", Static)
        partial = any(not r.priced and r.totals.cost > 0 for r in rows)
        if not rows:
            # While a source still loads, an empty table is not yet a fact.
            empty = snapshot.usage_loading or "no usage in this window"
            update_static(note, Content.styled(empty, "$text-muted"))
        elif partial:
            update_static(note, Content.styled("* excludes unpriced tokens (not in $)", "$warning"))
        else:
            update_static(note, "")
        note.display = bool(partial or not rows)
        self._show_metered(snapshot)

    def _show_metered(self, snapshot: Snapshot) -> None:
        """Per-request figures from the meter: exact, within a second of each response."""
        line = self.query_one("#cost-metered", Static)
        stats = snapshot.metered
        line.display = stats is not None
        if stats is None:
            return
        muted = "$text-muted"
        parts: list[Content | tuple[str, str] | str] = [
            ("metered ", "bold $accent"),
            (fmt.count(stats.requests), "bold"),
            (" req", muted),
            ("  p50 ", muted),
            (fmt.usd_unit(stats.p50), "bold"),
            ("  p95 ", muted),
            (fmt.usd_unit(stats.p95), "bold"),
        ]
        if stats.unpriced_requests:
            parts.append((f"  {stats.unpriced_requests} unpriced", "$warning"))
        if stats.estimated_requests:
            parts.append((f"  {stats.estimated_requests} estimated", "$warning"))
        tags = [t for t in snapshot.metered_by_tag if t.key]
        if tags:
            top = tags[0]
            parts += [("  top ", muted), (top.key, "bold")]
            if top.cost_per_request is not None:
                parts += [(" ", ""), (fmt.usd_unit(top.cost_per_request), ""), ("/req", muted)]
        update_static(line, Content.assemble(*parts))
