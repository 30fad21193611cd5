"""Model mix: each model's share of spend and of requests, as text bars."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

from rich.cells import cell_len
from textual.content import Content
from textual.widget import Widget
from textual.widgets import Static

from tokentop.store.queries import MixRow
from tokentop.store.text import clean
from tokentop.tui import format as fmt
from tokentop.tui.panes.base import Pane
from tokentop.tui.snapshot import USAGE_KINDS, Snapshot
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
        yield Static("", id="mix-lines")
        # Its own line: the total changes with every request, the shares far less often.
        yield Static("", id="mix-total")

    def apply(self, snapshot: Snapshot) -> None:
        self.badge.loading_text = snapshot.usage_loading
        self.show_freshness(snapshot.feed(USAGE_KINDS, snapshot.newest_usage), snapshot.now)
        rows = list(snapshot.mix)
        muted = "$text-muted"
        self.set_info(
            Content.assemble(
                (f"{len(rows)}", "bold"),
                f" model{'s' if len(rows) != 1 else ''} · {snapshot.request.window}",
            )
        )
        lines_widget = self.query_one("#mix-lines", Static)
        total_widget = self.query_one("#mix-total", Static)
        total_widget.display = bool(rows)
        if not rows:
            empty = snapshot.usage_loading or "no usage in this window"
            update_static(lines_widget, Content.styled(empty, muted))
            return
        width = self.inner_width
        # Lines under the header: the column heads, the models, the total. The smallest models
        # fold into one "+N more" line rather than scroll out of sight.
        room = self.content_size.height - 1
        total = sum(r.cost for r in rows)
        reqs = sum(r.requests for r in rows)
        more: list[MixRow] = []
        if room > 3 and len(rows) + 2 > room:
            keep = room - 3
            rows, more = rows[:keep], rows[keep:]
        names = [clean(r.model) for r in rows]
        if more:
            names.append(f"+{len(more)} more")
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
        for name, r in zip(names, rows, strict=False):
            lines.append(self._line(fmt.fit(name, name_w), name_w, bar_w, r))
        if more:
            lines.append(
                self._line(
                    names[-1],
                    name_w,
                    bar_w,
                    MixRow(
                        provider="",
                        model="",
                        cost=sum((r.cost for r in more), Decimal(0)),
                        requests=sum(r.requests for r in more),
                        cost_share=sum(r.cost_share for r in more),
                        request_share=sum(r.request_share for r in more),
                        priced=all(r.priced for r in more),
                    ),
                    muted,
                )
            )
        update_static(lines_widget, Content("\n").join(lines))
        update_static(
            total_widget,
            Content.assemble(
                (f"{'total':<{name_w}} ", muted),
                (f"{fmt.usd(total):<{bar_w + PCT + 1}} ", "bold"),
                (f"{fmt.count(reqs)} req", "bold"),
            ),
        )

    @staticmethod
    def _line(name: str, name_w: int, bar_w: int, r: MixRow, style: str = "") -> Content:
        if r.priced:
            spend = Content.assemble(
                (fmt.bar(r.cost_share, bar_w), "$accent on $foreground 8%"),
                f" {fmt.pct(r.cost_share):>{PCT}}",
            )
        else:
            spend = Content.styled(f"{'unpriced':<{bar_w + PCT + 1}}", "bold $warning")
        return Content.assemble(
            (f"{name:<{name_w}} ", style if r.priced else "$warning"),
            spend,
            " ",
            (fmt.bar(r.request_share, bar_w), "$secondary on $foreground 8%"),
            f" {fmt.pct(r.request_share):>{PCT}}",
        )
