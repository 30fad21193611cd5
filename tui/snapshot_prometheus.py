"""One refresh of the panes over Prometheus: the same :class:`~tokentop.tui.snapshot.Snapshot`
as :func:`~tokentop.tui.snapshot.build_snapshot`, filled from PromQL instead of the database.

A refresh first asks the server's index which providers the request meter has series of (no
samples read; without any, the usage queries leave out the counted-once lookup), then sends every
query of the visible panes at once on the source's threads: the small ones of a family as one
request (:data:`~tokentop.collectors.promsource.BATCHES`), and the two chart series beside them,
so a refresh costs about its slowest request, not their sum. What is settled is not asked again:
the window before (the Cost pane's change), today's and this month's whole hours, and a chart's
steps older than :data:`SETTLED`. About ten requests in all (`bench/prometheus_bench.py`).

A query that fails raises :class:`~tokentop.collectors.promql.PromError`: the app shows the
refresh error and the panes keep their last figures, going stale; nothing is shown as $0. This
module imports no Textual.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from datetime import datetime, timedelta
from decimal import Decimal

from tokentop.collectors.promql import Sample
from tokentop.collectors.promsource import (
    BURN_MINUTES,
    SETTLE,
    PromSource,
    Query,
    add_totals,
    window_start,
)
from tokentop.store.queries import series_step
from tokentop.tui.snapshot import RefreshRequest, Snapshot, usage_loading

Series = list[tuple[datetime, Decimal]]
GpuSeries = list[tuple[datetime, Decimal | None]]

SETTLED = SETTLE
"""Samples older than this have all arrived: a query evaluated that long ago has a fixed
answer (:data:`~tokentop.collectors.promsource.SETTLE`)."""


def build_prometheus_snapshot(source: PromSource, request: RefreshRequest) -> Snapshot:
    """Run the visible panes' queries against Prometheus (blocking: call from a worker)."""
    began = time.perf_counter()
    start, end, text, panes, now = (
        request.start,
        request.end,
        request.text,
        request.panes,
        request.now,
    )
    pool = source._pool  # the source's own query threads
    length = end - start
    # The usage queries leave out the counted-once lookup when nothing is metered (see
    # ``counted``): a probe of the server's index over the earliest window any pane reads.
    earliest = window_start(start - length if "cost" in panes else start)
    if "spend" in panes:
        earliest = min(earliest, source.month_start(now))
    # The probe reads the index only (a few milliseconds); then every query goes out.
    usage_panes = bool(panes & {"spend", "cost", "mix"})
    meter = source.meter_providers(earliest, now) if usage_panes else ()
    first: dict[str, Query] = {**source.source_queries(now)}
    step = series_step(start, end, request.chart_points)
    gstep = series_step(start, end, 60)
    spend_series: Future[Series] | None = None
    gpu_series: Future[GpuSeries] | None = None
    if "gpu" in panes:
        first.update(source.first_gpu_queries(start, end))
        gpu_series = pool.submit(source.gpu_series, start, end, gstep, now - SETTLED)
    if "spend" in panes:
        first["spend.history"] = source.spend_queries(now, text)["spend.history"]
    pending = source.submit(first)
    # The window's groups by model serve the model mix and the window's totals (every usage
    # row is in one group); the cost pane adds the window before and another grouping. A
    # window as long as a burn rate's (1h, 15m) gives that burn rate too.
    by_model = ("provider", "model")
    model = "now." if "cost" in panes and request.group == "model" else "model."
    usage: dict[str, Query] = {}
    if model == "model." and panes & {"spend", "mix"}:
        usage.update(source.group_queries(model, start, end, by_model, text, meter=meter))
    known_burn = [m for m in BURN_MINUTES if length == timedelta(minutes=m)]
    if "spend" in panes:
        usage.update(source.spend_queries(now, text, meter=meter, known_burn=known_burn))
        spend_series = pool.submit(
            source.spend_series, start, end, step, text, meter=meter, settled=now - SETTLED
        )
    if "cost" in panes:
        usage.update(source.cost_queries(start, end, request.group, text, meter=meter))
    # The window before is settled: its answers are kept while its queries stay the same.
    usage = {name: q for name, q in usage.items() if name not in first}
    answers: dict[str, list[Sample]] = source.run(usage, settled=now - SETTLED)
    answers.update(pending.result())
    if "gpu" in panes:
        source.complete_gpu(answers, start, end)
    values: dict[str, object] = {}
    if "spend" in panes:
        window = add_totals(g.totals for g in source.fold(answers, model, by_model).values())
        spend = source.fold_spend(
            answers,
            now,
            request.budget_daily,
            request.budget_monthly,
            burn_cost={m: window.cost for m in known_burn},
        )
        values["spend"] = spend
        values["window_totals"] = window
        values["series_step"] = step
        assert spend_series is not None
        values["series"] = tuple(v for _, v in spend_series.result())
    if "cost" in panes:
        values["cost_rows"] = tuple(source.fold_cost(answers, request.group))
    if "mix" in panes:
        values["mix"] = tuple(source.mix(source.fold(answers, model, by_model)))
    if "gpu" in panes:
        values["gpu"] = source.fold_gpu(answers, start, end)
        values["gpu_step"] = gstep
        assert gpu_series is not None
        values["gpu_series"] = tuple(v for _, v in gpu_series.result())
    sources = tuple(source.fold_sources(answers, now, time.perf_counter() - began))
    values["sources"] = sources
    values["usage_loading"] = usage_loading(sources, ())
    values["newest_usage"] = source.fold_freshness(answers, now)[0]
    return Snapshot(
        request=request,
        elapsed_s=time.perf_counter() - began,
        **values,  # type: ignore[arg-type]
    )


def via(source: PromSource, snapshot: Snapshot | None) -> str:
    """``via Prometheus URL · newest sample 3s old``: what every pane says under its border."""
    from tokentop.store.text import clean

    text = f"via Prometheus {clean(source.url)}"
    if snapshot is None or not snapshot.sources:
        return text
    newest = snapshot.sources[0].newest_data
    if newest is None:
        return f"{text} · no sample yet"
    seconds = max(0.0, (snapshot.now - newest).total_seconds())
    return f"{text} · newest sample {seconds:.0f}s old"
