"""The report contract (``tokentop report --json``) and its CSV and Markdown renders."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import T0, at, bucket, nano
from tokentop.pricing.book import ModelPriceOverride, PriceBook, PricingConfig
from tokentop.store.db import Store
from tokentop.store.records import Batch, BilledCost, GpuSample, InferenceSample, SourceHealth
from tokentop.store.report import FORMATS, build_report, render

START = T0
END = T0 + timedelta(hours=1)
NOW = END + timedelta(minutes=2)


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store(db_path)
    yield s
    s.close()


@pytest.fixture
def filled(store: Store) -> Store:
    store.write_usage(
        [
            bucket(
                at(1),
                model="gpt-4o-2024-05-13",
                cost="0.008",
                requests=1,
                input_uncached=1000,
                output=200,
            ),
            bucket(
                at(2),
                model="gpt-4o-2024-05-13",
                cost="0.012",
                requests=3,
                input_uncached=500,
                cache_read=300,
                cache_write_5m=100,
                cache_write_1h=50,
                output=400,
            ),
            bucket(
                at(3),
                provider="acme",
                model="acme-llm",
                cost=None,
                requests=4,
                input_uncached=700,
                output=70,
            ),
            bucket(at(-5), cost="99", requests=99),  # before the window
        ]
    )
    day = datetime(2025, 3, 15, tzinfo=UTC)
    store.write_batch(
        Batch(
            billed=(BilledCost("oa-costs", "openai", day, nano("0.025")),),
            gpu=(
                GpuSample(
                    "nvml",
                    "GPU-0",
                    at(10),
                    60.0,
                    name="NVIDIA H100",
                    power_mw=300_000,
                    util_pct=80.0,
                    cost_nano=nano("0.05"),
                    idle_cost_nano=nano("0.01"),
                    cost_ref="rented $3/h (config)",
                ),
            ),
            inference=(
                InferenceSample(
                    "vllm",
                    "http://127.0.0.1:8000/metrics",
                    at(10),
                    60.0,
                    kind="vllm",
                    requests=20,
                    prompt_tokens=4000,
                    generation_tokens=1000,
                ),
            ),
        )
    )
    store.record_health(
        SourceHealth(
            "openai",
            "openai",
            state="ok",
            last_success=at(59),
            lag_s=61.04,
            newest_data=at(59),
        ),
        calls_delta=4,
        now=at(59),
    )
    store.record_health(
        SourceHealth("nvml", "nvml", state="unavailable", last_error="NVML driver not found"),
        now=at(59),
    )
    return store


def _report(store: Store, label: str = "", prices: dict[str, Any] | None = None) -> dict[str, Any]:
    return build_report(store, START, END, NOW, prices or PriceBook().describe(), label=label)


CONTRACT = {
    "window",
    "total_usd",
    "billed_usd",
    "requests",
    "cost_per_request_usd",
    "by_model",
    "unpriced",
    "gpu",
    "sources",
    "prices",
}
MODEL_FIELDS = {
    "provider",
    "model",
    "requests",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "cost_usd",
    "priced",
}
GPU_FIELDS = {
    "cost_usd",
    "inferences",
    "cost_per_inference_usd",
    "cost_per_1m_tokens_usd",
    "idle_cost_usd",
    "devices",
}


def test_report_has_the_contract_fields(filled: Store) -> None:
    r = _report(filled)
    assert set(r) >= CONTRACT
    assert set(r["window"]) == {"start", "end"}
    assert all(set(row) >= MODEL_FIELDS for row in r["by_model"])
    assert set(r["gpu"]) >= GPU_FIELDS
    assert {"source", "version", "online_updates", "overrides", "refs"} <= set(r["prices"])


def test_report_contract_fields_and_values(filled: Store) -> None:
    r = _report(filled)
    assert r["window"] == {"start": START.isoformat(), "end": END.isoformat()}
    assert r["total_usd"] == 0.02
    assert r["billed_usd"] == 0.025
    # The bill is a whole UTC day's: the report says which days it covers.
    assert r["billed_days_covered"] == {"from": "2025-03-15", "to": "2025-03-15"}
    assert r["requests"] == 8
    assert r["cost_per_request_usd"] == 0.005  # $0.02 over the 4 priced requests
    assert r["by_model"] == [
        {
            "provider": "openai",
            "model": "gpt-4o-2024-05-13",
            "requests": 4,
            "input_tokens": 1950,
            "cached_input_tokens": 300,
            "cache_write_tokens": 150,
            "output_tokens": 600,
            "cost_usd": 0.02,
            "cost_per_request_usd": 0.005,
            "priced": True,
        },
        {
            "provider": "acme",
            "model": "acme-llm",
            "requests": 4,
            "input_tokens": 700,
            "cached_input_tokens": 0,
            "cache_write_tokens": 0,
            "output_tokens": 70,
            "cost_usd": None,
            "cost_per_request_usd": None,
            "priced": False,
        },
    ]
    assert r["unpriced"] == {"acme/acme-llm": 770}
    gpu = r["gpu"]
    assert gpu["cost_usd"] == 0.05
    assert gpu["inferences"] == 20
    assert gpu["cost_per_inference_usd"] == 0.0025
    assert gpu["cost_per_1m_tokens_usd"] == 10.0
    assert gpu["idle_cost_usd"] == 0.01
    [device] = gpu["devices"]
    assert device["device"] == "GPU-0"
    assert device["cost_usd"] == 0.05
    assert device["usd_per_hour"] == 3.0
    assert device["cost_basis"] == "rented $3/h (config)"
    sources = {s["name"]: s for s in r["sources"]}
    assert sources["openai"]["state"] == "ok"
    assert sources["openai"]["last_success"] == at(59).isoformat()
    assert sources["openai"]["lag_s"] == 61.0
    assert sources["openai"]["calls_last_hour"] == 4
    assert sources["nvml"]["state"] == "unavailable"
    assert sources["nvml"]["last_error"] == "NVML driver not found"
    assert sources["nvml"]["last_success"] is None
    prices = r["prices"]
    assert prices["source"] == "genai-prices"
    assert prices["online_updates"] is False
    assert prices["refs"] == ["test openai/gpt-4o-2024-05-13", "unpriced acme/acme-llm"]
    assert r["tokentop"]["demo"] is False
    assert r["freshness"]["newest_usage"] == at(4).isoformat()
    # Billed cost is per UTC day, so the estimate beside it runs from that day's start.
    assert r["by_provider"] == [
        {
            "provider": "openai",
            "days": 1,
            "estimated_usd": 99.02,
            "billed_usd": 0.025,
            "gap_usd": -98.995,
        }
    ]
    json.loads(render(r, "json"))  # every field is JSON


def test_report_of_an_empty_store(store: Store) -> None:
    r = _report(store)
    assert r["total_usd"] == 0.0
    assert r["billed_usd"] is None
    assert r["billed_days_covered"] is None
    assert r["requests"] == 0
    assert r["cost_per_request_usd"] is None
    assert r["by_model"] == []
    assert r["unpriced"] == {}
    assert r["gpu"]["cost_per_inference_usd"] is None
    assert r["gpu"]["cost_per_1m_tokens_usd"] is None
    assert r["gpu"]["devices"] == []
    assert r["sources"] == []
    assert r["freshness"]["newest_usage"] is None
    assert json.loads(render(r, "json")) == r


def _csv_parts(text: str) -> tuple[list[str], list[dict[str, str]]]:
    comments = [line for line in text.splitlines() if line.startswith("#")]
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    return comments, list(csv.DictReader(io.StringIO(body)))


def test_csv_is_self_describing(filled: Store) -> None:
    book = PriceBook(
        PricingConfig(
            models=(
                ModelPriceOverride(
                    "acme", "acme-llm", input_per_mtok=Decimal(1), output_per_mtok=Decimal(2)
                ),
            )
        )
    )
    text = render(_report(filled, prices=book.describe()), "csv")
    comments, rows = _csv_parts(text)
    header = "\n".join(comments)
    assert "DEMO" not in header
    assert f"# window: {START.isoformat()} .. {END.isoformat()}" in comments
    assert "# total_usd: 0.02" in comments
    assert "# billed_usd: 0.025 (whole UTC days 2025-03-15 to 2025-03-15)" in comments
    assert "# requests: 8" in comments
    assert "# cost_per_request_usd: 0.005" in comments
    assert "# gpu_cost_usd: 0.05" in comments
    assert f"# newest_usage: {at(4).isoformat()} (age 3480.0 s)" in comments
    assert any(
        c.startswith("# prices: genai-prices ") and "online updates off, 1 override(s)" in c
        for c in comments
    )
    assert any(c.startswith("# source openai: ok, last success") for c in comments)
    assert any("last error: NVML driver not found" in c for c in comments)
    assert [(r["model"], r["cost_usd"], r["priced"]) for r in rows] == [
        ("gpt-4o-2024-05-13", "0.02", "True"),
        ("acme-llm", "", "False"),  # unknown, not $0
    ]
    assert rows[0]["input_tokens"] == "1950"


def test_csv_names_the_prices_used(filled: Store) -> None:
    text = render(_report(filled), "csv")
    assert "test openai/gpt-4o-2024-05-13" in text


def test_markdown_is_self_describing(filled: Store) -> None:
    text = render(_report(filled), "md")
    assert text.startswith("# tokentop report\n")
    assert "DEMO" not in text
    assert f"- Window: {START.isoformat()} to {END.isoformat()}" in text
    assert f"newest usage {at(4).isoformat()} (3480.0 s old)" in text
    assert "- Prices: genai-prices " in text and "(online updates off)" in text
    assert (
        "| $0.020000 | $0.025000 | 8 | $0.005000 (excl. 4 unpriced requests) |"
        " $0.050000 | $0.002500 |" in text
    )
    assert (
        "| openai | gpt-4o-2024-05-13 | 4 | 1,950 | 300 | 150 | 600 | $0.020000 | $0.005000 |"
        in text
    )
    assert "| acme | acme-llm | 4 | 700 | 0 | 0 | 70 | unpriced | unpriced |" in text
    assert "- acme/acme-llm: 770 tokens" in text
    assert "| openai | 1 | $99.02 | $0.025000 |" in text
    assert "## GPUs" in text and "rented $3/h (config)" in text
    assert "| nvml | nvml | unavailable | never |  | NVML driver not found |" in text
    assert "## Prices used\n\n- test openai/gpt-4o-2024-05-13" in text


@pytest.mark.parametrize("fmt", ["csv", "md", "json"])
def test_demo_label_shows_in_every_format(filled: Store, fmt: str) -> None:
    report = _report(filled, label="demo")
    assert report["tokentop"]["demo"] is True
    text = render(report, fmt)
    if fmt == "json":
        assert json.loads(text)["tokentop"]["label"] == "demo"
    else:
        assert "DEMO" in text.splitlines()[0]


def test_render_rejects_unknown_format(filled: Store) -> None:
    assert FORMATS == ("json", "csv", "md")
    with pytest.raises(ValueError, match="'xml'"):
        render(_report(filled), "xml")
