"""Cost per query: per model, project, API key or tag, against the previous window."""

from __future__ import annotations

from collections.abc import Iterable

from rich.text import Text
from textual.content import Content
from textual.widget import Widget
from textual.widgets import Static

from tokentop.store.queries import CostRow
from tokentop.tui import format as fmt
from tokentop.tui.panes.base import Pane
from tokentop.tui.snapshot import Snapshot
from tokentop.tui.widgets.quiet import update_static
from tokentop.tui.widgets.table import Role, ThemedTable

GROUP_LABELS = {"model": "Model", "project": "Project", "api_key": "API key", "tag": "Tag"}
"""Column heading of the first column for each grouping."""

COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("per_request", "$/req", 10),
    ("change", "Δ $/req", 8),
    ("requests", "Reqs", 7),
    ("cost", "Cost", 9),
    ("in", "In/req", 7),
    ("out", "Out/req", 7),
    ("cache", "Cache", 6),
)
"""Columns after the name, most telling first (a narrow pane scrolls the rest): key,
heading, width."""


class CostPerQueryPane(Pane):
    """A table of requests, $/request, tokens per request in and out, cache hit rate and the
    change of $/request against the previous window of equal length."""

    PANE_ID = "cost"
    TITLE = "Cost per query"

    def __init__(self, *, stale_after: float = 300.0) -> None:
        super().__init__(stale_after=stale_after)
        self.group = "model"
        self._row_keys: list[str] = []
        self._name_w = 0

    def compose_body(self) -> Iterable[Widget]:
        yield ThemedTable(id="cost-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="cost-note")
        yield Static("", id="cost-metered")

    def on_mount(self) -> None:
        self._set_columns(self.group)

    @property
    def table(self) -> ThemedTable:
        """The table of groups."""
        return self.query_one("#cost-table", ThemedTable)

    @property
    def row_keys(self) -> list[str]:
        """Keys of the rows shown, in order."""
        return list(self._row_keys)

    def _name_width(self) -> int:
        fixed = sum(w + 2 for _, _, w in COLUMNS) + 2
        return max(14, min(28, self.inner_width - fixed - 1))

    def _set_columns(self, group: str) -> None:
        table = self.table
        table.clear(columns=True)
        self._row_keys = []
        self._name_w = self._name_width()
        table.add_column(GROUP_LABELS.get(group, group), key="name", width=self._name_w)
        for key, label, width in COLUMNS:
            table.add_column(Text(label, justify="right"), key=key, width=width)
        self.group = group

    def _cells(self, row: CostRow) -> dict[str, Text]:
        cell = self.table.cell
        t = row.totals
        partial = not row.priced and t.cost > 0
        name = row.key or "(none)"
        cells = {"name": cell(name, "" if row.priced else "warning")}
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

    def apply(self, snapshot: Snapshot) -> None:
        req = snapshot.request
        self.badge.loading_text = snapshot.usage_loading
        self.badge.show(snapshot.newest_usage, snapshot.now)
        if req.group != self.group or self._name_w != self._name_width():
            self._set_columns(req.group)
        self.set_info(
            Content.assemble(
                "by ",
                (GROUP_LABELS.get(req.group, req.group).lower(), "bold"),
                f" · {req.window} vs previous {req.window}",
                ("  g: grouping", "$text-muted"),
            )
        )
        rows = snapshot.cost_rows
        keys = [f"{r.provider}\x1f{r.key}" for r in rows]
        table = self.table
        if keys == self._row_keys:
            for key, row in zip(keys, rows, strict=True):
                for column, value in self._cells(row).items():
                    table.set_cell(key, column, value)
        else:
            selected = None
            if table.row_count and 0 <= table.cursor_row < len(self._row_keys):
                selected = self._row_keys[table.cursor_row]
            table.clear()
            for key, row in zip(keys, rows, strict=True):
                cells = self._cells(row)
                table.add_row(*(cells[c] for c in ("name", *(k for k, _, _ in COLUMNS))), key=key)
            self._row_keys = keys
            if selected in keys:
                table.move_cursor(row=keys.index(selected), animate=False)
        note = self.query_one("#cost-note", Static)
        partial = any(not r.priced and r.totals.cost > 0 for r in rows)
        if not rows:
            update_static(note, Content.styled("no usage in this window", "$text-muted"))
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
