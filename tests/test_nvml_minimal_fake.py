"""A fake NVML that patches only the basic calls (as a test harness elsewhere might): every other
reading goes to the real, unloaded library and fails; the collector must still cost the GPUs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace

import pynvml
import pytest

from tokentop.collectors.base import PollContext
from tokentop.collectors.nvml import NvmlCollector
from tokentop.pricing.gpu import GpuCostModel, GpuRate


async def test_minimal_fake_still_gives_costed_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    seconds = [1000.0]
    basics = {
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlDeviceGetCount": lambda: 2,
        "nvmlDeviceGetHandleByIndex": lambda i: ("handle", i),
        "nvmlDeviceGetName": lambda h: "NVIDIA H100 80GB HBM3",
        "nvmlDeviceGetUUID": lambda h: f"GPU-fake-{h[1]}",
        "nvmlDeviceGetUtilizationRates": lambda h: SimpleNamespace(gpu=80, memory=30),
        # An old-style binding: no ``version`` keyword.
        "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(total=80 << 30, used=20 << 30),
        "nvmlDeviceGetPowerUsage": lambda h: 350_000,
        "nvmlDeviceGetTemperature": lambda h, sensor: 50,
    }
    for name, fn in basics.items():
        monkeypatch.setattr(pynvml, name, fn)
    now = [datetime(2026, 11, 27, 12, 0, tzinfo=UTC)]
    collector = NvmlCollector(
        rates=GpuCostModel((GpuRate("H100", Decimal("2.99")),)),
        interval_s=1,
        clock=lambda: now[0],
    )
    try:
        batches = []
        for _ in range(3):
            ctx = PollContext(now[0], None, now[0] - timedelta(hours=1))
            batches.append(await collector.poll(ctx))
            now[0] += timedelta(seconds=10)
            seconds[0] += 10
    finally:
        await collector.aclose()
    last = batches[-1].gpu
    assert [g.device for g in last] == ["GPU-fake-0", "GPU-fake-1"]
    for g in last:
        assert g.util_pct == 80.0
        assert g.mem_used_bytes == 20 << 30
        assert g.power_mw == 350_000
        assert g.temp_c == 50
        assert g.interval_s == pytest.approx(10.0, abs=0.5)
        # 10 s of an H100 at $2.99/h, whatever the clock's rounding.
        assert g.cost_nano == pytest.approx(2.99 / 360 * 1e9, rel=0.05)
