"""Provider collectors end to end: the CLI in subprocesses against a local fake of both admin
APIs, with faults injected across several ``collect --once`` runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.provider_server import FakeProviderServer
from tokentop.pricing.book import PriceBook, TokenCounts

ROOT = Path(__file__).resolve().parents[1]


def tokentop(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokentop", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def server() -> Any:
    with FakeProviderServer() as fake:
        fake.seed(hours=3)
        yield fake


def _env(server: FakeProviderServer, tmp_path: Path, **over: str) -> dict[str, str]:
    config = tmp_path / "config.toml"
    config.write_text("nvml = false\n")
    return {
        "OPENAI_ADMIN_KEY": server.openai_key,
        "ANTHROPIC_ADMIN_KEY": server.anthropic_key,
        "TOKENTOP_OPENAI_BASE_URL": server.openai_base_url,
        "TOKENTOP_ANTHROPIC_BASE_URL": server.anthropic_base_url,
        "TOKENTOP_CONFIG": str(config),
        "TOKENTOP_DB": str(tmp_path / "tokentop.db"),
        **over,
    }


def utc_day(when: datetime) -> datetime:
    """Midnight UTC starting the day that holds ``when``."""
    return when.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def _truth_by_model(server: FakeProviderServer) -> dict[str, dict[str, int]]:
    """The fake's own totals per model, in tokentop's token kinds."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    with server._lock:
        for (_minute, dims), c in server._openai.items():
            t = out[dims[0]]
            cached = c.get("input_cached_tokens", 0)
            t["input_uncached"] += c.get("input_tokens", 0) - cached
            t["cache_read"] += cached
            t["output"] += c.get("output_tokens", 0)
            t["requests"] += c.get("num_model_requests", 0)
        for (_minute, dims), c in server._anthropic.items():
            t = out[dims[0]]
            t["input_uncached"] += c.get("uncached_input_tokens", 0)
            t["cache_read"] += c.get("cache_read_input_tokens", 0)
            t["cache_write_5m"] += c.get("ephemeral_5m_input_tokens", 0)
            t["cache_write_1h"] += c.get("ephemeral_1h_input_tokens", 0)
            t["output"] += c.get("output_tokens", 0)
            t["web_searches"] += c.get("web_search_requests", 0)
    return out


def test_five_collects_with_faults_give_the_providers_exact_numbers(
    server: FakeProviderServer, tmp_path: Path
) -> None:
    env = _env(server, tmp_path)
    faults = [None, "429", "500", "truncate", None]
    codes = []
    for fault in faults:
        server.grow_newest()
        if fault == "429":
            server.fault("429", path="usage", retry_after="1")
        elif fault:
            server.fault(fault, path="usage")
        # The fake's clock around the collect: the last one decides which days are billed.
        before = server.now()
        result = tokentop("collect", "--once", env=env)
        after = server.now()
        assert "Traceback" not in result.stderr
        codes.append(result.returncode)
    # The 429 abandons that run whole (exit 1); retries absorb the 500 and the truncated body.
    assert codes == [0, 1, 0, 0, 0]

    result = tokentop("report", "--since", "6h", "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    truth = _truth_by_model(server)
    rows = {r["model"]: r for r in report["by_model"]}
    assert set(rows) == set(truth)
    book = PriceBook()
    now = datetime.fromisoformat(report["tokentop"]["generated_at"])
    for model, t in truth.items():
        row = rows[model]
        writes = t["cache_write_5m"] + t["cache_write_1h"]
        assert row["input_tokens"] == t["input_uncached"] + t["cache_read"] + writes, model
        assert row["cached_input_tokens"] == t["cache_read"], model
        assert row["cache_write_tokens"] == writes, model
        assert row["output_tokens"] == t["output"], model
        assert row["requests"] == t["requests"], model
        quote = book.quote(
            row["provider"],
            model,
            TokenCounts(
                t["input_uncached"],
                t["cache_read"],
                t["cache_write_5m"],
                t["cache_write_1h"],
                t["output"],
                t["web_searches"],
            ),
            now,
        )
        assert quote.cost is not None
        assert abs(Decimal(str(row["cost_usd"])) - quote.cost) <= Decimal("0.000001"), model
    # Billed cost came from the cost endpoints, beside the estimate: all of OpenAI's, today's
    # partial day included, and Anthropic's days before the UTC day of the last collect (the
    # fake, like Anthropic, does not report today's cost yet). So when the 3 hours straddle
    # midnight, yesterday's Anthropic cost counts too; a collect that itself straddled midnight
    # may have seen either day as today. The 6 h window covers every seeded day.
    assert report["billed_usd"] is not None and report["billed_usd"] > 0
    billed = {
        (server.cost_total("openai") + server.cost_total("anthropic", end=utc_day(t))).quantize(
            Decimal("1e-9")
        )
        for t in (before, after)
    }
    assert Decimal(str(report["billed_usd"])) in billed
    providers = {p["provider"]: p for p in report["by_provider"]}
    assert providers["openai"]["gap_usd"] is not None

    # The keys are nowhere: not in the database files, not in any output.
    secrets = [server.openai_key.encode(), server.anthropic_key.encode()]
    for path in tmp_path.glob("tokentop.db*"):
        blob = path.read_bytes()
        assert not any(s in blob for s in secrets), path
    for args in (
        ("report", "--json"),
        ("sources", "--json"),
        ("export", "--format", "md"),
        ("export", "--format", "csv"),
        ("export", "--format", "svg"),  # a screenshot of the TUI on this database
    ):
        out = tokentop(*args, env=env)
        assert not any(s.decode() in out.stdout + out.stderr for s in secrets)


def test_wrong_key_shows_auth_failed_and_the_rest_keeps_working(
    server: FakeProviderServer, tmp_path: Path
) -> None:
    env = _env(server, tmp_path, ANTHROPIC_ADMIN_KEY="sk-ant-admin-wrong")
    result = tokentop("collect", "--once", env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "sk-ant-admin-wrong" not in result.stderr
    sources = tokentop("sources", "--json", env=env)
    rows = {r["name"]: r for r in json.loads(sources.stdout)["sources"]}
    assert rows["anthropic"]["state"] == "auth failed"
    assert "ANTHROPIC_ADMIN_KEY" in rows["anthropic"]["last_error"]
    assert rows["openai"]["state"] == "ok"
    text = tokentop("sources", env=env).stdout
    assert "auth failed" in text
    # The Sources pane says so too, and a screenshot of it holds no key.
    svg = tokentop("export", "--format", "svg", env=env).stdout
    assert "auth&#160;failed" in svg or "auth failed" in svg
    assert "sk-ant-admin-wrong" not in svg and server.openai_key not in svg
    report = json.loads(tokentop("report", "--since", "6h", "--json", env=env).stdout)
    assert {r["provider"] for r in report["by_model"]} == {"openai"}
    window = report["window"]
    since, until = (datetime.fromisoformat(window[k]) for k in ("start", "end"))
    assert report["requests"] == server.usage_totals("openai", since, until)["requests"]
