"""The metering proxy: a local HTTP/1.1 server that forwards OpenAI and Anthropic API calls.

Point an SDK's ``base_url`` at it (``http://127.0.0.1:8787/v1`` for OpenAI,
``http://127.0.0.1:8787`` for Anthropic) and every request is recorded with its exact usage and
cost, without touching the application.

Design, for speed and for streams that arrive as they are produced:

- A small asyncio server on raw streams: one task per client connection, HTTP/1.1 keep-alive,
  and a pool of keep-alive connections per upstream (closed after ``pool_idle_s`` idle). No HTTP
  framework sits in between; this adds well under a millisecond to a request on loopback
  (``bench/proxy_bench.py``).
- Messages are parsed by llhttp (through ``httptools``, its leniencies off), strictly as RFC 9112
  asks: a request whose framing is ambiguous or whose head is malformed (``Content-Length`` with
  ``Transfer-Encoding``, two lengths, a bad chunk size, a bare LF, a control character, a
  missing or repeated ``Host``) is answered ``400`` and its connection closed, so no byte of it
  can reach an upstream as a request of its own. A body over the limit gets a ``413`` naming the
  limit, read off the wire before the close so that the client sees it. Hop-by-hop headers,
  including those a ``Connection`` header names, are dropped both ways.
- Response bodies are relayed as they are read: each read from the upstream is written to the
  client before the next read, byte for byte. A chunked body keeps its chunk framing (llhttp
  follows it; it is not re-encoded), so server-sent events reach the client exactly when the
  upstream sends them. The meter (:class:`tokentop.collectors.meter.Observer`) sees a copy of
  the data. An upstream response with ambiguous framing is a ``502``.
- Routing by path: ``/v1/messages...`` (or any request carrying ``anthropic-version``) goes to
  the Anthropic upstream, any other ``/v1/...`` to the OpenAI one. A base URL may carry a path
  prefix. ``GET /healthz`` answers locally.
- ``X-Tokentop-Tag`` names the tag of a request and is removed before forwarding.
  ``Authorization`` and ``x-api-key`` are forwarded and never kept: the meter holds no headers,
  and nothing here logs a header, a body or a query string.
- The proxy offers the upstream only the content codings the meter can read (it narrows
  ``Accept-Encoding``); the client still gets the body in the coding the upstream chose.
- An upstream that cannot be reached, fails before its response head, or times out gives the
  client a ``502`` with a JSON error body shaped for both SDKs. A failure after the head was sent
  can only cut the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, NoReturn
from urllib.parse import urlsplit

import httptools

from tokentop.collectors.base import Clock, utcnow
from tokentop.collectors.meter import (
    TAG_HEADER,
    Exchange,
    Observer,
    Sink,
    classify,
    filter_accept_encoding,
    provider_for,
)

log = logging.getLogger("tokentop.proxy")

DEFAULT_PORT = 8787
DEFAULT_OPENAI = "https://api.openai.com"
DEFAULT_ANTHROPIC = "https://api.anthropic.com"

READ_SIZE = 65536
MAX_HEAD_BYTES = 65536
MAX_REQUEST_BODY = 64 * 1024 * 1024
MAX_IDLE_PER_UPSTREAM = 512
LINGER_S = 30.0
"""After refusing a request, how long what the client still sends is read and dropped."""
LINGER_SILENCE_S = 2.0

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_NOT_FORWARDED = _HOP_BY_HOP | {b"host", b"content-length", b"expect", TAG_HEADER.encode()}
_NO_BODY_STATUS = frozenset({204, 304})


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where one provider's requests go."""

    url: str
    scheme: str
    host: str
    port: int
    prefix: bytes
    host_header: bytes

    @classmethod
    def parse(cls, url: str) -> Upstream:
        """Parse ``http(s)://host[:port][/prefix]``; raises ``ValueError`` naming the URL."""
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"expected a base URL without query, fragment or credentials: {url!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ValueError(f"bad port in {url!r}") from None
        default_port = port == (443 if parts.scheme == "https" else 80)
        host = parts.hostname
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if default_port else f"{shown}:{port}"
        return cls(
            url=url.strip().rstrip("/"),
            scheme=parts.scheme,
            host=host,
            port=port,
            prefix=parts.path.rstrip("/").encode(),
            host_header=host_header.encode("ascii"),
        )


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """How the proxy listens and where it forwards."""

    host: str = "127.0.0.1"
    """Loopback by default: the proxy forwards credentials and should not face a network."""
    port: int = DEFAULT_PORT
    """``0`` picks a free port (see :attr:`MeteringProxy.port`)."""
    openai: str = DEFAULT_OPENAI
    anthropic: str = DEFAULT_ANTHROPIC
    default_tag: str = ""
    """Tag of requests without ``X-Tokentop-Tag``."""
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 600.0
    """Longest silence from an upstream (reasoning models can think for minutes)."""
    idle_timeout_s: float = 120.0
    """A client connection idle this long is closed."""
    body_timeout_s: float = 30.0
    """Longest silence from a client in the middle of a request's head or body (then ``408``)."""
    max_request_bytes: int = MAX_REQUEST_BODY
    """A request body longer than this is refused with ``413``."""
    pool_idle_s: float = 30.0
    """An upstream connection idle this long is closed."""


