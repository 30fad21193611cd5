"""The proxy's HTTP/1.1 front end, byte by byte: strict framing (RFC 9112), no smuggling."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.test_meter import BOOK
from tests.test_proxy import Stack
from tokentop.collectors.meter import Recorder
from tokentop.collectors.proxy import MAX_REQUEST_BODY, ProxyConfig, ProxyThread

BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
SMUGGLED = b"GET /v1/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
POST = b"POST /v1/chat/completions HTTP/1.1\r\n"
LENGTH_BODY = b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY.encode())


@pytest.fixture
def stack(db_path: Path) -> Iterator[Stack]:
    with Stack(db_path) as s:
        yield s


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` and read until the proxy closes (or resets) the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
    return out


def _chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


# Each case is sent as raw bytes, followed by a request that must never reach an upstream.
REFUSED = {
    "Content-Length and Transfer-Encoding": (
        POST + b"Host: x\r\nContent-Length: 48\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "Transfer-Encoding and Content-Length": (
        POST + b"Host: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        400,
    ),
    "two different Content-Length": (
        POST + b"Host: x\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{}",
        400,
    ),
    "two equal Content-Length": (
        POST + b"Host: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
        400,
    ),
    "Content-Length list": (POST + b"Host: x\r\nContent-Length: 2, 2\r\n\r\n{}", 400),
    "Content-Length +2": (POST + b"Host: x\r\nContent-Length: +2\r\n\r\n{}", 400),
    "Transfer-Encoding gzip, chunked": (
        POST + b"Host: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + _chunked(b"{}"),
        501,
    ),
    "Transfer-Encoding chunked, gzip": (
        POST + b"Host: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n" + _chunked(b"{}"),
        400,
    ),
    "two Transfer-Encoding": (
        POST + b"Host: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n",
        400,
    ),
    "Transfer-Encoding in HTTP/1.0": (
        b"POST /v1/chat/completions HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
        + _chunked(b"{}"),
        400,
    ),
    "chunk size 0x2": (
        POST + b"Host: x\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n",
        400,
    ),
    "chunk size +2": (
        POST + b"Host: x\r\nTransfer-Encoding: chunked\r\n\r\n+2\r\n{}\r\n0\r\n\r\n",
        400,
    ),
    "chunk size 0_2": (
        POST + b"Host: x\r\nTransfer-Encoding: chunked\r\n\r\n0_2\r\n{}\r\n0\r\n\r\n",
        400,
    ),
    "chunk size with a space": (
        POST + b"Host: x\r\nTransfer-Encoding: chunked\r\n\r\n2 \r\n{}\r\n0\r\n\r\n",
        400,
    ),
    "bare LF chunk lines": (
        POST + b"Host: x\r\nTransfer-Encoding: chunked\r\n\r\n2\n{}\n0\n\n",
        400,
    ),
    "bare LF after chunk data": (
        POST + b"Host: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\n0\r\n\r\n",
        400,
    ),
    "bare LF in the request target": (
        b"GET /v1/models\nX: HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    ),
    "bare LF ending the head": (b"GET /v1/models HTTP/1.1\nHost: x\n\n", 400),
    "NUL in a header value": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    "bare CR in a header value": (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
        400,
    ),
    "space in a header name": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n", 400),
    "space before the colon": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n", 400),
    "folded header line": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n", 400),
    "missing Host": (b"GET /v1/models HTTP/1.1\r\nX-A: b\r\n\r\n", 400),
    "two Host": (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
    "HTTP/2.0 on HTTP/1 framing": (b"GET /v1/models HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    "HTTP/1.2": (b"GET /v1/models HTTP/1.2\r\nHost: x\r\n\r\n", 400),
    "Upgrade with a body": (
        POST + b"Host: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 2\r\n\r\n{}",
        400,
    ),
    "CONNECT": (b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n", 405),
    "not HTTP": (b"NONSENSE\r\n\r\n", 400),
    "head over 64 KiB": (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        431,
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_malformed_requests_are_refused_and_nothing_is_smuggled(stack: Stack, case: str) -> None:
    data, status = REFUSED[case]
    port = _port(stack.proxy.url)
    out = _raw(port, data + SMUGGLED)
    assert out.startswith(b"HTTP/1.1 %d " % status), out[:200]
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["type"] == "invalid_request"
    length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    assert len(body) == length  # one answer, then the connection closed
    assert stack.openai_up.received == [] and stack.anthropic_up.received == []
    # The proxy still serves.
    ok = _raw(port, POST + b"Host: x\r\nConnection: close\r\n" + LENGTH_BODY)
    assert ok.startswith(b"HTTP/1.1 200 ")
    assert [r.path for r in stack.openai_up.received] == ["/v1/chat/completions"]


def test_well_formed_framing_still_works(stack: Stack) -> None:
    port = _port(stack.proxy.url)
    body = BODY.encode()
    # Chunk extensions, leading zeros, trailers and a lower-case coding name are all valid.
    wire = b"%x;a=b\r\n%s\r\n0003\r\n%s\r\n0\r\nX-Trailer: 1\r\n\r\n" % (
        len(body) - 3,
        body[:-3],
        body[-3:],
    )
    out = _raw(
        port,
        POST + b"Host: x\r\ntransfer-encoding: Chunked\r\nConnection: close\r\n\r\n" + wire,
    )
    assert out.startswith(b"HTTP/1.1 200 ")
    [received] = stack.openai_up.received
    assert received.body == body
    assert received.headers["content-length"] == str(len(body))
    assert "x-trailer" not in received.headers and "transfer-encoding" not in received.headers
    # A bodiless request that offers an Upgrade is served as plain HTTP/1.1.
    out = _raw(
        port,
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert out.count(b"HTTP/1.1 200 ") == 2
    for r in stack.openai_up.received[1:]:
        assert "upgrade" not in r.headers and "http2-settings" not in r.headers


def test_large_bodies_arrive_whole_over_many_reads(stack: Stack) -> None:
    big = json.dumps({"model": "gpt-4o-mini", "input": "y" * 5_000_000}).encode()
    with httpx.Client() as client:
        r = client.post(f"{stack.proxy.url}/v1/responses", content=big)
        assert r.status_code == 200
        chunks = (big[i : i + 70_000] for i in range(0, len(big), 70_000))
        r = client.post(f"{stack.proxy.url}/v1/responses", content=chunks)  # chunked
        assert r.status_code == 200
    assert [r.body == big for r in stack.openai_up.received] == [True, True]


def test_pipelined_requests_are_served_in_order_until_a_bad_one(stack: Stack) -> None:
    port = _port(stack.proxy.url)
    good = POST + b"Host: x\r\n" + LENGTH_BODY
    bad = POST + b"Host: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    out = _raw(port, good + good + bad + SMUGGLED)
    assert out.count(b"HTTP/1.1 200 ") == 2
    assert out.rstrip().endswith(b"}") and b"HTTP/1.1 400 " in out
    assert [r.path for r in stack.openai_up.received] == ["/v1/chat/completions"] * 2


def test_request_hop_by_hop_headers_are_dropped(stack: Stack) -> None:
    port = _port(stack.proxy.url)
    out = _raw(
        port,
        POST + b"Host: x\r\nConnection: close, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: 5\r\n"
        b"TE: trailers\r\nX-Kept: 1\r\n" + LENGTH_BODY,
    )
    assert out.startswith(b"HTTP/1.1 200 ")
    headers = stack.openai_up.received[0].headers
    assert headers["x-kept"] == "1"
    for name in ("x-hop", "keep-alive", "te", "connection"):
        assert name not in headers


def _expect_head(version: bytes) -> bytes:
    return b"POST /v1/chat/completions %s\r\nHost: x\r\nExpect: 100-continue\r\n" % version + (
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(BODY)
    )


def test_100_continue_only_for_http11(stack: Stack) -> None:
    port = _port(stack.proxy.url)
    for version, interim in ((b"HTTP/1.1", True), (b"HTTP/1.0", False)):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(_expect_head(version))
            s.settimeout(0.3)
            try:
                first = s.recv(65536)
            except TimeoutError:
                first = b""
            assert (first == b"HTTP/1.1 100 Continue\r\n\r\n") is interim, first
            s.settimeout(10)
            s.sendall(BODY.encode())
            out = first
            while chunk := s.recv(65536):
                out += chunk
        assert out.count(b"100 Continue") == int(interim)
        assert b"HTTP/1.1 200 " in out


def test_stalled_request_body_times_out_with_408(db_path: Path) -> None:
    with FakeUpstream() as up:
        config = ProxyConfig(port=0, openai=up.url, anthropic=up.url, body_timeout_s=0.3)
        with ProxyThread(config) as proxy:
            started = time.monotonic()
            out = _raw(_port(proxy.url), POST + b'Host: x\r\nContent-Length: 100\r\n\r\n{"mo')
            assert out.startswith(b"HTTP/1.1 408 ")
            assert 0.25 < time.monotonic() - started < 5
            # A head that stalls half way is timed out too.
            out = _raw(_port(proxy.url), POST + b"Host: x\r\nContent-Le")
            assert out.startswith(b"HTTP/1.1 408 ")
        assert up.received == []


def test_body_over_the_limit_gets_a_visible_413(db_path: Path) -> None:
    with FakeUpstream() as up:
        config = ProxyConfig(port=0, openai=up.url, anthropic=up.url, max_request_bytes=10_000)
        with ProxyThread(config) as proxy:
            # The client sends its whole (too large) body before it reads: it still gets the 413.
            r = httpx.post(f"{proxy.url}/v1/chat/completions", content=b"x" * 3_000_000)
            assert r.status_code == 413
            assert "10,000 bytes" in r.json()["error"]["message"]
            chunks = (b"x" * 4096 for _ in range(100))  # a chunked body, length unknown upfront
            r = httpx.post(f"{proxy.url}/v1/chat/completions", content=chunks)
            assert r.status_code == 413
        assert up.received == []


def test_70_mb_body_gets_413_naming_the_default_limit(db_path: Path) -> None:
    with FakeUpstream() as up:
        with ProxyThread(ProxyConfig(port=0, openai=up.url, anthropic=up.url)) as proxy:
            r = httpx.post(
                f"{proxy.url}/v1/chat/completions", content=b"x" * (70 * 1024 * 1024), timeout=60
            )
        assert r.status_code == 413
        message = r.json()["error"]["message"]
        assert "64 MiB" in message and f"{MAX_REQUEST_BODY:,} bytes" in message
        assert up.received == []


class RawUpstream:
    """An upstream on 127.0.0.1 that answers every request with the same bytes."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.requests = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while True:
                head, sep, rest = data.partition(b"\r\n\r\n")
                if sep:
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    if len(rest) >= length:
                        self.requests += 1
                        data = rest[length:]
                        conn.sendall(self.response)
                        continue
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                data += chunk

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_upstream() -> Iterator[list[RawUpstream]]:
    made: list[RawUpstream] = []
    yield made
    for up in made:
        up.close()


