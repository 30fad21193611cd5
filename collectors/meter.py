"""The per-request meter: usage extraction, httpx instrumentation and a background recorder.

Three pieces, used by the pytest plugin, the metering proxy and any application that wants exact
cost per request:

- **Observation.** :class:`Observer` watches one response's bytes as they pass, without holding
  them back: the bytes are yielded to the caller unchanged and at once, while a copy of what
  matters is kept. A JSON body is kept whole (it cannot be parsed before it ends); an SSE stream is
  split into events incrementally and only the events that carry ``usage`` are kept, plus a
  bounded copy of the text deltas in case the stream never reports usage. Content-encoded bodies
  (gzip, deflate; br and zstd when their modules are installed) are decoded incrementally for the
  meter only. The result is an :class:`Exchange`.
- **Extraction and pricing.** :func:`finalize` turns an :class:`Exchange` into a
  :class:`~tokentop.store.records.MeteredRequest`: OpenAI Chat Completions and legacy Completions
  (``prompt_tokens`` includes ``cached_tokens``), the Responses API (``response.completed``
  carries the usage of a stream), Anthropic Messages (``input_tokens`` is the uncached remainder;
  a stream's ``message_delta`` usage is cumulative, so the last one wins) and embeddings. A
  response without usage is estimated from the request's and the streamed text with
  :func:`tokentop.pricing.tokens.count_tokens` and marked ``estimated``. Parsing, estimating and
  pricing all happen off the request path (in the recorder's thread, or when the pytest plugin
  settles a test).
- **Instrumentation.** :class:`MeteredTransport` / :class:`AsyncMeteredTransport` wrap any httpx
  transport; :meth:`Meter.sdk_http_client` builds an ``http_client=`` for the OpenAI and
  Anthropic SDKs (which use ``httpx`` or, in newer releases, its fork ``httpx2``: both are
  supported); :func:`install` patches the default transports of both libraries for the whole
  process, which is how the pytest plugin meters an unmodified SDK client.

:class:`Recorder` is a meter sink that queues exchanges and writes them from a daemon thread in
batches, so SQLite never blocks a request. It is stopped with a sentinel (never left blocked on
``queue.get``) and flushes on :meth:`Recorder.close` and at interpreter exit.

Nothing here logs or stores a prompt, a response or a header: an :class:`Exchange` holds the
request body and the usage-bearing parts of the response in memory only until it is finalized,
and it never holds headers at all.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import dataclasses
import glob
import importlib
import importlib.util
import json
import logging
import os
import queue
import re
import sys
import threading
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, cast

import httpx

from tokentop.collectors.base import Clock, utcnow
from tokentop.collectors.runner import price_request, request_cost
from tokentop.pricing.book import PriceBook, TokenCounts
from tokentop.pricing.tokens import LOAD_TIMEOUT_S, count_tokens, load_wait
from tokentop.store.db import Store
from tokentop.store.records import Batch, MeteredRequest, SourceHealth

log = logging.getLogger("tokentop.meter")

TAG_HEADER = "x-tokentop-tag"
"""Request header naming the tag of a request; removed before the request is sent on."""

CHAT = "chat"
RESPONSES = "responses"
MESSAGES = "messages"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"

MAX_BODY_BYTES = 32 * 1024 * 1024
"""A JSON body longer than this is not kept whole; its usage is then read from its tail."""
TAIL_BYTES = 64 * 1024
MAX_TEXT_BYTES = 8 * 1024 * 1024
"""Streamed text kept (in memory only) for estimating output when a stream reports no usage."""
MAX_TAG_LENGTH = 200

_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_MODEL_FIELD = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,200})"')
_TIER_FIELD = re.compile(rb'"service_tier"\s*:\s*"([A-Za-z0-9_.-]{1,40})"')
_USAGE_EVENTS = (
    b"response.completed",
    b"response.incomplete",
    b"response.failed",
    b"message_start",
    b"message_delta",
)
_USAGE_EVENT = re.compile(b"|".join(re.escape(e) for e in _USAGE_EVENTS))
"""One of :data:`_USAGE_EVENTS` (searched for in the first 64 bytes of an event)."""

_HOST_PROVIDERS = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "openrouter.ai": "openrouter",
    "api.groq.com": "groq",
    "api.mistral.ai": "mistral",
    "api.deepseek.com": "deepseek",
    "api.together.xyz": "together",
    "api.fireworks.ai": "fireworks",
    "api.x.ai": "x-ai",
    "api.cerebras.ai": "cerebras",
    "api.perplexity.ai": "perplexity",
    "generativelanguage.googleapis.com": "google",
}


def classify(method: str, path: str) -> str | None:
    """Which metered API a request calls (``chat``, ``responses``, ...), or ``None``.

    Only ``POST`` requests that create a model response are metered: ``/v1/messages/batches``,
    ``/v1/messages/count_tokens`` or ``GET /v1/responses/{id}`` are not.
    """
    if method.upper() != "POST":
        return None
    p = path.split("?", 1)[0].rstrip("/")
    if p.endswith("/chat/completions"):
        return CHAT
    if p.endswith("/responses"):
        return RESPONSES
    if p.endswith("/messages") and "/threads/" not in p:
        return MESSAGES
    if p.endswith("/completions"):
        return COMPLETIONS
    if p.endswith("/embeddings"):
        return EMBEDDINGS
    return None


def provider_for(host: str, api: str) -> str:
    """The provider a request was billed by: known hosts first, else the wire format's owner."""
    host = host.lower()
    if host in _HOST_PROVIDERS:
        return _HOST_PROVIDERS[host]
    if host.endswith(".openai.azure.com"):
        return "azure"
    return "anthropic" if api == MESSAGES else "openai"


# Decoders: the meter decodes a copy of a content-encoded body; the caller still gets the bytes
# as they came.


class _Decoder(Protocol):
    def decompress(self, data: bytes) -> bytes: ...


