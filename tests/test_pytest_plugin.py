"""The pytest plugin, run with ``pytester`` on test files that call a fake upstream through the
unmodified OpenAI SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tests.fakes.upstream import FakeUpstream
from tokentop.collectors.pytest_plugin import usd
from tokentop.pricing.book import PriceBook, TokenCounts
from tokentop.store.db import Store

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(record=False) as up:
        yield up


@pytest.fixture(scope="module")
def one_call() -> Decimal:
    """What one chat completion of the fake upstream costs at list prices."""
    quote = PriceBook().quote(
        "openai", "gpt-4o-mini", TokenCounts(1000, 200, 0, 0, 300), datetime.now(UTC)
    )
    assert quote.cost is not None
    return quote.cost


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """An in-process inner run, without plugins that keep process-wide state of their own."""
    return pytester.runpytest(
        "-p",
        "no:textual-snapshot",
        "-p",
        "no:cacheprovider",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
        *args,
    )


def header(upstream: FakeUpstream) -> str:
    return f"""
import asyncio
import openai
import pytest

URL = "{upstream.url}/v1"
HELLO = [{{"role": "user", "content": "hi"}}]


def chat(n=1):
    client = openai.OpenAI(base_url=URL, api_key="sk-test", max_retries=0)
    for _ in range(n):
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
"""


def test_reports_each_tests_cost_exactly(
    pytester: pytest.Pytester, upstream: FakeUpstream, one_call: Decimal, tmp_path: Path
) -> None:
    pytester.makepyfile(
        test_llm=header(upstream)
        + """
def test_one_call():
    chat()


def test_two_calls_async_and_streamed():
    async def run():
        client = openai.AsyncOpenAI(base_url=URL, api_key="sk-test", max_retries=0)
        await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, stream=True,
            stream_options={"include_usage": True},
        )
        async for _ in stream:
            pass
        await client.close()
    asyncio.run(run())


def test_no_calls():
    pass
"""
    )
    out = tmp_path / "cost.json"
    db = tmp_path / "meter.db"
    result = run(pytester, "--tokentop", f"--tokentop-json={out}", f"--tokentop-db={db}")
    result.assert_outcomes(passed=3)
    one, two = usd(one_call), usd(2 * one_call)
    result.stdout.fnmatch_lines(
        [
            "*tokentop: LLM cost per test*",
            f"test_llm.py::test_two_calls_async_and_streamed * 2 * 2,400 * 600 * {two} * {one}",
            f"test_llm.py::test_one_call * 1 * 1,200 * 300 * {one} * {one}",
            f"TOTAL * 3 * 3,600 * 900 * {usd(3 * one_call)} * {one}",
        ]
    )
    data = json.loads(out.read_text())
    tests = data["tests"]
    assert set(tests) == {
        "test_llm.py::test_one_call",
        "test_llm.py::test_two_calls_async_and_streamed",
    }
    nano = int(one_call * 1_000_000_000)
    assert tests["test_llm.py::test_one_call"]["cost_nano"] == nano
    assert tests["test_llm.py::test_two_calls_async_and_streamed"]["requests"] == 2
    assert data["total"]["cost_nano"] == 3 * nano
    # --tokentop-db recorded each request, tagged with its test.
    with Store(db) as store:
        rows = store.query("SELECT tag, COUNT(*), SUM(cost_nano) FROM request GROUP BY tag")
    assert {r[0]: (r[1], r[2]) for r in rows} == {
        "test_llm.py::test_one_call": (1, nano),
        "test_llm.py::test_two_calls_async_and_streamed": (2, 2 * nano),
    }
    # The patch is gone once the session ends.
    assert httpx.HTTPTransport.handle_request.__module__.startswith("httpx")


def test_llm_budget_marker_fails_the_test_and_says_by_how_much(
    pytester: pytest.Pytester, upstream: FakeUpstream, one_call: Decimal
) -> None:
    pytester.makepyfile(
        test_budget=header(upstream)
        + """
@pytest.mark.llm_budget(usd=0.0001)
def test_over():
    chat()


@pytest.mark.llm_budget(usd=1)
def test_within():
    chat()


@pytest.mark.llm_budget(usd="lots")
def test_bad_budget():
    pass
