"""The ``[alerts]`` table and the ``[[alert]]`` rules of the config file, typed and validated.

::

    [alerts]
    alertmanager_url = "http://127.0.0.1:9093"   # or a list; POST {url}/api/v2/alerts
    webhook_url_env = "TOKENTOP_WEBHOOK_URL"     # or webhook_url = "https://hooks.example/..."
    evaluate_every_s = 30

    [[alert]]
    name = "daily-budget"
    kind = "budget"
    period = "day"
    warn_pct = 80
    crit_pct = 100
    for = "0s"

Every setting but a rule's ``name`` and ``kind`` has a default (the field docstrings below say
which). A bad value is refused with a one-line message naming it, as the rest of the config is.
This module imports nothing of the project: :mod:`tokentop.collectors.config` turns
:class:`AlertConfigError` into its ``ConfigError``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

KINDS: tuple[str, ...] = (
    "budget",
    "spike",
    "runway",
    "source_down",
    "unpriced",
    "new_model",
    "cost_per_request",
    "gpu_idle",
)
"""What a rule can watch."""
SEVERITIES: tuple[str, ...] = ("warning", "critical")
USAGE_SCOPES: tuple[str, ...] = ("provider", "model", "project", "api_key", "tag")
"""Scope filters of the rules that read usage: a substring of the dimension (case-sensitive)."""
GROUPS: tuple[str, ...] = ("model", "project", "api_key", "tag")
"""What ``cost_per_request`` can compare one group at a time by (``by``)."""
DIMENSIONS: tuple[str, ...] = ("model", "api_key", "project")
"""What ``new_model`` watches for a first appearance (``dimension``)."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_LABEL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class AlertConfigError(ValueError):
    """A bad alert setting; the message is one line naming the value."""


@dataclass(frozen=True, slots=True)
class Scope:
    """Which usage (or which sources) a rule looks at; ``""`` matches everything."""

    provider: str = ""
    model: str = ""
    project: str = ""
    api_key: str = ""
    tag: str = ""
    source: str = ""
    """``source_down`` only: a substring of the source name."""

    def labels(self) -> dict[str, str]:
        """The filters that are set, as Alertmanager labels."""
        return {k: v for k in (*USAGE_SCOPES, "source") if (v := getattr(self, k))}


