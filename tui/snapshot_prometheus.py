"""One refresh of the panes over Prometheus: the same :class:`~tokentop.tui.snapshot.Snapshot`
as :func:`~tokentop.tui.snapshot.build_snapshot`, filled from PromQL instead of the database.

All the instant queries of the visible panes go out at once (the source's thread pool), and the
two chart series beside them, so a refresh costs about the slowest query, not their sum. A query
that fails raises :class:`~tokentop.collectors.promql.PromError`: the app shows the refresh
error and the panes keep their last figures, going stale; nothing is shown as $0. This module
imports no Textual.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from datetime import datetime
from decimal import Decimal

from tokentop.collectors.promql import Sample
from tokentop.collectors.promsource import PromSource, Query, add_totals
from tokentop.store.queries import series_step
from tokentop.tui.snapshot import RefreshRequest, Snapshot, usage_loading

Series = list[tuple[datetime, Decimal]]
GpuSeries = list[tuple[datetime, Decimal | None]]


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
    queries: dict[str, Query] = {**source.source_queries(now)}
    step = series_step(start, end, request.chart_points)
    gstep = series_step(start, end, 60)
    pool = source._pool  # the source's own query threads
    spend_series: Future[Series] | None = None
    gpu_series: Future[GpuSeries] | None = None
    # The window's groups by model serve the model mix and the window's totals (every usage
    # row is in one group); the cost pane adds the window before and another grouping.
    by_model = ("provider", "model")
    model = "now." if "cost" in panes and request.group == "model" else "model."
    if model == "model." and panes & {"spend", "mix"}:
        queries.update(source.group_queries(model, start, end, by_model, text))
    if "spend" in panes:
        queries.update(source.spend_queries(now, text))
        spend_series = pool.submit(source.spend_series, start, end, step, text)
    if "cost" in panes:
        queries.update(source.cost_queries(start, end, request.group, text))
    if "gpu" in panes:
        queries.update(source.first_gpu_queries(start, end))
        gpu_series = pool.submit(source.gpu_series, start, end, gstep)
    answers: dict[str, list[Sample]] = source.run(queries)
    if "gpu" in panes:
        source.complete_gpu(answers, start, end)
    values: dict[str, object] = {}
    if "spend" in panes:
        spend = source.fold_spend(answers, now, request.budget_daily, request.budget_monthly)
        values["spend"] = spend
        values["window_totals"] = add_totals(
            g.totals for g in source.fold(answers, model, by_model).values()
        )
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
