"""Spend: this hour, today, this month, burn rates, projections, budget and a chart."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

from textual.content import Content
from textual.widget import Widget
from textual.widgets import Static

from tokentop.tui import format as fmt
from tokentop.tui.panes.base import Pane
from tokentop.tui.snapshot import Snapshot
from tokentop.tui.widgets.chart import TimeChart
from tokentop.tui.widgets.quiet import update_static

LABEL = 7
MONEY = 10


def _step_name(seconds: int) -> str:
    return f"{seconds // 3600}h" if seconds >= 3600 else f"{seconds // 60}m"


def _budget_line(
    name: str, spent: Decimal, budget: Decimal, unit: str, width: int
) -> tuple[Content, float]:
    share = float(spent / budget) if budget > 0 else 1.0
    tail = f" {fmt.pct(share):>4} of {fmt.usd(budget)}/{unit}"
    bar_width = max(4, width - LABEL - len(tail))
    style = "$success" if share < 0.7 else "$warning" if share < 1 else "$error"
    line = Content.assemble(
        (f"{name:<{LABEL}}", "$text-muted"),
        (fmt.bar(share, bar_width), f"{style} on $foreground 10%"),
        tail,
    )
    return line, share


class SpendPane(Pane):
    """$ this hour, today and this month (estimated from tokens x prices), burn over 5/15/60
    minutes, projections, budget bars with runway, a spend chart of the window, unpriced tokens
    and billed-vs-estimated per provider."""

    PANE_ID = "spend"
    TITLE = "Spend"

    def compose_body(self) -> Iterable[Widget]:
        yield Static("", id="spend-figures")
        yield TimeChart(id="spend-chart")
        yield Static("", id="spend-caption")

    def apply(self, snapshot: Snapshot) -> None:
        s = snapshot.spend
        if s is None:
            return
        self.badge.loading_text = snapshot.usage_loading
        self.badge.show(snapshot.newest_usage, snapshot.now)
        self.set_class(s.spike, "-spike")
        req = snapshot.request
        self.set_info(
            Content.assemble(
                (req.window, "bold"), " window · ", ("estimated", "italic"), " (tokens x prices)"
            )
        )
        width = self.inner_width
        burn = s.burn_per_hour
        muted = "$text-muted"
        # With nothing ever recorded, figures are unknown, not $0.
        known = snapshot.newest_usage is not None
        usd = fmt.usd if known else (lambda _v: fmt.MISSING)
        rate = fmt.usd_rate if known else (lambda _v: fmt.MISSING)
        lines: list[Content] = [
            Content.assemble(
                (f"{'hour':<{LABEL}}", muted),
                (f"{usd(s.hour):>{MONEY}}", "bold"),
                ("   burn  5m ", muted),
                f"{rate(burn.get(5)):>{MONEY}}",
            ),
            Content.assemble(
                (f"{'today':<{LABEL}}", muted),
                (f"{usd(s.today):>{MONEY}}", "bold"),
                ("        15m ", muted),
                f"{rate(burn.get(15)):>{MONEY}}",
            ),
            Content.assemble(
                (f"{'month':<{LABEL}}", muted),
                (f"{usd(s.month):>{MONEY}}", "bold"),
                ("        60m ", muted),
                f"{rate(burn.get(60)):>{MONEY}}",
            ),
            Content.assemble(
                (f"{'proj.':<{LABEL}}", muted),
                ("day ", muted),
                usd(s.projected_today),
                ("  month ", muted),
                usd(s.projected_month),
            ),
        ]
        if not known:
            lines.append(
                Content.styled(
                    "no usage recorded yet: see Sources for what is collecting", "$warning"
                )
            )
        if s.budget_daily is None and s.budget_monthly is None:
            lines.append(
                Content.assemble((f"{'budget':<{LABEL}}", muted), ("no budget set", muted))
            )
        else:
            if s.budget_daily is not None:
                line, _ = _budget_line("budget", s.today, s.budget_daily, "day", width)
                lines.append(line)
                runway = s.runway_hours
                if runway is not None:
                    over = s.today >= s.budget_daily
                    lines.append(
                        Content.assemble(
                            (f"{'runway':<{LABEL}}", muted),
                            (
                                "daily budget spent" if over else fmt.duration_h(runway),
                                "$error bold" if over or runway < 2 else "bold",
                            ),
                            ("" if over else " at the 60m burn", muted),
                        )
                    )
            if s.budget_monthly is not None:
                name = "month" if s.budget_daily is not None else "budget"
                line, _ = _budget_line(name, s.month, s.budget_monthly, "mo", width)
                lines.append(line)
        if s.spike:
            ratio = (burn[5] / burn[60]) if burn.get(60) else None
            lines.append(
                Content.assemble(
                    (" ▲ SPIKE ", "reverse bold $error"),
                    (
                        f" 5m burn is {ratio:.1f}x the 60m rate" if ratio else " 5m burn jumped",
                        "$error",
                    ),
                )
            )
        if s.unpriced_tokens_today:
            lines.append(
                Content.assemble(
                    ("unpriced ", "bold $warning"),
                    (f"{fmt.tokens(s.unpriced_tokens_today)} tokens today", "$warning"),
                    (" (not in $)", muted),
                )
            )
        if snapshot.billed:
            lines.append(
                Content.styled(
                    f"{'billed days':<{LABEL + 4}}{'est.':>{MONEY}}{'billed':>{MONEY}}"
                    f"{'gap':>{MONEY}}",
                    muted,
                )
            )
            for gap in snapshot.billed:
                share = float(gap.gap / gap.estimated) if gap.estimated else None
                line = Content.assemble(
                    f" {gap.provider:<{LABEL + 3}}",
                    f"{fmt.usd(gap.estimated):>{MONEY}}",
                    (f"{fmt.usd(gap.billed):>{MONEY}}", "bold"),
                )
                gap_text = f"{fmt.usd_signed(gap.gap):>{MONEY}}"
                if share and line.cell_length + len(gap_text) + 8 <= width:
                    gap_text += f" {'+' if share > 0 else ''}{fmt.pct(share)}"
                role = "$warning" if share is None or abs(share) > 0.05 else ""
                lines.append(line + Content.styled(gap_text, role))
        update_static(self.query_one("#spend-figures", Static), Content("\n").join(lines))
        chart = self.query_one(TimeChart)
        chart.data = tuple(float(v) for v in snapshot.series)
        peak = max(snapshot.series, default=Decimal(0))
        totals = snapshot.window_totals
        update_static(
            self.query_one("#spend-caption", Static),
            Content.assemble(
                (f"$ per {_step_name(snapshot.series_step)}", muted),
                ("  peak ", muted),
                fmt.usd(peak),
                ("  window ", muted),
                (fmt.usd(totals.cost), "bold"),
                ("  ", muted),
                fmt.count(totals.requests),
                (" req", muted),
            ),
        )
