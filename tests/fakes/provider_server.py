"""A local fake of the OpenAI and Anthropic admin usage and cost APIs, on a real socket.

It follows ``reference/provider-apis.md`` (sections 1, 2 and 5): the OpenAI page/bucket envelope
with integer times, a first bucket clipped to ``start_time`` and a last one clipped to now, empty
buckets as ``results: []``, ``amount.value`` as a number or a string; the Anthropic report with
RFC 3339 times snapped to UTC, nested ``cache_creation``, costs as strings in cents; per-width
``limit`` maxima; cursor paging over buckets; both array forms (``k=v`` and ``k[]=v``); each
provider's error envelope and auth headers. What the reference marks UNCONFIRMED is a field of
:class:`Behaviour`, so a test can try each answer.

OpenAI embeddings usage (``/v1/organization/usage/embeddings``: ``input_tokens`` and
``num_model_requests`` by model, project, user and API key) is served in the same envelopes, from
data added with :meth:`FakeProviderServer.add_openai_embeddings` or ``seed(embeddings=True)``; by
default there is none, and ``Behaviour.openai_embeddings_404`` makes the endpoint missing.

Usage::

    with FakeProviderServer(now=datetime(2025, 8, 1, 12, tzinfo=UTC)) as server:
        server.seed(hours=2)                      # deterministic traffic for both providers
        server.add_openai_embeddings(at, "text-embedding-3-small", 1200, 3)
        server.fault("500", nth=2, path="usage")  # the 2nd usage request answers 500
        ... point a collector at server.openai_base_url / server.anthropic_base_url ...
        server.grow_newest(output_tokens=100)     # the open minute grows
        server.requests                           # what it received

It runs a ``ThreadingHTTPServer`` in a daemon thread; all methods are thread-safe. Run it by
hand with ``python -m tests.fakes.provider_server --hours 24``.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

OPENAI_KEY = "sk-admin-FAKEopenaiKEY0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-admin01-FAKEanthropicKEY0123456789abcdef"

OPENAI_USAGE = "/v1/organization/usage/completions"
OPENAI_EMBEDDINGS = "/v1/organization/usage/embeddings"
OPENAI_COSTS = "/v1/organization/costs"
ANTHROPIC_USAGE = "/v1/organizations/usage_report/messages"
ANTHROPIC_COSTS = "/v1/organizations/cost_report"

WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
USAGE_LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
"""bucket_width -> (default, max) for both providers' usage endpoints."""

OPENAI_DIMS = ("model", "project_id", "user_id", "api_key_id", "batch", "service_tier")
OPENAI_COUNTERS = (
    "input_tokens",
    "output_tokens",
    "input_cached_tokens",
    "input_cache_write_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "num_model_requests",
)
OPENAI_EMBEDDING_DIMS = ("model", "project_id", "user_id", "api_key_id")
OPENAI_EMBEDDING_COUNTERS = ("input_tokens", "num_model_requests")
OPENAI_COST_DIMS = ("project_id", "line_item", "api_key_id")
ANTHROPIC_DIMS = (
    "model",
    "api_key_id",
    "workspace_id",
    "service_tier",
    "context_window",
    "inference_geo",
)
ANTHROPIC_GROUPABLE = (*ANTHROPIC_DIMS, "speed", "account_id", "service_account_id")
ANTHROPIC_COUNTERS = (
    "uncached_input_tokens",
    "cache_read_input_tokens",
    "ephemeral_5m_input_tokens",
    "ephemeral_1h_input_tokens",
    "output_tokens",
    "web_search_requests",
)
ANTHROPIC_COST_DIMS = (
    "workspace_id",
    "description",
    "cost_type",
    "model",
    "service_tier",
    "context_window",
    "token_type",
)
ANTHROPIC_BY_DESCRIPTION = ANTHROPIC_COST_DIMS[1:]
"""Cost-report fields that are set only when grouped by ``description``."""

FAULT_STATUSES = {
    "400": 400,
    "401": 401,
    "403": 403,
    "404": 404,
    "429": 429,
    "500": 500,
    "502": 502,
    "503": 503,
    "504": 504,
    "529": 529,
}
FAULT_KINDS = ("timeout", "truncate", "malformed", "reset")


@dataclass
class Behaviour:
    """Answers to what the reference leaves UNCONFIRMED, and test knobs. Change them freely."""

    max_page_buckets: int | None = None
    """Return at most this many buckets per page whatever ``limit`` says (forces many pages)."""
    limit_over_max: str = "reject"
    """A ``limit`` above the width's maximum: ``"reject"`` (400) or ``"clamp"``. UNCONFIRMED."""
    lag_s: float = 0.0
    """Usage of a minute becomes visible this long after the minute starts. UNCONFIRMED."""
    openai_amount_as_string: bool | None = False
    """OpenAI ``amount.value`` as a JSON string (True), a number (False) or alternating (None)."""
    openai_cost_today: bool = True
    """OpenAI returns today's partial cost bucket."""
    openai_embeddings_404: bool = False
    """The OpenAI embeddings usage endpoint answers 404 (an organization or proxy without it)."""
    reject_future_end: bool = False
    """Refuse an ``end_time``/``ending_at`` after now with a 400. UNCONFIRMED either way."""
    anthropic_partial_bucket: bool = True
    """Anthropic returns the in-progress bucket with its counts so far. UNCONFIRMED."""
    anthropic_empty_buckets: bool = True
    """Anthropic returns buckets with no usage (``results: []``) rather than leaving them out."""
    anthropic_cost_today: bool = False
    """Anthropic's cost report returns today's partial day. UNCONFIRMED (assumed not)."""
    anthropic_cost_reject_today_start: bool = True
    """A cost ``starting_at`` inside today gets 400 "Invalid date range" (observed, third party)."""
    extra_fields: bool = False
    """Add unknown keys to pages, buckets and results, and the newest optional fields."""
    omit_optional: bool = False
    """Leave out every optional key (null dimensions, cached/audio tokens, nested objects)."""
    accept_comma_arrays: bool = False
    """Also split array values on commas. UNCONFIRMED for the real APIs."""
    rate_limit_per_minute: int | None = None
    """Answer 429 once more than this many API requests came in within 60 s (wall clock)."""
    rate_limit_retry_after: str | None = "1"
    """``Retry-After`` of those 429s; ``None`` leaves it out (UNCONFIRMED for Anthropic)."""
    padding_bytes: int = 0
    """Add a ``padding`` string of this many bytes to every successful page (a huge page)."""
    close_delimited: bool = False
    """Send successful pages without ``Content-Length``, the body ended by closing the
    connection (so a client cannot know the size before reading)."""


