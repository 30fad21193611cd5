"""One refresh of the panes: every query they need, run together in a worker thread.

A :class:`Snapshot` is immutable and self-contained, so the UI thread only copies values into
widgets. This module imports no Textual, so it can be exercised (and timed) without a screen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TypeVar

from tokentop.collectors.runner import Holder, read_holder
from tokentop.store import queries, request_queries
from tokentop.store.db import Store
from tokentop.store.queries import (
    CostRow,
    GpuOverview,
    MixRow,
    ProviderDay,
    Resolution,
    SpendSummary,
    Totals,
)
from tokentop.store.records import SourceHealth
from tokentop.store.request_queries import RequestStats

WINDOWS: dict[str, int] = {
    "15m": 15 * 60,
    "1h": 3600,
    "6h": 6 * 3600,
    "24h": 24 * 3600,
    "7d": 7 * 86400,
    "30d": 30 * 86400,
}
"""Selectable time windows and their length in seconds, in key order (1..6)."""


def window_name(seconds: int) -> str:
    """A compact name for a window length: ``90m``, ``2h``, ``3d``."""
    if seconds % 86400 == 0:
        return f"{seconds // 86400}d"
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


PANES: tuple[str, ...] = ("spend", "cost", "mix", "gpu", "sources")
"""Pane ids, in layout order."""

GPU_KINDS = frozenset({"nvml", "gpu", "dcgm"})
"""Source kinds that report GPUs (used to explain an empty GPU pane)."""
SELF_HOSTED_KINDS = GPU_KINDS | {"prometheus", "demo"}
"""Kinds of source whose data the GPU pane shows (the demo simulates GPUs too)."""


@dataclass(frozen=True, slots=True)
class Feed:
    """How fresh the sources behind a pane are.

    A pane is fed while any of its sources still succeeds within its own staleness limit, so
    ``fed_at`` and ``stale_after`` come from the source that stays fresh longest. Without any
    source health (a file written by something else) both are ``None`` and the age of the data
    decides. ``stopped`` overrides everything: the collector that fed the screen has stopped.
    """

    newest: datetime | None = None
    """The newest data point behind the pane."""
    fed_at: datetime | None = None
    """The last successful poll (or heartbeat) of the freshest source."""
    stale_after: float | None = None
    """That source's staleness limit in seconds."""
    stopped: str = ""
    """Why the whole feed is known dead (``collector pid 123 stopped``), or ``""``."""


@dataclass(frozen=True, slots=True)
class RefreshRequest:
    """What to query: taken from the app's state on the event loop, then handed to the worker."""

    seq: int
    now: datetime
    window: str
    """The window's name (``1h``); its length is ``span_s``."""
    span_s: int = 0
    """Window length in seconds; 0 means the length of the named window."""
    text: str = ""
    group: str = "model"
    panes: frozenset[str] = frozenset(PANES)
    """Visible panes; queries only they need are skipped for the others."""
    budget_daily: Decimal | None = None
    budget_monthly: Decimal | None = None
    chart_points: int = 120
    top_n: int = 0
    """Groups the Cost per query table has room for besides an "others" row (from its height):
    at most that many groups and one row that sums the rest; 0 lists every group."""
    mix_top_n: int = 0
    """The same for the Model mix pane's lines."""
    expected: tuple[tuple[str, str], ...] = ()
    """(name, kind) of the sources this process runs, so a pane can say it is still loading."""

    @property
    def start(self) -> datetime:
        """Window start."""
        return self.now - timedelta(seconds=self.span_s or WINDOWS[self.window])

    @property
    def end(self) -> datetime:
        """Window end (now)."""
        return self.now


