"""Alert rules, evaluated headless by the collector, de-duplicated by a stored state machine and
sent to Prometheus Alertmanager (API v2) and to a plain webhook.

Three parts, each usable alone:

- :func:`evaluate` reads the store and says, for every rule, which instances hold now and how
  bad they are (``tokentop check`` stops here: it never writes).
- :func:`advance` is the state machine: inactive -> pending (for the rule's ``for``) -> firing ->
  resolved, as a pure function of the stored rows and one evaluation. It returns the rows to
  write, the history to open and close, and one webhook message per transition.
- :class:`AlertEngine` runs both every ``evaluate_every_s`` beside the runner's polls (its own
  task; the SQL in a worker thread), writes the changes in one transaction, then delivers:
  firing alerts to Alertmanager again before their ``endsAt`` lapses (as Prometheus does), the
  resolution with its ``endsAt``, and the webhook outbox.

Severity is part of an alert's state, not of its identity here: a budget rule that passes 80 %
then 100 % is one alert that rose from warning to critical (one message each way it matters),
and Alertmanager is told the warning label set resolved when the critical one starts.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tokentop.collectors.alert_config import USAGE_SCOPES, AlertRule, AlertsConfig
from tokentop.collectors.base import Clock, SourceError, utcnow
from tokentop.store import alert_queries as aq
from tokentop.store import alerts as alert_store
from tokentop.store.alerts import AlertState, Changes
from tokentop.store.db import Store
from tokentop.store.queries import sources as source_health
from tokentop.store.records import SourceHealth
from tokentop.store.text import clean

if TYPE_CHECKING:  # `tokentop check` evaluates rules without the HTTP client or an event loop
    import httpx

log = logging.getLogger("tokentop.alerts")

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
"""Monitoring-plugin status codes."""
STATUS_NAMES = ("OK", "WARNING", "CRITICAL", "UNKNOWN")
_RANK = {"warning": WARNING, "critical": CRITICAL}
_SECOND = timedelta(seconds=1)
_WEEK = timedelta(days=7)
SOURCES_KEY = "alert_sources"
REPLY_LIMIT = 1_000_000
"""Most bytes read of an Alertmanager or webhook reply: a status reply is small, and an
endless one must not take the engine's memory."""
"""``meta`` key where the collector's alert engine lists the sources it runs (JSON)."""
DOWN_STATES = frozenset({"error", "auth failed", "unavailable"})
"""Source states that are *down* at once (stale sources are down after ``stale_after``)."""


def severity_code(severity: str | None) -> int:
    """``warning`` -> 1, ``critical`` -> 2, none -> 0."""
    return _RANK.get(severity or "", OK)


# Figures as people read them.


def usd(value: Decimal | float | None) -> str:
    """``$212.40``; below a dollar, four significant digits (``$0.004200``)."""
    if value is None:
        return "n/a"
    d = value if isinstance(value, Decimal) else Decimal(str(value))
    if abs(d) >= Decimal("0.1") or d == 0:
        return f"${d:,.2f}"
    if abs(d) < Decimal("0.0001"):
        return f"${float(d):.2e}"
    # Four significant digits, at least cents: $0.015, $0.0042, $0.05.
    whole, _, frac = f"{float(d):.4g}".partition(".")
    return f"${whole}.{frac.rstrip('0').ljust(2, '0')}"


