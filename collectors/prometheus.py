"""Inference servers' Prometheus ``/metrics``: inferences and tokens served per interval.

Understands vLLM, SGLang, TGI, llama.cpp's ``llama-server`` and Triton, by the metric names in
the research notes (``gpu-and-inference-metrics.md`` section 3); the kind is detected from the
metric names when the endpoint does not name it. Counters are summed over every label set
(several models, data-parallel engines) and reported as deltas since the previous scrape.

What counts as an inference, per kind:

- vLLM: ``vllm:request_success_total`` with ``finished_reason`` ``stop`` or ``length`` only
  (the counter also counts ``abort``, ``error`` and ``repetition``). Tokens:
  ``vllm:prompt_tokens_total`` and ``vllm:generation_tokens_total``.
- SGLang: ``sglang:num_requests_total`` minus ``sglang:num_aborted_requests_total`` (never below
  zero in an interval). Tokens: ``sglang:prompt_tokens_total``, ``sglang:generation_tokens_total``,
  which SGLang counts when a request finishes.
- TGI: ``tgi_request_success``. Tokens: the ``_sum`` of the ``tgi_request_input_length`` and
  ``tgi_request_generated_tokens`` histograms (TGI has no token counters; input length is recorded
  at validation, so it includes requests that fail later).
- llama.cpp: no request counter exists, so ``requests`` stays 0 and $/inference is unknown there;
  tokens from ``llamacpp:prompt_tokens_total`` and ``llamacpp:tokens_predicted_total``.
- Triton: ``nv_inference_request_success`` (one per request, however batched); core Triton has no
  token counters.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import httpx

from tokentop.collectors.base import PollContext, SourceError, utcnow
from tokentop.collectors.config import InferenceEndpoint
from tokentop.collectors.http import read_capped
from tokentop.store.records import Batch, InferenceSample

Labels = tuple[tuple[str, str], ...]

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_FLOAT = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[Nn]a[Nn]|[Ii]nf(?:inity)?)")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}

KINDS: tuple[str, ...] = ("vllm", "sglang", "tgi", "llamacpp", "triton")
"""Known server kinds, in detection order (Triton last: it can host a vLLM backend)."""

_PREFIXES = {
    "vllm": "vllm:",
    "sglang": "sglang:",
    "tgi": "tgi_",
    "llamacpp": "llamacpp:",
    "triton": "nv_inference_",
}

_HINTS = {
    "sglang": "SGLang serves metrics only with --enable-metrics",
    "llamacpp": "llama-server serves metrics only with --metrics",
    "triton": "Triton serves metrics on port 8002 by default",
    "tgi": "TGI also serves metrics on --prometheus-port (9000)",
}


class PrometheusParseError(ValueError):
    """The body is not Prometheus text; the message names the line."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One sample line: metric name, labels (sorted by name) and value."""

    name: str
    labels: Labels
    value: float

    def label(self, name: str) -> str | None:
        """A label's value, or ``None`` when the sample does not have it."""
        for key, value in self.labels:
            if key == name:
                return value
        return None


def parse_text(text: str) -> list[Sample]:
    """Parse the Prometheus text exposition format (0.0.4; OpenMetrics bodies parse too).

    Comments, ``# HELP`` and ``# TYPE`` lines are skipped; label values may hold escaped quotes,
    backslashes and newlines; values may be ``NaN`` or ``±Inf``; a trailing timestamp and an
    OpenMetrics exemplar are accepted and ignored. Any other line raises
    :class:`PrometheusParseError`.
    """
    samples = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip(" \t\r")
        if not line or line.startswith("#"):
            continue
        try:
            samples.append(_parse_line(line))
        except PrometheusParseError as exc:
            shown = line if len(line) <= 60 else line[:57] + "..."
            raise PrometheusParseError(f"line {number}: {exc}: {shown!r}") from None
    return samples


