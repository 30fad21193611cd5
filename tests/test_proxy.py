"""The metering proxy end to end: the official SDKs -> proxy -> fake upstreams on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.test_meter import (
    BOOK,
    CHAT_NANO,
    CHAT_TOKENS,
    MESSAGES_NANO,
    MESSAGES_TOKENS,
    RESPONSES_NANO,
    RESPONSES_TOKENS,
    Usage,
)
from tokentop.collectors.meter import Recorder
from tokentop.collectors.proxy import ProxyConfig, ProxyThread, _Response
from tokentop.pricing.book import PriceBook, TokenCounts
from tokentop.store.db import Store
from tokentop.tui import cli

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-proj-SECRETKEY-5d2e0f9a"
ANT_KEY = "sk-ant-api03-SECRETKEY-77c1"


class Stack:
    """Two fake upstreams (so routing shows), a recorder and a proxy in front of them."""

    def __init__(self, db_path: Path, **upstream: object) -> None:
        self.openai_up = FakeUpstream(**upstream)  # type: ignore[arg-type]
        self.anthropic_up = FakeUpstream(**upstream)  # type: ignore[arg-type]
        self.db_path = db_path
        self.recorder = Recorder(db_path, BOOK, health_name="proxy", flush_interval_s=0.01)

    def __enter__(self) -> Stack:
        self.openai_up.__enter__()
        self.anthropic_up.__enter__()
        config = ProxyConfig(port=0, openai=self.openai_up.url, anthropic=self.anthropic_up.url)
        self.proxy = ProxyThread(config, sink=self.recorder).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.proxy.stop()
        self.recorder.close()
        self.openai_up.__exit__()
        self.anthropic_up.__exit__()

    def openai(self, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.proxy.url}/v1",
            api_key=KEY,
            max_retries=0,
            **kwargs,  # type: ignore[arg-type]
        )

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.proxy.url, api_key=ANT_KEY, max_retries=0)

    def rows(self) -> list[dict[str, object]]:
        self.proxy.wait_idle()
        assert self.recorder.flush()
        with Store(self.db_path) as store:
            return [dict(r) for r in store.query("SELECT * FROM request ORDER BY ts, request_id")]


@pytest.fixture
def stack(db_path: Path) -> Iterator[Stack]:
    with Stack(db_path) as s:
        yield s


def usage_of(row: dict[str, object]) -> Usage:
    return Usage(
        *(
            int(row[k])  # type: ignore[call-overload]
            for k in (
                "input_uncached",
                "cache_read",
                "cache_write_5m",
                "cache_write_1h",
                "output",
                "web_searches",
            )
        )
    )


HELLO = [{"role": "user", "content": "hello"}]


def test_sdks_through_the_proxy_record_exact_usage_and_cost(
    stack: Stack, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    oai = stack.openai(default_headers={"X-Tokentop-Tag": "checkout"})
    oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    chunks = list(
        oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 1200
    assert oai.responses.create(model="gpt-4o", input="hi").output_text == stack.openai_up.text
    assert list(oai.responses.create(model="gpt-4o", input="hi", stream=True))[-1].type == (
        "response.completed"
    )
    ant = stack.anthropic()
    model = "claude-sonnet-4-20250514"
    ant.messages.create(model=model, max_tokens=50, messages=HELLO)
    with ant.messages.stream(model=model, max_tokens=50, messages=HELLO) as s:
        assert "".join(s.text_stream) == stack.anthropic_up.text

    rows = stack.rows()
    assert [usage_of(r) for r in rows] == [CHAT_TOKENS] * 2 + [RESPONSES_TOKENS] * 2 + [
        MESSAGES_TOKENS
    ] * 2
    assert [r["cost_nano"] for r in rows] == [CHAT_NANO] * 2 + [RESPONSES_NANO] * 2 + [
        MESSAGES_NANO
    ] * 2
    assert [r["provider"] for r in rows] == ["openai"] * 4 + ["anthropic"] * 2
    assert [r["tag"] for r in rows] == ["checkout"] * 4 + [""] * 2
    assert {r["status"] for r in rows} == {200} and not any(r["estimated"] for r in rows)

    # Routing by path, credentials forwarded, the tag header removed.
    assert [r.path for r in stack.openai_up.received] == [
        "/v1/chat/completions",
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/responses",
    ]
    assert [r.path for r in stack.anthropic_up.received] == ["/v1/messages"] * 2
    ant.models.list()  # not /v1/messages, but it carries anthropic-version
    assert stack.anthropic_up.received[-1].path.startswith("/v1/models")
    first = stack.openai_up.received[0].headers
    assert first["authorization"] == f"Bearer {KEY}"
    assert "x-tokentop-tag" not in first
    ant_headers = stack.anthropic_up.received[0].headers
    assert ANT_KEY in (ant_headers.get("x-api-key", "") + ant_headers.get("authorization", ""))

    # Metered requests show up in `tokentop report`.
    assert cli.main(["--db", str(db_path), "report", "--since", "5m", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["requests"] == 6
    total_nano = 2 * (CHAT_NANO + RESPONSES_NANO + MESSAGES_NANO)
    assert round(report["total_usd"] * 1e9) == total_nano
    assert report["output_tokens"] == 2 * (300 + 250 + 400)
    by_model = {m["model"]: m for m in report["by_model"]}
    assert by_model["claude-sonnet-4-20250514"]["requests"] == 2
    assert round(by_model["gpt-4o-mini"]["cost_usd"] * 1e9) == 2 * CHAT_NANO


@pytest.mark.parametrize("api", ["chat", "responses", "messages"])
def test_streams_reach_the_client_unbuffered(db_path: Path, api: str) -> None:
    gate = threading.Event()
    with Stack(db_path, hold=gate) as stack:
        if api == "chat":
            events = iter(
                stack.openai().chat.completions.create(
                    model="gpt-4o-mini",
                    messages=HELLO,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            up = stack.openai_up
        elif api == "responses":
            events = iter(stack.openai().responses.create(model="gpt-4o", input="hi", stream=True))
            up = stack.openai_up
        else:
            events = iter(
                stack.anthropic().messages.create(
                    model="claude-sonnet-4-20250514", max_tokens=5, messages=HELLO, stream=True
                )
            )
            up = stack.anthropic_up
        next(events)  # chunk 1 arrived while the upstream holds the rest back
        gate.set()
        for _event in events:
            pass
        assert up.released_by_client is True
        [row] = stack.rows()
        assert (
            usage_of(row)
            == {
                "chat": CHAT_TOKENS,
                "responses": RESPONSES_TOKENS,
                "messages": MESSAGES_TOKENS,
            }[api]
        )


def test_stream_without_usage_is_counted_and_marked_estimated(stack: Stack) -> None:
    text = "".join(
        c.choices[0].delta.content or ""
        for c in stack.openai().chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 40}], stream=True
        )
        if c.choices
    )
    assert text == stack.openai_up.text
    [row] = stack.rows()
    assert row["estimated"] == 1
    assert row["model"] == "gpt-4o-mini"
    # TOKENTOP_OFFLINE: about four characters a token, of the prompt and of the streamed text.
    assert (row["input_uncached"], row["output"]) == (10, -(-len(text) // 4))
    assert row["cost_nano"] == 10 * 150 + row["output"] * 600  # type: ignore[operator]


def test_upstream_errors(stack: Stack, db_path: Path) -> None:
    stack.openai_up.fail_next.append((429, {"error": {"message": "slow down", "type": "rate"}}))
    with pytest.raises(openai.RateLimitError):
        stack.openai().chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    # An upstream that cannot be reached: 502 with a JSON body.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    recorder = Recorder(db_path, BOOK, health_name="")
    config = ProxyConfig(port=0, openai=f"http://127.0.0.1:{dead}", anthropic=stack.proxy.url)
    with ProxyThread(config, sink=recorder) as proxy:
        r = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "gpt-4o-mini"})
        assert r.status_code == 502
        assert r.json()["error"]["type"] == "upstream_error"
        assert "cannot connect" in r.json()["error"]["message"]
    recorder.close()
    assert stack.rows() == []  # failures without usage are not requests


def test_gzip_responses_are_passed_on_and_still_metered(db_path: Path) -> None:
    with Stack(db_path, gzip_json=True) as stack:
        reply = stack.openai().chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        assert reply.choices[0].message.content == stack.openai_up.text
        assert "gzip" in stack.openai_up.received[0].headers["accept-encoding"]
        [row] = stack.rows()
        assert usage_of(row) == CHAT_TOKENS and row["cost_nano"] == CHAT_NANO


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_http_framing_keep_alive_http10_and_local_answers(stack: Stack) -> None:
    port = int(stack.proxy.url.rsplit(":", 1)[1])
    body = json.dumps({"model": "gpt-4o-mini", "messages": HELLO, "stream": True}).encode()
    post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    # Two requests on one connection (the second asks to close), then the proxy closes.
    out = _raw(port, post + post.replace(b"Host: x", b"Host: x\r\nConnection: close"))
    assert out.count(b"HTTP/1.1 200 ") == 2
    assert out.count(b"transfer-encoding: chunked") == 2
    assert out.count(b"data: [DONE]") == 2
    # An HTTP/1.0 client gets the stream de-chunked and the connection closed.
    out = _raw(port, post.replace(b"HTTP/1.1", b"HTTP/1.0"))
    head, _, rest = out.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head
    assert rest.endswith(b"data: [DONE]\n\n")
    # A chunked request body is read and forwarded with a length.
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:10], body[10:])) + b"0\r\n\r\n"
    out = _raw(
        port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n" + chunked,
    )
    assert out.startswith(b"HTTP/1.1 200 ")
    assert stack.openai_up.received[-1].body == body
    # Paths outside /v1 are answered locally.
    assert b"404" in _raw(port, b"GET /admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    health = _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert health.startswith(b"HTTP/1.1 200") and health.endswith(b'{"status":"ok"}')
    assert _raw(port, b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert len(stack.rows()) == 4


def test_chunked_response_body_is_followed_at_any_split() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    payloads = [b"a" * 5, b"b" * 300, b"\r\n" * 3, b"c"]
    wire = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in payloads)
    wire += b"0\r\nTrailer: x\r\n\r\n"
    rng = random.Random(5)
    for _ in range(200):
        response = _Response()
        response.feed(head)
        data, i = b"", 0
        while not response.complete:
            step = rng.randint(1, 40)
            data += b"".join(response.feed(wire[i : i + step]))
            i += step
        assert data == b"".join(payloads)
        assert i >= len(wire)
        assert response.headers == [(b"transfer-encoding", b"Transfer-Encoding", b"chunked")]
    # A response that runs on past its end, or a chunk size that is not plain hex, is refused.
    for bad in (wire + b"HTTP/1.1 200 OK\r\n", b"0x5\r\naaaaa\r\n0\r\n\r\n", b"5\naaaaa\n"):
        response = _Response()
        response.feed(head)
        with pytest.raises(ValueError):
            response.feed(bad)


def test_proxy_command_records_and_stops_on_sigterm(db_path: Path) -> None:
    with FakeUpstream() as up:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tokentop",
                "--db",
                str(db_path),
                "proxy",
                "--port",
                "0",
                "--upstream-openai",
                up.url,
                "--upstream-anthropic",
                up.url,
            ],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            assert "listening on http://127.0.0.1:" in line, line
            url = line.split("listening on ", 1)[1].split()[0]
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
            client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            rest = proc.stderr.read()
        finally:
            proc.kill()
            proc.wait()
    assert "1 requests, 1 recorded" in rest
    with Store(db_path) as store:
        [row] = [dict(r) for r in store.query("SELECT * FROM request")]
    expected = PriceBook().quote(
        "openai", "gpt-4o-mini", TokenCounts(1000, 200, 0, 0, 300), store_ts(row)
    )
    assert usage_of(row) == CHAT_TOKENS
    assert expected.cost is not None
    assert row["cost_nano"] == round(expected.cost * 1_000_000_000)


def store_ts(row: dict[str, object]) -> object:
    from tokentop.store.records import from_epoch

    return from_epoch(int(row["ts"]) / 1000)  # type: ignore[call-overload]


def test_no_prompt_response_or_key_reaches_the_database_or_logs(
    db_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = "SECRET-PROMPT-7f3a the user's private question"
    answer = "SECRET-RESPONSE-91bc the model's private answer"
    # All of tokentop's logging, at its most verbose (the SDKs' own debug logs print requests,
    # which is theirs to do and off by default).
    caplog.set_level(logging.DEBUG, logger="tokentop")
    with Stack(db_path, text=answer) as stack:
        oai = stack.openai()
        messages = [{"role": "user", "content": prompt}]
        oai.chat.completions.create(model="gpt-4o-mini", messages=messages)
        for _chunk in oai.chat.completions.create(
            model="gpt-4o-mini", messages=messages, stream=True
        ):
            pass  # no usage: estimated from the text, which must still not be kept
        with stack.anthropic().messages.stream(
            model="claude-sonnet-4-20250514", max_tokens=9, messages=messages
        ) as s:
            s.until_done()
        stack.openai_up.fail_next.append((400, {"error": {"message": f"bad: {prompt}"}}))
        with pytest.raises(openai.BadRequestError):
            oai.chat.completions.create(model="gpt-4o-mini", messages=messages)
        # The pytest-style in-process meter, writing to the same database.
        from tokentop.collectors.meter import Meter

        meter = Meter([stack.recorder])
        direct = openai.OpenAI(
            base_url=f"{stack.openai_up.url}/v1",
            api_key=KEY,
            max_retries=0,
            http_client=meter.sdk_http_client(openai),
        )
        direct.chat.completions.create(model="gpt-4o-mini", messages=messages)
        assert len(stack.rows()) == 4
    assert "POST /v1/chat/completions -> 200" in caplog.text  # the proxy did log
    printed = capsys.readouterr()
    files = list(db_path.parent.glob(db_path.name + "*"))
    assert files
    blob = b"".join(f.read_bytes() for f in files)
    for secret in (prompt, answer, KEY, ANT_KEY, "SECRET"):
        assert secret.encode() not in blob, secret
        assert secret not in caplog.text, secret
        assert secret not in printed.out + printed.err, secret


def test_https_upstream(db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the proxy's default context trusts it
    recorder = Recorder(db_path, BOOK, health_name="")
    with FakeUpstream(tls=server) as up:
        assert up.url.startswith("https://")
        with ProxyThread(ProxyConfig(port=0, openai=up.url, anthropic=up.url), recorder) as p:
            client = openai.OpenAI(base_url=f"{p.url}/v1", api_key=KEY, max_retries=0)
            for _ in range(2):  # the second reuses the pooled TLS connection
                client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
            p.wait_idle()
    recorder.close()
    with Store(db_path) as store:
        rows = [dict(r) for r in store.query("SELECT * FROM request")]
    assert [usage_of(r) for r in rows] == [CHAT_TOKENS, CHAT_TOKENS]


def test_client_that_leaves_mid_stream(db_path: Path) -> None:
    gate = threading.Event()
    with Stack(db_path, hold=gate) as stack:
        port = int(stack.proxy.url.rsplit(":", 1)[1])
        body = json.dumps({"model": "gpt-4o-mini", "messages": HELLO, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            received = b""
            while b"data: " not in received:
                received += s.recv(65536)
        gate.set()  # the rest goes to a closed connection
        [row] = stack.rows()
        assert row["estimated"] == 1 and row["status"] == 200
        # The proxy is still serving.
        reply = stack.openai().chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        assert reply.usage is not None and reply.usage.completion_tokens == 300
