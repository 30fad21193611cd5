"""The GPU cost model and the unit-cost functions, as pure functions."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from tokentop.pricing.gpu import (
    DEFAULT_RATES,
    HYPERSCALER_RATES,
    GpuCostModel,
    GpuRate,
    api_equivalent_cost,
    cost_ratio,
    energy_cost,
    gpu_economics,
    output_weight_from_busy_time,
    output_weight_from_prices,
    rate_label,
)

ROOT = Path(__file__).resolve().parents[1]
D = Decimal


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L40", "L40"),
        ("NVIDIA L4", "L4"),
        ("Tesla T4", "T4"),
        ("NVIDIA B200", "*"),
    ],
)
def test_default_rates_match_the_right_gpu(name: str, match: str) -> None:
    rate, estimated = GpuCostModel().rate_for(name)
    assert rate.match == match and estimated


def test_every_default_names_its_source_and_date() -> None:
    for rate in DEFAULT_RATES:
        assert rate.source.startswith("default: ") and rate.usd_per_hour > 0
        assert rate.mode == "rented"
    assert DEFAULT_RATES[-1].match == "*"
    assert {r.match for r in HYPERSCALER_RATES} >= {"H100", "H200", "A100"}


def test_configured_rates_win_in_order() -> None:
    model = GpuCostModel((GpuRate("h100", D("2.10"), source="cluster A"), GpuRate("*", D("0.50"))))
    assert model.rate_for("NVIDIA H100 PCIe") == (model.rates[0], False)
    assert model.rate_for("NVIDIA L4") == (model.rates[1], False)


def test_interval_cost_rented_and_owned() -> None:
    rented = GpuCostModel((GpuRate("H100", D("3.60")),))
    assert rented.interval_cost("NVIDIA H100", D(10), 5_000_000).cost == D("0.01")
    owned = GpuRate("*", D("0.36"), mode="owned", usd_per_kwh=D("0.12"), pue=D("1.25"))
    cost = GpuCostModel((owned,)).interval_cost("any", D(100), 3_600_000_000)
    # 100 s at $0.36/h, plus 1 kWh at $0.12 x 1.25
    assert cost.cost == D("0.01") + D("0.15")
    assert not cost.estimated
    assert energy_cost(3_600_000_000, owned) == D("0.15")


def test_rate_label() -> None:
    label = rate_label(DEFAULT_RATES[1], True)
    assert label.startswith("$2.99/GPU-h rented [H100] (default: ")
    assert label.endswith("; estimated")
    owned = GpuRate("*", D("1"), mode="owned", source="config")
    assert rate_label(owned, False) == (
        "$1/GPU-h owned [any GPU] + energy at $0.10/kWh x PUE 1.5 (config)"
    )


def test_economics_from_window_totals() -> None:
    eco = gpu_economics(
        gpu_cost=D("12.00"),
        idle_cost=D("3.00"),
        inferences=3000,
        prompt_tokens=3_000_000,
        generation_tokens=1_000_000,
    )
    assert eco.cost_per_inference == D("0.004")
    assert eco.active_cost_per_inference == D("0.003")
    assert eco.cost_per_mtok == D("3")
    # Split by token share: both rates are the blended one.
    assert eco.input_cost_per_mtok == eco.output_cost_per_mtok == D("3")
    assert eco.idle_share == D("0.25")


def test_economics_split_weighted_like_a_price_list() -> None:
    weight = output_weight_from_prices(D("0.15"), D("0.60"))
    assert weight == D(4)
    eco = gpu_economics(
        gpu_cost=D("7.00"),
        idle_cost=D(0),
        inferences=1,
        prompt_tokens=3_000_000,
        generation_tokens=1_000_000,
        output_weight=D(4),
    )
    # 3M + 4 x 1M = 7M weighted tokens at $1/M: input $1/M, output $4/M, adding up to $7.
    assert (eco.input_cost_per_mtok, eco.output_cost_per_mtok) == (D(1), D(4))
    assert eco.input_cost_per_mtok is not None and eco.output_cost_per_mtok is not None
    assert eco.input_cost_per_mtok * 3 + eco.output_cost_per_mtok * 1 == eco.gpu_cost


def test_economics_unknown_is_none_never_zero() -> None:
    eco = gpu_economics(
        gpu_cost=D("5"), idle_cost=D("5"), inferences=0, prompt_tokens=0, generation_tokens=0
    )
    assert eco.cost_per_inference is None
    assert eco.active_cost_per_inference is None
    assert eco.cost_per_mtok is None
    assert eco.input_cost_per_mtok is None and eco.output_cost_per_mtok is None
    assert eco.idle_share == 1
    nothing = gpu_economics(
        gpu_cost=D(0), idle_cost=D(0), inferences=0, prompt_tokens=0, generation_tokens=10
    )
    assert nothing.idle_share is None
    assert nothing.input_cost_per_mtok is None
    assert nothing.output_cost_per_mtok == 0  # 10 tokens served for nothing: a real zero
    with pytest.raises(ValueError, match="output_weight"):
        gpu_economics(
            gpu_cost=D(1),
            idle_cost=D(0),
            inferences=1,
            prompt_tokens=1,
            generation_tokens=1,
            output_weight=D(-1),
        )


def test_output_weight_from_busy_time() -> None:
    # 1000 prompt tokens in 1 s, 100 generated tokens in 5 s: a generated token costs 50x.
    assert output_weight_from_busy_time(
        prefill_seconds=D(1), decode_seconds=D(5), prompt_tokens=1000, generation_tokens=100
    ) == D(50)
    assert (
        output_weight_from_busy_time(
            prefill_seconds=D(0), decode_seconds=D(5), prompt_tokens=1, generation_tokens=1
        )
        is None
    )
    assert output_weight_from_prices(None, D(1)) is None
    assert output_weight_from_prices(D(0), D(1)) is None


def test_api_equivalent_cost() -> None:
    # The design card's example: GPT-4o at $5/$15 per million, 1,000 in and 200 out = $0.008.
    cost = api_equivalent_cost(
        prompt_tokens=1000, generation_tokens=200, input_per_mtok=D(5), output_per_mtok=D(15)
    )
    assert cost == D("0.008")
    assert cost_ratio(D("0.004"), cost) == D("0.5")
    assert (
        api_equivalent_cost(
            prompt_tokens=1, generation_tokens=0, input_per_mtok=None, output_per_mtok=D(1)
        )
        is None
    )
    assert api_equivalent_cost(
        prompt_tokens=0, generation_tokens=0, input_per_mtok=None, output_per_mtok=None
    ) == D(0)
    assert cost_ratio(D(1), D(0)) is None and cost_ratio(D(1), None) is None


def test_pricing_imports_nothing_of_the_project() -> None:
    code = (
        "import sys, tokentop.pricing.gpu\n"
        "own = ('tokentop.collectors', 'tokentop.store', 'tokentop.tui')\n"
        "bad = [m for m in sys.modules if m.startswith(own)]\n"
        "print(bad)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
