"""GPU: per-device utilisation, power and cost, per-endpoint inferences, $/inference."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

from textual.content import Content
from textual.widget import Widget
from textual.widgets import Sparkline, Static

from tokentop.store.queries import GpuDevice
from tokentop.store.text import clean
from tokentop.tui import format as fmt
from tokentop.tui.columns import Column, fit_columns
from tokentop.tui.panes.base import Pane, flow
from tokentop.tui.snapshot import SELF_HOSTED_KINDS, Snapshot
from tokentop.tui.widgets.lines import Lines
from tokentop.tui.widgets.quiet import update_static

DEVICE_COLUMNS = (("util", "util"), ("power", "power"), ("usd_h", "$/h"), ("idle_h", "idle/h"))
DEVICE_DROP = ("power", "util")
"""A narrow pane drops power, then utilisation; never the money ($/h, idle burn per hour)."""
ENDPOINT_COLUMNS = (("per_s", "inf/s"), ("inferences", "inferences"), ("tokens", "tokens"))
ENDPOINT_DROP = ("tokens", "inferences")

Row = tuple[str, dict[str, tuple[str, str]]]
"""A name and, per column key, (text, style)."""


def _grid(
    columns: tuple[tuple[str, str], ...],
    drop: tuple[str, ...],
    heading: str,
    rows: list[Row],
    width: int,
) -> list[Content]:
    """A heading line and one line per row: the columns that fit ``width`` (right-aligned, one
    space apart) and the name in what is left, cut with ``…`` only when it must be."""
    fitted = fit_columns(
        width,
        (heading, [name for name, _ in rows]),
        [(Column(key, label), [cells[key][0] for _, cells in rows]) for key, label in columns],
        drop,
        name_floor=10,
        padding=1,
    )
    name_w = fitted.name_width
    labels = dict(columns)
    keys = fitted.keys[1:]
    out = [
        Content.styled(
            f"{heading:<{name_w}}" + "".join(f" {labels[k]:>{fitted.widths[k]}}" for k in keys),
            "$text-muted",
        )
    ]
    for name, cells in rows:
        parts: list[tuple[str, str] | str] = [f"{fmt.fit(name, name_w):<{name_w}}"]
        for k in keys:
            text, style = cells[k]
            parts.append((f" {text:>{fitted.widths[k]}}", style))
        out.append(Content.assemble(*parts))
    return out


def _idle_per_hour(d: GpuDevice) -> Decimal | None:
    return d.idle_cost * 3600 / Decimal(str(d.seconds)) if d.seconds > 0 else None


class GpuPane(Pane):
    """Self-hosted cost: each GPU's utilisation, power, $/h and idle burn; each endpoint's
    inferences per second; the fully loaded $/inference and $/1M tokens, idle cost, and a
    $/inference trend. Empty, it says why (the GPU source's own words)."""

    PANE_ID = "gpu"
    TITLE = "GPU"

    def compose_body(self) -> Iterable[Widget]:
        yield Lines(id="gpu-lines")
        yield Sparkline((), id="gpu-spark")
        yield Static("", id="gpu-caption")

    def apply(self, snapshot: Snapshot) -> None:
        g = snapshot.gpu
        stale = self.show_freshness(snapshot.feed(SELF_HOSTED_KINDS, g.newest), snapshot.now)
        # Rates of a dead feed are unknown, never $0/h or 0/s.
        per_hour = fmt.usd if not stale else (lambda _v: fmt.MISSING)
        muted = "$text-muted"
        self.set_info(
            Content.assemble(
                (str(len(g.devices)), "bold"),
                f" GPU{'s' if len(g.devices) != 1 else ''} · ",
                (str(len(g.endpoints)), "bold"),
                f" endpoint{'s' if len(g.endpoints) != 1 else ''} · {snapshot.request.window}",
            )
        )
        width = self.inner_width
        lines: list[Content] = []
        if not g.devices:
            source = snapshot.gpu_source()
            if source is None:
                reason = Content.styled("no GPU source configured", muted)
            else:
                why = clean(source.last_error or source.detail or f"state {source.state}")
                reason = Content.assemble(
                    (f"{clean(source.name)}: ", "bold"),
                    (why, "$warning" if source.last_error else muted),
                )
            lines.append(Content.assemble(("no GPU data — ", muted), reason))
        else:
            rows = []
            for d in g.devices:
                util = "n/a" if d.util_pct is None else f"{d.util_pct:.0f}%"
                power = "n/a" if d.power_w is None else f"{d.power_w:.0f}W"
                if stale:  # last readings of a feed that stopped: not what the GPU does now
                    util = power = fmt.MISSING
                idle = _idle_per_hour(d)
                idle_role = (
                    "$warning" if idle and d.usd_per_hour and idle > d.usd_per_hour / 2 else ""
                )
                rows.append(
                    (
                        clean(f"{d.index} {d.name or d.device}"),
                        {
                            "util": (util, "bold"),
                            "power": (power, ""),
                            "usd_h": (per_hour(d.usd_per_hour), ""),
                            "idle_h": (per_hour(idle), idle_role),
                        },
                    )
                )
            lines += _grid(DEVICE_COLUMNS, DEVICE_DROP, "GPU", rows, width)
        if g.endpoints:
            rows = [
                (
                    clean(f"{e.endpoint}" + (f" ({e.kind})" if e.kind else "")),
                    {
                        "per_s": (fmt.rate(None if stale else e.per_second, ""), "bold"),
                        "inferences": (fmt.count(e.requests), ""),
                        "tokens": (fmt.tokens(e.prompt_tokens + e.generation_tokens), ""),
                    },
                )
                for e in g.endpoints
            ]
            lines += _grid(ENDPOINT_COLUMNS, ENDPOINT_DROP, "endpoint", rows, width)
        if g.devices:
            idle_share = float(g.idle_cost / g.cost) if g.cost else None
            lines += flow(
                [
                    Content.assemble(
                        ("$/inference ", muted),
                        (fmt.usd_unit(g.cost_per_inference), "bold $accent"),
                    ),
                    Content.assemble(
                        ("$/1M tok ", muted), (fmt.usd_unit(g.cost_per_1m_tokens), "bold")
                    ),
                    Content.assemble(("cost ", muted), fmt.usd(g.cost)),
                    Content.assemble(
                        ("idle ", muted),
                        (
                            f"{fmt.usd(g.idle_cost)} ({fmt.pct(idle_share)})",
                            "$warning" if idle_share and idle_share > 0.3 else "",
                        ),
                    ),
                ],
                width,
            )
        self.query_one("#gpu-lines", Lines).set_lines(lines)
        # Whole steps only: the newest one is still filling (a partial minute's $/inference is
        # noise), and leaving it out keeps the trend from repainting every second.
        points = [float(v) for v in snapshot.gpu_series[:-1] if v is not None]
        spark = self.query_one(Sparkline)
        spark.display = len(points) > 1
        spark.data = points
        caption = self.query_one("#gpu-caption", Static)
        caption.display = len(points) > 1
        if points:
            update_static(
                caption,
                Content.assemble(
                    ("$/inference trend  ", muted),
                    ("min ", muted),
                    fmt.usd_unit(min(points)),
                    ("  max ", muted),
                    fmt.usd_unit(max(points)),
                ),
            )
