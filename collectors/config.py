"""The TOML configuration: one typed model, validated with one-line errors that name the value.

The file is optional. Its path comes from ``--config`` or ``TOKENTOP_CONFIG``, else the platform's
user config folder. Secrets are never stored in it: a provider section names the environment
variable that holds the key.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import platformdirs

from tokentop.collectors.alert_config import AlertConfigError, AlertsConfig, parse_alerts
from tokentop.collectors.metrics_config import (
    MetricsConfig,
    MetricsConfigError,
    PrometheusConfig,
    parse_metrics,
    parse_prometheus,
)
from tokentop.pricing.config import STANDARD_TIERS, ModelPriceOverride, PricingConfig, TierRule
from tokentop.pricing.gpu import GpuRate
from tokentop.store.retention_policy import Retention

APP = "tokentop"

PROVIDER_INTERVAL_MIN_S = 30.0
"""The shortest poll interval of a provider's admin API: it is rate limited, and its buckets are
whole minutes (Anthropic asks for no more than one poll a minute sustained)."""
LOCAL_INTERVAL_MIN_S = 0.2
"""The shortest poll interval of a local source (GPU, inference server, demo)."""
REFRESH_MIN_S = 0.1
"""The shortest refresh of the TUI's panes."""
PUE_MAX = Decimal(3)
"""A power usage effectiveness above this is a typo (real data centres are 1.1 to 2)."""
RETENTION_DAYS_MAX = 36500.0
"""The longest retention horizon, a century (its dates stay in range)."""
AMOUNT_MAX = Decimal(10**9)
"""The largest amount (dollars, a price, a budget) the config accepts: far above any real one,
and it keeps the exact arithmetic on it in range."""


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the value."""


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One provider's admin API source."""

    name: str
    enabled: bool | None = None
    """``None``: enabled when the key variable is set."""
    key_env: str = ""
    """Environment variable holding the admin key (the key itself never goes in the file)."""
    base_url: str = ""
    """Override of the API base URL (also ``TOKENTOP_<NAME>_BASE_URL``)."""
    interval_s: float = 60.0
    """Seconds between polls; Anthropic asks for no more than one a minute sustained."""
    backfill_hours: float = 24.0
    """History read on first start, at most 30 days."""
    costs: bool = True
    """Also poll the daily billed cost endpoint."""
    max_response_mb: float = 20.0
    """The largest response (MB, decoded) read from the API; a larger page fails the poll
    rather than the collector's memory."""

    @property
    def key(self) -> str:
        """The key from the environment, or ``""``."""
        return os.environ.get(self.key_env, "")


@dataclass(frozen=True, slots=True)
class InferenceEndpoint:
    """An inference server's Prometheus endpoint (``[[inference]]`` tables)."""

    url: str
    kind: str = ""
    """``vllm``, ``sglang``, ``tgi``, ``llamacpp``, ``triton``; detected when empty."""
    gpus: tuple[int, ...] = ()
    """GPU indices it runs on; empty means all."""
    name: str = ""
    max_response_mb: float = 20.0
    """The largest ``/metrics`` body a scrape reads (decoded, MB); a larger one fails it."""


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the config file can say. Every field has a default."""

    path: Path | None = None
    budget_daily_usd: Decimal | None = None
    """Daily budget for the Spend pane's bar and runway."""
    budget_monthly_usd: Decimal | None = None
    """Monthly budget."""
    refresh_s: float = 1.0
    """How often the panes re-query the store."""
    pricing: PricingConfig = field(default_factory=PricingConfig)
    openai: ProviderConfig = field(
        default_factory=lambda: ProviderConfig(name="openai", key_env="OPENAI_ADMIN_KEY")
    )
    anthropic: ProviderConfig = field(
        default_factory=lambda: ProviderConfig(name="anthropic", key_env="ANTHROPIC_ADMIN_KEY")
    )
    gpu_rates: tuple[GpuRate, ...] = ()
    nvml: bool | None = None
    """``None``: try NVML and say plainly when it is missing."""
    gpu_interval_s: float = 5.0
    inference: tuple[InferenceEndpoint, ...] = ()
    compare_to: str = "gpt-4o-mini"
    """API model whose price the GPU pane compares self-hosting with."""
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    """``[alerts]`` (where alerts go) and the ``[[alert]]`` rules: see :mod:`.alert_config`."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """``[metrics]``: what ``collect`` and ``proxy`` expose on ``/metrics``."""
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)
    """``[prometheus]``: a Prometheus server to read the fleet from (see :mod:`.metrics_config`)."""
    retention: Retention = field(default_factory=Retention)
    """``[retention]``: ``minutes_days`` of one-minute data (default 35), ``hours_days`` of
    hourly (default 400), daily forever; the collector compacts older data."""


def default_config_path() -> Path:
    """``TOKENTOP_CONFIG`` or the platform's user config folder."""
    env = os.environ.get("TOKENTOP_CONFIG")
    if env:
        return Path(env)
    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def default_db_path(demo: bool = False) -> Path:
    """``TOKENTOP_DB`` (not for the demo) or the platform's user data folder."""
    env = os.environ.get("TOKENTOP_DB")
    if env and not demo:
        return Path(env)
    name = "demo.db" if demo else "tokentop.db"
    return Path(platformdirs.user_data_dir(APP)) / name


