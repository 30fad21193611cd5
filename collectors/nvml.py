"""NVIDIA GPUs through NVML (``nvidia-ml-py``): readings and the cost of each interval.

Every NVML call runs in one dedicated daemon thread, in order, so that a slow or hung driver never
blocks the event loop and ``nvmlShutdown`` can never run while another call is in flight. NVML is
initialised lazily in that thread on the first poll and shut down by :meth:`NvmlCollector.aclose`.

A reading a device does not support (``NotSupported``, ``FunctionNotFound``, a missing symbol)
is ``None``, "not available", never an exception. A missing driver is a fatal
:class:`~tokentop.collectors.base.SourceError` that says so plainly. A lost GPU is left out of the
batch and named in ``Batch.extra["error"]`` (and ``["detail"]``) while the other GPUs keep
reporting.

Costs: each sample costs the time since that device's previous sample (the first sample of a
device costs nothing: time not observed is not charged). ``energy_mj`` is the energy used in that
interval, from the board's energy counter, or power x time where the counter is not supported.

MIG: a GPU in MIG mode is reported as its physical device (board power, energy, temperature and
memory) plus one sample per MIG instance. NVML gives utilisation, power and energy per board only,
so the board's interval cost is split over its instances in proportion to their memory (equal
shares where memory is unknown), and the board's own sample carries no cost. Summing over all
samples thus counts each board's cost, energy and power once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from tokentop.collectors.base import PollContext, SourceError, utcnow
from tokentop.pricing.gpu import GpuCostModel, rate_label
from tokentop.store.records import Batch, GpuSample, usd_to_nano

try:
    import pynvml
except ImportError:  # pragma: no cover - nvidia-ml-py is a dependency, but be plain if it is gone
    pynvml = None

T = TypeVar("T")

_MICROSECOND = timedelta(microseconds=1)

IDLE_UTIL_PCT = 5.0
"""Below this utilisation an interval counts as idle burn."""

_NO_DRIVER = ("NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded")
_FATAL_INIT = (
    *_NO_DRIVER,
    "NVMLError_NoPermission",
    "NVMLError_LibRmVersionMismatch",
)
# Errors that mean "this reading is not available here", not "something broke".
_NOT_AVAILABLE = (
    "NVMLError_NotSupported",
    "NVMLError_FunctionNotFound",
    "NVMLError_NotFound",
    "NVMLError_NoData",
    "NVMLError_NoPermission",
    "NVMLError_ArgumentVersionMismatch",
    "NVMLError_InvalidArgument",
    "NVMLError_Timeout",
    "NVMLError_InsufficientSize",
)
# Errors that mean the device itself is gone or unusable (gpustat treats Unknown the same way).
_DEVICE_LOST = (
    "NVMLError_GpuIsLost",
    "NVMLError_Unknown",
    "NVMLError_ResetRequired",
    "NVMLError_GpuNotFound",
)


def _error_classes(names: tuple[str, ...]) -> tuple[type[BaseException], ...]:
    if pynvml is None:
        return ()
    return tuple(getattr(pynvml, n) for n in names if hasattr(pynvml, n))


class _DeviceLost(Exception):
    """Raised inside a device's read when NVML says the device is gone."""


@dataclass(frozen=True, slots=True)
class _Reading:
    """What one read of one device (or MIG instance) returned. Runs in the worker thread."""

    key: str
    name: str
    index: int
    util_pct: float | None = None
    mem_used_bytes: int | None = None
    mem_total_bytes: int | None = None
    power_mw: int | None = None
    energy_total_mj: int | None = None
    temp_c: int | None = None
    mig_mode: bool = False
    instances: tuple[_Reading, ...] = ()


@dataclass(frozen=True, slots=True)
class _Read:
    """One read of every device."""

    devices: tuple[_Reading, ...]
    lost: tuple[str, ...]


@dataclass(slots=True)
class _Previous:
    """A device's previous sample, for the next interval."""

    ts: datetime
    energy_total_mj: int | None
    power_mw: int | None


