"""Every service tier priced right: batch, priority, flex, long context, unknown tiers.

Figures are checked against genai-prices itself (its ``price_context`` variants and tiered
prices), with dates taken from its data, so that the tests follow the bundled price data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import pytest
from genai_prices import Usage as GenaiUsage
from genai_prices.data_snapshot import get_snapshot

from tests.fakes.provider_server import FakeProviderServer
from tokentop.collectors.config import ConfigError, load_config
from tokentop.collectors.meter import CHAT, MESSAGES, RESPONSES, Exchange, Observer, finalize
from tokentop.collectors.runner import price_request, price_usage
from tokentop.pricing.book import (
    BUILTIN_TIER_RULES,
    FLAG_MARK,
    PriceBook,
    PriceTier,
    PricingConfig,
    Quote,
    TierRule,
    TokenCounts,
)
from tokentop.store import report
from tokentop.store.records import MeteredRequest, UsageBucket

ROOT = Path(__file__).resolve().parents[1]
M = 1_000_000
GPT_4O = "gpt-4o-2024-08-06"
ONE_M_EACH = TokenCounts(input_uncached=M, output=M)
BEFORE_GENAI = datetime(2025, 6, 1, tzinfo=UTC)
"""A date after both built-in batch rules and before genai-prices lists tier variants."""


def variant_start(provider: str, model: str, when: dict[str, str]) -> datetime:
    """When genai-prices' variant of ``model`` selected by ``when`` comes into force."""
    _, info = get_snapshot().find_provider_model(model, None, provider, None)
    for v in info.price_variants or ():
        if v.when == when:
            start = getattr(v.constraint, "start_date", None)
            if start is None:
                return datetime(1970, 1, 1, tzinfo=UTC)
            return datetime.combine(start, time(), tzinfo=UTC)
    raise AssertionError(f"genai-prices has no {when} variant of {provider}/{model}")


def after(provider: str, model: str, when: dict[str, str]) -> datetime:
    return variant_start(provider, model, when) + timedelta(days=1, hours=12)


def genai_total(
    provider: str,
    model: str,
    at: datetime,
    context: dict[str, str] | None = None,
    **usage: int,
) -> Decimal:
    """genai-prices' own figure (``input_tokens`` counts all input, cached included)."""
    calc = genai_prices.calc_price(
        GenaiUsage(**usage),
        model,
        provider_id=provider,
        genai_request_timestamp=at,
        price_context=context,
    )
    return Decimal(calc.total_price)


def quote(model: str, tier: PriceTier | None, at: datetime, provider: str = "openai") -> Any:
    return PriceBook().quote(provider, model, ONE_M_EACH, at, tier)


def usd(q: Quote) -> Decimal:
    assert q.cost is not None
    return q.cost


# Batch


def test_batch_is_half_of_list_by_genai_prices_where_it_lists_it() -> None:
    at = after("openai", GPT_4O, {"processing": "batch"})
    standard = quote(GPT_4O, None, at)
    batch = quote(GPT_4O, PriceTier(batch=True), at)
    assert batch.cost == standard.cost / 2
    assert batch.cost == genai_total(
        "openai", GPT_4O, at, {"processing": "batch"}, input_tokens=M, output_tokens=M
    )
    assert (batch.tier, batch.tier_source, batch.rule, batch.flag) == (
        "batch",
        "genai-prices",
        "batch",
        "",
    )
    assert batch.price_ref == f"genai-prices {genai_prices.__version__} openai/gpt-4o batch"


@pytest.mark.parametrize(
    ("provider", "model", "tier"),
    [
        ("openai", GPT_4O, PriceTier(batch=True)),
        ("openai", GPT_4O, PriceTier("default", batch=True)),
        ("anthropic", "claude-sonnet-4-20250514", PriceTier("batch")),
    ],
)
def test_batch_without_genai_price_is_the_published_rule(
    provider: str, model: str, tier: PriceTier
) -> None:
    standard = quote(model, None, BEFORE_GENAI, provider)
    batch = quote(model, tier, BEFORE_GENAI, provider)
    assert batch.cost == standard.cost * Decimal("0.5")
    rule = next(r for r in BUILTIN_TIER_RULES if r.provider == provider)
    assert batch.tier_source == "built-in"
    assert batch.rule == f"batch 50% of list (built-in rule from {rule.effective.date()})"
    assert batch.price_ref.endswith(batch.rule)
    assert batch.flag == ""


