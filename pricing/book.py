"""The price book: genai-prices' date-effective data plus the user's overrides and discounts.

A model that neither knows is *unpriced*: :class:`Quote.priced` is False and its cost is
``None``, never zero. Online price updates from genai-prices stay off; the bundled data is used.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import genai_prices
from genai_prices import Usage
from genai_prices.data_snapshot import get_snapshot

_MISSING = object()
MILLION = Decimal(1_000_000)
THOUSAND = Decimal(1_000)


@dataclass(frozen=True, slots=True)
class ModelPriceOverride:
    """A user's price for a model, per million tokens, in force from ``effective``."""

    provider: str
    model: str
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cache_read_per_mtok: Decimal | None = None
    """Defaults to the input price when not given."""
    cache_write_per_mtok: Decimal | None = None
    """5-minute cache writes; defaults to the input price."""
    cache_write_1h_per_mtok: Decimal | None = None
    """1-hour cache writes; defaults to the 5-minute write price."""
    web_search_per_k: Decimal | None = None
    """Per thousand web searches; defaults to zero."""
    effective: datetime = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class PricingConfig:
    """Price overrides and discounts (the ``[pricing]`` section of the config file)."""

    models: tuple[ModelPriceOverride, ...] = ()
    """Custom models, or replacements for listed ones, each with an effective date."""
    discounts: dict[str, Decimal] = field(default_factory=dict)
    """Per-provider discount as a fraction (``0.1`` is 10 % off list prices)."""


@dataclass(frozen=True, slots=True)
class TokenCounts:
    """Tokens of one usage record by the kinds priced separately."""

    input_uncached: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    output: int = 0
    web_searches: int = 0

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative whole number, got {value!r}")

    @property
    def input_total(self) -> int:
        """All input tokens."""
        return self.input_uncached + self.cache_read + self.cache_write_5m + self.cache_write_1h


@dataclass(frozen=True, slots=True)
class Quote:
    """The price of some usage, and where it came from."""

    priced: bool
    cost: Decimal | None
    """Exact USD; ``None`` when unpriced."""
    price_ref: str
    """Which data produced it, e.g. ``genai-prices 0.2.3 openai/gpt-4o-2024-05-13``."""
    provider: str = ""
    model_id: str = ""
    rates: dict[str, Decimal] = field(default_factory=dict)
    """USD per million tokens (per thousand for ``web_searches``) by kind."""
    breakdown: dict[str, Decimal] = field(default_factory=dict)
    """USD by kind."""


