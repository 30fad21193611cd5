"""Model mix: each model's share of spend and of requests, as text bars."""

from __future__ import annotations

from collections.abc import Iterable

from textual.containers import VerticalScroll
from textual.content import Content
from textual.widget import Widget
from textual.widgets import Static

from tokentop.store.text import clean
from tokentop.tui import format as fmt
from tokentop.tui.panes.base import Pane
from tokentop.tui.snapshot import Snapshot
from tokentop.tui.widgets.quiet import update_static

PCT = 5


class ModelMixPane(Pane):
    """One line per model: a spend-share bar and a request-share bar. A model without a price
    shows ``unpriced`` instead of a spend share, never 0 %."""

    PANE_ID = "mix"
    TITLE = "Model mix"

    def compose_body(self) -> Iterable[Widget]:
        with VerticalScroll(id="mix-scroll"):
            yield Static("", id="mix-lines")

    def apply(self, snapshot: Snapshot) -> None:
        self.badge.loading_text = snapshot.usage_loading
        self.badge.show(snapshot.newest_usage, snapshot.now)
        rows = snapshot.mix
        muted = "$text-muted"
        self.set_info(
            Content.assemble(
                (f"{len(rows)}", "bold"),
                f" model{'s' if len(rows) != 1 else ''} · {snapshot.request.window}",
            )
        )
        lines_widget = self.query_one("#mix-lines", Static)
        if not rows:
            update_static(lines_widget, Content.styled("no usage in this window", muted))
            return
        width = self.inner_width - 1
        name_w = max(8, min(24, max(len(r.model) for r in rows), width // 3))
        bar_w = max(4, (width - name_w - 2 * (PCT + 2)) // 2)
        lines = [
            Content.assemble(
                (f"{'model':<{name_w}} ", muted),
                (f"{'spend':<{bar_w + PCT + 1}} ", muted),
                ("requests", muted),
            )
        ]
        for r in rows:
            model = clean(r.model)
            name = model if len(model) <= name_w else model[: name_w - 1] + "…"
            if r.priced:
                spend = Content.assemble(
                    (fmt.bar(r.cost_share, bar_w), "$accent on $foreground 8%"),
                    f" {fmt.pct(r.cost_share):>{PCT}}",
                )
            else:
                spend = Content.styled(f"{'unpriced':<{bar_w + PCT + 1}}", "bold $warning")
            lines.append(
                Content.assemble(
                    (f"{name:<{name_w}} ", "" if r.priced else "$warning"),
                    spend,
                    " ",
                    (fmt.bar(r.request_share, bar_w), "$secondary on $foreground 8%"),
                    f" {fmt.pct(r.request_share):>{PCT}}",
                )
            )
        total = sum(r.cost for r in rows)
        reqs = sum(r.requests for r in rows)
        lines.append(
            Content.assemble(
                (f"{'total':<{name_w}} ", muted),
                (f"{fmt.usd(total):<{bar_w + PCT + 1}} ", "bold"),
                (f"{fmt.count(reqs)} req", "bold"),
            )
        )
        update_static(lines_widget, Content("\n").join(lines))
