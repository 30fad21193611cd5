"""The in-process meter: usage extraction, stream observation, httpx/SDK instrumentation and the
background recorder. The SDK tests use the official ``openai`` and ``anthropic`` clients against
a fake upstream on 127.0.0.1."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.fakes.upstream import FakeUpstream
from tokentop.collectors.meter import (
    CHAT,
    MESSAGES,
    RESPONSES,
    Exchange,
    Meter,
    Observer,
    Recorder,
    Usage,
    anthropic_usage,
    classify,
    extract,
    filter_accept_encoding,
    finalize,
    install,
    openai_usage,
    tagged,
)
from tokentop.pricing.book import ModelPriceOverride, PriceBook, PricingConfig
from tokentop.store import queries
from tokentop.store.db import Store
from tokentop.store.records import MeteredRequest

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2025, 8, 1, 12, tzinfo=UTC)

BOOK = PriceBook(
    PricingConfig(
        models=(
            ModelPriceOverride(
                "openai", "gpt-4o-mini", Decimal("0.15"), Decimal("0.60"), Decimal("0.075")
            ),
            ModelPriceOverride("openai", "gpt-4o", Decimal("2.5"), Decimal("10"), Decimal("1.25")),
            ModelPriceOverride(
                "anthropic",
                "claude-sonnet-4-20250514",
                Decimal("3"),
                Decimal("15"),
                cache_read_per_mtok=Decimal("0.3"),
                cache_write_per_mtok=Decimal("3.75"),
                cache_write_1h_per_mtok=Decimal("6"),
                web_search_per_k=Decimal("10"),
            ),
        )
    )
)
"""Prices fixed here so the expected costs below do not move with the price data."""

CHAT_TOKENS = Usage(input_uncached=1000, cache_read=200, output=300)
CHAT_NANO = 345_000  # 1000 x 0.15 + 200 x 0.075 + 300 x 0.60 per million
RESPONSES_TOKENS = Usage(input_uncached=800, cache_read=100, output=250)
RESPONSES_NANO = 4_625_000  # 800 x 2.5 + 100 x 1.25 + 250 x 10 per million
MESSAGES_TOKENS = Usage(
    input_uncached=500,
    cache_read=1000,
    cache_write_5m=300,
    cache_write_1h=200,
    output=400,
    web_searches=2,
)
MESSAGES_NANO = 30_125_000  # 1500 + 300 + 1125 + 1200 + 6000 per million, + 2 x $0.01


def tokens(r: MeteredRequest) -> Usage:
    return Usage(
        r.input_uncached, r.cache_read, r.cache_write_5m, r.cache_write_1h, r.output, r.web_searches
    )


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


class Captured:
    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    def __call__(self, ex: Exchange) -> None:
        self.exchanges.append(ex)

    def requests(self) -> list[MeteredRequest]:
        out = [finalize(ex, BOOK) for ex in self.exchanges]
        return [r for r in out if r is not None]


@pytest.fixture
def captured() -> Captured:
    return Captured()


# Pure extraction.


def test_openai_prompt_tokens_include_cached_and_cache_writes() -> None:
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 50,
        "prompt_tokens_details": {"cached_tokens": 600, "cache_write_tokens": 100},
        "completion_tokens_details": {"reasoning_tokens": 20},
    }
    assert openai_usage(usage) == Usage(
        input_uncached=300, cache_read=600, cache_write_5m=100, output=50
    )
    assert openai_usage({"prompt_tokens": 10, "completion_tokens": 2}) == Usage(10, 0, 0, 0, 2)
    responses = {"input_tokens": 90, "input_tokens_details": {"cached_tokens": 40}}
    assert openai_usage(responses) == Usage(input_uncached=50, cache_read=40)


def test_anthropic_input_is_uncached_and_cache_writes_split() -> None:
    assert anthropic_usage(
        {
            "input_tokens": 5,
            "cache_read_input_tokens": 70,
            "cache_creation_input_tokens": 30,
            "cache_creation": {"ephemeral_5m_input_tokens": 10, "ephemeral_1h_input_tokens": 20},
            "output_tokens": 9,
            "server_tool_use": {"web_search_requests": 3},
        }
    ) == Usage(5, 70, 10, 20, 9, 3)
    # Without the breakdown, writes are 5-minute writes; nulls count as zero.
    assert anthropic_usage(
        {"input_tokens": 5, "cache_creation_input_tokens": 30, "cache_read_input_tokens": None}
    ) == Usage(input_uncached=5, cache_write_5m=30)


def test_classify_meters_only_model_calls() -> None:
    assert classify("POST", "/v1/chat/completions") == CHAT
    assert classify("POST", "/openai/deployments/x/chat/completions?api-version=1") == CHAT
    assert classify("POST", "/v1/responses") == RESPONSES
    assert classify("POST", "/v1/messages") == MESSAGES
    assert classify("POST", "/v1/messages/count_tokens") is None
    assert classify("POST", "/v1/messages/batches") is None
    assert classify("POST", "/v1/threads/t1/messages") is None
    assert classify("GET", "/v1/responses") is None
    assert classify("GET", "/v1/models") is None


def test_accept_encoding_narrowed_to_readable_codings() -> None:
    assert filter_accept_encoding("gzip, deflate, br, zstd").startswith("gzip, deflate")
    assert "snappy" not in filter_accept_encoding("snappy, gzip;q=0.5")
    assert filter_accept_encoding("snappy") == "identity"


def _observe(api: str, body: bytes, splits: int, *, sse: bool, encoding: str = "") -> Exchange:
    done: list[Exchange] = []
    ex = Exchange(api=api, provider="openai", ts=T0, status=200)
    observer = Observer(
        ex, "text/event-stream" if sse else "application/json", encoding, 0.0, done.append
    )
    step = max(len(body) // splits, 1)
    for i in range(0, len(body), step):
        observer.feed(body[i : i + step])
    observer.finish(True)
    observer.finish(True)  # emitted once only
    assert done == [ex]
    return ex


ANTHROPIC_STREAM = (
    b'event: message_start\r\ndata: {"type":"message_start","message":{"id":"msg_1",'
    b'"model":"claude-sonnet-4-20250514","usage":{"input_tokens":25,'
    b'"cache_read_input_tokens":7,"output_tokens":1}}}\r\n\r\n'
    b'event: content_block_delta\r\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"Hi"}}\r\n\r\n'
    b'event: message_delta\r\ndata: {"type":"message_delta","delta":{},'
    b'"usage":{"output_tokens":6}}\r\n\r\n'
    b'event: message_delta\r\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
    b'"usage":{"output_tokens":15}}\r\n\r\n'
    b'event: message_stop\r\ndata: {"type":"message_stop"}\r\n\r\n'
)


@pytest.mark.parametrize("splits", [1, 7, 50, 10_000])
def test_anthropic_stream_takes_the_last_cumulative_delta(splits: int) -> None:
    ex = _observe(MESSAGES, ANTHROPIC_STREAM, splits, sse=True)
    found = extract(ex)
    assert found.usage == Usage(input_uncached=25, cache_read=7, output=15)  # not 1 + 6 + 15
    assert found.model == "claude-sonnet-4-20250514"
    assert found.response_id == "msg_1"


def test_openai_stream_usage_chunk_and_gzip_body() -> None:
    usage = {
        "prompt_tokens": 9,
        "completion_tokens": 2,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    chunks = [
        {
            "id": "c1",
            "model": "gpt-4o-mini",
            "choices": [{"delta": {"content": "Hi"}}],
            "usage": None,
        },
        {"id": "c1", "model": "gpt-4o-mini", "choices": [], "usage": usage},
    ]
    body = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    body += b"data: [DONE]\n\n"
    ex = _observe(CHAT, gzip.compress(body), 5, sse=True, encoding="gzip")
    assert extract(ex).usage == Usage(input_uncached=5, cache_read=4, output=2)
    json_body = json.dumps({"id": "x", "model": "gpt-4o", "usage": usage}).encode()
    ex = _observe(CHAT, gzip.compress(json_body), 3, sse=False, encoding="gzip")
    assert extract(ex).usage == Usage(input_uncached=5, cache_read=4, output=2)


def test_huge_json_body_reads_usage_from_its_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tokentop.collectors.meter.MAX_BODY_BYTES", 1000)
    body = json.dumps(
        {
            "data": [{"embedding": [0.5] * 2000}],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 77, "total_tokens": 77},
        }
    ).encode()
    ex = _observe("embeddings", body, 40, sse=False)
    assert not ex.body and ex.body_tail
    assert extract(ex).usage == Usage(input_uncached=77)
    assert extract(ex).model == "text-embedding-3-small"


def test_unreadable_body_does_not_break_the_stream() -> None:
    ex = _observe(CHAT, b"not gzip at all", 2, sse=False, encoding="gzip")
    assert ex.unreadable
    assert extract(ex).usage is None


def test_failed_request_without_usage_is_not_a_request() -> None:
    ex = Exchange(api=CHAT, provider="openai", ts=T0, status=429, body=b'{"error": {}}')
    assert finalize(ex, BOOK) is None


def test_stream_without_usage_is_estimated_from_text() -> None:
    request = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 40}]}
    ).encode()
    chunk = {"model": "gpt-4o-mini", "choices": [{"delta": {"content": "y" * 80}}]}
    body = b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"
    ex = _observe(CHAT, body, 3, sse=True)
    ex.request_body = request
    r = finalize(ex, BOOK)
    assert r is not None and r.estimated
    # TOKENTOP_OFFLINE (set for every test) counts about four characters a token.
    assert (r.input_uncached, r.output) == (10, 20)
    assert r.cost_nano == 10 * 150 + 20 * 600
    assert r.model == "gpt-4o-mini" and r.priced


# The SDKs through the meter.


def test_openai_sdk_chat_json_and_streams(upstream: FakeUpstream, captured: Captured) -> None:
    meter = Meter([captured])
    client = openai.OpenAI(
        base_url=f"{upstream.url}/v1",
        api_key="sk-test",
        max_retries=0,
        http_client=meter.sdk_http_client(openai),
    )
    messages = [{"role": "user", "content": "hello"}]
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert reply.choices[0].message.content == upstream.text
    text = ""
    for chunk in client.chat.completions.create(
        model="gpt-4o-mini",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == upstream.text  # the stream reached the SDK intact
    requests = captured.requests()
    assert [tokens(r) for r in requests] == [CHAT_TOKENS, CHAT_TOKENS]
    assert [r.cost_nano for r in requests] == [CHAT_NANO, CHAT_NANO]
    assert all(r.provider == "openai" and r.model == "gpt-4o-mini" for r in requests)
    assert all(r.status == 200 and not r.estimated and r.latency_ms > 0 for r in requests)
    assert len({r.request_id for r in requests}) == 2


def test_openai_sdk_responses_json_and_stream(upstream: FakeUpstream, captured: Captured) -> None:
    meter = Meter([captured])
    client = openai.OpenAI(
        base_url=f"{upstream.url}/v1",
        api_key="sk-test",
        max_retries=0,
        http_client=meter.sdk_http_client(openai),
    )
    response = client.responses.create(model="gpt-4o", input="hello")
    assert response.output_text == upstream.text
    kinds = [
        event.type for event in client.responses.create(model="gpt-4o", input="hi", stream=True)
    ]
    assert kinds[-1] == "response.completed"
    requests = captured.requests()
    assert [tokens(r) for r in requests] == [RESPONSES_TOKENS, RESPONSES_TOKENS]
    assert [r.cost_nano for r in requests] == [RESPONSES_NANO, RESPONSES_NANO]


def test_anthropic_sdk_messages_json_and_stream(upstream: FakeUpstream, captured: Captured) -> None:
    meter = Meter([captured])
    client = anthropic.Anthropic(
        base_url=upstream.url,
        api_key="sk-ant-test",
        max_retries=0,
        http_client=meter.sdk_http_client(anthropic),
    )
    messages = [{"role": "user", "content": "hello"}]
    model = "claude-sonnet-4-20250514"
    client.messages.create(model=model, max_tokens=100, messages=messages)
    with client.messages.stream(model=model, max_tokens=100, messages=messages) as stream:
        assert "".join(stream.text_stream) == upstream.text
        final = stream.get_final_message()
    assert final.usage.output_tokens == 400
    requests = captured.requests()
    assert [tokens(r) for r in requests] == [MESSAGES_TOKENS, MESSAGES_TOKENS]
    assert [r.cost_nano for r in requests] == [MESSAGES_NANO, MESSAGES_NANO]
    assert all(r.provider == "anthropic" for r in requests)


async def test_async_sdk_clients(upstream: FakeUpstream, captured: Captured) -> None:
    meter = Meter([captured])
    oai = openai.AsyncOpenAI(
        base_url=f"{upstream.url}/v1",
        api_key="sk-test",
        max_retries=0,
        http_client=meter.sdk_http_client(openai, is_async=True),
    )
    ant = anthropic.AsyncAnthropic(
        base_url=upstream.url,
        api_key="sk-ant-test",
        max_retries=0,
        http_client=meter.sdk_http_client(anthropic, is_async=True),
    )
    stream = await oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    async for _chunk in stream:
        pass
    async with ant.messages.stream(
        model="claude-sonnet-4-20250514",
        max_tokens=10,
        messages=[{"role": "user", "content": "hi"}],
    ) as s:
        await s.get_final_message()
    await oai.close()
    await ant.close()
    assert [tokens(r) for r in captured.requests()] == [CHAT_TOKENS, MESSAGES_TOKENS]


def test_install_meters_an_unmodified_client_once(
    upstream: FakeUpstream, captured: Captured
) -> None:
    meter = Meter([captured], default_tag="default")
    uninstall = install(meter)
    try:
        client = openai.OpenAI(base_url=f"{upstream.url}/v1", api_key="sk-test", max_retries=0)
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "a"}]
        )
        with tagged("feature-x"):
            client.embeddings.create(model="text-embedding-3-small", input="abc")
        # A client that already meters through MeteredTransport is not metered twice.
        wrapped = openai.OpenAI(
            base_url=f"{upstream.url}/v1",
            api_key="sk-test",
            max_retries=0,
            http_client=meter.sdk_http_client(openai),
        )
        wrapped.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "b"}],
            extra_headers={"X-Tokentop-Tag": "from-header"},
        )
        # Plain httpx is patched too; non-model calls are not metered.
        httpx.get(f"{upstream.url}/v1/models")
    finally:
        uninstall()
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "c"}])
    requests = captured.requests()
    assert [r.tag for r in requests] == ["default", "feature-x", "from-header"]
    assert requests[1].input_uncached == 42
    # The tag header was taken off before the request left.
    assert "x-tokentop-tag" not in upstream.received[2].headers
    assert httpx.HTTPTransport.handle_request.__module__ == "httpx._transports.default"


def test_streams_pass_through_unbuffered(captured: Captured) -> None:
    gate = threading.Event()
    with FakeUpstream(hold=gate) as upstream:
        meter = Meter([captured])
        client = openai.OpenAI(
            base_url=f"{upstream.url}/v1",
            api_key="sk-test",
            max_retries=0,
            http_client=meter.sdk_http_client(openai),
        )
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        gate.set()  # only now does the upstream send the rest
        for _chunk in stream:
            pass
        assert upstream.released_by_client is True
    assert [tokens(r) for r in captured.requests()] == [CHAT_TOKENS]


def test_stream_closed_early_is_recorded_as_estimate(
    upstream: FakeUpstream, captured: Captured
) -> None:
    meter = Meter([captured])
    client = openai.OpenAI(
        base_url=f"{upstream.url}/v1",
        api_key="sk-test",
        max_retries=0,
        http_client=meter.sdk_http_client(openai),
    )
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    ) as response:
        lines = response.iter_lines()
        for _ in range(6):  # three events of eleven
            next(lines)
    [ex] = captured.exchanges
    assert not ex.complete
    [r] = captured.requests()
    assert r.estimated and r.output > 0


# The recorder.


def test_recorder_writes_in_background_and_stops_cleanly(db_path: Path) -> None:
    recorder = Recorder(db_path, BOOK, health_name="test", flush_interval_s=0.01)
    body = json.dumps({"id": "x", "model": "gpt-4o-mini", "usage": {"prompt_tokens": 10}}).encode()
    for i in range(5):
        recorder(
            Exchange(
                api=CHAT,
                provider="openai",
                ts=T0,
                status=200,
                body=body,
                request_id=f"r{i}",
                tag="t",
            )
        )
    recorder(Exchange(api=CHAT, provider="openai", ts=T0, status=500, body=b"{}"))
    assert recorder.flush()
    with Store(db_path) as store:
        rows = store.query("SELECT COUNT(*), SUM(cost_nano), MIN(tag) FROM request")[0]
        assert tuple(rows) == (5, 5 * 1500, "t")
        # Metered requests count in every usage query (report, panes).
        assert queries.totals(store, T0, T0 + timedelta(minutes=1)).requests == 5
        assert store.query("SELECT state FROM source WHERE name = 'test'")[0][0] == "ok"
    recorder.record(
        MeteredRequest(ts=T0, provider="openai", model="gpt-4o-mini", request_id="late", output=1)
    )
    recorder.close()  # writes what is queued, then the thread ends
    recorder.close()
    assert not recorder._thread.is_alive()
    assert recorder.written == 6
    recorder(Exchange(api=CHAT, provider="openai", ts=T0))
    assert recorder.dropped == 1


def test_recorder_flushes_at_exit_without_close(db_path: Path) -> None:
    script = f"""
from datetime import datetime, UTC
from tokentop.collectors.meter import Recorder
from tokentop.pricing.book import PriceBook
from tokentop.store.records import MeteredRequest

recorder = Recorder({str(db_path)!r}, PriceBook(), flush_interval_s=60)
recorder.record(MeteredRequest(ts=datetime.now(UTC), provider="openai", model="gpt-4o-mini",
                               request_id="r1", input_uncached=1000))
# no close(): the interpreter exits with the request still queued
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    with Store(db_path) as store:
        assert store.query("SELECT request_id, priced FROM request")[0][:] == ("r1", 1)