class PriceBook:
    """Prices usage with date-effective prices. Thread-safe; lookups are cached.

    Args:
        config: overrides and discounts from the config file.
    """

    def __init__(self, config: PricingConfig | None = None) -> None:
        self.config = config or PricingConfig()
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], Any] = {}
        self._rates: dict[int, tuple[Any, dict[str, Decimal] | None]] = {}

    def describe(self) -> dict[str, Any]:
        """Which price data and overrides produce the figures (for reports and exports)."""
        snapshot = get_snapshot()
        return {
            "source": "genai-prices",
            "version": genai_prices.__version__,
            "online_updates": bool(snapshot.from_auto_update),
            "overrides": [
                {
                    "provider": o.provider,
                    "model": o.model,
                    "input_per_mtok": str(o.input_per_mtok),
                    "output_per_mtok": str(o.output_per_mtok),
                    "cache_read_per_mtok": _opt(o.cache_read_per_mtok),
                    "cache_write_per_mtok": _opt(o.cache_write_per_mtok),
                    "cache_write_1h_per_mtok": _opt(o.cache_write_1h_per_mtok),
                    "web_search_per_k": _opt(o.web_search_per_k),
                    "effective": o.effective.isoformat(),
                }
                for o in self.config.models
            ],
            "discounts": {k: str(v) for k, v in sorted(self.config.discounts.items())},
        }

    def quote(self, provider: str, model: str, tokens: TokenCounts, at: datetime) -> Quote:
        """Price ``tokens`` of ``model`` at the prices in force at ``at``."""
        if at.tzinfo is None:
            raise ValueError("price time must be timezone-aware")
        resolved = self._resolve(provider, model, at)
        if resolved is None:
            return Quote(priced=False, cost=None, price_ref=f"unpriced {provider}/{model}")
        rates, ref, found_provider, model_id = resolved
        counts = {
            "input_uncached": tokens.input_uncached,
            "cache_read": tokens.cache_read,
            "cache_write_5m": tokens.cache_write_5m,
            "cache_write_1h": tokens.cache_write_1h,
            "output": tokens.output,
        }
        breakdown = {kind: rates[kind] * count / MILLION for kind, count in counts.items()}
        breakdown["web_searches"] = rates["web_searches"] * tokens.web_searches / THOUSAND
        total = sum(breakdown.values(), Decimal(0))
        discount = self.config.discounts.get(found_provider) or self.config.discounts.get(provider)
        if discount:
            total = total * (1 - discount)
            breakdown = {k: v * (1 - discount) for k, v in breakdown.items()}
            ref += f" less {(discount * 100).normalize():f}%"
        return Quote(
            priced=True,
            cost=total,
            price_ref=ref,
            provider=found_provider,
            model_id=model_id,
            rates=rates,
            breakdown=breakdown,
        )

    def _resolve(
        self, provider: str, model: str, at: datetime
    ) -> tuple[dict[str, Decimal], str, str, str] | None:
        override = self._override(provider, model, at)
        if override is not None:
            return override
        return self._listed(provider, model, at)

    def _override(
        self, provider: str, model: str, at: datetime
    ) -> tuple[dict[str, Decimal], str, str, str] | None:
        best: ModelPriceOverride | None = None
        for o in self.config.models:
            if o.model != model or (o.provider and provider and o.provider != provider):
                continue
            if o.effective <= at and (best is None or o.effective > best.effective):
                best = o
        if best is None:
            return None
        write_5m = (
            best.cache_write_per_mtok
            if best.cache_write_per_mtok is not None
            else (best.input_per_mtok)
        )
        rates = {
            "input_uncached": best.input_per_mtok,
            "cache_read": best.cache_read_per_mtok
            if best.cache_read_per_mtok is not None
            else best.input_per_mtok,
            "cache_write_5m": write_5m,
            "cache_write_1h": best.cache_write_1h_per_mtok
            if best.cache_write_1h_per_mtok is not None
            else write_5m,
            "output": best.output_per_mtok,
            "web_searches": best.web_search_per_k or Decimal(0),
        }
        ref = f"override {best.provider or '*'}/{best.model} from {best.effective.date()}"
        return rates, ref, best.provider or provider, best.model

    def _listed(
        self, provider: str, model: str, at: datetime
    ) -> tuple[dict[str, Decimal], str, str, str] | None:
        # The model lookup is cached; the price in force is chosen per quote (prices can change
        # at any date or, for some models, time of day), and the rates of each price object are
        # computed once.
        key = (provider, model)
        with self._lock:
            found = self._models.get(key, _MISSING)
        if found is _MISSING:
            try:
                found = get_snapshot().find_provider_model(model, None, provider or None, None)
            except LookupError:
                found = None
            with self._lock:
                self._models[key] = found
        if found is None:
            return None
        found_provider, info = found
        prices = info.get_prices(at)
        with self._lock:
            cached = self._rates.get(id(prices))
        if cached is not None and cached[0] is prices:
            rates = cached[1]
        else:
            rates = _rates_from_genai(prices)
            with self._lock:
                self._rates[id(prices)] = (prices, rates)
        if rates is None:
            return None
        ref = f"genai-prices {genai_prices.__version__} {found_provider.id}/{info.id}"
        return rates, ref, found_provider.id, info.id


def _rates_from_genai(prices: Any) -> dict[str, Decimal] | None:
    """Per-kind rates from a genai-prices ModelPrice, by pricing one unit of each kind.

    Pricing a unit through the library (rather than reading attributes) keeps its rules for
    defaults, such as cache writes priced at the input price where no write price is listed.
    """
    # Small probes stay under the thresholds of tiered (long-context) prices, which apply per
    # request and so cannot be told from an aggregated bucket; the base tier is used.
    probes: dict[str, dict[str, int]] = {
        "input_uncached": {"input_tokens": 1_000},
        "cache_read": {"input_tokens": 1_000, "cache_read_tokens": 1_000},
        "cache_write_5m": {"input_tokens": 1_000, "cache_write_tokens": 1_000},
        "cache_write_1h": {
            "input_tokens": 1_000,
            "cache_write_tokens": 1_000,
            "cache_write_1h_tokens": 1_000,
        },
        "output": {"output_tokens": 1_000},
        "web_searches": {"web_searches": 1},
    }
    rates: dict[str, Decimal] = {}
    for kind, usage in probes.items():
        try:
            rates[kind] = Decimal(prices.calc_price(Usage(**usage))["total_price"]) * THOUSAND
        except (ValueError, KeyError, TypeError, ArithmeticError):
            if kind in ("input_uncached", "output"):
                return None
            rates[kind] = rates.get("input_uncached", Decimal(0))
    return rates


def _opt(value: Decimal | None) -> str | None:
    return None if value is None else str(value)
