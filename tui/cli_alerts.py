"""Command-line parts of alerting: ``check`` and ``status``, and the collector's alert engine.

::

    tokentop check [--rule NAME] [--json] [--stale-after 15m]
    tokentop status [--format FMT] [--json] [--stale-after 10m]

``check`` follows the monitoring-plugin convention (Nagios, Icinga, Sensu, Checkmk): one line,
``STATUS - text | perfdata``, and the exit code 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN. A stale
database, no data and usage errors are UNKNOWN (exit 3, in ``check`` only). It evaluates the
rules once, read-only, and ignores their ``for`` (the monitoring system's retries play that
part); the collector's own state machine is in ``--json`` as ``stored``.

``status`` is one line for tmux, i3/sway, waybar and shell prompts. It reads the database with
the standard library only (:mod:`tokentop.store.status`) and the alerts as the collector last
evaluated them: no Textual, no price data.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from tokentop.store.text import clean

UNKNOWN = 3
_GLOBAL_WITH_VALUE = {
    "--db",
    "--config",
    "--window",
    "--prometheus",
    "--export-dir",
    "--export-format",
}


def _duration(value: str) -> float:
    from tokentop.collectors.alert_config import AlertConfigError, parse_duration

    try:
        seconds = parse_duration(value, "duration", "")
    except AlertConfigError:
        raise argparse.ArgumentTypeError(f"expected a duration like 15m, got {value!r}") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration like 15m, got {value!r}")
    return seconds


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``check`` and ``status`` to the ``tokentop`` parser."""
    check = sub.add_parser(
        "check",
        parents=[common],
        help="evaluate the alert rules once (monitoring-plugin output, exit 0-3)",
        description="Evaluate the [[alert]] rules once against the database and print one line "
        "in the monitoring-plugin convention; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.",
    )
    check.add_argument("--rule", metavar="NAME", help="check this rule only")
    check.add_argument("--json", action="store_true", help="every rule's state, as JSON")
    check.add_argument(
        "--stale-after",
        type=_duration,
        default=900.0,
        metavar="DURATION",
        help="UNKNOWN when no source has polled successfully for this long (default 15m)",
    )
    status = sub.add_parser(
        "status",
        parents=[common],
        help="one line for status bars: burn, today vs budget, alerts",
        description="One line for tmux, i3/sway, waybar or a shell prompt. --format takes "
        "named fields: " + ", ".join(f"{{{f}}}" for f in FIELDS) + ".",
    )
    status.add_argument("--format", metavar="FMT", help="a line with {named} fields")
    status.add_argument("--json", action="store_true", help="every field, as JSON")
    status.add_argument(
        "--stale-after",
        type=_duration,
        default=600.0,
        metavar="DURATION",
        help="mark the line stale when no source has polled for this long (default 10m)",
    )


def is_check(argv: Sequence[str] | None) -> bool:
    """Whether a command line runs ``check`` (so that its usage errors exit 3)."""
    args = list(sys.argv[1:] if argv is None else argv)
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in _GLOBAL_WITH_VALUE:
            skip = True
            continue
        if arg.startswith("-"):
            continue
        return arg == "check"
    return False


def check_usage_error(exc: Exception) -> int:
    """A bad flag or config for ``check``: UNKNOWN, on stdout as plugins report, exit 3."""
    print(f"UNKNOWN - {clean(exc)}")
    return UNKNOWN


# check


def _check(ctx: Any) -> int:
    from tokentop.collectors.alerts import STATUS_NAMES

    try:
        code, line, data = _run_check(ctx)
    except _Unknown as exc:
        code, line, data = UNKNOWN, f"UNKNOWN - {exc}", {"error": str(exc)}
    if ctx.args.json:
        data = {"status": STATUS_NAMES[code], "code": code, "line": line, **data}
        print(json.dumps(data, indent=2, default=str))
    else:
        print(line)
    return code


class _Unknown(Exception):
    """The check cannot tell (no database, stale data, unreadable file)."""


@dataclass
class _Checked:
    """The rules evaluated once, from the database or a fleet, and what the line reports."""

    now: datetime
    results: list[Any]
    today: Decimal
    burn: Decimal
    where: dict[str, Any]
    """Where the figures came from (``database`` or ``prometheus``) and the newest poll."""
    stored: list[dict[str, Any]] = field(default_factory=list)