def load_config(path: Path | None, *, explicit: bool = False) -> Config:
    """Read and validate the config file.

    A missing file gives the defaults unless it was named explicitly (``--config`` or
    ``TOKENTOP_CONFIG``), which is an error.
    """
    if path is None:
        path = default_config_path()
        explicit = explicit or "TOKENTOP_CONFIG" in os.environ
    if not path.exists():
        if explicit:
            raise ConfigError(f"config file not found: {path}")
        return Config()
    import tomllib  # here: a missing file (the common case of `tokentop status`) needs no parser

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    return parse_config(raw, path)


def parse_config(raw: dict[str, Any], path: Path | None = None) -> Config:
    """Validate a parsed TOML document into a :class:`Config`."""
    where = str(path) if path else "config"
    known = {
        "budget_daily_usd",
        "budget_monthly_usd",
        "refresh_s",
        "pricing",
        "openai",
        "anthropic",
        "gpu",
        "nvml",
        "gpu_interval_s",
        "inference",
        "compare_to",
        "alerts",
        "alert",
        "metrics",
        "prometheus",
        "retention",
    }
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}: unknown setting {key!r}")
    return Config(
        path=path,
        budget_daily_usd=_money(raw, "budget_daily_usd", where),
        budget_monthly_usd=_money(raw, "budget_monthly_usd", where),
        refresh_s=_interval(raw, "refresh_s", where, 1.0, REFRESH_MIN_S),
        pricing=_pricing(raw.get("pricing", {}), where),
        openai=_provider(raw.get("openai", {}), "openai", "OPENAI_ADMIN_KEY", where),
        anthropic=_provider(raw.get("anthropic", {}), "anthropic", "ANTHROPIC_ADMIN_KEY", where),
        gpu_rates=tuple(_gpu_rate(t, where) for t in _tables(raw, "gpu", where)),
        nvml=_opt_bool(raw, "nvml", where),
        gpu_interval_s=_interval(raw, "gpu_interval_s", where, 5.0, LOCAL_INTERVAL_MIN_S),
        inference=tuple(_endpoint(t, where) for t in _tables(raw, "inference", where)),
        compare_to=_str(raw, "compare_to", where, "gpt-4o-mini"),
        alerts=_alerts(raw, where),
        **_metrics(raw, where),
        retention=_retention(raw.get("retention", {}), where),
    )


def _tables(raw: dict[str, Any], key: str, where: str, name: str = "") -> list[dict[str, Any]]:
    value = raw.get(key, [])
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(
            f"{where}: {name or key} must be a table or an array of tables, got {value!r}"
        )
    return value


