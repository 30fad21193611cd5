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
from tokentop.tui.panes.base import Pane
from tokentop.tui.snapshot import Snapshot
from tokentop.tui.widgets.quiet import update_static

FIG = 8


def _idle_per_hour(d: GpuDevice) -> Decimal | None:
    return d.idle_cost * 3600 / Decimal(str(d.seconds)) if d.seconds > 0 else None


class GpuPane(Pane):
    """Self-hosted cost: each GPU's utilisation, power, $/h and idle burn; each endpoint's
    inferences per second; the fully loaded $/inference and $/1M tokens, idle cost, and a
    $/inference trend. Empty, it says why (the GPU source's own words)."""

    PANE_ID = "gpu"
    TITLE = "GPU"

    def compose_body(self) -> Iterable[Widget]:
        yield Static("", id="gpu-lines")
        yield Sparkline((), id="gpu-spark")
        yield Static("", id="gpu-caption")

    def apply(self, snapshot: Snapshot) -> None:
        g = snapshot.gpu
        self.badge.show(g.newest, snapshot.now)
        muted = "$text-muted"
        self.set_info(
            Content.assemble(
                (str(len(g.devices)), "bold"),
                f" GPU{'s' if len(g.devices) != 1 else ''} · ",
                (str(len(g.endpoints)), "bold"),
                f" endpoint{'s' if len(g.endpoints) != 1 else ''} · {snapshot.request.window}",
            )
        )
        width = self.inner_width - 1
        name_w = max(10, min(28, width - 4 * (FIG + 1)))
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
            lines.append(
                Content.styled(
                    f"{'GPU':<{name_w}}{'util':>{FIG}} {'power':>{FIG}} {'$/h':>{FIG}}"
                    f" {'idle/h':>{FIG}}",
                    muted,
                )
            )
            for d in g.devices:
                label = clean(f"{d.index} {d.name or d.device}")
                label = label if len(label) <= name_w else label[: name_w - 1] + "…"
                util = "n/a" if d.util_pct is None else f"{d.util_pct:.0f}%"
                power = "n/a" if d.power_w is None else f"{d.power_w:.0f}W"
                idle = _idle_per_hour(d)
                idle_role = (
                    "$warning" if idle and d.usd_per_hour and idle > d.usd_per_hour / 2 else ""
                )
                lines.append(
                    Content.assemble(
                        f"{label:<{name_w}}",
                        (f"{util:>{FIG}} ", "bold"),
                        f"{power:>{FIG}} ",
                        f"{fmt.usd(d.usd_per_hour):>{FIG}} ",
                        (f"{fmt.usd(idle):>{FIG}}", idle_role),
                    )
                )
        if g.endpoints:
            lines.append(
                Content.styled(
                    f"{'endpoint':<{name_w}}{'inf/s':>{FIG}} {'inferences':>{FIG + 2}}"
                    f" {'tokens':>{FIG - 2}}",
                    muted,
                )
            )
            for e in g.endpoints:
                label = clean(f"{e.endpoint}" + (f" ({e.kind})" if e.kind else ""))
                label = label if len(label) <= name_w else label[: name_w - 1] + "…"
                lines.append(
                    Content.assemble(
                        f"{label:<{name_w}}",
                        (f"{fmt.rate(e.per_second, ''):>{FIG}} ", "bold"),
                        f"{fmt.count(e.requests):>{FIG + 2}} ",
                        f"{fmt.tokens(e.prompt_tokens + e.generation_tokens):>{FIG - 2}}",
                    )
                )
        if g.devices:
            idle_share = float(g.idle_cost / g.cost) if g.cost else None
            lines.append(
                Content.assemble(
                    ("$/inference ", muted),
                    (fmt.usd_unit(g.cost_per_inference), "bold $accent"),
                    ("  $/1M tok ", muted),
                    (fmt.usd_unit(g.cost_per_1m_tokens), "bold"),
                    ("  cost ", muted),
                    fmt.usd(g.cost),
                    ("  idle ", muted),
                    (
                        f"{fmt.usd(g.idle_cost)} ({fmt.pct(idle_share)})",
                        "$warning" if idle_share and idle_share > 0.3 else "",
                    ),
                )
            )
        update_static(self.query_one("#gpu-lines", Static), Content("\n").join(lines))
        points = [float(v) for v in snapshot.gpu_series if v is not None]
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
