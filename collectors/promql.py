"""A small client of the Prometheus HTTP query API (``/api/v1/query``, ``/api/v1/query_range``).

Prometheus, Thanos, Mimir and VictoriaMetrics answer the same API. Every failure (unreachable
server, timeout, HTTP error, an ``"error"`` status, an unexpected shape) raises
:class:`PromError`: the caller shows a source error, never a figure of $0.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx

from tokentop.collectors.base import SourceError
from tokentop.collectors.http import read_capped_sync


class PromError(SourceError):
    """A query could not be answered (one line, safe to show)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One series of an instant vector: its labels, value and the evaluation time."""

    labels: Mapping[str, str]
    value: Decimal | None
    """``None`` for NaN or an infinity (a division by zero in PromQL): unknown, not zero."""
    ts: float


@dataclass(frozen=True, slots=True)
class Series:
    """One series of a range query: its labels and (time, value) points, oldest first."""

    labels: Mapping[str, str]
    points: tuple[tuple[float, Decimal | None], ...]


def _value(text: Any) -> Decimal | None:
    try:
        value = Decimal(str(text))
    except InvalidOperation:
        raise PromError(f"unexpected sample value {str(text)[:40]!r}") from None
    return value if value.is_finite() else None


def quote(value: str) -> str:
    """A PromQL string literal (double-quoted, escaped)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def regex_literal(text: str) -> str:
    """``text`` as a literal inside an RE2 regular expression (for ``=~``)."""
    return re.sub(r"([\\.^$|?*+()\[\]{}])", r"\\\1", text)


def duration(seconds: float) -> str:
    """A PromQL range duration in whole milliseconds (at least 1 ms)."""
    return f"{max(1, round(seconds * 1000))}ms"


class PromClient:
    """Queries one Prometheus-compatible server.

    Args:
        url: base URL (``http://host:9090``; a path prefix such as ``/prometheus`` is kept).
        timeout_s: timeout of one request.
        transport: injected HTTP transport (tests).
        headers: extra request headers (a tenant header for Mimir, for example).
        max_response_mb: the largest answer read (decoded); a larger one is a query error and
            nothing of it is used.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
        max_response_mb: float = 20.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.max_response_mb = max_response_mb
        self._client = httpx.Client(
            base_url=self.url,
            timeout=timeout_s,
            transport=transport,
            headers=dict(headers or {}),
        )
        self.calls = 0
        """Queries sent so far."""

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def __enter__(self) -> PromClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, path: str, params: dict[str, str]) -> Any:
        data = self._request("POST", path, params)
        if not isinstance(data, dict):
            raise PromError("answer without data")
        return data

    def _request(self, method: str, path: str, params: dict[str, str]) -> Any:
        self.calls += 1
        limit = round(self.max_response_mb * 1_000_000)
        try:
            if method == "POST":
                # POST (form-encoded) keeps long PromQL out of URLs and access logs.
                request = self._client.build_request("POST", path, data=params)
            else:
                request = self._client.build_request("GET", path, params=params)
            response = self._client.send(request, stream=True)
            try:
                content = read_capped_sync(response, limit)
            finally:
                response.close()
        except httpx.TimeoutException:
            raise PromError("timed out") from None
        except httpx.HTTPError as exc:
            raise PromError(f"unreachable: {type(exc).__name__}: {exc}") from None
        if content is None:
            raise PromError(
                f"HTTP {response.status_code}: answer larger than the"
                f" {self.max_response_mb:g} MB limit; nothing of it used"
            )
        try:
            body = json.loads(content)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise PromError(f"HTTP {response.status_code}: not a Prometheus API answer")
        if body.get("status") != "success":
            kind = body.get("errorType", "error")
            raise PromError(f"HTTP {response.status_code}: {kind}: {body.get('error', '')}"[:300])
        if "data" not in body:
            raise PromError("answer without data")
        return body["data"]

    def query(self, promql: str, at: datetime) -> list[Sample]:
        """An instant query evaluated at ``at``: the vector's series (a scalar is one sample
        without labels)."""
        data = self._get("/api/v1/query", {"query": promql, "time": _ts(at)})
        kind, result = data.get("resultType"), data.get("result")
        try:
            if kind == "vector":
                return [
                    Sample(dict(r.get("metric", {})), _value(r["value"][1]), float(r["value"][0]))
                    for r in result
                ]
            if kind == "scalar":
                return [Sample({}, _value(result[1]), float(result[0]))]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise PromError(f"malformed {kind} answer: {exc}") from None
        raise PromError(f"expected a vector, got {kind!r}")

    def label_values(self, label: str, match: str, start: datetime, end: datetime) -> list[str]:
        """The values ``label`` takes in the series ``match`` selects with samples in
        ``[start, end]`` (``/api/v1/label/<label>/values``): read from the index, no samples.

        Servers may answer a superset (a block's series without samples in the range): callers
        use the answer to leave out work that cannot matter, never to drop a figure.
        """
        data = self._request(
            "GET",
            f"/api/v1/label/{label}/values",
            {"match[]": match, "start": _ts(start), "end": _ts(end)},
        )
        if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
            raise PromError("malformed label values answer")
        return list(data)

    def label_names(self, match: str, start: datetime, end: datetime) -> list[str]:
        """The label names of the series ``match`` selects with samples in ``[start, end]``
        (``/api/v1/labels``; a superset, as :meth:`label_values`)."""
        data = self._request(
            "GET", "/api/v1/labels", {"match[]": match, "start": _ts(start), "end": _ts(end)}
        )
        if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
            raise PromError("malformed label names answer")
        return list(data)

    def query_range(self, promql: str, start: datetime, end: datetime, step_s: int) -> list[Series]:
        """A range query: each series' values every ``step_s`` seconds from ``start`` to
        ``end``."""
        data = self._get(
            "/api/v1/query_range",
            {"query": promql, "start": _ts(start), "end": _ts(end), "step": str(step_s)},
        )
        if data.get("resultType") != "matrix":
            raise PromError(f"expected a matrix, got {data.get('resultType')!r}")
        try:
            return [
                Series(
                    dict(r.get("metric", {})),
                    tuple((float(t), _value(v)) for t, v in r["values"]),
                )
                for r in data["result"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise PromError(f"malformed matrix answer: {exc}") from None


def _ts(when: datetime) -> str:
    if when.tzinfo is None:
        raise ValueError(f"naive datetime {when!r}: tokentop keeps time in UTC")
    stamp = when.timestamp()
    if not math.isfinite(stamp):  # pragma: no cover - datetimes are finite
        raise ValueError(when)
    return f"{stamp:.3f}"
