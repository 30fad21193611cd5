"""The metering proxy: a local HTTP/1.1 server that forwards OpenAI and Anthropic API calls.

Point an SDK's ``base_url`` at it (``http://127.0.0.1:8787/v1`` for OpenAI,
``http://127.0.0.1:8787`` for Anthropic) and every request is recorded with its exact usage and
cost, without touching the application.

Design, for speed and for streams that arrive as they are produced:

- A small asyncio server on raw streams: one task per client connection, HTTP/1.1 keep-alive,
  and a pool of keep-alive connections per upstream. No HTTP framework sits in between; this
  adds well under a millisecond to a request on loopback (``bench/proxy_bench.py``).
- Response bodies are relayed as they are read: each read from the upstream is written to the
  client before the next read, byte for byte. A chunked body keeps its chunk framing (it is
  scanned, not re-encoded), so server-sent events reach the client exactly when the upstream
  sends them. The meter (:class:`tokentop.collectors.meter.Observer`) sees a copy of the data.
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
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

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
    pool_idle_s: float = 30.0
    """An upstream connection idle this long is not reused."""


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
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        """(lower-case name, name as sent, value)."""
        self.body = b""
        connection = self.get(b"connection").lower()
        if version == b"HTTP/1.1":
            self.keep_alive = b"close" not in connection
        else:
            self.keep_alive = b"keep-alive" in connection

    def get(self, name: bytes) -> bytes:
        for lname, _name, value in self.headers:
            if lname == name:
                return value
        return b""


def _parse_head(head: bytes) -> tuple[list[bytes], list[tuple[bytes, bytes, bytes]]]:
    lines = head[:-4].split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if (
            not sep
            or not name
            or name[-1:] in (b" ", b"\t")
            or line[:1] in (b" ", b"\t")
            or b"\n" in line
            or b"\r" in line
        ):
            raise _ClientError(400, "malformed header line")
        headers.append((name.lower(), name, value.strip(b" \t")))
    return lines[0].split(b" ", 2), headers


def _parse_request(head: bytes) -> _Request:
    start, headers = _parse_head(head)
    if len(start) != 3 or not start[2].startswith(b"HTTP/1."):
        raise _ClientError(400, "malformed request line")
    return _Request(start[0], start[1], start[2], headers)


class _ChunkedScanner:
    """Follows a chunked body as its bytes pass: where it ends and the data it carries."""

    __slots__ = ("done", "line", "remaining", "state")

    SIZE, DATA, DATA_END, TRAILER = range(4)

    def __init__(self) -> None:
        self.state = self.SIZE
        self.remaining = 0
        self.line = b""
        self.done = False

    def feed(self, buf: bytes) -> tuple[int, list[bytes]]:
        """How many bytes of ``buf`` belong to the body, and the chunk data among them."""
        i, n = 0, len(buf)
        data: list[bytes] = []
        while i < n and not self.done:
            if self.state == self.DATA:
                take = min(self.remaining, n - i)
                data.append(buf[i : i + take])
                i += take
                self.remaining -= take
                if not self.remaining:
                    self.state = self.DATA_END
                continue
            j = buf.find(b"\n", i)
            if j < 0:
                self.line += buf[i:]
                if len(self.line) > 8192:
                    raise ValueError("chunk line too long")
                return n, data
            line = (self.line + buf[i:j]).rstrip(b"\r")
            self.line = b""
            i = j + 1
            if self.state == self.DATA_END:
                if line:
                    raise ValueError("chunk data overran its size")
                self.state = self.SIZE
            elif self.state == self.SIZE:
                size = int(line.split(b";", 1)[0].strip() or b"x", 16)
                if size < 0:
                    raise ValueError("negative chunk size")
                if size:
                    self.remaining = size
                    self.state = self.DATA
                else:
                    self.state = self.TRAILER
            elif not line:  # the blank line after the trailers ends the body
                self.done = True
        return i, data


class _Conn:
    __slots__ = ("__weakref__", "idle_since", "reader", "timed_out", "upstream", "writer")

    def __init__(
        self, upstream: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.upstream = upstream
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0
        self.timed_out = False

    def time_out(self) -> None:
        self.timed_out = True
        self.writer.transport.abort()

    def close(self) -> None:
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
        self._pool = _Pool(config.connect_timeout_s, config.pool_idle_s)
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.Task[Any], _Client] = {}
        self._active: weakref.WeakSet[_Conn] = weakref.WeakSet()
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        self._stopping = False
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
        return self.port

    @property
    def url(self) -> str:
        """The proxy's base URL."""
        host = self.config.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish (up to ``grace_s``), close the rest."""
        self._stopping = True
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
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                client.busy = False
                timer = loop.call_later(self.config.idle_timeout_s, writer.transport.close)
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    writer.write(_response(431, b"", close=True))
                    break
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                finally:
                    timer.cancel()
                client.busy = True
                try:
                    request = _parse_request(head)
                    await self._read_body(request, reader, writer)
                except _ClientError as exc:
                    body = error_body(exc.status, exc.message, "invalid_request")
                    writer.write(_response(exc.status, body, close=True))
                    break
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                except ValueError:  # a chunk line longer than the stream's limit
                    body = error_body(400, "malformed chunked body", "invalid_request")
                    writer.write(_response(400, body, close=True))
                    break
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
            self._clients.pop(task, None)
            writer.transport.close()

    async def _read_body(
        self, request: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if request.get(b"expect").lower() == b"100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        te = request.get(b"transfer-encoding").lower()
        if te:
            if te.rsplit(b",", 1)[-1].strip() != b"chunked":
                raise _ClientError(501, "unsupported transfer-encoding")
            request.body = await self._read_chunked_request(reader)
            return
        length = request.get(b"content-length")
        if length:
            if not length.isdigit():
                raise _ClientError(400, "bad content-length")
            n = int(length)
            if n > MAX_REQUEST_BODY:
                raise _ClientError(413, "request body too large")
            request.body = await reader.readexactly(n) if n else b""

    @staticmethod
    async def _read_chunked_request(reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            line = await reader.readline()
            if not line.endswith(b"\n"):
                raise asyncio.IncompleteReadError(line, None)
            try:
                n = int(line.split(b";", 1)[0].strip() or b"x", 16)
            except ValueError:
                raise _ClientError(400, "malformed chunked body") from None
            if n < 0:
                raise _ClientError(400, "malformed chunked body")
            if n == 0:
                while (await reader.readline()).strip(b"\r\n"):
                    pass  # trailers are not forwarded
                return b"".join(parts)
            size += n
            if size > MAX_REQUEST_BODY:
                raise _ClientError(413, "request body too large")
            parts.append(await reader.readexactly(n))
            if (await reader.readline()).strip(b"\r\n"):
                raise _ClientError(400, "malformed chunked body")

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
    ) -> tuple[_Conn, list[bytes], list[tuple[bytes, bytes, bytes]], bytes]:
        """Send the request and read the response head, retrying once on a stale connection."""
        loop = asyncio.get_running_loop()
        for attempt in (0, 1):
            conn, reused = await self._pool.acquire(upstream, fresh=attempt > 0)
            self._active.add(conn)
            timer = loop.call_later(self.config.read_timeout_s, conn.time_out)
            try:
                conn.writer.write(head + body if len(body) < 65536 else head)
                if len(body) >= 65536:
                    conn.writer.write(body)
                while True:
                    raw = await conn.reader.readuntil(b"\r\n\r\n")
                    start, headers = _parse_head(raw)
                    if (
                        len(start) < 2
                        or not start[0].startswith(b"HTTP/1.")
                        or not start[1].isdigit()
                    ):
                        conn.close()
                        raise _UpstreamError(f"{upstream.url} sent a malformed response")
                    status = int(start[1])
                    if status == 101:  # never asked for: Upgrade is not forwarded
                        conn.close()
                        raise _UpstreamError(f"{upstream.url} switched protocols unasked")
                    if status >= 200:
                        return conn, start, headers, raw
            except asyncio.IncompleteReadError as exc:
                conn.close()
                if reused and not exc.partial and not conn.timed_out:
                    continue  # the upstream closed an idle connection as we reused it
                raise _UpstreamError(
                    self._failure(upstream, conn, "closed the connection")
                ) from None
            except (OSError, asyncio.LimitOverrunError, _ClientError) as exc:
                conn.close()
                if reused and isinstance(exc, ConnectionError) and not conn.timed_out:
                    continue
                raise _UpstreamError(self._failure(upstream, conn, _why(exc))) from None
            finally:
                timer.cancel()
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
        conn, start, headers, _raw = await self._send(upstream, head, request.body)
        status = int(start[1])
        reason = start[2] if len(start) > 2 else b""
        te = b""
        length = b""
        upstream_close = start[0] == b"HTTP/1.0"
        content_type = content_encoding = b""
        for lname, _name, value in headers:
            if lname == b"transfer-encoding":
                te = value.lower()
            elif lname == b"content-length":
                length = value
            elif lname == b"connection":
                lowered = value.lower()
                upstream_close = b"close" in lowered or (
                    upstream_close and b"keep-alive" not in lowered
                )
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
        client_http11 = request.version == b"HTTP/1.1"
        dechunk = framing == "chunked" and not client_http11
        close_client = framing == "close" or dechunk or not request.keep_alive or self._stopping

        out = [b"HTTP/1.1 %d " % status, reason, b"\r\n"]
        for lname, name, value in headers:
            if lname in _HOP_BY_HOP and not (lname == b"transfer-encoding" and not dechunk):
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
        writer.write(b"".join(out))
        reusable = False
        complete = False
        try:
            if framing == "chunked":
                reusable = await self._relay_chunked(conn, writer, observer, dechunk)
            elif framing == "length":
                reusable = await self._relay_length(conn, writer, observer, int(length))
            elif framing == "close":
                await self._relay_until_close(conn, writer, observer)
            else:
                reusable = True
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
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.config.read_timeout_s, conn.time_out)
        try:
            return await conn.reader.read(n)
        finally:
            timer.cancel()

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
        if writer.transport.is_closing():
            raise _ClientGone
        writer.write(data)
        try:
            await writer.drain()
        except ConnectionError:
            raise _ClientGone from None

    async def _relay_chunked(
        self,
        conn: _Conn,
        writer: asyncio.StreamWriter,
        observer: Observer | None,
        dechunk: bool,
    ) -> bool:
        scanner = _ChunkedScanner()
        while not scanner.done:
            buf = await self._read(conn)
            if not buf:
                raise asyncio.IncompleteReadError(b"", None)
            used, data = scanner.feed(buf)
            if observer is not None:
                for part in data:
                    observer.feed(part)
            if dechunk:
                if data:
                    await self._write(writer, b"".join(data))
            else:
                await self._write(writer, buf if used == len(buf) else buf[:used])
            if used < len(buf):
                return False  # bytes after the end of the body: do not trust this connection
        return True

    async def _relay_length(
        self, conn: _Conn, writer: asyncio.StreamWriter, observer: Observer | None, length: int
    ) -> bool:
        remaining = length
        while remaining:
            buf = await self._read(conn, min(READ_SIZE, remaining))
            if not buf:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(buf)
            if observer is not None:
                observer.feed(buf)
            await self._write(writer, buf)
        if length == 0:
            await writer.drain()
        return True

    async def _relay_until_close(
        self, conn: _Conn, writer: asyncio.StreamWriter, observer: Observer | None
    ) -> None:
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
