"""The price book (genai-prices data, overrides, discounts) and the GPU cost model."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import genai_prices
import pytest
from genai_prices.data_snapshot import get_snapshot
from genai_prices.types import StartDateConstraint

from tokentop.pricing.book import (
    ModelPriceOverride,
    PriceBook,
    PriceTier,
    PricingConfig,
    TokenCounts,
)
from tokentop.pricing.gpu import (
    DEFAULT_RATES,
    GpuCostModel,
    GpuRate,
    api_equivalent_cost,
    gpu_economics,
)

AUG_2025 = datetime(2025, 8, 1, tzinfo=UTC)
M = 1_000_000


def book(*overrides: ModelPriceOverride, **discounts: str) -> PriceBook:
    return PriceBook(
        PricingConfig(models=overrides, discounts={k: Decimal(v) for k, v in discounts.items()})
    )


def test_the_articles_example_costs_exactly_eight_tenths_of_a_cent() -> None:
    q = PriceBook().quote(
        "openai", "gpt-4o-2024-05-13", TokenCounts(input_uncached=1000, output=200), AUG_2025
    )
    assert q.priced is True
    assert q.cost == Decimal("0.008")
    assert q.rates["input_uncached"] == 5
    assert q.rates["output"] == 15
    assert q.breakdown["input_uncached"] == Decimal("0.005")
    assert q.breakdown["output"] == Decimal("0.003")
    assert q.price_ref == f"genai-prices {genai_prices.__version__} openai/gpt-4o-2024-05-13"
    assert (q.provider, q.model_id) == ("openai", "gpt-4o-2024-05-13")


def test_anthropic_cache_kinds_are_priced_separately() -> None:
    q = PriceBook().quote(
        "anthropic",
        "claude-sonnet-4-20250514",
        TokenCounts(input_uncached=M, cache_read=M, cache_write_5m=M, cache_write_1h=M, output=M),
        AUG_2025,
    )
    assert q.rates["input_uncached"] == Decimal("3")
    assert q.rates["cache_read"] == Decimal("0.30")
    assert q.rates["cache_write_5m"] == Decimal("3.75")
    assert q.rates["cache_write_1h"] == Decimal("6")
    assert q.rates["output"] == Decimal("15")
    assert q.breakdown["cache_read"] == Decimal("0.3")
    assert q.breakdown["cache_write_5m"] == Decimal("3.75")
    assert q.breakdown["cache_write_1h"] == Decimal("6")
    assert q.cost == Decimal("28.05")
    assert q.provider == "anthropic"


@pytest.mark.parametrize(
    ("kind", "usd"),
    [
        ("input_uncached", "0.003"),
        ("cache_read", "0.0003"),
        ("cache_write_5m", "0.00375"),
        ("cache_write_1h", "0.006"),
        ("output", "0.015"),
    ],
)
def test_one_thousand_tokens_of_each_anthropic_kind(kind: str, usd: str) -> None:
    tokens = TokenCounts(**{kind: 1000})
    q = PriceBook().quote("anthropic", "claude-sonnet-4-20250514", tokens, AUG_2025)
    assert q.cost == Decimal(usd)


def test_web_searches_are_priced_per_thousand() -> None:
    q = PriceBook().quote(
        "anthropic", "claude-sonnet-4-20250514", TokenCounts(web_searches=3), AUG_2025
    )
    assert q.rates["web_searches"] == 10
    assert q.breakdown["web_searches"] == Decimal("0.03")
    assert q.cost == Decimal("0.03")


def _date_effective_model() -> tuple[str, str, datetime, Any, Any]:
    """A listed model whose price changed on a start date, with its prices before and after."""
    candidates = []
    for provider in get_snapshot().providers:
        for model in provider.models:
            prices = model.prices
            if not isinstance(prices, list) or len(prices) != 2:
                continue
            first, second = prices
            constraint = second.constraint
            if first.constraint is not None or not isinstance(constraint, StartDateConstraint):
                continue
            before, after = first.prices, second.prices
            if not all(
                isinstance(getattr(p, f), Decimal)
                for p in (before, after)
                for f in ("input_mtok", "output_mtok")
            ):
                continue
            if before.input_mtok == after.input_mtok and before.output_mtok == after.output_mtok:
                continue
            start = datetime.combine(constraint.start_date, datetime.min.time(), tzinfo=UTC)
            candidates.append(
                (
                    provider.id not in ("openai", "anthropic"),
                    provider.id,
                    model.id,
                    start,
                    before,
                    after,
                )
            )
    assert candidates, "genai-prices lists no date-effective model"
    candidates.sort(key=lambda c: (c[0], c[1] != "openai", c[2]))
    _, provider_id, model_id, start, before, after = candidates[0]
    return provider_id, model_id, start, before, after


def test_prices_are_date_effective() -> None:
    provider, model, start, before, after = _date_effective_model()
    tokens = TokenCounts(input_uncached=M, output=M)
    pb = PriceBook()
    q_before = pb.quote(provider, model, tokens, start - timedelta(days=1))
    q_after = pb.quote(provider, model, tokens, start + timedelta(days=1))
    assert q_before.cost == before.input_mtok + before.output_mtok
    assert q_after.cost == after.input_mtok + after.output_mtok
    assert q_before.cost != q_after.cost
    # The same book asked again, in the other order, still dates its prices.
    assert pb.quote(provider, model, tokens, start - timedelta(days=2)).cost == q_before.cost


def test_override_takes_effect_on_its_date_for_a_listed_model() -> None:
    effective = datetime(2025, 6, 1, tzinfo=UTC)
    pb = book(
        ModelPriceOverride(
            "openai",
            "gpt-4o-2024-05-13",
            input_per_mtok=Decimal("1"),
            output_per_mtok=Decimal("2"),
            effective=effective,
        )
    )
    tokens = TokenCounts(input_uncached=1000, output=200)
    before = pb.quote("openai", "gpt-4o-2024-05-13", tokens, effective - timedelta(seconds=1))
    after = pb.quote("openai", "gpt-4o-2024-05-13", tokens, effective)
    assert before.cost == Decimal("0.008")
    assert before.price_ref.startswith("genai-prices ")
    assert after.cost == Decimal("0.0014")
    assert after.price_ref == "override openai/gpt-4o-2024-05-13 from 2025-06-01"


def test_override_prices_a_custom_model_only_from_its_date() -> None:
    effective = datetime(2025, 6, 1, tzinfo=UTC)
    pb = book(
        ModelPriceOverride(
            "acme",
            "acme-llm-70b-ft",
            input_per_mtok=Decimal("2"),
            output_per_mtok=Decimal("6"),
            effective=effective,
        ),
        ModelPriceOverride(
            "acme",
            "acme-llm-70b-ft",
            input_per_mtok=Decimal("1"),
            output_per_mtok=Decimal("3"),
            cache_write_per_mtok=Decimal("1.25"),
            web_search_per_k=Decimal("5"),
            effective=effective + timedelta(days=30),
        ),
    )
    tokens = TokenCounts(
        input_uncached=M, cache_read=M, cache_write_5m=M, cache_write_1h=M, output=M
    )
    early = pb.quote("acme", "acme-llm-70b-ft", tokens, effective - timedelta(days=1))
    assert (early.priced, early.cost) == (False, None)
    first = pb.quote("acme", "acme-llm-70b-ft", tokens, effective + timedelta(days=1))
    # Cache reads and both writes default to the input price when not given.
    assert first.cost == 2 + 2 + 2 + 2 + 6
    second = pb.quote("acme", "acme-llm-70b-ft", tokens, effective + timedelta(days=31))
    # The 1-hour write defaults to the 5-minute write price.
    assert second.cost == Decimal("1") + 1 + Decimal("1.25") + Decimal("1.25") + 3
    searches = pb.quote(
        "acme", "acme-llm-70b-ft", TokenCounts(web_searches=2), effective + timedelta(days=31)
    )
    assert searches.cost == Decimal("0.01")


def test_override_for_another_provider_does_not_apply() -> None:
    pb = book(ModelPriceOverride("azure", "gpt-4o-2024-05-13", Decimal(1), Decimal(1)))
    q = pb.quote("openai", "gpt-4o-2024-05-13", TokenCounts(1000, output=200), AUG_2025)
    assert q.cost == Decimal("0.008")


def test_override_effective_mid_hour() -> None:
    effective = datetime(2025, 6, 1, 12, 30, tzinfo=UTC)
    pb = book(
        ModelPriceOverride(
            "openai", "gpt-4o-2024-05-13", Decimal(1), Decimal(2), effective=effective
        )
    )
    tokens = TokenCounts(input_uncached=1000, output=200)
    assert pb.quote(
        "openai", "gpt-4o-2024-05-13", tokens, effective - timedelta(minutes=20)
    ).cost == Decimal("0.008")
    assert pb.quote(
        "openai", "gpt-4o-2024-05-13", tokens, effective + timedelta(minutes=5)
    ).cost == Decimal("0.0014")


def test_discount_per_provider() -> None:
    pb = book(openai="0.1", anthropic="0.25")
    q = pb.quote("openai", "gpt-4o-2024-05-13", TokenCounts(1000, output=200), AUG_2025)
    assert q.cost == Decimal("0.0072")
    assert q.breakdown["input_uncached"] == Decimal("0.0045")
    assert " less 10" in q.price_ref
    only_openai = book(openai="0.1")
    a = only_openai.quote("anthropic", "claude-sonnet-4-20250514", TokenCounts(output=M), AUG_2025)
    assert a.cost == 15


def test_discount_ref_reads_as_a_whole_percentage() -> None:
    q = book(openai="0.1").quote("openai", "gpt-4o-2024-05-13", TokenCounts(1000), AUG_2025)
    assert q.price_ref.endswith(" less 10%")


def test_unknown_model_is_unpriced_never_zero() -> None:
    q = PriceBook().quote("openai", "no-such-model-xyz", TokenCounts(1000, output=10), AUG_2025)
    assert q.priced is False
    assert q.cost is None
    assert q.price_ref == "unpriced openai/no-such-model-xyz"
    unknown_provider = PriceBook().quote("acme", "acme-llm-70b-ft", TokenCounts(1), AUG_2025)
    assert (unknown_provider.priced, unknown_provider.cost) == (False, None)


@pytest.mark.parametrize(
    "bad",
    [
        {"input_uncached": -1},
        {"output": -5},
        {"web_searches": -1},
        {"cache_read": 1.5},
        {"cache_write_1h": True},
        {"output": "3"},
    ],
)
def test_token_counts_reject_negative_or_non_integer(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        TokenCounts(**bad)


def test_quote_refuses_a_naive_time() -> None:
    with pytest.raises(ValueError, match="timezone"):
        PriceBook().quote("openai", "gpt-4o", TokenCounts(1), datetime(2025, 1, 1))  # noqa: DTZ001


def test_token_counts_input_total() -> None:
    assert TokenCounts(1, 2, 3, 4, 5, 6).input_total == 10


def test_describe_names_version_overrides_and_discounts() -> None:
    effective = datetime(2025, 6, 1, tzinfo=UTC)
    pb = book(
        ModelPriceOverride("acme", "acme-llm", Decimal("1.5"), Decimal("4"), effective=effective),
        openai="0.1",
    )
    d = pb.describe()
    assert d["source"] == "genai-prices"
    assert d["version"] == genai_prices.__version__
    assert d["online_updates"] is False
    assert d["discounts"] == {"openai": "0.1"}
    assert d["overrides"] == [
        {
            "provider": "acme",
            "model": "acme-llm",
            "input_per_mtok": "1.5",
            "output_per_mtok": "4",
            "cache_read_per_mtok": None,
            "cache_write_per_mtok": None,
            "cache_write_1h_per_mtok": None,
            "web_search_per_k": None,
            "effective": "2025-06-01T00:00:00+00:00",
        }
    ]


# GPU cost model

HOUR_S = Decimal(3600)


def test_rented_gpu_costs_hours_times_rate() -> None:
    model = GpuCostModel((GpuRate("H100", Decimal("2.50")),))
    c = model.interval_cost("NVIDIA H100 80GB HBM3", HOUR_S * 2, energy_mj=10**9)
    assert c.cost == Decimal("5.00")  # power is in a rental price: energy ignored
    assert c.estimated is False
    half_minute = model.interval_cost("NVIDIA H100 80GB HBM3", Decimal(30), None)
    assert half_minute.cost == Decimal("2.50") * 30 / 3600


def test_owned_gpu_costs_capex_plus_energy_times_pue() -> None:
    rate = GpuRate(
        "A100", Decimal("1.00"), mode="owned", usd_per_kwh=Decimal("0.20"), pue=Decimal("1.5")
    )
    model = GpuCostModel((rate,))
    # 400 W for an hour: 0.4 kWh = 1.44e9 mJ; 0.4 x $0.20 x 1.5 = $0.12.
    c = model.interval_cost("NVIDIA A100-SXM4-80GB", HOUR_S, energy_mj=1_440_000_000)
    assert c.cost == Decimal("1.12")
    assert c.rate is rate
    assert model.interval_cost("NVIDIA A100-SXM4-80GB", HOUR_S, None).cost == 1


def test_first_configured_match_wins_and_match_is_case_insensitive() -> None:
    model = GpuCostModel(
        (GpuRate("h100", Decimal("2")), GpuRate("*", Decimal("0.5")), GpuRate("A100", Decimal(9)))
    )
    assert model.rate_for("NVIDIA H100 PCIe") == (model.rates[0], False)
    assert model.rate_for("NVIDIA A100") == (model.rates[1], False)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("NVIDIA H200", "H200"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L4", "L4"),
        ("Tesla T4", "T4"),
        ("Some Future GPU", "*"),
    ],
)
def test_defaults_are_marked_estimated(name: str, match: str) -> None:
    model = GpuCostModel()
    rate, estimated = model.rate_for(name)
    assert estimated is True
    assert rate.match == match
    assert rate in DEFAULT_RATES
    assert rate.source.startswith("default")
    c = model.interval_cost(name, HOUR_S * 3, None)
    assert c.cost == rate.usd_per_hour * 3
    assert c.estimated is True


def test_gpu_economics_unknown_when_nothing_served() -> None:
    e = gpu_economics(
        gpu_cost=Decimal("3"),
        idle_cost=Decimal("3"),
        inferences=0,
        prompt_tokens=0,
        generation_tokens=0,
    )
    assert e.cost_per_inference is None
    assert e.cost_per_mtok is None
    assert e.idle_share == 1
    e = gpu_economics(
        gpu_cost=Decimal("3"),
        idle_cost=Decimal("1"),
        inferences=100,
        prompt_tokens=800_000,
        generation_tokens=200_000,
    )
    assert e.cost_per_inference == Decimal("0.03")
    assert e.active_cost_per_inference == Decimal("0.02")
    assert e.cost_per_mtok == Decimal("3")
    assert api_equivalent_cost(
        prompt_tokens=M,
        generation_tokens=M,
        input_per_mtok=Decimal("0.15"),
        output_per_mtok=Decimal("0.60"),
    ) == Decimal("0.75")
    assert (
        api_equivalent_cost(
            prompt_tokens=1, generation_tokens=0, input_per_mtok=None, output_per_mtok=Decimal(1)
        )
        is None
    )


def test_quotes_resolved_once_a_minute_are_the_quotes_resolved_each_time() -> None:
    """The book keeps what it resolved for a minute (every price boundary is a whole minute:
    DeepSeek's off-peak hours start at 16:30 UTC); each quote equals one resolved afresh."""
    cached = book(
        ModelPriceOverride("", "acme-1", Decimal(1), Decimal(2), effective=AUG_2025 + timedelta(1))
    )
    afresh = book(
        ModelPriceOverride("", "acme-1", Decimal(1), Decimal(2), effective=AUG_2025 + timedelta(1))
    )
    afresh._config_minutely = False  # resolves every quote
    assert cached._config_minutely
    edges = [
        datetime(2025, 9, 1, 16, 30, tzinfo=UTC),
        datetime(2025, 9, 2, 0, 30, tzinfo=UTC),
        AUG_2025 + timedelta(1),
        datetime(2025, 9, 29, tzinfo=UTC),
    ]
    times = [e + timedelta(microseconds=d) for e in edges for d in (-1, 0, 1, 59_999_999)]
    models = [
        ("deepseek", "deepseek-chat"),
        ("anthropic", "claude-sonnet-4-5"),
        ("google", "gemini-2.5-pro"),
        ("openai", "gpt-4o-mini"),
        ("", "acme-1"),
        ("openai", "no-such-model"),
    ]
    tiers = [
        PriceTier(),
        PriceTier("priority"),
        PriceTier(batch=True),
        PriceTier("flex"),
        PriceTier("scale"),
        PriceTier(context_window="0-200k"),
        PriceTier(context_window="200k-1M"),
        *(PriceTier("default", request_input=n) for n in (1, 200_000, 200_001, 900_000)),
    ]
    tokens = TokenCounts(1_000, 200, 30, 40, 500, 1)
    for _ in range(2):  # the second pass is served from the cache
        for provider, model in models:
            for at in times:
                for tier in tiers:
                    expected = afresh.quote(provider, model, tokens, at, tier)
                    assert cached.quote(provider, model, tokens, at, tier) == expected
    # Across 16:30 the off-peak price starts, in the same book.
    before, after = (
        cached.quote("deepseek", "deepseek-chat", tokens, t, PriceTier())
        for t in (edges[0] - timedelta(microseconds=1), edges[0])
    )
    assert before.cost != after.cost


def test_a_price_boundary_inside_a_minute_is_never_cached() -> None:
    from types import SimpleNamespace

    from tokentop.pricing.book import _model_minutely

    def model(start: time) -> Any:
        constraint = SimpleNamespace(start_time=start, end_time=time(16, 30, tzinfo=UTC))
        info = SimpleNamespace(prices=[SimpleNamespace(constraint=constraint)], price_variants=())
        return (None, info)

    assert _model_minutely(model(time(0, 30, tzinfo=UTC)))
    assert not _model_minutely(model(time(0, 30, 15, tzinfo=UTC)))
    shifted = book(
        ModelPriceOverride(
            "", "acme-1", Decimal(1), Decimal(2), effective=AUG_2025 + timedelta(0, 1)
        )
    )
    assert not shifted._is_minutely("", "acme-1")