def test_batch_rule_is_date_effective() -> None:
    rule = next(r for r in BUILTIN_TIER_RULES if r.provider == "openai")
    on = quote(GPT_4O, PriceTier(batch=True), rule.effective)
    before = quote(GPT_4O, PriceTier(batch=True), rule.effective - timedelta(seconds=1))
    standard = quote(GPT_4O, None, rule.effective)
    assert on.cost == standard.cost / 2
    assert before.cost == standard.cost
    assert before.tier_source == "list"
    assert before.flag == f"tier 'batch' unknown before {rule.effective.date()}: list price"
    assert FLAG_MARK in before.price_ref


def test_batch_web_searches_stay_at_list() -> None:
    tokens = TokenCounts(input_uncached=M, web_searches=10)
    pb = PriceBook()
    model = "claude-sonnet-4-20250514"
    standard = pb.quote("anthropic", model, tokens, BEFORE_GENAI)
    batch = pb.quote("anthropic", model, tokens, BEFORE_GENAI, PriceTier("batch"))
    assert batch.breakdown["web_searches"] == standard.breakdown["web_searches"] > 0
    assert batch.breakdown["input_uncached"] == standard.breakdown["input_uncached"] / 2


# Priority and flex: genai-prices' variants


def test_priority_is_genai_prices_figure() -> None:
    context = {"service_tier": "priority"}
    at = after("openai", GPT_4O, context)
    tokens = TokenCounts(input_uncached=M, cache_read=300_000, output=M)
    q = PriceBook().quote("openai", GPT_4O, tokens, at, PriceTier("priority"))
    expected = genai_total(
        "openai",
        GPT_4O,
        at,
        context,
        input_tokens=M + 300_000,
        cache_read_tokens=300_000,
        output_tokens=M,
    )
    assert q.cost == expected
    assert q.cost > usd(PriceBook().quote("openai", GPT_4O, tokens, at))
    assert (q.tier, q.tier_source, q.flag) == ("priority", "genai-prices", "")
    assert q.price_ref == f"genai-prices {genai_prices.__version__} openai/gpt-4o priority"


def test_flex_is_genai_prices_figure_where_listed() -> None:
    context = {"service_tier": "flex"}
    at = after("openai", "gpt-5", context)
    q = quote("gpt-5", PriceTier("flex"), at)
    assert q.cost == genai_total("openai", "gpt-5", at, context, input_tokens=M, output_tokens=M)
    assert q.cost < quote("gpt-5", None, at).cost
    assert q.tier_source == "genai-prices"


def test_tier_before_genai_lists_it_is_list_and_flagged() -> None:
    start = variant_start("openai", GPT_4O, {"service_tier": "priority"})
    q = quote(GPT_4O, PriceTier("priority"), start - timedelta(days=1))
    assert q.cost == quote(GPT_4O, None, start - timedelta(days=1)).cost
    assert q.flag == f"tier 'priority' unknown before {start.date()}: list price"


@pytest.mark.parametrize("name", ["default", "standard", "", "DEFAULT", "standard_only"])
def test_standard_tier_names_are_list_and_not_flagged(name: str) -> None:
    at = after("openai", GPT_4O, {"service_tier": "priority"})
    q = quote(GPT_4O, PriceTier(name), at)
    assert q.cost == quote(GPT_4O, None, at).cost
    assert (q.tier, q.tier_source, q.rule, q.flag) == ("", "", "", "")
    assert q.price_ref == f"genai-prices {genai_prices.__version__} openai/gpt-4o"