def _parse_line(line: str) -> Sample:
    name = ""
    pos = 0
    if not line.startswith("{"):
        match = _NAME.match(line)
        if match is None:
            raise PrometheusParseError("not a metric name")
        name, pos = match.group(), match.end()
    labels: list[tuple[str, str]] = []
    brace = _skip_spaces(line, pos)
    if brace < len(line) and line[brace] == "{":
        pos, quoted_name = _parse_labels(line, brace + 1, labels)
        if quoted_name is not None:
            if name:
                raise PrometheusParseError("two metric names")
            name = quoted_name
    if not name:
        raise PrometheusParseError("no metric name")
    rest = line[pos:]
    if not rest or rest[0] not in " \t":
        raise PrometheusParseError("no value")
    # OpenMetrics exemplars follow " # "; they are not part of the sample.
    tokens = rest.split("#", 1)[0].split()
    if not tokens or len(tokens) > 2:
        raise PrometheusParseError("expected a value and an optional timestamp")
    if _FLOAT.fullmatch(tokens[0]) is None:
        raise PrometheusParseError(f"bad value {tokens[0]!r}")
    if len(tokens) == 2 and _FLOAT.fullmatch(tokens[1]) is None:
        raise PrometheusParseError(f"bad timestamp {tokens[1]!r}")
    return Sample(name, tuple(sorted(labels)), float(tokens[0]))


def _parse_labels(line: str, pos: int, labels: list[tuple[str, str]]) -> tuple[int, str | None]:
    """Parse ``name="value", ...}`` from ``pos``; returns the position after ``}`` and a metric
    name given as a bare quoted string (the UTF-8 form ``{"metric.name", label="v"}``)."""
    quoted_name = None
    while True:
        pos = _skip_spaces(line, pos)
        if pos >= len(line):
            raise PrometheusParseError("unterminated labels")
        if line[pos] == "}":
            return pos + 1, quoted_name
        if line[pos] == '"':
            key, pos = _parse_quoted(line, pos + 1)
            bare = _skip_spaces(line, pos)
            if bare < len(line) and line[bare] in ",}":
                if quoted_name is not None:
                    raise PrometheusParseError("two metric names")
                quoted_name, pos = key, bare
                if line[pos] == ",":
                    pos += 1
                continue
        else:
            match = _LABEL.match(line, pos)
            if match is None:
                raise PrometheusParseError("bad label name")
            key, pos = match.group(), match.end()
        pos = _skip_spaces(line, pos)
        if pos >= len(line) or line[pos] != "=":
            raise PrometheusParseError(f"no '=' after label {key!r}")
        pos = _skip_spaces(line, pos + 1)
        if pos >= len(line) or line[pos] != '"':
            raise PrometheusParseError(f"label {key!r} value is not quoted")
        value, pos = _parse_quoted(line, pos + 1)
        labels.append((key, value))
        pos = _skip_spaces(line, pos)
        if pos < len(line) and line[pos] == ",":
            pos += 1
        elif pos >= len(line) or line[pos] != "}":
            raise PrometheusParseError("expected ',' or '}' after a label")


def _parse_quoted(line: str, pos: int) -> tuple[str, int]:
    """Read a quoted string whose opening quote precedes ``pos``; returns it and the position
    after the closing quote."""
    out: list[str] = []
    while pos < len(line):
        char = line[pos]
        if char == "\\" and pos + 1 < len(line):
            following = line[pos + 1]
            # Unknown escapes are kept as written, as Prometheus does.
            out.append(_ESCAPES.get(following, "\\" + following))
            pos += 2
        elif char == '"':
            return "".join(out), pos + 1
        else:
            out.append(char)
            pos += 1
    raise PrometheusParseError("unterminated quoted string")


def _skip_spaces(line: str, pos: int) -> int:
    while pos < len(line) and line[pos] in " \t":
        pos += 1
    return pos


def detect_kind(samples: Iterable[Sample]) -> str:
    """The server kind the metric names reveal, or ``""``."""
    names = {s.name for s in samples}
    for kind in KINDS:
        prefix = _PREFIXES[kind]
        if any(name.startswith(prefix) for name in names):
            return kind
    return ""


@dataclass(frozen=True, slots=True)
class _Counter:
    """A counter family that adds to (or, with ``sign`` -1, takes from) one figure."""

    figure: str
    names: tuple[str, ...]
    """Alternative exposed names; the first one present is used."""
    sign: int = 1


