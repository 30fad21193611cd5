"""Failures of the provider admin APIs, for both collectors: what is retried within a poll, what
fails it (always whole), how each maps onto SourceError, and that the key never leaks."""

from __future__ import annotations

import email.utils
import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes import (
    KEY_ENV,
    KEYS,
    FakeProviderServer,
    make_collector,
    poll_context,
    sum_usage,
)
from tokentop.collectors.anthropic import AnthropicCollector
from tokentop.collectors.base import SourceError
from tokentop.collectors.config import ProviderConfig
from tokentop.collectors.http import AdminApiCollector, one_line, parse_retry_after, scrub
from tokentop.collectors.openai import OpenAICollector
from tokentop.store.records import Batch

NOW = datetime(2025, 8, 1, 12, 30, 20, tzinfo=UTC)
PATHS = {"openai": "/usage/completions", "anthropic": "/usage_report/"}
TRANSIENT = ["500", "503", "529", "timeout", "truncate", "malformed", "reset"]
WRONG_KEYS = {
    "openai": ("sk-admin-WRONGwrongWRONG0000", "sk-proj-NOTanADMINkey1111"),
    "anthropic": ("sk-ant-admin01-WRONGwrong0000", "sk-ant-api03-NOTanADMINkey1111"),
}


class Sleeps:
    """Records backoff waits instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for provider, env in KEY_ENV.items():
        monkeypatch.setenv(env, KEYS[provider])


@pytest.fixture(params=["openai", "anthropic"])
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(now=NOW) as fake:
        fake.seed(hours=2)
        yield fake


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def collector(
    server: FakeProviderServer, provider: str, sleeps: Sleeps
) -> AsyncIterator[AdminApiCollector]:
    c = make_collector(server, provider, timeout_s=0.25, sleep=sleeps, backoff_s=0.2)
    yield c
    await c.aclose()


async def failing_poll(collector: AdminApiCollector) -> SourceError:
    with pytest.raises(SourceError) as caught:
        await collector.poll(poll_context(NOW, backfill_hours=2))
    error = caught.value
    assert "\n" not in error.message
    assert str(error) == error.message
    return error


async def test_429_fails_the_poll_at_once_with_retry_after(
    server: FakeProviderServer, collector: AdminApiCollector, provider: str
) -> None:
    server.fault("429", path=PATHS[provider], retry_after="7")
    error = await failing_poll(collector)
    assert error.retry_after == 7.0
    assert not error.auth
    assert "429" in error.message
    assert collector.calls == 1


async def test_429_retry_after_as_http_date_or_absent(
    server: FakeProviderServer, collector: AdminApiCollector, provider: str
) -> None:
    when = email.utils.format_datetime(NOW + timedelta(seconds=30), usegmt=True)
    server.fault("429", path=PATHS[provider], retry_after=when)
    assert (await failing_poll(collector)).retry_after == pytest.approx(30, abs=1)
    server.fault("429", path=PATHS[provider])
    assert (await failing_poll(collector)).retry_after is None


async def test_server_side_rate_limit(
    server: FakeProviderServer, collector: AdminApiCollector
) -> None:
    server.behaviour.rate_limit_per_minute = 1
    error = await failing_poll(collector)  # usage passes, costs is the second request
    assert error.retry_after == 1.0


@pytest.mark.parametrize("kind", TRANSIENT)
async def test_a_transient_failure_is_retried_within_the_poll(
    server: FakeProviderServer,
    collector: AdminApiCollector,
    provider: str,
    sleeps: Sleeps,
    kind: str,
) -> None:
    server.fault(kind, path=PATHS[provider], delay_s=1.0)
    batch = await collector.poll(poll_context(NOW, backfill_hours=2))
    (window,) = batch.windows
    assert sum_usage(batch.usage) == server.usage_totals(provider, window.start, window.end)
    # failed try, retry, (OpenAI: embeddings,) costs
    expected = [kind, "", "", ""] if provider == "openai" else [kind, "", ""]
    assert collector.calls == len(server.requests) == len(expected)
    assert [r.fault for r in server.requests] == expected
    assert len(sleeps.delays) == 1
    assert 0.1 <= sleeps.delays[0] <= 0.2


@pytest.mark.parametrize("kind", TRANSIENT)
async def test_a_persistent_failure_on_a_later_page_fails_the_whole_poll(
    server: FakeProviderServer,
    collector: AdminApiCollector,
    provider: str,
    sleeps: Sleeps,
    kind: str,
) -> None:
    server.behaviour.max_page_buckets = 20
    server.fault(kind, nth=3, times=3, path=PATHS[provider], delay_s=1.0)
    error = await failing_poll(collector)
    assert "after 3 tries" in error.message
    assert not error.auth
    assert collector.calls == 5  # two good pages, then three tries of the third
    assert 0.1 <= sleeps.delays[0] <= 0.2
    assert 0.2 <= sleeps.delays[1] <= 0.4

    # Nothing was returned for the failed poll; the next one reads the window whole.
    batch = await collector.poll(poll_context(NOW, backfill_hours=2))
    (window,) = batch.windows
    assert sum_usage(batch.usage) == server.usage_totals(provider, window.start, window.end)


async def test_a_failing_cost_read_fails_the_poll(
    server: FakeProviderServer, collector: AdminApiCollector, provider: str
) -> None:
    server.fault("500", times=3, path="cost")
    error = await failing_poll(collector)
    assert "500" in error.message
    batch = await collector.poll(poll_context(NOW, backfill_hours=2))
    assert batch.billed_days, "costs are still due after a failed read"


async def test_bad_key_is_an_auth_error_naming_the_variable(
    server: FakeProviderServer,
    collector: AdminApiCollector,
    provider: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wrong, not_admin = WRONG_KEYS[provider]
    monkeypatch.setenv(KEY_ENV[provider], wrong)
    error = await failing_poll(collector)
    assert error.auth
    assert error.message == f"auth failed (401): check {KEY_ENV[provider]}"
    assert collector.calls == 1, "a refused key is not retried"
    assert wrong in json.dumps([r.headers for r in server.requests]), (
        "the server saw (and echoes) it"
    )

    monkeypatch.setenv(KEY_ENV[provider], not_admin)
    error = await failing_poll(collector)
    assert error.auth
    assert error.message.startswith("auth failed (403)")
    assert KEY_ENV[provider] in error.message


async def test_missing_key_makes_no_request(
    server: FakeProviderServer,
    collector: AdminApiCollector,
    provider: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(KEY_ENV[provider])
    error = await failing_poll(collector)
    assert error.auth
    assert error.message == f"no key: set {KEY_ENV[provider]}"
    assert collector.calls == 0
    assert server.requests == []


async def test_client_errors_are_not_retried_and_are_scrubbed(
    server: FakeProviderServer, collector: AdminApiCollector, provider: str
) -> None:
    key = KEYS[provider]
    server.fault("400", path=PATHS[provider], message=f"bad\nrequest for {key}")
    error = await failing_poll(collector)
    assert collector.calls == 1
    assert not error.auth
    assert "refused (400)" in error.message
    assert "bad request for" in error.message
    assert key not in error.message

    server.fault("404", path=PATHS[provider])
    error = await failing_poll(collector)
    assert "base URL" in error.message


async def test_unreachable_server(
    server: FakeProviderServer, provider: str, sleeps: Sleeps
) -> None:
    collector = make_collector(server, provider, sleep=sleeps)
    server.stop()
    error = await failing_poll(collector)
    await collector.aclose()
    assert error.message.startswith("connection failed")
    assert "127.0.0.1" in error.message
    assert collector.calls == 3


def _transport(body: Any) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=body)

    return httpx.MockTransport(handle)


@pytest.mark.parametrize(
    "body",
    [
        {"data": "not a list", "has_more": False},
        {"data": [{"start_time": 1, "starting_at": "2025-08-01T00:00:00Z", "results": [1]}]},
        {
            "data": [
                {
                    "start_time": 1754006400,
                    "starting_at": "2025-08-01T00:00:00Z",
                    "results": [{"input_tokens": "many", "uncached_input_tokens": "many"}],
                }
            ]
        },
        {"data": [], "has_more": True, "next_page": 5},
    ],
)
async def test_unexpected_shapes_fail_the_poll(provider: str, body: Any) -> None:
    config = ProviderConfig(name=provider, key_env=KEY_ENV[provider], base_url="http://fake")
    cls = OpenAICollector if provider == "openai" else AnthropicCollector
    async with httpx.AsyncClient(transport=_transport(body)) as client:
        collector = cls(config, client=client)
        with pytest.raises(SourceError, match="unexpected response"):
            await collector.poll(poll_context(NOW))
        assert collector.calls == 1


async def test_a_cursor_that_repeats_fails_the_poll(provider: str) -> None:
    body = {"data": [], "has_more": True, "next_page": "page_same"}
    config = ProviderConfig(name=provider, key_env=KEY_ENV[provider], base_url="http://fake")
    cls = OpenAICollector if provider == "openai" else AnthropicCollector
    async with httpx.AsyncClient(transport=_transport(body)) as client:
        collector = cls(config, client=client)
        with pytest.raises(SourceError, match="cursor"):
            await collector.poll(poll_context(NOW))
        assert collector.calls == 2


async def test_the_key_never_leaks(
    server: FakeProviderServer, provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = KEYS[provider]
    seen: list[str] = []
    batches: list[Batch] = []
    errors: list[BaseException] = []
    scripts: list[tuple[str, dict[str, Any]]] = [
        ("429", {"retry_after": "3"}),
        ("500", {"times": 3}),
        ("529", {"times": 3}),
        ("timeout", {"times": 3, "delay_s": 0.5}),
        ("truncate", {"times": 3}),
        ("malformed", {"times": 3}),
        ("reset", {"times": 3}),
        ("400", {"message": f"the key {key} is odd"}),
        ("403", {}),
    ]
    collector = make_collector(server, provider, timeout_s=0.1, backoff_s=0.001)
    for kind, options in scripts:
        server.fault(kind, path=PATHS[provider], **options)
        try:
            batches.append(await collector.poll(poll_context(NOW)))
        except SourceError as exc:
            errors.append(exc)
    batches.append(await collector.poll(poll_context(NOW)))
    monkeypatch.setenv(KEY_ENV[provider], key + "-revoked")
    with pytest.raises(SourceError) as caught:
        await collector.poll(poll_context(NOW))
    errors.append(caught.value)
    await collector.aclose()

    assert len(errors) == len(scripts) + 1
    for error in errors:
        chain: list[BaseException] = []
        node: BaseException | None = error
        while node is not None:
            chain.append(node)
            node = node.__cause__ or node.__context__
        assert not any(isinstance(e, httpx.HTTPError) for e in chain), "no request is chained"
        seen.extend(str(e) for e in chain)
        seen.extend(repr(e) for e in chain)
        seen.append(repr(vars(error)))
    for batch in batches:
        seen.append(repr(batch))
    seen.append(repr(collector))
    seen.append(repr(vars(collector).get("_config")))
    assert batches[-1].usage
    assert not [text for text in seen if key in text]


def test_helpers() -> None:
    now = datetime(2025, 8, 1, tzinfo=UTC)
    assert parse_retry_after("12", now) == 12.0
    assert parse_retry_after("1.5", now) == 1.5
    assert parse_retry_after("Fri, 01 Aug 2025 00:01:00 GMT", now) == 60.0
    assert parse_retry_after("Thu, 31 Jul 2025 00:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None
    assert scrub("key sk-admin-abcDEF123456 x", "") == "key sk-admin-[key] x"
    assert scrub("key sk-ant-admin01-abcDEF123456", "") == "key sk-ant-[key]"
    assert scrub("my-own-secret here", "my-own-secret") == "[key] here"
    assert scrub("task-force 12345", "") == "task-force 12345"
    assert one_line("a\n  b\tc") == "a b c"
    assert len(one_line("x" * 500)) == 200


# Retry-After, every form RFC 9110 allows (section 10.2.3), once or repeated.

RETRY_NOW = datetime(1994, 11, 6, 8, 49, 7, tzinfo=UTC)
"""30 s before the example date of RFC 9110."""

RETRY_AFTER_FORMS = [
    ("120", 120.0),
    ("0", 0.0),
    ("1.5", 1.5),  # not RFC 9110's 1*DIGIT, but tolerated
    ("  7 ", 7.0),
    ("Sun, 06 Nov 1994 08:49:37 GMT", 30.0),  # IMF-fixdate
    ("Sunday, 06-Nov-94 08:49:37 GMT", 30.0),  # obsolete RFC 850
    ("Sun Nov  6 08:49:37 1994", 30.0),  # obsolete asctime
    ("Sat, 05 Nov 1994 08:49:37 GMT", 0.0),  # in the past: at once
    # A header sent twice, joined by httpx with ", ": the first valid value wins.
    ("1, 1", 1.0),
    ("5, 60", 5.0),
    ("Sun, 06 Nov 1994 08:49:37 GMT, Sun, 06 Nov 1994 08:50:07 GMT", 30.0),
    ("Sun, 06 Nov 1994 08:49:37 GMT, 90", 30.0),
    ("90, Sun, 06 Nov 1994 08:49:37 GMT", 90.0),
    ("Sun Nov  6 08:49:37 1994, 5", 30.0),
    ("soon, 4", 4.0),
    (", 3", 3.0),
    ("-5, 6", 6.0),  # a negative delay is not delay-seconds
    ("1_000, 2", 2.0),  # nor is Python's digit grouping
    ("inf, nan, 8", 8.0),
]


@pytest.mark.parametrize(("header", "seconds"), RETRY_AFTER_FORMS)
def test_every_retry_after_form_is_read(header: str, seconds: float) -> None:
    assert parse_retry_after(header, RETRY_NOW) == pytest.approx(seconds)


@pytest.mark.parametrize("header", ["", "soon", "Sun", "-5", "inf", "nan", "1e3", ", ,", "0x10"])
def test_retry_after_without_a_valid_value_is_none(header: str) -> None:
    assert parse_retry_after(header, RETRY_NOW) is None


async def test_a_repeated_retry_after_on_the_wire_is_honoured(
    server: FakeProviderServer, collector: AdminApiCollector, provider: str
) -> None:
    server.fault("429", path=PATHS[provider], retry_after=("7", "7"))
    error = await failing_poll(collector)
    assert error.retry_after == 7.0
    when = email.utils.format_datetime(NOW + timedelta(seconds=40), usegmt=True)
    server.fault("429", path=PATHS[provider], retry_after=(when, when))
    assert (await failing_poll(collector)).retry_after == pytest.approx(40, abs=1)


async def test_a_5xx_asking_to_wait_longer_than_the_backoff_is_not_retried_early(
    server: FakeProviderServer, collector: AdminApiCollector, provider: str, sleeps: Sleeps
) -> None:
    server.fault("503", path=PATHS[provider], retry_after="120", times=3)
    error = await failing_poll(collector)
    assert error.retry_after == 120.0
    assert collector.calls == 1
    assert sleeps.delays == []
    # A wait shorter than the backoff is kept by the backoff itself: retried within the poll.
    server.clear_faults()
    server.fault("503", path=PATHS[provider], retry_after="0")
    await collector.poll(poll_context(NOW, backfill_hours=2))


# A response larger than the limit is refused as it streams in, and nothing of it is kept.


@pytest.mark.parametrize("framing", ["content-length", "close-delimited"])
async def test_a_response_over_the_size_limit_fails_the_poll_and_keeps_nothing(
    server: FakeProviderServer, provider: str, sleeps: Sleeps, db_path: Path, framing: str
) -> None:
    from tokentop.collectors.runner import Runner
    from tokentop.pricing.book import PriceBook
    from tokentop.store import queries
    from tokentop.store.db import Store

    server.behaviour.padding_bytes = 300_000
    server.behaviour.close_delimited = framing == "close-delimited"
    collector = make_collector(server, provider, sleep=sleeps, max_response_bytes=200_000)
    with Store(db_path) as store:
        runner = Runner(store, [collector], PriceBook(), clock=server.now)
        assert await runner.run_once_and_close() == {provider: False}
        health = {h.name: h for h in queries.sources(store, NOW)}[provider]
        assert "response too large" in health.last_error
        assert "0.2 MB limit (max_response_mb)" in health.last_error
        assert store.query("SELECT COUNT(*) FROM usage")[0][0] == 0
        assert store.query("SELECT COUNT(*) FROM billed")[0][0] == 0
    assert collector.calls == 1  # the same page would be as large again: not retried
    assert sleeps.delays == []


async def test_the_size_limit_defaults_to_20_mb_and_is_configurable(
    server: FakeProviderServer, provider: str
) -> None:
    default = make_collector(server, provider)
    assert default._max_bytes == 20_000_000
    await default.aclose()
    base = server.openai_base_url if provider == "openai" else server.anthropic_base_url
    config = ProviderConfig(
        name=provider, key_env=KEY_ENV[provider], base_url=base, max_response_mb=0.5
    )
    cls = OpenAICollector if provider == "openai" else AnthropicCollector
    small = cls(config, clock=server.now, backoff_s=0.01)
    server.behaviour.padding_bytes = 600_000
    error = await failing_poll(small)
    assert "0.5 MB limit" in error.message
    server.behaviour.padding_bytes = 100_000  # under the limit: read as usual
    batch = await small.poll(poll_context(NOW, backfill_hours=2))
    assert batch.usage
    await small.aclose()