def _through(upstream: RawUpstream) -> httpx.Response:
    config = ProxyConfig(port=0, openai=upstream.url, anthropic=upstream.url)
    with ProxyThread(config) as proxy:
        return httpx.post(f"{proxy.url}/v1/chat/completions", content=BODY)


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0"
        b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: a\x00b\r\n\r\n{}",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\n{}",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
    ],
    ids=["CL+TE", "two CL", "NUL", "bare LF", "101"],
)
def test_malformed_upstream_responses_become_502(
    raw_upstream: list[RawUpstream], response: bytes
) -> None:
    up = RawUpstream(response)
    raw_upstream.append(up)
    config = ProxyConfig(port=0, openai=up.url, anthropic=up.url, read_timeout_s=2)
    with ProxyThread(config) as proxy:
        r = httpx.post(f"{proxy.url}/v1/chat/completions", content=BODY)
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "upstream_error"


def test_response_hop_by_hop_headers_are_dropped(raw_upstream: list[RawUpstream]) -> None:
    up = RawUpstream(
        b"HTTP/1.1 200 OK\r\nConnection: X-Hop, Content-Length\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n"
        b"Proxy-Authenticate: Basic\r\nX-Kept: 1\r\nContent-Length: 2\r\n\r\n{}"
    )
    raw_upstream.append(up)
    r = _through(up)
    assert r.status_code == 200 and r.content == b"{}"
    assert r.headers["x-kept"] == "1" and r.headers["content-length"] == "2"
    for name in ("x-hop", "keep-alive", "proxy-authenticate"):
        assert name not in r.headers


