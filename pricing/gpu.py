"""GPU cost model: what an interval of GPU time costs, rented or owned, and what it buys.

Rented: hours x $/GPU-hour (power is in the price). Owned: hours x amortised capex/hour plus
energy (kWh) x $/kWh x PUE. Devices no configured rate matches fall back to labelled defaults and
their figures are marked as estimates.

The second half turns window totals (GPU cost, idle cost, inferences, tokens) into unit costs:
$/inference, $/1M tokens and the API-equivalent cost of the same tokens. Every figure whose
denominator is zero is ``None`` (unknown), never ``0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

SECONDS_PER_HOUR = Decimal(3600)
MJ_PER_KWH = Decimal(3_600_000_000)
MILLION = Decimal(1_000_000)

_NOTES = "research notes 2026-11"


@dataclass(frozen=True, slots=True)
class GpuRate:
    """How one kind of GPU is costed (``[[gpu]]`` tables in the config; first match wins)."""

    match: str = "*"
    """Substring of the NVML device name (case-insensitive), or ``*``."""
    usd_per_hour: Decimal = Decimal(0)
    """Per GPU: the rental price, or the amortised capex per hour when owned."""
    mode: str = "rented"
    """``rented`` (power included) or ``owned`` (plus energy at ``usd_per_kwh`` x ``pue``)."""
    usd_per_kwh: Decimal = Decimal("0.10")
    """Owned only: electricity price."""
    pue: Decimal = Decimal("1.5")
    """Owned only: data-centre power usage effectiveness."""
    source: str = "config"
    """Where the rate comes from (the config file, or a default's source and date)."""

    def describe(self) -> dict[str, str]:
        """The rate as a report records it: every figure as exact text."""
        return {
            "match": self.match,
            "usd_per_hour": str(self.usd_per_hour),
            "mode": self.mode,
            "usd_per_kwh": str(self.usd_per_kwh),
            "pue": str(self.pue),
        }


# On-demand US prices per GPU-hour, "neocloud" column of the suggested defaults in the research
# notes (section 4). Public GPU prices contradict each other; these are starting points to
# override, and every figure made with them is labelled an estimate. Order matters: matching is by
# substring, so "A100" must precede "A10", "L40S" precede "L40" and "L4".
DEFAULT_RATES: tuple[GpuRate, ...] = (
    GpuRate(
        "H200",
        Decimal("3.80"),
        source=f"default: H200 neocloud on-demand (RunPod ~$3.59, unconfirmed), {_NOTES}",
    ),
    GpuRate(
        "H100",
        Decimal("2.99"),
        source=f"default: H100 SXM neocloud on-demand (Lambda 8x $2.99, 2025-26), {_NOTES}",
    ),
    GpuRate(
        "A100",
        Decimal("1.50"),
        source=f"default: A100 80GB neocloud on-demand (RunPod PCIe $1.39), {_NOTES}",
    ),
    GpuRate(
        "L40S",
        Decimal("0.90"),
        source=f"default: L40S neocloud on-demand (RunPod ~$0.86, unconfirmed), {_NOTES}",
    ),
    GpuRate(
        "L40",
        Decimal("0.90"),
        source=f"default: the L40S rate applied to an L40 (no price of its own), {_NOTES}",
    ),
    GpuRate(
        "L4",
        Decimal("0.45"),
        source=f"default: L4 neocloud on-demand (RunPod ~$0.43, unconfirmed), {_NOTES}",
    ),
    GpuRate(
        "A10G",
        Decimal("1.01"),
        source=f"default: A10G, AWS g5.xlarge on-demand (~$1.01, third-party), {_NOTES}",
    ),
    GpuRate("A10", Decimal("0.75"), source="default: A10, unsourced estimate, 2026-11"),
    GpuRate("T4", Decimal("0.35"), source="default: T4, unsourced estimate, 2026-11"),
    GpuRate(
        "*",
        Decimal("1.00"),
        source="default: no price known for this GPU, generic $1/h; set one in [[gpu]]",
    ),
)
"""Fallback rates, each labelled with its source and date."""

HYPERSCALER_RATES: tuple[GpuRate, ...] = (
    GpuRate(
        "H200",
        Decimal("7.91"),
        source="AWS p5en.48xlarge on-demand $63.296/8 (dstack PR #4110, 2026-08-06)",
    ),
    GpuRate(
        "H100",
        Decimal("6.88"),
        source="AWS p5 after the June 2025 cut (~44% off $12.29; derived, unconfirmed)",
    ),
    GpuRate("A100", Decimal("4.10"), source="AWS p4d.24xlarge $32.77/8 before the 2025 cut"),
    GpuRate("L40S", Decimal("1.86"), source="AWS g6e.xlarge on-demand (~$1.86, unconfirmed)"),
    GpuRate("L4", Decimal("0.80"), source="AWS g6.xlarge on-demand (~$0.80, third-party)"),
    GpuRate("A10G", Decimal("1.01"), source="AWS g5.xlarge on-demand (~$1.01, third-party)"),
)
"""Hyperscaler on-demand rates from the same notes, for users who rent from AWS and the like.

Not used unless a caller passes them as configured rates (they then read as configured, not
estimated, so pass them only on the user's say-so)."""


@dataclass(frozen=True, slots=True)
class IntervalCost:
    """The cost of one GPU over one interval."""

    cost: Decimal
    rate: GpuRate
    estimated: bool
    """True when a default rate was used because no configured rate matched."""


class GpuCostModel:
    """Costs GPU intervals from configured rates, falling back to :data:`DEFAULT_RATES`."""

    def __init__(self, rates: tuple[GpuRate, ...] = ()) -> None:
        self.rates = rates

    def rate_for(self, name: str) -> tuple[GpuRate, bool]:
        """The rate for a device name, and whether it is a default (an estimate)."""
        for rate in self.rates:
            if rate.match == "*" or rate.match.lower() in name.lower():
                return rate, False
        for rate in DEFAULT_RATES:
            if rate.match == "*" or rate.match.lower() in name.lower():
                return rate, True
        raise AssertionError("DEFAULT_RATES ends with a catch-all")

    def interval_cost(self, name: str, seconds: Decimal, energy_mj: int | None) -> IntervalCost:
        """Cost of ``seconds`` of one GPU that used ``energy_mj`` millijoules meanwhile."""
        rate, estimated = self.rate_for(name)
        cost = rate.usd_per_hour * seconds / SECONDS_PER_HOUR
        if rate.mode == "owned" and energy_mj:
            cost += energy_cost(energy_mj, rate)
        return IntervalCost(cost=cost, rate=rate, estimated=estimated)


def energy_cost(energy_mj: int, rate: GpuRate) -> Decimal:
    """What ``energy_mj`` millijoules cost at the rate's electricity price and PUE."""
    return Decimal(energy_mj) / MJ_PER_KWH * rate.usd_per_kwh * rate.pue


def rate_label(rate: GpuRate, estimated: bool) -> str:
    """One line naming a rate and its source, for a sample's ``cost_ref``.

    For example ``$2.99/GPU-h rented [H100] (default: ...); estimated``.
    """
    match = "any GPU" if rate.match == "*" else rate.match
    text = f"${rate.usd_per_hour}/GPU-h {rate.mode} [{match}]"
    if rate.mode == "owned":
        text += f" + energy at ${rate.usd_per_kwh}/kWh x PUE {rate.pue}"
    text += f" ({rate.source})"
    if estimated:
        text += "; estimated"
    return text


@dataclass(frozen=True, slots=True)
class GpuEconomics:
    """Unit costs of self-hosted inference over one window (see :func:`gpu_economics`).

    Every ``Decimal | None`` field is ``None`` when its denominator is zero.
    """

    gpu_cost: Decimal
    """All GPU cost of the window, idle time included."""
    idle_cost: Decimal
    """The part of :attr:`gpu_cost` spent while the GPUs served nothing."""
    inferences: int
    prompt_tokens: int
    generation_tokens: int
    cost_per_inference: Decimal | None
    """Fully loaded: all GPU cost (idle included) over inferences served."""
    active_cost_per_inference: Decimal | None
    """GPU cost minus idle cost over inferences served; the idle burn is reported apart."""
    cost_per_mtok: Decimal | None
    """All GPU cost per million tokens, prompt and generated together."""
    input_cost_per_mtok: Decimal | None
    """GPU cost allotted to prompt tokens, per million prompt tokens."""
    output_cost_per_mtok: Decimal | None
    """GPU cost allotted to generated tokens, per million generated tokens."""
    idle_share: Decimal | None
    """Idle cost as a fraction of GPU cost."""


def gpu_economics(
    *,
    gpu_cost: Decimal,
    idle_cost: Decimal,
    inferences: int,
    prompt_tokens: int,
    generation_tokens: int,
    output_weight: Decimal = Decimal(1),
) -> GpuEconomics:
    """Cost per inference and per million tokens from a window's totals.

    ``gpu_cost`` includes ``idle_cost``. The fully loaded figures divide all of it by what was
    served (idle capacity amortised over the traffic, as Google's and NVIDIA's TCO methods do);
    the active figure leaves the idle burn out so that it can be shown as its own line (OpenCost's
    separate ``__idle__`` allocation).

    How the cost is split between input and output: in proportion to *weighted* tokens, a
    generated token weighing ``output_weight`` prompt tokens. So
    ``input $/1M = cost x 1e6 / (prompt + w x generated)`` and ``output $/1M = w x input $/1M``.
    ``output_weight`` 1 splits by token share (both rates equal the blended rate). Passing the
    compared API model's output/input price ratio (:func:`output_weight_from_prices`) splits the
    GPU cost the way that price list splits a bill, so the two can be compared line by line;
    a ratio from measured prefill and decode busy time (:func:`output_weight_from_busy_time`)
    follows the levelised-cost method of pricing prefill and decode separately. Either way the
    split is a convention: the GPU does not bill the two apart.
    """
    if output_weight < 0:
        raise ValueError(f"output_weight must not be negative, got {output_weight}")
    tokens = prompt_tokens + generation_tokens
    weighted = prompt_tokens + output_weight * generation_tokens
    input_rate = gpu_cost * MILLION / weighted if weighted else None
    return GpuEconomics(
        gpu_cost=gpu_cost,
        idle_cost=idle_cost,
        inferences=inferences,
        prompt_tokens=prompt_tokens,
        generation_tokens=generation_tokens,
        cost_per_inference=_div(gpu_cost, inferences),
        active_cost_per_inference=_div(gpu_cost - idle_cost, inferences),
        cost_per_mtok=_div(gpu_cost * MILLION, tokens),
        input_cost_per_mtok=input_rate if prompt_tokens else None,
        output_cost_per_mtok=(
            input_rate * output_weight if input_rate is not None and generation_tokens else None
        ),
        idle_share=idle_cost / gpu_cost if gpu_cost else None,
    )


def output_weight_from_prices(
    input_per_mtok: Decimal | None, output_per_mtok: Decimal | None
) -> Decimal | None:
    """A price list's output/input ratio (``None`` when either price is unknown or input is 0)."""
    if input_per_mtok is None or output_per_mtok is None or not input_per_mtok:
        return None
    return output_per_mtok / input_per_mtok


def output_weight_from_busy_time(
    *,
    prefill_seconds: Decimal,
    decode_seconds: Decimal,
    prompt_tokens: int,
    generation_tokens: int,
) -> Decimal | None:
    """GPU seconds per generated token over GPU seconds per prompt token.

    From an engine's busy-time counters, e.g. llama.cpp's ``prompt_seconds_total`` and
    ``tokens_predicted_seconds_total`` deltas. ``None`` when any input is zero.
    """
    if not (prefill_seconds and decode_seconds and prompt_tokens and generation_tokens):
        return None
    return (decode_seconds / generation_tokens) / (prefill_seconds / prompt_tokens)


def api_equivalent_cost(
    *,
    prompt_tokens: int,
    generation_tokens: int,
    input_per_mtok: Decimal | None,
    output_per_mtok: Decimal | None,
) -> Decimal | None:
    """What the same tokens would cost from an API at the given per-million prices.

    The caller takes the prices from the price book (the configured ``compare_to`` model). All
    prompt tokens are priced as uncached input: the inference servers' counters do not say which
    ones a provider would have served from its cache. ``None`` when a needed price is unknown.
    """
    if prompt_tokens and input_per_mtok is None:
        return None
    if generation_tokens and output_per_mtok is None:
        return None
    cost = Decimal(0)
    if prompt_tokens and input_per_mtok is not None:
        cost += input_per_mtok * prompt_tokens / MILLION
    if generation_tokens and output_per_mtok is not None:
        cost += output_per_mtok * generation_tokens / MILLION
    return cost


def cost_ratio(gpu_cost: Decimal, api_cost: Decimal | None) -> Decimal | None:
    """Self-hosted cost as a multiple of the API-equivalent cost (``None`` when undefined)."""
    if api_cost is None or not api_cost:
        return None
    return gpu_cost / api_cost


def _div(numerator: Decimal, denominator: int) -> Decimal | None:
    return numerator / denominator if denominator else None