"""
    )
    result = run(pytester, "--tokentop", "--strict-markers")
    result.assert_outcomes(passed=1, failed=2)
    over = one_call - Decimal("0.0001")
    pct = over / Decimal("0.0001") * 100
    result.stdout.fnmatch_lines(
        [
            f"*llm_budget exceeded by {usd(over)} ({pct:.1f}% over): this test's 1 LLM request(s)"
            f" cost {usd(one_call)} against a budget of $0.0001*",
        ]
    )
    result.stdout.fnmatch_lines(["*llm_budget(usd='lots'): not a number*"])


def test_total_budget_fails_the_run(
    pytester: pytest.Pytester, upstream: FakeUpstream, one_call: Decimal
) -> None:
    pytester.makepyfile(test_total=header(upstream) + "\ndef test_a():\n    chat(2)\n")
    result = run(pytester, "--tokentop", "--tokentop-budget=0.0005")
    result.assert_outcomes(passed=1)
    assert result.ret == 1
    over = 2 * one_call - Decimal("0.0005")
    result.stdout.fnmatch_lines(
        [f"*total LLM cost {usd(2 * one_call)} exceeds --tokentop-budget $0.0005 by {usd(over)}*"]
    )
    assert run(pytester, "--tokentop", "--tokentop-budget=1").ret == 0


def test_baseline_comparison_and_max_increase(
    pytester: pytest.Pytester, upstream: FakeUpstream, one_call: Decimal, tmp_path: Path
) -> None:
    body = "\ndef test_a():\n    chat({n})\n\ndef test_b():\n    chat()\n"
    pytester.makepyfile(test_cmp=header(upstream) + body.format(n=1))
    baseline = tmp_path / "baseline.json"
    assert run(pytester, "--tokentop", f"--tokentop-json={baseline}").ret == 0

    pytester.makepyfile(test_cmp=header(upstream) + body.format(n=2))
    result = run(
        pytester, "--tokentop", f"--tokentop-baseline={baseline}", "--tokentop-max-increase=50"
    )
    result.assert_outcomes(passed=2)
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        [
            "*change against the baseline*",
            f"test_cmp.py::test_a: {usd(one_call)} -> {usd(2 * one_call)} (+100.0%)",
            f"test_cmp.py::test_b: {usd(one_call)} -> {usd(one_call)} (+0.0%)",
            f"TOTAL: {usd(2 * one_call)} -> {usd(3 * one_call)} (+50.0%)",
            "*test_cmp.py::test_a: LLM cost rose 100.0%*more than --tokentop-max-increase 50%*",
        ]
    )
    relaxed = run(
        pytester, "--tokentop", f"--tokentop-baseline={baseline}", "--tokentop-max-increase=100"
    )
    assert relaxed.ret == 0


def test_off_without_the_flag_or_a_marker(
    pytester: pytest.Pytester, upstream: FakeUpstream
) -> None:
    pytester.makepyfile(
        test_off=header(upstream)
        + """
import httpx

def test_nothing_patched():
    chat()
    assert httpx.HTTPTransport.handle_request.__module__.startswith("httpx")
"""
    )
    result = run(pytester, "--strict-markers")
    result.assert_outcomes(passed=1)
    assert "LLM cost" not in result.stdout.str()
    misuse = run(pytester, "--tokentop-budget=1")
    assert misuse.ret == pytest.ExitCode.USAGE_ERROR
    misuse.stderr.fnmatch_lines(["*--tokentop-budget needs --tokentop*"])
    disabled = run(pytester, "-p", "no:tokentop", "--strict-markers")
    disabled.assert_outcomes(passed=1)


def test_a_budget_marker_is_enforced_without_the_flag(
    pytester: pytest.Pytester, upstream: FakeUpstream, one_call: Decimal
) -> None:
    pytester.makepyfile(
        test_marked=header(upstream)
        + """
@pytest.mark.llm_budget(usd=0)
def test_over():
    chat()

def test_unmarked():
    chat()
"""
    )
    result = run(pytester, "--strict-markers")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            f"*llm_budget exceeded by {usd(one_call)}*",
            "*tokentop: LLM cost per test*",
            f"TOTAL * 2 * 2,400 * 600 * {usd(2 * one_call)} *",
        ]
    )


def test_xdist_workers_figures_make_one_table(
    pytester: pytest.Pytester, upstream: FakeUpstream, one_call: Decimal, tmp_path: Path
) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(
        test_par=header(upstream)
        + "".join(f"\ndef test_{i}():\n    chat({i % 2 + 1})\n" for i in range(6))
    )
    out = tmp_path / "cost.json"
    # A subprocess: xdist's workers are processes of their own.
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-n",
        "2",
        "--tokentop",
        f"--tokentop-json={out}",
        "--tokentop-budget=1",
    )
    result.assert_outcomes(passed=6)
    nine = usd(9 * one_call)
    result.stdout.fnmatch_lines(
        [
            "*tokentop: LLM cost per test*",
            f"TOTAL * 9 * 10,800 * 2,700 * {nine} *",
            f"budget: {nine} of $1.00 (within --tokentop-budget)",
        ]
    )
    data = json.loads(out.read_text())
    assert len(data["tests"]) == 6
    assert data["total"]["cost_nano"] == 9 * int(one_call * 1_000_000_000)
