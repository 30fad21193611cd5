"""The price book: genai-prices' date-effective data plus the user's overrides and discounts.

A model that neither knows is *unpriced*: :class:`Quote.priced` is False and its cost is
``None``, never zero. Online price updates from genai-prices stay off; the bundled data is used.

Tiers are prices. Usage served at a tier (:class:`PriceTier`: batch, priority, flex, a long
context) is priced, in this order, by:

1. a tier rule of the config file in force at the time (``[[pricing.tier]]``: a share of list);
2. genai-prices' own variant of the model for that tier, where it lists one in force then
   (``price_context`` ``{"service_tier": "priority"}``, ``{"processing": "batch"}``);
3. a built-in rule: the providers' published batch discounts (:data:`BUILTIN_TIER_RULES`);
4. otherwise list price, and the quote is *flagged* (:attr:`Quote.flag`), never dropped.

Long-context rates (genai-prices' tiered prices) are chosen by the request size: exactly for a
metered request, by the lower bound of a bucket's ``context_window`` (``200k-1M``) otherwise.
The price reference says which rule priced the figure.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

from tokentop.pricing.config import EPOCH as EPOCH
from tokentop.pricing.config import STANDARD_TIERS as STANDARD_TIERS
from tokentop.pricing.config import ModelPriceOverride as ModelPriceOverride
from tokentop.pricing.config import PricingConfig as PricingConfig
from tokentop.pricing.config import TierRule as TierRule

if TYPE_CHECKING:
    import genai_prices
    from genai_prices import Usage
    from genai_prices.data_snapshot import get_snapshot
    from genai_prices.types import TieredPrices


def _import_genai_prices() -> None:
    """Import genai-prices and its price data on the first :class:`PriceBook`, not with this
    module: commands that price nothing (``tokentop status`` in a status bar) start without it."""
    global genai_prices, Usage, get_snapshot, TieredPrices
    import genai_prices
    from genai_prices import Usage
    from genai_prices.data_snapshot import get_snapshot
    from genai_prices.types import TieredPrices


_MISSING = object()
_MINUTE = timedelta(minutes=1)
_RESOLVED_MAX = 4096
"""Resolved quotes kept (a few per model, tier and size class, for the minutes in use)."""
MILLION = Decimal(1_000_000)
THOUSAND = Decimal(1_000)

FLAG_MARK = "[flagged: "
"""Starts the part of a price reference saying why its figure may be off (e.g. an unknown tier
priced at list). ``store/report.py`` finds flagged references by the same text."""
_TIER_NAME_MAX = 40
_CONTEXT_WINDOW = re.compile(
    r"^\s*(\d+(?:\.\d+)?)\s*([km]?)\s*-\s*(\d+(?:\.\d+)?)\s*([km]?)\s*$", re.I
)
_SCALE = {"": 1, "k": 1_000, "m": 1_000_000}


BUILTIN_TIER_RULES: tuple[TierRule, ...] = (
    TierRule("batch", Decimal("0.5"), "openai", datetime(2024, 4, 15, tzinfo=UTC), "built-in"),
    TierRule("batch", Decimal("0.5"), "anthropic", datetime(2024, 10, 8, tzinfo=UTC), "built-in"),
)
"""The providers' published batch rules, used where genai-prices has no batch price: OpenAI's
Batch API (launched 2024-04-15) and Anthropic's Message Batches (2024-10-08), 50 % of list."""