class _ClientError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _UpstreamError(Exception):
    """The upstream failed before any of its response reached the client."""


class _ClientGone(Exception):
    """The client went away while its response was being relayed."""


def error_body(status: int, message: str, kind: str = "proxy_error") -> bytes:
    """A JSON error that both SDKs understand (Anthropic's ``type: error`` and OpenAI's
    ``error`` object)."""
    return json.dumps(
        {
            "type": "error",
            "error": {"type": kind, "message": message, "code": f"tokentop_{kind}"},
        }
    ).encode()


def _response(status: int, body: bytes, *, close: bool) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    return b"".join(
        (
            f"HTTP/1.1 {status} {reason}\r\n".encode(),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n" if close else b"",
            b"\r\n",
            body,
        )
    )


class _Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "target", "version")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: list[tuple[bytes, bytes, bytes]],
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        """(lower-case name, name as sent, value)."""
        self.keep_alive = keep_alive
        self.body = b""

    def get(self, name: bytes) -> bytes:
        for lname, _name, value in self.headers:
            if lname == name:
                return value
        return b""


def _tokens(value: bytes) -> set[bytes]:
    """The lower-case tokens of a comma-separated header value (``Connection``)."""
    return {t.strip().lower() for t in value.split(b",")} - {b""}


class _RequestReader:
    """Reads one client connection's requests with llhttp, strictly (RFC 9112).

    :meth:`feed` takes bytes as they arrive; finished requests (bodies read whole) wait in
    :attr:`ready`, pipelined ones behind the first. The first error stops parsing for good: the
    requests before it are served, then the client gets :attr:`error` and the connection
    closes, so nothing after a malformed request is ever read as a request.
    """

    __slots__ = (
        "_body",
        "_body_size",
        "_fields_size",
        "_head_size",
        "_headers",
        "_parser",
        "_request",
        "_url",
        "continue_needed",
        "error",
        "in_head",
        "in_message",
        "max_body",
        "ready",
    )

    def __init__(self, max_body: int) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self.max_body = max_body
        self.ready: deque[_Request] = deque()
        self.error: _ClientError | None = None
        self.in_message = False
        """Some of a request has arrived, not all of it."""
        self.in_head = False
        self.continue_needed = False
        """The client waits for ``100 Continue`` before it sends the body."""
        self._head_size = 0
        self._fields_size = 0
        """Bytes of the header (and trailer) fields read so far."""
        self._url = b""
        self._headers: list[tuple[bytes, bytes, bytes]] = []
        self._request: _Request | None = None
        self._body: list[bytes] = []
        self._body_size = 0

    def feed(self, data: bytes) -> None:
        """Parse the next bytes from the client."""
        while data and self.error is None:
            head_before = self.in_head
            rest = b""
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                # A request with Upgrade (and no body, see on_headers_complete) ended; the
                # protocol stays HTTP/1.1 (Upgrade is hop-by-hop, never forwarded): read on.
                self._parser = httptools.HttpRequestParser(self)
                rest = data[int(exc.args[0]) :]
            except httptools.HttpParserCallbackError:
                if self.error is None:  # pragma: no cover - every callback failure sets it
                    self.error = _ClientError(400, "malformed request")
            except httptools.HttpParserError as exc:
                self.error = _ClientError(400, f"malformed request: {exc}")
            if self.in_head and self.error is None:
                # llhttp sets no limit on a head; the bytes of an unfinished one are counted.
                self._head_size = self._head_size + len(data) if head_before else len(data)
                if self._head_size > MAX_HEAD_BYTES:
                    self.error = _ClientError(431, "request head too large")
            data = rest

    def _fail(self, status: int, message: str) -> NoReturn:
        self.error = _ClientError(status, message)
        raise self.error

    # llhttp's callbacks.

    def on_message_begin(self) -> None:
        self.in_message = self.in_head = True
        self._url = b""
        self._fields_size = 0
        self._headers = []
        self._request = None
        self._body = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_HEAD_BYTES:
            self._fail(431, "request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields_size += len(name) + len(value) + 4
        if self._fields_size > MAX_HEAD_BYTES:
            self._fail(
                431, "request head too large" if self._request is None else "trailers too large"
            )
        if self._request is None:  # trailers, after the body, are read and dropped
            self._headers.append((name.lower(), name, value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            if version == "0.9":  # no version at all: a bare LF in the request line, say
                self._fail(400, "malformed request line")
            self._fail(505, f"HTTP/{version} is not supported (use HTTP/1.1)")
        method = parser.get_method()
        hosts = 0
        length = te = expect = b""
        tes = 0
        connection: set[bytes] = set()
        for lname, _name, value in self._headers:
            if lname == b"host":
                hosts += 1
            elif lname == b"content-length":
                length = value
            elif lname == b"transfer-encoding":
                te = value
                tes += 1
            elif lname == b"connection":
                connection |= _tokens(value)
            elif lname == b"expect":
                expect = value.lower()
        if hosts > 1 or (hosts == 0 and version == "1.1"):
            self._fail(400, "a request needs exactly one Host header")
        if tes:
            if version == "1.0":
                self._fail(400, "Transfer-Encoding in an HTTP/1.0 request")
            if tes > 1 or te.lower() != b"chunked":
                self._fail(501, "unsupported Transfer-Encoding (only chunked is accepted)")
        elif length.isdigit() and int(length) > self.max_body:
            self._fail(413, self.too_large())
        has_body = bool(tes) or length.strip(b"0") != b""
        if parser.should_upgrade():
            # httptools skips the body of an Upgrade request; only a bodiless one can be served.
            if method == b"CONNECT":
                self._fail(405, "CONNECT is not supported")
            if has_body:
                self._fail(400, "a request with Upgrade and a body is not supported")
        keep_alive = b"close" not in connection if version == "1.1" else b"keep-alive" in connection
        self._request = _Request(
            method, self._url, b"HTTP/" + version.encode(), self._headers, keep_alive
        )
        self.in_head = False
        # A client waiting for 100 Continue: an HTTP/1.0 one never is (RFC 9110, 10.1.1).
        self.continue_needed = has_body and expect == b"100-continue" and version == "1.1"

    def on_body(self, body: bytes) -> None:
        self.continue_needed = False
        self._body_size += len(body)
        if self._body_size > self.max_body:
            self._fail(413, self.too_large())
        self._body.append(body)

    def on_message_complete(self) -> None:
        request = self._request
        assert request is not None
        body = self._body
        request.body = body[0] if len(body) == 1 else b"".join(body)
        self._body = []
        self._request = None
        self.ready.append(request)
        self.in_message = self.in_head = self.continue_needed = False

    def too_large(self) -> str:
        """The 413 message, naming the limit."""
        limit = self.max_body
        shown = f"{limit / 1024 / 1024:g} MiB" if limit >= 1024 * 1024 else f"{limit:,} bytes"
        return f"request body too large: the proxy's limit is {shown} ({limit:,} bytes)"


class _ExtraBytesError(ValueError):
    """The upstream sent bytes after the end of its response."""


class _Response:
    """An upstream response as llhttp reads it: the head, then the data of a chunked body.

    One per response. A response that goes on past its end (the start of another message in
    the same read) raises from :meth:`feed`: that connection is cut rather than trusted.
    """

    __slots__ = (
        "_begun",
        "complete",
        "data",
        "head_done",
        "headers",
        "parser",
        "reason",
        "status",
        "version",
    )

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes, bytes]] = []
        """(lower-case name, name as sent, value)."""
        self.reason = b""
        self.status = 0
        self.version = ""
        self.head_done = False
        self.complete = False
        self.data: list[bytes] = []
        self._begun = False

    def feed(self, buf: bytes) -> list[bytes]:
        """Parse the next bytes; returns the body data among them (raises ``ValueError``)."""
        try:
            self.parser.feed_data(buf)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _ExtraBytesError):
                raise exc.__context__ from None
            raise ValueError(f"malformed response: {exc}") from None
        except httptools.HttpParserUpgrade:
            raise ValueError("switched protocols unasked") from None
        except httptools.HttpParserError as exc:
            raise ValueError(f"malformed response: {exc}") from None
        data = self.data
        if data:
            self.data = []
        return data

    def on_message_begin(self) -> None:
        if self._begun:
            raise _ExtraBytesError("bytes after the end of the response")
        self._begun = True

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:  # trailers are not forwarded
            self.headers.append((name.lower(), name, value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        self.head_done = True
        self.status = self.parser.get_status_code()
        self.version = self.parser.get_http_version()

    def on_body(self, body: bytes) -> None:
        self.data.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class _Deadline:
    """A timeout that is cheap to move: one loop timer, re-armed lazily when it fires.

    The proxy sets a deadline around every read (a client's request, an upstream's response),
    thousands of times a second; a timer handle made and cancelled for each would cost more than
    the read. Here :meth:`arm` and :meth:`disarm` only move a number (and :meth:`arm` reschedules
    the timer when the deadline comes earlier than it), and a timer that fires before the
    deadline it guards sets itself again for it. ``on_expiry`` runs once the deadline passes
    while armed, as a ``call_later`` per read would have run it.
    """

    __slots__ = ("_at", "_loop", "_on_expiry", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expiry: Callable[[], object]) -> None:
        self._loop = loop
        self._on_expiry = on_expiry
        self._at: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def arm(self, seconds: float) -> None:
        """Expire ``seconds`` from now unless disarmed (or armed again) before."""
        at = self._at = self._loop.time() + seconds
        timer = self._timer
        if timer is None or timer.when() > at:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(at, self._fire)

    def disarm(self) -> None:
        """No deadline until the next :meth:`arm`."""
        self._at = None

    def cancel(self) -> None:
        """Disarm and drop the timer (the connection is done)."""
        self._at = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        at = self._at
        if at is None:
            return
        if self._loop.time() >= at:
            self._at = None
            self._on_expiry()
        else:
            self._timer = self._loop.call_at(at, self._fire)


class _Conn:
    __slots__ = (
        "__weakref__",
        "deadline",
        "idle_since",
        "reader",
        "timed_out",
        "upstream",
        "writer",
    )

    def __init__(
        self, upstream: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.upstream = upstream
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0
        self.timed_out = False
        self.deadline = _Deadline(asyncio.get_running_loop(), self.time_out)
        """Armed while the proxy waits for the upstream (``read_timeout_s``)."""

    def time_out(self) -> None:
        self.timed_out = True
        self.writer.transport.abort()

    def close(self) -> None:
        self.deadline.cancel()
        self.writer.transport.abort()


class _Pool:
    """Idle keep-alive connections per upstream."""

    def __init__(self, connect_timeout_s: float, idle_s: float) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.idle_s = idle_s
        self._idle: dict[Upstream, list[_Conn]] = {}
        self._ssl: ssl.SSLContext | None = None

    async def acquire(self, upstream: Upstream, *, fresh: bool = False) -> tuple[_Conn, bool]:
        idle = self._idle.get(upstream)
        now = time.monotonic()
        while idle and not fresh:
            conn = idle.pop()
            if (
                now - conn.idle_since < self.idle_s
                and not conn.reader.at_eof()
                and not conn.writer.is_closing()
            ):
                return conn, True
            conn.close()
        ssl_ctx = None
        if upstream.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            ssl_ctx = self._ssl
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    upstream.host,
                    upstream.port,
                    ssl=ssl_ctx,
                    server_hostname=upstream.host if ssl_ctx else None,
                    limit=MAX_HEAD_BYTES,
                ),
                self.connect_timeout_s,
            )
        except TimeoutError:
            raise _UpstreamError(f"connecting to {upstream.url} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise _UpstreamError(f"cannot connect to {upstream.url}: {_why(exc)}") from None
        return _Conn(upstream, reader, writer), False

    def release(self, conn: _Conn) -> None:
        idle = self._idle.setdefault(conn.upstream, [])
        if len(idle) >= MAX_IDLE_PER_UPSTREAM or conn.writer.is_closing():
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def sweep(self) -> None:
        """Close the connections idle for ``idle_s`` or more, and those their upstream closed."""
        now = time.monotonic()
        for idle in self._idle.values():
            # Newest last (acquire takes from the end), so the stale ones lead.
            stale = 0
            for conn in idle:
                if now - conn.idle_since < self.idle_s:
                    break
                stale += 1
            for conn in idle[:stale]:
                conn.close()
            del idle[:stale]
            for conn in [c for c in idle if c.reader.at_eof() or c.writer.is_closing()]:
                conn.close()
                idle.remove(conn)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def _why(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


class _Client:
    __slots__ = ("busy", "writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.busy = False


class MeteringProxy:
    """The proxy server. ``await start()``, then ``await stop()`` (or :class:`ProxyThread`).

    Args:
        config: listen address, upstreams and timeouts.
        sink: receives each metered exchange (a :class:`tokentop.collectors.meter.Recorder`);
            called on the event loop, so it must only queue.
        clock: time source for request timestamps.
    """

    def __init__(
        self, config: ProxyConfig, sink: Sink | None = None, clock: Clock = utcnow
    ) -> None:
        self.config = config
        self.openai = Upstream.parse(config.openai)
        self.anthropic = Upstream.parse(config.anthropic)
        self.sink = sink
        self.clock = clock
        self.requests = 0
        self.errors = 0
        self.refused = 0
        """Requests answered 4xx/5xx by the proxy itself: malformed, too large, stalled."""
        self._pool = _Pool(config.connect_timeout_s, config.pool_idle_s)
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.Task[Any], _Client] = {}
        self._active: weakref.WeakSet[_Conn] = weakref.WeakSet()
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        self._stopping = False
        self._sweeper: asyncio.TimerHandle | None = None
        self.port = config.port

    async def wait_idle(self) -> None:
        """Return once no request is being handled (every exchange has reached the sink)."""
        if self._in_flight:
            if self._idle is None:
                self._idle = asyncio.Event()
            await self._idle.wait()

    async def start(self) -> int:
        """Listen; returns the port (useful with ``port=0``)."""
        self._server = await asyncio.start_server(
            self._serve_client,
            self.config.host,
            self.config.port,
            limit=MAX_HEAD_BYTES,
            backlog=1024,
            reuse_address=True,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweep()
        return self.port

    def _sweep(self) -> None:
        """Close idle upstream connections now and then (a quiet proxy holds no sockets)."""
        self._pool.sweep()
        if not self._stopping:
            every = min(max(self.config.pool_idle_s / 4, 0.05), 5.0)
            self._sweeper = asyncio.get_running_loop().call_later(every, self._sweep)

    @property
    def url(self) -> str:
        """The proxy's base URL."""
        host = self.config.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish (up to ``grace_s``), close the rest."""
        self._stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for client in self._clients.values():
            if not client.busy:
                client.writer.transport.close()
        tasks = list(self._clients)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace_s)
            # Aborting the sockets ends the stragglers (cancelling a stream handler's task trips
            # a Python 3.11 asyncio bug in StreamReaderProtocol).
            for task in pending:
                straggler = self._clients.get(task)
                if straggler is not None:
                    straggler.writer.transport.abort()
            for conn in self._active:
                conn.close()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        self._pool.close()

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        client = _Client(writer)
        self._clients[task] = client
        requests = _RequestReader(self.config.max_request_bytes)
        deadline = _Deadline(
            asyncio.get_running_loop(), lambda: self._client_timed_out(requests, writer)
        )
        try:
            while not self._stopping:
                client.busy = False
                request = await self._next_request(requests, reader, writer, deadline)
                if request is None:
                    break
                client.busy = True
                self._in_flight += 1
                try:
                    keep = await self._handle(request, writer)
                finally:
                    self._in_flight -= 1
                    if not self._in_flight and self._idle is not None:
                        self._idle.set()
                        self._idle = None
                if not (keep and request.keep_alive):
                    break
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        except Exception:
            log.exception("proxy connection failed")
        finally:
            deadline.cancel()
            self._clients.pop(task, None)
            writer.transport.close()

    async def _next_request(
        self,
        requests: _RequestReader,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        deadline: _Deadline,
    ) -> _Request | None:
        """The client's next whole request; ``None`` once the connection is to be closed."""
        while not requests.ready:
            if requests.error is not None:
                await self._refuse(requests.error, reader, writer)
                return None
            deadline.arm(
                self.config.body_timeout_s if requests.in_message else self.config.idle_timeout_s
            )
            try:
                data = await reader.read(READ_SIZE)
            except ConnectionError:
                return None
            finally:
                deadline.disarm()
            if not data:  # the client closed (or timed out), maybe in the middle of a request
                return None
            requests.feed(data)
            if requests.continue_needed:
                requests.continue_needed = False
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return requests.ready.popleft()

    def _client_timed_out(self, requests: _RequestReader, writer: asyncio.StreamWriter) -> None:
        if requests.in_message:
            self.refused += 1
            seconds = self.config.body_timeout_s
            message = f"tokentop proxy: the request stalled for {seconds:g} s"
            writer.write(_response(408, error_body(408, message, "timeout"), close=True))
        writer.transport.close()  # sends what is written first; the pending read sees the end

    async def _refuse(
        self, error: _ClientError, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer a request that cannot be served, then close its connection.

        What the client still sends (a refused body, typically) is read and dropped for a while
        first: closing a socket with unread bytes resets the connection, and a reset can reach
        the client before the answer does.
        """
        self.refused += 1
        body = error_body(error.status, f"tokentop proxy: {error.message}", "invalid_request")
        writer.write(_response(error.status, body, close=True))
        try:
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + LINGER_S
            while (left := deadline - loop.time()) > 0:
                async with asyncio.timeout(min(left, LINGER_SILENCE_S)):
                    if not await reader.read(READ_SIZE):
                        break
        except (TimeoutError, ConnectionError):
            pass

    def _route(self, request: _Request) -> tuple[Upstream, bytes] | None:
        target = request.target
        if not target.startswith(b"/"):
            # An absolute-form target (a client configured to use us as a forward proxy).
            parts = urlsplit(target.decode("latin-1"))
            target = (parts.path or "/").encode() + (
                b"?" + parts.query.encode() if parts.query else b""
            )
        path = target.split(b"?", 1)[0]
        if not path.startswith(b"/v1/") and path != b"/v1":
            return None
        if path.startswith(b"/v1/messages") or request.get(b"anthropic-version"):
            return self.anthropic, target
        return self.openai, target

    async def _handle(self, request: _Request, writer: asyncio.StreamWriter) -> bool:
        """Proxy one request; returns whether the client connection may be reused."""
        started = time.perf_counter()
        routed = self._route(request)
        if routed is None:
            if request.method in (b"GET", b"HEAD") and request.target.split(b"?")[0] == b"/healthz":
                body = b'{"status":"ok"}'
                writer.write(_response(200, body, close=False))
                return True
            body = error_body(
                404, "tokentop proxy: only /v1/... API paths are proxied", "not_found"
            )
            writer.write(_response(404, body, close=False))
            return True
        upstream, target = routed
        method = request.method.decode("latin-1")
        path = target.split(b"?", 1)[0].decode("latin-1")
        api = classify(method, path)
        self.requests += 1
        exchange = None
        if api is not None and self.sink is not None:
            tag = request.get(TAG_HEADER.encode()).decode("utf-8", "replace").strip()
            exchange = Exchange(
                api=api,
                provider=provider_for(upstream.host, api),
                ts=self.clock(),
                request_body=request.body,
                tag=tag[:200] or self.config.default_tag,
            )
        head = self._upstream_head(request, upstream, target, metered=api is not None)
        try:
            return await self._forward(request, upstream, head, writer, exchange, started, path)
        except _UpstreamError as exc:
            self.errors += 1
            log.warning("%s %s: %s", method, path, exc)
            body = error_body(502, f"tokentop proxy: {exc}", "upstream_error")
            writer.write(_response(502, body, close=False))
            return True

    def _upstream_head(
        self, request: _Request, upstream: Upstream, target: bytes, *, metered: bool
    ) -> bytes:
        connection_tokens = {
            t.strip().lower() for t in request.get(b"connection").split(b",") if t.strip()
        }
        parts = [
            request.method,
            b" ",
            upstream.prefix,
            target,
            b" HTTP/1.1\r\nhost: ",
            upstream.host_header,
            b"\r\n",
        ]
        for lname, name, value in request.headers:
            if lname in _NOT_FORWARDED or lname in connection_tokens:
                continue
            if lname == b"accept-encoding" and metered:
                value = filter_accept_encoding(value.decode("latin-1")).encode("latin-1")
            parts += (name, b": ", value, b"\r\n")
        if request.body or request.method in (b"POST", b"PUT", b"PATCH"):
            parts.append(b"content-length: %d\r\n" % len(request.body))
        parts.append(b"\r\n")
        return b"".join(parts)

    async def _send(
        self, upstream: Upstream, head: bytes, body: bytes
    ) -> tuple[_Conn, _Response, bytes]:
        """Send the request and read the response head, retrying once on a stale connection.

        Returns the connection, the response and the bytes read after its head (the body's
        first bytes, which the head then goes out with: one write, one send, not two).
        """
        for attempt in (0, 1):
            conn, reused = await self._pool.acquire(upstream, fresh=attempt > 0)
            self._active.add(conn)
            conn.deadline.arm(self.config.read_timeout_s)
            try:
                conn.writer.write(head + body if len(body) < 65536 else head)
                if len(body) >= 65536:
                    conn.writer.write(body)
                buf = b""
                while True:  # interim (1xx) responses are read and dropped
                    end = buf.find(b"\r\n\r\n")
                    while end < 0:
                        if len(buf) > MAX_HEAD_BYTES:
                            raise asyncio.LimitOverrunError("response head too large", len(buf))
                        data = await conn.reader.read(READ_SIZE)
                        if not data:
                            raise asyncio.IncompleteReadError(buf, None)
                        start = max(len(buf) - 3, 0)
                        buf += data
                        end = buf.find(b"\r\n\r\n", start)
                    raw, buf = buf[: end + 4], buf[end + 4 :]
                    response = _Response()
                    try:
                        response.feed(raw)
                    except ValueError as exc:
                        conn.close()
                        raise _UpstreamError(f"{upstream.url} sent a {exc}") from None
                    if not response.head_done or response.version not in ("1.1", "1.0"):
                        conn.close()
                        raise _UpstreamError(f"{upstream.url} sent a malformed response")
                    if response.status >= 200:
                        return conn, response, buf
            except asyncio.IncompleteReadError as exc:
                conn.close()
                if reused and not exc.partial and not conn.timed_out:
                    continue  # the upstream closed an idle connection as we reused it
                raise _UpstreamError(
                    self._failure(upstream, conn, "closed the connection")
                ) from None
            except (OSError, asyncio.LimitOverrunError) as exc:
                conn.close()
                if reused and isinstance(exc, ConnectionError) and not conn.timed_out:
                    continue
                raise _UpstreamError(self._failure(upstream, conn, _why(exc))) from None
            finally:
                conn.deadline.disarm()
        raise _UpstreamError(f"{upstream.url} closed the connection")  # pragma: no cover

    def _failure(self, upstream: Upstream, conn: _Conn, what: str) -> str:
        if conn.timed_out:
            return f"{upstream.url} did not answer within {self.config.read_timeout_s:g} s"
        return f"{upstream.url} {what}"

    async def _forward(
        self,
        request: _Request,
        upstream: Upstream,
        head: bytes,
        writer: asyncio.StreamWriter,
        exchange: Exchange | None,
        started: float,
        path: str,
    ) -> bool:
        conn, response, first = await self._send(upstream, head, request.body)
        status = response.status
        reason = response.reason
        headers = response.headers
        te = b""
        length = b""
        named: set[bytes] = set()
        content_type = content_encoding = b""
        for lname, _name, value in headers:
            if lname == b"transfer-encoding":
                te = value.lower()
            elif lname == b"content-length":
                length = value
            elif lname == b"connection":
                named |= _tokens(value)
            elif lname == b"content-type":
                content_type = value
            elif lname == b"content-encoding":
                content_encoding = value
        if request.method == b"HEAD" or status in _NO_BODY_STATUS or status < 200:
            framing = "none"
        elif te:
            if te.rsplit(b",", 1)[-1].strip() != b"chunked":
                conn.close()
                raise _UpstreamError(f"{upstream.url} sent an unsupported transfer-encoding")
            framing = "chunked"
        elif length:
            if not length.isdigit():
                conn.close()
                raise _UpstreamError(f"{upstream.url} sent a bad content-length")
            framing = "length"
        else:
            framing = "close"
        upstream_close = (
            b"keep-alive" not in named if response.version == "1.0" else b"close" in named
        )
        # Headers the upstream's Connection names are hop-by-hop too (never the body's length).
        named.discard(b"content-length")
        client_http11 = request.version == b"HTTP/1.1"
        dechunk = framing == "chunked" and not client_http11
        close_client = framing == "close" or dechunk or not request.keep_alive or self._stopping

        out = [b"HTTP/1.1 %d " % status, reason, b"\r\n"]
        for lname, name, value in headers:
            if lname in _HOP_BY_HOP:
                if lname != b"transfer-encoding" or dechunk:
                    continue
            elif named and lname in named:
                continue
            out += (name, b": ", value, b"\r\n")
        if close_client:
            out.append(b"connection: close\r\n")
        elif not client_http11:
            out.append(b"connection: keep-alive\r\n")
        out.append(b"\r\n")

        observer = None
        if exchange is not None:
            exchange.status = status
            exchange.request_id = _header(headers, b"x-request-id") or _header(
                headers, b"request-id"
            )
            observer = Observer(
                exchange,
                content_type.decode("latin-1"),
                content_encoding.decode("latin-1"),
                started,
                self._emit,
            )
        head = b"".join(out)
        reusable = False
        complete = False
        try:
            # The head goes out with the body's first bytes, in one write (one send).
            if framing == "length":
                reusable = await self._relay_length(
                    conn, writer, observer, int(length), head, first
                )
            elif framing == "chunked":
                reusable = await self._relay_chunked(
                    conn, response, writer, observer, dechunk, head, first
                )
            elif framing == "close":
                await self._relay_until_close(conn, writer, observer, head, first)
            else:
                reusable = not first  # bytes after a bodiless response: not to be trusted
                writer.write(head)
                await writer.drain()
            complete = True
        except _ClientGone:
            log.info(
                "%s %s: the client went away during the response", request.method.decode(), path
            )
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            self.errors += 1
            what = "timed out" if conn.timed_out else _why(exc)
            log.warning(
                "%s %s: upstream response cut short: %s", request.method.decode(), path, what
            )
            close_client = True
        finally:
            if observer is not None:
                observer.finish(complete)
        if reusable and complete and not upstream_close:
            self._pool.release(conn)
        else:
            conn.close()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s %s -> %d in %.1f ms",
                request.method.decode(),
                path,
                status,
                (time.perf_counter() - started) * 1000,
            )
        return complete and not close_client

    def _emit(self, exchange: Exchange) -> None:
        if self.sink is not None:
            self.sink(exchange)

    async def _read(self, conn: _Conn, n: int = READ_SIZE) -> bytes:
        conn.deadline.arm(self.config.read_timeout_s)
        try:
            return await conn.reader.read(n)
        finally:
            conn.deadline.disarm()

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
        transport = writer.transport
        if transport.is_closing():
            raise _ClientGone
        writer.write(data)
        if not transport.get_write_buffer_size() and not transport.is_closing():
            return  # all sent: drain() would return at once (two coroutines per chunk, saved)
        try:
            await writer.drain()
        except ConnectionError:
            raise _ClientGone from None

    async def _relay_chunked(
        self,
        conn: _Conn,
        response: _Response,
        writer: asyncio.StreamWriter,
        observer: Observer | None,
        dechunk: bool,
        head: bytes,
        buf: bytes,
    ) -> bool:
        # llhttp follows the framing (and refuses a malformed one) while the bytes pass on as
        # they came; a read that runs past the body's end raises before it is relayed.
        while True:
            data = response.feed(buf) if buf else []
            if observer is not None:
                for part in data:
                    observer.feed(part)
            out = b"".join(data) if dechunk else buf
            if head:
                out, head = head + out, b""
            if out:
                await self._write(writer, out)
            if response.complete:
                return True
            buf = await self._read(conn)
            if not buf:
                raise asyncio.IncompleteReadError(b"", None)

    async def _relay_length(
        self,
        conn: _Conn,
        writer: asyncio.StreamWriter,
        observer: Observer | None,
        length: int,
        head: bytes,
        first: bytes,
    ) -> bool:
        """Relay a body of ``length`` bytes, ``head`` (the response head) in front of its first
        bytes; a body cut short before its first byte still gets the head out. ``first``: the
        bytes read with the head. Returns whether the connection can be reused."""
        reusable = len(first) <= length  # not when the upstream sent more than its body
        first = first[:length]
        remaining = length
        try:
            while remaining:
                if first:
                    buf, first = first, b""
                else:
                    buf = await self._read(conn, min(READ_SIZE, remaining))
                if not buf:
                    raise asyncio.IncompleteReadError(b"", remaining)
                remaining -= len(buf)
                if observer is not None:
                    observer.feed(buf)
                if head:
                    buf, head = head + buf, b""
                await self._write(writer, buf)
        finally:
            if head:
                writer.write(head)
        if length == 0:
            await writer.drain()
        return reusable

    async def _relay_until_close(
        self,
        conn: _Conn,
        writer: asyncio.StreamWriter,
        observer: Observer | None,
        head: bytes,
        first: bytes,
    ) -> None:
        if observer is not None and first:
            observer.feed(first)
        writer.write(head + first)
        while True:
            buf = await self._read(conn)
            if not buf:
                return
            if observer is not None:
                observer.feed(buf)
            await self._write(writer, buf)


def _header(headers: list[tuple[bytes, bytes, bytes]], name: bytes) -> str:
    for lname, _name, value in headers:
        if lname == name:
            return value.decode("latin-1")[:200]
    return ""


async def serve(
    proxy: MeteringProxy,
    stop: asyncio.Event,
    on_ready: Callable[[MeteringProxy], None] | None = None,
    grace_s: float = 10.0,
) -> None:
    """Run ``proxy`` until ``stop`` is set; ``on_ready`` is called once it listens."""
    await proxy.start()
    if on_ready is not None:
        on_ready(proxy)
    try:
        await stop.wait()
    finally:
        await proxy.stop(grace_s)


class ProxyThread:
    """A proxy on its own event loop in a daemon thread (for tests, benchmarks and embedding).

    ::

        with ProxyThread(ProxyConfig(port=0, openai=url), sink=recorder) as proxy:
            client = openai.OpenAI(base_url=f"{proxy.url}/v1")
    """

    def __init__(
        self, config: ProxyConfig, sink: Sink | None = None, clock: Clock = utcnow
    ) -> None:
        self.proxy = MeteringProxy(config, sink, clock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tokentop-proxy", daemon=True)

    @property
    def url(self) -> str:
        """The proxy's base URL."""
        return self.proxy.url

    def start(self) -> ProxyThread:
        """Start the thread and wait until the proxy listens."""
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Block until the proxy handles no request (so every exchange reached the sink)."""
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self.proxy.wait_idle(), self._loop).result(timeout)

    def stop(self) -> None:
        """Stop the proxy (requests in flight finish first) and join the thread."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def __enter__(self) -> ProxyThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(self.proxy, self._stop, lambda _p: self._ready.set())

        try:
            asyncio.run(main())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()