@pytest.mark.parametrize(
    ("provider", "model", "name"),
    [
        ("openai", GPT_4O, "weird"),
        ("openai", GPT_4O, "flex"),  # genai-prices lists no flex price for gpt-4o
        ("anthropic", "claude-sonnet-4-20250514", "priority"),
    ],
)
def test_unknown_tier_is_list_price_and_flagged_never_dropped(
    provider: str, model: str, name: str
) -> None:
    at = datetime(2026, 11, 20, tzinfo=UTC)
    q = quote(model, PriceTier(name), at, provider)
    assert q.priced is True
    assert q.cost == quote(model, None, at, provider).cost
    assert (q.tier, q.tier_source) == (name, "list")
    assert q.flag == f"tier {name!r} unknown: list price"
    assert q.price_ref.endswith(f" {FLAG_MARK}{q.flag}]")
    assert report.PRICE_FLAG == FLAG_MARK


def test_tier_names_from_outside_are_bounded_and_quoted() -> None:
    q = quote(GPT_4O, PriceTier("x'\n" + "y" * 200), BEFORE_GENAI)
    assert "\n" not in q.price_ref
    assert len(q.tier) == 40


def test_rates_cache_keeps_tiers_apart() -> None:
    pb = PriceBook()
    at = after("openai", GPT_4O, {"service_tier": "priority"})
    costs = [
        usd(pb.quote("openai", GPT_4O, ONE_M_EACH, at, tier))
        for tier in (
            None,
            PriceTier("priority"),
            PriceTier(batch=True),
            None,
            PriceTier("priority"),
        )
    ]
    assert costs[0] == costs[3] < costs[1] == costs[4]
    assert costs[2] == costs[0] / 2


def test_discount_applies_on_top_of_the_tier() -> None:
    pb = PriceBook(PricingConfig(discounts={"openai": Decimal("0.1")}))
    q = pb.quote("openai", GPT_4O, ONE_M_EACH, BEFORE_GENAI, PriceTier(batch=True))
    assert q.cost == quote(GPT_4O, None, BEFORE_GENAI).cost * Decimal("0.5") * Decimal("0.9")
    assert q.price_ref.endswith("batch 50% of list (built-in rule from 2024-04-15) less 10%")


# Long context


def test_long_context_bucket_uses_the_tier_rates() -> None:
    model = "claude-sonnet-4-5"
    at = datetime(2025, 11, 1, tzinfo=UTC)
    tokens = TokenCounts(input_uncached=300_000, output=2_000)
    pb = PriceBook()
    long = pb.quote("anthropic", model, tokens, at, PriceTier("standard", context_window="200k-1M"))
    short = pb.quote("anthropic", model, tokens, at, PriceTier("standard", context_window="0-200k"))
    # One request of 300k input is what genai-prices prices at its long-context rates.
    assert long.cost == genai_total(
        "anthropic", model, at, input_tokens=300_000, output_tokens=2_000
    )
    assert usd(short) == usd(pb.quote("anthropic", model, tokens, at)) < usd(long)
    assert long.rule == "long-context rates (input over 200k)"
    assert (long.flag, short.flag) == ("", "")


def test_long_context_batch_combines_both() -> None:
    model = "claude-sonnet-4-20250514"
    at = BEFORE_GENAI
    pb = PriceBook()
    tier = PriceTier("batch", context_window="200k-1M")
    q = pb.quote("anthropic", model, ONE_M_EACH, at, tier)
    # genai-prices lists no long-context rates for Sonnet 4: base rates, flagged.
    assert q.cost == quote(model, None, at, "anthropic").cost / 2
    assert q.flag == "no long-context rates listed for context window 200k-1M: base rates"


def test_context_window_spanning_a_threshold_is_flagged() -> None:
    # Claude Haiku 5.5's tiered prices start at 100k, inside Anthropic's 0-200k bucket.
    at = datetime(2026, 11, 20, tzinfo=UTC)
    tier = PriceTier(context_window="0-200k")
    q = quote("claude-haiku-5-5", tier, at, "anthropic")
    assert q.flag == "context window 0-200k spans the 100k price threshold: priced at base rates"
    assert q.cost == quote("claude-haiku-5-5", None, at, "anthropic").cost


