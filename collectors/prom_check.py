"""``tokentop check`` and ``tokentop status`` over a fleet: the alert rules' figures and the
status line's, read from a Prometheus server (``--prometheus URL`` or ``[prometheus] url``).

Every rule kind is evaluated from tokentop's own metrics, each figure one PromQL query as the
panes' are (:mod:`.promsource`):

- ``budget``, ``runway``, ``spike``, ``cost_per_request``, ``unpriced``: ``increase()`` of the
  usage counters over the rule's windows, each dollar once. A rule's scope is a substring match
  on the label (``provider=~".*openai.*"``), as the database's is on the column.
- ``source_down``: the fleet's sources (``name@instance``) as the Sources pane shows them.
- ``new_model``: values of the dimension with usage in the window whose series did not exist at
  its start (a host exports every series it has ever had, from its stored totals, so a series
  absent then had no usage before), first seen at their series' first sample.
- ``gpu_idle``: the GPU overview's idle cost (tokentop's GPU metrics, or DCGM's).

What cannot be known raises :class:`~tokentop.collectors.alerts.NotAvailable` and the rule is
UNKNOWN with the reason: a scope or grouping by a label the hosts do not export (``project``,
``api_key`` and ``tag`` are chosen by ``[metrics] labels``). The hosts' stored alert states are
not in Prometheus: ``check --json`` lists none. A failed query is a
:class:`~tokentop.collectors.promql.PromError`: the caller reports UNKNOWN, never $0.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from decimal import Decimal

from tokentop.collectors.alerts import Figures, NotAvailable
from tokentop.collectors.metrics_config import BASE_LABELS
from tokentop.collectors.promql import quote, regex_literal
from tokentop.collectors.promsource import (
    REQUESTS,
    TOKENS,
    USAGE_METRICS,
    Group,
    PromSource,
    counted,
    increase,
    selector,
    window_seconds,
    window_start,
)
from tokentop.store.alert_queries import Spend
from tokentop.store.queries import GpuOverview, Totals
from tokentop.store.records import SourceHealth, from_epoch
from tokentop.store.status import StatusFigures

LAST_POLL = "tokentop_source_last_success_timestamp_seconds"
HISTORY_LOOKBACK = "1h"
"""How far before a moment a series' last sample may be for it to count as existing then (a
host's exporter may have missed a few scrapes)."""


def scope_matchers(scope: Mapping[str, str]) -> list[str]:
    """A rule's scope as label matchers: each label contains its text (case-sensitive)."""
    return [
        f"{label}=~{quote('(?s).*' + regex_literal(text) + '.*')}"
        for label, text in scope.items()
        if text
    ]


def _count(value: Decimal | None) -> int:
    return 0 if value is None else int(value.to_integral_value())


def _spend(totals: Totals) -> Spend:
    return Spend(
        cost=totals.cost,
        requests=totals.requests,
        priced_requests=totals.requests - totals.unpriced_requests,
        unpriced_tokens=totals.unpriced_tokens,
    )


