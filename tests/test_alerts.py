"""Alert rules: the config, every kind's evaluation, the stored state machine, and delivery to
Alertmanager and the webhook (through a fake transport here; a real Alertmanager in
``test_alertmanager.py``).

The clock is frozen at 23:59:30 UTC on 31 December, where days, months and years turn over.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Clock, FakeCollector, bucket
from tokentop.collectors.alert_config import AlertRule, AlertsConfig, Scope, parse_duration
from tokentop.collectors.alerts import (
    AlertEngine,
    Finding,
    RuleResult,
    advance,
    evaluate,
    usd,
    webhook_body,
)
from tokentop.collectors.config import ConfigError, parse_config
from tokentop.collectors.runner import Runner
from tokentop.pricing.book import PriceBook
from tokentop.store import alerts as alert_store
from tokentop.store.db import Store
from tokentop.store.records import Batch, GpuSample, SourceHealth, usd_to_nano

NOW = datetime(2025, 12, 31, 23, 59, 30, tzinfo=UTC)
"""The last half minute of the year."""
DAY = NOW.replace(hour=0, minute=0, second=0)
NOON = datetime(2025, 12, 31, 12, 0, tzinfo=UTC)
"""Where tests that let minutes pass stay within one day."""


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store(db_path)
    yield s
    s.close()


def write(store: Store, *buckets: Any) -> None:
    store.write_batch(Batch(usage=tuple(buckets)))


def rules(text: str, **top: Any) -> AlertsConfig:
    raw = tomllib.loads(text)
    raw.update(top)
    return parse_config(raw).alerts


def one(text: str, **top: Any) -> AlertRule:
    (rule,) = rules(text, **top).rules
    return rule


def run(store: Store, rule: AlertRule, now: datetime = NOW, **kw: Any) -> RuleResult:
    (result,) = evaluate(store, [rule], now, **kw)
    assert not result.error, result.error
    return result


# The config.


def test_a_full_alerts_config_parses() -> None:
    config = rules(
        """
        [alerts]
        alertmanager_url = ["http://127.0.0.1:9093", "http://am2:9093/"]
        webhook_url = "https://hooks.example/T/B/secret"
        webhook_url_env = "MY_HOOK"
        evaluate_every_s = 15
        resend_s = 45
        instance = "box-1"
        labels = { team = "ml" }

        [[alert]]
        name = "daily-budget"
        kind = "budget"
        warn_pct = 70
        crit_pct = 110
        basis = "projected"
        for = "1m30s"
        provider = "openai"

        [[alert]]
        name = "spike"
        kind = "spike"
        window = "30m"
        factor = 2.5
        min_usd_per_hour = 5
        weeks = 2
        severity = "critical"

        [[alert]]
        name = "runway"
        kind = "runway"
        period = "month"
        budget_usd = 1000
        hours = 12

        [[alert]]
        name = "down"
        kind = "source_down"
        source = "openai"
        stale_after = "15m"

        [[alert]]
        name = "unpriced"
        kind = "unpriced"
        min_tokens = 1000

        [[alert]]
        name = "new-key"
        kind = "new_model"
        dimension = "api_key"

        [[alert]]
        name = "cpr"
        kind = "cost_per_request"
        pct = 50
        min_requests = 20
        by = "model"

        [[alert]]
        name = "idle"
        kind = "gpu_idle"
        usd_per_hour = 2.5
        """,
        budget_daily_usd=200,
    )
    assert config.alertmanager_urls == ("http://127.0.0.1:9093", "http://am2:9093/")
    assert config.webhook_urls == ("https://hooks.example/T/B/secret",)
    assert config.webhooks({"MY_HOOK": "https://hooks.example/other"}) == (
        "https://hooks.example/T/B/secret",
        "https://hooks.example/other",
    )
    assert config.evaluate_every_s == 15 and config.resend_s == 45
    assert config.instance == "box-1" and config.labels == {"team": "ml"}
    budget, spike, runway, down, unpriced, new, cpr, idle = config.rules
    assert budget == AlertRule(
        name="daily-budget",
        kind="budget",
        for_s=90.0,
        scope=Scope(provider="openai"),
        budget_usd=Decimal(200),
        basis="projected",
        warn_pct=Decimal(70),
        crit_pct=Decimal(110),
    )
    assert (spike.window_s, spike.factor, spike.min_usd_per_hour, spike.weeks) == (
        1800.0,
        Decimal("2.5"),
        Decimal(5),
        2,
    )
    assert spike.severity == "critical"
    assert (runway.period, runway.budget_usd, runway.hours) == ("month", Decimal(1000), 12.0)
    assert down.scope.source == "openai" and down.stale_after_s == 900.0
    assert unpriced.min_tokens == 1000
    assert new.dimension == "api_key"
    assert (cpr.pct, cpr.min_requests, cpr.by) == (Decimal(50), 20, "model")
    assert idle.usd_per_hour == Decimal("2.5")
    assert config.rule("spike") is spike and config.rule("nope") is None


def test_defaults_are_documented_values() -> None:
    config = rules('[[alert]]\nname = "s"\nkind = "spike"')
    (spike,) = config.rules
    assert config.evaluate_every_s == 30.0 and config.resend_s == 60.0
    assert config.alertmanager_urls == () and config.webhook_urls == ()
    assert (spike.window_s, spike.factor, spike.min_usd_per_hour, spike.weeks) == (
        900.0,
        Decimal(3),
        Decimal(1),
        4,
    )
    assert spike.for_s == 0 and spike.severity == "warning"
    assert parse_config({}).alerts == AlertsConfig()


def test_durations() -> None:
    assert parse_duration("0s", "for", "x") == 0
    assert parse_duration("1h30m", "for", "x") == 5400
    assert parse_duration(45, "for", "x") == 45
    assert parse_duration("1.5m", "for", "x") == 90


BAD: list[tuple[str, str]] = [
    ("alerts = 1", "alerts must be a table, got 1"),
    ("[alerts]\nevaluate_every = 5", "unknown setting 'alerts.evaluate_every'"),
    ("[alerts]\nevaluate_every_s = 0", "alerts.evaluate_every_s must be a positive number, got 0"),
    ("[alerts]\nalertmanager_url = 'localhost:9093'", "alerts.alertmanager_url must be an http(s)"),
    ("[alerts]\nlabels = { 'bad-name' = 'x' }", "alerts.labels.bad-name must be a label name"),
    ("[alerts]\nwebhook_url_env = 'not a var'", "alerts.webhook_url_env must name an environment"),
    ("alert = 5", "alert must be an array of tables, got 5"),
    ("[[alert]]\nkind = 'spike'", "alert[0].name must be 1-63 letters"),
    ("[[alert]]\nname = 'has space'\nkind = 'spike'", "got 'has space'"),
    ("[[alert]]\nname = 'x'", "alert[0] (x) needs 'kind'"),
    ("[[alert]]\nname = 'x'\nkind = 'budgit'", "alert[0].kind must be one of budget, spike"),
    ("[[alert]]\nname = 'x'\nkind = 'budget'", "alert[0] (x) needs budget_usd, or budget_daily"),
    (
        "[[alert]]\nname = 'x'\nkind = 'budget'\nperiod = 'month'\nbudget_usd = 0",
        "alert[0].budget_usd must be a positive number, got 0",
    ),
    (
        "[[alert]]\nname = 'x'\nkind = 'budget'\nbudget_usd = 5\nperiod = 'week'",
        "alert[0].period must be one of day, month, got 'week'",
    ),
    (
        "[[alert]]\nname = 'x'\nkind = 'budget'\nbudget_usd = 5\nwarn_pct = 120",
        "alert[0].warn_pct must not exceed crit_pct",
    ),
    (
        "[[alert]]\nname = 'x'\nkind = 'budget'\nbudget_usd = 5\nseverity = 'critical'",
        "a budget rule's severity comes from warn_pct and crit_pct",
    ),
    ("[[alert]]\nname = 'x'\nkind = 'spike'\nfor = '5 min'", "alert[0].for must be a duration"),
    ("[[alert]]\nname = 'x'\nkind = 'spike'\nfor = -1", "alert[0].for must be a duration"),
    ("[[alert]]\nname = 'x'\nkind = 'spike'\nwindow = '30s'", "window must be at least one min"),
    ("[[alert]]\nname = 'x'\nkind = 'spike'\nfactor = 0", "factor must be a positive number"),
    ("[[alert]]\nname = 'x'\nkind = 'spike'\nweeks = 0", "weeks must be between 1 and 52, got 0"),
    ("[[alert]]\nname = 'x'\nkind = 'spike'\nseverity = 'page'", "severity must be one of warn"),
    ("[[alert]]\nname = 'x'\nkind = 'spike'\nperiod = 'day'", "unknown setting 'alert[0].period'"),
    ("[[alert]]\nname = 'x'\nkind = 'source_down'\nmodel = 'y'", "'alert[0].model' for kind"),
    ("[[alert]]\nname = 'x'\nkind = 'unpriced'\nmin_tokens = 1.5", "min_tokens must be a whole"),
    ("[[alert]]\nname = 'x'\nkind = 'new_model'\ndimension = 'tag'", "dimension must be one of"),
    ("[[alert]]\nname = 'x'\nkind = 'cost_per_request'\nby = 'user'", "by must be one of"),
    ("[[alert]]\nname = 'x'\nkind = 'gpu_idle'\nusd_per_hour = 'x'", "usd_per_hour must be a non"),
    ("[[alert]]\nname = 'x'\nkind = 'spike'\nmodel = 3", "alert[0].model must be a string, got 3"),
    (
        "[[alert]]\nname = 'x'\nkind = 'spike'\n[[alert]]\nname = 'x'\nkind = 'unpriced'",
        "alert[1].name 'x' is used twice",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[t for t, _ in BAD])
def test_bad_alert_settings_give_one_line_errors(tmp_path: Path, text: str, expected: str) -> None:
    from tokentop.collectors.config import load_config

    path = tmp_path / "config.toml"
    path.write_text(text + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert expected in message
    assert message.startswith(f"{path}: ")
    assert "\n" not in message


def test_a_bad_webhook_url_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"alerts": {"webhook_url": "hooks.slack.com/services/T0/B0/s3cr3t"}})
    assert "s3cr3t" not in str(err.value)


# Evaluating each kind.


def test_budget_warns_then_goes_critical_and_counts_today_only(store: Store) -> None:
    rule = one('[[alert]]\nname = "daily-budget"\nkind = "budget"', budget_daily_usd=1)
    write(store, bucket(DAY - timedelta(minutes=2), cost="5"))  # yesterday: not today's spend
    write(store, bucket(DAY + timedelta(hours=3), cost="0.50"))
    result = run(store, rule)
    assert result.findings == () and result.code == 0
    assert result.summary.startswith("$0.50 of $1.00 today (50%)")
    write(store, bucket(NOW - timedelta(minutes=20), cost="0.35"))
    (finding,) = run(store, rule).findings
    assert finding.severity == "warning" and finding.value == 85.0
    write(store, bucket(NOW.replace(second=0), cost="0.35"))  # the open minute counts
    result = run(store, rule)
    (finding,) = result.findings
    assert finding.severity == "critical"
    assert finding.summary == "$1.20 of $1.00 today (120%), burn $0.70/h"
    assert result.code == 2
    assert [p.render() for p in result.perf] == [
        "today_usd=1.20;0.80;1.00",
        "burn_usd_per_h=0.70",
    ]


def test_budget_scope_filters_by_substring(store: Store) -> None:
    rule = one(
        '[[alert]]\nname = "b"\nkind = "budget"\nbudget_usd = 1\nprovider = "anthro"\n'
        'project = "search"'
    )
    write(
        store,
        bucket(NOW - timedelta(minutes=5), provider="openai", project="search", cost="3"),
        bucket(NOW - timedelta(minutes=5), provider="anthropic", project="other", cost="3"),
        bucket(NOW - timedelta(minutes=4), provider="anthropic", project="search-2", cost="0.9"),
    )
    result = run(store, rule)
    assert result.value == 90.0
    assert result.findings[0].severity == "warning"


def test_budget_projected_and_monthly(store: Store) -> None:
    rule = one(
        '[[alert]]\nname = "m"\nkind = "budget"\nperiod = "month"\nbasis = "projected"',
        budget_monthly_usd=100,
    )
    # 31 days: spending $3.10 a day for 30 days projects about $96 by the end of the month.
    start = NOW.replace(day=1, hour=0, minute=0, second=0)
    write(store, *(bucket(start + timedelta(days=d, hours=12), cost="3.10") for d in range(31)))
    result = run(store, rule)
    assert result.findings[0].severity == "warning"
    assert "projected $96.1" in result.summary and "this month" in result.summary
    assert result.perf[0].label == "projected_month_usd"


def test_spike_against_the_trailing_day(store: Store) -> None:
    rule = one('[[alert]]\nname = "spike"\nkind = "spike"')
    for h in range(1, 25):
        write(store, bucket(NOW - timedelta(hours=h), cost="1"))  # $1/h for a day
    assert run(store, rule).findings == ()
    write(store, bucket(NOW - timedelta(minutes=10), cost="2"))  # $8/h over 15 min
    (finding,) = run(store, rule).findings
    assert finding.value == 8.0
    assert "8.0x the baseline $1.00/h (trailing 24h)" in finding.summary


def test_spike_below_the_floor_does_not_fire(store: Store) -> None:
    rule = one('[[alert]]\nname = "spike"\nkind = "spike"\nmin_usd_per_hour = 10')
    write(store, bucket(NOW - timedelta(minutes=10), cost="2"))
    result = run(store, rule)
    assert result.findings == () and "new spend against" in result.summary


def test_spike_uses_the_same_time_of_week_with_enough_history(store: Store) -> None:
    rule = one('[[alert]]\nname = "spike"\nkind = "spike"\nweeks = 2')
    # A busy Wednesday night every week: the same burn now is normal, not a spike.
    for week in (1, 2):
        write(store, bucket(NOW - timedelta(weeks=week, minutes=10), cost="2"))
    write(store, bucket(NOW - timedelta(weeks=3), cost="0.01"))  # history reaches back 3 weeks
    write(store, bucket(NOW - timedelta(minutes=10), cost="2"))
    result = run(store, rule)
    assert result.findings == ()
    assert "same time of week, last 2 weeks" in result.summary


def test_runway_fires_only_when_the_budget_runs_out_before_the_period_ends(store: Store) -> None:
    day = one('[[alert]]\nname = "r"\nkind = "runway"\nhours = 4', budget_daily_usd=10)
    month = one(
        '[[alert]]\nname = "r"\nkind = "runway"\nhours = 4\nperiod = "month"',
        budget_monthly_usd=10,
    )
    write(store, bucket(NOW - timedelta(minutes=30), cost="8"))  # $8/h, $2 left
    # Half a minute of the day (and of the month) is left: 15 minutes of runway outlast it.
    assert run(store, day).findings == ()
    assert run(store, month).findings == ()
    write(store, bucket(NOON - timedelta(minutes=30), cost="8"))
    (finding,) = run(store, day, NOON).findings
    assert finding.value == pytest.approx(0.25)
    assert finding.summary == "budget of $10.00 today runs out in 15m at $8.00/h ($2.00 left)"
    (finding,) = run(store, month, NOON).findings
    assert "this month runs out in 15m" in finding.summary
    write(store, bucket(NOON - timedelta(minutes=40), cost="3"))
    (finding,) = run(store, day, NOON).findings
    assert finding.value == 0 and finding.summary == "budget of $10.00 today is spent ($11.00)"


def test_source_down_failing_stale_and_ignored(store: Store) -> None:
    rule = one('[[alert]]\nname = "down"\nkind = "source_down"\nstale_after = "10m"')

    def health(name: str, state: str, ago: float, kind: str = "openai") -> None:
        store.record_health(
            SourceHealth(
                name=name,
                kind=kind,
                state=state,
                last_success=NOW - timedelta(seconds=ago),
                last_error="HTTP 401 \x1b[31mnope" if state != "ok" else "",
            ),
            now=NOW,
        )

    health("openai", "auth failed", 120)
    health("anthropic", "ok", 900, "anthropic")
    health("gpu", "unavailable", 5, "nvml")
    health("fresh", "ok", 5)
    health("gone", "error", 60)
    result = run(
        store, rule, sources={"openai", "anthropic", "gpu", "fresh"}, optional_sources={"gpu"}
    )
    by_key = {f.key: f for f in result.findings}
    assert set(by_key) == {"source=openai", "source=anthropic"}
    assert by_key["source=openai"].summary == (
        "source openai auth failed for 2m: HTTP 401 \\x1b[31mnope"
    )
    assert by_key["source=anthropic"].summary == "source anthropic: no successful poll for 15m"
    assert by_key["source=openai"].labels == {"source": "openai"}


def test_unpriced_model_fires_per_model(store: Store) -> None:
    rule = one('[[alert]]\nname = "u"\nkind = "unpriced"\nmin_tokens = 100')
    write(
        store,
        bucket(
            NOW - timedelta(minutes=5),
            provider="acme",
            model="llm-70b",
            cost=None,
            input_uncached=500,
        ),
        bucket(NOW - timedelta(minutes=5), provider="acme", model="tiny", cost=None, output=5),
        bucket(NOW - timedelta(minutes=5), model="gpt-4o", cost="1", input_uncached=10**6),
    )
    (finding,) = run(store, rule).findings
    assert finding.key == "model=acme/llm-70b"
    assert finding.labels == {"provider": "acme", "model": "llm-70b"}
    assert finding.summary == "acme/llm-70b: 500 tokens in 1h have no price"


def test_new_model_against_older_history(store: Store) -> None:
    rule = one('[[alert]]\nname = "new"\nkind = "new_model"')
    write(store, bucket(NOW - timedelta(minutes=20), model="brand-new", cost="0.1"))
    # A database no older than the window: everything is new, so nothing is.
    assert run(store, rule).findings == ()
    write(
        store,
        bucket(NOW - timedelta(days=3), model="gpt-4o", cost="1"),
        bucket(NOW - timedelta(minutes=30), model="gpt-4o", cost="1"),
    )
    (finding,) = run(store, rule).findings
    assert finding.key == "model=brand-new"
    assert finding.summary == "new model brand-new started spending 20m ago"
    later = run(store, rule, NOW + timedelta(hours=1))
    assert later.findings == ()


def test_new_api_key_within_a_scope(store: Store) -> None:
    rule = one(
        '[[alert]]\nname = "k"\nkind = "new_model"\ndimension = "api_key"\nprovider = "open"'
    )
    write(
        store,
        bucket(NOW - timedelta(days=2), api_key="key_a", cost="1"),
        bucket(NOW - timedelta(minutes=5), api_key="key_b", cost="1"),
        bucket(NOW - timedelta(minutes=5), provider="anthropic", api_key="key_c", cost="1"),
    )
    assert [f.key for f in run(store, rule).findings] == ["api_key=key_b"]


def test_cost_per_request_rise_with_enough_requests(store: Store) -> None:
    rule = one(
        '[[alert]]\nname = "cpr"\nkind = "cost_per_request"\npct = 30\nmin_requests = 10\n'
        'by = "model"'
    )
    write(
        store,
        bucket(NOW - timedelta(minutes=90), model="a", cost="1.00", requests=100),
        bucket(NOW - timedelta(minutes=30), model="a", cost="1.50", requests=100),
        bucket(NOW - timedelta(minutes=90), model="b", cost="1.00", requests=100),
        bucket(NOW - timedelta(minutes=30), model="b", cost="1.10", requests=100),
        bucket(NOW - timedelta(minutes=90), model="c", cost="1.00", requests=5),
        bucket(NOW - timedelta(minutes=30), model="c", cost="9.00", requests=5),
    )
    result = run(store, rule)
    (finding,) = result.findings
    assert finding.key == "model=a" and finding.labels == {"model": "a"}
    assert finding.value == 50.0
    assert finding.summary == (
        "a: $/request $0.015, up 50% on the previous 1h ($0.01), 100 requests"
    )


def test_gpu_idle_burn(store: Store) -> None:
    rule = one('[[alert]]\nname = "idle"\nkind = "gpu_idle"\nusd_per_hour = 1')
    assert run(store, rule).summary == "no GPU samples in 1h"
    samples = tuple(
        GpuSample(
            source="nvml",
            device=f"gpu{d}",
            ts=NOW - timedelta(minutes=m),
            interval_s=60,
            cost_nano=usd_to_nano(Decimal("0.05")),
            idle_cost_nano=usd_to_nano(Decimal("0.025")),
        )
        for m in range(60)
        for d in range(2)
    )
    store.write_batch(Batch(gpu=samples))
    (finding,) = run(store, rule).findings
    assert finding.value == 3.0
    assert finding.summary == "idle GPUs burn $3.00/h over 1h"


def test_a_rule_that_fails_to_evaluate_is_unknown(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokentop.store import alert_queries

    def broken(*args: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(alert_queries, "spend", broken)
    rule = one('[[alert]]\nname = "b"\nkind = "budget"\nbudget_usd = 1')
    (result,) = evaluate(store, [rule], NOW)
    assert result.code == 3
    assert result.error == "cannot evaluate: RuntimeError: disk on fire"


def test_money_reads_naturally() -> None:
    assert usd(Decimal("212.4")) == "$212.40"
    assert usd(Decimal("1234567.891")) == "$1,234,567.89"
    assert usd(Decimal("0.0042")) == "$0.0042"
    assert usd(Decimal(0)) == "$0.00"


# The state machine, stored.


class Hooks:
    """A fake Alertmanager and webhook behind one ``httpx.MockTransport``."""

    def __init__(self) -> None:
        self.am: list[list[dict[str, Any]]] = []
        self.webhook: list[dict[str, Any]] = []
        self.am_status = 200
        self.webhook_status = 200

    def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path == "/api/v2/alerts":
            if self.am_status == 200:
                self.am.append(body)
            return httpx.Response(self.am_status, text="" if self.am_status == 200 else "boom")
        if self.webhook_status == 200:
            self.webhook.append(body)
        return httpx.Response(self.webhook_status, text="ok")

    def am_alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for batch in self.am for a in batch if a["labels"]["alertname"] == name]


BUDGET_RULES = """
[alerts]
alertmanager_url = "http://am.test:9093"
webhook_url = "http://hooks.test/T0/B0/s3cr3t"
evaluate_every_s = 30
resend_s = 60
instance = "box-1"
labels = { team = "ml" }

