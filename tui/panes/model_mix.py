"""Model mix: each model's share of spend and of requests, as text bars."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

from rich.cells import cell_len
from textual.content import Content
from textual.widget import Widget
from textual.widgets import Static

from tokentop.store.queries import OTHERS, MixRow
from tokentop.store.text import clean
from tokentop.tui import format as fmt
from tokentop.tui.panes.base import Pane
from tokentop.tui.snapshot import USAGE_KINDS, Snapshot
from tokentop.tui.widgets.lines import Lines
from tokentop.tui.widgets.quiet import update_static

PCT = 5
BAR = 8
"""The narrowest a share bar gets before the model names are cut."""


class ModelMixPane(Pane):
    """One line per model: a spend-share bar and a request-share bar. A model without a price
    shows ``unpriced`` instead of a spend share, never 0 %."""

    PANE_ID = "mix"
    TITLE = "Model mix"

    def compose_body(self) -> Iterable[Widget]:
        yield Lines(id="mix-lines")
        # Its own line: the total changes with every request, the shares far less often.
        yield Static("", id="mix-total")

    @property
    def top_n(self) -> int:
        """Models the pane has lines for besides the line that sums the rest (0 before the
        first layout): the pane's header, the column heads and the total take three."""
        lines = self.content_size.height - 3
        return max(1, lines - 1) if lines > 0 else 0

    def apply(self, snapshot: Snapshot) -> None:
        self.badge.loading_text = snapshot.usage_loading
        self.show_freshness(snapshot.feed(USAGE_KINDS, snapshot.newest_usage), snapshot.now)
        rows = list(snapshot.mix)
        models = sum(r.others or 1 for r in rows)
        muted = "$text-muted"
        self.set_info(
            Content.assemble(
                (f"{models}", "bold"),
                f" model{'s' if models != 1 else ''} · {snapshot.request.window}",
            )
        )
        lines_widget = self.query_one("#mix-lines", Lines)
        total_widget = self.query_one("#mix-total", Static)
        total_widget.display = bool(rows)
        if not rows:
            empty = snapshot.usage_loading or "no usage in this window"
            lines_widget.set_lines([Content.styled(empty, muted)])
            return
        width = self.inner_width
        total = sum(r.cost for r in rows)
        reqs = sum(r.requests for r in rows)
        # The store folds the models beyond the pane's room into one row (see top_n); rows from
        # before a resize that still do not fit fold here, so that none scrolls out of sight.
        room = self.content_size.height - 3
        if room > 1 and len(rows) > room:
            rows = [*rows[: room - 1], self._others(rows[room - 1 :])]
        names = [f"+{r.others} more" if r.others else clean(r.model) for r in rows]
        # Names get what the bars (at least BAR each) leave, up to the longest name.
        figures = 1 + 2 * (PCT + 2)
        name_w = max(8, min(max(cell_len(n) for n in names), width - figures - 2 * BAR))
        bar_w = max(4, (width - name_w - figures) // 2)
        lines = [
            Content.assemble(
                (f"{'model':<{name_w}} ", muted),
                (f"{'spend':<{bar_w + PCT + 1}} ", muted),
                ("requests", muted),
            )
        ]
        for name, r in zip(names, rows, strict=True):
            lines.append(
                self._line(fmt.fit(name, name_w), name_w, bar_w, r, muted if r.others else "")
            )
        lines_widget.set_lines(lines)
        update_static(
            total_widget,
            Content.assemble(
                (f"{'total':<{name_w}} ", muted),
                (f"{fmt.usd(total):<{bar_w + PCT + 1}} ", "bold"),
                (f"{fmt.count(reqs)} req", "bold"),
            ),
        )

    @staticmethod
    def _others(rows: list[MixRow]) -> MixRow:
        """One row that sums ``rows`` (some of which may sum others already)."""
        return MixRow(
            provider="",
            model=OTHERS,
            cost=sum((r.cost for r in rows), Decimal(0)),
            requests=sum(r.requests for r in rows),
            cost_share=sum(r.cost_share for r in rows),
            request_share=sum(r.request_share for r in rows),
            priced=all(r.priced for r in rows),
            others=sum(r.others or 1 for r in rows),
        )

    @staticmethod
    def _line(name: str, name_w: int, bar_w: int, r: MixRow, style: str = "") -> Content:
        # A row that sums several models, some unpriced, still has a known share of the spend
        # (the priced part's): only a row without any priced spend says "unpriced".
        if r.priced or r.cost > 0:
            spend = Content.assemble(
                (fmt.bar(r.cost_share, bar_w), "$accent on $foreground 8%"),
                f" {fmt.pct(r.cost_share):>{PCT}}",
            )
        else:
            spend = Content.styled(f"{'unpriced':<{bar_w + PCT + 1}}", "bold $warning")
        return Content.assemble(
            (f"{name:<{name_w}} ", style if r.priced or r.others else "$warning"),
            spend,
            " ",
            (fmt.bar(r.request_share, bar_w), "$secondary on $foreground 8%"),
            f" {fmt.pct(r.request_share):>{PCT}}",
        )
