"""Shared plumbing of the admin-API collectors: authenticated JSON GETs, paging, retries, the
mapping of HTTP failures onto :class:`SourceError`, and the per-poll read plan.

The OpenAI and Anthropic collectors differ only in their wire format; the plan (which minutes a
poll reads, when costs are due, how a backfill is split) and the failure rules live here so both
behave the same:

- A poll reads every 1-minute bucket of one range ``[start, end)`` and declares it as a
  :class:`UsageWindow`; the store replaces that range, so re-reading never double counts.
- A first start (no watermark) reads from ``ctx.backfill_start``. Later polls re-read from
  ``trailing_s`` (default an hour) before the stored watermark or before now, whichever is
  earlier: buckets grow while open and are revised while the provider catches up, and a restart
  resumes without a gap. The returned watermark is the poll's ``now`` (or a chunk's end).
- A range longer than ``max_span_s`` (a long first backfill, or a restart after a long stop) is
  read in chunks of that span, one per poll, advancing the watermark and reporting progress, so
  that each poll stays bounded (at the default 26 h span, two pages of 1440 buckets).
- A page that fails with a 5xx (529 included), a timeout, a reset connection or a truncated or
  malformed body is retried a couple of times with short exponential backoff and jitter. If it
  still fails, the whole poll fails: a poll returns complete windows or nothing.
- Billed cost is re-read on the first poll and then every ``cost_interval_s`` (15 min), over
  the last ``cost_lookback_days`` UTC days (and back to the backfill start), up to tomorrow's
  midnight; that day range is declared in ``Batch.billed_days`` for the store to replace. A cost
  read that fails fails the poll too (loudly, rather than billed data going stale unseen); it is
  due again on the next poll.
- 429 fails the poll at once with ``retry_after``; 401/403 fail it with ``auth=True``; 404
  with :class:`NotFound`, which a collector may catch around an endpoint not every account has.
  A 5xx whose ``Retry-After`` is longer than the next backoff fails the poll too, with that
  wait, rather than retrying early. Pacing between polls is the runner's job.
- A response body larger than ``max_response_mb`` (default 20 MB, decoded) is refused as it
  streams in, never read whole: the poll fails and keeps nothing of it.

No message or exception made here carries the key: messages are built from our own words, the
status and the server's error text with anything key-like scrubbed, and they are raised outside
the ``except`` blocks so that no httpx exception (whose request holds the headers) is chained.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import os
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

from tokentop.collectors.base import Clock, PollContext, SourceError, utcnow
from tokentop.collectors.config import ProviderConfig
from tokentop.store.records import Batch, BilledCost, UsageBucket, UsageWindow

Sleep = Callable[[float], Awaitable[None]]
Params = Sequence[tuple[str, str]]

MINUTE = timedelta(minutes=1)
DAY = timedelta(days=1)
MAX_PAGES = 500
"""A guard against a server that never says it is done; 500 pages is far above any real poll."""
MAX_CATCHUP = timedelta(days=31)
"""Oldest point a poll reads, whatever the watermark says (config allows 30 days of backfill)."""
RETRYABLE_STATUS = frozenset({408, 500, 502, 503, 504, 529})

_KEYLIKE = re.compile(r"\b(sk-[A-Za-z0-9]*-?)[A-Za-z0-9_\-*.]{4,}")


class MalformedResponse(Exception):
    """A response body that parsed but does not have the documented shape."""


class NotFound(SourceError):
    """A 404: the path does not exist at this base URL (or for this account).

    It fails a poll like any other :class:`SourceError`; a collector may catch it around an
    optional endpoint that not every account has.
    """


T = TypeVar("T")


def floor_minute(when: datetime) -> datetime:
    """Start of the UTC minute holding ``when``."""
    return when.astimezone(UTC).replace(second=0, microsecond=0)


def floor_day(when: datetime) -> datetime:
    """UTC midnight of the day holding ``when``."""
    return when.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def one_line(text: str, limit: int = 200) -> str:
    """Collapse whitespace to single spaces and cut to ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def scrub(text: str, key: str) -> str:
    """Remove the key, and anything shaped like a provider key, from ``text``."""
    if key:
        text = text.replace(key, "[key]")
    return _KEYLIKE.sub(r"\1[key]", text)