@dataclass(frozen=True, slots=True)
class PriceTier:
    """How some usage was served, where that changes its price.

    Buckets carry it as dimensions (OpenAI ``batch`` and ``service_tier``; Anthropic
    ``service_tier``, where ``batch`` means Message Batches, and ``context_window``); a metered
    request carries its response's ``service_tier`` and its own input size.
    """

    service_tier: str = ""
    batch: bool = False
    context_window: str = ""
    """A bucket's range of request input sizes, e.g. ``0-200k`` or ``200k-1M`` (Anthropic)."""
    request_input: int = 0
    """Input tokens of the one request priced (the meter): picks long-context rates exactly."""

    @property
    def name(self) -> str:
        """The tier priced: ``batch``, ``priority``, ``flex``, ...; ``""`` for standard."""
        tier = self.service_tier.strip().lower()
        if self.batch or tier == "batch":
            return "batch"
        return "" if tier in STANDARD_TIERS else tier[:_TIER_NAME_MAX]


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
    tier: str = ""
    """The tier priced (:attr:`PriceTier.name`); ``""`` for standard."""
    rule: str = ""
    """How the tier or context was priced, e.g. ``priority`` (genai-prices' variant) or
    ``batch 50% of list (built-in rule from 2024-04-15)``; ``""`` at list price."""
    flag: str = ""
    """Why the figure may be off, e.g. ``unknown tier 'scale': list price``; ``""`` if none."""
    tier_source: str = ""
    """What priced the tier: ``config``, ``genai-prices``, ``built-in`` or (flagged) ``list``;
    ``""`` for standard."""


@dataclass(frozen=True, slots=True)
class _Priced:
    """Rates found for a quote, with what the price reference should say about them."""

    rates: dict[str, Decimal]
    ref: str
    provider: str
    model_id: str
    rule: str = ""
    flag: str = ""
    tier_source: str = ""