def _rules(ctx: Any) -> list[Any]:
    config = ctx.config
    rules = list(config.alerts.rules)
    if ctx.args.rule is not None:
        rule = config.alerts.rule(ctx.args.rule)
        if rule is None:
            names = ", ".join(r.name for r in rules) or "none configured"
            raise _Unknown(f"--rule: no rule {clean(ctx.args.rule)!r} (rules: {clean(names)})")
        rules = [rule]
    return rules


def _run_check(ctx: Any) -> tuple[int, str, dict[str, Any]]:
    from tokentop.tui import cli_prometheus

    rules = _rules(ctx)
    url = cli_prometheus.prometheus_url(ctx)
    checked = _check_fleet(ctx, rules, url) if url else _check_store(ctx, rules)
    return _verdict(rules, checked)


def _check_store(ctx: Any, rules: list[Any]) -> _Checked:
    from tokentop.collectors.alerts import collector_sources, evaluate, finite, span
    from tokentop.collectors.base import utcnow
    from tokentop.collectors.sources import optional_sources
    from tokentop.store import alert_queries as aq
    from tokentop.store import alerts as alert_store
    from tokentop.store.db import Store, StoreError

    if not ctx.db_path.exists():
        raise _Unknown(f"no database at {clean(ctx.db_path)} (is `tokentop collect` running?)")
    try:
        store = Store(ctx.db_path, readonly=True)
    except (StoreError, OSError) as exc:
        raise _Unknown(f"cannot read {clean(ctx.db_path)}: {clean(exc)}") from None
    except Exception as exc:  # sqlite3.Error: not a database
        raise _Unknown(f"cannot read {clean(ctx.db_path)}: {clean(exc)}") from None
    try:
        now = utcnow()
        latest = aq.latest_poll(store)
        if latest is None:
            raise _Unknown("no data: no source has been polled (is `tokentop collect` running?)")
        age = (now - latest).total_seconds()
        if age > ctx.args.stale_after:
            raise _Unknown(
                f"database stale: the newest successful poll was {span(age)} ago"
                " (is `tokentop collect` running?)"
            )
        # The sources the collector runs, as it recorded them; without that, every source in
        # the database.
        results = evaluate(
            store,
            rules,
            now,
            sources=collector_sources(store),
            optional_sources=optional_sources(ctx.config, ctx.args.demo),
        )
        day_start, _ = aq.period_start(now, "day")
        today = aq.spend(store, day_start, now + timedelta(seconds=1), {})
        burn = aq.spend(store, now - timedelta(hours=1), now + timedelta(seconds=1), {}).cost
        stored = alert_store.states(store)
    finally:
        store.close()
    return _Checked(
        now=now,
        results=results,
        today=today.cost,
        burn=burn,
        where={"database": str(ctx.db_path), "newest_poll": latest.isoformat()},
        stored=[
            {
                "rule": s.rule,
                "key": s.key,
                "state": s.state,
                "severity": s.severity,
                "value": finite(s.value),
                "summary": clean(s.summary),
                "active_since": s.active_since.isoformat(),
                "fired_at": s.fired_at.isoformat() if s.fired_at else None,
            }
            for s in stored
        ],
    )


def _check_fleet(ctx: Any, rules: list[Any], url: str) -> _Checked:
    """The rules against a fleet's Prometheus (:mod:`tokentop.collectors.prom_check`). An
    unreachable server or a failed query is UNKNOWN; so is a rule whose figures Prometheus
    cannot give (the rule says why)."""
    from tokentop.collectors.alerts import evaluate_figures, span
    from tokentop.collectors.base import utcnow
    from tokentop.collectors.prom_check import PromFigures
    from tokentop.collectors.promql import PromError
    from tokentop.collectors.sources import optional_sources
    from tokentop.store import alert_queries as aq
    from tokentop.tui import cli_prometheus

    now = utcnow()
    source = cli_prometheus.open_source(ctx, url)
    try:
        figures = PromFigures(source, now)
        latest = figures.latest_poll()
        if latest is None:
            raise _Unknown(
                f"no data: no tokentop source in the last hour via Prometheus {clean(url)}"
            )
        age = (now - latest).total_seconds()
        if age > ctx.args.stale_after:
            raise _Unknown(
                f"fleet stale: the newest successful poll was {span(age)} ago"
                f" (via Prometheus {clean(url)})"
            )
        results = evaluate_figures(
            figures, rules, optional_sources=optional_sources(ctx.config, ctx.args.demo)
        )
        day_start, _ = aq.period_start(now, "day")
        today = figures.spend(day_start, figures.end, {}).cost
        burn = figures.burn(3600, {})
    except PromError as exc:
        raise _Unknown(f"Prometheus {clean(url)}: {clean(exc)}") from None
    finally:
        source.close()
    return _Checked(
        now=now,
        results=results,
        today=today,
        burn=burn,
        where={"prometheus": url, "newest_poll": latest.isoformat()},
    )


