"""The inference-server collector and its Prometheus text parser, against local fake servers."""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest

from tests.fakes.metrics_server import KINDS, MetricsServer, Traffic
from tests.fakes.nvml import ManualClock
from tokentop.collectors.base import Collector, PollContext, SourceError
from tokentop.collectors.config import InferenceEndpoint
from tokentop.collectors.prometheus import (
    InferenceCollector,
    PrometheusParseError,
    Sample,
    detect_kind,
    parse_text,
)
from tokentop.store.records import InferenceSample

MODELS = ('org/model "a"', "model-b")

Make = Callable[..., InferenceCollector]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def make(clock: ManualClock) -> AsyncIterator[Make]:
    made: list[InferenceCollector] = []

    def build(url: str, kind: str = "", **kwargs: object) -> InferenceCollector:
        endpoint = InferenceEndpoint(url=url, kind=kind, name=str(kwargs.pop("endpoint_name", "")))
        collector = InferenceCollector(endpoint, clock=clock.now, **kwargs)  # type: ignore[arg-type]
        made.append(collector)
        return collector

    yield build
    for collector in made:
        await collector.aclose()


def ctx(clock: ManualClock) -> PollContext:
    return PollContext(now=clock.now(), watermark=None, backfill_start=clock.now())


async def scrape(collector: InferenceCollector, clock: ManualClock) -> InferenceSample:
    batch = await collector.poll(ctx(clock))
    (sample,) = batch.inference
    return sample


@pytest.fixture(params=KINDS)
def server(request: pytest.FixtureRequest) -> Iterator[MetricsServer]:
    with MetricsServer(request.param, models=MODELS, engines=2) as running:
        yield running


# What one round of advance() below must count, per kind (two models).
EXPECTED = {
    "vllm": (24, 2000, 1000),
    "sglang": (24, 2000, 1000),
    "tgi": (24, 2000, 1000),
    "llamacpp": (0, 2000, 1000),  # no request counter in llama-server
    "triton": (24, 0, 0),  # no token counters in core Triton
}


async def test_each_kind_detected_and_counted(
    server: MetricsServer, make: Make, clock: ManualClock
) -> None:
    collector = make(server.url, gpu_devices=("GPU-a",))
    assert isinstance(collector, Collector) and collector.kind == "prometheus"
    first = await scrape(collector, clock)
    assert (first.kind, first.interval_s, first.requests, first.prompt_tokens) == (
        server.kind,
        0.0,
        0,
        0,
    )
    server.advance(10, length=2, aborted=3, errored=1, prompt_tokens=1000, generation_tokens=500)
    clock.advance(5)
    sample = await scrape(collector, clock)
    assert (sample.requests, sample.prompt_tokens, sample.generation_tokens) == EXPECTED[
        server.kind
    ]
    assert sample.interval_s == 5.0
    assert sample.ts == clock.now()
    assert sample.kind == server.kind
    assert sample.endpoint == server.url
    assert sample.source == f"inference:{server.url.split('/')[2]}"
    assert sample.devices == ("GPU-a",)
    assert collector.calls == 2


async def test_configured_kind_is_used(
    server: MetricsServer, make: Make, clock: ManualClock
) -> None:
    collector = make(server.url, kind=server.kind)
    await scrape(collector, clock)
    server.advance(4, prompt_tokens=10, generation_tokens=10)
    sample = await scrape(collector, clock)
    assert sample.kind == server.kind
    assert sample.requests == (0 if server.kind == "llamacpp" else 8)


async def test_aborted_and_failed_requests_are_not_inferences(
    make: Make, clock: ManualClock
) -> None:
    with MetricsServer("vllm", models=MODELS) as server:
        collector = make(server.url)
        await scrape(collector, clock)
        server.advance(aborted=100, errored=7, prompt_tokens=5000)
        sample = await scrape(collector, clock)
        assert sample.requests == 0
        assert sample.prompt_tokens == 10_000  # prefill work was still done


async def test_counter_reset_counts_from_zero(make: Make, clock: ManualClock) -> None:
    with MetricsServer("vllm", models=MODELS, engines=2) as server:
        collector = make(server.url)
        server.advance(10, prompt_tokens=100, generation_tokens=100)
        await scrape(collector, clock)
        server.reset()
        server.advance(3, prompt_tokens=30, generation_tokens=20)
        sample = await scrape(collector, clock)
        assert (sample.requests, sample.prompt_tokens, sample.generation_tokens) == (6, 60, 40)
        # Restarted and already past the old value: the _created time gives the reset away.
        server.reset()
        server.advance(20)
        assert (await scrape(collector, clock)).requests == 40