def test_unknown_context_window_is_base_rates_and_flagged() -> None:
    q = quote("claude-sonnet-4-5", PriceTier(context_window="huge"), BEFORE_GENAI, "anthropic")
    assert q.cost == quote("claude-sonnet-4-5", None, BEFORE_GENAI, "anthropic").cost
    assert q.flag == "context window 'huge' unknown: base rates"


@pytest.mark.parametrize("size", [100_000, 272_000, 272_001, 500_000])
def test_metered_request_size_picks_long_context_rates_exactly(size: int) -> None:
    at = datetime(2026, 3, 20, tzinfo=UTC)
    q = PriceBook().quote(
        "openai",
        "gpt-5.4",
        TokenCounts(input_uncached=size, output=1_000),
        at,
        PriceTier(request_input=size),
    )
    assert q.cost == genai_total("openai", "gpt-5.4", at, input_tokens=size, output_tokens=1_000)
    assert (q.rule != "") == (size > 272_000)


# Rules from the config file


def test_config_rule_overrides_the_batch_rule_from_its_date() -> None:
    rule = TierRule("batch", Decimal("0.4"), "openai", datetime(2025, 1, 1, tzinfo=UTC))
    pb = PriceBook(PricingConfig(tiers=(rule,)))
    list_cost = quote(GPT_4O, None, BEFORE_GENAI).cost
    q = pb.quote("openai", GPT_4O, ONE_M_EACH, BEFORE_GENAI, PriceTier(batch=True))
    assert q.cost == list_cost * Decimal("0.4")
    assert (q.tier_source, q.rule) == ("config", "batch 40% of list (config rule from 2025-01-01)")
    earlier = datetime(2024, 12, 31, tzinfo=UTC)
    q = pb.quote("openai", GPT_4O, ONE_M_EACH, earlier, PriceTier(batch=True))
    assert (q.cost, q.tier_source) == (quote(GPT_4O, None, earlier).cost / 2, "built-in")
    # A config rule also wins over genai-prices' own batch price.
    late = after("openai", GPT_4O, {"processing": "batch"})
    q = pb.quote("openai", GPT_4O, ONE_M_EACH, late, PriceTier(batch=True))
    assert q.cost == quote(GPT_4O, None, late).cost * Decimal("0.4")


def test_config_rule_prices_a_tier_nobody_lists() -> None:
    pb = PriceBook(PricingConfig(tiers=(TierRule("scale", Decimal("1.25")),)))
    q = pb.quote(
        "anthropic", "claude-sonnet-4-20250514", ONE_M_EACH, BEFORE_GENAI, PriceTier("Scale")
    )
    assert q.cost == quote(
        "claude-sonnet-4-20250514", None, BEFORE_GENAI, "anthropic"
    ).cost * Decimal("1.25")
    assert q.flag == ""
    assert q.rule == "scale 125% of list (config rule from 1970-01-01)"