_COUNTERS: dict[str, tuple[_Counter, ...]] = {
    "vllm": (
        _Counter("requests", ("vllm:request_success_total",)),
        _Counter("prompt", ("vllm:prompt_tokens_total",)),
        _Counter("generation", ("vllm:generation_tokens_total",)),
    ),
    "sglang": (
        _Counter("requests", ("sglang:num_requests_total",)),
        _Counter("requests", ("sglang:num_aborted_requests_total",), sign=-1),
        _Counter("prompt", ("sglang:prompt_tokens_total",)),
        _Counter("generation", ("sglang:generation_tokens_total",)),
    ),
    "tgi": (
        # The Rust exporter writes counters without "_total"; accept either spelling.
        _Counter("requests", ("tgi_request_success", "tgi_request_success_total")),
        _Counter("prompt", ("tgi_request_input_length_sum",)),
        _Counter("generation", ("tgi_request_generated_tokens_sum",)),
    ),
    "llamacpp": (
        _Counter("prompt", ("llamacpp:prompt_tokens_total",)),
        _Counter("generation", ("llamacpp:tokens_predicted_total",)),
    ),
    "triton": (
        _Counter(
            "requests", ("nv_inference_request_success", "nv_inference_request_success_total")
        ),
    ),
}

_SERVED_REASONS = frozenset({"stop", "length"})


def _counts(sample: Sample, has_reason: bool) -> bool:
    """Whether a sample of a counter family counts (vLLM: served finishes only)."""
    if sample.name == "vllm:request_success_total" and has_reason:
        return sample.label("finished_reason") in _SERVED_REASONS
    return True


def _created_key(sample: Sample) -> tuple[str, Labels]:
    """The ``_created`` series that dates a counter series (reset detection)."""
    name = sample.name
    for suffix in ("_total", "_sum", "_count"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name + "_created", sample.labels


@dataclass(frozen=True, slots=True)
class _Series:
    figure: str
    sign: int
    value: float
    created: float | None


class InferenceCollector:
    """Scrapes one inference server's Prometheus endpoint.

    Args:
        endpoint: the configured endpoint (URL, kind or ``""`` to detect, GPUs, name).
        client: an ``httpx.AsyncClient`` to use (and its transport); one of our own otherwise,
            closed by :meth:`aclose`. Ours ignores proxy variables: metrics endpoints are local.
        interval_s: seconds between scrapes.
        clock: the current UTC time.
        name: the source name (default: the endpoint's name, else ``inference:<host:port>``).
        gpu_devices: device ids (GPU UUIDs) of the GPUs this server runs on, copied into each
            sample so that cost can be matched to traffic.
        timeout_s: seconds a scrape may take, when the client is ours.
        max_response_mb: the largest body a scrape reads (decoded); a larger one fails the
            scrape and nothing of it is kept. Defaults to the endpoint's ``max_response_mb``.
    """

    kind = "prometheus"

    def __init__(
        self,
        endpoint: InferenceEndpoint,
        *,
        client: httpx.AsyncClient | None = None,
        interval_s: float = 5.0,
        clock: Callable[[], datetime] = utcnow,
        name: str | None = None,
        gpu_devices: tuple[str, ...] = (),
        timeout_s: float = 5.0,
        max_response_mb: float | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.name = name or endpoint.name or f"inference:{urlsplit(endpoint.url).netloc}"
        self.interval_s = interval_s
        self.clock = clock
        self.calls = 0
        self.gpu_devices = gpu_devices
        self.timeout_s = timeout_s
        self.max_response_mb = (
            max_response_mb if max_response_mb is not None else endpoint.max_response_mb
        )
        self.server_kind = endpoint.kind
        """The configured or detected kind (``""`` until detected)."""
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s), follow_redirects=True, trust_env=False
        )
        self._previous: dict[tuple[str, Labels], _Series] | None = None
        self._previous_ts: datetime | None = None

    async def poll(self, ctx: PollContext) -> Batch:
        """Scrape once; the first scrape sets the baseline and reports a zero-delta sample."""
        text = await self._scrape()
        try:
            samples = parse_text(text)
        except PrometheusParseError as exc:
            raise SourceError(self._line(f"not Prometheus text ({exc})")) from None
        kind = self.endpoint.kind or detect_kind(samples)
        if not kind:
            raise SourceError(self._line("no vLLM, SGLang, TGI, llama.cpp or Triton metrics found"))
        prefix = _PREFIXES[kind]
        if not any(s.name.startswith(prefix) for s in samples):
            hint = _HINTS.get(kind, "")
            raise SourceError(
                self._line(f"no {kind} metrics found" + (f" ({hint})" if hint else ""))
            )
        if kind != self.server_kind:
            # A different server now answers at this address: start a new baseline.
            self.server_kind = kind
            self._previous = None
        series = _series(kind, samples)
        ts = self.clock()
        previous, previous_ts = self._previous, self._previous_ts
        self._previous, self._previous_ts = series, ts
        if previous is None or previous_ts is None:
            return Batch(inference=(self._sample(ts, 0.0, {}),))
        figures = _deltas(previous, series)
        return Batch(inference=(self._sample(ts, _seconds(ts - previous_ts), figures),))

    async def aclose(self) -> None:
        """Close the HTTP client if it is ours."""
        if self._own_client:
            await self._client.aclose()

    async def _scrape(self) -> str:
        url = self.endpoint.url
        self.calls += 1
        limit = round(self.max_response_mb * 1_000_000)
        content: bytes | None = b""
        try:
            async with self._client.stream(
                "GET", url, headers={"Accept": "text/plain;version=0.0.4;q=0.9,*/*;q=0.1"}
            ) as response:
                status = response.status_code
                if status == 200:
                    content = await read_capped(response, limit)
        except httpx.TimeoutException:
            raise SourceError(self._line("timed out")) from None
        except httpx.HTTPError as exc:
            raise SourceError(self._line(f"cannot connect ({type(exc).__name__}: {exc})")) from None
        if status != 200:
            hint = _HINTS.get(self.server_kind, "") if status == 404 else ""
            raise SourceError(self._line(f"HTTP {status}" + (f" ({hint})" if hint else "")))
        if content is None:
            raise SourceError(
                self._line(
                    f"response too large: more than the {self.max_response_mb:g} MB limit;"
                    " nothing of this scrape kept"
                )
            )
        return content.decode(response.encoding or "utf-8", errors="replace")

    def _sample(self, ts: datetime, seconds: float, figures: dict[str, int]) -> InferenceSample:
        return InferenceSample(
            source=self.name,
            endpoint=self.endpoint.name or self.endpoint.url,
            ts=ts,
            interval_s=seconds,
            kind=self.server_kind,
            requests=figures.get("requests", 0),
            prompt_tokens=figures.get("prompt", 0),
            generation_tokens=figures.get("generation", 0),
            devices=self.gpu_devices,
        )

    def _line(self, message: str) -> str:
        text = f"{self.endpoint.url}: {message}"
        text = " ".join(text.split())
        return text if len(text) <= 240 else text[:237] + "..."


