"""The fleet's figures read from Prometheus: the store's pane queries, in PromQL.

Every figure is one PromQL query, ``increase()`` over the window summed ``by`` the groups it
needs, evaluated by the server; Python only adds up the handful of groups that come back and
prices external GPU time with the ``[[gpu]]`` rates. The results are the store's own types
(:class:`~tokentop.store.queries.Totals`, ``CostRow``, ``MixRow``, ``GpuOverview``,
``SourceHealth``), so the panes and the report show them without knowing where they came from.

Rules carried over from the store:

- **Windows start on a whole minute**: the store counts the one-minute buckets that *start* in
  ``[start, end)``; over Prometheus that is the counters' growth from the first whole minute at or
  after ``start`` to ``end``.
- **A dollar is counted once**: series from the request meter (``metered="true"``) count only
  for providers that no other source (an admin API, the demo) reports at the window's end;
  otherwise they are "of which metered".
- **Unknown is not zero**: a failed query raises :class:`~tokentop.collectors.promql.PromError`.

Long windows use subqueries (``increase(x[30d:28800s])``): they read one sample per step instead of
every scrape of a month, which is what makes a 30-day pane refresh affordable without recording
rules. tokentop's counters never reset (they start from the stored totals), so the coarser
reading loses nothing but the extrapolation at the window's edges.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from tokentop.collectors.base import Clock, utcnow
from tokentop.collectors.promql import (
    PromClient,
    Sample,
    Series,
    duration,
    quote,
    regex_literal,
)
from tokentop.pricing.gpu import GpuCostModel, GpuRate
from tokentop.store.queries import (
    CostRow,
    Endpoint,
    GpuDevice,
    GpuOverview,
    MixRow,
    SpendSummary,
    Totals,
)
from tokentop.store.records import SourceHealth, from_epoch
from tokentop.store.report import REPORT_VERSION, assemble_report

COST = "tokentop_cost_usd_total"
TOKENS = "tokentop_tokens_total"
REQUESTS = "tokentop_requests_total"
GPU_COST = "tokentop_gpu_cost_usd_total"
GPU_IDLE = "tokentop_gpu_idle_cost_usd_total"
GPU_SECONDS = "tokentop_gpu_seconds_total"
INFERENCES = "tokentop_inferences_total"
INFERENCE_TOKENS = "tokentop_inference_tokens_total"
SOURCE_UP = "tokentop_source_up"

FILTER_LABELS = ("provider", "model", "project", "tag", "api_key")
"""Labels the text filter looks in (as the store's filter does)."""
RAW_MAX_S = 3 * 3600
"""Windows up to this long read every sample; longer ones use a subquery."""
SUBQUERY_STEPS = 100
SUBQUERY_MIN_STEP_S = 300
HOUR_STEPS = (300, 360, 400, 450, 480, 600, 720, 900, 1200, 1800, 3600)
"""Subquery steps that divide an hour (whole minutes)."""
NANO = Decimal("0.000000001")
BURN_MINUTES = (5, 15, 60)
"""The burn rates' windows, in minutes."""
_INPUT_KINDS = ("input_uncached", "cache_read", "cache_write_5m", "cache_write_1h")

EXTERNAL_SERVERS: dict[str, dict[str, str]] = {
    # Served inferences, prompt tokens and generated tokens per inference server, from the
    # metrics teams already scrape (see the reference notes: vLLM 0.33, SGLang 0.5, TGI 3.3).
    "vllm": {
        "inferences": 'vllm:request_success_total{finished_reason=~"stop|length"}',
        "prompt": "vllm:prompt_tokens_total",
        "generation": "vllm:generation_tokens_total",
        "model": "model_name",
    },
    "sglang": {
        "inferences": "sglang:num_requests_total",
        "prompt": "sglang:prompt_tokens_total",
        "generation": "sglang:generation_tokens_total",
        "model": "model_name",
    },
    "tgi": {
        "inferences": "tgi_request_success",
        "prompt": "tgi_request_input_length_sum",
        "generation": "tgi_request_generated_tokens_sum",
        "model": "",
    },
}
DCGM_UTIL = "DCGM_FI_DEV_GPU_UTIL"
DCGM_POWER = "DCGM_FI_DEV_POWER_USAGE"
DCGM_ENERGY = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
DCGM_FB_USED = "DCGM_FI_DEV_FB_USED"
DCGM_FB_FREE = "DCGM_FI_DEV_FB_FREE"
_OWN_GAUGES = ("utilization_ratio", "power_watts", "memory_used_bytes", "memory_total_bytes")
_DCGM_GAUGES = {
    "util": DCGM_UTIL,
    "power": DCGM_POWER,
    "used": DCGM_FB_USED,
    "free": DCGM_FB_FREE,
}
_DCGM_KEY = ("instance", "Hostname", "hostname", "gpu", "UUID", "uuid", "modelName")
"""DCGM exporter's labels that identify a GPU (``Hostname`` became ``hostname`` after 4.5.3)."""


def window_start(start: datetime) -> datetime:
    """The first whole minute at or after ``start`` (where the store's buckets begin)."""
    floor = start.replace(second=0, microsecond=0)
    return floor if floor == start else floor + timedelta(minutes=1)


def window_seconds(start: datetime, end: datetime) -> float:
    """Length of ``[window_start(start), end)`` in seconds (0 when empty)."""
    return max(0.0, (end - window_start(start)).total_seconds())


def _usd(value: Decimal | None) -> Decimal:
    return Decimal(0) if value is None else value.quantize(NANO, rounding=ROUND_HALF_EVEN)


def _count(value: Decimal | None) -> int:
    return 0 if value is None else int(value.to_integral_value(rounding=ROUND_HALF_EVEN))


def over(func: str, selector: str, seconds: float) -> str:
    """``func(selector[range])`` for a window; a subquery at a coarser step when it is long."""
    rng = duration(seconds)
    if seconds <= RAW_MAX_S:
        return f"{func}({selector}[{rng}])"
    # About a hundred steps, never finer than Prometheus' 5-minute lookback: each step is one
    # lookup per series, which costs about as much as reading a chunk of raw samples. Steps
    # divide an hour (or are whole hours), so that they land on every whole hour: a window
    # that ends on one (the day's whole hours) ends on a step.
    least = max(SUBQUERY_MIN_STEP_S, -(-int(seconds / SUBQUERY_STEPS) // 60) * 60)
    step = next((d for d in HOUR_STEPS if d >= least), -(-least // 3600) * 3600)
    return f"{func}({selector}[{rng}:{step}s])"


def selector(metric: str, matchers: Iterable[str] = ()) -> str:
    """``metric{m1, m2}``."""
    inner = ", ".join(matchers)
    return f"{metric}{{{inner}}}" if inner else metric


def increase(metric: str, matchers: Sequence[str], seconds: float, text: str = "") -> str:
    """``increase()`` of a metric over a window; with a filter text, of the series whose
    provider, model, project, tag or API key contains it (case-insensitive), each once."""
    if not text:
        return over("increase", selector(metric, matchers), seconds)
    pattern = quote(f"(?i).*{regex_literal(text)}.*")
    parts = [
        over("increase", selector(metric, [*matchers, f"{label}=~{pattern}"]), seconds)
        for label in FILTER_LABELS
    ]
    return "(" + " or ".join(parts) + ")"


Meter = tuple[str, ...] | None
"""The providers of the request meter's series (``""`` for series without one), as
:meth:`PromSource.meter_providers` found them; ``None`` when not asked (every query then
carries the whole counted-once rule)."""


def counted(
    metric: str,
    matchers: Sequence[str],
    seconds: float,
    by: Sequence[str],
    text: str = "",
    scope: str = "counted",
    meter: Meter = None,
) -> str:
    """A usage metric's increase summed ``by`` groups, each dollar once (see the module).

    ``scope``: ``counted`` (the totals), ``metered`` (the meter's part of covered providers)
    or ``all`` (every source added up: audits only).

    ``meter``: the providers that have metered series in the window (:data:`Meter`). With
    none, the rule has nothing to decide and the query is the admin sources' increase alone
    (``metered`` is then an empty vector); with some, the covered-provider lookup reads only
    their series. Both leave the answer as it is and save most of a usage query's work.
    """
    if meter is not None and not meter and scope != "all":
        if scope == "metered":
            return "vector(0) > 1"  # nothing metered: an empty vector
        only = f"sum by ({', '.join(sorted({*by, 'provider'}))}) " + (
            f"({increase(metric, [*matchers, 'metered=' + quote('false')], seconds, text)})"
        )
        if "provider" in by:
            return only
        return f"sum by ({', '.join(by)}) ({only})" if by else f"sum({only})"
    inner = ", ".join(sorted({*by, "provider"}))
    # Covered: an admin source reports the provider at the window's end (within Prometheus'
    # lookback). An instant selector reads one sample per series, not the whole window again.
    covering = ['metered="false"']
    if meter:
        alternatives = "|".join(regex_literal(p) for p in sorted(set(meter)))
        covering.append(f"provider=~{quote(alternatives)}")
    non_meter = selector(REQUESTS, covering)
    covered = f"group by (provider) ({non_meter})"

    def part(metered: str | None) -> str:
        m = [*matchers] if metered is None else [*matchers, f'metered="{metered}"']
        return f"sum by ({inner}) ({increase(metric, m, seconds, text)})"

    if scope == "counted":
        expr = f"({part('false')}) or (({part('true')}) unless on (provider) {covered})"
    elif scope == "metered":
        expr = f"({part('true')}) and on (provider) {covered}"
    elif scope == "all":
        expr = part(None)
    else:
        raise ValueError(f"unknown scope {scope!r}")
    if "provider" in by:
        return expr
    return f"sum by ({', '.join(by)}) ({expr})" if by else f"sum({expr})"


@dataclass(frozen=True, slots=True)
class Group:
    """A group's totals over a window, and whether every row of it was priced."""

    totals: Totals
    priced: bool

    @property
    def empty(self) -> bool:
        """Nothing happened in the window."""
        t = self.totals
        return not (t.requests or t.input_total or t.output or t.cost)


@dataclass(slots=True)
class _Acc:
    cost: Decimal = Decimal(0)
    requests: Decimal = Decimal(0)
    unpriced_requests: Decimal = Decimal(0)
    tokens: dict[str, Decimal] = field(default_factory=dict)
    unpriced_tokens: Decimal = Decimal(0)
    unpriced_seen: bool = False

    def group(self) -> Group:
        tok = self.tokens
        return Group(
            Totals(
                cost=_usd(self.cost),
                requests=_count(self.requests),
                input_total=_count(sum((tok.get(k, Decimal(0)) for k in _INPUT_KINDS), Decimal(0))),
                cache_read=_count(tok.get("cache_read")),
                cache_write=_count(
                    tok.get("cache_write_5m", Decimal(0)) + tok.get("cache_write_1h", Decimal(0))
                ),
                output=_count(tok.get("output")),
                unpriced_tokens=_count(self.unpriced_tokens),
                unpriced_requests=_count(self.unpriced_requests),
            ),
            priced=not self.unpriced_seen,
        )


Query = tuple[str, datetime]
"""A PromQL expression and the time to evaluate it at."""

USAGE_METRICS = f'{{__name__=~"{COST}|{TOKENS}|{REQUESTS}"}}'
"""Every usage series (for the meter probe's label lookups)."""
BATCH_LABEL = "tokentop_query"
"""Label that tells the parts of a batched query apart (see :data:`BATCHES`)."""
BATCHES: tuple[tuple[str, str | None], ...] = (
    ("src.", "meta"),
    ("fresh.", "meta"),
    ("spend.history", "meta"),
    ("status.", "meta"),
    ("gpu.", "gpu"),
    ("spend.today.", None),  # the day's and month's whole hours: kept all hour (see submit)
    ("spend.month", None),
    ("spend.", "spend"),
    ("now.tokens", None),
    ("model.tokens", None),
    ("now.", "window"),
    ("model.", "window"),
)
"""Query-name prefixes (the first that matches) whose queries go to the server as one request:
``a or b``, each part tagged with :data:`BATCH_LABEL`. A batch is evaluated as one query, so
each holds about as much work as the largest query alone (a window's tokens, five kinds of
every usage series), and the server evaluates the batches side by side; fewer requests cost the
client and the server less."""
CACHE_SIZE = 64
"""Answers kept for queries evaluated at a settled time (see :meth:`PromSource.submit`)."""
SETTLE = timedelta(minutes=5)
"""Samples older than this have all arrived (a few scrape intervals): a query evaluated that
long ago has a fixed answer."""


def _batch(name: str) -> str | None:
    for prefix, batch in BATCHES:
        if name.startswith(prefix):
            return batch
    return None


@dataclass(slots=True)
class _Kept:
    """The settled steps of a range query: every series' points up to ``covered``."""

    covered: int
    series: dict[tuple[tuple[str, str], ...], tuple[Mapping[str, str], dict[int, Decimal | None]]]


class Pending:
    """Answers on their way (:meth:`PromSource.submit`); :meth:`result` waits for them."""

    def __init__(self) -> None:
        self.ready: dict[str, list[Sample]] = {}
        self.parts: list[tuple[tuple[str, ...], Future[list[Sample]], Query | None]] = []
        self.cache: PromSource | None = None

    def result(self) -> dict[str, list[Sample]]:
        """Every answer by name, or the first :class:`PromError`."""
        out = dict(self.ready)
        for names, future, keep in self.parts:
            found = future.result()
            if len(names) == 1:
                out[names[0]] = found
                if keep is not None and self.cache is not None:
                    self.cache._remember(keep, found)
                continue
            split: dict[str, list[Sample]] = {n: [] for n in names}
            for sample in found:
                labels = dict(sample.labels)
                name = labels.pop(BATCH_LABEL, "")
                if name in split:
                    split[name].append(Sample(labels, sample.value, sample.ts))
            out.update(split)
        return out


class PromSource:
    """The figures of a fleet, from one Prometheus-compatible server.

    Args:
        client: the query API client.
        gpu_rates: the ``[[gpu]]`` rates (external GPU metrics are priced with them).
        gpu_metrics: ``tokentop``, ``external`` or ``auto`` (see :mod:`.metrics_config`).
        clock: injected time source.
        workers: queries sent at once.
    """

    def __init__(
        self,
        client: PromClient,
        *,
        gpu_rates: tuple[GpuRate, ...] = (),
        gpu_metrics: str = "auto",
        clock: Clock = utcnow,
        workers: int = 4,
    ) -> None:
        self.client = client
        self.gpu_costs = GpuCostModel(gpu_rates)
        self.gpu_rates = gpu_rates
        self.gpu_metrics = gpu_metrics
        self.clock = clock
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="promql")
        self._cache: dict[Query, list[Sample]] = {}
        self._ranges: dict[tuple[str, int], _Kept] = {}
        self._cache_lock = threading.Lock()

    @property
    def url(self) -> str:
        """The server's base URL."""
        return self.client.url

    def close(self) -> None:
        """Stop the query threads and close the connections."""
        self._pool.shutdown(wait=True)
        self.client.close()

    def run(
        self, queries: Mapping[str, Query], *, settled: datetime | None = None
    ) -> dict[str, list[Sample]]:
        """Send the queries at once; every answer, or the first :class:`PromError`."""
        return self.submit(queries, settled=settled).result()

    def submit(self, queries: Mapping[str, Query], *, settled: datetime | None = None) -> Pending:
        """Send the queries at once, on the source's threads; :meth:`Pending.result` waits.

        Small queries of one family (:data:`BATCHES`) and one evaluation time go as one request.
        A query evaluated at or before ``settled`` (a time whose samples have all arrived, such
        as the end of the previous window) is answered from the last minutes' answers when it
        was asked before: the same PromQL at the same time has the same answer.
        """
        pending = Pending()
        pending.cache = self
        groups: dict[tuple[str, datetime], list[str]] = {}
        for name, (promql, at) in queries.items():
            batch = _batch(name)
            if batch is not None:
                groups.setdefault((batch, at), []).append(name)
                continue
            keep: Query | None = None
            if settled is not None and at <= settled:
                keep = (promql, at)
                with self._cache_lock:
                    hit = self._cache.get(keep)
                if hit is not None:
                    pending.ready[name] = hit
                    continue
            future = self._pool.submit(self.client.query, promql, at)
            pending.parts.append(((name,), future, keep))
        for (_, at), names in groups.items():
            if len(names) == 1:
                promql = queries[names[0]][0]
            else:
                promql = " or ".join(
                    f'label_replace({queries[n][0]}, {quote(BATCH_LABEL)}, {quote(n)}, "", "")'
                    for n in names
                )
            future = self._pool.submit(self.client.query, promql, at)
            pending.parts.append((tuple(names), future, None))
        return pending

    def query_range(
        self,
        promql: str,
        start: datetime,
        end: datetime,
        step: int,
        settled: datetime | None = None,
    ) -> list[Series]:
        """A range query whose steps up to ``settled`` (all their samples in) are asked once:
        later calls ask the server only for the steps after the ones it kept (a chart's
        minutes of the last hour, say, but its newest few). Steps are multiples of ``step``,
        so they are the same from one call to the next."""
        if settled is None:
            return self.client.query_range(promql, start, end, step)
        lo, hi = int(start.timestamp()), int(end.timestamp())
        key = (promql, step)
        with self._cache_lock:
            kept = self._ranges.get(key)
        ask = lo
        if kept is not None and lo - step <= kept.covered:
            ask = max(lo, kept.covered + step)
        else:
            kept = None
        fresh = self.client.query_range(promql, from_epoch(ask), end, step) if ask <= hi else []
        merged: dict[
            tuple[tuple[str, str], ...], tuple[Mapping[str, str], dict[int, Decimal | None]]
        ]
        merged = {}
        if kept is not None:
            for k, (labels, points) in kept.series.items():
                merged[k] = (labels, {t: v for t, v in points.items() if t >= lo})
        for series in fresh:
            k = tuple(sorted(series.labels.items()))
            entry = merged.setdefault(k, (series.labels, {}))
            entry[1].update((int(t), v) for t, v in series.points)
        covered = min(hi, lo + (int(settled.timestamp()) - lo) // step * step)
        if covered >= lo:
            keep = _Kept(
                covered,
                {
                    k: (labels, {t: v for t, v in points.items() if t <= covered})
                    for k, (labels, points) in merged.items()
                },
            )
            with self._cache_lock:
                self._ranges[key] = keep
                while len(self._ranges) > 8:
                    del self._ranges[next(iter(self._ranges))]
        return [
            Series(labels, tuple((float(t), v) for t, v in sorted(points.items())))
            for labels, points in merged.values()
        ]

    def _remember(self, key: Query, answer: list[Sample]) -> None:
        with self._cache_lock:
            self._cache[key] = answer
            while len(self._cache) > CACHE_SIZE:
                del self._cache[next(iter(self._cache))]

    def meter_providers(self, start: datetime, end: datetime) -> tuple[str, ...]:
        """The providers of the request meter's usage series with samples in ``[start, end]``
        (``""`` for series without a provider), from the server's index: no samples read.

        Most fleets have no meter, or meter few providers: with this, the usage queries leave
        out the counted-once lookup (see :func:`counted`), which otherwise costs as much as the
        increase itself.
        """
        metered = USAGE_METRICS[:-1] + ', metered="true"}'
        # Series without a provider have no value to list: asked apart, at the same time.
        bare = metered[:-1] + ', provider=""}'
        unnamed = self._pool.submit(self.client.label_values, "metered", bare, start, end)
        providers = self.client.label_values("provider", metered, start, end)
        return tuple(sorted({*providers, *([""] if unnamed.result() else [])}))

    # Usage.

    def group_queries(
        self,
        prefix: str,
        start: datetime,
        end: datetime,
        by: Sequence[str],
        text: str = "",
        scope: str = "counted",
        tokens: str = "all",
        *,
        meter: Meter = None,
        matchers: Sequence[str] = (),
    ) -> dict[str, Query]:
        """The queries behind :meth:`groups`: cost, requests and tokens by kind.

        ``tokens``: ``all``, ``unpriced`` (only the unpriced tokens, all the Spend pane shows of
        them) or ``none`` (for a previous window: $/request needs cost and requests only).
        Tokens are the largest family (five kinds), so this is most of a refresh's work.
        ``meter``: see :func:`counted` (the meter's part, ``scope="metered"``, needs no query
        when nothing is metered). ``matchers``: label matchers every usage series must meet.
        """
        if scope == "metered" and meter is not None and not meter:
            return {}
        s = window_seconds(start, end)
        m = list(matchers)
        cost = counted(COST, ['kind="estimated"', *m], s, by, text, scope, meter)
        queries = {
            f"{prefix}cost": (cost, end),
            f"{prefix}requests": (
                counted(REQUESTS, m, s, [*by, "priced"], text, scope, meter),
                end,
            ),
        }
        if tokens != "none":
            m = ['priced="false"', *m] if tokens == "unpriced" else m
            t = counted(TOKENS, m, s, [*by, "kind", "priced"], text, scope, meter)
            queries[f"{prefix}tokens"] = (t, end)
        return queries

    @staticmethod
    def fold(
        answers: Mapping[str, list[Sample]], prefix: str, by: Sequence[str]
    ) -> dict[tuple[str, ...], Group]:
        """Turn :meth:`group_queries`' answers into each group's totals (empty groups left
        out)."""
        acc: dict[tuple[str, ...], _Acc] = {}

        def get(s: Sample) -> _Acc:
            return acc.setdefault(tuple(s.labels.get(b, "") for b in by), _Acc())

        for s in answers.get(f"{prefix}cost", []):
            get(s).cost += s.value or 0
        for s in answers.get(f"{prefix}tokens", []):
            a, v = get(s), s.value or Decimal(0)
            kind = s.labels.get("kind", "")
            a.tokens[kind] = a.tokens.get(kind, Decimal(0)) + v
            if s.labels.get("priced") == "false":
                a.unpriced_tokens += v
                a.unpriced_seen = a.unpriced_seen or v > 0
        for s in answers.get(f"{prefix}requests", []):
            a, v = get(s), s.value or Decimal(0)
            a.requests += v
            if s.labels.get("priced") == "false":
                a.unpriced_requests += v
                a.unpriced_seen = a.unpriced_seen or v > 0
        groups = {k: a.group() for k, a in acc.items()}
        return {k: g for k, g in groups.items() if not g.empty}

    def groups(
        self,
        start: datetime,
        end: datetime,
        by: Sequence[str],
        text: str = "",
        scope: str = "counted",
    ) -> dict[tuple[str, ...], Group]:
        """Usage totals of ``[start, end)`` per group of ``by`` labels."""
        meter = self.meter_providers(window_start(start), end)
        answers = self.run(self.group_queries("", start, end, by, text, scope, meter=meter))
        return self.fold(answers, "", by)

    def totals(
        self, start: datetime, end: datetime, text: str = "", scope: str = "counted"
    ) -> Totals:
        """Usage totals of ``[start, end)`` (as :func:`tokentop.store.queries.totals`)."""
        found = self.groups(start, end, (), text, scope)
        return found[()].totals if () in found else Totals()

    @staticmethod
    def _by(group: str) -> tuple[str, ...]:
        return ("provider", "model") if group == "model" else (group,)

    def cost_queries(
        self,
        start: datetime,
        end: datetime,
        group: str = "model",
        text: str = "",
        *,
        meter: Meter = None,
    ) -> dict[str, Query]:
        """The queries behind :meth:`fold_cost`: the window and the one before it.

        The window before ends where the store's does, on the minute the window starts in
        (buckets start on whole minutes), so its queries are the same for a minute: their
        answers are kept (``submit(settled=...)``) instead of being asked again every refresh.
        """
        by, length = self._by(group), end - start
        before = window_start(start)
        return {
            **self.group_queries("now.", start, end, by, text, meter=meter),
            **self.group_queries(
                "before.", start - length, before, by, text, tokens="none", meter=meter
            ),
        }

    def fold_cost(self, answers: Mapping[str, list[Sample]], group: str) -> list[CostRow]:
        """As :func:`tokentop.store.queries.cost_by`: groups with the previous window."""
        by = self._by(group)
        current = self.fold(answers, "now.", by)
        before = self.fold(answers, "before.", by)
        rows = [
            CostRow(
                key=k[-1],
                provider=k[0] if group == "model" else "",
                totals=g.totals,
                previous=before[k].totals if k in before else Totals(),
                priced=g.priced,
            )
            for k, g in current.items()
        ]
        rows.sort(key=lambda r: (-r.totals.cost, -r.totals.requests, r.key))
        return rows

    def cost_by(
        self, start: datetime, end: datetime, group: str = "model", text: str = ""
    ) -> list[CostRow]:
        """As :func:`tokentop.store.queries.cost_by`: groups with the previous window."""
        meter = self.meter_providers(window_start(start - (end - start)), end)
        queries = self.cost_queries(start, end, group, text, meter=meter)
        return self.fold_cost(self.run(queries), group)

    @staticmethod
    def mix(groups: Mapping[tuple[str, ...], Group]) -> list[MixRow]:
        """Model mix from groups by (provider, model)."""
        total_cost = sum((g.totals.cost for g in groups.values()), Decimal(0))
        total_req = sum(g.totals.requests for g in groups.values())
        rows = [
            MixRow(
                provider=k[0],
                model=k[1],
                cost=g.totals.cost,
                requests=g.totals.requests,
                cost_share=float(g.totals.cost / total_cost) if total_cost else 0.0,
                request_share=g.totals.requests / total_req if total_req else 0.0,
                priced=g.priced,
            )
            for k, g in groups.items()
        ]
        rows.sort(key=lambda m: (-m.cost, -m.requests, m.model))
        return rows

    def model_mix(self, start: datetime, end: datetime, text: str = "") -> list[MixRow]:
        """As :func:`tokentop.store.queries.model_mix`."""
        return self.mix(self.groups(start, end, ("provider", "model"), text))

    @staticmethod
    def month_start(now: datetime) -> datetime:
        """The first instant of ``now``'s month (UTC): the earliest the Spend pane reads."""
        return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)

    def spend_queries(
        self,
        now: datetime,
        text: str = "",
        *,
        meter: Meter = None,
        known_burn: Collection[int] = (),
    ) -> dict[str, Query]:
        """The queries behind :meth:`fold_spend`.

        Today and this month are their whole hours up to the last settled one (that hour's
        end at least :data:`SETTLE` ago: the same queries all hour long, their answers kept,
        see :meth:`submit`), and every sample since: cost, requests and unpriced tokens, which
        after the hour's first minutes is also the Spend pane's "this hour". The whole hours
        are read with a subquery's steps, which end on the hour, so nothing of the current hour
        is guessed from the day's average rate.

        ``known_burn``: burn windows (minutes: 5, 15, 60) whose cost the caller has already
        asked for (the panes' window when it is as long) and hands to :meth:`fold_spend`.
        """
        now = now.astimezone(UTC)
        hour_start, settled, day_start, month_start = _spend_bounds(now)

        def cost(start: datetime, end: datetime = now) -> Query:
            seconds = window_seconds(start, end)
            return (counted(COST, ['kind="estimated"'], seconds, (), text, meter=meter), end)

        def since(prefix: str, start: datetime) -> dict[str, Query]:
            return self.group_queries(prefix, start, now, (), text, tokens="unpriced", meter=meter)

        queries = {
            **since("spend.hour.", hour_start),
            # In an hour's first minutes the hour before is not settled yet: read with it.
            **(since("spend.recent.", settled) if settled < hour_start else {}),
            **{
                f"spend.burn{m}": cost(now - timedelta(minutes=m))
                for m in BURN_MINUTES
                if m not in known_burn
            },
            "spend.history": (f"count({REQUESTS} offset 2h)", now),
            **self.freshness_queries(now),
        }
        if month_start < settled:
            queries["spend.month"] = cost(month_start, settled)
        if day_start < settled:
            queries.update(
                self.group_queries(
                    "spend.today.", day_start, settled, (), text, "counted", "unpriced",
                    meter=meter,
                )
            )  # fmt: skip
        return queries

    def fold_spend(
        self,
        answers: Mapping[str, list[Sample]],
        now: datetime,
        budget_daily: Decimal | None = None,
        budget_monthly: Decimal | None = None,
        spike_floor: Decimal = Decimal(1),
        burn_cost: Mapping[int, Decimal] | None = None,
    ) -> SpendSummary:
        """As :func:`tokentop.store.queries.spend_summary`, with the same projections.

        ``burn_cost``: the cost of the burn windows left out of :meth:`spend_queries`
        (``known_burn``), by minutes.
        """
        now = now.astimezone(UTC)
        day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        month_start = day_start.replace(day=1)
        next_month = (month_start + timedelta(days=32)).replace(day=1)

        def first(name: str) -> Decimal:
            found = answers.get(f"spend.{name}")
            return _usd(found[0].value) if found else Decimal(0)

        def totals(prefix: str) -> Totals:
            return self.fold(answers, prefix, ()).get((), Group(Totals(), True)).totals

        known = burn_cost or {}
        hour_start, settled, day_start, month_start = _spend_bounds(now)
        hour = totals("spend.hour.")
        recent = totals("spend.recent.") if settled < hour_start else hour
        # The whole hours and the rest; in a day's (month's) first minutes, only this hour.
        today = add_totals((totals("spend.today."), recent)) if settled >= day_start else hour
        burn = {m: (known[m] if m in known else first(f"burn{m}")) * 60 / m for m in BURN_MINUTES}
        month = first("month") + recent.cost if settled >= month_start else hour.cost
        hours_left_day = Decimal((day_start + timedelta(days=1) - now).total_seconds()) / 3600
        hours_left_month = Decimal((next_month - now).total_seconds()) / 3600
        elapsed_month_h = Decimal((now - month_start).total_seconds()) / 3600
        month_rate = month / elapsed_month_h if elapsed_month_h > 0 else burn[60]
        history_rows = answers["spend.history"]
        history = bool(history_rows) and (history_rows[0].value or 0) > 0
        return SpendSummary(
            now=now,
            hour=hour.cost,
            today=today.cost,
            month=month,
            burn_per_hour=burn,
            projected_today=today.cost + burn[60] * hours_left_day,
            projected_month=month + month_rate * hours_left_month,
            newest_data=self.fold_freshness(answers, now)[0],
            unpriced_tokens_today=today.unpriced_tokens,
            requests_today=today.requests,
            spike=history and burn[5] >= spike_floor and burn[5] > 3 * burn[60],
            budget_daily=budget_daily,
            budget_monthly=budget_monthly,
        )

    def spend_summary(
        self,
        now: datetime,
        text: str = "",
        budget_daily: Decimal | None = None,
        budget_monthly: Decimal | None = None,
        spike_floor: Decimal = Decimal(1),
    ) -> SpendSummary:
        """As :func:`tokentop.store.queries.spend_summary`, the same projections."""
        meter = self.meter_providers(self.month_start(now), now)
        answers = self.run(self.spend_queries(now, text, meter=meter))
        return self.fold_spend(answers, now, budget_daily, budget_monthly, spike_floor)

    def spend_series(
        self,
        start: datetime,
        end: datetime,
        step: int,
        text: str = "",
        *,
        meter: Meter = None,
        settled: datetime | None = None,
    ) -> list[tuple[datetime, Decimal]]:
        """Cost per step, oldest first (as :func:`tokentop.store.queries.spend_series`): the
        increase over each step, evaluated at each step's end. Steps ending by ``settled`` are
        kept (see :meth:`query_range`)."""
        lo = int(start.timestamp()) // step * step
        hi = int(end.timestamp())
        points = list(range(lo, hi, step))
        if not points:
            return []
        promql = counted(COST, ['kind="estimated"'], step, (), text, meter=meter)
        series = self.query_range(
            promql, from_epoch(lo + step), from_epoch(points[-1] + step), step, settled
        )
        values = {t - step: v for s in series for t, v in s.points}
        return [(from_epoch(t), _usd(values.get(t))) for t in points]

    def unpriced(self, groups: Mapping[tuple[str, ...], Group]) -> dict[str, int]:
        """Tokens of unpriced models, by ``provider/model`` (from groups by provider, model)."""
        return {
            f"{k[0]}/{k[1]}" if k[0] else k[1]: g.totals.unpriced_tokens
            for k, g in groups.items()
            if g.totals.unpriced_tokens
        }

    def total_sources(self, start: datetime, end: datetime) -> dict[str, dict[str, list[str]]]:
        """Per provider: the sources its totals come from and the metered ones inside them."""
        return self.fold_total_sources(self.run(self.total_sources_queries(start, end)))

    @staticmethod
    def total_sources_queries(start: datetime, end: datetime) -> dict[str, Query]:
        """The query behind :meth:`fold_total_sources`."""
        s = window_seconds(start, end)
        promql = f"sum by (provider, source, metered) ({increase(REQUESTS, [], s)}) > 0"
        return {"sources.totals": (promql, end)}

    @staticmethod
    def fold_total_sources(
        answers: Mapping[str, list[Sample]],
    ) -> dict[str, dict[str, list[str]]]:
        """Per provider: the sources its totals come from and the metered ones inside them."""
        rows = answers["sources.totals"]
        covered = {r.labels.get("provider", "") for r in rows if r.labels.get("metered") != "true"}
        out: dict[str, dict[str, list[str]]] = {}
        for r in sorted(rows, key=lambda r: (r.labels.get("provider", ""), r.labels.get("source"))):
            provider = r.labels.get("provider", "")
            entry = out.setdefault(provider, {"counted": [], "metered": []})
            meter = r.labels.get("metered") == "true"
            scope = "metered" if meter and provider in covered else "counted"
            name = r.labels.get("source", "")
            if name not in entry[scope]:
                entry[scope].append(name)
        return out

    # Freshness and health.

    def freshness_queries(self, now: datetime) -> dict[str, Query]:
        """The newest usage bucket end and the newest sample's time across the fleet."""
        return {
            "fresh.usage": ("max(tokentop_usage_newest_timestamp_seconds)", now),
            "fresh.sample": (f"max(timestamp({SOURCE_UP}))", now),
        }

    @staticmethod
    def fold_freshness(
        answers: Mapping[str, list[Sample]], now: datetime
    ) -> tuple[datetime | None, datetime | None]:
        """(newest usage, newest sample), each ``None`` when nothing is there."""

        def value(name: str) -> datetime | None:
            found = answers.get(name) or []
            if not found or found[0].value is None:
                return None
            return min(from_epoch(float(found[0].value)), now)

        return value("fresh.usage"), value("fresh.sample")

    def source_queries(self, now: datetime) -> dict[str, Query]:
        """The queries behind :meth:`fold_sources`."""
        hour = "[1h]"
        # Only the labels a source is told by: a third of the answer to read.
        key = "source, instance"
        return {
            "src.up": (f"max by ({key}, kind) (last_over_time({SOURCE_UP}{hour}))", now),
            "src.last": (
                f"max by ({key}) (last_over_time("
                f"tokentop_source_last_success_timestamp_seconds{hour}))",
                now,
            ),
            "src.interval": (
                f"max by ({key}) (last_over_time(tokentop_source_interval_seconds{hour}))",
                now,
            ),
            # Targets Prometheus cannot scrape (their sources are matched by instance).
            "src.targets": ("up == 0", now),
            **self.freshness_queries(now),
        }

    def sources(self, now: datetime) -> list[SourceHealth]:
        """Every tokentop source in the fleet (``name@instance``), the exporters Prometheus
        cannot reach, and the Prometheus server itself (first)."""
        began = time.perf_counter()
        answers = self.run(self.source_queries(now))
        return self.fold_sources(answers, now, time.perf_counter() - began)

    def fold_sources(
        self, answers: Mapping[str, list[Sample]], now: datetime, took: float
    ) -> list[SourceHealth]:
        """Source health from :meth:`source_queries`' answers (``took``: the queries' time)."""

        def key(s: Sample) -> tuple[str, str]:
            return (s.labels.get("source", ""), s.labels.get("instance", ""))

        last = {key(s): s.value for s in answers["src.last"]}
        interval = {key(s): s.value for s in answers["src.interval"]}
        down = {s.labels.get("instance", "") for s in answers["src.targets"]}
        out: list[SourceHealth] = []
        for s in sorted(answers["src.up"], key=key):
            source, instance = key(s)
            stamp = last.get((source, instance))
            every = interval.get((source, instance))
            unreachable = instance in down
            ok = s.value == 1 and not unreachable
            out.append(
                SourceHealth(
                    name=f"{source}@{instance}" if instance else source,
                    kind=s.labels.get("kind", ""),
                    state="ok" if ok else "error",
                    last_success=None if stamp is None else from_epoch(float(stamp)),
                    last_error=""
                    if ok
                    else (
                        f"Prometheus cannot scrape {instance}"
                        if unreachable
                        else "failing on its host"
                    ),
                    interval_s=None if every is None else float(every),
                    detail=f"via Prometheus {self.url}",
                )
            )
        _, newest_sample = self.fold_freshness(answers, now)
        age = "no sample" if newest_sample is None else _age(now, newest_sample)
        out.insert(
            0,
            SourceHealth(
                name="prometheus",
                kind="promql",
                state="ok",
                last_success=now,
                lag_s=took,
                calls=self.client.calls,
                detail=f"via Prometheus {self.url}; newest sample {age}",
                newest_data=newest_sample,
            ),
        )
        return out

    # GPUs.

    def gpu_queries(self, start: datetime, end: datetime) -> dict[str, Query]:
        """tokentop's own GPU and inference figures for a window (GPU samples are not minute
        buckets: the window is not rounded)."""
        s = max(0.0, (end - start).total_seconds())
        gpu_by = "instance, source, gpu"
        ep_by = "instance, source, endpoint, server"
        q: dict[str, Query] = {
            # The device's name and cost mode come with its cost; the rest by device only.
            "gpu.cost": (f"sum by ({gpu_by}, name, mode) ({increase(GPU_COST, [], s)})", end),
            "gpu.idle": (f"sum by ({gpu_by}) ({increase(GPU_IDLE, [], s)})", end),
            "gpu.seconds": (f"sum by ({gpu_by}) ({increase(GPU_SECONDS, [], s)})", end),
            "gpu.inferences": (f"sum by ({ep_by}) ({increase(INFERENCES, [], s)})", end),
            "gpu.tokens": (f"sum by ({ep_by}, kind) ({increase(INFERENCE_TOKENS, [], s)})", end),
        }
        # The four gauges in one query (the newest sample within the 5-minute lookback).
        names = "|".join(_OWN_GAUGES)
        # Only the labels the pane keys them by: a smaller answer to read.
        key = "instance, source, gpu"
        gauges = f'{{__name__=~"tokentop_gpu_({names})"}}'
        q["gpu.gauges"] = (f"max by (__name__, {key}) ({gauges})", end)
        q["gpu.seen"] = (f"max by ({key}) (timestamp(tokentop_gpu_power_watts))", end)
        return q

    def external_gpu_queries(self, start: datetime, end: datetime) -> dict[str, Query]:
        """GPU time, idle time and energy from the DCGM exporter, and inferences and tokens
        from inference servers' own metrics, over a window."""
        s = max(0.0, (end - start).total_seconds())
        res = max(15, int(s / 240))
        key = ", ".join(_DCGM_KEY)
        rng = f"[{duration(s)}:{res}s]"
        q: dict[str, Query] = {
            "ext.seconds": (
                f"sum by ({key}) (count_over_time(({DCGM_UTIL} >= 0){rng})) * {res}",
                end,
            ),
            "ext.idle": (
                f"sum by ({key}) (count_over_time(({DCGM_UTIL} == 0){rng})) * {res}",
                end,
            ),
            "ext.energy": (f"sum by ({key}) ({over('increase', DCGM_ENERGY, s)})", end),
            "ext.gauges": (f'{{__name__=~"{"|".join(_DCGM_GAUGES.values())}"}}', end),
            "ext.seen": (f"timestamp({DCGM_UTIL})", end),
        }
        for figure in ("inferences", "prompt", "generation"):
            parts = []
            for server, names in EXTERNAL_SERVERS.items():
                model = f", {names['model']}" if names["model"] else ""
                grown = f"sum by (instance{model}) ({over('increase', names[figure], s)})"
                parts.append(f'label_replace({grown}, "server", "{server}", "", "")')
            q[f"ext.{figure}"] = (" or ".join(parts), end)
        return q

    def first_gpu_queries(self, start: datetime, end: datetime) -> dict[str, Query]:
        """The GPU queries to send first: tokentop's own (and the external ones when
        ``gpu_metrics`` is ``external``); see :meth:`complete_gpu`."""
        queries = self.gpu_queries(start, end)
        if self.gpu_metrics == "external":
            queries.update(self.external_gpu_queries(start, end))
        return queries

    def complete_gpu(
        self, answers: dict[str, list[Sample]], start: datetime, end: datetime
    ) -> None:
        """With ``auto``, read the external GPU metrics only when tokentop has none in the
        window (a second round of queries, for fleets that run the DCGM exporter only)."""
        if self.gpu_metrics == "auto" and not self._own_gpu(answers):
            answers.update(self.run(self.external_gpu_queries(start, end)))

    @staticmethod
    def _own_gpu(answers: Mapping[str, list[Sample]]) -> bool:
        return bool(answers.get("gpu.seconds")) or bool(answers.get("gpu.inferences"))

    def gpu_overview(self, start: datetime, end: datetime) -> GpuOverview:
        """As :func:`tokentop.store.queries.gpu_overview`, over the fleet."""
        answers = self.run(self.first_gpu_queries(start, end))
        self.complete_gpu(answers, start, end)
        return self.fold_gpu(answers, start, end)

    def fold_gpu(
        self, answers: Mapping[str, list[Sample]], start: datetime, end: datetime
    ) -> GpuOverview:
        """Turn the GPU queries' answers into a :class:`GpuOverview`."""
        own = self._own_gpu(answers)
        use_external = self.gpu_metrics == "external" or (self.gpu_metrics == "auto" and not own)
        if use_external and "ext.seconds" in answers:
            return self._external(answers, start, end)
        if self.gpu_metrics == "external":
            return GpuOverview()
        return self._own(answers, start, end)

    def _own(
        self, answers: Mapping[str, list[Sample]], start: datetime, end: datetime
    ) -> GpuOverview:
        def k(s: Sample) -> tuple[str, str, str]:
            return (
                s.labels.get("instance", ""),
                s.labels.get("source", ""),
                s.labels.get("gpu", ""),
            )

        cost = {k(s): s for s in answers["gpu.cost"]}
        idle = {k(s): _usd(s.value) for s in answers["gpu.idle"]}
        seconds = {k(s): float(s.value or 0) for s in answers["gpu.seconds"]}
        gauges: dict[str, dict[tuple[str, str, str], Sample]] = {n: {} for n in _OWN_GAUGES}
        for g in answers["gpu.gauges"]:
            name = g.labels.get("__name__", "").removeprefix("tokentop_gpu_")
            if name in gauges:
                gauges[name][k(g)] = g
        seen = {k(s): s.value for s in answers["gpu.seen"]}
        devices = []
        for i, (key, s) in enumerate(sorted(cost.items())):
            instance, source, gpu = key
            util = gauges["utilization_ratio"].get(key)
            power = gauges["power_watts"].get(key)
            used = gauges["memory_used_bytes"].get(key)
            total = gauges["memory_total_bytes"].get(key)
            secs = seconds.get(key, 0.0)
            c = _usd(s.value)
            devices.append(
                GpuDevice(
                    source=f"{source}@{instance}" if instance else source,
                    device=gpu,
                    name=s.labels.get("name", ""),
                    index=i,
                    cost=c,
                    idle_cost=idle.get(key, Decimal(0)),
                    seconds=secs,
                    util_pct=None
                    if util is None or util.value is None
                    else float(util.value) * 100,
                    power_w=None if power is None or power.value is None else float(power.value),
                    mem_used_bytes=None if used is None else _count(used.value),
                    mem_total_bytes=None if total is None else _count(total.value),
                    temp_c=None,
                    usd_per_hour=c * 3600 / Decimal(str(secs)) if secs > 0 else None,
                    last_seen=_when(seen.get(key)),
                    cost_ref=f"{s.labels.get('mode', '')} (exported by tokentop)",
                )
            )
        endpoints = self._endpoints(
            answers["gpu.inferences"],
            answers["gpu.tokens"],
            max(0.0, (end - start).total_seconds()),
            label="endpoint",
        )
        return GpuOverview.of(devices, endpoints, until=end)

    def _endpoints(
        self,
        inferences: list[Sample],
        tokens: list[Sample] | None,
        seconds: float,
        *,
        label: str,
        prompt: list[Sample] | None = None,
        generation: list[Sample] | None = None,
    ) -> list[Endpoint]:
        def k(s: Sample) -> tuple[str, str, str]:
            return (
                s.labels.get("instance", ""),
                s.labels.get(label, "") or s.labels.get("model_name", ""),
                s.labels.get("server", ""),
            )

        tok: dict[tuple[str, str, str], dict[str, int]] = {}
        for s in tokens or []:
            tok.setdefault(k(s), {})[s.labels.get("kind", "")] = _count(s.value)
        for kind, found in (("prompt", prompt), ("generation", generation)):
            for s in found or []:
                tok.setdefault(k(s), {})[kind] = _count(s.value)
        out = []
        for s in sorted(inferences, key=k):
            instance, name, server = k(s)
            t = tok.get(k(s), {})
            out.append(
                Endpoint(
                    source=s.labels.get("source", "") or instance,
                    endpoint=f"{name}@{instance}" if instance and name else (name or instance),
                    kind=server,
                    requests=_count(s.value),
                    prompt_tokens=t.get("prompt", 0),
                    generation_tokens=t.get("generation", 0),
                    seconds=seconds,
                )
            )
        return out

    def _external(
        self, answers: Mapping[str, list[Sample]], start: datetime, end: datetime
    ) -> GpuOverview:
        def k(s: Sample) -> tuple[str, ...]:
            return tuple(s.labels.get(x, "") for x in _DCGM_KEY)

        idle = {k(s): s.value or Decimal(0) for s in answers["ext.idle"]}
        seen = {k(s): s.value for s in answers["ext.seen"]}
        energy = {k(s): s.value or Decimal(0) for s in answers["ext.energy"]}
        gauges: dict[str, dict[tuple[str, ...], Sample]] = {n: {} for n in _DCGM_GAUGES}
        metric = {v: n for n, v in _DCGM_GAUGES.items()}
        for g in answers["ext.gauges"]:
            name = metric.get(g.labels.get("__name__", ""), "")
            if name:
                gauges[name][k(g)] = g
        devices = []
        for i, s in enumerate(sorted(answers["ext.seconds"], key=k)):
            key = k(s)
            labels = dict(zip(_DCGM_KEY, key, strict=True))
            name = labels["modelName"]
            secs = s.value or Decimal(0)
            mj = _count(energy.get(key))
            priced = self.gpu_costs.interval_cost(name, secs, mj)
            idle_share = idle.get(key, Decimal(0)) / secs if secs else Decimal(0)
            util = gauges["util"].get(key)
            power = gauges["power"].get(key)
            used = gauges["used"].get(key)
            free = gauges["free"].get(key)
            mib = 1024 * 1024
            host = labels["Hostname"] or labels["hostname"] or labels["instance"]
            devices.append(
                GpuDevice(
                    source=f"dcgm@{host}",
                    device=labels["UUID"] or labels["uuid"] or labels["gpu"],
                    name=name,
                    index=int(labels["gpu"]) if labels["gpu"].isdigit() else i,
                    cost=_usd(priced.cost),
                    idle_cost=_usd(priced.cost * idle_share),
                    seconds=float(secs),
                    util_pct=None if util is None or util.value is None else float(util.value),
                    power_w=None if power is None or power.value is None else float(power.value),
                    mem_used_bytes=None if used is None else _count(used.value) * mib,
                    mem_total_bytes=None
                    if used is None or free is None
                    else (_count(used.value) + _count(free.value)) * mib,
                    temp_c=None,
                    usd_per_hour=priced.rate.usd_per_hour
                    if priced.rate.mode == "rented"
                    else (priced.cost * 3600 / secs if secs else None),
                    last_seen=_when(seen.get(key)),
                    cost_ref=f"{priced.rate.mode} ${priced.rate.usd_per_hour}/GPU-h"
                    f" ({priced.rate.source}){'; estimated' if priced.estimated else ''}",
                )
            )
        endpoints = self._endpoints(
            answers["ext.inferences"],
            None,
            max(0.0, (end - start).total_seconds()),
            label="model_name",
            prompt=answers["ext.prompt"],
            generation=answers["ext.generation"],
        )
        return GpuOverview.of(devices, endpoints, until=end)

    def gpu_series(
        self, start: datetime, end: datetime, step: int, settled: datetime | None = None
    ) -> list[tuple[datetime, Decimal | None]]:
        """$/inference per step (``None`` where nothing was served), from tokentop's metrics.
        Steps ending by ``settled`` are kept (see :meth:`query_range`)."""
        lo = int(start.timestamp()) // step * step
        points = list(range(lo, int(end.timestamp()), step))
        if not points:
            return []
        a, b = from_epoch(lo + step), from_epoch(points[-1] + step)
        # Both series in one request, told apart by a label.
        promql = " or ".join(
            f'label_replace(sum({increase(metric, [], step)}), "figure", "{figure}", "", "")'
            for figure, metric in (("cost", GPU_COST), ("inferences", INFERENCES))
        )
        found: dict[str, list[Series]] = {"cost": [], "inferences": []}
        for series in self.query_range(promql, a, b, step, settled):
            found.setdefault(series.labels.get("figure", ""), []).append(series)
        c = {t - step: v for s in found["cost"] for t, v in s.points}
        r = {t - step: v for s in found["inferences"] for t, v in s.points}
        out: list[tuple[datetime, Decimal | None]] = []
        for t in points:
            n = _count(r.get(t))
            out.append((from_epoch(t), _usd(c.get(t)) / n if n and t in c else None))
        return out


def _spend_bounds(now: datetime) -> tuple[datetime, datetime, datetime, datetime]:
    """(this hour's start, the end of the last settled whole hour, today's start, this month's
    start) for the Spend pane's figures at ``now`` (UTC)."""
    hour_start = now.replace(minute=0, second=0, microsecond=0)
    settled = (now - SETTLE).replace(minute=0, second=0, microsecond=0)
    day_start = hour_start.replace(hour=0)
    return hour_start, settled, day_start, day_start.replace(day=1)


def add_totals(parts: Iterable[Totals]) -> Totals:
    """The sum of some groups' totals (every usage row is in exactly one group)."""
    out = Totals()
    for t in parts:
        out = Totals(*(getattr(out, f) + getattr(t, f) for f in Totals.__slots__))
    return out


def _when(value: Decimal | None) -> datetime | None:
    return None if value is None else from_epoch(float(value))


def _age(now: datetime, then: datetime) -> str:
    seconds = max(0.0, (now - then).total_seconds())
    if seconds < 120:
        return f"{seconds:.0f}s old"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m old"
    return f"{seconds / 3600:.1f}h old"


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


NOT_AVAILABLE = (
    "billed_usd",
    "billed_days_covered",
    "by_provider",
    "not_billed_yet",
    "billed_days",
    "prices.refs",
    "prices.by_ref",
)
"""Report fields a Prometheus source cannot fill (each host's billing and price references stay
in its own database): ``None`` or empty, and listed in the report's ``not_available``."""


def prometheus_report(
    source: PromSource,
    start: datetime,
    now: datetime,
    gpu_rates: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The report of ``[start, now]`` over Prometheus, in the shape of
    :func:`tokentop.store.report.build_report` (the fields it can know; see
    :data:`NOT_AVAILABLE`)."""
    end = now + timedelta(seconds=1)
    began = time.perf_counter()
    # Everything but the usage queries goes out while the meter probe is answered.
    first = source.submit(
        {
            **source.first_gpu_queries(start, now),
            **source.source_queries(now),
            **source.total_sources_queries(start, now),
        }
    )
    meter = source.meter_providers(window_start(start), now)
    usage = {
        **source.group_queries("metered.", start, now, (), scope="metered", meter=meter),
        **source.group_queries("model.", start, now, ("provider", "model"), meter=meter),
    }
    answers = {**source.run(usage), **first.result()}
    source.complete_gpu(answers, start, now)
    metered = source.fold(answers, "metered.", ()).get((), Group(Totals(), True)).totals
    by_model = source.fold(answers, "model.", ("provider", "model"))
    total = add_totals(g.totals for g in by_model.values())
    gpu = source.fold_gpu(answers, start, now)
    newest_usage, newest_sample = source.fold_freshness(answers, now)
    sources = source.fold_sources(answers, now, time.perf_counter() - began)
    rows = sorted(
        by_model.items(), key=lambda kv: (-kv[1].totals.cost, -kv[1].totals.requests, kv[0][1])
    )
    head = {
        "tokentop": {
            "report_version": REPORT_VERSION,
            "generated_at": now.isoformat(),
            "label": "",
            "demo": bool(sources[1:]) and all(s.kind == "demo" for s in sources[1:]),
            "database": None,
            "prometheus": source.url,
        },
        "window": {"start": start.isoformat(), "end": end.isoformat()},
        "via": f"Prometheus {source.url}",
        "not_available": list(NOT_AVAILABLE),
    }
    return assemble_report(
        head,
        now=now,
        totals=total,
        metered=metered,
        billed=None,
        total_sources=source.fold_total_sources(answers),
        by_model=[
            CostRow(key=k[1], provider=k[0], totals=g.totals, previous=Totals(), priced=g.priced)
            for k, g in rows
        ],
        unpriced=source.unpriced(by_model),
        provider_days=(),
        gpu=gpu,
        gpu_rates=gpu_rates,
        sources=sources,
        newest_usage=newest_usage,
        freshness={
            "newest_sample": _iso(newest_sample),
            "sample_age_s": None
            if newest_sample is None
            else round((now - newest_sample).total_seconds(), 1),
        },
        prices={
            "source": "each host's own price book",
            "version": "n/a (via Prometheus)",
            "online_updates": False,
            "overrides": [],
            "refs": [],
            "by_ref": [],
            "flagged": [],
        },
    )