async def test_counter_reset_without_created_times(make: Make, clock: ManualClock) -> None:
    with MetricsServer("tgi") as server:
        collector = make(server.url)
        server.advance(10, prompt_tokens=100)
        await scrape(collector, clock)
        server.reset()
        server.advance(2, prompt_tokens=7)
        sample = await scrape(collector, clock)
        assert (sample.requests, sample.prompt_tokens) == (2, 7)


async def test_sglang_aborts_never_make_a_negative_count(make: Make, clock: ManualClock) -> None:
    with MetricsServer("sglang") as server:
        collector = make(server.url)
        await scrape(collector, clock)
        server.advance(5, aborted=2)
        assert (await scrape(collector, clock)).requests == 5
        server.body = (
            'sglang:num_requests_total{model_name="m"} 7\n'
            'sglang:num_aborted_requests_total{model_name="m"} 9\n'
        )
        assert (await scrape(collector, clock)).requests == 0


async def test_vllm_without_finished_reason_counts_every_success(
    make: Make, clock: ManualClock
) -> None:
    with MetricsServer("vllm") as server:
        server.body = 'vllm:request_success_total{model="m",version="1"} 5\n'
        collector = make(server.url)
        await scrape(collector, clock)
        server.body = 'vllm:request_success_total{model="m",version="1"} 9\n'
        assert (await scrape(collector, clock)).requests == 4


async def test_missing_scrape_is_covered_by_the_next(make: Make, clock: ManualClock) -> None:
    with MetricsServer("vllm") as server:
        collector = make(server.url)
        await scrape(collector, clock)
        server.advance(3)
        server.status = 503
        clock.advance(5)
        with pytest.raises(SourceError) as info:
            await collector.poll(ctx(clock))
        assert info.value.message == f"{server.url}: HTTP 503"
        server.status = 200
        server.advance(4)
        clock.advance(5)
        sample = await scrape(collector, clock)
        assert (sample.requests, sample.interval_s) == (7, 10.0)


async def test_streaming_traffic_is_counted(make: Make, clock: ManualClock) -> None:
    traffic = Traffic(good_per_s=1e6, aborted_per_s=1e6)
    with MetricsServer("vllm", traffic=traffic) as server:
        collector = make(server.url)
        await scrape(collector, clock)
        sample = await scrape(collector, clock)
        assert sample.requests > 0
        assert sample.generation_tokens == pytest.approx(sample.requests * 50, rel=0.01)
        totals = server.totals()
        assert totals["abort"] > 0 and totals["stop"] > 0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("<!DOCTYPE html><html>hello</html>\n", "not Prometheus text (line 1: not a metric name"),
        ("vllm:prompt_tokens_total 12\nvllm:generation_tokens_total twelve\n", "line 2: bad value"),
        ('vllm:x{model="a} 1\n', "unterminated"),
        ("\x00\x01\x02garbage", "not a metric name"),
        ("", "no vLLM, SGLang, TGI, llama.cpp or Triton metrics found"),
        ("process_cpu_seconds_total 1.5\n", "no vLLM, SGLang, TGI, llama.cpp or Triton"),
    ],
)
async def test_garbage_is_a_one_line_error(
    make: Make, clock: ManualClock, body: str, expected: str
) -> None:
    with MetricsServer("vllm") as server:
        server.body = body
        collector = make(server.url)
        with pytest.raises(SourceError) as info:
            await collector.poll(ctx(clock))
        assert expected in info.value.message
        assert "\n" not in info.value.message and not info.value.fatal


async def test_wrong_configured_kind_and_not_found_hint(make: Make, clock: ManualClock) -> None:
    with MetricsServer("vllm") as server:
        with pytest.raises(SourceError) as info:
            await make(server.url, kind="sglang").poll(ctx(clock))
        assert "no sglang metrics found (SGLang serves metrics only with --enable-metrics)" in (
            info.value.message
        )
        url = server.url.replace("/metrics", "/nothing")
        with pytest.raises(SourceError) as info:
            await make(url, kind="llamacpp").poll(ctx(clock))
        assert "HTTP 404 (llama-server serves metrics only with --metrics)" in info.value.message


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "until-close"])
async def test_too_large_scrape_is_refused_and_nothing_kept(
    make: Make, clock: ManualClock, declared: bool
) -> None:
    with MetricsServer("vllm", models=MODELS) as server:
        collector = InferenceCollector(
            InferenceEndpoint(url=server.url, max_response_mb=0.2), clock=clock.now
        )
        assert collector.max_response_mb == 0.2  # the [[inference]] setting
        await scrape(collector, clock)
        server.advance(3, prompt_tokens=30, generation_tokens=20)
        server.flood_bytes, server.flood_length = 5_000_000, declared
        with pytest.raises(SourceError) as info:
            await collector.poll(ctx(clock))
        message = info.value.message
        assert message.startswith(server.url + ": response too large")
        assert "0.2 MB limit" in message and "\n" not in message
        server.flood_bytes = None
        # The refused scrape set no baseline: the next one counts the whole advance.
        sample = await scrape(collector, clock)
        assert (sample.requests, sample.prompt_tokens, sample.generation_tokens) == (6, 60, 40)
        await collector.aclose()