def test_config_file_tier_tables(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        "[[pricing.tier]]\ntier = 'batch'\nprovider = 'openai'\nshare_of_list = 0.4\n"
        "effective = 2025-01-01\n\n[[pricing.tier]]\ntier = 'Flex'\nshare_of_list = 0.5\n"
    )
    config = load_config(path)
    assert config.pricing.tiers == (
        TierRule("batch", Decimal("0.4"), "openai", datetime(2025, 1, 1, tzinfo=UTC)),
        TierRule("flex", Decimal("0.5")),
    )
    rules = PriceBook(config.pricing).describe()["tier_rules"]
    assert rules[0] == {
        "tier": "batch",
        "provider": "openai",
        "share_of_list": "0.4",
        "effective": "2025-01-01T00:00:00+00:00",
        "source": "config",
    }
    assert [r["source"] for r in rules] == ["config", "config", "built-in", "built-in"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[pricing.tier]]\nshare_of_list = 0.5", "pricing.tier[0] needs 'tier'"),
        ("[[pricing.tier]]\ntier = 'batch'", "pricing.tier[0] needs 'share_of_list'"),
        (
            "[[pricing.tier]]\ntier = 'batch'\nshare_of_list = -0.5",
            "pricing.tier[0].share_of_list must be a non-negative number, got -0.5",
        ),
        (
            "[[pricing.tier]]\ntier = 'batch'\nshare_of_list = 'half'",
            "pricing.tier[0].share_of_list must be a number, got 'half'",
        ),
        (
            "[[pricing.tier]]\ntier = 'default'\nshare_of_list = 0.5",
            "pricing.tier[0].tier must name a non-standard tier, got 'default'",
        ),
        (
            "[[pricing.tier]]\ntier = 5\nshare_of_list = 0.5",
            "pricing.tier[0].tier must name a non-standard tier, got 5",
        ),
        (
            "[[pricing.tier]]\ntier = 'batch'\nshare_of_list = 0.5\neffective = 'soon'",
            "pricing.tier[0].effective is not a date: 'soon'",
        ),
        (
            "[[pricing.tier]]\ntier = 'batch'\nshare_of_list = 0.5\nprovider = 1",
            "pricing.tier[0].provider must be a string, got 1",
        ),
        (
            "[[pricing.tier]]\ntier = 'batch'\nshare_of_list = 0.5\ndiscount = 0.5",
            "unknown setting 'pricing.tier[0].discount'",
        ),
        ("[pricing]\ntier = 5", "pricing.tier must be a table or an array of tables, got 5"),
    ],
)
def test_bad_tier_rules_are_one_line_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


# The runner's pricing of records


def test_buckets_are_priced_with_their_dimensions() -> None:
    pb = PriceBook()
    at = BEFORE_GENAI
    base = UsageBucket("openai", "openai", GPT_4O, at, input_uncached=M, output=M)
    standard = price_usage(pb, base)
    batch = price_usage(
        pb,
        UsageBucket(
            "openai",
            "openai",
            GPT_4O,
            at,
            batch="true",
            service_tier="default",
            input_uncached=M,
            output=M,
        ),
    )
    odd = price_usage(
        pb,
        UsageBucket(
            "openai", "openai", GPT_4O, at, service_tier="scale", input_uncached=M, output=M
        ),
    )
    assert batch.cost_nano * 2 == standard.cost_nano
    assert "batch 50% of list" in batch.price_ref
    assert odd.priced and odd.cost_nano == standard.cost_nano
    assert FLAG_MARK in odd.price_ref


def test_metered_request_is_priced_with_its_service_tier() -> None:
    at = after("openai", GPT_4O, {"service_tier": "priority"})
    request = MeteredRequest(
        at, "openai", GPT_4O, input_uncached=M, output=M, service_tier="priority"
    )
    priced = price_request(PriceBook(), request)
    expected = genai_total(
        "openai", GPT_4O, at, {"service_tier": "priority"}, input_tokens=M, output_tokens=M
    )
    assert priced.cost_nano == int(expected * 1_000_000_000)
    assert priced.price_ref.endswith("openai/gpt-4o priority")


# The per-request meter


def _exchange(
    api: str, body: dict[str, Any], at: datetime, request: dict[str, Any] | None = None
) -> Exchange:
    provider = "anthropic" if api == MESSAGES else "openai"
    return Exchange(
        api=api,
        provider=provider,
        ts=at,
        status=200,
        body=json.dumps(body).encode(),
        request_body=json.dumps(request or {}).encode(),
    )