@dataclass(frozen=True, slots=True)
class ProviderGap:
    """Estimated beside billed cost of one provider, over the days it has billed in a window."""

    provider: str
    estimated: Decimal
    billed: Decimal
    days: int

    @property
    def gap(self) -> Decimal:
        """Billed minus estimated."""
        return self.billed - self.estimated


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the panes show after one refresh. Fields of skipped panes keep defaults."""

    request: RefreshRequest
    spend: SpendSummary | None = None
    window_totals: Totals = field(default_factory=Totals)
    series: tuple[Decimal, ...] = ()
    series_step: int = 60
    billed: tuple[ProviderGap, ...] = ()
    cost_rows: tuple[CostRow, ...] = ()
    mix: tuple[MixRow, ...] = ()
    gpu: GpuOverview = field(default_factory=GpuOverview)
    gpu_series: tuple[Decimal | None, ...] = ()
    gpu_step: int = 60
    sources: tuple[SourceHealth, ...] = ()
    metered: RequestStats | None = None
    """Requests seen by the per-request meter in the window (proxy, httpx hook, pytest)."""
    metered_by_tag: tuple[RequestStats, ...] = ()
    """The dearest tags (or tests) among them."""
    usage_loading: str = ""
    """Non-empty while a spend source is still loading or backfilling (what to say instead of
    the data's age): the usage panes show it so a partial history is not taken as the whole."""
    newest_usage: datetime | None = None
    holder: Holder | None = None
    """The process that holds the collector lock, as its last heartbeat says."""
    holder_alive: bool = False
    """Whether that process is still collecting (heartbeat fresh, pid present on this host)."""
    feed_stopped: str = ""
    """Set by the app: the collector it watched stopped, so every figure is stale."""
    resolution: Resolution = field(default_factory=Resolution)
    """The finest data behind the window: where it reaches past the one-minute data kept
    (retention), its start is exact to the hour or day, and ``resolution.note`` says so."""
    elapsed_s: float = 0.0
    """Wall time the queries took."""

    @property
    def now(self) -> datetime:
        """The clock reading the snapshot was taken at."""
        return self.request.now

    def gpu_source(self) -> SourceHealth | None:
        """The first source that reports GPUs, if any is known."""
        return next((s for s in self.sources if s.kind in GPU_KINDS), None)

    def feed(self, kinds: frozenset[str] | None, newest: datetime | None) -> Feed:
        """The freshness of the sources of ``kinds`` (all sources for ``None``)."""
        best: tuple[datetime, float] | None = None
        for s in self.sources:
            if kinds is not None and s.kind not in kinds:
                continue
            limit = s.stale_after_s
            if s.last_success is None or limit is None:
                continue
            if best is None or s.last_success + timedelta(seconds=limit) > best[0] + timedelta(
                seconds=best[1]
            ):
                best = (s.last_success, limit)
        if best is None:
            return Feed(newest, stopped=self.feed_stopped)
        return Feed(newest, best[0], best[1], self.feed_stopped)


def summarise_billed(days: list[ProviderDay]) -> tuple[ProviderGap, ...]:
    """Per provider, estimate and billed cost summed over the days that have a bill."""
    acc: dict[str, tuple[Decimal, Decimal, int]] = {}
    for d in days:
        if d.billed is None:
            continue
        est, billed, n = acc.get(d.provider, (Decimal(0), Decimal(0), 0))
        acc[d.provider] = (est + d.estimated, billed + d.billed, n + 1)
    return tuple(ProviderGap(p, e, b, n) for p, (e, b, n) in sorted(acc.items()))


USAGE_KINDS = frozenset({"openai", "anthropic", "demo", "meter"})
"""Kinds of source that produce spend (usage buckets)."""


def usage_loading(sources: tuple[SourceHealth, ...], expected: tuple[tuple[str, str], ...]) -> str:
    """What the usage panes should say while spend sources are still filling in, or ``""``."""
    for s in sources:
        if s.kind in USAGE_KINDS and s.state == "backfilling":
            return s.detail or "backfilling"
    health = {s.name: s for s in sources}
    for name, kind in expected:
        h = health.get(name)
        if kind in USAGE_KINDS and (h is None or (h.last_success is None and not h.last_error)):
            return "loading…"
    return ""


_Row = TypeVar("_Row", CostRow, MixRow)


def _fold(rows_for: Callable[[int | None], list[_Row]], top_n: int) -> tuple[_Row, ...]:
    """The rows of a table with room for ``top_n`` groups and an "others" row (0: every group).

    When only one group is beyond ``top_n`` it takes the others row's place itself: a row that
    sums one group would hide its name for nothing. (The second call reads the refresh's memo,
    not the database.)
    """
    rows = rows_for(top_n or None)
    if top_n and rows and rows[-1].others == 1:
        rows = rows_for(None)
    return tuple(rows)


def build_snapshot(store: Store, request: RefreshRequest) -> Snapshot:
    """Run the queries of the visible panes (blocking: call from a worker thread)."""
    began = time.perf_counter()
    start, end, text, panes = request.start, request.end, request.text, request.panes
    values: dict[str, object] = {}
    memo: queries.Memo = {}  # the Model mix reuses the Cost per query pane's model totals
    if "spend" in panes:
        values["spend"] = queries.spend_summary(
            store, request.now, text, request.budget_daily, request.budget_monthly
        )
        values["window_totals"] = queries.totals(store, start, end, text)
        step = queries.series_step(start, end, request.chart_points)
        values["series_step"] = step
        values["series"] = tuple(v for _, v in queries.spend_series(store, start, end, step, text))
        values["billed"] = summarise_billed(queries.billed_vs_estimated(store, start, end))
    if "cost" in panes:
        values["cost_rows"] = _fold(
            lambda limit: queries.cost_by(store, start, end, request.group, text, limit, memo),
            request.top_n,
        )
        metered = request_queries.request_stats(store, start, end, text=text)
        if metered.requests:
            values["metered"] = metered
            values["metered_by_tag"] = tuple(
                request_queries.request_stats_by(store, start, end, "tag", text=text, limit=3)
            )
    if "mix" in panes:
        values["mix"] = _fold(
            lambda limit: queries.model_mix(store, start, end, text, limit, memo),
            request.mix_top_n,
        )
    if "gpu" in panes:
        values["gpu"] = queries.gpu_overview(store, start, end)
        gstep = queries.series_step(start, end, 60)
        values["gpu_step"] = gstep
        values["gpu_series"] = tuple(v for _, v in queries.gpu_series(store, start, end, gstep))
    # Sources feed the GPU pane's explanation and every badge; the query reads a few rows.
    values["resolution"] = queries.resolution(store, start)
    values["sources"] = tuple(queries.sources(store, request.now))
    values["usage_loading"] = usage_loading(values["sources"], request.expected)  # type: ignore[arg-type]
    spend = values.get("spend")
    values["newest_usage"] = (
        spend.newest_data if isinstance(spend, SpendSummary) else queries.newest_usage(store)
    )
    holder = read_holder(store)
    values["holder"] = holder
    values["holder_alive"] = holder is not None and holder.alive(request.now)
    return Snapshot(
        request=request,
        elapsed_s=time.perf_counter() - began,
        **values,  # type: ignore[arg-type]
    )