class _Deflate:
    """``deflate`` is zlib-wrapped by the RFC and raw in practice; try one, then the other."""

    def __init__(self) -> None:
        self._first = True
        self._obj: Any = zlib.decompressobj()

    def decompress(self, data: bytes) -> bytes:
        if self._first:
            self._first = False
            try:
                return bytes(self._obj.decompress(data))
            except zlib.error:
                self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
        return bytes(self._obj.decompress(data))


def _optional(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


_brotli = _optional("brotli") or _optional("brotlicffi")
_zstd = _optional("zstandard")

SUPPORTED_ENCODINGS: tuple[str, ...] = (
    "gzip",
    "deflate",
    *(("br",) if _brotli is not None else ()),
    *(("zstd",) if _zstd is not None else ()),
)
"""Content codings the meter can read (the proxy offers upstream no others)."""


def _decoder(encoding: str) -> _Decoder | None:
    """A decoder for a ``Content-Encoding`` value; raises ``ValueError`` for one we cannot read."""
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return None
    if enc in ("gzip", "x-gzip"):
        decoder: _Decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        return decoder
    if enc == "deflate":
        return _Deflate()
    if enc == "br" and _brotli is not None:
        obj = _brotli.Decompressor()
        if hasattr(obj, "process"):

            class _Brotli:
                def decompress(self, data: bytes) -> bytes:
                    return bytes(obj.process(data))

            return _Brotli()
        return obj  # type: ignore[no-any-return]
    if enc == "zstd" and _zstd is not None:
        return _zstd.ZstdDecompressor().decompressobj()  # type: ignore[no-any-return]
    raise ValueError(f"unsupported content encoding {enc!r}")


def filter_accept_encoding(value: str) -> str:
    """Keep only the codings in an ``Accept-Encoding`` value that the meter can read."""
    kept = []
    for part in value.split(","):
        coding = part.split(";", 1)[0].strip().lower()
        if coding in SUPPORTED_ENCODINGS or coding == "identity":
            kept.append(part.strip())
    return ", ".join(kept) or "identity"


@dataclass(slots=True, eq=False)
class Exchange:
    """One metered request and what its response said, before parsing and pricing.

    Everything here lives in memory only until :func:`finalize`; no header is kept. ``body`` is a
    JSON response (decoded); ``events`` are the SSE data payloads that carry usage, in order;
    ``text_events`` the other payloads (bounded), kept for an estimate when no usage came.
    """

    api: str
    provider: str
    ts: datetime
    request_body: bytes = b""
    tag: str = ""
    request_id: str = ""
    status: int = 0
    latency_ms: float = 0.0
    sse: bool = False
    body: bytes = b""
    body_tail: bytes = b""
    """The last bytes of a JSON body too long to keep whole (``body`` is then empty)."""
    events: list[bytes] = field(default_factory=list)
    text_events: list[bytes] = field(default_factory=list)
    complete: bool = False
    """The response ended normally (not cut short by the caller or the network)."""
    unreadable: str = ""
    """Why the body could not be read (an unsupported encoding), if so."""
    source: str = "meter"


Sink = Callable[[Exchange], None]
"""Receives each finished exchange, on the request path: it must be quick and must not raise."""


class Observer:
    """Watches one response's bytes as they pass and completes an :class:`Exchange`.

    Never raises into the caller's stream: a failure only stops the observation.

    Args:
        exchange: filled in as bytes arrive.
        content_type: the response's ``Content-Type``.
        content_encoding: the response's ``Content-Encoding``.
        started: ``time.perf_counter()`` when the request was sent.
        on_done: called once, when the response ends or is closed.
    """

    __slots__ = (
        "_body",
        "_body_len",
        "_data",
        "_decoder",
        "_done",
        "_line",
        "_on_done",
        "_started",
        "_text_len",
        "_truncated",
        "exchange",
    )

    def __init__(
        self,
        exchange: Exchange,
        content_type: str,
        content_encoding: str,
        started: float,
        on_done: Sink,
    ) -> None:
        self.exchange = exchange
        self._started = started
        self._on_done = on_done
        self._done = False
        self._body: list[bytes] = []
        self._body_len = 0
        self._truncated = False
        self._line = b""
        self._data: list[bytes] = []
        self._text_len = 0
        exchange.sse = "text/event-stream" in content_type.lower()
        try:
            self._decoder = _decoder(content_encoding)
        except ValueError as exc:
            self._decoder = None
            exchange.unreadable = str(exc)

    def feed(self, chunk: bytes) -> None:
        """Observe the next bytes of the body, as they came off the wire."""
        if self._done or self.exchange.unreadable or not chunk:
            return
        try:
            data = self._decoder.decompress(chunk) if self._decoder is not None else chunk
            if self.exchange.sse:
                self._feed_sse(data)
            else:
                self._feed_json(data)
        except Exception as exc:  # a corrupt body must not break the caller's stream
            self.exchange.unreadable = f"{type(exc).__name__} while reading the body"

    def _feed_json(self, data: bytes) -> None:
        if not data:
            return
        self._body_len += len(data)
        if self._body_len <= MAX_BODY_BYTES:
            self._body.append(data)
            return
        if not self._truncated:
            self._truncated = True
            data = b"".join(self._body) + data
            self._body = []
        self.exchange.body_tail = (self.exchange.body_tail + data)[-TAIL_BYTES:]

    def _feed_sse(self, data: bytes) -> None:
        # On the proxy's event loop, once per chunk relayed: split in C, not line by line.
        buffer = self._line + data if self._line else data
        end = buffer.rfind(b"\n")
        if end < 0:
            self._line = buffer if len(buffer) <= MAX_BODY_BYTES else b""
            return
        self._line = buffer[end + 1 :]
        for line in buffer[:end].split(b"\n"):
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                self._dispatch()
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
        if len(self._line) > MAX_BODY_BYTES:  # no newline in 32 MiB: not SSE as we know it
            self._line = b""

    def _dispatch(self) -> None:
        if not self._data:
            return
        payload = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        self._data = []
        if _USAGE_OBJECT.search(payload) or _USAGE_EVENT.search(payload, 0, 64):
            self.exchange.events.append(payload)
        elif self._text_len < MAX_TEXT_BYTES:
            self._text_len += len(payload)
            self.exchange.text_events.append(payload)

    def finish(self, complete: bool) -> None:
        """The body ended (``complete``) or was closed early; emits the exchange once."""
        if self._done:
            return
        self._done = True
        ex = self.exchange
        ex.latency_ms = (time.perf_counter() - self._started) * 1000
        ex.complete = complete
        try:
            if ex.sse:
                if self._line:
                    self._feed_sse(b"\n")
                self._dispatch()
            elif not self._truncated:
                ex.body = b"".join(self._body)
            self._body = []
        except Exception as exc:
            ex.unreadable = f"{type(exc).__name__} while reading the body"
        try:
            self._on_done(ex)
        except Exception:
            log.exception("a meter sink failed")


# Extraction: pure functions from usage objects to token kinds.


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one request by the kinds priced separately."""

    input_uncached: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    output: int = 0
    web_searches: int = 0


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return max(int(value), 0)


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def openai_usage(usage: dict[str, Any]) -> Usage:
    """OpenAI Chat Completions, legacy Completions, embeddings and Responses usage.

    ``prompt_tokens`` (Chat) and ``input_tokens`` (Responses) include the cached tokens and, where
    reported, the cache-write tokens; what remains is uncached input. Output includes reasoning.
    """
    if "input_tokens" in usage or "output_tokens" in usage:
        prompt = _int(usage.get("input_tokens"))
        details = _obj(usage.get("input_tokens_details"))
        output = _int(usage.get("output_tokens"))
    else:
        prompt = _int(usage.get("prompt_tokens"))
        details = _obj(usage.get("prompt_tokens_details"))
        output = _int(usage.get("completion_tokens"))
    cached = min(_int(details.get("cached_tokens")), prompt)
    written = min(_int(details.get("cache_write_tokens")), prompt - cached)
    return Usage(
        input_uncached=prompt - cached - written,
        cache_read=cached,
        cache_write_5m=written,
        output=output,
    )


def anthropic_usage(usage: dict[str, Any]) -> Usage:
    """Anthropic Messages usage: ``input_tokens`` is the uncached remainder.

    Cache writes are split into 5-minute and 1-hour by ``cache_creation`` when present; any part
    of ``cache_creation_input_tokens`` it does not explain counts as 5-minute writes.
    """
    creation = _obj(usage.get("cache_creation"))
    write_1h = _int(creation.get("ephemeral_1h_input_tokens"))
    write_5m = _int(creation.get("ephemeral_5m_input_tokens"))
    total_write = _int(usage.get("cache_creation_input_tokens"))
    write_5m += max(total_write - write_5m - write_1h, 0)
    tools = _obj(usage.get("server_tool_use"))
    return Usage(
        input_uncached=_int(usage.get("input_tokens")),
        cache_read=_int(usage.get("cache_read_input_tokens")),
        cache_write_5m=write_5m,
        cache_write_1h=write_1h,
        output=_int(usage.get("output_tokens")),
        web_searches=_int(tools.get("web_search_requests")),
    )


def _web_search_calls(response: dict[str, Any]) -> int:
    output = response.get("output")
    if not isinstance(output, list):
        return 0
    return sum(1 for item in output if _obj(item).get("type") == "web_search_call")


@dataclass(frozen=True, slots=True)
class Extracted:
    """What a response said about itself."""

    usage: Usage | None
    """``None`` when the response reported no (complete) usage."""
    model: str = ""
    response_id: str = ""
    partial: Usage | None = None
    """Input-side usage of a stream that was cut before its final usage (Anthropic)."""
    service_tier: str = ""
    """The tier that served it: OpenAI's top-level ``service_tier``, Anthropic's in ``usage``."""


def _loads(payload: bytes) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def extract(ex: Exchange) -> Extracted:
    """Read usage, model and id from an exchange's response (no estimation here)."""
    if ex.sse:
        return _extract_sse(ex)
    if not ex.body and ex.body_tail:
        return _extract_tail(ex)
    obj = _loads(ex.body) if ex.body else {}
    return _extract_object(ex.api, obj)


def _tier(obj: dict[str, Any]) -> str:
    value = obj.get("service_tier")
    return value if isinstance(value, str) else ""


def _extract_object(api: str, obj: dict[str, Any]) -> Extracted:
    model = obj.get("model") if isinstance(obj.get("model"), str) else ""
    rid = obj.get("id") if isinstance(obj.get("id"), str) else ""
    raw = obj.get("usage")
    if not isinstance(raw, dict):
        return Extracted(None, str(model), str(rid), service_tier=_tier(obj))
    if api == MESSAGES:
        usage = anthropic_usage(raw)
    else:
        usage = openai_usage(raw)
        if api == RESPONSES:
            searches = _web_search_calls(obj)
            if searches:
                usage = Usage(**{**_as_dict(usage), "web_searches": searches})
    return Extracted(usage, str(model), str(rid), service_tier=_tier(obj) or _tier(raw))


def _as_dict(usage: Usage) -> dict[str, int]:
    return {name: getattr(usage, name) for name in Usage.__slots__}


def _extract_tail(ex: Exchange) -> Extracted:
    """Usage of a body too long to keep: the last ``"usage": {...}`` object in its tail."""
    tail = ex.body_tail
    matches = list(_USAGE_OBJECT.finditer(tail))
    model_match = list(_MODEL_FIELD.finditer(tail))
    model = model_match[-1].group(1).decode("utf-8", "replace") if model_match else ""
    tiers = list(_TIER_FIELD.finditer(tail))
    tier = tiers[-1].group(1).decode("ascii") if tiers else ""
    if not matches:
        return Extracted(None, model, service_tier=tier)
    start = matches[-1].end() - 1
    try:
        raw, _ = json.JSONDecoder().raw_decode(tail[start:].decode("utf-8", "replace"))
    except ValueError:
        return Extracted(None, model, service_tier=tier)
    usage = anthropic_usage(raw) if ex.api == MESSAGES else openai_usage(_obj(raw))
    return Extracted(usage, model, service_tier=tier)


def _extract_sse(ex: Exchange) -> Extracted:
    if ex.api == MESSAGES:
        return _extract_anthropic_stream(ex)
    found: Extracted | None = None
    for payload in ex.events:
        event = _loads(payload)
        if ex.api == RESPONSES:
            response = _obj(event.get("response"))
            if isinstance(response.get("usage"), dict):
                found = _extract_object(RESPONSES, response)
        elif isinstance(event.get("usage"), dict):
            found = _extract_object(ex.api, event)
    if found is not None:
        return found
    model, rid, tier = "", "", ""
    for payload in ex.text_events[:3]:
        event = _loads(payload)
        body = _obj(event.get("response")) if ex.api == RESPONSES else event
        model = model or str(body.get("model") or "")
        rid = rid or str(body.get("id") or "")
        tier = tier or _tier(body)
    return Extracted(None, model, rid, service_tier=tier)


def _extract_anthropic_stream(ex: Exchange) -> Extracted:
    merged: dict[str, Any] = {}
    model, rid = "", ""
    final = False
    for payload in ex.events:
        event = _loads(payload)
        kind = event.get("type")
        if kind == "message_start":
            message = _obj(event.get("message"))
            model = str(message.get("model") or model)
            rid = str(message.get("id") or rid)
            merged.update({k: v for k, v in _obj(message.get("usage")).items() if v is not None})
        elif kind == "message_delta":
            # Cumulative: each delta repeats the running totals it carries; the last one wins.
            usage = _obj(event.get("usage"))
            merged.update({k: v for k, v in usage.items() if v is not None})
            final = final or "output_tokens" in usage
    tier = _tier(merged)
    if final:
        return Extracted(anthropic_usage(merged), model, rid, service_tier=tier)
    partial = anthropic_usage(merged) if merged else None
    return Extracted(None, model, rid, partial=partial, service_tier=tier)


# Estimation, for responses that report no usage.


def _text_of(content: Any, out: list[str]) -> None:
    if isinstance(content, str):
        out.append(content)
    elif isinstance(content, list):
        for part in content:
            _text_of(part, out)
    elif isinstance(content, dict):
        for key in ("text", "content", "input", "output", "arguments", "thinking"):
            if key in content:
                _text_of(content[key], out)


def request_text(body: bytes) -> str:
    """The text a request sends the model (messages, system, input, prompt, instructions)."""
    obj = _loads(body) if body else {}
    out: list[str] = []
    for key in ("instructions", "system", "messages", "input", "prompt"):
        if key in obj:
            _text_of(obj[key], out)
    return "\n".join(out)


def _request_model(body: bytes) -> str:
    model = _loads(body).get("model") if body else None
    return model if isinstance(model, str) else ""


def _request_tier(body: bytes) -> str:
    """The tier a request asked for, when its response did not say (``auto`` says nothing)."""
    tier = _tier(_loads(body)) if body else ""
    return "" if tier == "auto" else tier


def streamed_text(ex: Exchange) -> str:
    """The text a response streamed (or returned, for JSON), for an output estimate."""
    out: list[str] = []
    if not ex.sse:
        obj = _loads(ex.body) if ex.body else {}
        for choice in obj.get("choices") or []:
            message = _obj(_obj(choice).get("message"))
            _text_of(message.get("content"), out)
            _text_of(_obj(choice).get("text"), out)
        if ex.api in (RESPONSES, MESSAGES):
            _text_of(obj.get("output") or obj.get("content"), out)
        return "".join(out)
    for payload in ex.text_events:
        event = _loads(payload)
        kind = event.get("type")
        if ex.api == MESSAGES:
            if kind == "content_block_delta":
                delta = _obj(event.get("delta"))
                for key in ("text", "thinking", "partial_json"):
                    _text_of(delta.get(key), out)
        elif ex.api == RESPONSES:
            if isinstance(kind, str) and kind.endswith(".delta"):
                _text_of(event.get("delta"), out)
        else:
            for choice in event.get("choices") or []:
                delta = _obj(_obj(choice).get("delta"))
                _text_of(delta.get("content"), out)
                _text_of(delta.get("reasoning_content"), out)
                for call in delta.get("tool_calls") or []:
                    _text_of(_obj(_obj(call).get("function")).get("arguments"), out)
                _text_of(_obj(choice).get("text"), out)
    return "".join(out)


def finalize(
    ex: Exchange, book: PriceBook | None = None, *, found: Extracted | None = None
) -> MeteredRequest | None:
    """The metered request an exchange amounts to, priced when a price book is given.

    Returns ``None`` for a failed request that reported no usage (an error is not a billed model
    request, and counting it would dilute the cost per request). ``found`` is what
    :func:`extract` said of ``ex``, when the caller already asked.
    """
    if found is None:
        found = extract(ex)
    model = found.model or _request_model(ex.request_body) or "unknown"
    usage = found.usage
    estimated = False
    if usage is None:
        if ex.status >= 400:
            return None
        estimated = True
        if ex.unreadable:
            log.warning(
                "could not read a %s response (%s); its tokens are estimated", ex.api, ex.unreadable
            )
        partial = found.partial
        if partial is None:
            prompt = count_tokens(request_text(ex.request_body), model, ex.provider).tokens
            partial = Usage(input_uncached=prompt)
        output = count_tokens(streamed_text(ex), model, ex.provider).tokens
        usage = Usage(**{**_as_dict(partial), "output": max(output, partial.output)})
    service_tier = found.service_tier or _request_tier(ex.request_body)
    cost: dict[str, Any] = {}
    if book is not None:
        counts = TokenCounts(
            usage.input_uncached,
            usage.cache_read,
            usage.cache_write_5m,
            usage.cache_write_1h,
            usage.output,
            usage.web_searches,
        )
        # Priced before the request is built, so that it is built once (as price_request would).
        cost = request_cost(book, ex.provider, model, counts, ex.ts, service_tier)
    return MeteredRequest(
        ts=ex.ts,
        provider=ex.provider,
        model=model,
        source=ex.source,
        request_id=ex.request_id or found.response_id or uuid.uuid4().hex,
        input_uncached=usage.input_uncached,
        cache_read=usage.cache_read,
        cache_write_5m=usage.cache_write_5m,
        cache_write_1h=usage.cache_write_1h,
        output=usage.output,
        web_searches=usage.web_searches,
        latency_ms=round(ex.latency_ms, 3),
        status=ex.status,
        tag=ex.tag,
        estimated=estimated,
        service_tier=service_tier,
        **cost,
    )


# Tags.

_TAG: contextvars.ContextVar[str] = contextvars.ContextVar("tokentop_tag", default="")
_METERING: contextvars.ContextVar[bool] = contextvars.ContextVar("tokentop_metering", default=False)


@contextlib.contextmanager
def tagged(tag: str) -> Iterator[None]:
    """Tag every request metered inside the block (in this thread or task)."""
    token = _TAG.set(tag)
    try:
        yield
    finally:
        _TAG.reset(token)


def _clean_tag(value: str) -> str:
    return value.strip()[:MAX_TAG_LENGTH]


class Meter:
    """Turns observed requests into exchanges for its sinks.

    Args:
        sinks: called with each finished :class:`Exchange` (e.g. a :class:`Recorder`).
        default_tag: tag of requests that name none (a string, or a callable read per request).
        clock: time source for request timestamps.
    """

    def __init__(
        self,
        sinks: Iterable[Sink] = (),
        *,
        default_tag: str | Callable[[], str] = "",
        clock: Clock = utcnow,
    ) -> None:
        self._sinks: tuple[Sink, ...] = tuple(sinks)
        self._default_tag = default_tag
        self.clock = clock

    def add_sink(self, sink: Sink) -> None:
        """Send exchanges to ``sink`` too."""
        self._sinks = (*self._sinks, sink)

    def remove_sink(self, sink: Sink) -> None:
        """Stop sending exchanges to ``sink``."""
        self._sinks = tuple(s for s in self._sinks if s is not sink)

    def emit(self, exchange: Exchange) -> None:
        """Hand a finished exchange to every sink; a failing sink is logged, never raised."""
        for sink in self._sinks:
            try:
                sink(exchange)
            except Exception:
                log.exception("a meter sink failed")

    def tag_for(self, header: str | None) -> str:
        """The tag of a request: its header, else :func:`tagged`, else the default."""
        if header:
            return _clean_tag(header)
        tag = _TAG.get()
        if tag:
            return tag
        default = self._default_tag
        return default() if callable(default) else default

    def transport(self, inner: Any | None = None) -> MeteredTransport:
        """A sync transport metering ``inner`` (default: a new ``httpx.HTTPTransport``)."""
        return MeteredTransport(inner if inner is not None else httpx.HTTPTransport(), self)

    def async_transport(self, inner: Any | None = None) -> AsyncMeteredTransport:
        """An async transport metering ``inner`` (default: a new ``httpx.AsyncHTTPTransport``)."""
        return AsyncMeteredTransport(
            inner if inner is not None else httpx.AsyncHTTPTransport(), self
        )

    def client(self, **kwargs: Any) -> httpx.Client:
        """An ``httpx.Client`` whose requests are metered."""
        return httpx.Client(transport=cast(httpx.BaseTransport, self.transport()), **kwargs)

    def async_client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` whose requests are metered."""
        transport = cast(httpx.AsyncBaseTransport, self.async_transport())
        return httpx.AsyncClient(transport=transport, **kwargs)

    def sdk_http_client(self, sdk: ModuleType, *, is_async: bool = False, **kwargs: Any) -> Any:
        """An ``http_client=`` for an OpenAI or Anthropic SDK client, metered.

        Keeps the SDK's own defaults (timeouts, connection limits, redirects) and works whether
        the SDK is built on ``httpx`` or ``httpx2``::

            client = openai.OpenAI(http_client=meter.sdk_http_client(openai))
        """
        cls = sdk.DefaultAsyncHttpxClient if is_async else sdk.DefaultHttpxClient
        lib = _library_of(cls)
        if is_async:
            transport: Any = AsyncMeteredTransport(lib.AsyncHTTPTransport(), self)
        else:
            transport = MeteredTransport(lib.HTTPTransport(), self)
        return cls(transport=transport, **kwargs)


def _library_of(cls: type) -> ModuleType:
    """The httpx-like library a client class is built on (``httpx`` or ``httpx2``)."""
    for base in cls.__mro__:
        root = base.__module__.split(".", 1)[0]
        if root in ("httpx", "httpx2") and base.__name__ in ("Client", "AsyncClient"):
            return sys.modules[root]
    return httpx


# Stream wrappers. The client asserts the stream is its own library's ``SyncByteStream`` /
# ``AsyncByteStream``, so the wrapper classes are made per library.


class _SyncStreamMixin:
    def __init__(self, inner: Any, observer: Observer) -> None:
        self._inner = inner
        self._observer = observer

    def __iter__(self) -> Iterator[bytes]:
        observer = self._observer
        for chunk in self._inner:
            observer.feed(chunk)
            yield chunk
        observer.finish(True)

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._observer.finish(False)


class _AsyncStreamMixin:
    def __init__(self, inner: Any, observer: Observer) -> None:
        self._inner = inner
        self._observer = observer

    async def __aiter__(self) -> AsyncIterator[bytes]:
        observer = self._observer
        async for chunk in self._inner:
            observer.feed(chunk)
            yield chunk
        observer.finish(True)

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._observer.finish(False)


_stream_classes: dict[str, tuple[type, type]] = {}


def _streams_for(response: Any) -> tuple[type, type]:
    root = type(response).__module__.split(".", 1)[0]
    classes = _stream_classes.get(root)
    if classes is None:
        lib = sys.modules.get(root, httpx)
        classes = (
            type("MeteredSyncStream", (_SyncStreamMixin, lib.SyncByteStream), {}),
            type("MeteredAsyncStream", (_AsyncStreamMixin, lib.AsyncByteStream), {}),
        )
        _stream_classes[root] = classes
    return classes


def _begin(meter: Meter, request: Any) -> tuple[str, Exchange, float] | None:
    """Start metering ``request`` if it calls a metered API; pops the tag header."""
    api = classify(request.method, request.url.path)
    if api is None:
        return None
    header = request.headers.get(TAG_HEADER)
    if header is not None:
        del request.headers[TAG_HEADER]
    try:
        body = bytes(request.content)
    except Exception:  # a streaming request body: it cannot be re-read, and is not needed
        body = b""
    exchange = Exchange(
        api=api,
        provider=provider_for(request.url.host, api),
        ts=meter.clock(),
        request_body=body,
        tag=meter.tag_for(header),
    )
    return api, exchange, time.perf_counter()


def _attach(meter: Meter, response: Any, exchange: Exchange, started: float, sync: bool) -> None:
    headers = response.headers
    exchange.status = response.status_code
    exchange.request_id = headers.get("x-request-id") or headers.get("request-id") or ""
    observer = Observer(
        exchange,
        headers.get("content-type", ""),
        headers.get("content-encoding", ""),
        started,
        meter.emit,
    )
    sync_cls, async_cls = _streams_for(response)
    response.stream = (sync_cls if sync else async_cls)(response.stream, observer)


def _meter_sync(meter: Meter, request: Any, send: Callable[[], Any]) -> Any:
    begun = _begin(meter, request)
    if begun is None:
        return send()
    _api, exchange, started = begun
    token = _METERING.set(True)
    try:
        response = send()
    finally:
        _METERING.reset(token)
    _attach(meter, response, exchange, started, sync=True)
    return response


async def _meter_async(meter: Meter, request: Any, send: Callable[[], Any]) -> Any:
    begun = _begin(meter, request)
    if begun is None:
        return await send()
    _api, exchange, started = begun
    token = _METERING.set(True)
    try:
        response = await send()
    finally:
        _METERING.reset(token)
    _attach(meter, response, exchange, started, sync=False)
    return response


class MeteredTransport:
    """A sync transport that meters the requests it passes to ``inner``.

    Works with ``httpx`` and ``httpx2`` alike (it derives from neither, because each library's
    clients refuse the other's classes). Responses are returned at once, their bytes passing
    through unchanged as they arrive; the exchange is emitted when the body ends or is closed.
    """

    def __init__(self, inner: Any, meter: Meter) -> None:
        self.inner = inner
        self.meter = meter

    def handle_request(self, request: Any) -> Any:
        """Send ``request`` through ``inner``, metering it when it calls a metered API."""
        return _meter_sync(self.meter, request, lambda: self.inner.handle_request(request))

    def close(self) -> None:
        """Close ``inner``."""
        self.inner.close()

    def __enter__(self) -> MeteredTransport:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.inner.__exit__(*exc)


class AsyncMeteredTransport:
    """The async counterpart of :class:`MeteredTransport`."""

    def __init__(self, inner: Any, meter: Meter) -> None:
        self.inner = inner
        self.meter = meter

    async def handle_async_request(self, request: Any) -> Any:
        """Send ``request`` through ``inner``, metering it when it calls a metered API."""
        return await _meter_async(
            self.meter, request, lambda: self.inner.handle_async_request(request)
        )

    async def aclose(self) -> None:
        """Close ``inner``."""
        await self.inner.aclose()

    async def __aenter__(self) -> AsyncMeteredTransport:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.inner.__aexit__(*exc)


# Process-wide instrumentation of the default transports.

_install_lock = threading.Lock()
_installed: list[Meter] = []
_originals: list[tuple[type, str, Any]] = []


def _libraries() -> list[ModuleType]:
    libs = [httpx]
    if "httpx2" in sys.modules or importlib.util.find_spec("httpx2") is not None:
        libs.append(importlib.import_module("httpx2"))
    return libs


def _active() -> Meter | None:
    if _METERING.get():  # already metered by a transport further out
        return None
    return _installed[-1] if _installed else None


def _patch() -> None:
    for lib in _libraries():
        sync_cls = lib.HTTPTransport
        async_cls = lib.AsyncHTTPTransport
        sync_orig = sync_cls.handle_request
        async_orig = async_cls.handle_async_request

        def handle_request(self: Any, request: Any, _orig: Any = sync_orig) -> Any:
            meter = _active()
            if meter is None:
                return _orig(self, request)
            return _meter_sync(meter, request, lambda: _orig(self, request))

        async def handle_async_request(self: Any, request: Any, _orig: Any = async_orig) -> Any:
            meter = _active()
            if meter is None:
                return await _orig(self, request)
            return await _meter_async(meter, request, lambda: _orig(self, request))

        _originals.append((sync_cls, "handle_request", sync_orig))
        _originals.append((async_cls, "handle_async_request", async_orig))
        sync_cls.handle_request = handle_request
        async_cls.handle_async_request = handle_async_request


def install(meter: Meter) -> Callable[[], None]:
    """Meter every request made through httpx's (and httpx2's) default transports.

    Patches ``HTTPTransport.handle_request`` and ``AsyncHTTPTransport.handle_async_request`` of
    both libraries, so SDK clients built with their defaults are metered unmodified. Installs
    nest: the newest meter receives the requests. Returns the function that uninstalls it;
    the originals are restored when the last meter is uninstalled. A client given a custom
    transport (a mock, for instance) is not metered this way; wrap it in
    :class:`MeteredTransport` instead.
    """
    with _install_lock:
        if not _installed:
            _patch()
        _installed.append(meter)

    def uninstall() -> None:
        with _install_lock:
            if meter in _installed:
                _installed.remove(meter)
            if not _installed:
                while _originals:
                    cls, name, original = _originals.pop()
                    setattr(cls, name, original)

    return uninstall


# The recorder.


class _Flush:
    __slots__ = ("estimated", "event")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.estimated = False
        """It went through the estimator's queue, behind the estimates routed before it."""


_STOP = object()
_ESTIMATOR_DONE = object()


def _spilled_request(line: str) -> MeteredRequest:
    data = json.loads(line)
    names = {f.name for f in dataclasses.fields(MeteredRequest)}
    data = {k: v for k, v in data.items() if k in names}
    data["ts"] = datetime.fromisoformat(data["ts"])
    return MeteredRequest(**data)


class Recorder:
    """A meter sink that prices exchanges and writes them to the store from a daemon thread.

    Calling it only puts the exchange on a queue. The thread gathers what arrives over
    ``flush_interval_s``, finalizes and prices it and writes it in one transaction. Failed
    requests without usage are not written (see :func:`finalize`).

    A response that reported no usage is estimated in a second thread, so that requests with
    exact usage never queue behind an estimate (which may wait, once, for tiktoken to load its
    encoding). :meth:`close` writes everything queued, estimates included (they no longer wait
    for a tokenizer then). Requests that cannot be written after retries are kept in a spill
    file next to the database (``<db>.<id>.spill``, JSON lines holding no prompt, response or
    header); the next recorder on that database imports it.

    Args:
        db_path: the database file (opened by the thread).
        book: prices requests at their timestamp.
        health_name: name of the row in the ``source`` table that says the recorder is alive
            (``proxy``, ``pytest``...); empty for none.
        detail: one line for that row.
        flush_interval_s: how long requests are gathered into one write.
        max_queue: exchanges waiting beyond this are dropped (and counted) rather than letting
            memory grow without bound when the disk cannot keep up.
        heartbeat_s: when set, the health row is renewed this often with or without traffic
            (and says ``stopped`` on close), so a long-lived writer such as the proxy that is
            killed shows as stopped rather than ``ok`` forever; ``None``: only writes renew it.
    """

    def __init__(
        self,
        db_path: Path | str,
        book: PriceBook,
        *,
        health_name: str = "meter",
        detail: str = "",
        flush_interval_s: float = 0.25,
        max_queue: int = 100_000,
        clock: Clock = utcnow,
        heartbeat_s: float | None = None,
    ) -> None:
        self.db_path = Path(db_path)
        self.book = book
        self.health_name = health_name
        self.detail = detail
        self.flush_interval_s = flush_interval_s
        self.max_queue = max_queue
        self.clock = clock
        self.heartbeat_s = heartbeat_s
        self._beat_at = 0.0
        self.written = 0
        self.dropped = 0
        self.errors = 0
        self.last_error = ""
        self.spilled = 0
        """Requests kept in :attr:`spill_path` because the database could not take them."""
        self.imported = 0
        """Requests read back from spill files that earlier recorders left."""
        self.spill_path = self.db_path.with_name(
            f"{self.db_path.name}.{os.getpid()}-{id(self):x}.spill"
        )
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._estimates: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._routing = True
        """Whether responses without usage go to the estimator (until it is told to stop)."""
        self._hurry = threading.Event()
        self._wake = threading.Event()
        """Set with each marker queued: ends the gathering of a batch at once."""
        self._closed = False
        self._estimator = threading.Thread(
            target=self._estimate, name="tokentop-estimator", daemon=True
        )
        self._estimator.start()
        self._thread = threading.Thread(target=self._run, name="tokentop-recorder", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def __call__(self, exchange: Exchange) -> None:
        """Queue an exchange; never blocks."""
        self._put(exchange)

    def record(self, request: MeteredRequest) -> None:
        """Queue an already built request (priced here unless it is already)."""
        self._put(request)

    def _put(self, item: Exchange | MeteredRequest) -> None:
        if self._closed or self._queue.qsize() >= self.max_queue:
            self.dropped += 1
            return
        self._queue.put(item)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written; False on timeout or when closed."""
        if self._closed or not self._thread.is_alive():
            return False
        marker = _Flush()
        self._marker(marker)
        return marker.event.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._hurry.set()  # estimates stop waiting for a tokenizer download
        self._marker(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the recorder did not finish writing within %g s", timeout)

    def _marker(self, marker: object) -> None:
        self._queue.put(marker)
        self._wake.set()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        store = self._import_spills(None)
        stop = False
        while not stop:
            if self.heartbeat_s and time.monotonic() - self._beat_at >= self.heartbeat_s:
                store = self._beat(store)
            try:
                # close() always puts _STOP, so this never waits forever.
                first = self._queue.get(timeout=self.heartbeat_s or None)
            except queue.Empty:
                continue
            batch: list[Any] = [first]
            if isinstance(first, Exchange | MeteredRequest):
                # Gather for the interval, then take what came at once: waiting on the queue
                # item by item would wake this thread (and take the GIL from the event loop)
                # for every request. A marker (flush, stop) cuts the wait short.
                self._wake.wait(self.flush_interval_s)
                self._wake.clear()
                with contextlib.suppress(queue.Empty):
                    while isinstance(batch[-1], Exchange | MeteredRequest):  # a marker ends it
                        batch.append(self._queue.get_nowait())
            items = [i for i in batch if isinstance(i, Exchange | MeteredRequest)]
            if items:
                store = self._write(store, items)
            for marker in batch:
                if marker is _STOP:
                    # The estimator finishes what it was given, hands it back, then says so.
                    self._routing = False
                    self._estimates.put(_STOP)
                elif marker is _ESTIMATOR_DONE:
                    stop = True
                elif isinstance(marker, _Flush):
                    if marker.estimated or not self._routing:
                        marker.event.set()
                    else:
                        marker.estimated = True
                        self._estimates.put(marker)
        # Anything queued after the stop (a late request at exit) still lands.
        leftovers: list[Any] = []
        with contextlib.suppress(queue.Empty):
            while True:
                leftovers.append(self._queue.get_nowait())
        items = [i for i in leftovers if isinstance(i, Exchange | MeteredRequest)]
        if items:
            store = self._write(store, items)
        for marker in leftovers:
            if isinstance(marker, _Flush):
                marker.event.set()
        if self.heartbeat_s:
            store = self._beat(store, stopping=True)
        if store is not None:
            store.close()

    def _beat(self, store: Store | None, stopping: bool = False) -> Store | None:
        """Renew the health row (traffic or not), or say that the writer stopped."""
        self._beat_at = time.monotonic()
        if not self.health_name:
            return store
        now = self.clock()
        health = SourceHealth(
            name=self.health_name,
            kind="meter",
            state="stopped" if stopping else "ok",
            last_success=None if stopping else now,
            detail=f"stopped; was {self.detail}" if stopping and self.detail else self.detail,
            interval_s=self.heartbeat_s,
        )
        try:
            if store is None:
                store = Store(self.db_path)
            store.record_health(health, now=now)
        except Exception as exc:  # the next beat tries again
            self.last_error = f"cannot write {self.db_path}: {type(exc).__name__}: {exc}"
            log.warning("%s", self.last_error)
        return store

    def _write(
        self, store: Store | None, items: Sequence[Exchange | MeteredRequest]
    ) -> Store | None:
        requests: list[MeteredRequest] = []
        for i, item in enumerate(items):
            if i % 8 == 7:
                # Let a latency-sensitive thread (the proxy's event loop) take the GIL between
                # short slices of parsing and pricing, rather than after the switch interval.
                time.sleep(0)
            try:
                if isinstance(item, Exchange):
                    found = extract(item)
                    if found.usage is None and item.status < 400:
                        if self._routing:
                            self._estimates.put((item, found))
                            continue
                        with load_wait(0.0):  # a late one, after the estimator stopped
                            request = finalize(item, self.book, found=found)
                    else:
                        request = finalize(item, self.book, found=found)
                else:
                    request = price_request(self.book, item)
            except Exception as exc:
                self.errors += 1
                self.last_error = f"could not read a response: {type(exc).__name__}"
                log.warning("%s", self.last_error)
                continue
            if request is not None:
                requests.append(request)
        if not requests:
            return store
        for attempt in range(3):
            try:
                if store is None:
                    store = Store(self.db_path)
                store.write_batch(Batch(requests=tuple(requests)))
                self.written += len(requests)
                if self.health_name:
                    now = self.clock()
                    store.record_health(
                        SourceHealth(
                            name=self.health_name,
                            kind="meter",
                            state="ok",
                            last_success=now,
                            newest_data=max(r.ts for r in requests),
                            detail=self.detail,
                            interval_s=self.heartbeat_s,
                        ),
                        now=now,
                    )
                    self._beat_at = time.monotonic()
                return store
            except Exception as exc:  # a locked or unwritable database: retry, then spill
                self.last_error = f"cannot write {self.db_path}: {type(exc).__name__}: {exc}"
                time.sleep(0.05 * (attempt + 1))
        self.errors += 1
        if self._spill(requests):
            log.warning(
                "%s; %d metered requests kept in %s",
                self.last_error,
                len(requests),
                self.spill_path,
            )
        else:
            self.dropped += len(requests)
            log.warning("%s; %d metered requests dropped", self.last_error, len(requests))
        return store

    def _estimate(self) -> None:
        """The estimator thread: finalizes the responses that reported no usage."""
        while True:
            item = self._estimates.get()
            if item is _STOP:
                break
            if isinstance(item, _Flush):
                self._marker(item)
                continue
            exchange, found = item
            try:
                # Wait for a first tokenizer load, unless (or until) the recorder is closing.
                with load_wait(0.0 if self._hurry.is_set() else LOAD_TIMEOUT_S, self._hurry):
                    request = finalize(exchange, None, found=found)
            except Exception as exc:
                self.errors += 1
                self.last_error = f"could not estimate a response: {type(exc).__name__}"
                log.warning("%s", self.last_error)
                continue
            if request is not None:
                self._queue.put(request)  # priced and written by the recorder's thread
        self._marker(_ESTIMATOR_DONE)

    def _spill(self, requests: Sequence[MeteredRequest]) -> bool:
        lines = []
        for r in requests:
            data = dataclasses.asdict(r)
            data["ts"] = r.ts.isoformat()
            lines.append(json.dumps(data, default=str) + "\n")
        try:
            with self.spill_path.open("a", encoding="utf-8") as f:
                f.write("".join(lines))
        except OSError as exc:
            self.last_error += f"; cannot write {self.spill_path}: {exc.strerror or exc}"
            return False
        self.spilled += len(requests)
        return True

    def _import_spills(self, store: Store | None) -> Store | None:
        """Write the requests that earlier recorders on this database could not."""
        pattern = f"{glob.escape(self.db_path.name)}.*.spill"
        try:
            files = sorted(self.db_path.parent.glob(pattern))
        except OSError:
            return store
        for path in files:
            claimed = path.with_name(f"{path.name}.{os.getpid()}-{id(self):x}.importing")
            try:
                path.rename(claimed)  # atomic: two recorders never import the same file
            except OSError:
                continue
            try:
                text = claimed.read_text(encoding="utf-8")
                requests = [_spilled_request(line) for line in text.splitlines() if line.strip()]
                if store is None:
                    store = Store(self.db_path)
                store.write_batch(Batch(requests=tuple(requests)))
            except Exception as exc:
                self.last_error = f"cannot import {path}: {type(exc).__name__}: {exc}"
                log.warning("%s", self.last_error)
                with contextlib.suppress(OSError):
                    claimed.rename(path)
                continue
            self.imported += len(requests)
            claimed.unlink(missing_ok=True)
        return store