_DELAY_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")
"""RFC 9110's delay-seconds (``1*DIGIT``); a decimal fraction is tolerated."""


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` header, or ``None`` when it has no valid value.

    Every form RFC 9110 allows: delay-seconds, and an HTTP-date as IMF-fixdate
    (``Sun, 06 Nov 1994 08:49:37 GMT``) or the obsolete RFC 850 (``Sunday, 06-Nov-94 08:49:37
    GMT``) and asctime (``Sun Nov  6 08:49:37 1994``) forms; a date in the past is 0. A header
    sent twice arrives joined by a comma (``1, 1``); the first valid value wins. A date holds a
    comma itself, so the comma-separated parts are read one or two at a time.
    """
    if not value:
        return None
    parts = [part.strip() for part in value.split(",")]
    for i, part in enumerate(parts):
        if _DELAY_SECONDS.fullmatch(part):
            seconds = float(part)
            return seconds if math.isfinite(seconds) else None
        # asctime has no comma; IMF-fixdate and RFC 850 one, after the day name.
        for joined in (part, f"{part}, {parts[i + 1]}" if i + 1 < len(parts) else ""):
            when = _http_date(joined)
            if when is not None:
                return max(0.0, (when - now).total_seconds())
    return None


def _http_date(text: str) -> datetime | None:
    # A bare number is not a date (parsedate reads some as one); nor a day name alone.
    if not text or not any(c.isalpha() for c in text) or not any(c.isdigit() for c in text):
        return None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def as_int(value: Any, name: str) -> int:
    """A token or request counter: an integer, ``None``/absent as 0; anything else is malformed."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise MalformedResponse(f"{name} is not a count")
    if isinstance(value, int):
        return value
    if isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        return int(value)
    raise MalformedResponse(f"{name} is not a count")


def as_dim(value: Any) -> str:
    """A group-by dimension: ``None`` and absent become ``""``; booleans ``"true"``/``"false"``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def as_decimal(value: Any, name: str) -> Decimal:
    """A money amount sent as a JSON number or a decimal string, exactly."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        raise MalformedResponse(f"{name} is not an amount")
    try:
        result = Decimal(value.strip()) if isinstance(value, str) else Decimal(value)
    except InvalidOperation:
        raise MalformedResponse(f"{name} is not an amount") from None
    if not result.is_finite():
        raise MalformedResponse(f"{name} is not an amount")
    return result


def as_obj(value: Any, name: str) -> Mapping[str, Any]:
    """A JSON object; ``None``/absent as an empty one."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedResponse(f"{name} is not an object")
    return value


def as_list(value: Any, name: str) -> list[Any]:
    """A JSON array; ``None``/absent as an empty one."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise MalformedResponse(f"{name} is not a list")
    return value


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """The usage range one poll reads, and what it means for the watermark."""

    start: datetime
    end: datetime
    """Exclusive; the end of the open minute unless this is a catch-up chunk."""
    catchup: bool
    """True when the range ends in the past: more chunks follow in later polls."""
    watermark: datetime
    progress: float | None


def merge_usage(buckets: list[UsageBucket]) -> tuple[UsageBucket, ...]:
    """Sum buckets that share a key (a grouping the provider splits finer than we keep)."""
    merged: dict[tuple[Any, ...], UsageBucket] = {}
    for b in buckets:
        key = (
            b.model,
            b.start,
            b.width_s,
            b.project,
            b.api_key,
            b.workspace,
            b.tag,
            b.service_tier,
            b.batch,
            b.context_window,
        )
        old = merged.get(key)
        if old is None:
            merged[key] = b
            continue
        merged[key] = UsageBucket(
            source=b.source,
            provider=b.provider,
            model=b.model,
            start=b.start,
            width_s=b.width_s,
            project=b.project,
            api_key=b.api_key,
            workspace=b.workspace,
            tag=b.tag,
            service_tier=b.service_tier,
            batch=b.batch,
            context_window=b.context_window,
            input_uncached=old.input_uncached + b.input_uncached,
            cache_read=old.cache_read + b.cache_read,
            cache_write_5m=old.cache_write_5m + b.cache_write_5m,
            cache_write_1h=old.cache_write_1h + b.cache_write_1h,
            output=old.output + b.output,
            requests=old.requests + b.requests,
            web_searches=old.web_searches + b.web_searches,
        )
    return tuple(merged.values())


def merge_billed(costs: list[BilledCost]) -> tuple[BilledCost, ...]:
    """Sum billed lines that share the store's key (day, project, line item, workspace)."""
    merged: dict[tuple[Any, ...], BilledCost] = {}
    for c in costs:
        key = (c.day, c.project, c.line_item, c.workspace, c.currency)
        old = merged.get(key)
        merged[key] = (
            c
            if old is None
            else BilledCost(
                source=c.source,
                provider=c.provider,
                day=c.day,
                amount_nano=old.amount_nano + c.amount_nano,
                project=c.project,
                line_item=c.line_item,
                workspace=c.workspace,
                currency=c.currency,
            )
        )
    return tuple(merged.values())


def _declared_over(response: httpx.Response, limit: int) -> bool:
    declared = response.headers.get("content-length", "")
    return declared.isdigit() and int(declared) > limit


async def read_capped(response: httpx.Response, limit: int) -> bytes | None:
    """The body of a streamed response, or ``None`` when it is larger than ``limit`` bytes.

    Reading stops at the limit, so a huge (or endless) body never takes the process's memory
    with it, and nothing of it is returned. Decoded bytes count, so a small compressed body
    that inflates past the limit is refused too.
    """
    if _declared_over(response, limit):
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def read_capped_sync(response: httpx.Response, limit: int) -> bytes | None:
    """:func:`read_capped` for a response of a blocking ``httpx.Client``."""
    if _declared_over(response, limit):
        return None
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class AdminApiCollector(ABC):
    """Base of the provider admin-API collectors: the read plan, retries and error mapping.

    Subclasses set the class attributes and implement :meth:`_auth_headers`,
    :meth:`_read_usage` and :meth:`_read_costs`.

    Args:
        config: the provider's section of the config file.
        client: the HTTP client to use (a test hands one with a short timeout or a fake
            transport); when ``None`` the collector makes its own and closes it in :meth:`aclose`.
        clock: the current time; used to turn an HTTP-date ``Retry-After`` into seconds.
        name: the source name, unique among sources; defaults to :attr:`kind`.
        retries: extra tries of a failing page within one poll.
        backoff_s: base of the exponential backoff between those tries (jittered).
        sleep: how to wait between tries (injected so tests need not wait).
        timeout_s: request timeout of the client the collector makes itself.
        cost_interval_s: how often the daily cost endpoint is re-read (and on the first poll).
        cost_lookback_days: days of billed cost re-read each time (also back to the backfill
            start on every read).
        trailing_s: how far back each poll re-reads, from now and from the watermark.
        max_span_s: the longest range one poll reads; longer ones are split over polls.
        max_response_bytes: the largest response body read (decoded); a larger one fails the
            poll. Defaults to the config's ``max_response_mb``.
    """

    kind: str = ""
    default_base_url: str = ""
    base_url_env: str = ""
    usage_path: str = ""
    cost_path: str = ""

    def __init__(
        self,
        config: ProviderConfig,
        *,
        client: httpx.AsyncClient | None = None,
        clock: Clock = utcnow,
        name: str | None = None,
        retries: int = 2,
        backoff_s: float = 0.2,
        sleep: Sleep = asyncio.sleep,
        timeout_s: float = 30.0,
        cost_interval_s: float = 900.0,
        cost_lookback_days: int = 7,
        trailing_s: float = 3600.0,
        max_span_s: float = 26 * 3600.0,
        max_response_bytes: int | None = None,
    ) -> None:
        self.name = name or self.kind
        self.interval_s = config.interval_s
        self.backfill = timedelta(hours=config.backfill_hours)
        """How far back a first start reads (``backfill_hours``; the runner honours it)."""
        self.calls = 0
        self._config = config
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
        )
        self._clock = clock
        self._retries = max(0, retries)
        self._backoff_s = backoff_s
        self._sleep = sleep
        self._cost_interval = timedelta(seconds=cost_interval_s)
        self._cost_lookback = timedelta(days=cost_lookback_days)
        self._trailing = timedelta(seconds=trailing_s)
        self._max_span = timedelta(seconds=max(max_span_s, 3600.0))
        self._max_bytes = (
            max_response_bytes
            if max_response_bytes is not None
            else round(config.max_response_mb * 1_000_000)
        )
        self._costs_read_at: datetime | None = None
        self._catchup_origin: datetime | None = None
        self._key = ""
        base = config.base_url or os.environ.get(self.base_url_env, "") or self.default_base_url
        self.base_url = base.rstrip("/")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, base_url={self.base_url!r})"

    async def aclose(self) -> None:
        """Close the HTTP client if the collector made it."""
        if self._owns_client:
            await self._client.aclose()

    async def poll(self, ctx: PollContext) -> Batch:
        """Read the planned usage range (and the cost days when due) and return them whole."""
        self._key = self._config.key
        if not self._key:
            raise SourceError(f"no key: set {self._config.key_env}", auth=True)
        plan = self.plan(ctx)
        usage = await self._read_usage(plan.start, plan.end, plan.catchup)
        inside = [b for b in usage if plan.start <= b.start < plan.end]
        billed: tuple[BilledCost, ...] = ()
        billed_days: tuple[tuple[str, datetime, datetime], ...] = ()
        if self._costs_due(ctx.now):
            first_day = floor_day(min(ctx.backfill_start, ctx.now - self._cost_lookback))
            first_day = max(first_day, floor_day(ctx.now) - MAX_CATCHUP)
            end_day = floor_day(ctx.now) + DAY
            billed = merge_billed(await self._read_costs(first_day, end_day))
            billed = tuple(c for c in billed if first_day <= c.day < end_day)
            billed_days = ((self.name, first_day, end_day),)
            self._costs_read_at = ctx.now
        if plan.catchup:
            self._catchup_origin = self._catchup_origin or plan.start
        else:
            self._catchup_origin = None
        return Batch(
            usage=merge_usage(inside),
            windows=(UsageWindow(self.name, 60, plan.start, plan.end),),
            billed=billed,
            billed_days=billed_days,
            watermark=plan.watermark,
            progress=plan.progress,
        )

    def plan(self, ctx: PollContext) -> ReadPlan:
        """Which minutes this poll reads; see the module docstring."""
        now = floor_minute(ctx.now)
        target = now + MINUTE
        oldest = now - MAX_CATCHUP
        if ctx.watermark is None:
            start = min(floor_minute(ctx.backfill_start), now)
        else:
            start = min(floor_minute(ctx.watermark), now) - self._trailing
        start = max(start, oldest)
        if target - start <= self._max_span:
            progress = 1.0 if self._catchup_origin is not None else None
            return ReadPlan(start, target, False, min(ctx.now, target), progress)
        end = start + self._max_span
        origin = min(self._catchup_origin or start, start)
        progress = (end - origin) / (target - origin)
        return ReadPlan(start, end, True, end, max(0.0, min(1.0, progress)))

    def _costs_due(self, now: datetime) -> bool:
        if not self._config.costs:
            return False
        read_at = self._costs_read_at
        return read_at is None or now - read_at >= self._cost_interval or now < read_at

    @abstractmethod
    def _auth_headers(self, key: str) -> dict[str, str]:
        """The provider's authentication headers for ``key``."""

    @abstractmethod
    async def _read_usage(
        self, start: datetime, end: datetime, send_end: bool
    ) -> list[UsageBucket]:
        """Every one-minute bucket of ``[start, end)``, all pages read."""

    @abstractmethod
    async def _read_costs(self, first_day: datetime, end_day: datetime) -> list[BilledCost]:
        """Billed cost of the UTC days ``[first_day, end_day)``."""

    async def _get_pages(self, path: str, params: Params) -> list[Mapping[str, Any]]:
        """GET every page of a bucketed list and return the buckets of all pages in order."""
        buckets: list[Mapping[str, Any]] = []
        seen: set[str] = set()
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            query = [*params, ("page", cursor)] if cursor else list(params)
            body = await self._get_json(path, query)
            try:
                buckets.extend(as_obj(b, "bucket") for b in as_list(body.get("data"), "data"))
            except MalformedResponse as exc:
                error = SourceError(f"unexpected response from GET {path}: {exc}")
                raise error from None
            next_page = body.get("next_page")
            if body.get("has_more") is not True or next_page is None:
                return buckets
            if not isinstance(next_page, str) or not next_page or next_page in seen:
                raise SourceError(f"unexpected response from GET {path}: bad next_page cursor")
            seen.add(next_page)
            cursor = next_page
        raise SourceError(f"GET {path} did not finish after {MAX_PAGES} pages")

    async def _read_all(
        self, path: str, params: Params, parse: Callable[[Mapping[str, Any]], list[T]]
    ) -> list[T]:
        """Every page of ``path``, each bucket turned into records by ``parse``."""
        buckets = await self._get_pages(path, params)
        try:
            return [record for bucket in buckets for record in parse(bucket)]
        except MalformedResponse as exc:
            error = SourceError(f"unexpected response from GET {path}: {exc}")
        raise error

    async def _get_json(self, path: str, params: Params) -> Mapping[str, Any]:
        """GET one page, retrying transient failures; map the final failure to SourceError."""
        url = self.base_url + path
        failure = ""
        retry_after: float | None = None
        tries = self._retries + 1
        for attempt in range(tries):
            if attempt:
                delay = self._backoff_s * 2 ** (attempt - 1)
                await self._sleep(delay / 2 + random.uniform(0, delay / 2))
            self.calls += 1
            outcome = await self._attempt(url, path, params)
            if isinstance(outcome, dict):
                return outcome
            if isinstance(outcome, SourceError):
                raise outcome
            failure, retry_after = outcome
            if retry_after is not None and retry_after > self._backoff_s * 2**attempt:
                # The server said when to come back: not before (the runner waits that long).
                tries = attempt + 1
                break
        error = SourceError(
            one_line(f"{failure} after {tries} tries: GET {path}"), retry_after=retry_after
        )
        raise error

    async def _attempt(
        self, url: str, path: str, params: Params
    ) -> dict[str, Any] | SourceError | tuple[str, float | None]:
        """One request. Returns the body, a final error, or (a retryable failure, retry-after)."""
        transport_failure = ""
        bad_url = False
        too_large = False
        status = 0
        content = b""
        retry_header: str | None = None
        try:
            async with self._client.stream(
                "GET", url, params=list(params), headers=self._auth_headers(self._key)
            ) as response:
                status = response.status_code
                retry_header = response.headers.get("retry-after")
                content, too_large = await self._read_body(response)
        except httpx.TimeoutException:
            transport_failure = "timed out"
        except (httpx.InvalidURL, httpx.UnsupportedProtocol):
            bad_url = True
        except httpx.RequestError as exc:
            transport_failure = f"connection failed ({type(exc).__name__})"
        if bad_url:
            return SourceError(f"bad base URL {self._safe_base()}", fatal=True)
        if transport_failure:
            return (f"{transport_failure} reaching {self._safe_base()}", None)
        if too_large:
            # Not retried: the same page would be as large again.
            return SourceError(
                f"response too large: GET {path} sent more than the"
                f" {self._max_bytes / 1_000_000:g} MB limit (max_response_mb); nothing of it kept"
            )

        if status == 200:
            try:
                body = json.loads(content, parse_float=Decimal)
            except ValueError:
                return ("malformed JSON body", None)
            if not isinstance(body, dict):
                return ("malformed JSON body", None)
            return body
        retry_after = parse_retry_after(retry_header, self._clock())
        env = self._config.key_env
        if status == 401:
            return SourceError(f"auth failed (401): check {env}", auth=True)
        if status == 403:
            return SourceError(
                f"auth failed (403): check {env} is an admin key allowed to read usage",
                auth=True,
            )
        if status == 429:
            wait = f", retry after {retry_after:g} s" if retry_after is not None else ""
            return SourceError(f"rate limited (429){wait}: GET {path}", retry_after=retry_after)
        if status in RETRYABLE_STATUS or status >= 500:
            return (f"server error {status}", retry_after)
        detail = self._error_text(content)
        what = "not found (404), check the base URL" if status == 404 else f"refused ({status})"
        message = one_line(
            scrub(f"{what}: GET {path}" + (f": {detail}" if detail else ""), self._key), 300
        )
        return NotFound(message) if status == 404 else SourceError(message)

    async def _read_body(self, response: httpx.Response) -> tuple[bytes, bool]:
        """The body, and whether it went over the limit (see :func:`read_capped`)."""
        content = await read_capped(response, self._max_bytes)
        return (b"", True) if content is None else (content, False)

    def _error_text(self, content: bytes) -> str:
        """The server's error message from either provider's envelope, scrubbed, or ``""``."""
        try:
            body = json.loads(content)
        except ValueError:
            return ""
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            return ""
        message = error.get("message")
        return one_line(scrub(message, self._key)) if isinstance(message, str) else ""

    def _safe_base(self) -> str:
        parts = urlsplit(self.base_url)
        return parts.netloc or self.base_url