@dataclass
class Fault:
    """A scripted failure: ``kind`` on the ``nth`` request whose path contains ``path``."""

    kind: str
    nth: int | None = None
    """1-based among matching requests counted from when the fault was added; None: the next."""
    times: int = 1
    path: str = ""
    retry_after: str | tuple[str, ...] | None = None
    """One ``Retry-After`` header, or several (each its own header line)."""
    delay_s: float = 2.0
    """How long a ``timeout`` fault stalls before answering."""
    message: str | None = None
    """The error message of a status fault (default ``fake <status>``)."""
    seen: int = 0
    fired: int = 0

    def matches(self, path: str) -> bool:
        """Count a request on ``path`` and say whether this fault fires on it."""
        if self.path not in path:
            return False
        self.seen += 1
        first = self.nth or 1
        if first <= self.seen < first + self.times:
            self.fired += 1
            return True
        return False


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received."""

    method: str
    path: str
    query: dict[str, list[str]]
    """Array parameters under their bare name (``group_by``), whichever form was sent."""
    raw_query: str
    headers: dict[str, str]
    """Lower-cased names."""
    status: int = 0
    fault: str = ""

    @property
    def provider(self) -> str:
        """``openai`` or ``anthropic`` by path."""
        return "anthropic" if self.path.startswith("/v1/organizations/") else "openai"

    def param(self, name: str) -> str | None:
        """The first value of a parameter."""
        values = self.query.get(name)
        return values[0] if values else None


class ApiError(Exception):
    """Answered as the provider's error envelope."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


def _epoch(when: datetime) -> int:
    return int(when.timestamp())


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(value: str, name: str) -> int:
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ApiError(400, "invalid_request_error", f"{name}: invalid datetime") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return _epoch(when)


def _cursor(offset: int) -> str:
    return "page_" + base64.b64encode(f"offset:{offset}".encode()).decode()


