"""The ``[metrics]`` and ``[prometheus]`` tables of the config file.

``[metrics]`` says what every ``tokentop collect`` and ``tokentop proxy`` exposes on ``/metrics``;
``[prometheus]`` names a Prometheus server (or Thanos, Mimir, VictoriaMetrics: the same query
API) to read the fleet from instead of the local database::

    [metrics]
    port = 9464             # tokentop collect/proxy expose /metrics here (--metrics-port wins)
    host = "127.0.0.1"
    labels = ["project", "tag", "api_key"]   # besides source, provider and model
    new_series_hold_s = 60  # a new series shows its history this long (>= scrape interval)

    [prometheus]
    url = "http://prometheus.internal:9090"
    timeout_s = 10
    max_response_mb = 20    # a larger query answer is an error (streamed, read no further)
    gpu_metrics = "auto"    # "tokentop", "external" (DCGM + vLLM/SGLang/TGI) or "auto"

Kept apart from :mod:`.config` (as :mod:`.alert_config` is) so that the exporter and the
Prometheus source own their settings; :mod:`.config` wraps these errors in its ``ConfigError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

BASE_LABELS: tuple[str, ...] = ("source", "provider", "model")
"""Labels every usage metric carries: the panes group by them and the counted-once rule needs
``provider``."""
OPTIONAL_LABELS: tuple[str, ...] = (
    "project",
    "tag",
    "api_key",
    "workspace",
    "service_tier",
    "batch",
    "context_window",
)
"""Usage dimensions that may be added as labels (each multiplies the series count)."""
DEFAULT_LABELS: tuple[str, ...] = ("project", "tag")
"""Added by default; ``api_key`` is off by default (high-cardinality, and an id users may prefer
not to spread)."""
GPU_METRICS = ("auto", "tokentop", "external")


class MetricsConfigError(ValueError):
    """A bad ``[metrics]`` or ``[prometheus]`` value; one line naming it."""


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus exposition of ``collect`` and ``proxy``."""

    port: int | None = None
    """Port for ``/metrics``; ``None`` exposes nothing unless ``--metrics-port`` is given."""
    host: str = "127.0.0.1"
    """Address to listen on (loopback unless said otherwise)."""
    labels: tuple[str, ...] = DEFAULT_LABELS
    """Usage dimensions exported as labels, besides :data:`BASE_LABELS`."""
    new_series_hold_s: float = 60.0
    """A usage series that appears while running shows only its history for this long (at
    least one scrape interval), so that Prometheus sees its first spend as an increase."""

    @property
    def usage_labels(self) -> tuple[str, ...]:
        """Every label of the usage metrics, in exposition order."""
        return (*BASE_LABELS, *self.labels)


@dataclass(frozen=True, slots=True)
class PrometheusConfig:
    """``[prometheus]``: read the fleet through a Prometheus-compatible query API."""

    url: str = ""
    """Base URL (``http://host:9090``); empty means the local database is the source."""
    timeout_s: float = 10.0
    """Timeout of one query."""
    max_response_mb: float = 20.0
    """The largest query answer read (decoded, MB); a larger one is a query error."""
    gpu_metrics: str = "auto"
    """Where GPU cost and inferences come from: tokentop's own metrics, the DCGM exporter and
    inference servers' metrics priced with the ``[[gpu]]`` rates (``external``), or ``auto``:
    tokentop's where any exist in the window, else the external ones."""


def check_url(value: Any, name: str) -> str:
    """An ``http(s)://`` URL without a trailing slash, or :class:`MetricsConfigError`."""
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise MetricsConfigError(f"{name} must be an http(s) URL, got {value!r}")
    return value.rstrip("/")


def parse_metrics(raw: Any, where: str) -> MetricsConfig:
    """Validate the ``[metrics]`` table."""
    if not isinstance(raw, dict):
        raise MetricsConfigError(f"{where}: metrics must be a table, got {raw!r}")
    for key in raw:
        if key not in ("port", "host", "labels", "new_series_hold_s"):
            raise MetricsConfigError(f"{where}: unknown setting {'metrics.' + key!r}")
    port = raw.get("port")
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535
    ):
        raise MetricsConfigError(f"{where}: metrics.port must be a port number, got {port!r}")
    host = raw.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host:
        raise MetricsConfigError(f"{where}: metrics.host must be an address, got {host!r}")
    labels = raw.get("labels", list(DEFAULT_LABELS))
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise MetricsConfigError(f"{where}: metrics.labels must be a list of names, got {labels!r}")
    chosen: list[str] = []
    for label in labels:
        if label in BASE_LABELS:
            continue  # always there
        if label not in OPTIONAL_LABELS:
            raise MetricsConfigError(
                f"{where}: metrics.labels: {label!r} is not one of"
                f" {', '.join(BASE_LABELS + OPTIONAL_LABELS)}"
            )
        if label not in chosen:
            chosen.append(label)
    hold = raw.get("new_series_hold_s", 60.0)
    if isinstance(hold, bool) or not isinstance(hold, int | float) or not 0 <= hold <= 3600:
        raise MetricsConfigError(
            f"{where}: metrics.new_series_hold_s must be seconds from 0 to 3600, got {hold!r}"
        )
    return MetricsConfig(port=port, host=host, labels=tuple(chosen), new_series_hold_s=hold)


def parse_prometheus(raw: Any, where: str) -> PrometheusConfig:
    """Validate the ``[prometheus]`` table."""
    if not isinstance(raw, dict):
        raise MetricsConfigError(f"{where}: prometheus must be a table, got {raw!r}")
    for key in raw:
        if key not in ("url", "timeout_s", "max_response_mb", "gpu_metrics"):
            raise MetricsConfigError(f"{where}: unknown setting {'prometheus.' + key!r}")
    url = check_url(raw["url"], f"{where}: prometheus.url") if "url" in raw else ""
    timeout = raw.get("timeout_s", 10.0)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise MetricsConfigError(
            f"{where}: prometheus.timeout_s must be a positive number, got {timeout!r}"
        )
    max_mb = raw.get("max_response_mb", 20.0)
    if (
        isinstance(max_mb, bool)
        or not isinstance(max_mb, int | float)
        or not 0.01 <= max_mb <= 4096
    ):
        raise MetricsConfigError(
            f"{where}: prometheus.max_response_mb must be from 0.01 to 4096, got {max_mb!r}"
        )
    gpu = raw.get("gpu_metrics", "auto")
    if gpu not in GPU_METRICS:
        raise MetricsConfigError(
            f"{where}: prometheus.gpu_metrics must be one of {', '.join(GPU_METRICS)}, got {gpu!r}"
        )
    return PrometheusConfig(
        url=url, timeout_s=float(timeout), max_response_mb=float(max_mb), gpu_metrics=gpu
    )