class PriceBook:
    """Prices usage with date-effective prices. Thread-safe; lookups are cached.

    Args:
        config: overrides, discounts and tier rules from the config file.
    """

    def __init__(self, config: PricingConfig | None = None) -> None:
        _import_genai_prices()
        self.config = config or PricingConfig()
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], Any] = {}
        # Keyed on the ids of the price objects (a model's standard price and the tier
        # variants merged into it) and the probe size (long context); the objects are kept
        # beside the rates so that a reused id is never mistaken for a hit.
        self._rates: dict[
            tuple[int, tuple[int, ...], int], tuple[tuple[Any, ...], dict[str, Decimal] | None]
        ] = {}
        # Resolved prices per (provider, model, tier, whether sized, minute), then per size class
        # and context window: every date or time a price depends on falls on a whole minute
        # (checked, per model), so one minute's quotes all resolve alike. A model with a
        # boundary inside a minute is never cached.
        self._resolved: dict[
            tuple[str, str, str, bool, int], tuple[tuple[int, ...], dict[tuple[int, str], Any]]
        ] = {}
        self._minutely: dict[tuple[str, str], bool] = {}
        self._config_minutely = all(
            _on_minute(when)
            for when in (
                *(o.effective for o in self.config.models),
                *(r.effective for r in (*self.config.tiers, *BUILTIN_TIER_RULES)),
            )
        )

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
            "tier_rules": [
                {
                    "tier": r.tier,
                    "provider": r.provider or "*",
                    "share_of_list": str(r.share_of_list),
                    "effective": r.effective.isoformat(),
                    "source": r.source,
                }
                for r in (*self.config.tiers, *BUILTIN_TIER_RULES)
            ],
        }

    def quote(
        self,
        provider: str,
        model: str,
        tokens: TokenCounts,
        at: datetime,
        tier: PriceTier | None = None,
    ) -> Quote:
        """Price ``tokens`` of ``model`` at the prices in force at ``at``, served at ``tier``."""
        if at.tzinfo is None:
            raise ValueError("price time must be timezone-aware")
        tier = tier or PriceTier()
        resolved = self._resolve(provider, model, at, tier)
        if resolved is None:
            return Quote(
                priced=False, cost=None, price_ref=f"unpriced {provider}/{model}", tier=tier.name
            )
        rates = resolved.rates
        ref = f"{resolved.ref} {resolved.rule}" if resolved.rule else resolved.ref
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
        discount = self.config.discounts.get(resolved.provider) or self.config.discounts.get(
            provider
        )
        if discount:
            total = total * (1 - discount)
            breakdown = {k: v * (1 - discount) for k, v in breakdown.items()}
            ref += f" less {_percent(discount)}"
        if resolved.flag:
            ref += f" {FLAG_MARK}{resolved.flag}]"
        return Quote(
            priced=True,
            cost=total,
            price_ref=ref,
            provider=resolved.provider,
            model_id=resolved.model_id,
            rates=rates,
            breakdown=breakdown,
            tier=tier.name,
            rule=resolved.rule,
            flag=resolved.flag,
            tier_source=resolved.tier_source,
        )

    def _resolve(self, provider: str, model: str, at: datetime, tier: PriceTier) -> _Priced | None:
        if not self._is_minutely(provider, model):
            return self._resolve_at(provider, model, at, tier)[0]
        name = tier.name
        sized = tier.request_input > 0 or bool(tier.context_window.strip())
        key = (provider, model, name, sized, (at - EPOCH) // _MINUTE)
        with self._lock:
            entry = self._resolved.get(key)
        if entry is not None:
            size = _context_size(tier, entry[0])[0]
            label = "" if tier.request_input > 0 else tier.context_window
            found = entry[1].get((size, label), _MISSING)
            if found is not _MISSING:
                return cast("_Priced | None", found)
        priced, starts = self._resolve_at(provider, model, at, tier)
        size = _context_size(tier, starts)[0]
        label = "" if tier.request_input > 0 else tier.context_window
        with self._lock:
            if entry is None:
                if len(self._resolved) >= _RESOLVED_MAX:
                    self._resolved.clear()
                entry = self._resolved.setdefault(key, (starts, {}))
            entry[1][(size, label)] = priced
        return priced

    def _is_minutely(self, provider: str, model: str) -> bool:
        """Whether every date and time the prices of ``model`` depend on is a whole minute."""
        key = (provider, model)
        ok = self._minutely.get(key)
        if ok is None:
            ok = self._config_minutely and _model_minutely(self._find(provider, model))
            with self._lock:
                self._minutely[key] = ok
        return ok

    def _resolve_at(
        self, provider: str, model: str, at: datetime, tier: PriceTier
    ) -> tuple[_Priced | None, tuple[int, ...]]:
        """The rates for a quote, and the long-context thresholds that chose among them."""
        override = self._override(provider, model, at)
        found: Any = None
        standard: Any = None
        if override is not None:
            list_rates, ref, found_provider, model_id = override
        else:
            found = self._find(provider, model)
            if found is None:
                return None, ()
            found_provider, model_id = found[0].id, found[1].id
            ref = f"genai-prices {genai_prices.__version__} {found_provider}/{model_id}"
            standard = found[1].get_prices(at)
        name = tier.name
        context = _price_context(name)
        variants = _variants(found, context, at) if name and found is not None else ()
        sized = tier.request_input > 0 or bool(tier.context_window.strip())
        starts = _tier_starts(standard, *(v.prices for v in variants)) if sized else ()
        size, context_rule, flags = _context_size(tier, starts)
        if standard is not None:
            listed = self._rates_of(found[1], at, context, standard, (), size)
            if listed is None:
                return None, starts
            list_rates = listed
        rates, rule, source = list_rates, "", ""
        if name:
            providers = {provider, found_provider}
            configured = _rule_in_force(self.config.tiers, name, providers, at)
            tier_rates = (
                None
                if configured is not None or not variants
                else self._rates_of(found[1], at, context, standard, variants, size)
            )
            built_in = _rule_in_force(BUILTIN_TIER_RULES, name, providers, at)
            if configured is not None:
                rates, rule = _scaled(list_rates, configured), _rule_text(configured)
                source = configured.source
            elif tier_rates is not None:
                rates, rule, source = tier_rates, name, "genai-prices"
            elif built_in is not None:
                rates, rule = _scaled(list_rates, built_in), _rule_text(built_in)
                source = built_in.source
            else:
                source = "list"
                later = [
                    r.effective
                    for r in (*self.config.tiers, *BUILTIN_TIER_RULES)
                    if r.tier == name and (not r.provider or r.provider in providers)
                ]
                later += [
                    _constraint_start(v.constraint)
                    for v in _variants(found, context, None)
                    if found is not None
                ]
                since = min((d for d in later if d > at), default=None)
                when = f" before {since.date()}" if since is not None else ""
                flags.insert(0, f"tier {name!r} unknown{when}: list price")
        rule = ", ".join(part for part in (rule, context_rule) if part)
        priced = _Priced(rates, ref, found_provider, model_id, rule, "; ".join(flags), source)
        return priced, starts

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

    def _find(self, provider: str, model: str) -> Any:
        """genai-prices' (provider, model info) for a model name, or ``None`` (cached)."""
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
        return found

    def _rates_of(
        self,
        info: Any,
        at: datetime,
        context: dict[str, str],
        standard: Any,
        variants: tuple[Any, ...],
        size: int,
    ) -> dict[str, Decimal] | None:
        # The price in force is chosen per quote (prices can change at any date or, for some
        # models, time of day); the rates of each price object, tier variants and request size
        # are computed once.
        key = (id(standard), tuple(id(v) for v in variants), size)
        objects = (standard, *variants)
        with self._lock:
            cached = self._rates.get(key)
        if cached is not None and all(a is b for a, b in zip(cached[0], objects, strict=True)):
            return cached[1]
        prices = info.get_prices(at, context) if variants else standard
        rates = _rates_from_genai(prices, size)
        with self._lock:
            self._rates[key] = (objects, rates)
        return rates


def _on_minute(when: datetime) -> bool:
    return when.second == 0 and when.microsecond == 0 and _whole_minutes(when.utcoffset())


def _whole_minutes(offset: timedelta | None) -> bool:
    return offset is None or offset % _MINUTE == timedelta(0)


def _model_minutely(found: Any) -> bool:
    """Whether the constraints of genai-prices' prices for a model (``(provider, info)`` or
    ``None``) start and end on whole minutes: dates do; a time of day may not."""
    if found is None:
        return True
    info = found[1]
    prices = info.prices if isinstance(info.prices, list) else []
    for item in (*prices, *(info.price_variants or ())):
        constraint = getattr(item, "constraint", None)
        if constraint is None:
            continue
        start = getattr(constraint, "start_date", None)
        if start is not None:  # a UTC date (its midnight), or a time
            if isinstance(start, datetime) and not _on_minute(start):
                return False
            continue
        times = (getattr(constraint, "start_time", None), getattr(constraint, "end_time", None))
        if not all(
            isinstance(t, time)
            and t.second == 0
            and t.microsecond == 0
            and _whole_minutes(t.utcoffset())
            for t in times
        ):
            return False
    return True


def _percent(fraction: Decimal) -> str:
    return f"{(fraction * 100).normalize():f}%"


def _price_context(tier: str) -> dict[str, str]:
    """genai-prices' ``price_context`` for a tier (its batch variants are ``processing``)."""
    if not tier:
        return {}
    return {"processing": "batch"} if tier == "batch" else {"service_tier": tier}


def _variants(found: Any, context: dict[str, str], at: datetime | None) -> tuple[Any, ...]:
    """genai-prices' variants of a model that ``context`` selects, in force at ``at`` (any
    time when ``None``), and that change some price."""
    if found is None or not context:
        return ()
    provider, info = found
    # As genai-prices does: a model found through another provider takes no variants.
    if not any(info is m for m in provider.models):
        return ()
    return tuple(
        v
        for v in info.price_variants or ()
        if (at is None or v.constraint is None or v.constraint.active(at))
        and all(context.get(k) == value for k, value in v.when.items())
        and any(p is not None for p in vars(v.prices).values())
    )


def _constraint_start(constraint: Any) -> datetime:
    start = getattr(constraint, "start_date", None)
    if start is None:
        return EPOCH
    return datetime(start.year, start.month, start.day, tzinfo=UTC)


def _tier_starts(*prices: Any) -> tuple[int, ...]:
    """Input-size thresholds of the tiered (long-context) prices among ``prices``."""
    starts: set[int] = set()
    for p in prices:
        if p is None:
            continue
        for value in vars(p).values():
            if isinstance(value, TieredPrices):
                starts.update(t.start for t in value.tiers)
    return tuple(sorted(starts))


def _short(tokens: int) -> str:
    if tokens and tokens % 1_000_000 == 0:
        return f"{tokens // 1_000_000}M"
    if tokens and tokens % 1_000 == 0:
        return f"{tokens // 1_000}k"
    return f"{tokens:,}"


def _context_size(tier: PriceTier, starts: tuple[int, ...]) -> tuple[int, str, list[str]]:
    """The probe size that selects the right tiered rates, a note saying so, and flags.

    A tiered price applies to the whole request once its input is over a threshold. A metered
    request's size is known; a bucket's ``context_window`` gives a range, priced at its lower
    end (flagged when a threshold falls inside it). Sizes are reduced to one above the highest
    threshold passed, so that the rate cache holds a few entries per model.
    """
    flags: list[str] = []
    if tier.request_input > 0:
        size = tier.request_input
    elif tier.context_window.strip():
        label = tier.context_window.strip()[:_TIER_NAME_MAX]
        match = _CONTEXT_WINDOW.match(label)
        if match is None:
            return 0, "", [f"context window {label!r} unknown: base rates"]
        lo = int(Decimal(match[1]) * _SCALE[match[2].lower()])
        hi = int(Decimal(match[3]) * _SCALE[match[4].lower()])
        size = lo + 1 if lo > 0 else 0
        inside = [s for s in starts if lo < s < hi]
        if inside:
            flags.append(
                f"context window {label} spans the {_short(inside[0])} price threshold:"
                f" priced at {'base' if lo == 0 else _short(lo) + '+'} rates"
            )
        if lo > 0 and not any(s <= lo for s in starts):
            flags.append(f"no long-context rates listed for context window {label}: base rates")
    else:
        return 0, "", flags
    passed = [s for s in starts if size > s]
    if not passed:
        return 0, "", flags
    return passed[-1] + 1, f"long-context rates (input over {_short(passed[-1])})", flags


def _rule_in_force(
    rules: tuple[TierRule, ...], tier: str, providers: set[str], at: datetime
) -> TierRule | None:
    best: TierRule | None = None
    for r in rules:
        if r.tier != tier or (r.provider and r.provider not in providers) or r.effective > at:
            continue
        if best is None or (r.effective, bool(r.provider)) > (best.effective, bool(best.provider)):
            best = r
    return best


def _scaled(rates: dict[str, Decimal], rule: TierRule) -> dict[str, Decimal]:
    return {k: v if k == "web_searches" else v * rule.share_of_list for k, v in rates.items()}


def _rule_text(rule: TierRule) -> str:
    return (
        f"{rule.tier} {_percent(rule.share_of_list)} of list"
        f" ({rule.source} rule from {rule.effective.date()})"
    )


def _rates_from_genai(prices: Any, size: int = 0) -> dict[str, Decimal] | None:
    """Per-kind rates from a genai-prices ModelPrice, by pricing probes of each kind.

    Pricing probes through the library (rather than reading attributes) keeps its rules for
    defaults, such as cache writes priced at the input price where no write price is listed.
    Tiered (long-context) prices apply by the whole request's input: probes of ``size`` input
    tokens select the tier of such a request; ``0`` probes small requests (the base tier).
    """
    n = size or 1_000
    probes: dict[str, dict[str, int]] = {
        "input_uncached": {"input_tokens": n},
        "cache_read": {"input_tokens": n, "cache_read_tokens": n},
        "cache_write_5m": {"input_tokens": n, "cache_write_tokens": n},
        "cache_write_1h": {
            "input_tokens": n,
            "cache_write_tokens": n,
            "cache_write_1h_tokens": n,
        },
        # Output's tier follows the request's input too: at a long-context size, its own
        # share of the probe is read.
        "output": {"input_tokens": size, "output_tokens": n},
        "web_searches": {"web_searches": 1},
    }
    rates: dict[str, Decimal] = {}
    for kind, usage in probes.items():
        try:
            price = prices.calc_price(Usage(**usage))
            if kind == "web_searches":
                rates[kind] = Decimal(price["total_price"]) * THOUSAND
            else:
                share = price["output_price" if kind == "output" and size else "total_price"]
                rates[kind] = Decimal(share) * MILLION / n
        except (ValueError, KeyError, TypeError, ArithmeticError):
            if kind in ("input_uncached", "output"):
                return None
            rates[kind] = rates.get("input_uncached", Decimal(0))
    return rates


def _opt(value: Decimal | None) -> str | None:
    return None if value is None else str(value)
