"""GPU cost model: what an interval of GPU time costs, rented or owned.

Rented: hours x $/GPU-hour (power is in the price). Owned: hours x amortised capex/hour plus
energy (kWh) x $/kWh x PUE. Devices no configured rate matches fall back to labelled defaults and
their figures are marked as estimates.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

SECONDS_PER_HOUR = Decimal(3600)
MJ_PER_KWH = Decimal(3_600_000_000)


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


DEFAULT_RATES: tuple[GpuRate, ...] = (
    GpuRate("H200", Decimal("3.79"), source="default: on-demand cloud median, 2026-11"),
    GpuRate("H100", Decimal("2.99"), source="default: on-demand cloud median, 2026-11"),
    GpuRate("A100", Decimal("1.79"), source="default: on-demand cloud median, 2026-11"),
    GpuRate("L40S", Decimal("0.99"), source="default: on-demand cloud median, 2026-11"),
    GpuRate("L4", Decimal("0.80"), source="default: on-demand cloud median, 2026-11"),
    GpuRate("A10", Decimal("0.75"), source="default: on-demand cloud median, 2026-11"),
    GpuRate("T4", Decimal("0.35"), source="default: on-demand cloud median, 2026-11"),
    GpuRate("*", Decimal("1.00"), source="default: generic GPU, 2026-11"),
)


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
            cost += Decimal(energy_mj) / MJ_PER_KWH * rate.usd_per_kwh * rate.pue
        return IntervalCost(cost=cost, rate=rate, estimated=estimated)
