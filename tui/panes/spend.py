"""Spend: this hour, today, this month, burn rates, projections, budget and a chart."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

from textual.content import Content
from textual.widget import Widget
from textual.widgets import Static

from tokentop.store.text import clean
from tokentop.tui import format as fmt
from tokentop.tui.panes.base import Pane
from tokentop.tui.snapshot import USAGE_KINDS, Snapshot
from tokentop.tui.widgets.chart import TimeChart
from tokentop.tui.widgets.lines import Lines
from tokentop.tui.widgets.quiet import update_static

LABEL = 9
MONEY = 10
CHART_MIN = 3
"""Rows the chart keeps in a short pane (figures of least rank give way first)."""


def _figure_lines(totals: list[tuple[str, str]], burns: list[str], width: int) -> list[Content]:
    """$ this hour, today, month and the 5/15/60-minute burn: side by side where they fit,
    else the burns below the totals; each label stays on the line of its value."""
    muted = "$text-muted"
    money = max(len(v) for _, v in totals)
    rate = max(len(v) for v in burns)
    left = LABEL + money
    right = len("burn 60m ") + rate
    names = ("5m", "15m", "60m")
    if left + 2 + right <= width:
        return [
            Content.assemble(
                (f"{label:<{LABEL}}", muted),
                (f"{value:>{money}}", "bold"),
                (f"  {'burn' if i == 0 else '':<4} {names[i]:>3} ", muted),
                f"{burns[i]:>{rate}}",
            )
            for i, (label, value) in enumerate(totals)
        ]
    w = max(money, rate)
    lines = [
        Content.assemble((f"{label:<{LABEL}}", muted), (f"{value:>{w}}", "bold"))
        for label, value in totals
    ]
    lines += [
        Content.assemble((f"{'burn ' + name:<{LABEL}}", muted), f"{burn:>{w}}")
        for name, burn in zip(names, burns, strict=True)
    ]
    return lines


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
        yield Lines(id="spend-figures")
        yield TimeChart(id="spend-chart")
        yield Static("", id="spend-caption")

    def apply(self, snapshot: Snapshot) -> None:
        s = snapshot.spend
        if s is None:
            return
        self.badge.loading_text = snapshot.usage_loading
        stale = self.show_freshness(snapshot.feed(USAGE_KINDS, snapshot.newest_usage), snapshot.now)
        self.set_class(s.spike and not stale, "-spike")
        req = snapshot.request
        width = self.inner_width
        info = Content.assemble((req.window, "bold"), " window · ", ("estimated", "italic"))
        if info.cell_length + 18 + 14 <= width:  # the badge takes about 14 cells
            info += " (tokens x prices)"
        self.set_info(info)
        burn = s.burn_per_hour
        muted = "$text-muted"
        # With nothing ever recorded, figures are unknown, not $0. A dead feed keeps its totals
        # (marked stale) but its rates and what follows from them are unknown: never $0/h.
        known = snapshot.newest_usage is not None
        usd = fmt.usd if known else (lambda _v: fmt.MISSING)
        rate = fmt.usd_rate if known and not stale else (lambda _v: fmt.MISSING)
        ahead = usd if not stale else (lambda _v: fmt.MISSING)
        lines = _figure_lines(
            [("since:00", usd(s.hour)), ("today", usd(s.today)), ("month", usd(s.month))],
            [rate(burn.get(5)), rate(burn.get(15)), rate(burn.get(60))],
            width,
        )
        # Each line's rank (0 first): a short pane keeps the most telling lines and its chart.
        ranks: list[int] = []

        def rank(value: int) -> None:
            ranks.extend([value] * (len(lines) - len(ranks)))

        rank(0)
        # One stated method each (queries.PROJECTIONS); the method goes first when short.
        for head, value, how in (
            ("day ", ahead(s.projected_today), " at 60m burn"),
            ("month ", ahead(s.projected_month), " at MTD average"),
        ):
            line = Content.assemble(
                (f"{'proj.' if head == 'day ' else '':<{LABEL}}", muted), (head, muted)
            )
            line += Content.styled(value, "bold")
            if line.cell_length + len(how) <= width:
                line += Content.styled(how, muted)
            lines.append(line)
        rank(3)
        if stale and known:
            badge = self.badge
            why = badge.stopped or f"no successful poll for {fmt.age(badge.stale_age_s)}"
            lines.append(Content.styled(f"stale: {why}; rates unknown", "$error"))
        if not known and snapshot.usage_loading:
            lines.append(Content.styled(f"{snapshot.usage_loading}: no usage yet", "$accent"))
        elif not known:
            lines.append(
                Content.styled(
                    "no usage recorded yet: see Sources for what is collecting", "$warning"
                )
            )
        rank(0)
        if s.budget_daily is None and s.budget_monthly is None:
            lines.append(
                Content.assemble((f"{'budget':<{LABEL}}", muted), ("no budget set", muted))
            )
        else:
            if s.budget_daily is not None:
                line, _ = _budget_line("budget", s.today, s.budget_daily, "day", width)
                lines.append(line)
                runway = None if stale else s.runway_hours
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
        rank(2)
        if s.spike and not stale:
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
        rank(1)
        if s.unpriced_tokens_today:
            line = Content.assemble(
                ("unpriced ", "bold $warning"),
                (f"{fmt.tokens(s.unpriced_tokens_today)} tokens today", "$warning"),
            )
            if line.cell_length + 11 <= width:
                line += Content.styled(" (not in $)", muted)
            lines.append(line)
        rank(4)
        if snapshot.billed:
            figures = [
                text
                for gap in snapshot.billed
                for text in (fmt.usd(gap.estimated), fmt.usd(gap.billed), fmt.usd_signed(gap.gap))
            ]
            money = min(MONEY, max(len(t) for t in figures) + 1)
            lines.append(
                Content.styled(
                    f"{'billed days':<{LABEL + 2}}{'est.':>{money}}{'billed':>{money}}"
                    f"{'gap':>{money}}",
                    muted,
                )
            )
            for gap in snapshot.billed:
                share = float(gap.gap / gap.estimated) if gap.estimated else None
                line = Content.assemble(
                    f" {fmt.fit(clean(gap.provider), LABEL):<{LABEL + 1}}",
                    f"{fmt.usd(gap.estimated):>{money}}",
                    (f"{fmt.usd(gap.billed):>{money}}", "bold"),
                )
                gap_text = f"{fmt.usd_signed(gap.gap):>{money}}"
                if share and line.cell_length + len(gap_text) + 8 <= width:
                    gap_text += f" {'+' if share > 0 else ''}{fmt.pct(share)}"
                role = "$warning" if share is None or abs(share) > 0.05 else ""
                lines.append(line + Content.styled(gap_text, role))
        rank(5)
        # Room for the figures: the pane less its header, the caption and a chart of CHART_MIN.
        room = self.content_size.height - 2 - CHART_MIN
        hidden = 0
        if self.content_size.height and len(lines) > room:
            keep = sorted(range(len(lines)), key=lambda i: (ranks[i], i))[: max(room, 3)]
            hidden = len(lines) - len(keep)
            lines = [lines[i] for i in sorted(keep)]
        self.query_one("#spend-figures", Lines).set_lines(lines)
        chart = self.query_one(TimeChart)
        chart.data = tuple(float(v) for v in snapshot.series)
        peak = max(snapshot.series, default=Decimal(0))
        totals = snapshot.window_totals
        # The window's total first: it is the figure an export of this screen records.
        caption = Content.assemble(
            ("window ", muted),
            (usd(totals.cost), "bold"),  # unknown, not $0, before anything was recorded
            " ",
            fmt.count(totals.requests) if known else fmt.MISSING,
            (" req", muted),
        )
        peak_text = Content.assemble(
            ("  peak ", muted), usd(peak), (f"/{_step_name(snapshot.series_step)}", muted)
        )
        # Lines left out for want of height: say so, and that z shows them (before the peak).
        more = Content.styled(f"  +{hidden} lines: z", "$warning")
        if hidden and caption.cell_length + more.cell_length <= width:
            caption += more
        if caption.cell_length + peak_text.cell_length <= width:
            caption += peak_text
        update_static(self.query_one("#spend-caption", Static), caption)