@pytest.mark.parametrize(("model", "tier"), [(GPT_4O, "priority"), ("gpt-5", "flex")])
def test_meter_prices_a_response_by_its_service_tier(model: str, tier: str) -> None:
    at = after("openai", model, {"service_tier": tier})
    usage = {
        "prompt_tokens": 2_000,
        "completion_tokens": 500,
        "prompt_tokens_details": {"cached_tokens": 1_000},
    }
    body = {"id": "r1", "model": model, "usage": usage, "service_tier": tier}
    request = finalize(_exchange(CHAT, body, at), PriceBook())
    assert request is not None
    assert request.service_tier == tier
    expected = genai_total(
        "openai",
        model,
        at,
        {"service_tier": tier},
        input_tokens=2_000,
        cache_read_tokens=1_000,
        output_tokens=500,
    )
    assert request.cost_nano == int(expected * 1_000_000_000)
    assert request.price_ref.endswith(f" {tier}")
    default = finalize(_exchange(CHAT, {**body, "service_tier": "default"}, at), PriceBook())
    assert default is not None and default.cost_nano != request.cost_nano


def test_meter_reads_the_tier_of_responses_and_streams() -> None:
    at = after("openai", GPT_4O, {"service_tier": "priority"})
    responses = {
        "id": "resp_1",
        "model": GPT_4O,
        "service_tier": "priority",
        "usage": {"input_tokens": 100, "output_tokens": 10},
    }
    r = finalize(_exchange(RESPONSES, responses, at), PriceBook())
    assert r is not None and r.service_tier == "priority"

    chunks = [
        {"id": "c1", "model": GPT_4O, "service_tier": "flex", "choices": [{"delta": {}}]},
        {
            "id": "c1",
            "model": GPT_4O,
            "service_tier": "flex",
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": 2},
        },
    ]
    stream = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    done: list[Exchange] = []
    ex = Exchange(api=CHAT, provider="openai", ts=at, status=200)
    observer = Observer(ex, "text/event-stream", "", 0.0, done.append)
    observer.feed(stream + b"data: [DONE]\n\n")
    observer.finish(True)
    r = finalize(ex, PriceBook())
    assert r is not None and r.service_tier == "flex"
    # gpt-4o has no flex price in genai-prices: list price, flagged, still counted.
    assert r.priced and FLAG_MARK in r.price_ref


def test_meter_anthropic_usage_tier_and_request_fallback() -> None:
    body = {
        "id": "msg_1",
        "model": "claude-sonnet-4-20250514",
        "usage": {"input_tokens": 1_000, "output_tokens": 100, "service_tier": "batch"},
    }
    r = finalize(_exchange(MESSAGES, body, BEFORE_GENAI), PriceBook())
    assert r is not None and r.service_tier == "batch"
    assert "batch 50% of list (built-in rule from 2024-10-08)" in r.price_ref
    # The response is silent: the tier the request asked for is used; ``auto`` says nothing.
    usage = {"prompt_tokens": 10, "completion_tokens": 2}
    silent = {"id": "x", "model": "gpt-5", "usage": usage}
    asked = finalize(_exchange(CHAT, silent, BEFORE_GENAI, {"service_tier": "flex"}), None)
    assert asked is not None and asked.service_tier == "flex"
    auto = finalize(_exchange(CHAT, silent, BEFORE_GENAI, {"service_tier": "auto"}), None)
    assert auto is not None and auto.service_tier == ""


# The command line and the report, end to end