def test_chunked_response_running_past_its_end_is_cut(raw_upstream: list[RawUpstream]) -> None:
    up = RawUpstream(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsmuggled!"
    )
    raw_upstream.append(up)
    config = ProxyConfig(port=0, openai=up.url, anthropic=up.url)
    with ProxyThread(config) as proxy:
        out = _raw(
            _port(proxy.url),
            POST + b"Host: x\r\n" + LENGTH_BODY,
        )
    assert b"smuggled!" not in out


def test_a_body_running_past_its_length_is_not_read_as_the_next_response(
    raw_upstream: list[RawUpstream],
) -> None:
    # The head and the body come in one read; what follows the body is never kept for the
    # connection's next response: the connection is not reused.
    up = RawUpstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsmuggled!"
    )
    raw_upstream.append(up)
    config = ProxyConfig(port=0, openai=up.url, anthropic=up.url)
    with ProxyThread(config) as proxy, httpx.Client(base_url=proxy.url) as client:
        answers = [client.post("/v1/chat/completions", content=BODY) for _ in range(3)]
    assert [(r.status_code, r.content) for r in answers] == [(200, b"{}")] * 3
    assert up.requests == 3


def test_idle_upstream_connections_are_closed(db_path: Path) -> None:
    recorder = Recorder(db_path, BOOK, health_name="")
    with FakeUpstream() as up:
        config = ProxyConfig(port=0, openai=up.url, anthropic=up.url, pool_idle_s=0.2)
        with ProxyThread(config, sink=recorder) as proxy:
            with httpx.Client() as client:
                for _ in range(3):
                    r = client.post(f"{proxy.url}/v1/chat/completions", content=BODY)
                    assert r.status_code == 200
            assert len(up._writers) == 1  # one pooled keep-alive connection, reused
            deadline = time.monotonic() + 5
            while up._writers and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not up._writers  # closed by the proxy while it kept running
            r = httpx.post(f"{proxy.url}/v1/chat/completions", content=BODY)
            assert r.status_code == 200  # and a new one is opened when needed
    recorder.close()


