"""The NVML collector against fake GPUs patched in at the ``pynvml`` boundary."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path

import pytest

from tests.fakes.nvml import GIB, FakeGpu, FakeMig, FakeNvml, ManualClock
from tokentop.collectors.base import Collector, PollContext, SourceError
from tokentop.collectors.nvml import NvmlCollector
from tokentop.pricing.gpu import GpuCostModel, GpuRate
from tokentop.store.records import Batch, GpuSample, usd_to_nano

ROOT = Path(__file__).resolve().parents[1]

Make = Callable[..., tuple[FakeNvml, NvmlCollector]]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def make(monkeypatch: pytest.MonkeyPatch, clock: ManualClock) -> AsyncIterator[Make]:
    """Install fake GPUs and build a collector on the same clock; closed after the test."""
    made: list[NvmlCollector] = []

    def build(
        gpus: list[FakeGpu] | None = None,
        *,
        driver: str = "ok",
        rates: tuple[GpuRate, ...] = (),
        call_timeout_s: float = 5.0,
    ) -> tuple[FakeNvml, NvmlCollector]:
        fake = FakeNvml(gpus, driver=driver, seconds=clock.seconds)
        fake.install(monkeypatch)
        collector = NvmlCollector(
            rates=GpuCostModel(rates), clock=clock.now, call_timeout_s=call_timeout_s
        )
        made.append(collector)
        return fake, collector

    yield build
    for collector in made:
        await collector.aclose()


def ctx(clock: ManualClock) -> PollContext:
    return PollContext(now=clock.now(), watermark=None, backfill_start=clock.now())


async def poll_twice(collector: NvmlCollector, clock: ManualClock, seconds: float = 10) -> Batch:
    await collector.poll(ctx(clock))
    clock.advance(seconds)
    return await collector.poll(ctx(clock))


def by_device(batch: Batch) -> dict[str, GpuSample]:
    return {s.device: s for s in batch.gpu}


H100_10S = Decimal("2.99") * 10 / 3600


async def test_two_h100s_first_poll_charges_nothing(make: Make, clock: ManualClock) -> None:
    _, collector = make()
    assert isinstance(collector, Collector)
    assert collector.kind == "nvml"
    batch = await collector.poll(ctx(clock))
    assert [s.index for s in batch.gpu] == [0, 1]
    first = batch.gpu[0]
    assert first.source == "gpu"
    assert first.device == "GPU-00000000-0000-0000-0000-000000000000"
    assert first.name == "NVIDIA H100 80GB HBM3"
    assert first.ts == clock.now()
    assert first.util_pct == 50.0
    assert first.mem_used_bytes == 20 * GIB  # the v2 figure, as nvidia-smi shows
    assert first.mem_total_bytes == 80 * GIB
    assert first.power_mw == 350_000
    assert first.temp_c == 45
    assert (first.interval_s, first.cost_nano, first.idle_cost_nano, first.energy_mj) == (
        0.0,
        0,
        0,
        0,
    )
    assert "H100" in first.cost_ref and "estimated" in first.cost_ref
    assert not batch.extra


async def test_interval_cost_energy_and_calls_in_one_worker_thread(
    make: Make, clock: ManualClock
) -> None:
    fake, collector = make()
    batch = await poll_twice(collector, clock)
    for sample in batch.gpu:
        assert sample.interval_s == 10.0
        assert sample.cost_nano == usd_to_nano(H100_10S)
        assert sample.idle_cost_nano == 0
        assert sample.energy_mj == 350_000 * 10  # the counter's delta: 350 W for 10 s
    assert fake.calls["nvmlInit"] == 1
    assert len(fake.threads) == 1
    assert threading.get_ident() not in fake.threads
    assert collector.calls == 2
    await collector.aclose()
    assert fake.init_count == 0
    assert fake.calls["nvmlShutdown"] == 1


async def test_low_utilisation_is_idle_burn(make: Make, clock: ManualClock) -> None:
    _, collector = make([FakeGpu(util=2), FakeGpu(util=5)])
    idle, busy = (await poll_twice(collector, clock)).gpu
    assert idle.idle_cost_nano == idle.cost_nano > 0
    assert busy.idle_cost_nano == 0


async def test_configured_rented_rate_is_not_an_estimate(make: Make, clock: ManualClock) -> None:
    rate = GpuRate("H100", Decimal("2.00"), source="our contract")
    _, collector = make([FakeGpu()], rates=(rate,))
    (sample,) = (await poll_twice(collector, clock, 36)).gpu
    assert sample.cost_nano == usd_to_nano(Decimal("0.02"))
    assert "our contract" in sample.cost_ref and "estimated" not in sample.cost_ref


async def test_owned_gpu_adds_energy_from_the_counter(make: Make, clock: ManualClock) -> None:
    rate = GpuRate("H100", Decimal("1.00"), mode="owned", usd_per_kwh=Decimal("0.10"))
    _, collector = make([FakeGpu(power_mw=400_000)], rates=(rate,))
    (sample,) = (await poll_twice(collector, clock, 90)).gpu
    energy = 400_000 * 90  # mJ
    expected = Decimal(90) / 3600 + Decimal(energy) / Decimal(3_600_000_000) * Decimal(
        "0.10"
    ) * Decimal("1.5")
    assert sample.energy_mj == energy
    assert sample.cost_nano == usd_to_nano(expected)
    assert "owned" in sample.cost_ref and "kWh" in sample.cost_ref


async def test_energy_falls_back_to_power_times_time(make: Make, clock: ManualClock) -> None:
    rate = GpuRate("*", Decimal("0"), mode="owned", usd_per_kwh=Decimal("0.20"), pue=Decimal(1))
    fake, collector = make([FakeGpu(energy=False, power_mw=200_000)], rates=(rate,))
    await collector.poll(ctx(clock))
    clock.advance(10)
    fake.gpus[0].power_mw = 400_000
    (sample,) = (await collector.poll(ctx(clock))).gpu
    assert sample.energy_mj == 300_000 * 10  # mean of the two readings x 10 s
    assert sample.cost_nano == usd_to_nano(Decimal(3_000_000) / 3_600_000_000 * Decimal("0.20"))


async def test_energy_counter_that_went_back_uses_power(make: Make, clock: ManualClock) -> None:
    fake, collector = make([FakeGpu(power_mw=100_000)])
    await collector.poll(ctx(clock))
    fake.gpus[0].energy_mj = 5.0  # the driver was reloaded: the counter restarted
    clock.advance(10)
    (sample,) = (await collector.poll(ctx(clock))).gpu
    assert sample.energy_mj == 100_000 * 10


async def test_not_supported_readings_are_none(make: Make, clock: ManualClock) -> None:
    gpu = FakeGpu(
        name="NVIDIA GeForce RTX 3090",
        util=None,
        mem_used=None,
        power_mw=None,
        energy=False,
        temp_c=None,
    )
    _, collector = make([gpu])
    first = (await collector.poll(ctx(clock))).gpu[0]
    assert (first.util_pct, first.mem_used_bytes, first.power_mw, first.temp_c) == (
        None,
        None,
        None,
        None,
    )
    assert first.energy_mj is None
    clock.advance(60)
    (sample,) = (await collector.poll(ctx(clock))).gpu
    assert sample.energy_mj is None
    assert sample.cost_nano == usd_to_nano(Decimal("1.00") / 60)  # generic default, rented
    assert sample.idle_cost_nano == 0  # utilisation unknown: not called idle
    assert "no price known" in sample.cost_ref and "estimated" in sample.cost_ref


async def test_old_driver_fallbacks(make: Make, clock: ManualClock) -> None:
    fake, collector = make([FakeGpu(temperature_v=False, memory_v2=False, temp_c=61)])
    (sample,) = (await collector.poll(ctx(clock))).gpu
    assert sample.temp_c == 61
    assert fake.calls["nvmlDeviceGetTemperature"] == 1
    assert sample.mem_used_bytes == 20 * GIB + 512 * 1024**2  # v1 counts reserved memory
    await collector.poll(ctx(clock))
    assert fake.calls["nvmlDeviceGetTemperatureV"] == 1  # probed once


async def test_lost_gpu_is_named_while_the_others_report(make: Make, clock: ManualClock) -> None:
    fake, collector = make([FakeGpu(), FakeGpu()])
    await collector.poll(ctx(clock))
    fake.gpus[1].lost = True
    clock.advance(5)
    batch = await collector.poll(ctx(clock))
    assert [s.index for s in batch.gpu] == [0]
    assert "GPU 1" in batch.extra["error"] and "lost" in batch.extra["error"]
    assert batch.extra["detail"] == batch.extra["error"]
    # Back after a reset: its absence is not charged.
    fake.gpus[1].lost = False
    clock.advance(5)
    back = by_device(await collector.poll(ctx(clock)))
    assert back[fake.gpus[1].uuid].interval_s == 0.0
    assert back[fake.gpus[1].uuid].cost_nano == 0
    assert back[fake.gpus[0].uuid].interval_s == 5.0


async def test_every_gpu_lost_is_an_error(make: Make, clock: ManualClock) -> None:
    _, collector = make([FakeGpu(lost=True)])
    with pytest.raises(SourceError) as info:
        await collector.poll(ctx(clock))
    assert "lost" in info.value.message and not info.value.fatal


@pytest.mark.parametrize("driver", ["missing", "not_loaded"])
async def test_no_driver_is_fatal_and_plain(make: Make, clock: ManualClock, driver: str) -> None:
    fake, collector = make(driver=driver)
    with pytest.raises(SourceError) as info:
        await collector.poll(ctx(clock))
    assert info.value.fatal
    assert info.value.message.startswith("no NVIDIA driver: ")
    assert "\n" not in info.value.message
    await collector.aclose()
    assert fake.calls["nvmlShutdown"] == 0


async def test_mig_instances_share_the_board_cost(make: Make, clock: ManualClock) -> None:
    migs = [
        FakeMig(name="NVIDIA H100 80GB HBM3 MIG 4g.40gb", mem_total=40 * GIB),
        FakeMig(name="NVIDIA H100 80GB HBM3 MIG 2g.20gb", mem_total=20 * GIB),
    ]
    fake, collector = make([FakeGpu(mig=migs)])
    samples = by_device(await poll_twice(collector, clock, 30))
    board = samples[fake.gpus[0].uuid]
    big, small = samples[migs[0].uuid], samples[migs[1].uuid]
    total = usd_to_nano(Decimal("2.99") * 30 / 3600)
    assert board.cost_nano == 0 and "2 MIG instances" in board.cost_ref
    assert board.util_pct is None  # not supported in MIG mode
    assert board.power_mw == 350_000 and board.energy_mj == 350_000 * 30
    assert big.cost_nano + small.cost_nano == total
    assert abs(big.cost_nano - 2 * small.cost_nano) <= 2
    assert big.name == "NVIDIA H100 80GB HBM3 MIG 4g.40gb"
    assert (big.util_pct, big.power_mw, big.energy_mj, big.idle_cost_nano) == (None, None, None, 0)
    assert big.mem_total_bytes == 40 * GIB and big.index == 0
    assert "66.7%" in big.cost_ref


async def test_mig_mode_without_instances_is_idle(make: Make, clock: ManualClock) -> None:
    _, collector = make([FakeGpu(mig=[])])
    (sample,) = (await poll_twice(collector, clock)).gpu
    assert sample.cost_nano == usd_to_nano(H100_10S)
    assert sample.idle_cost_nano == sample.cost_nano


async def test_hung_driver_times_out_without_queueing_more_calls(
    make: Make, clock: ManualClock
) -> None:
    fake, collector = make(call_timeout_s=0.05)
    with fake.hang():
        for _ in range(3):
            with pytest.raises(SourceError) as info:
                await collector.poll(ctx(clock))
            assert "did not answer" in info.value.message and not info.value.fatal
    collector.call_timeout_s = 5.0
    batch = await collector.poll(ctx(clock))  # the call that was in flight
    assert len(batch.gpu) == 2
    assert fake.calls["nvmlInit"] == 1
    assert fake.calls["nvmlDeviceGetCount"] == 1


async def test_close_waits_for_the_call_in_flight(make: Make, clock: ManualClock) -> None:
    fake, collector = make(call_timeout_s=0.05)
    await collector.poll(ctx(clock))
    with fake.hang():
        with pytest.raises(SourceError):
            await collector.poll(ctx(clock))
        collector.call_timeout_s = 5.0
        closing = asyncio.ensure_future(collector.aclose())
        await asyncio.sleep(0.01)
        assert fake.calls["nvmlShutdown"] == 0
    await closing
    assert fake.init_count == 0


async def test_poll_after_close_starts_again(make: Make, clock: ManualClock) -> None:
    fake, collector = make()
    await collector.poll(ctx(clock))
    await collector.aclose()
    await collector.aclose()
    batch = await collector.poll(ctx(clock))
    assert [s.interval_s for s in batch.gpu] == [0.0, 0.0]
    assert fake.init_count == 1


def test_launcher_installs_the_fake_in_a_subprocess(tmp_path: Path) -> None:
    spec = tmp_path / "gpus.json"
    spec.write_text(json.dumps({"gpus": [{"util": 80}, {"util": 1, "power_mw": 90_000}]}))
    code = (
        "import asyncio, sys\n"
        "from tests.fakes.run_with_fake_nvml import main\n"
        "import tokentop.tui.cli\n"
        "async def run():\n"
        "    from tokentop.collectors.base import PollContext, utcnow\n"
        "    from tokentop.collectors.nvml import NvmlCollector\n"
        "    from tokentop.pricing.gpu import GpuCostModel\n"
        "    c = NvmlCollector(rates=GpuCostModel())\n"
        "    b = await c.poll(PollContext(utcnow(), None, utcnow()))\n"
        "    await c.aclose()\n"
        "    return [(s.name, s.util_pct, s.power_mw) for s in b.gpu]\n"
        "tokentop.tui.cli.main = lambda argv: print(argv, asyncio.run(run())) or 0\n"
        "sys.exit(main([sys.argv[1], '--', 'collect', '--interval', '1']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(spec)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "['collect', '--interval', '1']" in done.stdout
    assert "('NVIDIA H100 80GB HBM3', 80.0, 350000)" in done.stdout
    assert "('NVIDIA H100 80GB HBM3', 1.0, 90000)" in done.stdout