[[alert]]
name = "daily-budget"
kind = "budget"
"""


def engine(
    store: Store, clock: Clock, hooks: Hooks, text: str = BUDGET_RULES, **top: Any
) -> AlertEngine:
    config = rules(text, **{"budget_daily_usd": 1, **top})
    client = httpx.AsyncClient(transport=httpx.MockTransport(hooks.handler))
    return AlertEngine(store, config, clock=clock, client=client)


async def test_one_message_per_transition_never_one_per_poll(store: Store) -> None:
    clock, hooks = Clock(NOON), Hooks()
    e = engine(store, clock, hooks)
    write(store, bucket(NOON - timedelta(minutes=5), cost="2"))
    for _ in range(10):
        await e.tick()
        clock.advance(30)
    (message,) = hooks.webhook
    assert message["status"] == "firing" and message["severity"] == "critical"
    assert message["text"] == (
        "[FIRING:critical] daily-budget on box-1: $2.00 of $1.00 today (200%), burn $2.00/h"
    )
    # Firing alerts are re-sent to Alertmanager every resend_s (60 s), not every evaluation.
    sent = hooks.am_alerts("daily-budget")
    assert len(sent) == 5
    first = sent[0]
    assert first["labels"] == {
        "alertname": "daily-budget",
        "severity": "critical",
        "rule_kind": "budget",
        "instance": "box-1",
        "team": "ml",
    }
    assert first["annotations"]["summary"] == "$2.00 of $1.00 today (200%), burn $2.00/h"
    assert first["startsAt"] == "2025-12-31T12:00:00Z"
    assert first["endsAt"] == "2025-12-31T12:04:00Z"  # 4 x max(resend_s, evaluate_every_s)
    # Each re-send moves endsAt on, before it lapses.
    ends = [datetime.fromisoformat(a["endsAt"]) for a in sent]
    assert all(b > a for a, b in itertools.pairwise(ends))
    assert all(b - a < timedelta(minutes=4) for a, b in itertools.pairwise(ends))
    await e.aclose()


async def test_resolution_is_sent_once_with_its_end(store: Store, db_path: Path) -> None:
    clock, hooks = Clock(NOW), Hooks()
    write(store, bucket(NOW - timedelta(minutes=5), cost="2"))
    e = engine(store, clock, hooks)
    await e.tick()
    # The day turns over: today's spend is $0, the alert resolves.
    clock.advance(60)
    await e.tick()
    clock.advance(30)
    await e.tick()
    assert [m["status"] for m in hooks.webhook] == ["firing", "resolved"]
    resolved = hooks.webhook[1]
    assert resolved["text"].startswith("[RESOLVED] daily-budget on box-1 after 60s: $0.00 of $1.00")
    assert resolved["endsAt"] == "2026-01-01T00:00:30Z"
    last = hooks.am_alerts("daily-budget")[-1]
    assert last["endsAt"] == "2026-01-01T00:00:30Z"
    assert len(hooks.am_alerts("daily-budget")) == 2  # the firing, then its resolution
    assert alert_store.states(store) == []  # told Alertmanager: the row is done
    (episode,) = alert_store.history(store)
    assert episode.fired_at == NOW and episode.resolved_at == NOW + timedelta(seconds=60)
    assert episode.value == 200.0 and episode.severity == "critical"
    # The webhook's secret URL is in the config, never in the database.
    assert b"s3cr3t" not in await asyncio.to_thread(db_path.read_bytes)
    await e.aclose()


async def test_a_restart_neither_refires_nor_forgets(db_path: Path) -> None:
    clock, hooks = Clock(NOON), Hooks()
    first = Store(db_path)
    write(first, bucket(NOON - timedelta(minutes=5), cost="2"))
    e = engine(first, clock, hooks)
    await e.tick()
    await e.aclose()
    first.close()
    # A new process: the same alert still firing is no news.
    clock.advance(30)
    second = Store(db_path)
    e = engine(second, clock, hooks)
    await e.tick()
    assert [m["status"] for m in hooks.webhook] == ["firing"]
    (state,) = alert_store.states(second)
    assert state.state == "firing" and state.fired_at == NOON
    await e.aclose()
    second.close()
    # Restarted with the budget raised: resolved, once.
    clock.advance(30)
    third = Store(db_path)
    e = engine(third, clock, hooks, budget_daily_usd=100)
    await e.tick()
    await e.tick()
    assert [m["status"] for m in hooks.webhook] == ["firing", "resolved"]
    await e.aclose()
    third.close()


async def test_for_keeps_an_alert_pending_first(store: Store) -> None:
    clock, hooks = Clock(NOON), Hooks()
    e = engine(store, clock, hooks, BUDGET_RULES + 'for = "2m"\n')
    write(store, bucket(NOON - timedelta(minutes=5), cost="2"))
    await e.tick()
    (state,) = alert_store.states(store)
    assert state.state == "pending" and hooks.webhook == [] and hooks.am == []
    clock.advance(60)
    await e.tick()
    assert alert_store.states(store)[0].state == "pending"
    clock.advance(60)
    await e.tick()
    (state,) = alert_store.states(store)
    assert state.state == "firing" and state.active_since == NOON
    assert state.fired_at == NOON + timedelta(minutes=2)
    assert len(hooks.webhook) == 1
    await e.aclose()


def _finding(severity: str, value: float = 1.0) -> Finding:
    return Finding("", severity, value, f"{severity} figure")


def test_a_pending_alert_unwatched_for_long_starts_its_for_again() -> None:
    rule = AlertRule(name="r", kind="spike", for_s=300)
    result = RuleResult(rule, (_finding("warning"),))
    changes, _ = advance({}, [result], [rule], NOW, keep_resolved=False, gap_s=90)
    (pending,) = changes.upserts
    later = NOW + timedelta(minutes=10)  # the collector was stopped in between
    changes, transitions = advance(
        {("r", ""): pending}, [result], [rule], later, keep_resolved=False, gap_s=90
    )
    assert transitions == [] and changes.upserts[0].active_since == later


def test_escalation_is_one_message_and_a_drop_is_none() -> None:
    rule = AlertRule(name="r", kind="budget", budget_usd=Decimal(1))
    states: dict[tuple[str, str], alert_store.AlertState] = {}
    events = []
    for i, severity in enumerate(["warning", "warning", "critical", "critical", "warning"]):
        now = NOW + timedelta(seconds=30 * i)
        changes, transitions = advance(
            states,
            [RuleResult(rule, (_finding(severity),))],
            [rule],
            now,
            keep_resolved=True,
            gap_s=90,
        )
        states = {(s.rule, s.key): s for s in changes.upserts}
        events += [(t.event, t.state.severity, t.previous_severity) for t in transitions]
    assert events == [("firing", "warning", ""), ("escalated", "critical", "warning")]


def test_removing_a_rule_resolves_its_alert() -> None:
    rule = AlertRule(name="r", kind="spike")
    changes, _ = advance(
        {}, [RuleResult(rule, (_finding("warning"),))], [rule], NOW, keep_resolved=False, gap_s=90
    )
    states = {(s.rule, s.key): s for s in changes.upserts}
    changes, transitions = advance(states, [], [], NOW, keep_resolved=False, gap_s=90)
    assert [(t.event, t.state.summary) for t in transitions] == [
        ("resolved", "rule removed from the config")
    ]
    assert changes.deletes == [("r", "")]


def test_a_rule_that_cannot_be_evaluated_keeps_its_state() -> None:
    rule = AlertRule(name="r", kind="spike")
    changes, _ = advance(
        {}, [RuleResult(rule, (_finding("warning"),))], [rule], NOW, keep_resolved=False, gap_s=90
    )
    states = {(s.rule, s.key): s for s in changes.upserts}
    changes, transitions = advance(
        states, [RuleResult(rule, error="db busy")], [rule], NOW, keep_resolved=False, gap_s=90
    )
    assert transitions == [] and not changes


async def test_escalation_resolves_the_old_label_set_in_alertmanager(store: Store) -> None:
    clock, hooks = Clock(NOON), Hooks()
    e = engine(store, clock, hooks)
    write(store, bucket(NOON - timedelta(minutes=5), cost="0.85"))
    await e.tick()
    write(store, bucket(NOON - timedelta(minutes=4), cost="0.50"))
    clock.advance(30)
    await e.tick()
    batches = [[(a["labels"]["severity"], a["endsAt"]) for a in batch] for batch in hooks.am]
    assert batches == [
        [("warning", "2025-12-31T12:04:00Z")],
        [("critical", "2025-12-31T12:04:30Z"), ("warning", "2025-12-31T12:00:30Z")],
    ]
    assert [(m["event"], m["severity"]) for m in hooks.webhook] == [
        ("firing", "warning"),
        ("escalated", "critical"),
    ]
    assert alert_store.history(store)[0].severity == "critical"
    await e.aclose()


async def test_alertmanager_down_is_retried(store: Store) -> None:
    clock, hooks = Clock(NOON), Hooks()
    hooks.am_status = 503
    e = engine(store, clock, hooks)
    write(store, bucket(NOON - timedelta(minutes=5), cost="2"))
    await e.tick()
    assert hooks.am == []
    hooks.am_status = 200
    clock.advance(30)  # under resend_s, but it never got through
    await e.tick()
    assert len(hooks.am_alerts("daily-budget")) == 1
    await e.aclose()


async def test_a_failed_webhook_is_retried_and_delivered_once(store: Store) -> None:
    clock, hooks = Clock(NOON), Hooks()
    hooks.webhook_status = 500
    e = engine(store, clock, hooks)
    write(store, bucket(NOON - timedelta(minutes=5), cost="2"))
    await e.tick()
    (waiting,) = alert_store.outbox(store)
    assert waiting.attempts == 1 and waiting.last_error == "HTTP 500"
    hooks.webhook_status = 200
    clock.advance(10)  # before its retry time: not yet
    await e.tick()
    assert hooks.webhook == []
    clock.advance(30)
    await e.tick()
    clock.advance(30)
    await e.tick()
    assert [m["status"] for m in hooks.webhook] == ["firing"]
    assert alert_store.outbox(store) == []
    await e.aclose()


class EndlessReplies:
    """A local Alertmanager and webhook whose replies never end (until 200 MB): no
    ``Content-Length``, the body runs until the client hangs up."""

    def __init__(self, am_status: int) -> None:
        self.posts: list[str] = []
        self.written: list[int] = []
        self.finished = threading.Semaphore(0)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                fake.posts.append(self.path)
                status = am_status if self.path == "/api/v2/alerts" else 200
                written = 0
                try:
                    self.send_response(status)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    while written < 200_000_000:
                        self.wfile.write(b"x" * 65536)
                        written += 65536
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading, as it should
                fake.written.append(written)
                fake.finished.release()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("am_status", [200, 503])
async def test_endless_replies_are_read_no_further_than_a_status_needs(
    store: Store, am_status: int, caplog: pytest.LogCaptureFixture
) -> None:
    fake = EndlessReplies(am_status)
    text = BUDGET_RULES.replace("http://am.test:9093", fake.url).replace(
        "http://hooks.test/T0/B0/s3cr3t", fake.url + "/hook"
    )
    config = rules(text, budget_daily_usd=1)
    e = AlertEngine(store, config, clock=Clock(NOON), client=httpx.AsyncClient(timeout=30))
    write(store, bucket(NOON - timedelta(minutes=5), cost="2"))
    try:
        with caplog.at_level("WARNING"):
            await e.tick()
    finally:
        await e.aclose()
        fake.close()
    assert sorted(fake.posts) == ["/api/v2/alerts", "/hook"]
    for _ in fake.posts:
        assert fake.finished.acquire(timeout=60)
    # The client hung up long before the server ran out of body to send.
    assert all(n < 200_000_000 for n in fake.written)
    # Delivered: the webhook's 200 counts, however long its reply.
    assert alert_store.outbox(store) == []
    if am_status == 503:
        assert "answered 503: (too long)" in caplog.text


def test_webhook_text_escapes_outside_text() -> None:
    state = alert_store.AlertState(
        rule="u",
        key="model=x",
        kind="unpriced",
        state="firing",
        severity="warning",
        value=1.0,
        summary="<!channel> & \x1b[2Jmodel: 5 tokens",
        description="",
        labels={"model": "<!channel>"},
        active_since=NOW,
        updated_at=NOW,
        fired_at=NOW,
    )
    from tokentop.collectors.alerts import Transition

    body = webhook_body(Transition("firing", state), "box")
    assert body["text"] == (
        "[FIRING:warning] u on box: &lt;!channel&gt; &amp; \\x1b[2Jmodel: 5 tokens"
    )


# The runner runs the engine beside the polls.


class Ticker:
    name = "ticker"
    interval_s = 0.05

    def __init__(self) -> None:
        self.ticks = 0
        self.closed = 0

    async def tick(self) -> None:
        self.ticks += 1

    async def aclose(self) -> None:
        self.closed += 1


async def test_runner_ticks_periodic_work_after_polls(store: Store) -> None:
    ticker = Ticker()
    runner = Runner(store, [FakeCollector()], PriceBook(), clock=Clock(NOW), periodic=[ticker])
    await runner.run_once_and_close()
    assert ticker.ticks == 1 and ticker.closed == 1


async def test_runner_runs_periodic_work_until_stopped(store: Store) -> None:
    ticker = Ticker()
    collector = FakeCollector(interval_s=0.05)
    runner = Runner(store, [collector], PriceBook(), periodic=[ticker])
    task = asyncio.create_task(runner.run())
    for _ in range(400):
        if ticker.ticks >= 3:
            break
        await asyncio.sleep(0.01)
    runner.stop()
    await task
    assert ticker.ticks >= 3 and ticker.closed == 1
    assert collector.polls >= 1


async def test_a_source_outage_fires_and_clears_per_source(store: Store) -> None:
    clock, hooks = Clock(NOON), Hooks()
    text = BUDGET_RULES.replace(
        'name = "daily-budget"\nkind = "budget"', 'name = "down"\nkind = "source_down"'
    )
    e = engine(store, clock, hooks, text)

    def health(state: str) -> None:
        store.record_health(
            SourceHealth(
                name="openai",
                kind="openai",
                state=state,
                last_success=clock.now,
                last_error="HTTP 401: invalid admin key" if state != "ok" else "",
            ),
            now=clock.now,
        )

    health("auth failed")
    await e.tick()
    clock.advance(30)
    health("ok")
    await e.tick()
    assert [m["text"] for m in hooks.webhook] == [
        "[FIRING:warning] down on box-1: source openai auth failed for 0s: HTTP 401: invalid"
        " admin key",
        "[RESOLVED] down on box-1 after 30s: openai: cleared (1 source(s) up)",
    ]
    assert hooks.am_alerts("down")[0]["labels"]["source"] == "openai"
    await e.aclose()