async def test_timeout(make: Make, clock: ManualClock) -> None:
    with MetricsServer("vllm") as server:
        server.delay_s = 5
        collector = make(server.url, timeout_s=0.1)
        with pytest.raises(SourceError) as info:
            await collector.poll(ctx(clock))
        assert info.value.message == f"{server.url}: timed out"


async def test_connection_refused(make: Make, clock: ManualClock) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    collector = make(f"http://127.0.0.1:{port}/metrics", endpoint_name="local vllm")
    assert collector.name == "local vllm"
    with pytest.raises(SourceError) as info:
        await collector.poll(ctx(clock))
    assert "cannot connect" in info.value.message and "\n" not in info.value.message


async def test_injected_client_is_used_and_left_open(make: Make, clock: ManualClock) -> None:
    bodies = iter(["tgi_request_success 3\n", "tgi_request_success 8\n"])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=next(bodies))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        collector = make("http://tgi.internal:9000/metrics", client=client, endpoint_name="tgi-a")
        await scrape(collector, clock)
        sample = await scrape(collector, clock)
        assert (sample.kind, sample.requests, sample.endpoint) == ("tgi", 5, "tgi-a")
        await collector.aclose()
        assert not client.is_closed


def test_parser_reads_the_text_format() -> None:
    text = (
        "# HELP vllm:request_success_total Count of \\\\ requests.\n"
        "# TYPE vllm:request_success_total counter\n"
        "\n"
        'vllm:request_success_total{finished_reason="stop",model_name="a \\"b\\" \\\\ c\\nd"} 1.0\n'
        'vllm:request_success_created{finished_reason="stop",model_name="m"} 1.7e+09\n'
        'h_bucket{le="+Inf"} 3 1712000000000\n'
        "h_sum 4.5\n"
        "h_count 3\n"
        "nan_gauge NaN\n"
        "inf_gauge -Inf\n"
        'spaced { a = "1" , b="2", } \t 2e3\r\n'
        "empty_labels{} 7\n"
        'om_counter_total{a="x"} 5 # {trace_id="abc"} 1.0 1712000000.1\n'
        '{"dotted.name", host="h"} 9\n'
        "# EOF\n"
    )
    samples = parse_text(text)
    assert [s.name for s in samples] == [
        "vllm:request_success_total",
        "vllm:request_success_created",
        "h_bucket",
        "h_sum",
        "h_count",
        "nan_gauge",
        "inf_gauge",
        "spaced",
        "empty_labels",
        "om_counter_total",
        "dotted.name",
    ]
    assert samples[0].label("model_name") == 'a "b" \\ c\nd'
    assert samples[0].label("finished_reason") == "stop"
    assert samples[0].label("absent") is None
    assert samples[2] == Sample("h_bucket", (("le", "+Inf"),), 3.0)
    assert math.isnan(samples[5].value)
    assert samples[6].value == -math.inf
    assert samples[7] == Sample("spaced", (("a", "1"), ("b", "2")), 2000.0)
    assert samples[8].labels == ()
    assert samples[9].value == 5.0
    assert samples[10].labels == (("host", "h"),)


@pytest.mark.parametrize(
    "line",
    [
        "1metric 1",
        "metric",
        "metric{a=1} 1",
        'metric{a="1" b="2"} 1',
        'metric{a="1"}1',
        "metric 1_000",
        "metric 1 2 3",
        "metric 0x10",
        'metric{"n1", "n2"} 1',
    ],
)
def test_parser_rejects_malformed_lines(line: str) -> None:
    with pytest.raises(PrometheusParseError, match=r"^line 2: "):
        parse_text("ok 1\n" + line + "\n")


def test_nan_counters_are_skipped_and_kind_detection() -> None:
    assert detect_kind(parse_text("nv_inference_count 1\nvllm:prompt_tokens_total 2\n")) == "vllm"
    assert detect_kind(parse_text("nv_inference_request_success 1\n")) == "triton"
    assert detect_kind(parse_text("DCGM_FI_DEV_GPU_UTIL 50\n")) == ""


async def test_nan_counter_values_are_ignored(make: Make, clock: ManualClock) -> None:
    with MetricsServer("llamacpp") as server:
        server.body = "llamacpp:prompt_tokens_total 10\nllamacpp:tokens_predicted_total NaN\n"
        collector = make(server.url)
        await scrape(collector, clock)
        server.body = "llamacpp:prompt_tokens_total 15\nllamacpp:tokens_predicted_total 4\n"
        sample = await scrape(collector, clock)
        assert (sample.prompt_tokens, sample.generation_tokens) == (5, 4)