def _decimal(value: Any, name: str, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{where}: {name} must be a number, got {value!r}")
    try:
        result = Decimal(str(value))
    except InvalidOperation:
        raise ConfigError(f"{where}: {name} must be a number, got {value!r}") from None
    if not result.is_finite() or result < 0:
        raise ConfigError(f"{where}: {name} must be a non-negative number, got {value!r}")
    if result > AMOUNT_MAX:
        raise ConfigError(f"{where}: {name} must be at most {AMOUNT_MAX:,}, got {value!r}")
    return result


def _money(raw: dict[str, Any], key: str, where: str) -> Decimal | None:
    if key not in raw:
        return None
    return _decimal(raw[key], key, where)


def _known(raw: dict[str, Any], allowed: set[str], section: str, where: str) -> None:
    """Refuse settings a table does not have (a typo must not be silently ignored)."""
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown setting {section + '.' + key!r}")


def _positive(raw: dict[str, Any], key: str, where: str, default: float, prefix: str = "") -> float:
    if key not in raw:
        return default
    value = raw[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{where}: {prefix}{key} must be a positive number, got {value!r}")
    return float(value)


def _interval(
    raw: dict[str, Any], key: str, where: str, default: float, floor: float, prefix: str = ""
) -> float:
    """Seconds between two polls or refreshes, at least ``floor`` (a tiny interval would poll
    an API thousands of times a minute)."""
    value = _positive(raw, key, where, default, prefix)
    if value < floor:
        raise ConfigError(
            f"{where}: {prefix}{key} must be at least {floor:g} seconds, got {raw[key]!r}"
        )
    return value


def _str(raw: dict[str, Any], key: str, where: str, default: str, prefix: str = "") -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {prefix}{key} must be a string, got {value!r}")
    return value


def _opt_bool(raw: dict[str, Any], key: str, where: str, prefix: str = "") -> bool | None:
    if key not in raw:
        return None
    value = raw[key]
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {prefix}{key} must be true or false, got {value!r}")
    return value


def _date(value: Any, name: str, where: str) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ConfigError(f"{where}: {name} is not a date: {value!r}") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise ConfigError(f"{where}: {name} is not a date: {value!r}")


def _pricing(raw: Any, where: str) -> PricingConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: pricing must be a table, got {raw!r}")
    _known(raw, {"model", "discount", "tier"}, "pricing", where)
    models = []
    for i, table in enumerate(_tables(raw, "model", where)):
        name = f"pricing.model[{i}]"
        _known(
            table,
            {
                "provider",
                "model",
                "input_per_mtok",
                "output_per_mtok",
                "cache_read_per_mtok",
                "cache_write_per_mtok",
                "cache_write_1h_per_mtok",
                "web_search_per_k",
                "effective",
            },
            name,
            where,
        )
        for required in ("model", "input_per_mtok", "output_per_mtok"):
            if required not in table:
                raise ConfigError(f"{where}: {name} needs {required!r}")
        if not isinstance(table["model"], str) or not table["model"]:
            raise ConfigError(f"{where}: {name}.model must be a name, got {table['model']!r}")

        def opt(key: str, table: dict[str, Any] = table, name: str = name) -> Decimal | None:
            return _decimal(table[key], f"{name}.{key}", where) if key in table else None

        provider = table.get("provider", "")
        if not isinstance(provider, str):
            raise ConfigError(f"{where}: {name}.provider must be a string, got {provider!r}")
        models.append(
            ModelPriceOverride(
                provider=provider,
                model=table["model"],
                input_per_mtok=_decimal(table["input_per_mtok"], f"{name}.input_per_mtok", where),
                output_per_mtok=_decimal(
                    table["output_per_mtok"], f"{name}.output_per_mtok", where
                ),
                cache_read_per_mtok=opt("cache_read_per_mtok"),
                cache_write_per_mtok=opt("cache_write_per_mtok"),
                cache_write_1h_per_mtok=opt("cache_write_1h_per_mtok"),
                web_search_per_k=opt("web_search_per_k"),
                effective=_date(table.get("effective", "1970-01-01"), f"{name}.effective", where),
            )
        )
    discounts_raw = raw.get("discount", {})
    if not isinstance(discounts_raw, dict):
        raise ConfigError(f"{where}: pricing.discount must be a table, got {discounts_raw!r}")
    discounts = {}
    for provider, value in discounts_raw.items():
        fraction = _decimal(value, f"pricing.discount.{provider}", where)
        if fraction >= 1:
            raise ConfigError(
                f"{where}: pricing.discount.{provider} is a fraction below 1, got {value!r}"
            )
        discounts[provider] = fraction
    tables = _tables(raw, "tier", where, "pricing.tier")
    tiers = tuple(_tier_rule(t, i, where) for i, t in enumerate(tables))
    return PricingConfig(models=tuple(models), discounts=discounts, tiers=tiers)


def _tier_rule(table: dict[str, Any], i: int, where: str) -> TierRule:
    """One ``[[pricing.tier]]`` table: a tier priced as a share of list prices.

    ``tier`` (``"batch"``, or a service tier such as ``"flex"``) and ``share_of_list``
    (``0.5`` is half of list) are required; ``provider`` (default: every provider) and
    ``effective`` (a date, default 1970-01-01) are optional. Such a rule wins over
    genai-prices' own tier prices and over the built-in batch rules, from its date on::

        [[pricing.tier]]
        tier = "batch"
        provider = "openai"
        share_of_list = 0.5
        effective = 2024-04-15
    """
    name = f"pricing.tier[{i}]"
    _known(table, {"tier", "provider", "share_of_list", "effective"}, name, where)
    for required in ("tier", "share_of_list"):
        if required not in table:
            raise ConfigError(f"{where}: {name} needs {required!r}")
    tier = table["tier"]
    if not isinstance(tier, str) or tier.strip().lower() in STANDARD_TIERS:
        raise ConfigError(f"{where}: {name}.tier must name a non-standard tier, got {tier!r}")
    provider = table.get("provider", "")
    if not isinstance(provider, str):
        raise ConfigError(f"{where}: {name}.provider must be a string, got {provider!r}")
    return TierRule(
        tier=tier.strip().lower(),
        share_of_list=_decimal(table["share_of_list"], f"{name}.share_of_list", where),
        provider=provider,
        effective=_date(table.get("effective", "1970-01-01"), f"{name}.effective", where),
    )


def _provider(raw: Any, name: str, key_env: str, where: str) -> ProviderConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {name} must be a table, got {raw!r}")
    _known(
        raw,
        {
            "enabled",
            "key_env",
            "base_url",
            "interval_s",
            "backfill_hours",
            "costs",
            "max_response_mb",
        },
        name,
        where,
    )
    p = f"{name}."
    backfill = _positive(raw, "backfill_hours", where, 24.0, p)
    if backfill > 24 * 30:
        raise ConfigError(
            f"{where}: {name}.backfill_hours is at most 720 (30 days), got {backfill}"
        )
    base_url = _str(raw, "base_url", where, "", p)
    if base_url and not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: {name}.base_url must be an http(s) URL, got {base_url!r}")
    costs = _opt_bool(raw, "costs", where, p)
    max_mb = _positive(raw, "max_response_mb", where, 20.0, p)
    if not 0.01 <= max_mb <= 4096:
        raise ConfigError(
            f"{where}: {name}.max_response_mb must be from 0.01 to 4096,"
            f" got {raw['max_response_mb']!r}"
        )
    return ProviderConfig(
        name=name,
        enabled=_opt_bool(raw, "enabled", where, p),
        key_env=_str(raw, "key_env", where, key_env, p),
        base_url=base_url,
        interval_s=_interval(raw, "interval_s", where, 60.0, PROVIDER_INTERVAL_MIN_S, p),
        backfill_hours=backfill,
        costs=True if costs is None else costs,
        max_response_mb=max_mb,
    )


def _gpu_rate(raw: dict[str, Any], where: str) -> GpuRate:
    _known(raw, {"match", "usd_per_hour", "mode", "usd_per_kwh", "pue"}, "gpu", where)
    mode = raw.get("mode", "rented")
    if mode not in ("rented", "owned"):
        raise ConfigError(f"{where}: gpu.mode must be 'rented' or 'owned', got {mode!r}")
    if "usd_per_hour" not in raw:
        raise ConfigError(f"{where}: a [[gpu]] table needs usd_per_hour")
    pue = _decimal(raw.get("pue", "1.5"), "gpu.pue", where)
    if not 1 <= pue <= PUE_MAX:
        # Every watt at the GPU costs at least one at the meter.
        raise ConfigError(f"{where}: gpu.pue must be from 1 to {PUE_MAX}, got {raw['pue']!r}")
    return GpuRate(
        match=_str(raw, "match", where, "*", "gpu."),
        usd_per_hour=_decimal(raw["usd_per_hour"], "gpu.usd_per_hour", where),
        mode=mode,
        usd_per_kwh=_decimal(raw.get("usd_per_kwh", "0.10"), "gpu.usd_per_kwh", where),
        pue=pue,
    )


def _endpoint(raw: dict[str, Any], where: str) -> InferenceEndpoint:
    _known(raw, {"url", "kind", "gpus", "name", "max_response_mb"}, "inference", where)
    url = raw.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: inference.url must be an http(s) URL, got {url!r}")
    gpus = raw.get("gpus", [])
    if not isinstance(gpus, list) or not all(
        isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpus
    ):
        raise ConfigError(f"{where}: inference.gpus must be a list of GPU indices, got {gpus!r}")
    kind = _str(raw, "kind", where, "", "inference.")
    if kind and kind not in ("vllm", "sglang", "tgi", "llamacpp", "triton"):
        raise ConfigError(
            f"{where}: inference.kind {kind!r} is not one of vllm, sglang, tgi, llamacpp, triton"
        )
    max_mb = _positive(raw, "max_response_mb", where, 20.0, "inference.")
    if not 0.01 <= max_mb <= 4096:
        raise ConfigError(
            f"{where}: inference.max_response_mb must be from 0.01 to 4096,"
            f" got {raw['max_response_mb']!r}"
        )
    return InferenceEndpoint(
        url=url,
        kind=kind,
        gpus=tuple(gpus),
        name=_str(raw, "name", where, "", "inference."),
        max_response_mb=max_mb,
    )


def _alerts(raw: dict[str, Any], where: str) -> AlertsConfig:
    """The ``[alerts]`` table and ``[[alert]]`` rules; budgets default to the top-level ones."""
    try:
        return parse_alerts(
            raw.get("alerts", {}),
            raw.get("alert", []),
            where,
            budget_daily=_money(raw, "budget_daily_usd", where),
            budget_monthly=_money(raw, "budget_monthly_usd", where),
        )
    except AlertConfigError as exc:
        raise ConfigError(str(exc)) from None


def _metrics(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The ``[metrics]`` and ``[prometheus]`` tables (see :mod:`.metrics_config`)."""
    try:
        return {
            "metrics": parse_metrics(raw.get("metrics", {}), where),
            "prometheus": parse_prometheus(raw.get("prometheus", {}), where),
        }
    except MetricsConfigError as exc:
        raise ConfigError(str(exc)) from None


def _retention(raw: Any, where: str) -> Retention:
    """The ``[retention]`` table: days of one-minute and of hourly data."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: retention must be a table, got {raw!r}")
    for key in raw:
        if key not in ("minutes_days", "hours_days"):
            raise ConfigError(f"{where}: unknown setting retention.{key!r}")
    default = Retention()
    minutes = _positive(raw, "minutes_days", where, default.minutes_days, "retention.")
    hours = _positive(raw, "hours_days", where, default.hours_days, "retention.")
    if minutes < 1:
        raise ConfigError(f"{where}: retention.minutes_days must be at least 1, got {minutes!r}")
    for key, days in (("minutes_days", minutes), ("hours_days", hours)):
        if days > RETENTION_DAYS_MAX:
            raise ConfigError(
                f"{where}: retention.{key} must be at most {RETENTION_DAYS_MAX:g}, got {raw[key]!r}"
            )
    if hours < minutes:
        raise ConfigError(
            f"{where}: retention.hours_days must be at least retention.minutes_days"
            f" ({minutes!r}), got {hours!r}"
        )
    return Retention(minutes_days=minutes, hours_days=hours)