def _verdict(rules: list[Any], checked: _Checked) -> tuple[int, str, dict[str, Any]]:
    from tokentop.collectors.alerts import STATUS_NAMES, Perf, finite, worst

    results, today, burn = checked.results, checked.today, checked.burn
    code = worst(results)
    perf: list[Perf] = []
    labels: set[str] = set()
    for r in results:
        for p in r.perf:
            label = p.label if p.label not in labels else f"{r.rule.name}_{p.label}"
            labels.add(label)
            perf.append(Perf(label, p.value, p.warn, p.crit))
    if "today_usd" not in labels:
        perf.insert(0, Perf("today_usd", f"{today:.2f}"))
    if "burn_usd_per_h" not in labels:
        perf.append(Perf("burn_usd_per_h", f"{burn:.2f}"))
    if code == 0:
        if not rules:
            text = "no alert rules configured"
        elif len(results) == 1:
            text = results[0].line
        else:
            text = f"{len(results)} rules, none firing"
        text += f"; today {_usd(today)}, burn {_usd(burn)}/h" if len(results) != 1 else ""
    else:
        # Critical first, then rules that could not be evaluated, then warnings.
        bad = sorted((r for r in results if r.code), key=lambda r: {2: 0, 3: 1}.get(r.code, 2))
        text = "; ".join(r.line for r in bad)
    line = clean(f"{STATUS_NAMES[code]} - {text} | {' '.join(p.render() for p in perf)}")
    data = {
        "checked_at": checked.now.isoformat(),
        **checked.where,
        "rules": [
            {
                "name": r.rule.name,
                "kind": r.rule.kind,
                "status": STATUS_NAMES[r.code],
                "value": finite(r.value),
                "summary": r.line,
                "error": r.error or None,
                "findings": [
                    {
                        "key": f.key,
                        "severity": f.severity,
                        "value": finite(f.value),
                        "summary": f.summary,
                        "labels": f.labels,
                    }
                    for f in r.findings
                ],
                "perfdata": [p.render() for p in r.perf],
            }
            for r in results
        ],
        "stored": checked.stored,
    }
    return code, line, data


def _usd(value: Decimal) -> str:
    return f"${value:,.2f}"


# status


FIELDS: dict[str, str] = {
    "burn": "burn over the last 15 minutes, e.g. $31.20/h",
    "burn_1h": "burn over the last hour",
    "burn_usd_per_h": "the 15-minute burn as a number",
    "today": "spend today (UTC), e.g. $212",
    "today_usd": "today's spend as a number",
    "budget": "the daily budget, e.g. $200 (empty without one)",
    "budget_pct": "today's share of the daily budget, e.g. 106%",
    "month": "spend this month (UTC)",
    "month_usd": "this month's spend as a number",
    "month_budget_pct": "this month's share of the monthly budget",
    "alerts": "number of firing alerts",
    "alerts_text": "e.g. '1 alert' (empty when none)",
    "critical": "number of critical alerts firing",
    "firing": "names of the firing alerts, comma-separated",
    "stale": "e.g. 'stale 12m' when no source has polled lately (empty when fresh)",
    "age_s": "seconds since the newest successful poll",
    "unpriced": "e.g. '1.2M unpriced tokens' today (empty when none)",
}
"""Named fields of ``--format``."""