# Deadlines: the proxy moves one timer per connection instead of making one per read.


def test_an_upstream_that_never_answers_gets_a_502_naming_the_timeout(
    raw_upstream: list[RawUpstream],
) -> None:
    up = RawUpstream(b"")  # reads each request, answers nothing
    raw_upstream.append(up)
    config = ProxyConfig(port=0, openai=up.url, anthropic=up.url, read_timeout_s=0.3)
    with ProxyThread(config) as proxy:
        r = httpx.post(f"{proxy.url}/v1/chat/completions", content=BODY, timeout=30)
    assert r.status_code == 502
    assert "did not answer within 0.3 s" in r.json()["error"]["message"]


@pytest.mark.parametrize("sent", [b"", b"{}"], ids=["no body byte", "some of the body"])
def test_a_body_that_stalls_is_cut_after_the_head_and_what_came(
    raw_upstream: list[RawUpstream], sent: bytes
) -> None:
    # The head waits for the body's first bytes (to go out in one write); when they never come,
    # the head still reaches the client before the connection is cut.
    up = RawUpstream(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + sent)
    raw_upstream.append(up)
    config = ProxyConfig(port=0, openai=up.url, anthropic=up.url, read_timeout_s=0.3)
    with ProxyThread(config) as proxy:
        out = _raw(_port(proxy.url), POST + b"Host: x\r\n" + LENGTH_BODY)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 10\r\n" in out.lower()
    assert out.endswith(b"\r\n\r\n" + sent)


def test_moved_deadlines_never_cut_a_busy_kept_alive_connection(db_path: Path) -> None:
    import http.client

    with FakeUpstream() as up:
        config = ProxyConfig(
            port=0, openai=up.url, anthropic=up.url, read_timeout_s=1.0, idle_timeout_s=1.0
        )
        with ProxyThread(config) as proxy:
            client = http.client.HTTPConnection("127.0.0.1", _port(proxy.url), timeout=10)
            # Requests over one client connection (and one upstream one) for several timeouts'
            # length, each gap shorter than a timeout: the deadline of each read is moved, and
            # no timer set for an earlier read may end either connection.
            # The gaps leave 0.75 s of slack: a loaded machine's stalls do not reach a timeout.
            for _ in range(14):
                client.request("POST", "/v1/chat/completions", body=BODY)
                response = client.getresponse()
                assert response.status == 200
                assert json.loads(response.read())["usage"]["prompt_tokens"] == 1200
                time.sleep(0.25)
            client.close()
            assert len(up._writers) == 1  # the one pooled upstream connection, still open
            assert len(up.received) == 14