def span(seconds: float) -> str:
    """``45s``, ``15m``, ``1h``, ``1h30m``, ``2d``."""
    s = round(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200 and s % 3600:
        return f"{s // 60}m" if s < 3600 else f"{s // 3600}h{(s % 3600) // 60}m"
    if s < 172800:
        return f"{s // 3600}h" if s % 3600 == 0 else f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d".replace(".0d", "d")


def _pct(value: Decimal) -> str:
    return f"{value:.0f}%"


def _fmt(value: Decimal | float, places: int = 2) -> str:
    return f"{float(value):.{places}f}"


@dataclass(frozen=True, slots=True)
class Perf:
    """One perfdata item: ``label=value[;warn;crit]``."""

    label: str
    value: str
    warn: str = ""
    crit: str = ""

    def render(self) -> str:
        """As monitoring plugins print it (labels with odd characters quoted)."""
        label = self.label if self.label.replace("_", "").isalnum() else f"'{self.label}'"
        tail = f";{self.warn};{self.crit}" if self.warn or self.crit else ""
        return f"{label}={self.value}{tail}"


@dataclass(frozen=True, slots=True)
class Finding:
    """One instance of a rule whose condition holds now."""

    key: str
    """``""`` for the rule as a whole, else what the instance is about (``source=openai``)."""
    severity: str
    value: float | None
    summary: str
    """One line with the figures, already cleaned for terminals and webhooks."""
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    """Instance labels (``source``, ``model``, ...), merged over the rule's scope labels."""


@dataclass(frozen=True, slots=True)
class RuleResult:
    """A rule evaluated once."""

    rule: AlertRule
    findings: tuple[Finding, ...] = ()
    summary: str = ""
    """The rule's figure when nothing holds (``$0.52 of $1.00 today (52%)``)."""
    value: float | None = None
    perf: tuple[Perf, ...] = ()
    error: str = ""
    """Why it could not be evaluated (then its stored state is left as it is)."""

    @property
    def code(self) -> int:
        """0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (an error)."""
        if self.error:
            return UNKNOWN
        return max((severity_code(f.severity) for f in self.findings), default=OK)

    @property
    def line(self) -> str:
        """``name: summary`` of its worst finding (or its figure when OK)."""
        if self.error:
            return f"{self.rule.name}: {self.error}"
        if not self.findings:
            return f"{self.rule.name}: {self.summary}" if self.summary else self.rule.name
        worst = max(self.findings, key=lambda f: severity_code(f.severity))
        more = f" (+{len(self.findings) - 1} more)" if len(self.findings) > 1 else ""
        return f"{self.rule.name}: {worst.summary}{more}"


class NotAvailable(Exception):
    """A figure the rules' source cannot give (the rule is UNKNOWN, with this reason)."""


class Figures(ABC):
    """What the rules read, memoised for one evaluation (rules share today's spend and the
    burn). :class:`StoreFigures` reads the database; ``tokentop check --prometheus`` reads a
    fleet through :class:`tokentop.collectors.prom_check.PromFigures`. A figure a source cannot
    give raises :class:`NotAvailable`."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.end = now + _SECOND
        self._spend: dict[tuple[Any, ...], aq.Spend] = {}

    def spend(self, start: datetime, end: datetime, scope: Mapping[str, str]) -> aq.Spend:
        """Cost and requests of ``[start, end)`` within ``scope``."""
        key = (start, end, tuple(sorted(scope.items())))
        found = self._spend.get(key)
        if found is None:
            found = self._spend[key] = self.read_spend(start, end, scope)
        return found

    def burn(self, window_s: float, scope: Mapping[str, str]) -> Decimal:
        """$/h over the last ``window_s`` seconds."""
        cost = self.spend(self.now - timedelta(seconds=window_s), self.end, scope).cost
        return cost * 3600 / Decimal(window_s)

    @abstractmethod
    def read_spend(self, start: datetime, end: datetime, scope: Mapping[str, str]) -> aq.Spend:
        """As :func:`tokentop.store.alert_queries.spend`."""

    @abstractmethod
    def has_usage_before(self, when: datetime, *, inclusive: bool = False) -> bool:
        """Whether usage was recorded before ``when`` (at or before, ``inclusive``)."""

    @abstractmethod
    def source_health(self) -> list[SourceHealth]:
        """Every source's health."""

    @abstractmethod
    def unpriced_tokens(
        self, start: datetime, end: datetime, scope: Mapping[str, str]
    ) -> dict[tuple[str, str], int]:
        """As :func:`tokentop.store.alert_queries.unpriced_tokens`."""

    @abstractmethod
    def first_seen(
        self, dimension: str, since: datetime, scope: Mapping[str, str]
    ) -> dict[str, datetime]:
        """As :func:`tokentop.store.alert_queries.first_seen`."""

    @abstractmethod
    def spend_by(
        self, start: datetime, end: datetime, group: str, scope: Mapping[str, str]
    ) -> dict[str, aq.Spend]:
        """As :func:`tokentop.store.alert_queries.spend_by`."""

    @abstractmethod
    def has_gpu_data(self, since: datetime) -> bool:
        """Whether any GPU sample is newer than ``since``."""

    @abstractmethod
    def gpu_idle_cost(self, start: datetime, end: datetime) -> Decimal:
        """Cost of idle GPU time in ``[start, end)``."""


class StoreFigures(Figures):
    """The rules' figures from the database."""

    def __init__(self, store: Store, now: datetime) -> None:
        super().__init__(now)
        self.store = store
        self._oldest: tuple[datetime | None] | None = None

    def read_spend(self, start: datetime, end: datetime, scope: Mapping[str, str]) -> aq.Spend:
        return aq.spend(self.store, start, end, scope)

    def oldest(self) -> datetime | None:
        """Start of the oldest usage bucket."""
        if self._oldest is None:
            self._oldest = (aq.oldest_usage(self.store),)
        return self._oldest[0]

    def has_usage_before(self, when: datetime, *, inclusive: bool = False) -> bool:
        oldest = self.oldest()
        return oldest is not None and (oldest <= when if inclusive else oldest < when)

    def source_health(self) -> list[SourceHealth]:
        return source_health(self.store, self.now)

    def unpriced_tokens(
        self, start: datetime, end: datetime, scope: Mapping[str, str]
    ) -> dict[tuple[str, str], int]:
        return aq.unpriced_tokens(self.store, start, end, scope)

    def first_seen(
        self, dimension: str, since: datetime, scope: Mapping[str, str]
    ) -> dict[str, datetime]:
        return aq.first_seen(self.store, dimension, since, scope)

    def spend_by(
        self, start: datetime, end: datetime, group: str, scope: Mapping[str, str]
    ) -> dict[str, aq.Spend]:
        return aq.spend_by(self.store, start, end, group, scope)

    def has_gpu_data(self, since: datetime) -> bool:
        return aq.has_gpu_data(self.store, since)

    def gpu_idle_cost(self, start: datetime, end: datetime) -> Decimal:
        return aq.gpu_idle_cost(self.store, start, end)


def usage_scope(rule: AlertRule) -> dict[str, str]:
    """The rule's usage filters that are set."""
    return {k: v for k in USAGE_SCOPES if (v := getattr(rule.scope, k))}


def _period_word(period: str) -> str:
    return "today" if period == "day" else "this month"


def _eval_budget(rule: AlertRule, fig: Figures) -> RuleResult:
    assert rule.budget_usd is not None
    scope = usage_scope(rule)
    start, end = aq.period_start(fig.now, rule.period)
    spent = fig.spend(start, fig.end, scope).cost
    burn = fig.burn(3600, scope)
    hours_left = Decimal((end - fig.now).total_seconds()) / 3600
    if rule.basis == "projected":
        if rule.period == "day":
            value = spent + burn * hours_left
        else:
            elapsed = Decimal((fig.now - start).total_seconds()) / 3600
            value = spent + (spent / elapsed if elapsed > 0 else burn) * hours_left
    else:
        value = spent
    budget = rule.budget_usd
    share = value / budget * 100
    severity = ""
    if share >= rule.crit_pct:
        severity = "critical"
    elif rule.warn_pct > 0 and share >= rule.warn_pct:
        severity = "warning"
    word = _period_word(rule.period)
    lead = f"projected {usd(value)}" if rule.basis == "projected" else usd(value)
    summary = f"{lead} of {usd(budget)} {word} ({_pct(share)}), burn {usd(burn)}/h"
    if rule.basis == "projected":
        summary += f", spent {usd(spent)}"
    base = ("today" if rule.period == "day" else "month") + "_usd"
    if rule.basis == "projected":
        base = "projected_" + base
    warn_usd = budget * rule.warn_pct / 100 if rule.warn_pct > 0 else None
    perf = (
        Perf(
            base if not scope else f"{rule.name}_usd",
            _fmt(value),
            _fmt(warn_usd) if warn_usd is not None else "",
            _fmt(budget * rule.crit_pct / 100),
        ),
        Perf("burn_usd_per_h" if not scope else f"{rule.name}_burn_usd_per_h", _fmt(burn)),
    )
    findings: tuple[Finding, ...] = ()
    if severity:
        description = (
            f"Spend {word} (UTC) within {_scope_text(scope)} is {usd(spent)} against a budget"
            f" of {usd(budget)}; burn over the last hour {usd(burn)}/h."
        )
        findings = (Finding("", severity, float(share), summary, description, {}),)
    return RuleResult(rule, findings, summary, float(share), perf)


def _scope_text(scope: Mapping[str, str]) -> str:
    if not scope:
        return "all usage"
    return ", ".join(f"{k} ~ {clean(v)!r}" for k, v in scope.items())


def _eval_spike(rule: AlertRule, fig: Figures) -> RuleResult:
    scope = usage_scope(rule)
    window = timedelta(seconds=rule.window_s)
    burn = fig.burn(rule.window_s, scope)
    hours = Decimal(rule.window_s) / 3600
    weekly = fig.has_usage_before(fig.now - rule.weeks * _WEEK - window, inclusive=True)
    if weekly:
        costs = [
            fig.spend(fig.now - k * _WEEK - window, fig.now - k * _WEEK, scope).cost
            for k in range(1, rule.weeks + 1)
        ]
        baseline = sum(costs, Decimal(0)) / len(costs) / hours
        basis = f"same time of week, last {rule.weeks} weeks"
    else:
        day = fig.spend(fig.now - timedelta(days=1) - window, fig.now - window, scope).cost
        baseline = day / 24
        basis = "trailing 24h"
    ratio = burn / baseline if baseline > 0 else None
    times = f"{ratio:.1f}x" if ratio is not None else "new spend against"
    summary = (
        f"burn {usd(burn)}/h over {span(rule.window_s)} is {times} the baseline"
        f" {usd(baseline)}/h ({basis})"
    )
    perf = (
        Perf(f"{rule.name}_usd_per_h", _fmt(burn), "", _fmt(baseline * rule.factor)),
        Perf(f"{rule.name}_baseline_usd_per_h", _fmt(baseline)),
    )
    holds = burn >= rule.min_usd_per_hour and burn > 0 and burn >= baseline * rule.factor
    findings: tuple[Finding, ...] = ()
    if holds:
        description = (
            f"Spend within {_scope_text(scope)} over the last {span(rule.window_s)} runs at"
            f" {usd(burn)}/h, {rule.factor}x or more the baseline of {usd(baseline)}/h"
            f" ({basis}); the floor is {usd(rule.min_usd_per_hour)}/h."
        )
        findings = (Finding("", rule.severity, float(burn), summary, description),)
    return RuleResult(rule, findings, summary, float(burn), perf)


def _eval_runway(rule: AlertRule, fig: Figures) -> RuleResult:
    assert rule.budget_usd is not None
    scope = usage_scope(rule)
    start, end = aq.period_start(fig.now, rule.period)
    spent = fig.spend(start, fig.end, scope).cost
    burn = fig.burn(rule.window_s, scope)
    left = rule.budget_usd - spent
    word = _period_word(rule.period)
    hours_left = (end - fig.now).total_seconds() / 3600
    runway: float | None
    if left <= 0:
        runway = 0.0
        summary = f"budget of {usd(rule.budget_usd)} {word} is spent ({usd(spent)})"
    elif burn > 0:
        runway = float(left / burn)
        summary = (
            f"budget of {usd(rule.budget_usd)} {word} runs out in {span(runway * 3600)} at"
            f" {usd(burn)}/h ({usd(left)} left)"
        )
    else:
        runway = None
        summary = f"{usd(left)} of {usd(rule.budget_usd)} left {word}, no spend in the last" + (
            f" {span(rule.window_s)}"
        )
    perf = (
        Perf(
            f"{rule.name}_hours",
            _fmt(runway, 1) if runway is not None else "U",
            "",
            _fmt(rule.hours, 1),
        ),
    )
    findings: tuple[Finding, ...] = ()
    if runway is not None and runway < rule.hours and runway < hours_left:
        description = (
            f"At the burn of the last {span(rule.window_s)} ({usd(burn)}/h), the budget of"
            f" {usd(rule.budget_usd)} {word} within {_scope_text(scope)} is spent before the"
            f" period ends; {usd(spent)} spent so far."
        )
        findings = (Finding("", rule.severity, runway, summary, description),)
    return RuleResult(rule, findings, summary, runway, perf)


def _eval_source_down(
    rule: AlertRule, fig: Figures, expected: Collection[str] | None, optional: Collection[str]
) -> RuleResult:
    found: list[Finding] = []
    checked = 0
    for h in fig.source_health():
        if expected is not None and h.name not in expected:
            continue
        if rule.scope.source and rule.scope.source not in h.name:
            continue
        # A fleet's sources are named name@instance.
        if (h.name in optional or h.name.partition("@")[0] in optional) and (
            h.state == "unavailable"
        ):
            continue
        checked += 1
        age = (fig.now - h.last_success).total_seconds() if h.last_success else None
        name = clean(h.name)
        if h.state in DOWN_STATES:
            since = h.last_success or h.last_error_at
            how = f" for {span((fig.now - since).total_seconds())}" if since else ""
            summary = f"source {name} {clean(h.state)}{how}: {clean(h.last_error)}".rstrip(": ")
        elif age is None or age > rule.stale_after_s:
            summary = (
                f"source {name}: no successful poll for {span(age)}"
                if age is not None
                else f"source {name}: never polled successfully"
            )
        else:
            continue
        description = (
            f"Source {name} ({clean(h.kind)}) is {clean(h.state)}; last success"
            f" {h.last_success.isoformat() if h.last_success else 'never'}."
            f" Figures that depend on it are stale, not zero."
        )
        found.append(
            Finding(
                f"source={h.name}",
                rule.severity,
                age,
                summary,
                description,
                {"source": clean(h.name)},
            )
        )
    summary = f"{checked} source(s) up" if not found else f"{len(found)} of {checked} down"
    perf = (Perf(f"{rule.name}_down", str(len(found)), "", "1"),)
    return RuleResult(rule, tuple(found), summary, float(len(found)), perf)


def _eval_unpriced(rule: AlertRule, fig: Figures) -> RuleResult:
    scope = usage_scope(rule)
    start = fig.now - timedelta(seconds=rule.window_s)
    tokens = fig.unpriced_tokens(start, fig.end, scope)
    found = []
    for (provider, model), n in sorted(tokens.items()):
        if n < max(1, rule.min_tokens):
            continue
        name = clean(f"{provider}/{model}" if provider else model)
        summary = f"{name}: {n:,} tokens in {span(rule.window_s)} have no price"
        description = (
            f"Model {name} has no price in genai-prices or the config's [[pricing.model]];"
            f" its tokens are counted as unpriced, so spend figures leave it out."
        )
        labels = {"provider": clean(provider), "model": clean(model)}
        found.append(
            Finding(
                f"model={provider}/{model}", rule.severity, float(n), summary, description, labels
            )
        )
    total = sum(tokens.values())
    summary = f"{total:,} unpriced tokens in {span(rule.window_s)}" if total else "all priced"
    return RuleResult(
        rule, tuple(found), summary, float(total), (Perf(f"{rule.name}_tokens", str(total)),)
    )


def _eval_new_model(rule: AlertRule, fig: Figures) -> RuleResult:
    scope = usage_scope(rule)
    since = fig.now - timedelta(seconds=rule.window_s)
    what = rule.dimension.replace("_", " ")
    if not fig.has_usage_before(since):
        # Everything is new in a database younger than the window: nothing to compare with.
        return RuleResult(rule, (), f"no history before the last {span(rule.window_s)}")
    found = []
    for value, first in sorted(fig.first_seen(rule.dimension, since, scope).items()):
        if not value:
            continue
        name = clean(value)
        ago = span((fig.now - first).total_seconds())
        summary = f"new {what} {name} started spending {ago} ago"
        description = (
            f"The {what} {name} has no usage in the database before"
            f" {first.strftime('%Y-%m-%d %H:%M')} UTC."
        )
        found.append(
            Finding(
                f"{rule.dimension}={value}",
                rule.severity,
                None,
                summary,
                description,
                {rule.dimension: name},
            )
        )
    summary = f"no new {what} in {span(rule.window_s)}" if not found else ""
    return RuleResult(
        rule, tuple(found), summary, float(len(found)), (Perf(f"{rule.name}_new", str(len(found))),)
    )


def _eval_cost_per_request(rule: AlertRule, fig: Figures) -> RuleResult:
    scope = usage_scope(rule)
    window = timedelta(seconds=rule.window_s)
    cur_start, prev_start = fig.now - window, fig.now - 2 * window
    if rule.by:
        current = fig.spend_by(cur_start, fig.end, rule.by, scope)
        previous = fig.spend_by(prev_start, cur_start, rule.by, scope)
    else:
        current = {"": fig.spend(cur_start, fig.end, scope)}
        previous = {"": fig.spend(prev_start, cur_start, scope)}
    found = []
    worst: Decimal | None = None
    first_summary = ""
    for group, now_spend in sorted(current.items()):
        before = previous.get(group)
        if before is None:
            continue
        enough = min(now_spend.priced_requests, before.priced_requests) >= max(1, rule.min_requests)
        a, b = now_spend.cost_per_request, before.cost_per_request
        if not enough or a is None or b is None or b <= 0:
            continue
        rise = (a / b - 1) * 100
        worst = rise if worst is None else max(worst, rise)
        who = f"{clean(group)}: " if rule.by else ""
        summary = (
            f"{who}$/request {usd(a)}, {'up' if rise >= 0 else 'down'} {abs(rise):.0f}% on the"
            f" previous {span(rule.window_s)} ({usd(b)}), {now_spend.priced_requests:,} requests"
        )
        first_summary = first_summary or summary
        if rise >= rule.pct:
            description = (
                f"Cost per request within {_scope_text(scope)} rose from {usd(b)} to {usd(a)}"
                f" between the previous {span(rule.window_s)} and the last."
            )
            labels = {rule.by: clean(group)} if rule.by else {}
            key = f"{rule.by}={group}" if rule.by else ""
            found.append(Finding(key, rule.severity, float(rise), summary, description, labels))
    summary = first_summary or f"fewer than {rule.min_requests} requests to compare"
    perf = (
        Perf(
            f"{rule.name}_pct", _fmt(worst, 0) if worst is not None else "U", "", _fmt(rule.pct, 0)
        ),
    )
    return RuleResult(
        rule, tuple(found), summary, float(worst) if worst is not None else None, perf
    )


def _eval_gpu_idle(rule: AlertRule, fig: Figures) -> RuleResult:
    start = fig.now - timedelta(seconds=rule.window_s)
    if not fig.has_gpu_data(start):
        return RuleResult(rule, (), f"no GPU samples in {span(rule.window_s)}")
    idle = fig.gpu_idle_cost(start, fig.end) * 3600 / Decimal(rule.window_s)
    summary = f"idle GPUs burn {usd(idle)}/h over {span(rule.window_s)}"
    findings: tuple[Finding, ...] = ()
    if idle > rule.usd_per_hour:
        description = (
            f"GPU time with no work cost {usd(idle)}/h over the last {span(rule.window_s)},"
            f" above the {usd(rule.usd_per_hour)}/h threshold."
        )
        findings = (Finding("", rule.severity, float(idle), summary, description),)
    perf = (Perf(f"{rule.name}_usd_per_h", _fmt(idle), "", _fmt(rule.usd_per_hour)),)
    return RuleResult(rule, findings, summary, float(idle), perf)


def evaluate(
    store: Store,
    rules: Iterable[AlertRule],
    now: datetime,
    *,
    sources: Collection[str] | None = None,
    optional_sources: Collection[str] = (),
) -> list[RuleResult]:
    """Evaluate every rule against the store, once; reads only.

    Args:
        store: the database.
        rules: the rules, in the order results are wanted.
        now: the evaluation time (UTC).
        sources: the configured source names (``source_down`` ignores rows of sources no
            longer configured); ``None`` for every source in the database.
        optional_sources: sources only tried (the NVML probe): their being unavailable is no
            outage.
    """
    figures = StoreFigures(store, now.astimezone(UTC))
    return evaluate_figures(figures, rules, sources=sources, optional_sources=optional_sources)


def evaluate_figures(
    fig: Figures,
    rules: Iterable[AlertRule],
    *,
    sources: Collection[str] | None = None,
    optional_sources: Collection[str] = (),
) -> list[RuleResult]:
    """Evaluate every rule on ``fig``'s figures, once (see :func:`evaluate`). A rule whose
    figures its source cannot give is UNKNOWN, with the reason; a
    :class:`~tokentop.collectors.base.SourceError` (the source failed) is raised."""
    results = []
    for rule in rules:
        try:
            if rule.kind == "budget":
                result = _eval_budget(rule, fig)
            elif rule.kind == "spike":
                result = _eval_spike(rule, fig)
            elif rule.kind == "runway":
                result = _eval_runway(rule, fig)
            elif rule.kind == "source_down":
                result = _eval_source_down(rule, fig, sources, optional_sources)
            elif rule.kind == "unpriced":
                result = _eval_unpriced(rule, fig)
            elif rule.kind == "new_model":
                result = _eval_new_model(rule, fig)
            elif rule.kind == "cost_per_request":
                result = _eval_cost_per_request(rule, fig)
            elif rule.kind == "gpu_idle":
                result = _eval_gpu_idle(rule, fig)
            else:  # pragma: no cover - the config refuses other kinds
                raise ValueError(f"unknown kind {rule.kind!r}")
        except NotAvailable as exc:
            result = RuleResult(rule, error=f"cannot evaluate: {exc}")
        except SourceError:
            raise  # the figures' source failed (a fleet's Prometheus): no rule can tell
        except Exception as exc:
            log.exception("evaluating alert %s failed", rule.name)
            result = RuleResult(rule, error=f"cannot evaluate: {type(exc).__name__}: {exc}")
        results.append(result)
    return results


# The state machine.


@dataclass(frozen=True, slots=True)
class Transition:
    """A change worth a message: ``firing``, ``resolved`` or ``escalated``."""

    event: str
    state: AlertState
    previous_severity: str = ""


def _labels_of(rule: AlertRule, finding: Finding) -> dict[str, str]:
    labels = {k: clean(v) for k, v in rule.scope.labels().items()}
    labels.update(finding.labels)
    return labels


def advance(
    states: Mapping[tuple[str, str], AlertState],
    results: Sequence[RuleResult],
    rules: Sequence[AlertRule],
    now: datetime,
    *,
    keep_resolved: bool,
    gap_s: float,
) -> tuple[Changes, list[Transition]]:
    """One step of every alert's state machine.

    Args:
        states: the stored rows, by (rule, key).
        results: this evaluation (rules that failed to evaluate keep their rows as they are).
        rules: the configured rules; rows of rules no longer configured resolve.
        now: the evaluation time.
        keep_resolved: keep resolved rows until Alertmanager has accepted the resolution
            (``False`` when none is configured: they go at once).
        gap_s: a pending row not seen for longer than this (the collector was stopped) starts
            its ``for`` again: the condition was not watched in between.

    Returns:
        The changes to write and the transitions that deserve a message.
    """
    changes = Changes()
    transitions: list[Transition] = []
    configured = {r.name for r in rules}
    seen: set[tuple[str, str]] = set()

    def resolve(prev: AlertState, value: float | None, summary: str) -> None:
        if prev.episode is not None:
            changes.closed.append((prev.episode, now, value))
        done = replace(
            prev,
            state="resolved",
            resolved_at=now,
            updated_at=now,
            value=value if value is not None else prev.value,
            summary=summary or prev.summary,
        )
        if keep_resolved:
            changes.upserts.append(done)
        else:
            changes.deletes.append((prev.rule, prev.key))
        transitions.append(Transition("resolved", done))

    for result in results:
        rule = result.rule
        if result.error:
            seen.update(k for k in states if k[0] == rule.name)
            continue
        for f in result.findings:
            key = (rule.name, f.key)
            seen.add(key)
            prev = states.get(key)
            labels = _labels_of(rule, f)
            fresh = AlertState(
                rule=rule.name,
                key=f.key,
                kind=rule.kind,
                state="pending",
                severity=f.severity,
                value=f.value,
                summary=f.summary,
                description=f.description,
                labels=labels,
                active_since=now,
                updated_at=now,
            )
            if prev is None or prev.state == "resolved":
                if prev is not None:
                    # A new episode; Alertmanager still knows the old severity's label set.
                    fresh = replace(fresh, am_severity=prev.am_severity, am_sent_at=None)
                if rule.for_s <= 0:
                    fired = replace(fresh, state="firing", fired_at=now)
                    changes.upserts.append(fired)
                    transitions.append(Transition("firing", fired))
                else:
                    changes.upserts.append(fresh)
                continue
            if prev.state == "pending":
                since = prev.active_since
                if (now - prev.updated_at).total_seconds() > gap_s:
                    since = now
                pending = replace(fresh, active_since=since)
                if (now - since).total_seconds() >= rule.for_s:
                    fired = replace(pending, state="firing", fired_at=now)
                    changes.upserts.append(fired)
                    transitions.append(Transition("firing", fired))
                else:
                    changes.upserts.append(pending)
                continue
            # Firing: keep it, with this evaluation's figures.
            current = replace(
                prev,
                severity=f.severity,
                value=f.value,
                summary=f.summary,
                description=f.description,
                labels=labels,
                kind=rule.kind,
                updated_at=now,
            )
            changes.upserts.append(current)
            if severity_code(f.severity) > severity_code(prev.severity):
                if prev.episode is not None:
                    changes.raised.append((prev.episode, f.severity))
                transitions.append(Transition("escalated", current, prev.severity))
        summary = result.summary
        for key, prev in states.items():
            if key[0] != rule.name or key in seen:
                continue
            seen.add(key)
            if prev.state == "pending":
                changes.deletes.append(key)
            elif prev.state == "firing":
                if prev.key:  # one instance of several: say which cleared
                    what = clean(prev.key.partition("=")[2] or prev.key)
                    resolve(prev, None, f"{what}: cleared ({summary})" if summary else "")
                else:
                    resolve(prev, result.value, summary)
            elif not keep_resolved:
                changes.deletes.append(key)
    for key, prev in states.items():
        if key in seen:
            continue
        if key[0] not in configured:
            if prev.state == "firing":
                resolve(prev, None, "rule removed from the config")
            elif prev.state == "pending" or not keep_resolved:
                changes.deletes.append(key)
    return changes, transitions


# What is sent.


def iso(when: datetime) -> str:
    """RFC 3339 in UTC, as Alertmanager reads it."""
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def am_alert(
    state: AlertState,
    *,
    instance: str,
    extra: Mapping[str, str],
    ends_at: datetime,
    severity: str | None = None,
) -> dict[str, Any]:
    """One alert of Alertmanager's ``POST /api/v2/alerts`` body."""
    labels = {
        **{k: v for k, v in extra.items()},
        **state.labels,
        "alertname": state.rule,
        "severity": severity or state.severity,
        "rule_kind": state.kind,
        "instance": instance,
    }
    return {
        "labels": {k: clean(v) for k, v in labels.items() if v != ""},
        "annotations": {
            "summary": clean(state.summary),
            "description": clean(state.description or state.summary),
        },
        "startsAt": iso(state.fired_at or state.active_since),
        "endsAt": iso(ends_at),
    }


def _slack(text: str) -> str:
    """Slack's three control characters escaped, so a model name cannot ping ``<!channel>``."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def webhook_body(t: Transition, instance: str) -> dict[str, Any]:
    """The JSON of one webhook message (a Slack-compatible ``text`` and the structured alert)."""
    s = t.state
    if t.event == "resolved":
        lasted = ""
        if s.fired_at and s.resolved_at:
            lasted = f" after {span((s.resolved_at - s.fired_at).total_seconds())}"
        head = f"[RESOLVED] {s.rule} on {instance}{lasted}"
    elif t.event == "escalated":
        head = f"[FIRING:{s.severity}] {s.rule} on {instance} (was {t.previous_severity})"
    else:
        head = f"[FIRING:{s.severity}] {s.rule} on {instance}"
    text = clean(f"{head}: {s.summary}")
    return {
        "text": _slack(text),
        "status": "resolved" if t.event == "resolved" else "firing",
        "event": t.event,
        "alertname": s.rule,
        "severity": s.severity,
        "rule_kind": s.kind,
        "instance": clean(instance),
        "labels": {k: clean(v) for k, v in s.labels.items()},
        "summary": clean(s.summary),
        "description": clean(s.description),
        "value": s.value,
        "startsAt": iso(s.fired_at or s.active_since),
        "endsAt": iso(s.resolved_at) if s.resolved_at else None,
    }


def redact(url: str) -> str:
    """A URL safe to log: scheme and host only (a webhook's path is its secret)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}{':' + str(parts.port) if parts.port else ''}"


def am_endpoint(url: str) -> str:
    """``{url}/api/v2/alerts`` (a URL already ending so is taken as it is)."""
    base = url.rstrip("/")
    return base if base.endswith("/api/v2/alerts") else f"{base}/api/v2/alerts"


class AlertEngine:
    """Evaluates the rules on an interval and delivers what changed.

    It is a periodic task of :class:`~tokentop.collectors.runner.Runner`: ``name``,
    ``interval_s``, ``tick()`` (one evaluation and delivery; never raises) and ``aclose()``.

    Args:
        store: the writer's store.
        config: the ``[alerts]`` settings and rules.
        clock: injected time.
        client: the HTTP client (tests pass one with a fake transport); made when ``None``.
        sources: configured source names, for ``source_down``.
        optional_sources: sources that are only tried.
        environ: where ``webhook_url_env`` is read (the process environment by default).
    """

    name = "alerts"

    def __init__(
        self,
        store: Store,
        config: AlertsConfig,
        *,
        clock: Clock = utcnow,
        client: httpx.AsyncClient | None = None,
        sources: Collection[str] | None = None,
        optional_sources: Collection[str] = (),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.interval_s = config.evaluate_every_s
        self.sources = sources
        self.optional_sources = frozenset(optional_sources)
        self.instance = config.instance or socket.gethostname()
        self.webhooks = config.webhooks(environ)
        self._client = client
        self._own_client = client is None
        self.last_eval_ms: float | None = None
        """Wall time of the last evaluation's queries, in milliseconds."""
        self.transitions: list[Transition] = []
        """The transitions of the last tick (for tests and logs)."""
        self.errors = 0
        self._announced = False

    @property
    def client(self) -> httpx.AsyncClient:
        """The HTTP client, made on first use."""
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(timeout=self.config.timeout_s)
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP client if this engine made it."""
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def tick(self) -> None:
        """Evaluate, write the transitions, deliver. Failures are logged, never raised."""
        import asyncio

        try:
            now = self.clock()
            self.transitions = await asyncio.to_thread(self.step, now)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.errors += 1
            log.exception("alert evaluation failed")
            return
        try:
            await self.deliver(self.clock())
        except asyncio.CancelledError:
            raise
        except Exception:
            self.errors += 1
            log.exception("alert delivery failed")

    def step(self, now: datetime) -> list[Transition]:
        """Evaluate every rule and write the state changes (blocking: call from a thread)."""
        now = now.replace(microsecond=0)  # what the database keeps: no second time for AM
        alert_store.ensure_tables(self.store)
        if not self._announced and self.sources is not None:
            # ``tokentop check`` judges the sources this collector runs, not every row ever seen.
            self.store.set_meta(SOURCES_KEY, json.dumps(sorted(self.sources)))
            self._announced = True
        started = time.perf_counter()
        results = evaluate(
            self.store,
            self.config.rules,
            now,
            sources=self.sources,
            optional_sources=self.optional_sources,
        )
        self.last_eval_ms = (time.perf_counter() - started) * 1000
        gap = max(3 * self.config.evaluate_every_s, 300.0)
        with self.store.transaction() as conn:
            # Read inside the write lock: a second process evaluating at the same moment sees
            # this one's transitions and makes none of its own.
            stored = alert_store.read_states(conn)
            changes, transitions = advance(
                stored,
                results,
                self.config.rules,
                now,
                keep_resolved=bool(self.config.alertmanager_urls),
                gap_s=gap,
            )
            for t in transitions:
                if t.event == "firing" or t.event == "escalated" or t.event == "resolved":
                    body = webhook_body(t, self.instance)
                    for url in self.webhooks:
                        changes.messages.append(("webhook", alert_store.target_id(url), body))
            if changes:
                written = alert_store.write_changes(conn, changes, now)
                by_key = {(s.rule, s.key): s for s in written}
                transitions = [
                    replace(t, state=by_key.get((t.state.rule, t.state.key), t.state))
                    for t in transitions
                ]
        for t in transitions:
            log.warning(
                "alert %s %s (%s): %s",
                t.state.rule,
                t.event,
                t.state.severity,
                clean(t.state.summary),
            )
        return transitions

    async def deliver(self, now: datetime) -> None:
        """Send what Alertmanager should hear now, and the webhook messages due."""
        if self.config.alertmanager_urls:
            await self._alertmanager(now)
        await self._webhooks(now)

    def _am_batch(self, now: datetime) -> tuple[list[dict[str, Any]], list[tuple[str, str, str]]]:
        every = max(self.config.resend_s, self.config.evaluate_every_s)
        ends = now + timedelta(seconds=4 * every)
        alerts: list[dict[str, Any]] = []
        sent: list[tuple[str, str, str]] = []
        extra = self.config.labels
        for s in alert_store.states(self.store):
            if s.state == "firing":
                due = (
                    s.am_sent_at is None
                    or (now - s.am_sent_at).total_seconds() >= self.config.resend_s
                    or s.am_severity != s.severity
                )
                if not due:
                    continue
                # A firing alert's old label set ends now; the new one takes over.
                ends_at, old_ends_at = ends, now
            elif s.state == "resolved":
                ends_at = old_ends_at = s.resolved_at or now
            else:
                continue
            alerts.append(am_alert(s, instance=self.instance, extra=extra, ends_at=ends_at))
            if s.am_severity and s.am_severity != s.severity:
                # The label set Alertmanager knows, under the severity it was last sent.
                alerts.append(
                    am_alert(
                        s,
                        instance=self.instance,
                        extra=extra,
                        ends_at=old_ends_at,
                        severity=s.am_severity,
                    )
                )
            sent.append((s.rule, s.key, s.severity))
        return alerts, sent

    async def _alertmanager(self, now: datetime) -> None:
        import asyncio

        import httpx

        from tokentop.collectors.http import read_capped

        alerts, sent = await asyncio.to_thread(self._am_batch, now)
        if not alerts:
            return
        ok = True
        for url in self.config.alertmanager_urls:
            try:
                async with self.client.stream("POST", am_endpoint(url), json=alerts) as response:
                    status = response.status_code
                    reply = await read_capped(response, REPLY_LIMIT) if status >= 300 else b""
                if status >= 300:
                    ok = False
                    text = (reply or b"").decode("utf-8", errors="replace")
                    log.warning(
                        "Alertmanager %s answered %d: %s",
                        redact(url),
                        status,
                        clean(" ".join(text.split())[:200]) if reply is not None else "(too long)",
                    )
            except httpx.HTTPError as exc:
                ok = False
                log.warning("Alertmanager %s unreachable: %s", redact(url), type(exc).__name__)
        if ok:
            await asyncio.to_thread(alert_store.mark_sent, self.store, sent, now)

    async def _webhooks(self, now: datetime) -> None:
        import asyncio

        import httpx

        from tokentop.collectors.http import read_capped

        items = await asyncio.to_thread(alert_store.claim_outbox, self.store, now)
        if not items:
            return
        urls = {alert_store.target_id(u): u for u in self.webhooks}
        for item in items:
            url = urls.get(item.target)
            age = (now - item.created_at).total_seconds()
            if url is None or age > 86400 or item.attempts > 30:
                log.warning(
                    "dropping a webhook message after %d attempt(s): %s",
                    item.attempts,
                    "its URL is no longer configured" if url is None else "it is a day old",
                )
                await asyncio.to_thread(alert_store.outbox_done, self.store, item.id)
                continue
            error = ""
            try:
                async with self.client.stream(
                    "POST", url, content=item.body, headers={"content-type": "application/json"}
                ) as response:
                    # Only the status matters; the body is read to keep the connection
                    # reusable, but no more than a status reply needs.
                    await read_capped(response, REPLY_LIMIT)
                if response.status_code >= 300:
                    error = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                error = type(exc).__name__
            if not error:
                await asyncio.to_thread(alert_store.outbox_done, self.store, item.id)
                continue
            delay = min(3600.0, 15.0 * 2 ** min(item.attempts, 8))
            log.warning("webhook %s failed (%s); retrying in %.0f s", redact(url), error, delay)
            await asyncio.to_thread(
                alert_store.outbox_retry,
                self.store,
                item.id,
                now + timedelta(seconds=delay),
                error,
            )


def build_engine(
    store: Store,
    config: AlertsConfig,
    *,
    sources: Collection[str] | None = None,
    optional_sources: Collection[str] = (),
    clock: Clock = utcnow,
) -> AlertEngine | None:
    """The engine for a collector, or ``None`` when no rule is configured."""
    if not config.rules:
        return None
    return AlertEngine(
        store, config, sources=sources, optional_sources=optional_sources, clock=clock
    )


_GRAVITY = {OK: 0, WARNING: 1, UNKNOWN: 2, CRITICAL: 3}
"""CRITICAL outranks UNKNOWN, which outranks WARNING (as Icinga and Nagios order states)."""


def worst(results: Iterable[RuleResult]) -> int:
    """The gravest status code of some results (0 when none)."""
    return max((r.code for r in results), key=_GRAVITY.__getitem__, default=OK)


def collector_sources(store: Store) -> frozenset[str] | None:
    """The sources the collector's alert engine said it runs; ``None`` when it never said."""
    try:
        names = json.loads(store.get_meta(SOURCES_KEY) or "null")
    except ValueError:
        return None
    if not isinstance(names, list):
        return None
    return frozenset(str(n) for n in names)


def finite(value: float | None) -> float | None:
    """``value``, or ``None`` for NaN and infinities (JSON has no room for them)."""
    return value if value is not None and math.isfinite(value) else None