@dataclass(frozen=True, slots=True)
class AlertRule:
    """One ``[[alert]]`` table. Fields a kind does not use keep their defaults."""

    name: str
    """Unique; the Alertmanager ``alertname`` and the name ``tokentop check --rule`` takes."""
    kind: str
    """One of :data:`KINDS`."""
    for_s: float = 0.0
    """``for``: how long the condition must hold before the alert fires (pending until then)."""
    severity: str = "warning"
    """Severity of the kinds with one threshold (all but ``budget``)."""
    scope: Scope = field(default_factory=Scope)
    period: str = "day"
    """``budget`` and ``runway``: ``day`` or ``month`` (UTC)."""
    budget_usd: Decimal | None = None
    """``budget`` and ``runway``: the budget; defaults to ``budget_daily_usd`` or
    ``budget_monthly_usd`` by ``period``."""
    basis: str = "spent"
    """``budget``: ``spent`` (so far) or ``projected`` (to the end of the period at the current
    burn)."""
    warn_pct: Decimal = Decimal(80)
    """``budget``: share of the budget at which it warns."""
    crit_pct: Decimal = Decimal(100)
    """``budget``: share of the budget at which it is critical."""
    window_s: float = 3600.0
    """``window``: what the figure is measured over. Defaults: ``spike`` 15m, ``runway`` (its
    burn rate) 1h, ``unpriced`` 1h, ``new_model`` 1h, ``cost_per_request`` 1h, ``gpu_idle`` 1h."""
    factor: Decimal = Decimal(3)
    """``spike``: burn over the window at least this many times the baseline."""
    min_usd_per_hour: Decimal = Decimal(1)
    """``spike``: and at least this burn, so that cents do not page anyone."""
    weeks: int = 4
    """``spike``: the baseline is the same time of the week over this many weeks when the
    database holds that much history, else the trailing 24 hours."""
    hours: float = 4.0
    """``runway``: fires when the budget will be spent within this many hours (and before the
    period ends) at the current burn."""
    stale_after_s: float = 600.0
    """``source_down``: a source with no successful poll for this long is down (failing sources
    are down at once)."""
    min_tokens: int = 1
    """``unpriced``: tokens of an unpriced model in the window that make it fire."""
    dimension: str = "model"
    """``new_model``: ``model``, ``api_key`` or ``project``."""
    pct: Decimal = Decimal(30)
    """``cost_per_request``: rise of $/request against the previous window, in percent."""
    min_requests: int = 100
    """``cost_per_request``: requests needed in both windows to compare them."""
    by: str = ""
    """``cost_per_request``: ``""`` (the scope as a whole) or one of :data:`GROUPS` (one alert
    per group)."""
    usd_per_hour: Decimal = Decimal(1)
    """``gpu_idle``: idle burn above this fires."""


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    """The ``[alerts]`` table and the rules."""

    alertmanager_urls: tuple[str, ...] = ()
    """``alertmanager_url``: one or a list; alerts are POSTed to ``{url}/api/v2/alerts``."""
    webhook_urls: tuple[str, ...] = ()
    """``webhook_url`` (one or a list) and ``webhook_url_env`` (the environment variable holding
    one: a Slack URL is a secret). A JSON POST with a Slack-compatible ``text``, one per
    transition."""
    webhook_url_env: str = ""
    evaluate_every_s: float = 30.0
    """Seconds between evaluations of every rule in the collector."""
    resend_s: float = 60.0
    """Firing alerts are sent to Alertmanager again this often; each says it ends (``endsAt``)
    four times ``max(resend_s, evaluate_every_s)`` later unless sent again, as Prometheus does."""
    timeout_s: float = 10.0
    """Timeout of one POST."""
    instance: str = ""
    """The ``instance`` label; the host name when empty."""
    labels: dict[str, str] = field(default_factory=dict)
    """``[alerts.labels]``: added to every alert (e.g. ``team = "ml-platform"``)."""
    rules: tuple[AlertRule, ...] = ()
    """The ``[[alert]]`` tables, in file order."""

    def rule(self, name: str) -> AlertRule | None:
        """The rule called ``name``."""
        return next((r for r in self.rules if r.name == name), None)

    def webhooks(self, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
        """Every webhook URL: the file's, then the environment variable's (read now)."""
        env = os.environ if environ is None else environ
        extra = env.get(self.webhook_url_env, "") if self.webhook_url_env else ""
        return self.webhook_urls + ((extra,) if extra else ())


_COMMON = {"name", "kind", "for", "severity"}
_ALLOWED: dict[str, set[str]] = {
    "budget": {"period", "budget_usd", "basis", "warn_pct", "crit_pct", *USAGE_SCOPES},
    "spike": {"window", "factor", "min_usd_per_hour", "weeks", *USAGE_SCOPES},
    "runway": {"period", "budget_usd", "hours", "window", *USAGE_SCOPES},
    "source_down": {"source", "stale_after"},
    "unpriced": {"window", "min_tokens", *USAGE_SCOPES},
    "new_model": {"dimension", "window", *USAGE_SCOPES},
    "cost_per_request": {"window", "pct", "min_requests", "by", *USAGE_SCOPES},
    "gpu_idle": {"usd_per_hour", "window"},
}
_WINDOW_DEFAULT = {"spike": 900.0}


def parse_duration(value: Any, name: str, where: str) -> float:
    """Seconds from a number of seconds or a Prometheus-style duration: ``90s``, ``5m``,
    ``1h30m``, ``2d``."""
    if isinstance(value, bool):
        raise AlertConfigError(f"{where}: {name} must be a duration like '5m', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION.match(value.strip()):
        seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(value.strip()))
    else:
        raise AlertConfigError(f"{where}: {name} must be a duration like '5m', got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise AlertConfigError(f"{where}: {name} must be a duration like '5m', got {value!r}")
    return seconds


def _number(value: Any, name: str, where: str, *, positive: bool = False) -> Decimal:
    bad = f"{where}: {name} must be a {'positive' if positive else 'non-negative'} number"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise AlertConfigError(f"{bad}, got {value!r}")
    try:
        result = Decimal(str(value))
    except InvalidOperation:
        raise AlertConfigError(f"{bad}, got {value!r}") from None
    if not result.is_finite() or result < 0 or (positive and result == 0):
        raise AlertConfigError(f"{bad}, got {value!r}")
    return result


def _count(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AlertConfigError(f"{where}: {name} must be a whole number >= 0, got {value!r}")
    return value


def _seconds(value: Any, name: str, where: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise AlertConfigError(f"{where}: {name} must be a positive number, got {value!r}")
    return float(value)


def _choice(value: Any, name: str, where: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise AlertConfigError(
            f"{where}: {name} must be one of {', '.join(choices)}, got {value!r}"
        )
    return value


def _text(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise AlertConfigError(f"{where}: {name} must be a string, got {value!r}")
    return value


def _urls(value: Any, name: str, where: str, *, show: bool = True) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, str) or not item.startswith(("http://", "https://")):
            # A webhook URL holds its secret in the path: name the setting, not the URL.
            got = repr(item) if show or not isinstance(item, str) else repr(item[:12] + "...")
            raise AlertConfigError(f"{where}: {name} must be an http(s) URL, got {got}")
    return tuple(items)


def parse_alerts(
    table: Any,
    rules: Any,
    where: str,
    *,
    budget_daily: Decimal | None = None,
    budget_monthly: Decimal | None = None,
) -> AlertsConfig:
    """Validate the ``[alerts]`` table and the ``[[alert]]`` array.

    Args:
        table: the ``alerts`` value of the document (``{}`` when absent).
        rules: the ``alert`` value (``[]`` when absent; one table is taken as a list of one).
        where: the config file's path, for messages.
        budget_daily: ``budget_daily_usd``, the default budget of ``period = "day"`` rules.
        budget_monthly: ``budget_monthly_usd``, likewise for ``"month"``.
    """
    if not isinstance(table, dict):
        raise AlertConfigError(f"{where}: alerts must be a table, got {table!r}")
    allowed = {
        "alertmanager_url",
        "webhook_url",
        "webhook_url_env",
        "evaluate_every_s",
        "resend_s",
        "timeout_s",
        "instance",
        "labels",
    }
    for key in table:
        if key not in allowed:
            raise AlertConfigError(f"{where}: unknown setting {'alerts.' + key!r}")
    labels = table.get("labels", {})
    if not isinstance(labels, dict):
        raise AlertConfigError(f"{where}: alerts.labels must be a table, got {labels!r}")
    for key, value in labels.items():
        if not _LABEL.match(key) or not isinstance(value, str):
            raise AlertConfigError(
                f"{where}: alerts.labels.{key} must be a label name = a string, got {value!r}"
            )
    env = table.get("webhook_url_env", "")
    if not isinstance(env, str) or (env and not _LABEL.match(env)):
        raise AlertConfigError(
            f"{where}: alerts.webhook_url_env must name an environment variable, got {env!r}"
        )
    if isinstance(rules, dict):
        rules = [rules]
    if not isinstance(rules, list) or not all(isinstance(t, dict) for t in rules):
        raise AlertConfigError(f"{where}: alert must be an array of tables, got {rules!r}")
    parsed: list[AlertRule] = []
    for i, raw in enumerate(rules):
        rule = _rule(raw, f"alert[{i}]", where, budget_daily, budget_monthly)
        if any(r.name == rule.name for r in parsed):
            raise AlertConfigError(f"{where}: alert[{i}].name {rule.name!r} is used twice")
        parsed.append(rule)
    return AlertsConfig(
        alertmanager_urls=_urls(
            table.get("alertmanager_url", []), "alerts.alertmanager_url", where
        ),
        webhook_urls=_urls(table.get("webhook_url", []), "alerts.webhook_url", where, show=False),
        webhook_url_env=env,
        evaluate_every_s=_seconds(
            table.get("evaluate_every_s", 30), "alerts.evaluate_every_s", where
        ),
        resend_s=_seconds(table.get("resend_s", 60), "alerts.resend_s", where),
        timeout_s=_seconds(table.get("timeout_s", 10), "alerts.timeout_s", where),
        instance=_text(table.get("instance", ""), "alerts.instance", where),
        labels=dict(labels),
        rules=tuple(parsed),
    )


def _rule(
    raw: dict[str, Any],
    at: str,
    where: str,
    budget_daily: Decimal | None,
    budget_monthly: Decimal | None,
) -> AlertRule:
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise AlertConfigError(
            f"{where}: {at}.name must be 1-63 letters, digits, '-', '_', '.' or ':', got {name!r}"
        )
    if "kind" not in raw:
        raise AlertConfigError(f"{where}: {at} ({name}) needs 'kind'")
    kind = _choice(raw["kind"], f"{at}.kind", where, KINDS)
    for key in raw:
        if key not in _COMMON and key not in _ALLOWED[kind]:
            raise AlertConfigError(f"{where}: unknown setting {at + '.' + key!r} for kind {kind}")
    if kind == "budget" and "severity" in raw:
        raise AlertConfigError(
            f"{where}: {at}.severity: a budget rule's severity comes from warn_pct and crit_pct"
        )

    def get(key: str, default: Any) -> Any:
        return raw.get(key, default)

    scope = Scope(
        **{k: _text(raw[k], f"{at}.{k}", where) for k in (*USAGE_SCOPES, "source") if k in raw}
    )
    period = _choice(get("period", "day"), f"{at}.period", where, ("day", "month"))
    budget = None
    if kind in ("budget", "runway"):
        if "budget_usd" in raw:
            budget = _number(raw["budget_usd"], f"{at}.budget_usd", where, positive=True)
        else:
            budget = budget_daily if period == "day" else budget_monthly
            if budget is None:
                setting = "budget_daily_usd" if period == "day" else "budget_monthly_usd"
                raise AlertConfigError(
                    f"{where}: {at} ({name}) needs budget_usd, or {setting} at the top of the file"
                )
            if budget <= 0:
                raise AlertConfigError(f"{where}: {at} ({name}) needs a budget above 0")
    warn = _number(get("warn_pct", 80), f"{at}.warn_pct", where)
    crit = _number(get("crit_pct", 100), f"{at}.crit_pct", where, positive=True)
    if warn > crit:
        raise AlertConfigError(
            f"{where}: {at}.warn_pct must not exceed crit_pct ({crit}), got {raw.get('warn_pct')!r}"
        )
    window = parse_duration(get("window", _WINDOW_DEFAULT.get(kind, 3600.0)), f"{at}.window", where)
    if window < 60:
        raise AlertConfigError(
            f"{where}: {at}.window must be at least one minute, got {raw.get('window')!r}"
        )
    weeks = _count(get("weeks", 4), f"{at}.weeks", where)
    if not 1 <= weeks <= 52:
        raise AlertConfigError(f"{where}: {at}.weeks must be between 1 and 52, got {weeks!r}")
    return AlertRule(
        name=name,
        kind=kind,
        for_s=parse_duration(get("for", 0), f"{at}.for", where),
        severity=_choice(get("severity", "warning"), f"{at}.severity", where, SEVERITIES),
        scope=scope,
        period=period,
        budget_usd=budget,
        basis=_choice(get("basis", "spent"), f"{at}.basis", where, ("spent", "projected")),
        warn_pct=warn,
        crit_pct=crit,
        window_s=window,
        factor=_number(get("factor", 3), f"{at}.factor", where, positive=True),
        min_usd_per_hour=_number(get("min_usd_per_hour", 1), f"{at}.min_usd_per_hour", where),
        weeks=weeks,
        hours=float(_number(get("hours", 4), f"{at}.hours", where, positive=True)),
        stale_after_s=parse_duration(get("stale_after", 600), f"{at}.stale_after", where),
        min_tokens=_count(get("min_tokens", 1), f"{at}.min_tokens", where),
        dimension=_choice(get("dimension", "model"), f"{at}.dimension", where, DIMENSIONS),
        pct=_number(get("pct", 30), f"{at}.pct", where),
        min_requests=_count(get("min_requests", 100), f"{at}.min_requests", where),
        by=_choice(get("by", ""), f"{at}.by", where, ("", *GROUPS)),
        usd_per_hour=_number(get("usd_per_hour", 1), f"{at}.usd_per_hour", where),
    )
