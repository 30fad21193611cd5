"""Prometheus exposition of a tokentop database: what ``collect --metrics-port`` and
``proxy --metrics-port`` serve on ``/metrics``.

The metrics are read from the store at scrape time by one custom collector (no counters are
incremented in the write path), so they are the store's own exact sums:

- A usage total is the sum of ``usage_day``, the daily rollup that every write keeps in step in
  the same transaction as the buckets themselves (today's day included). A scrape therefore
  reads a few rows per series and day, never months of one-minute rows, and sees a re-poll that
  replaces buckets either wholly before or wholly after (SQLite snapshot isolation): a bucket
  that grows makes the counter grow, and a replaced bucket is never counted twice.
- **Restarts start from the stored totals**, not from zero: the first scrape after a restart
  shows the same totals as the last one before it, plus whatever was written meanwhile, which is
  exactly what Prometheus' ``increase()`` expects of a counter that never reset. A brand-new
  database starts at zero, which Prometheus reads as a reset.
- **A counter never goes down.** A provider may revise a bucket downwards, or a group may move
  between label values; Prometheus would read any drop as a reset and count the whole total
  again. So each series is held at its highest exported value until the store's total catches
  up (later growth absorbs the revision). Held values are written to the database's ``meta``
  table when they change, so a restart keeps holding them. What is not covered: a downward
  revision written and followed by a crash before the next scrape saw it.

Money is exported as float dollars (Prometheus' only sample type), converted from the exact
integer nano-dollars at the last step; totals below about $9M are exact to the nano-dollar.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server

from tokentop.collectors.base import Clock, utcnow
from tokentop.collectors.metrics_config import BASE_LABELS, MetricsConfig
from tokentop.pricing.gpu import GpuCostModel
from tokentop.store.db import Store
from tokentop.store.queries import METER_KIND, newest_usage, sources, usage_rows
from tokentop.store.records import NANO_PER_USD, TOKEN_KINDS, from_epoch, to_epoch

log = logging.getLogger(__name__)

METER_SOURCE = "meter"
"""The source name metered requests are recorded under by default (the proxy records its
requests as ``meter`` while its health row is named ``proxy``): metered, whatever its health."""
HELD_KEY = "metrics_held"
"""``meta`` key of the held counter values (JSON)."""
GAUGE_MAX_AGE_S = 300
"""A GPU reading older than this is not exported as a gauge (unknown, not its last value)."""

_USAGE_SUMS = (*TOKEN_KINDS, "requests", "cost_nano")
_Key = tuple[str, tuple[tuple[str, str], ...]]
"""(metric name, sorted (label, value) pairs): one exported counter series."""


@dataclass(slots=True)
class _Family:
    """One metric family being built: its series as integer values (exact), then exported."""

    name: str
    doc: str
    labels: tuple[str, ...]
    counter: bool = True
    scale: float = 1.0
    """Exported value = integer value / scale (nano-dollars to dollars, ms to seconds)."""
    values: dict[tuple[str, ...], int | float] = field(default_factory=dict)

    def add(self, labels: tuple[str, ...], value: int | float) -> None:
        self.values[labels] = self.values.get(labels, 0) + value


class StoreCollector:
    """A ``prometheus_client`` collector that reads a tokentop database at every scrape.

    Args:
        store: the database (its own connection: scrapes run on the HTTP server's threads).
        config: which usage dimensions are labels.
        gpu_costs: the configured GPU rates (the ``mode`` label of GPU cost).
        clock: injected time source (source health, gauge ages).
        persist: write held counter values to the database (a writer connection).
    """

    def __init__(
        self,
        store: Store,
        config: MetricsConfig | None = None,
        *,
        gpu_costs: GpuCostModel | None = None,
        clock: Clock = utcnow,
        persist: bool = True,
    ) -> None:
        self.store = store
        self.config = config or MetricsConfig()
        self.gpu_costs = gpu_costs or GpuCostModel()
        self.clock = clock
        self.persist = persist and not store.readonly
        self._lock = threading.Lock()
        self._last: dict[_Key, int | float] = {}
        """Every counter series' last exported value (integer units)."""
        self._held: dict[_Key, int | float] = {}
        """Series exported above the store's total (a downward revision), and their value."""
        self.last_collect_s: float | None = None
        """How long the previous scrape's queries took."""
        self.started = clock()
        """When this exporter started: usage before it is history (see new series)."""
        self._primed = False
        self._seen: set[tuple[str, tuple[str, ...]]] = set()
        self._first_seen: dict[tuple[str, tuple[str, ...]], datetime] = {}
        self._history_cache: dict[tuple[str, tuple[str, ...]], int | float] | None = None
        self._load_held()

    # Held values (a counter never goes down).

    def _load_held(self) -> None:
        raw = self.store.get_meta(HELD_KEY)
        if not raw:
            return
        try:
            entries = json.loads(raw)
            for name, labels, value in entries:
                key: _Key = (str(name), tuple((str(k), str(v)) for k, v in labels))
                self._held[key] = value
                self._last[key] = value
        except (ValueError, TypeError):
            log.warning("ignoring unreadable %s in %s", HELD_KEY, self.store.path)

    def _save_held(self) -> None:
        if not self.persist:
            return
        entries = [[name, [list(p) for p in labels], v] for (name, labels), v in self._held.items()]
        try:
            self.store.set_meta(HELD_KEY, json.dumps(sorted(entries)))
        except Exception as exc:  # a scrape must not fail for this
            log.warning("could not save held counter values: %s", exc)

    def _monotone(self, family: _Family) -> None:
        """Hold every series of a counter family at or above its last exported value."""
        before = {k: v for k, v in self._held.items() if k[0] == family.name}
        seen: set[tuple[str, ...]] = set()
        for labels, value in family.values.items():
            seen.add(labels)
            key: _Key = (family.name, tuple(zip(family.labels, labels, strict=True)))
            last = self._last.get(key)
            if last is not None and value < last:
                family.values[labels] = last
                self._held[key] = last
            else:
                self._last[key] = value
                self._held.pop(key, None)
        # A held series whose rows all went away keeps its value (it must not drop to absent
        # and come back lower); one of other label names (the config changed) is dropped.
        for key, value in list(self._held.items()):
            name, pairs = key
            if name != family.name:
                continue
            if tuple(k for k, _ in pairs) != family.labels:
                del self._held[key]
                continue
            labels = tuple(v for _, v in pairs)
            if labels not in seen:
                family.values[labels] = value
        if {k: v for k, v in self._held.items() if k[0] == family.name} != before:
            self._save_held()

    # The scrape.

    def collect(self) -> Iterator[Metric]:
        """Read the database and yield every metric family (called on each scrape)."""
        with self._lock:
            began = time.perf_counter()
            now = self.clock()
            families = [
                *self._usage(now),
                self._billed(),
                *self._gpu(),
                *self._inference(),
                *self._health(now),
                *self._gpu_gauges(now),
                *self._alerts(),
            ]
            for family in families:
                if family.counter:
                    self._monotone(family)
            self._primed = True
            elapsed = time.perf_counter() - began
            self.last_collect_s = elapsed
        for family in families:
            yield _export(family)
        took = GaugeMetricFamily(
            "tokentop_exporter_collect_seconds",
            "Seconds this scrape spent reading the tokentop database.",
        )
        took.add_metric([], elapsed)
        yield took

    def describe(self) -> Iterable[Metric]:
        """Nothing to describe up front (the families are read at scrape time)."""
        return []

    def _usage_families(self, rows: Iterable[Any]) -> list[_Family]:
        """The three usage families from rows of (labels..., metered, priced, sums...)."""
        labels = self.config.usage_labels
        cost = _Family(
            "tokentop_cost_usd_total",
            "Estimated cost (tokens x date-effective prices) of priced usage, in USD. Billed cost"
            " is tokentop_billed_cost_usd_total; unpriced usage has tokens and requests only.",
            (*labels, "metered", "kind"),
            scale=NANO_PER_USD,
        )
        tokens = _Family(
            "tokentop_tokens_total",
            "Tokens by kind: input_uncached, cache_read, cache_write_5m, cache_write_1h, output.",
            (*labels, "metered", "priced", "kind"),
        )
        requests = _Family(
            "tokentop_requests_total",
            "Requests (provider-reported model requests, or metered requests).",
            (*labels, "metered", "priced"),
        )
        n = len(labels)
        for r in rows:
            values = tuple(str(r[i]) for i in range(n))
            metered = "true" if r[n] else "false"
            priced = "true" if r[n + 1] else "false"
            sums_row = [r[n + 2 + i] or 0 for i in range(len(_USAGE_SUMS))]
            for kind, value in zip(TOKEN_KINDS, sums_row, strict=False):
                tokens.add((*values, metered, priced, kind), value)
            requests.add((*values, metered, priced), sums_row[len(TOKEN_KINDS)])
            if r[n + 1]:
                cost.add((*values, metered, "estimated"), sums_row[-1])
        return [cost, tokens, requests]

    def _usage_query(self, sub: str) -> str:
        labels = self.config.usage_labels
        cols = ", ".join(labels)
        sums = ", ".join(f"SUM({c})" for c in _USAGE_SUMS)
        return (
            f"SELECT {cols}, (source IN (SELECT name FROM source WHERE kind = ?)"
            f" OR source = '{METER_SOURCE}') AS metered,"
            f" priced, {sums} FROM ({sub}) GROUP BY {cols}, metered, priced"
        )

    def _usage(self, now: datetime) -> list[_Family]:
        labels = self.config.usage_labels
        inner = ", ".join(f"SUM({c}) AS {c}" for c in _USAGE_SUMS)
        # The daily rollup holds every bucket (today's day too); summed per series first, so the
        # join and the label grouping read one row per series.
        # ``source`` is always a label (BASE_LABELS): the meter test below reads it.
        sub = (
            f"SELECT {', '.join(f's.{c} AS {c}' for c in labels)},"
            f" d.priced AS priced, {', '.join(f'd.{c} AS {c}' for c in _USAGE_SUMS)}"
            f" FROM (SELECT series_id, priced, {inner} FROM usage_day GROUP BY series_id, priced)"
            f" AS d JOIN series AS s ON s.id = d.series_id"
        )
        families = self._usage_families(self.store.query(self._usage_query(sub), (METER_KIND,)))
        self._hold_new_series(families, now)
        return families

    def _hold_new_series(self, families: list[_Family], now: datetime) -> None:
        """A usage series that appears after the first scrape shows only its history (rows
        older than this exporter) for :attr:`MetricsConfig.new_series_hold_s`, then its total.

        Prometheus' ``increase()`` never counts a series' first sample, so a new model's (or a
        new metered tag's) first minutes would be lost; holding it at its history for longer
        than a scrape interval makes its recent spend an increase Prometheus sees.
        """
        if not self._primed:
            for family in families:
                self._seen.update((family.name, k) for k in family.values)
            return
        hold = timedelta(seconds=self.config.new_series_hold_s)
        for family in families:
            for labels, value in family.values.items():
                key = (family.name, labels)
                if key in self._seen:
                    continue
                first = self._first_seen.setdefault(key, now)
                if now - first >= hold:
                    self._seen.add(key)
                    self._first_seen.pop(key, None)
                    continue
                history = self._history(key)
                family.values[labels] = min(value, history.get(key, 0))

    def _history(
        self, key: tuple[str, tuple[str, ...]]
    ) -> dict[tuple[str, tuple[str, ...]], int | float]:
        """Every usage series' total of buckets that started before the minute this exporter
        started in (that minute's bucket may already hold new traffic: it counts as new).
        Read again when a new series is missing from it (a backfill written since)."""
        if self._history_cache is None or key not in self._history_cache:
            minute = self.started.replace(second=0, microsecond=0)
            sub, params = usage_rows(from_epoch(0), minute, scope="all")
            rows = self.store.query(self._usage_query(sub), [METER_KIND, *params])
            self._history_cache = {
                (family.name, labels): value
                for family in self._usage_families(rows)
                for labels, value in family.values.items()
            }
            # No history at all: remembered as 0, not read again every scrape of the hold.
            self._history_cache.setdefault(key, 0)
        return self._history_cache

    def _billed(self) -> _Family:
        family = _Family(
            "tokentop_billed_cost_usd_total",
            "Cost billed by the provider's cost endpoint (whole UTC days), in USD.",
            ("source", "provider", "project"),
            scale=NANO_PER_USD,
        )
        for r in self.store.query(
            "SELECT source, provider, project, SUM(amount_nano) FROM billed"
            " GROUP BY source, provider, project"
        ):
            family.add((r[0], r[1], r[2]), r[3] or 0)
        return family

    def _gpu(self) -> list[_Family]:
        labels = ("source", "gpu", "name", "mode")
        cost = _Family(
            "tokentop_gpu_cost_usd_total",
            "GPU cost under the [[gpu]] rates (rented: hours x $/h; owned: capex/h + energy), USD.",
            labels,
            scale=NANO_PER_USD,
        )
        idle = _Family(
            "tokentop_gpu_idle_cost_usd_total",
            "The part of tokentop_gpu_cost_usd_total spent while the GPU served nothing, USD.",
            labels,
            scale=NANO_PER_USD,
        )
        seconds = _Family(
            "tokentop_gpu_seconds_total",
            "Seconds of GPU time sampled (and costed).",
            labels,
            scale=1000,
        )
        for r in self.store.query(
            "SELECT source, device, name, SUM(interval_ms), SUM(cost_nano), SUM(idle_cost_nano)"
            " FROM gpu_hour GROUP BY source, device, name"
        ):
            mode = self.gpu_costs.rate_for(r[2])[0].mode
            key = (r[0], r[1], r[2], mode)
            seconds.add(key, r[3] or 0)
            cost.add(key, r[4] or 0)
            idle.add(key, r[5] or 0)
        return [cost, idle, seconds]

    def _inference(self) -> list[_Family]:
        labels = ("source", "endpoint", "server")
        inferences = _Family(
            "tokentop_inferences_total",
            "Inferences served by self-hosted inference endpoints.",
            labels,
        )
        tokens = _Family(
            "tokentop_inference_tokens_total",
            "Tokens processed by self-hosted inference endpoints (kind: prompt or generation).",
            (*labels, "kind"),
        )
        for r in self.store.query(
            "SELECT source, endpoint, kind, SUM(requests), SUM(prompt_tokens),"
            " SUM(generation_tokens) FROM inference_hour GROUP BY source, endpoint, kind"
        ):
            key = (r[0], r[1], r[2])
            inferences.add(key, r[3] or 0)
            tokens.add((*key, "prompt"), r[4] or 0)
            tokens.add((*key, "generation"), r[5] or 0)
        return [inferences, tokens]

    def _health(self, now: datetime) -> list[_Family]:
        labels = ("source", "kind")
        up = _Family(
            "tokentop_source_up",
            "1 while the source polls successfully (or its meter beats), else 0.",
            labels,
            counter=False,
        )
        last = _Family(
            "tokentop_source_last_success_timestamp_seconds",
            "Unix time of the source's last successful poll (or heartbeat).",
            labels,
            counter=False,
        )
        interval = _Family(
            "tokentop_source_interval_seconds",
            "Seconds between the source's polls (or heartbeats).",
            labels,
            counter=False,
        )
        for h in sources(self.store, now):
            key = (h.name, h.kind)
            up.add(key, 0 if h.failing(now) else 1)
            if h.last_success is not None:
                last.add(key, h.last_success.timestamp())
            if h.interval_s is not None:
                interval.add(key, h.interval_s)
        newest = _Family(
            "tokentop_usage_newest_timestamp_seconds",
            "End of the newest usage bucket in the database (an open bucket: now).",
            (),
            counter=False,
        )
        when = newest_usage(self.store, now)
        if when is not None:
            newest.add((), when.timestamp())
        return [up, last, interval, newest]

    def _gpu_gauges(self, now: datetime) -> list[_Family]:
        labels = ("source", "gpu", "name")
        fams = {
            "util_pct": _Family(
                "tokentop_gpu_utilization_ratio", "GPU utilisation, 0 to 1.", labels, False, 100
            ),
            "power_mw": _Family(
                "tokentop_gpu_power_watts", "GPU board power, W.", labels, False, 1000
            ),
            "mem_used_bytes": _Family(
                "tokentop_gpu_memory_used_bytes", "GPU memory in use, bytes.", labels, False
            ),
            "mem_total_bytes": _Family(
                "tokentop_gpu_memory_total_bytes", "GPU memory, bytes.", labels, False
            ),
        }
        since = (to_epoch(now) - GAUGE_MAX_AGE_S) * 1000
        rows = self.store.query(
            "SELECT g.source, g.device, g.name, g.util_pct, g.power_mw, g.mem_used_bytes,"
            " g.mem_total_bytes FROM gpu AS g JOIN (SELECT source, device, MAX(ts) AS ts FROM gpu"
            " WHERE ts >= ? GROUP BY source, device) AS m"
            " ON g.source = m.source AND g.device = m.device AND g.ts = m.ts",
            (since,),
        )
        for r in rows:
            for i, column in enumerate(fams, start=3):
                if r[i] is not None:
                    fams[column].add((r[0], r[1], r[2]), r[i])
        return list(fams.values())

    def _alerts(self) -> list[_Family]:
        family = _Family(
            "tokentop_alerts_firing",
            "Alerts firing now in this tokentop's own rules, by severity.",
            ("severity",),
            counter=False,
        )
        exists = self.store.query(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alert_state'"
        )
        if not exists:
            return []
        for severity in ("critical", "warning"):
            family.add((severity,), 0)
        for r in self.store.query(
            "SELECT severity, COUNT(*) FROM alert_state WHERE state = 'firing' GROUP BY severity"
        ):
            family.add((str(r[0]),), r[1])
        return [family]


def _export(family: _Family) -> Metric:
    metric: CounterMetricFamily | GaugeMetricFamily
    if family.counter:
        metric = CounterMetricFamily(family.name, family.doc, labels=family.labels)
    else:
        metric = GaugeMetricFamily(family.name, family.doc, labels=family.labels)
    for labels, value in sorted(family.values.items()):
        metric.add_metric(list(labels), value / family.scale if family.scale != 1 else value)
    return metric


def usage_label_names(config: MetricsConfig) -> tuple[str, ...]:
    """The labels of ``tokentop_requests_total`` (documentation and tests)."""
    return (*BASE_LABELS, *config.labels, "metered", "priced")


class MetricsServer:
    """``/metrics`` over HTTP on its own threads, for the life of a ``collect`` or ``proxy``.

    Args:
        db_path: the database to expose (opened with its own connection).
        config: labels, host and port (``port`` 0 picks a free one).
        gpu_costs: the configured GPU rates.
        clock: injected time source.
    """

    def __init__(
        self,
        db_path: Path,
        config: MetricsConfig,
        *,
        port: int,
        host: str = "127.0.0.1",
        gpu_costs: GpuCostModel | None = None,
        clock: Clock = utcnow,
        store_factory: Callable[[Path], Store] = Store,
    ) -> None:
        self.store = store_factory(db_path)
        self.collector = StoreCollector(self.store, config, gpu_costs=gpu_costs, clock=clock)
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        # The exporter's own CPU and memory (process_cpu_seconds_total): what a scrape costs.
        self.registry.register(ProcessCollector(registry=None))
        try:
            self._server, self._thread = start_http_server(port, host, self.registry)
        except BaseException:
            self.store.close()
            raise
        self.host = host
        self.port = int(self._server.server_port)

    @property
    def url(self) -> str:
        """Where ``/metrics`` is served."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and close the database connection."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self.store.close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def render_text(collector: StoreCollector) -> str:
    """The Prometheus text exposition of one collector (tests and ``--once`` checks)."""
    from prometheus_client.exposition import generate_latest

    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode("utf-8")


def parse_text(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of a text exposition by (name, sorted labels) (tests and the bench)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out