class PromFigures(Figures):
    """The rules' figures from a fleet's Prometheus (see the module)."""

    def __init__(self, source: PromSource, now: datetime) -> None:
        super().__init__(now)
        self.source = source
        self._labels: frozenset[str] | None = None
        self._gpu: dict[datetime, GpuOverview] = {}

    def _at(self, end: datetime) -> datetime:
        """Where to evaluate a window ending at ``end``: now for the current one; else the
        minute its last bucket ends in, as the store counts buckets by their start."""
        return self.now if end >= self.now else window_start(end)

    def _require(self, labels: Mapping[str, str] | tuple[str, ...]) -> None:
        """Raise :class:`NotAvailable` unless the hosts export every one of ``labels``."""
        wanted = [x for x in labels if x not in BASE_LABELS]
        if not wanted:
            return
        if self._labels is None:
            found = self.source.client.label_names(
                USAGE_METRICS, self.now - timedelta(days=1), self.now
            )
            self._labels = frozenset(found)
        missing = [x for x in wanted if x not in self._labels]
        if missing:
            raise NotAvailable(
                f"the fleet's usage metrics carry no {', '.join(missing)} label"
                " (the hosts' [metrics] labels); not available via Prometheus"
            )

    def read_spend(self, start: datetime, end: datetime, scope: Mapping[str, str]) -> Spend:
        self._require(tuple(scope))
        queries = self.source.group_queries(
            "spend.", start, self._at(end), (), tokens="unpriced", matchers=scope_matchers(scope)
        )
        found = self.source.fold(self.source.run(queries), "spend.", ())
        return _spend(found.get((), Group(Totals(), True)).totals)

    def spend_by(
        self, start: datetime, end: datetime, group: str, scope: Mapping[str, str]
    ) -> dict[str, Spend]:
        self._require((*scope, group))
        queries = self.source.group_queries(
            "by.",
            start,
            self._at(end),
            (group,),
            tokens="unpriced",
            matchers=scope_matchers(scope),
        )
        found = self.source.fold(self.source.run(queries), "by.", (group,))
        return {k[0]: _spend(g.totals) for k, g in found.items()}

    def has_usage_before(self, when: datetime, *, inclusive: bool = False) -> bool:
        # A host exports each usage series from its stored totals: one with a positive value
        # at ``when`` had usage before it.
        promql = f"count(last_over_time({REQUESTS}[{HISTORY_LOOKBACK}]) > 0)"
        found = self.source.client.query(promql, when)
        return bool(found) and (found[0].value or 0) > 0

    def source_health(self) -> list[SourceHealth]:
        return self.source.sources(self.now)[1:]  # the first is the Prometheus server

    def unpriced_tokens(
        self, start: datetime, end: datetime, scope: Mapping[str, str]
    ) -> dict[tuple[str, str], int]:
        self._require(tuple(scope))
        at = self._at(end)
        matchers = ['priced="false"', *scope_matchers(scope)]
        promql = counted(TOKENS, matchers, window_seconds(start, at), ("provider", "model"))
        out: dict[tuple[str, str], int] = {}
        for s in self.source.client.query(promql, at):
            key = (s.labels.get("provider", ""), s.labels.get("model", ""))
            out[key] = out.get(key, 0) + _count(s.value)
        return {k: v for k, v in out.items() if v}

    def first_seen(
        self, dimension: str, since: datetime, scope: Mapping[str, str]
    ) -> dict[str, datetime]:
        self._require((*scope, dimension))
        matchers = scope_matchers(scope)
        seconds = window_seconds(since, self.now)
        grown = f"sum by ({dimension}) ({increase(REQUESTS, matchers, seconds)}) > 0"
        existed = (
            f"group by ({dimension}) (last_over_time("
            f"{selector(REQUESTS, matchers)}[{HISTORY_LOOKBACK}]) > 0)"
        )
        answers = self.source.run(
            {"new.grown": (grown, self.now), "new.existed": (existed, window_start(since))}
        )
        before = {s.labels.get(dimension, "") for s in answers["new.existed"]}
        new = sorted({s.labels.get(dimension, "") for s in answers["new.grown"]} - before)
        if not new:
            return {}
        alternatives = "|".join(regex_literal(v) for v in new)
        series = selector(REQUESTS, [*matchers, f"{dimension}=~{quote(alternatives)}"])
        rng = f"{max(1, round(seconds))}s"
        first = f"min by ({dimension}) (min_over_time(timestamp({series})[{rng}:60s]))"
        out: dict[str, datetime] = {}
        for s in self.source.client.query(first, self.now):
            value = s.labels.get(dimension, "")
            when = since if s.value is None else max(since, from_epoch(float(s.value)))
            if value in new:
                out[value] = when
        for value in new:
            out.setdefault(value, since)
        return out

    def _gpu_overview(self, start: datetime) -> GpuOverview:
        if start not in self._gpu:
            self._gpu[start] = self.source.gpu_overview(start, self.now)
        return self._gpu[start]

    def has_gpu_data(self, since: datetime) -> bool:
        return bool(self._gpu_overview(since).devices)

    def gpu_idle_cost(self, start: datetime, end: datetime) -> Decimal:
        return self._gpu_overview(start).idle_cost

    def latest_poll(self) -> datetime | None:
        """The newest successful poll of any source in the fleet (within the last hour)."""
        promql = f"max(last_over_time({LAST_POLL}[1h]))"
        found = self.source.client.query(promql, self.now)
        if not found or found[0].value is None:
            return None
        return min(from_epoch(float(found[0].value)), self.now)


def fleet_status(source: PromSource, now: datetime) -> StatusFigures:
    """What ``tokentop status`` shows, for the fleet: spend and burn as the Spend pane reads
    them, the newest successful poll, and the alerts firing (Prometheus' own ``Tokentop*``
    alerting rules, and each host's rules as ``tokentop@instance``)."""
    meter = source.meter_providers(source.month_start(now), now)
    queries = {
        **source.spend_queries(now, meter=meter),
        "status.poll": (f"max(last_over_time({LAST_POLL}[1h]))", now),
        "status.rules": (
            'count by (alertname, severity) (ALERTS{alertstate="firing", alertname=~"Tokentop.*"})',
            now,
        ),
        "status.hosts": ("sum by (instance, severity) (tokentop_alerts_firing) > 0", now),
    }
    answers = source.run(queries)
    spend = source.fold_spend(answers, now)
    poll = answers["status.poll"]
    latest = None
    if poll and poll[0].value is not None:
        latest = min(from_epoch(float(poll[0].value)), now)
    firing: list[tuple[str, str]] = []
    for s in answers["status.rules"]:
        name, severity = s.labels.get("alertname", ""), s.labels.get("severity", "")
        firing += [(name, severity)] * max(1, _count(s.value))
    for s in answers["status.hosts"]:
        name, severity = f"tokentop@{s.labels.get('instance', '')}", s.labels.get("severity", "")
        firing += [(name, severity)] * _count(s.value)
    firing.sort(key=lambda f: (f[1] != "critical", f[0]))
    return StatusFigures(
        now=now,
        today=spend.today,
        month=spend.month,
        burn_15m=spend.burn_per_hour[15],
        burn_60m=spend.burn_per_hour[60],
        latest_poll=latest,
        firing=tuple(firing),
        unpriced_tokens_today=spend.unpriced_tokens_today,
    )