def _series(kind: str, samples: list[Sample]) -> dict[tuple[str, Labels], _Series]:
    """The counter series that feed each figure, keyed by name and labels."""
    by_name: dict[str, list[Sample]] = {}
    for sample in samples:
        by_name.setdefault(sample.name, []).append(sample)
    created = {
        (s.name, s.labels): s.value
        for s in samples
        if s.name.endswith("_created") and math.isfinite(s.value)
    }
    has_reason = any(
        s.label("finished_reason") is not None
        for s in by_name.get("vllm:request_success_total", [])
    )
    out: dict[tuple[str, Labels], _Series] = {}
    for counter in _COUNTERS[kind]:
        name = next((n for n in counter.names if n in by_name), None)
        if name is None:
            continue  # not incremented yet: counts as zero
        for sample in by_name[name]:
            if not math.isfinite(sample.value) or not _counts(sample, has_reason):
                continue
            out[(sample.name, sample.labels)] = _Series(
                counter.figure, counter.sign, sample.value, created.get(_created_key(sample))
            )
    return out


def _deltas(
    previous: dict[tuple[str, Labels], _Series], current: dict[tuple[str, Labels], _Series]
) -> dict[str, int]:
    """Per-figure sums of per-series increases.

    A series that went down, or whose ``_created`` time changed, was reset: it restarted from 0,
    so its increase is its new value. A series not seen before started from 0 too.
    """
    totals: dict[str, float] = {}
    for key, now in current.items():
        before = previous.get(key)
        reset = before is None or now.value < before.value
        if before is not None and now.created is not None and before.created is not None:
            reset = reset or now.created != before.created
        increase = now.value if reset or before is None else now.value - before.value
        totals[now.figure] = totals.get(now.figure, 0.0) + now.sign * increase
    # Counted once per interval, so a subtraction (SGLang's aborts) never goes below zero.
    return {figure: max(0, round(total)) for figure, total in totals.items()}


def _seconds(delta: timedelta) -> float:
    return max(0.0, delta.total_seconds())