def _offset(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        raw = base64.b64decode(cursor.removeprefix("page_")).decode()
        return int(raw.removeprefix("offset:"))
    except ValueError:
        raise ApiError(400, "invalid_request_error", "page: invalid cursor") from None


class FakeProviderServer:
    """Both providers' admin usage and cost APIs on ``127.0.0.1``.

    Args:
        now: the server's clock; ``None`` follows the wall clock. Change it with
            :meth:`set_now` / :meth:`advance`.
        port: 0 picks a free one.
        openai_key, anthropic_key: the admin keys it accepts. A key starting ``sk-proj-`` (OpenAI)
            or ``sk-ant-api`` (Anthropic) is answered 403; any other wrong key 401.
        behaviour: the tunables; ``server.behaviour`` can also be changed between requests.
    """

    def __init__(
        self,
        *,
        now: datetime | None = None,
        port: int = 0,
        openai_key: str = OPENAI_KEY,
        anthropic_key: str = ANTHROPIC_KEY,
        behaviour: Behaviour | None = None,
    ) -> None:
        self.openai_key = openai_key
        self.anthropic_key = anthropic_key
        self.behaviour = behaviour or Behaviour()
        self.requests: list[RecordedRequest] = []
        self._now = now
        self._port = port
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._faults: list[Fault] = []
        self._openai: dict[tuple[int, tuple[Any, ...]], dict[str, int]] = {}
        self._openai_embeddings: dict[tuple[int, tuple[Any, ...]], dict[str, int]] = {}
        self._anthropic: dict[tuple[int, tuple[Any, ...]], dict[str, int]] = {}
        self._openai_costs: dict[tuple[int, tuple[Any, ...]], Decimal] = {}
        self._anthropic_costs: dict[tuple[int, tuple[Any, ...]], Decimal] = {}
        self._rate_window: list[float] = []
        self._amount_flip = False
        self._seeded_openai: set[tuple[Any, ...]] = set()
        self._seeded_embeddings: set[tuple[Any, ...]] = set()
        self._seeded_anthropic: set[tuple[Any, ...]] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----- lifecycle

    def start(self) -> FakeProviderServer:
        """Bind and serve in a daemon thread; returns self."""
        handler = type("Handler", (_Handler,), {"fake": self})
        httpd = ThreadingHTTPServer(("127.0.0.1", self._port), handler)
        httpd.daemon_threads = True
        httpd.block_on_close = False
        self._httpd = httpd
        self._stopping.clear()
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; stalled (``timeout``) answers are released."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeProviderServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        if self._httpd is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def openai_base_url(self) -> str:
        """What ``TOKENTOP_OPENAI_BASE_URL`` should be."""
        return self.url + "/v1"

    @property
    def anthropic_base_url(self) -> str:
        """What ``TOKENTOP_ANTHROPIC_BASE_URL`` should be."""
        return self.url

    # ----- clock

    def now(self) -> datetime:
        """The server's current time (usable as a collector or runner clock)."""
        with self._lock:
            return self._now if self._now is not None else datetime.now(UTC)

    def _usage_now(self) -> int:
        """The clock in whole seconds for the usage endpoints, rounded up, so that the minute
        holding now (which :meth:`seed` and :meth:`grow_newest` fill) shows from its first
        instant: truncated, a minute would stay hidden for its first second, and a collect in
        that second would miss what was just added to it."""
        return math.ceil(self.now().timestamp())

    def set_now(self, when: datetime | None) -> None:
        """Freeze the clock at ``when`` (None: follow the wall clock)."""
        with self._lock:
            self._now = when

    def advance(self, seconds: float) -> datetime:
        """Move a frozen clock forward; returns the new time."""
        with self._lock:
            self._now = self.now() + timedelta(seconds=seconds)
            return self._now

    # ----- faults and records

    def fault(
        self,
        kind: str,
        *,
        nth: int | None = None,
        times: int = 1,
        path: str = "",
        retry_after: str | tuple[str, ...] | None = None,
        delay_s: float = 2.0,
        message: str | None = None,
    ) -> Fault:
        """Script a failure.

        Args:
            kind: an HTTP status (``"429"``, ``"500"``, ``"529"``, ``"401"``…) answered with the
                provider's error envelope, or ``"timeout"`` (stall ``delay_s`` then answer),
                ``"truncate"`` (Content-Length larger than the body sent, then close),
                ``"malformed"`` (a cut JSON body with a matching Content-Length) or ``"reset"``
                (close without answering).
            nth: fire on the nth request matching ``path`` (1-based, counted from now);
                ``None`` fires on the next.
            times: fire on this many consecutive matching requests.
            path: a substring of the request path (``"usage"``, ``"cost"``, ``"organizations"``).
            retry_after: the ``Retry-After`` header of a status fault; a tuple sends the
                header once per value (as a server that repeats it does).
            delay_s: the stall of a ``timeout`` fault.
            message: the error message of a status fault.
        """
        if kind not in FAULT_STATUSES and kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}")
        fault = Fault(kind, nth, times, path, retry_after, delay_s, message)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Drop every scripted fault."""
        with self._lock:
            self._faults.clear()

    def clear_requests(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self.requests.clear()

    def requests_to(self, path_part: str) -> list[RecordedRequest]:
        """Recorded requests whose path contains ``path_part``."""
        with self._lock:
            return [r for r in self.requests if path_part in r.path]

    # ----- data

    def add_openai_usage(
        self,
        at: datetime,
        model: str,
        *,
        project_id: str | None = None,
        user_id: str | None = None,
        api_key_id: str | None = None,
        batch: bool | None = None,
        service_tier: str | None = None,
        replace: bool = False,
        **counters: int,
    ) -> None:
        """Add (or with ``replace`` set) counters of the minute holding ``at``.

        Counters are :data:`OPENAI_COUNTERS`; ``input_tokens`` includes cached and cache-write
        tokens, as the API's does.
        """
        dims = (model, project_id, user_id, api_key_id, batch, service_tier)
        self._put(self._openai, OPENAI_COUNTERS, at, dims, counters, replace)

    def add_openai_embeddings(
        self,
        at: datetime,
        model: str,
        input_tokens: int,
        num_model_requests: int,
        *,
        project_id: str | None = None,
        user_id: str | None = None,
        api_key_id: str | None = None,
        replace: bool = False,
    ) -> None:
        """Add (or with ``replace`` set) embeddings usage of the minute holding ``at``."""
        dims = (model, project_id, user_id, api_key_id)
        counters = {"input_tokens": input_tokens, "num_model_requests": num_model_requests}
        self._put(self._openai_embeddings, OPENAI_EMBEDDING_COUNTERS, at, dims, counters, replace)

    def add_anthropic_usage(
        self,
        at: datetime,
        model: str,
        *,
        api_key_id: str | None = None,
        workspace_id: str | None = None,
        service_tier: str | None = None,
        context_window: str | None = None,
        inference_geo: str | None = None,
        replace: bool = False,
        **counters: int,
    ) -> None:
        """Add (or with ``replace`` set) counters of the minute holding ``at``.

        Counters are :data:`ANTHROPIC_COUNTERS` (the two cache-write ones flat:
        ``ephemeral_5m_input_tokens``, ``ephemeral_1h_input_tokens``).
        """
        dims = (model, api_key_id, workspace_id, service_tier, context_window, inference_geo)
        self._put(self._anthropic, ANTHROPIC_COUNTERS, at, dims, counters, replace)

    def remove_usage(self, provider: str, at: datetime, model: str | None = None) -> None:
        """Revise a minute away: drop its rows (of one model, or all; OpenAI: embeddings too)."""
        minute = _epoch(at) // 60 * 60
        tables = (self._openai, self._openai_embeddings) if provider == "openai" else ()
        with self._lock:
            for table in tables or (self._anthropic,):
                for key in [k for k in table if k[0] == minute]:
                    if model is None or key[1][0] == model:
                        del table[key]

    def add_openai_cost(
        self,
        day: datetime,
        usd: Decimal | str,
        *,
        project_id: str | None = None,
        line_item: str | None = None,
        api_key_id: str | None = None,
        replace: bool = False,
    ) -> None:
        """Add a billed amount in USD to the UTC day holding ``day``."""
        key = (_epoch(day) // 86400 * 86400, (project_id, line_item, api_key_id))
        with self._lock:
            old = Decimal(0) if replace else self._openai_costs.get(key, Decimal(0))
            self._openai_costs[key] = old + Decimal(usd)

    def add_anthropic_cost(
        self,
        day: datetime,
        cents: Decimal | str,
        *,
        workspace_id: str | None = None,
        description: str | None = None,
        cost_type: str | None = None,
        model: str | None = None,
        service_tier: str | None = None,
        context_window: str | None = None,
        token_type: str | None = None,
        replace: bool = False,
    ) -> None:
        """Add a billed amount in CENTS to the UTC day holding ``day``."""
        dims = (workspace_id, description, cost_type, model, service_tier, context_window)
        key = (_epoch(day) // 86400 * 86400, (*dims, token_type))
        with self._lock:
            old = Decimal(0) if replace else self._anthropic_costs.get(key, Decimal(0))
            self._anthropic_costs[key] = old + Decimal(cents)

    def seed(
        self,
        hours: float = 24.0,
        *,
        end: datetime | None = None,
        seed: int = 0,
        openai_models: Iterable[str] = ("gpt-4o-mini-2024-07-18", "gpt-4o-2024-08-06"),
        anthropic_models: Iterable[str] = ("claude-sonnet-4-20250514", "claude-3-5-haiku-20241022"),
        density: float = 0.8,
        embeddings: bool = False,
        embedding_models: Iterable[str] = ("text-embedding-3-small", "text-embedding-3-large"),
    ) -> None:
        """Fill ``hours`` of deterministic 1-minute traffic for both providers, ending at the
        minute holding ``end`` (default: now, the open minute included), plus daily costs.

        Each model gets usage in about ``density`` of the minutes (others stay empty), spread
        over two projects/workspaces and two API keys. With ``embeddings`` set, OpenAI
        embeddings usage (and its cost) is added too, from a random stream of its own: the
        completions and Anthropic traffic are the same with it or without it.
        """
        if embeddings:
            self._seed_embeddings(hours, end, seed, tuple(embedding_models), density)
        rng = random.Random(seed)
        last = _epoch(end or self.now()) // 60 * 60
        first = last - int(hours * 3600) + 60
        oa_models, an_models = tuple(openai_models), tuple(anthropic_models)
        for minute in range(first, last + 60, 60):
            at = datetime.fromtimestamp(minute, tz=UTC)
            for i, model in enumerate(oa_models):
                if rng.random() >= density:
                    continue
                requests = rng.randint(1, 6)
                cached = rng.randint(0, 400) * requests
                uncached = rng.randint(100, 2000) * requests
                output = rng.randint(20, 600) * requests
                dims: dict[str, Any] = {
                    "project_id": ("proj_alpha", "proj_beta")[(minute // 60 + i) % 2],
                    "api_key_id": ("key_live01", "key_test02")[i % 2],
                    "batch": False,
                    "service_tier": "default",
                }
                self.add_openai_usage(
                    at,
                    model,
                    input_tokens=uncached + cached,
                    input_cached_tokens=cached,
                    output_tokens=output,
                    num_model_requests=requests,
                    **dims,
                )
                self._seeded_openai.add(
                    (model, dims["project_id"], None, dims["api_key_id"], False, "default")
                )
                self.add_openai_cost(
                    at,
                    Decimal(uncached + cached) * Decimal("0.000001")
                    + Decimal(output) * Decimal("0.000004"),
                    project_id=dims["project_id"],
                    line_item=f"{model}, input and output",
                )
            for i, model in enumerate(an_models):
                if rng.random() >= density:
                    continue
                uncached = rng.randint(100, 3000)
                read = rng.randint(0, 5000)
                w5 = rng.randint(0, 300)
                w1 = rng.randint(0, 100) if i == 0 else 0
                output = rng.randint(20, 900)
                searches = rng.randint(0, 2) if i == 0 else 0
                adims: dict[str, Any] = {
                    "api_key_id": ("apikey_01Alpha", "apikey_01Beta")[(minute // 60) % 2],
                    "workspace_id": (None, "wrkspc_01Team")[i % 2],
                    "service_tier": "standard",
                    "context_window": "0-200k",
                }
                self.add_anthropic_usage(
                    at,
                    model,
                    uncached_input_tokens=uncached,
                    cache_read_input_tokens=read,
                    ephemeral_5m_input_tokens=w5,
                    ephemeral_1h_input_tokens=w1,
                    output_tokens=output,
                    web_search_requests=searches,
                    **adims,
                )
                self._seeded_anthropic.add((model, *adims.values(), None))
                self.add_anthropic_cost(
                    at,
                    (Decimal(uncached + read + w5 + w1) * Decimal("0.0003"))
                    + Decimal(output) * Decimal("0.0015"),
                    workspace_id=adims["workspace_id"],
                    description=f"{model} Usage - Tokens",
                    cost_type="tokens",
                    model=model,
                    service_tier="standard",
                    context_window="0-200k",
                )

    def _seed_embeddings(
        self,
        hours: float,
        end: datetime | None,
        seed: int,
        models: tuple[str, ...],
        density: float,
    ) -> None:
        rng = random.Random(f"embeddings-{seed}")
        last = _epoch(end or self.now()) // 60 * 60
        first = last - int(hours * 3600) + 60
        for minute in range(first, last + 60, 60):
            at = datetime.fromtimestamp(minute, tz=UTC)
            for i, model in enumerate(models):
                if rng.random() >= density:
                    continue
                requests = rng.randint(1, 20)
                tokens = rng.randint(5, 3000) * requests
                project = ("proj_alpha", "proj_beta")[(minute // 60 + i) % 2]
                key = ("key_live01", "key_test02")[i % 2]
                self.add_openai_embeddings(
                    at, model, tokens, requests, project_id=project, api_key_id=key
                )
                self._seeded_embeddings.add((model, project, None, key))
                self.add_openai_cost(
                    at,
                    Decimal(tokens) * Decimal("0.00000002"),
                    project_id=project,
                    line_item=f"{model}, input",
                )

    def grow_newest(self, provider: str | None = None, **counters: int) -> datetime:
        """Add to the open minute (holding now) for every seeded group of ``provider`` (or both).

        Defaults to 1000 more output tokens (OpenAI: and one more request). Returns the minute.
        """
        minute = datetime.fromtimestamp(_epoch(self.now()) // 60 * 60, tz=UTC)
        if provider in (None, "openai"):
            add = counters or {"output_tokens": 1000, "num_model_requests": 1}
            add = {k: v for k, v in add.items() if k in OPENAI_COUNTERS}
            groups = self._seeded_openai or {("gpt-4o-mini-2024-07-18", *[None] * 5)}
            for dims in sorted(groups, key=str):
                self._put(self._openai, OPENAI_COUNTERS, minute, dims, add, False)
        if provider in (None, "anthropic"):
            add = counters or {"output_tokens": 1000}
            add = {k: v for k, v in add.items() if k in ANTHROPIC_COUNTERS}
            groups = self._seeded_anthropic or {("claude-sonnet-4-20250514", *[None] * 5)}
            for dims in sorted(groups, key=str):
                self._put(self._anthropic, ANTHROPIC_COUNTERS, minute, dims, add, False)
        return minute

    def usage_totals(
        self, provider: str, start: datetime | None = None, end: datetime | None = None
    ) -> dict[str, int]:
        """Ground truth over minutes in ``[start, end)`` in tokentop's kinds (OpenAI: completions
        and embeddings together).

        Keys: ``input_uncached``, ``cache_read``, ``cache_write_5m``, ``cache_write_1h``,
        ``output``, ``requests``, ``web_searches``.
        """
        lo = _epoch(start) if start else -(2**62)
        hi = _epoch(end) if end else 2**62
        out = dict.fromkeys(
            (
                "input_uncached",
                "cache_read",
                "cache_write_5m",
                "cache_write_1h",
                "output",
                "requests",
                "web_searches",
            ),
            0,
        )
        with self._lock:
            if provider == "openai":
                for (minute, _), c in self._openai.items():
                    if lo <= minute < hi:
                        written = c.get("input_cache_write_tokens", 0)
                        cached = c.get("input_cached_tokens", 0)
                        out["input_uncached"] += c.get("input_tokens", 0) - cached - written
                        out["cache_read"] += cached
                        out["cache_write_5m"] += written
                        out["output"] += c.get("output_tokens", 0)
                        out["requests"] += c.get("num_model_requests", 0)
                for (minute, _), c in self._openai_embeddings.items():
                    if lo <= minute < hi:
                        out["input_uncached"] += c.get("input_tokens", 0)
                        out["requests"] += c.get("num_model_requests", 0)
            else:
                for (minute, _), c in self._anthropic.items():
                    if lo <= minute < hi:
                        out["input_uncached"] += c.get("uncached_input_tokens", 0)
                        out["cache_read"] += c.get("cache_read_input_tokens", 0)
                        out["cache_write_5m"] += c.get("ephemeral_5m_input_tokens", 0)
                        out["cache_write_1h"] += c.get("ephemeral_1h_input_tokens", 0)
                        out["output"] += c.get("output_tokens", 0)
                        out["web_searches"] += c.get("web_search_requests", 0)
        return out

    def cost_total(
        self, provider: str, start: datetime | None = None, end: datetime | None = None
    ) -> Decimal:
        """Ground truth billed USD over UTC days in ``[start, end)``."""
        lo = _epoch(start) if start else -(2**62)
        hi = _epoch(end) if end else 2**62
        with self._lock:
            if provider == "openai":
                return sum(
                    (v for (d, _), v in self._openai_costs.items() if lo <= d < hi), Decimal(0)
                )
            cents = sum(
                (v for (d, _), v in self._anthropic_costs.items() if lo <= d < hi), Decimal(0)
            )
            return cents.scaleb(-2)

    def _put(
        self,
        table: dict[tuple[int, tuple[Any, ...]], dict[str, int]],
        names: tuple[str, ...],
        at: datetime,
        dims: tuple[Any, ...],
        counters: Mapping[str, int],
        replace: bool,
    ) -> None:
        unknown = set(counters) - set(names)
        if unknown:
            raise TypeError(f"unknown counters {sorted(unknown)}; expected some of {names}")
        key = (_epoch(at) // 60 * 60, dims)
        with self._lock:
            row = {} if replace else table.setdefault(key, {})
            for name, value in counters.items():
                row[name] = row.get(name, 0) + value
            table[key] = row

    # ----- request handling (runs on handler threads)

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(path):
                    return fault
        return None

    def _rate_limited(self, wall: float) -> bool:
        limit = self.behaviour.rate_limit_per_minute
        if limit is None:
            return False
        with self._lock:
            self._rate_window = [t for t in self._rate_window if wall - t < 60]
            self._rate_window.append(wall)
            return len(self._rate_window) > limit

    def _route(
        self, path: str, query: dict[str, list[str]], headers: Mapping[str, str]
    ) -> dict[str, Any]:
        if path == OPENAI_EMBEDDINGS and self.behaviour.openai_embeddings_404:
            raise ApiError(404, "invalid_request_error", f"Invalid URL (GET {path})")
        if path in (OPENAI_USAGE, OPENAI_EMBEDDINGS, OPENAI_COSTS):
            self._check_openai_auth(headers)
            if path == OPENAI_USAGE:
                return self._openai_usage(query)
            if path == OPENAI_EMBEDDINGS:
                return self._openai_embeddings_usage(query)
            return self._openai_cost(query)
        if path in (ANTHROPIC_USAGE, ANTHROPIC_COSTS):
            self._check_anthropic_auth(headers)
            if path == ANTHROPIC_USAGE:
                return self._anthropic_usage(query)
            return self._anthropic_cost(query)
        raise ApiError(404, "not_found_error", f"Unknown path {path}")

    def _check_openai_auth(self, headers: Mapping[str, str]) -> None:
        given = headers.get("authorization", "")
        if given == f"Bearer {self.openai_key}":
            return
        key = given.removeprefix("Bearer ").strip()
        if key.startswith("sk-proj-"):
            raise ApiError(
                403, "invalid_request_error", "You have insufficient permissions: api.usage.read"
            )
        # The real API echoes a masked key; echo it whole so a test can prove the collector
        # never passes it on.
        raise ApiError(401, "invalid_request_error", f"Incorrect API key provided: {key}.")

    def _check_anthropic_auth(self, headers: Mapping[str, str]) -> None:
        key = headers.get("x-api-key", "")
        if key != self.anthropic_key:
            if key.startswith("sk-ant-api"):
                raise ApiError(403, "permission_error", "This endpoint needs an Admin API key")
            raise ApiError(401, "authentication_error", f"invalid x-api-key {key}")
        if not headers.get("anthropic-version"):
            raise ApiError(400, "invalid_request_error", "anthropic-version: header is required")

    def _arrays(self, query: dict[str, list[str]], name: str) -> list[str]:
        values = query.get(name, [])
        if self.behaviour.accept_comma_arrays:
            values = [part for v in values for part in v.split(",") if part]
        return values

    def _limit(self, query: dict[str, list[str]], default: int, maximum: int) -> int:
        raw = query.get("limit", [str(default)])[0]
        try:
            limit = int(raw)
        except ValueError:
            raise ApiError(400, "invalid_request_error", "limit: not an integer") from None
        if limit < 1:
            raise ApiError(400, "invalid_request_error", "limit: must be at least 1")
        if limit > maximum:
            if self.behaviour.limit_over_max == "reject":
                raise ApiError(400, "invalid_request_error", f"limit: must be at most {maximum}")
            limit = maximum
        cap = self.behaviour.max_page_buckets
        return min(limit, cap) if cap else limit

    def _page(
        self,
        buckets: list[dict[str, Any]],
        query: dict[str, list[str]],
        limit: int,
        openai: bool,
    ) -> dict[str, Any]:
        offset = _offset(query.get("page", [None])[0])
        chunk = buckets[offset : offset + limit]
        more = offset + limit < len(buckets)
        page: dict[str, Any] = {
            "data": chunk,
            "has_more": more,
            "next_page": _cursor(offset + limit) if more else None,
        }
        if openai:
            page = {"object": "page", **page}
        if self.behaviour.extra_fields:
            page["x_unknown_page_field"] = {"nested": [1, 2, 3]}
        return page

    def _group(
        self,
        rows: Iterable[tuple[tuple[Any, ...], Mapping[str, Any]]],
        dims: tuple[str, ...],
        group_by: list[str],
    ) -> dict[tuple[Any, ...], dict[str, Any]]:
        """Sum rows per combination of the grouped dims; ungrouped dims become None."""
        keep = [d in group_by for d in dims]
        groups: dict[tuple[Any, ...], dict[str, Any]] = {}
        for values, counters in rows:
            key = tuple(v if k else None for v, k in zip(values, keep, strict=True))
            acc = groups.setdefault(key, {})
            for name, value in counters.items():
                acc[name] = acc.get(name, 0) + value
        return groups

    def _window(
        self, query: dict[str, list[str]], start: int, width: int, now: int, openai: bool
    ) -> Iterator[tuple[int, int]]:
        """Bucket edges. OpenAI: first clipped to start, last clipped to now. Anthropic:
        snapped to the width, the in-progress one per behaviour."""
        end_name = "end_time" if openai else "ending_at"
        raw_end = query.get(end_name, [None])[0]
        if raw_end is None:
            end = now
        else:
            end = int(raw_end) if openai else _parse_iso(raw_end, end_name)
            if end > now and self.behaviour.reject_future_end:
                raise ApiError(
                    400, "invalid_request_error", f"{end_name}: must not be in the future"
                )
        if openai:
            end = min(end, now)
            b = start
            while b < end:
                nb = min((b // width + 1) * width, end)
                yield b, nb
                b = nb
            return
        b = start // width * width
        while b < now:
            nb = b + width
            if raw_end is not None and nb > end:
                return
            if nb > now and not self.behaviour.anthropic_partial_bucket:
                return
            yield b, nb
            b = nb

    def _index(
        self,
        table: dict[tuple[int, tuple[Any, ...]], dict[str, int]],
        now: int,
        models: set[str],
    ) -> dict[int, list[tuple[tuple[Any, ...], dict[str, int]]]]:
        """Visible rows by minute; a minute shows ``lag_s`` after it starts."""
        index: dict[int, list[tuple[tuple[Any, ...], dict[str, int]]]] = {}
        with self._lock:
            for (minute, dims), counters in table.items():
                if minute > now - self.behaviour.lag_s or (models and dims[0] not in models):
                    continue
                index.setdefault(minute, []).append((dims, dict(counters)))
        return index

    def _openai_usage(self, query: dict[str, list[str]]) -> dict[str, Any]:
        return self._openai_usage_page(query, self._openai, OPENAI_DIMS, self._openai_result)

    def _openai_embeddings_usage(self, query: dict[str, list[str]]) -> dict[str, Any]:
        return self._openai_usage_page(
            query, self._openai_embeddings, OPENAI_EMBEDDING_DIMS, self._openai_embeddings_result
        )

    def _openai_usage_page(
        self,
        query: dict[str, list[str]],
        table: dict[tuple[int, tuple[Any, ...]], dict[str, int]],
        all_dims: tuple[str, ...],
        result_of: Callable[[tuple[Any, ...], Mapping[str, int]], dict[str, Any]],
    ) -> dict[str, Any]:
        width_name = query.get("bucket_width", ["1d"])[0]
        if width_name not in WIDTHS:
            raise ApiError(400, "invalid_request_error", f"bucket_width: invalid {width_name}")
        width = WIDTHS[width_name]
        limit = self._limit(query, *USAGE_LIMITS[width_name])
        try:
            start = int(query["start_time"][0])
        except (KeyError, ValueError):
            raise ApiError(400, "invalid_request_error", "start_time: required integer") from None
        group_by = self._arrays(query, "group_by")
        for g in group_by:
            if g not in all_dims:
                raise ApiError(400, "invalid_request_error", f"group_by: invalid value {g}")
        models = set(self._arrays(query, "models"))
        now = self._usage_now()
        index = self._index(table, now, models)
        buckets = []
        for b, nb in self._window(query, start, width, now, openai=True):
            inside = [row for m in range(-(-b // 60) * 60, nb, 60) for row in index.get(m, ())]
            results = []
            for dims, c in self._group(inside, all_dims, group_by).items():
                results.append(result_of(dims, c))
            bucket: dict[str, Any] = {
                "object": "bucket",
                "start_time": b,
                "end_time": nb,
                "results": results,
            }
            if self.behaviour.extra_fields:
                bucket["start_time_iso"] = _iso(b)
            buckets.append(bucket)
        return self._page(buckets, query, limit, openai=True)

    def _openai_result(self, dims: tuple[Any, ...], c: Mapping[str, int]) -> dict[str, Any]:
        result: dict[str, Any] = {
            "object": "organization.usage.completions.result",
            "input_tokens": c.get("input_tokens", 0),
            "output_tokens": c.get("output_tokens", 0),
            "num_model_requests": c.get("num_model_requests", 0),
        }
        optional: dict[str, Any] = {
            "input_cached_tokens": c.get("input_cached_tokens", 0),
            "input_audio_tokens": c.get("input_audio_tokens", 0),
            "output_audio_tokens": c.get("output_audio_tokens", 0),
        }
        if "input_cache_write_tokens" in c:
            optional["input_cache_write_tokens"] = c["input_cache_write_tokens"]
        optional.update(zip(OPENAI_DIMS, dims, strict=True))
        if self.behaviour.omit_optional:
            # Drop nulls and zero optional counters: the reader must default them.
            optional = {k: v for k, v in optional.items() if v}
        result.update(optional)
        if self.behaviour.extra_fields:
            written = c.get("input_cache_write_tokens", 0)
            cached = c.get("input_cached_tokens", 0)
            result["input_uncached_tokens"] = c.get("input_tokens", 0) - cached - written
            result["output_text_tokens"] = c.get("output_tokens", 0)
            result["some_future_metric"] = {"a": 1}
        return result

    def _openai_embeddings_result(
        self, dims: tuple[Any, ...], c: Mapping[str, int]
    ) -> dict[str, Any]:
        result: dict[str, Any] = {
            "object": "organization.usage.embeddings.result",
            "input_tokens": c.get("input_tokens", 0),
            "num_model_requests": c.get("num_model_requests", 0),
        }
        optional: dict[str, Any] = dict(zip(OPENAI_EMBEDDING_DIMS, dims, strict=True))
        if self.behaviour.omit_optional:
            optional = {k: v for k, v in optional.items() if v is not None}
        result.update(optional)
        if self.behaviour.extra_fields:
            result["some_future_metric"] = {"a": 1}
        return result

    def _openai_cost(self, query: dict[str, list[str]]) -> dict[str, Any]:
        if query.get("bucket_width", ["1d"])[0] != "1d":
            raise ApiError(400, "invalid_request_error", "bucket_width: only 1d is supported")
        limit = self._limit(query, 7, 180)
        try:
            start = int(query["start_time"][0])
        except (KeyError, ValueError):
            raise ApiError(400, "invalid_request_error", "start_time: required integer") from None
        group_by = self._arrays(query, "group_by")
        for g in group_by:
            if g not in OPENAI_COST_DIMS:
                raise ApiError(400, "invalid_request_error", f"group_by: invalid value {g}")
        now = _epoch(self.now())
        today = now // 86400 * 86400
        with self._lock:
            rows = list(self._openai_costs.items())
        buckets = []
        for b, nb in self._window(query, start, 86400, now, openai=True):
            if b >= today and not self.behaviour.openai_cost_today:
                break
            inside = [(dims, {"v": v}) for (day, dims), v in rows if day == b // 86400 * 86400]
            results = []
            for dims, acc in self._group(inside, OPENAI_COST_DIMS, group_by).items():
                results.append(self._openai_cost_result(dims, acc["v"]))
            buckets.append(
                {"object": "bucket", "start_time": b, "end_time": nb, "results": results}
            )
        return self._page(buckets, query, limit, openai=True)

    def _openai_cost_result(self, dims: tuple[Any, ...], value: Decimal) -> dict[str, Any]:
        as_string = self.behaviour.openai_amount_as_string
        if as_string is None:
            with self._lock:
                self._amount_flip = not self._amount_flip
                as_string = self._amount_flip
        amount: Any = format(value, "f") if as_string else float(value)
        result: dict[str, Any] = {
            "object": "organization.costs.result",
            "amount": {"value": amount, "currency": "usd"},
        }
        optional = dict(zip(OPENAI_COST_DIMS, dims, strict=True))
        optional.update(quantity=None, quantity_unit=None)
        if self.behaviour.omit_optional:
            optional = {k: v for k, v in optional.items() if v is not None}
        result.update(optional)
        if self.behaviour.extra_fields:
            result["amount"]["list_value"] = "0"
        return result

    def _anthropic_usage(self, query: dict[str, list[str]]) -> dict[str, Any]:
        width_name = query.get("bucket_width", ["1d"])[0]
        if width_name not in WIDTHS:
            raise ApiError(400, "invalid_request_error", f"bucket_width: invalid {width_name}")
        width = WIDTHS[width_name]
        limit = self._limit(query, *USAGE_LIMITS[width_name])
        if "starting_at" not in query:
            raise ApiError(400, "invalid_request_error", "starting_at: Field required")
        start = _parse_iso(query["starting_at"][0], "starting_at")
        group_by = self._arrays(query, "group_by")
        for g in group_by:
            if g not in ANTHROPIC_GROUPABLE:
                raise ApiError(400, "invalid_request_error", f"group_by: invalid value {g}")
        models = set(self._arrays(query, "models"))
        now = self._usage_now()
        index = self._index(self._anthropic, now, models)
        buckets = []
        for b, nb in self._window(query, start, width, now, openai=False):
            inside = [row for m in range(-(-b // 60) * 60, nb, 60) for row in index.get(m, ())]
            results = [
                self._anthropic_result(dims, c)
                for dims, c in self._group(inside, ANTHROPIC_DIMS, group_by).items()
            ]
            if not results and not self.behaviour.anthropic_empty_buckets:
                continue
            bucket: dict[str, Any] = {
                "starting_at": _iso(b),
                "ending_at": _iso(nb),
                "results": results,
            }
            if self.behaviour.extra_fields:
                bucket["x_partial"] = nb > now
            buckets.append(bucket)
        return self._page(buckets, query, limit, openai=False)

    def _anthropic_result(self, dims: tuple[Any, ...], c: Mapping[str, int]) -> dict[str, Any]:
        result: dict[str, Any] = {
            "uncached_input_tokens": c.get("uncached_input_tokens", 0),
            "cache_creation": {
                "ephemeral_1h_input_tokens": c.get("ephemeral_1h_input_tokens", 0),
                "ephemeral_5m_input_tokens": c.get("ephemeral_5m_input_tokens", 0),
            },
            "cache_read_input_tokens": c.get("cache_read_input_tokens", 0),
            "output_tokens": c.get("output_tokens", 0),
            "server_tool_use": {"web_search_requests": c.get("web_search_requests", 0)},
        }
        result.update(zip(ANTHROPIC_DIMS, dims, strict=True))
        result.update(account_id=None, service_account_id=None)
        if self.behaviour.omit_optional:
            result = {k: v for k, v in result.items() if v is not None}
            if not c.get("web_search_requests"):
                del result["server_tool_use"]
            if not c.get("ephemeral_1h_input_tokens") and not c.get("ephemeral_5m_input_tokens"):
                del result["cache_creation"]
        if self.behaviour.extra_fields:
            result["speed"] = "standard"
            result["x_future"] = {"nested": True}
            if "cache_creation" in result:
                result["cache_creation"]["ephemeral_24h_input_tokens"] = 0
        return result

    def _anthropic_cost(self, query: dict[str, list[str]]) -> dict[str, Any]:
        if query.get("bucket_width", ["1d"])[0] != "1d":
            raise ApiError(400, "invalid_request_error", "bucket_width: only 1d is supported")
        limit = self._limit(query, 7, 31)
        if "starting_at" not in query:
            raise ApiError(400, "invalid_request_error", "starting_at: Field required")
        start = _parse_iso(query["starting_at"][0], "starting_at") // 86400 * 86400
        group_by = self._arrays(query, "group_by")
        for g in group_by:
            if g not in ("workspace_id", "description"):
                raise ApiError(400, "invalid_request_error", f"group_by: invalid value {g}")
        now = _epoch(self.now())
        today = now // 86400 * 86400
        if start >= today and self.behaviour.anthropic_cost_reject_today_start:
            raise ApiError(
                400,
                "invalid_request_error",
                "Invalid date range: ending date must be after starting date",
            )
        with self._lock:
            rows = list(self._anthropic_costs.items())
        by_description = "description" in group_by
        grouped = ["workspace_id"] if "workspace_id" in group_by else []
        if by_description:
            grouped += list(ANTHROPIC_BY_DESCRIPTION)
        buckets = []
        b = start
        raw_end = query.get("ending_at", [None])[0]
        end = _parse_iso(raw_end, "ending_at") if raw_end else now
        while b < end:
            if b >= today and not self.behaviour.anthropic_cost_today:
                break
            inside = [(dims, {"v": v}) for (day, dims), v in rows if day == b]
            results = []
            for dims, acc in self._group(inside, ANTHROPIC_COST_DIMS, grouped).items():
                item: dict[str, Any] = {"currency": "USD", "amount": format(acc["v"], "f")}
                item.update(zip(ANTHROPIC_COST_DIMS, dims, strict=True))
                item["inference_geo"] = None
                if self.behaviour.omit_optional:
                    item = {k: v for k, v in item.items() if v is not None}
                if self.behaviour.extra_fields:
                    item["x_future"] = 1
                results.append(item)
            buckets.append(
                {"starting_at": _iso(b), "ending_at": _iso(b + 86400), "results": results}
            )
            b += 86400
        return self._page(buckets, query, limit, openai=False)


def _error_body(provider: str, status: int, kind: str, message: str) -> dict[str, Any]:
    if provider == "anthropic":
        return {
            "type": "error",
            "error": {"type": kind, "message": message},
            "request_id": "req_fake0001",
        }
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


_FAULT_KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class _Handler(BaseHTTPRequestHandler):
    fake: FakeProviderServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        fake = self.fake
        split = urlsplit(self.path)
        path = split.path
        query: dict[str, list[str]] = {}
        for name, value in parse_qsl(split.query, keep_blank_values=True):
            query.setdefault(name.removesuffix("[]"), []).append(value)
        headers = {k.lower(): v for k, v in self.headers.items()}
        provider = "anthropic" if path.startswith("/v1/organizations/") else "openai"
        fault = fake._take_fault(path)
        status, body, fault_name = 200, b"", ""
        extra_headers: dict[str, str | tuple[str, ...]] = {}
        if fault is not None and fault.kind in FAULT_STATUSES:
            status = FAULT_STATUSES[fault.kind]
            fault_name = fault.kind
            kind = _FAULT_KINDS[status]
            body = json.dumps(
                _error_body(provider, status, kind, fault.message or f"fake {fault.kind}")
            ).encode()
            if fault.retry_after is not None:
                extra_headers["Retry-After"] = fault.retry_after
        elif fake._rate_limited(time.monotonic()):
            status, fault_name = 429, "rate_limit"
            body = json.dumps(
                _error_body(provider, 429, "rate_limit_error", "Rate limit exceeded")
            ).encode()
            if fake.behaviour.rate_limit_retry_after is not None:
                extra_headers["Retry-After"] = fake.behaviour.rate_limit_retry_after
        else:
            try:
                payload = fake._route(path, query, headers)
            except ApiError as exc:
                status = exc.status
                payload = _error_body(provider, exc.status, exc.kind, exc.message)
            if status == 200 and fake.behaviour.padding_bytes and isinstance(payload, dict):
                payload = {**payload, "padding": "x" * fake.behaviour.padding_bytes}
            body = json.dumps(payload).encode()
        with fake._lock:
            fake.requests.append(
                RecordedRequest(
                    "GET",
                    path,
                    query,
                    split.query,
                    headers,
                    status,
                    fault.kind if fault is not None else fault_name,
                )
            )
        if fault is not None and fault.kind in FAULT_KINDS:
            self._misbehave(fault, body)
            return
        if status == 200 and fake.behaviour.close_delimited:
            self.close_connection = True
            self._send(status, body, {"Connection": "close"}, provider, length=None)
            return
        self._send(status, body, extra_headers, provider)

    def _send(
        self,
        status: int,
        body: bytes,
        extra: Mapping[str, str | tuple[str, ...]],
        provider: str,
        length: int | None = -1,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if length is not None:  # None: no Content-Length, the body ends with the connection
            self.send_header("Content-Length", str(len(body) if length < 0 else length))
        self.send_header("request-id" if provider == "anthropic" else "x-request-id", "req_fake")
        for name, value in extra.items():
            for one in (value,) if isinstance(value, str) else value:
                self.send_header(name, one)
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # the client stopped reading (a body it refused)
            self.close_connection = True

    def _misbehave(self, fault: Fault, body: bytes) -> None:
        provider = "anthropic" if self.path.startswith("/v1/organizations/") else "openai"
        if fault.kind == "timeout":
            if self.fake._stopping.wait(fault.delay_s):
                self.close_connection = True
                return
            try:
                self._send(200, body, {}, provider)
            except OSError:
                self.close_connection = True
            return
        self.close_connection = True
        if fault.kind == "reset":
            self._hard_close()
            return
        cut = body[: max(1, len(body) // 2)]
        if fault.kind == "truncate":
            self._send(200, cut, {}, provider, length=len(body))
            self.wfile.flush()
            self._hard_close()
            return
        # malformed: a complete response of broken JSON
        self._send(200, cut, {"Connection": "close"}, provider)

    def _hard_close(self) -> None:
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> None:
    """Serve a seeded fake until interrupted (for trying the CLI by hand)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embeddings", action="store_true", help="seed OpenAI embeddings too")
    ns = parser.parse_args(argv)
    server = FakeProviderServer(port=ns.port).start()
    server.seed(ns.hours, seed=ns.seed, embeddings=ns.embeddings)
    print(f"export TOKENTOP_OPENAI_BASE_URL={server.openai_base_url}")
    print(f"export TOKENTOP_ANTHROPIC_BASE_URL={server.anthropic_base_url}")
    print(f"export OPENAI_ADMIN_KEY={server.openai_key}")
    print(f"export ANTHROPIC_ADMIN_KEY={server.anthropic_key}")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
