"""Check the NVML collector on a real NVIDIA machine, and time one NVML poll.

``python -m bench.gpu_check [--seconds 30] [--interval 1] [--no-load] [--rate H100=2.99]``

Runs :class:`~tokentop.collectors.nvml.NvmlCollector` for ``--seconds``, printing every sample
(readings, interval, energy, cost and the rate behind it), then the cost of one poll in milliseconds
(p50/p95/max over the polls after the first, which pays NVML's initialisation). If ``torch`` or
``cupy`` can reach the GPU, a small matrix-multiply load runs meanwhile so that utilisation,
power and energy move; otherwise the GPU is measured as it is, and the script says so.

Without an NVIDIA driver it prints why and exits 0: this is a check, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from collections.abc import Callable
from decimal import Decimal

from tokentop.collectors.base import PollContext, SourceError, utcnow
from tokentop.collectors.nvml import NvmlCollector
from tokentop.pricing.gpu import GpuCostModel, GpuRate
from tokentop.store.records import GpuSample, nano_to_usd


def _load(stop: threading.Event) -> tuple[str, Callable[[], None] | None]:
    """A matrix-multiply loop on GPU 0 with torch or cupy, if either can reach a GPU."""
    try:
        import torch

        if torch.cuda.is_available():

            def run_torch() -> None:
                a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
                while not stop.is_set():
                    for _ in range(20):
                        a = (a @ a).clamp_(-1, 1)
                    torch.cuda.synchronize()

            return "torch matmul load on cuda:0", run_torch
    except ImportError:
        pass
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:

            def run_cupy() -> None:
                a = cupy.random.standard_normal((4096, 4096), dtype=cupy.float32)
                while not stop.is_set():
                    for _ in range(20):
                        a = cupy.clip(a @ a, -1, 1)
                    cupy.cuda.Device().synchronize()

            return "cupy matmul load on device 0", run_cupy
    except Exception:  # cupy raises its own errors when no device or runtime is present
        pass
    return "no load: neither torch nor cupy can reach a GPU, measuring it as it is", None


def _row(sample: GpuSample) -> str:
    def opt(value: object, unit: str = "") -> str:
        return "n/a" if value is None else f"{value}{unit}"

    power = None if sample.power_mw is None else f"{sample.power_mw / 1000:.1f}"
    mem = (
        None
        if sample.mem_used_bytes is None or sample.mem_total_bytes is None
        else f"{sample.mem_used_bytes / 2**30:.1f}/{sample.mem_total_bytes / 2**30:.1f}"
    )
    return (
        f"  [{sample.index}] {sample.name} {sample.device}\n"
        f"      util {opt(sample.util_pct, '%')}  mem {opt(mem, ' GiB')}  power {opt(power, ' W')}"
        f"  temp {opt(sample.temp_c, ' C')}  interval {sample.interval_s:.3f} s"
        f"  energy {opt(sample.energy_mj, ' mJ')}\n"
        f"      cost ${nano_to_usd(sample.cost_nano):.9f}"
        f"  idle ${nano_to_usd(sample.idle_cost_nano):.9f}  ({sample.cost_ref})"
    )


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _run(seconds: float, interval: float, load: bool, rates: tuple[GpuRate, ...]) -> int:
    collector = NvmlCollector(rates=GpuCostModel(rates), interval_s=interval)
    stop = threading.Event()
    worker: threading.Thread | None = None
    timings: list[float] = []
    try:
        try:
            start = time.perf_counter()
            batch = await collector.poll(PollContext(utcnow(), None, utcnow()))
            first_ms = (time.perf_counter() - start) * 1000
        except SourceError as exc:
            print(f"no GPU check possible: {exc.message}")
            return 0
        print(f"first poll (initialises NVML): {first_ms:.1f} ms, {len(batch.gpu)} sample(s)")
        for sample in batch.gpu:
            print(_row(sample))
        if batch.extra:
            print(f"  note: {batch.extra}")
        what, run = _load(stop) if load else ("no load: --no-load given", None)
        print(what)
        if run is not None:
            worker = threading.Thread(target=run, name="gpu-load", daemon=True)
            worker.start()
        deadline = time.monotonic() + seconds
        totals: dict[str, int] = {}
        while time.monotonic() < deadline:
            await asyncio.sleep(interval)
            start = time.perf_counter()
            try:
                batch = await collector.poll(PollContext(utcnow(), None, utcnow()))
            except SourceError as exc:
                print(f"poll failed: {exc.message}")
                continue
            timings.append((time.perf_counter() - start) * 1000)
            print(f"poll {len(timings)}: {timings[-1]:.2f} ms")
            for sample in batch.gpu:
                print(_row(sample))
                totals[sample.device] = totals.get(sample.device, 0) + sample.cost_nano
            if batch.extra:
                print(f"  note: {batch.extra}")
    finally:
        stop.set()
        if worker is not None:
            worker.join(timeout=10)
        await collector.aclose()
    if timings:
        print(
            f"NVML poll cost over {len(timings)} polls: p50 {statistics.median(timings):.2f} ms,"
            f" p95 {_percentile(timings, 0.95):.2f} ms, max {max(timings):.2f} ms"
        )
    for device, nano in totals.items():
        print(f"cost over the run, {device}: ${nano_to_usd(nano):.6f}")
    return 0


def _rate(text: str) -> GpuRate:
    match, _, price = text.partition("=")
    if not price:
        raise argparse.ArgumentTypeError(f"expected MATCH=USD_PER_HOUR, got {text!r}")
    return GpuRate(match, Decimal(price), source="--rate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to run (30)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between polls (1)")
    parser.add_argument("--no-load", action="store_true", help="do not load the GPU")
    parser.add_argument(
        "--rate", type=_rate, action="append", default=[], help="MATCH=USD_PER_HOUR, repeatable"
    )
    args = parser.parse_args(argv)
    return asyncio.run(_run(args.seconds, args.interval, not args.no_load, tuple(args.rate)))


if __name__ == "__main__":
    sys.exit(main())