def _short_usd(value: Decimal) -> str:
    return f"${value:,.0f}" if abs(value) >= 100 else f"${value:,.2f}"


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def status_fields(
    figures: Any, budget_daily: Decimal | None, budget_monthly: Decimal | None, stale_after_s: float
) -> dict[str, str]:
    """Every ``--format`` field, as text."""
    age = figures.age_s()
    stale = age is None or age > stale_after_s
    firing = figures.firing
    n = len(firing)
    pct = f"{figures.today / budget_daily * 100:.0f}%" if budget_daily else ""
    month_pct = f"{figures.month / budget_monthly * 100:.0f}%" if budget_monthly else ""
    tokens = figures.unpriced_tokens_today
    return {
        "burn": f"{_usd(figures.burn_15m)}/h",
        "burn_1h": f"{_usd(figures.burn_60m)}/h",
        "burn_usd_per_h": f"{figures.burn_15m:.2f}",
        "today": _short_usd(figures.today),
        "today_usd": f"{figures.today:.2f}",
        "budget": _short_usd(budget_daily) if budget_daily else "",
        "budget_pct": pct,
        "month": _short_usd(figures.month),
        "month_usd": f"{figures.month:.2f}",
        "month_budget_pct": month_pct,
        "alerts": str(n),
        "alerts_text": f"{n} alert{'s' if n != 1 else ''}" if n else "",
        "critical": str(sum(1 for _, sev in firing if sev == "critical")),
        "firing": ",".join(clean(rule) for rule, _ in firing),
        "stale": ("stale " + (_age(age) if age is not None else "never polled")) if stale else "",
        "age_s": "" if age is None else str(int(age)),
        "unpriced": f"{tokens:,} unpriced tokens" if tokens else "",
    }


def default_line(fields: dict[str, str]) -> str:
    """``$31.20/h · today $212 (106%) · 1 alert``; stale, the burn is unknown, not $0."""
    today = f"today {fields['today']}" + (
        f" ({fields['budget_pct']})" if fields["budget_pct"] else ""
    )
    parts = [fields["stale"] or fields["burn"], today, fields["alerts_text"]]
    return " · ".join(p for p in parts if p)


class _Fields(dict[str, str]):
    def __missing__(self, key: str) -> str:
        from tokentop.tui.cli import UsageError

        raise UsageError(f"--format: unknown field {{{clean(key)}}} (fields: {', '.join(FIELDS)})")


def _status(ctx: Any) -> int:
    from tokentop.collectors.base import utcnow
    from tokentop.store.status import read_status
    from tokentop.tui.cli import FAILURE, UsageError

    fmt = ctx.args.format
    if fmt is not None and ctx.args.json:
        raise UsageError("status: --format and --json do not go together")
    from tokentop.tui import cli_prometheus

    url = cli_prometheus.prometheus_url(ctx)
    if url:
        figures = cli_prometheus.fleet_status(ctx, url)
        if isinstance(figures, str):  # the fleet cannot be read: the line says so, never $0
            print(json.dumps({"error": figures, "prometheus": url}) if ctx.args.json else figures)
            return FAILURE
    elif not ctx.db_path.exists():
        raise UsageError(f"no database at {ctx.db_path} (run `tokentop collect` first, or --db)")
    else:
        import sqlite3

        try:
            figures = read_status(ctx.db_path, utcnow())
        except sqlite3.Error as exc:
            print(
                f"tokentop: error: cannot read {clean(ctx.db_path)}: {clean(exc)}",
                file=sys.stderr,
            )
            return FAILURE
    fields = status_fields(
        figures, ctx.config.budget_daily_usd, ctx.config.budget_monthly_usd, ctx.args.stale_after
    )
    if ctx.args.json:
        print(json.dumps(fields))
        return 0
    if fmt is None:
        line = default_line(fields)
    else:
        try:
            line = fmt.format_map(_Fields(fields))
        except (ValueError, IndexError, AttributeError) as exc:
            raise UsageError(f"--format: cannot use {fmt!r}: {exc}") from None
    print(" ".join(line.splitlines()))
    return 0


# The collector's engine.


def alert_tasks(config: Any, store: Any, collectors: Sequence[Any], demo: bool) -> list[Any]:
    """The runner's periodic tasks for the configured rules: the alert engine, or nothing."""
    if not config.alerts.rules:
        return []
    from tokentop.collectors.alerts import build_engine
    from tokentop.collectors.sources import optional_sources

    engine = build_engine(
        store,
        config.alerts,
        sources={c.name for c in collectors},
        optional_sources=optional_sources(config, demo),
    )
    return [engine] if engine is not None else []


HANDLERS: dict[str, Callable[[Any], int]] = {"check": _check, "status": _status}
