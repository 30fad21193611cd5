"""The ``[pricing]`` settings: price overrides, discounts and tier rules.

The config parser builds these for every command, ``tokentop status`` included, so they live
apart from the price book (:mod:`tokentop.pricing.book`, which re-exports them) and its data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

STANDARD_TIERS = frozenset({"", "default", "standard", "standard_only"})
"""Service tier names that mean list price (OpenAI ``default``, Anthropic ``standard``)."""


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
class TierRule:
    """A service tier priced as a share of list prices, in force from ``effective``.

    Token kinds are scaled; web searches stay at list. The latest rule in force wins; a rule
    naming a provider wins over one for every provider of the same date.
    """

    tier: str
    """The tier it prices: ``batch``, or a ``service_tier`` value such as ``flex``."""
    share_of_list: Decimal
    """Multiplier on list prices: ``0.5`` is half of list (the Batch API's 50 % off)."""
    provider: str = ""
    """``""``: every provider."""
    effective: datetime = EPOCH
    source: str = "config"
    """``built-in`` or ``config``: a config rule wins over genai-prices' own tier prices."""


@dataclass(frozen=True, slots=True)
class PricingConfig:
    """Price overrides and discounts (the ``[pricing]`` section of the config file)."""

    models: tuple[ModelPriceOverride, ...] = ()
    """Custom models, or replacements for listed ones, each with an effective date."""
    discounts: dict[str, Decimal] = field(default_factory=dict)
    """Per-provider discount as a fraction (``0.1`` is 10 % off list prices)."""
    tiers: tuple[TierRule, ...] = ()
    """Tier rules (``[[pricing.tier]]``); they win over genai-prices and the built-in rules."""