class _Worker:
    """One daemon thread that runs submitted calls in order.

    A daemon thread, not a ``ThreadPoolExecutor``: an NVML call that never returns must not keep
    the process from exiting.
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[
            tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((fn, future))
        return future

    def stop(self) -> None:
        """Let the thread finish what is queued, then end."""
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)


class _Nvml:
    """The NVML side: every method runs in the worker thread only."""

    def __init__(self) -> None:
        self.initialised = False
        self.calls = 0
        self._memory_v2: bool | None = None
        self._temperature_v: bool | None = None
        self._names: dict[int, str] = {}
        self._not_available = _error_classes(_NOT_AVAILABLE)
        self._lost = _error_classes(_DEVICE_LOST)
        self._no_driver = _error_classes(_NO_DRIVER)
        self._fatal_init = _error_classes(_FATAL_INIT)
        self._nvml_error: type[BaseException] = (
            pynvml.NVMLError if pynvml is not None else RuntimeError
        )
        self._mismatch: tuple[type[BaseException], ...] = (
            (pynvml.NVMLLibraryMismatchError,)
            if pynvml is not None and hasattr(pynvml, "NVMLLibraryMismatchError")
            else ()
        )

    def init(self) -> None:
        if self.initialised:
            return
        if pynvml is None:
            raise SourceError("no NVIDIA driver: nvidia-ml-py is not installed", fatal=True)
        try:
            pynvml.nvmlInit()
        except self._no_driver as exc:
            raise SourceError(f"no NVIDIA driver: {exc}", fatal=True) from None
        except self._fatal_init as exc:
            raise SourceError(f"NVML cannot start: {exc}", fatal=True) from None
        except self._nvml_error as exc:
            raise SourceError(f"NVML cannot start: {exc}") from None
        self.initialised = True

    def shutdown(self) -> None:
        if not self.initialised:
            return
        self.initialised = False
        with contextlib.suppress(self._nvml_error):
            pynvml.nvmlShutdown()

    def read(self) -> _Read:
        self.init()
        self.calls += 1
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        except self._no_driver as exc:
            self.initialised = False
            raise SourceError(f"no NVIDIA driver: {exc}", fatal=True) from None
        except self._nvml_error as exc:
            if type(exc).__name__ == "NVMLError_Uninitialized":
                self.initialised = False
            raise SourceError(f"NVML cannot count GPUs: {exc}") from None
        if count == 0:
            raise SourceError("NVML found no NVIDIA GPU", fatal=True)
        devices: list[_Reading] = []
        lost: list[str] = []
        for index in range(count):
            try:
                devices.append(self._read_device(index))
            except _DeviceLost as exc:
                lost.append(f"GPU {index} ({self._names.get(index, 'unknown')}) is lost: {exc}")
            except self._nvml_error as exc:
                lost.append(f"GPU {index} ({self._names.get(index, 'unknown')}) failed: {exc}")
        if not devices:
            raise SourceError("; ".join(lost))
        return _Read(devices=tuple(devices), lost=tuple(lost))

    def _query(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """One NVML call: ``None`` when not available; a lost device raises :class:`_DeviceLost`.

        Any other NVML error of a single reading (a function this driver or binding cannot
        answer, however it says so) makes that reading "not available" rather than losing the
        whole device; so does a binding whose signature differs (``TypeError``), as with old
        bindings that take no ``version`` argument.
        """
        try:
            return fn(*args, **kwargs)
        except self._lost as exc:
            raise _DeviceLost(str(exc)) from None
        except self._not_available:
            return None
        except self._mismatch:
            return None
        except (self._nvml_error, TypeError):
            return None

    def _read_device(self, index: int) -> _Reading:
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except self._lost as exc:
            raise _DeviceLost(str(exc)) from None
        name = _text(self._query(pynvml.nvmlDeviceGetName, handle)) or f"GPU {index}"
        uuid = _text(self._query(pynvml.nvmlDeviceGetUUID, handle))
        key = uuid or f"gpu{index}"
        self._names[index] = f"{name}, {key}"
        util = self._query(pynvml.nvmlDeviceGetUtilizationRates, handle)
        used, total = self._memory(handle)
        mig = self._query(pynvml.nvmlDeviceGetMigMode, handle)
        mig_mode = mig is not None and int(mig[0]) == 1
        return _Reading(
            key=key,
            name=name,
            index=index,
            util_pct=float(util.gpu) if util is not None else None,
            mem_used_bytes=used,
            mem_total_bytes=total,
            power_mw=_int(self._query(pynvml.nvmlDeviceGetPowerUsage, handle)),
            energy_total_mj=_int(self._query(pynvml.nvmlDeviceGetTotalEnergyConsumption, handle)),
            temp_c=self._temperature(handle),
            mig_mode=mig_mode,
            instances=self._mig_instances(handle, index, key) if mig_mode else (),
        )

    def _mig_instances(self, handle: Any, index: int, parent_key: str) -> tuple[_Reading, ...]:
        slots = _int(self._query(pynvml.nvmlDeviceGetMaxMigDeviceCount, handle)) or 0
        instances = []
        for slot in range(slots):
            # An empty slot raises NotFound, which _query turns into None.
            mig = self._query(pynvml.nvmlDeviceGetMigDeviceHandleByIndex, handle, slot)
            if mig is None:
                continue
            uuid = _text(self._query(pynvml.nvmlDeviceGetUUID, mig))
            name = _text(self._query(pynvml.nvmlDeviceGetName, mig)) or f"MIG {slot}"
            used, total = self._memory(mig)
            instances.append(
                _Reading(
                    key=uuid or f"{parent_key}/mig{slot}",
                    name=name,
                    index=index,
                    mem_used_bytes=used,
                    mem_total_bytes=total,
                )
            )
        return tuple(instances)

    def _memory(self, handle: Any) -> tuple[int | None, int | None]:
        # v2 matches nvidia-smi (reserved memory reported apart); older drivers only have v1.
        info = None
        if self._memory_v2 is not False and hasattr(pynvml, "nvmlMemory_v2"):
            info = self._query(pynvml.nvmlDeviceGetMemoryInfo, handle, version=pynvml.nvmlMemory_v2)
            if self._memory_v2 is None:
                self._memory_v2 = info is not None
        if info is None:
            info = self._query(pynvml.nvmlDeviceGetMemoryInfo, handle)
        if info is None:
            return None, None
        return _int(info.used), _int(info.total)

    def _temperature(self, handle: Any) -> int | None:
        sensor = pynvml.NVML_TEMPERATURE_GPU
        # nvmlDeviceGetTemperature is deprecated (gone in CUDA 14); probe the V form once.
        if self._temperature_v is not False and hasattr(pynvml, "nvmlDeviceGetTemperatureV"):
            value = self._query(pynvml.nvmlDeviceGetTemperatureV, handle, sensor)
            if self._temperature_v is None:
                self._temperature_v = value is not None
            if value is not None:
                return int(value)
        return _int(self._query(pynvml.nvmlDeviceGetTemperature, handle, sensor))


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(slots=True)
class _Costed:
    cost: Decimal
    idle: Decimal
    ref: str
    seconds: float
    energy_mj: int | None


class NvmlCollector:
    """Samples every NVIDIA GPU (and MIG instance) through NVML and costs each interval.

    Args:
        rates: the GPU cost model (configured rates, falling back to labelled defaults).
        interval_s: seconds between polls (the runner schedules them).
        clock: the current UTC time; the sample's ``ts`` and interval come from it.
        name: the source name, and ``source`` of every sample.
        call_timeout_s: how long one poll waits for NVML before reporting it as not answering.
    """

    kind = "nvml"

    def __init__(
        self,
        *,
        rates: GpuCostModel,
        interval_s: float = 5.0,
        clock: Callable[[], datetime] = utcnow,
        name: str = "gpu",
        call_timeout_s: float = 2.0,
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self.calls = 0
        self.rates = rates
        self.clock = clock
        self.call_timeout_s = call_timeout_s
        self._nvml = _Nvml()
        self._worker: _Worker | None = None
        self._pending: concurrent.futures.Future[_Read] | None = None
        self._previous: dict[str, _Previous] = {}

    async def poll(self, ctx: PollContext) -> Batch:
        """Read every GPU once; return one sample per GPU and per MIG instance."""
        if self._worker is None:
            self._worker = _Worker(f"tokentop-nvml-{self.name}")
        if self._pending is None:
            self._pending = self._worker.submit(self._nvml.read)
        pending = self._pending
        waiting = asyncio.wrap_future(pending)
        # If we stop waiting, nobody reads the outcome: fetch it so asyncio does not complain.
        waiting.add_done_callback(_consume)
        try:
            result = await asyncio.wait_for(asyncio.shield(waiting), self.call_timeout_s)
        except TimeoutError:
            # The call is still running in the worker; the next poll waits on the same call
            # instead of queueing another behind it.
            raise SourceError(
                f"NVML did not answer within {self.call_timeout_s:g} s"
                " (driver busy or hung; persistence mode off?)"
            ) from None
        finally:
            if pending.done():
                self._pending = None
                self.calls = self._nvml.calls
        return self._batch(result, self.clock())

    async def aclose(self) -> None:
        """Shut NVML down after any call in flight, then end the worker thread."""
        worker, self._worker = self._worker, None
        if worker is None:
            return
        # Queued behind any call in flight, so the shutdown cannot overlap it.
        done = worker.submit(self._nvml.shutdown)
        worker.stop()
        self._pending = None
        # A later poll starts a new thread with its own NVML state (and its own init).
        self._nvml = _Nvml()
        # On a hung call, give up waiting: the daemon thread shuts down if the call returns.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(done)), self.call_timeout_s)
        self._previous.clear()

    def _batch(self, result: _Read, ts: datetime) -> Batch:
        samples: list[GpuSample] = []
        seen: set[str] = set()
        for device in result.devices:
            seen.add(device.key)
            samples.extend(self._device_samples(device, ts))
        # A device that vanished starts afresh if it comes back: its absence is not charged.
        for key in list(self._previous):
            if key not in seen:
                del self._previous[key]
        # The runner shows "detail" in the Sources pane; "error" names the same problem for
        # whoever wants to record it as the source's last error while the others report.
        lost = "; ".join(result.lost)
        extra = {"error": lost, "detail": lost} if lost else {}
        return Batch(gpu=tuple(samples), extra=extra)

    def _device_samples(self, device: _Reading, ts: datetime) -> list[GpuSample]:
        costed = self._cost(device, ts)
        board = GpuSample(
            source=self.name,
            device=device.key,
            ts=ts,
            interval_s=costed.seconds,
            name=device.name,
            index=device.index,
            util_pct=device.util_pct,
            mem_used_bytes=device.mem_used_bytes,
            mem_total_bytes=device.mem_total_bytes,
            power_mw=device.power_mw,
            energy_mj=costed.energy_mj,
            temp_c=device.temp_c,
            cost_nano=usd_to_nano(costed.cost),
            idle_cost_nano=usd_to_nano(costed.idle),
            cost_ref=costed.ref,
        )
        if not device.instances:
            return [board]
        shares = _shares([i.mem_total_bytes for i in device.instances])
        nanos = _split(usd_to_nano(costed.cost), shares)
        count = len(device.instances)
        samples = [
            replace(
                board,
                cost_nano=0,
                idle_cost_nano=0,
                cost_ref=f"split over its {count} MIG instances by memory; {costed.ref}",
            )
        ]
        for instance, share, nano in zip(device.instances, shares, nanos, strict=True):
            samples.append(
                GpuSample(
                    source=self.name,
                    device=instance.key,
                    ts=ts,
                    interval_s=costed.seconds,
                    name=instance.name,
                    index=instance.index,
                    mem_used_bytes=instance.mem_used_bytes,
                    mem_total_bytes=instance.mem_total_bytes,
                    cost_nano=nano,
                    cost_ref=f"{_percent(share)} of {device.name} ({device.key}); {costed.ref}",
                )
            )
        return samples

    def _cost(self, device: _Reading, ts: datetime) -> _Costed:
        previous = self._previous.get(device.key)
        self._previous[device.key] = _Previous(ts, device.energy_total_mj, device.power_mw)
        rate, estimated = self.rates.rate_for(device.name)
        ref = rate_label(rate, estimated)
        if previous is None or ts <= previous.ts:
            readable = device.energy_total_mj is not None or device.power_mw is not None
            energy = 0 if readable else None
            return _Costed(Decimal(0), Decimal(0), ref, 0.0, energy)
        delta = ts - previous.ts
        seconds = Decimal(delta // _MICROSECOND) / 1_000_000
        energy = _energy(previous, device, seconds)
        if rate.mode == "owned" and energy is None:
            ref += "; energy not available, not charged"
        cost = self.rates.interval_cost(device.name, seconds, energy).cost
        # With MIG, utilisation is not available; idle is then left to the endpoint figures,
        # except on a MIG board with no instance at all, where nothing can run.
        no_instance = device.mig_mode and not device.instances
        low = device.util_pct is not None and device.util_pct < IDLE_UTIL_PCT
        idle = cost if no_instance or low else Decimal(0)
        return _Costed(cost, idle, ref, float(seconds), energy)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _energy(previous: _Previous, device: _Reading, seconds: Decimal) -> int | None:
    """Energy of the interval in mJ: the counter's delta, else mean power x time."""
    now, before = device.energy_total_mj, previous.energy_total_mj
    if now is not None and before is not None and now >= before:
        return now - before
    # No counter, or it went back (driver reload): integrate the power readings instead.
    powers = [p for p in (previous.power_mw, device.power_mw) if p is not None]
    if powers:
        mean_mw = Decimal(sum(powers)) / len(powers)
        return int((mean_mw * seconds).to_integral_value())
    if now is not None and before is not None:
        return now  # the counter restarted from 0 within the interval
    return None


def _shares(memory: list[int | None]) -> list[Decimal]:
    if memory and all(m for m in memory):
        total = Decimal(sum(m for m in memory if m))
        return [Decimal(m or 0) / total for m in memory]
    return [Decimal(1) / len(memory) for _ in memory]


def _split(total: int, shares: list[Decimal]) -> list[int]:
    """Split integer nano-dollars by shares so that the parts add up to the total exactly."""
    parts = [int(Decimal(total) * s) for s in shares[:-1]]
    parts.append(total - sum(parts))
    return parts


def _percent(share: Decimal) -> str:
    return f"{(share * 100).quantize(Decimal('0.1'))}%"