def tokentop(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokentop", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def price_json(*args: str) -> dict[str, Any]:
    result = tokentop("price", GPT_4O, "--input", "1000000", "--output", "1000000", *args, "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_cli_price_batch_and_service_tier() -> None:
    standard = price_json()
    assert (standard["tier"], standard["tier_priced_by"], standard["flagged"]) == (
        "standard",
        "list",
        None,
    )
    batch = price_json("--batch")
    assert batch["total_usd"] == standard["total_usd"] / 2
    assert batch["tier"] == "batch"
    ruled = price_json("--batch", "--at", "2025-06-01")
    assert ruled["total_usd"] == price_json("--at", "2025-06-01")["total_usd"] / 2
    assert ruled["tier_priced_by"] == "built-in"
    assert ruled["price_ref"].endswith("batch 50% of list (built-in rule from 2024-04-15)")

    at = after("openai", GPT_4O, {"service_tier": "priority"})
    priority = price_json("--service-tier", "priority", "--at", at.isoformat())
    expected = genai_total(
        "openai", GPT_4O, at, {"service_tier": "priority"}, input_tokens=M, output_tokens=M
    )
    assert Decimal(str(priority["total_usd"])) == expected
    assert (priority["tier"], priority["tier_priced_by"]) == ("priority", "genai-prices")

    weird = price_json("--service-tier", "weird")
    assert weird["total_usd"] == standard["total_usd"]
    assert weird["flagged"] == "tier 'weird' unknown: list price"
    assert weird["tier_priced_by"] == "list"
    text = tokentop("price", GPT_4O, "--input", "10", "--service-tier", "weird").stdout
    assert "[flagged: tier 'weird' unknown: list price]" in text


def test_report_prices_batch_buckets_at_half_and_lists_flagged_tiers(tmp_path: Path) -> None:
    at = datetime.now(UTC) - timedelta(minutes=20)
    with FakeProviderServer() as server:
        for batch in (False, True):
            server.add_openai_usage(
                at,
                GPT_4O,
                project_id="proj_alpha",
                batch=batch,
                service_tier="default",
                input_tokens=M,
                output_tokens=M,
                num_model_requests=4,
            )
        server.add_openai_usage(
            at,
            GPT_4O,
            batch=False,
            service_tier="weird",
            input_tokens=1_000,
            output_tokens=100,
            num_model_requests=1,
        )
        for tier in ("standard", "batch"):
            server.add_anthropic_usage(
                at,
                "claude-sonnet-4-20250514",
                service_tier=tier,
                context_window="0-200k",
                uncached_input_tokens=M,
                output_tokens=M,
            )
        config = tmp_path / "config.toml"
        config.write_text("nvml = false\n")
        env = {
            "OPENAI_ADMIN_KEY": server.openai_key,
            "ANTHROPIC_ADMIN_KEY": server.anthropic_key,
            "TOKENTOP_OPENAI_BASE_URL": server.openai_base_url,
            "TOKENTOP_ANTHROPIC_BASE_URL": server.anthropic_base_url,
            "TOKENTOP_CONFIG": str(config),
            "TOKENTOP_DB": str(tmp_path / "tokentop.db"),
        }
        collect = tokentop("collect", "--once", env=env)
        assert collect.returncode == 0, collect.stderr
    result = tokentop("report", "--since", "2h", "--json", env=env)
    assert result.returncode == 0, result.stderr
    prices = json.loads(result.stdout)["prices"]
    by_ref = {r["price_ref"]: r for r in prices["by_ref"]}
    version = genai_prices.__version__
    openai_list = by_ref[f"genai-prices {version} openai/gpt-4o"]
    (openai_batch,) = [
        r
        for ref, r in by_ref.items()
        if ref.startswith(f"genai-prices {version} openai/gpt-4o batch")
    ]
    assert openai_batch["tokens"] == 2 * M
    assert openai_batch["cost_usd"] * 2 == openai_list["cost_usd"] == 12.5
    anthropic_list = by_ref[f"genai-prices {version} anthropic/claude-sonnet-4-0"]
    (anthropic_batch,) = [
        r for ref, r in by_ref.items() if "anthropic/claude-sonnet-4-0 batch" in ref
    ]
    assert anthropic_batch["cost_usd"] * 2 == anthropic_list["cost_usd"] == 18.0
    assert [f["price_ref"] for f in prices["flagged"]] == [
        f"genai-prices {version} openai/gpt-4o [flagged: tier 'weird' unknown: list price]"
    ]
    assert prices["flagged"][0]["tokens"] == 1_100
    assert all(r["flagged"] == (FLAG_MARK in ref) for ref, r in by_ref.items())
    assert {r["source"] for r in prices["tier_rules"]} == {"built-in"}
