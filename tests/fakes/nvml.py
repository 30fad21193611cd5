"""A fake NVIDIA driver at the ``pynvml`` boundary, for tests and for end-to-end runs.

It replaces the real ``pynvml`` module's functions (nvidia-ml-py imports fine without a GPU) and
raises the module's *real* error classes, so the code under test keeps its real ``except``
clauses. Nothing here loads ``libnvidia-ml``; any NVML function the fake does not provide raises
``NVMLError_FunctionNotFound``, as an old driver would.

In a test::

    fake = FakeNvml([FakeGpu(), FakeGpu(util=2)], seconds=clock.seconds)
    fake.install(monkeypatch)

In a subprocess (the ``tokentop`` command with two fake H100s)::

    python -m tests.fakes.run_with_fake_nvml SPEC.json -- collect --interval 1

where ``SPEC.json`` is ``{"gpus": [{"name": "NVIDIA H100 80GB HBM3", "util": 80}, {}]}``
(every :class:`FakeGpu` field may be given; ``"driver": "missing"`` fakes a machine without the
driver). See :func:`FakeNvml.from_spec`.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml

GIB = 1024**3


@dataclass
class FakeMig:
    """One MIG instance of a :class:`FakeGpu`."""

    name: str = "NVIDIA H100 80GB HBM3 MIG 3g.40gb"
    uuid: str = ""
    mem_used: int = 1 * GIB
    mem_total: int = 40 * GIB


@dataclass
class FakeGpu:
    """One fake GPU. A reading set to ``None`` raises ``NVMLError_NotSupported``.

    The energy counter starts at ``energy_start_mj`` and grows by ``power_mw`` x elapsed seconds
    (mW x s = mJ) on the fake's clock, so power x time and the counter agree.
    """

    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = ""
    """Empty: ``GPU-00000000-0000-0000-0000-00000000000<index>``."""
    util: int | None = 50
    mem_used: int | None = 20 * GIB
    mem_total: int | None = 80 * GIB
    power_mw: int | None = 350_000
    energy: bool = True
    """False: the energy counter is not supported (older or consumer parts)."""
    energy_start_mj: int = 1_000_000_000
    temp_c: int | None = 45
    temperature_v: bool = True
    """False: ``nvmlDeviceGetTemperatureV`` is missing (older driver), the old call works."""
    memory_v2: bool = True
    """False: ``nvmlDeviceGetMemoryInfo_v2`` is missing (driver before 510)."""
    lost: bool = False
    """True: every call on this device raises ``NVMLError_GpuIsLost``."""
    mig: list[FakeMig] | None = None
    """``None``: MIG not supported. A list (even empty): MIG mode enabled with these instances."""
    energy_mj: float = field(default=-1.0, repr=False)
    """The counter's current value (managed by the fake)."""

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> FakeGpu:
        """Build from a JSON-style dict (``mig`` as a list of :class:`FakeMig` dicts)."""
        known = {f.name for f in fields(cls)}
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"unknown FakeGpu fields: {sorted(unknown)}")
        values = dict(spec)
        if values.get("mig") is not None:
            values["mig"] = [FakeMig(**m) for m in values["mig"]]
        return cls(**values)


@dataclass(frozen=True)
class FakeHandle:
    """What ``nvmlDeviceGetHandleByIndex`` returns: a GPU index, and a MIG slot for MIG handles."""

    gpu: int
    mig: int | None = None


class ManualClock:
    """A clock tests move by hand: :meth:`now` for collectors, :meth:`seconds` for the fake."""

    def __init__(self, start: datetime | None = None) -> None:
        self._start = start or datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
        self._elapsed = 0.0
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._start + timedelta(seconds=self._elapsed)

    def seconds(self) -> float:
        with self._lock:
            return self._elapsed

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._elapsed += seconds


class FakeNvml:
    """Fake GPUs behind the real ``pynvml`` module's function names.

    Args:
        gpus: the devices, index order.
        driver: ``"ok"``, ``"missing"`` (``nvmlInit`` raises ``NVMLError_LibraryNotFound``) or
            ``"not_loaded"`` (``NVMLError_DriverNotLoaded``).
        seconds: the clock the energy counters integrate over (default: ``time.monotonic``).

    Attributes:
        calls: how many times each NVML function was called.
        threads: the ids of the threads that called NVML.
        init_count: ``nvmlInit`` calls minus ``nvmlShutdown`` calls (NVML is reference counted).
        gate: while cleared, every NVML call blocks (a hung driver); see :meth:`hang`.
    """

    def __init__(
        self,
        gpus: list[FakeGpu] | None = None,
        *,
        driver: str = "ok",
        seconds: Callable[[], float] = time.monotonic,
    ) -> None:
        if driver not in ("ok", "missing", "not_loaded"):
            raise ValueError(f"driver must be ok, missing or not_loaded, got {driver!r}")
        self.gpus = gpus if gpus is not None else [FakeGpu(), FakeGpu()]
        self.driver = driver
        self.seconds = seconds
        self.calls: Counter[str] = Counter()
        self.threads: set[int] = set()
        self.init_count = 0
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.RLock()
        self._last = seconds()
        for i, gpu in enumerate(self.gpus):
            gpu.uuid = gpu.uuid or f"GPU-00000000-0000-0000-0000-{i:012d}"
            if gpu.energy_mj < 0:
                gpu.energy_mj = float(gpu.energy_start_mj)
            for j, mig in enumerate(gpu.mig or []):
                mig.uuid = mig.uuid or f"MIG-00000000-0000-0000-{i:04d}-{j:012d}"

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> FakeNvml:
        """From ``{"gpus": [FakeGpu fields...], "driver": "ok"}``; real time drives energy."""
        gpus = [FakeGpu.from_dict(g) for g in spec.get("gpus", [{}, {}])]
        return cls(gpus, driver=spec.get("driver", "ok"))

    @classmethod
    def from_file(cls, path: str | Path) -> FakeNvml:
        """From a JSON spec file (see :meth:`from_spec`)."""
        return cls.from_spec(json.loads(Path(path).read_text(encoding="utf-8")))

    def install(self, monkeypatch: Any | None = None) -> Callable[[], None]:
        """Replace ``pynvml``'s functions; returns a function that puts the real ones back.

        With pytest's ``monkeypatch`` the originals come back by themselves after the test.
        """
        originals: dict[str, Any] = {}
        for name, fake in self._functions().items():
            if monkeypatch is not None:
                monkeypatch.setattr(pynvml, name, fake)
            else:
                originals[name] = getattr(pynvml, name, None)
                setattr(pynvml, name, fake)

        def undo() -> None:
            for name, original in originals.items():
                setattr(pynvml, name, original)

        return undo

    @contextmanager
    def installed(self) -> Iterator[FakeNvml]:
        """``with fake.installed():`` the fake is in place inside the block."""
        undo = self.install()
        try:
            yield self
        finally:
            undo()

    @contextmanager
    def hang(self) -> Iterator[None]:
        """Every NVML call blocks until the block ends (a driver that stopped answering)."""
        self.gate.clear()
        try:
            yield
        finally:
            self.gate.set()

    def _tick(self, name: str) -> None:
        self.gate.wait()
        with self._lock:
            self.calls[name] += 1
            self.threads.add(threading.get_ident())
            now = self.seconds()
            elapsed = max(0.0, now - self._last)
            self._last = now
            for gpu in self.gpus:
                gpu.energy_mj += (gpu.power_mw or 0) * elapsed

    def _gpu(self, handle: FakeHandle) -> FakeGpu:
        if self.init_count <= 0:
            raise pynvml.NVMLError_Uninitialized()
        gpu = self.gpus[handle.gpu]
        if gpu.lost:
            raise pynvml.NVMLError_GpuIsLost()
        return gpu

    def _mig(self, handle: FakeHandle) -> FakeMig | None:
        gpu = self._gpu(handle)
        if handle.mig is None:
            return None
        assert gpu.mig is not None
        return gpu.mig[handle.mig]

    def _functions(self) -> dict[str, Callable[..., Any]]:
        def not_found(name: str) -> Any:
            raise pynvml.NVMLError_FunctionNotFound()

        def init(flags: int = 0) -> None:
            self._tick("nvmlInit")
            if self.driver == "missing":
                raise pynvml.NVMLError_LibraryNotFound()
            if self.driver == "not_loaded":
                raise pynvml.NVMLError_DriverNotLoaded()
            with self._lock:
                self.init_count += 1

        def shutdown() -> None:
            self._tick("nvmlShutdown")
            with self._lock:
                if self.init_count <= 0:
                    raise pynvml.NVMLError_Uninitialized()
                self.init_count -= 1

        def driver_version() -> str:
            self._tick("nvmlSystemGetDriverVersion")
            return "580.95.05"

        def count() -> int:
            self._tick("nvmlDeviceGetCount")
            if self.init_count <= 0:
                raise pynvml.NVMLError_Uninitialized()
            return len(self.gpus)

        def handle_by_index(index: int) -> FakeHandle:
            self._tick("nvmlDeviceGetHandleByIndex")
            handle = FakeHandle(index)
            if index >= len(self.gpus):
                raise pynvml.NVMLError_InvalidArgument()
            self._gpu(handle)
            return handle

        def name(handle: FakeHandle) -> str:
            self._tick("nvmlDeviceGetName")
            mig = self._mig(handle)
            return mig.name if mig else self._gpu(handle).name

        def uuid(handle: FakeHandle) -> str:
            self._tick("nvmlDeviceGetUUID")
            mig = self._mig(handle)
            return mig.uuid if mig else self._gpu(handle).uuid

        def index(handle: FakeHandle) -> int:
            self._tick("nvmlDeviceGetIndex")
            self._gpu(handle)
            return handle.gpu

        def utilization(handle: FakeHandle) -> Any:
            self._tick("nvmlDeviceGetUtilizationRates")
            gpu = self._gpu(handle)
            # Not supported on MIG instances, nor on a GPU in MIG mode.
            if handle.mig is not None or gpu.mig is not None or gpu.util is None:
                raise pynvml.NVMLError_NotSupported()
            return SimpleNamespace(gpu=gpu.util, memory=gpu.util // 2)

        def memory(handle: FakeHandle, version: int | None = None) -> Any:
            self._tick("nvmlDeviceGetMemoryInfo")
            gpu = self._gpu(handle)
            if version and not gpu.memory_v2:
                raise pynvml.NVMLError_FunctionNotFound()
            mig = self._mig(handle)
            used, total = (mig.mem_used, mig.mem_total) if mig else (gpu.mem_used, gpu.mem_total)
            if used is None or total is None:
                raise pynvml.NVMLError_NotSupported()
            # v1 "used" includes reserved memory; v2 reports it apart (nvidia-smi's figure).
            reserved = 512 * 1024**2
            if version:
                return SimpleNamespace(
                    version=version, total=total, reserved=reserved, free=total - used, used=used
                )
            return SimpleNamespace(total=total, free=total - used - reserved, used=used + reserved)

        def board(handle: FakeHandle) -> FakeGpu:
            gpu = self._gpu(handle)
            if handle.mig is not None:
                raise pynvml.NVMLError_NotSupported()
            return gpu

        def power(handle: FakeHandle) -> int:
            self._tick("nvmlDeviceGetPowerUsage")
            gpu = board(handle)
            if gpu.power_mw is None:
                raise pynvml.NVMLError_NotSupported()
            return gpu.power_mw

        def energy(handle: FakeHandle) -> int:
            self._tick("nvmlDeviceGetTotalEnergyConsumption")
            gpu = board(handle)
            if not gpu.energy:
                raise pynvml.NVMLError_NotSupported()
            return int(gpu.energy_mj)

        def temperature(handle: FakeHandle, sensor: int) -> int:
            self._tick("nvmlDeviceGetTemperature")
            gpu = board(handle)
            if gpu.temp_c is None:
                raise pynvml.NVMLError_NotSupported()
            return gpu.temp_c

        def temperature_v(handle: FakeHandle, sensor: int, version: int = 0) -> int:
            self._tick("nvmlDeviceGetTemperatureV")
            gpu = board(handle)
            if not gpu.temperature_v:
                raise pynvml.NVMLError_FunctionNotFound()
            if gpu.temp_c is None:
                raise pynvml.NVMLError_NotSupported()
            return gpu.temp_c

        def mig_mode(handle: FakeHandle) -> list[int]:
            self._tick("nvmlDeviceGetMigMode")
            gpu = board(handle)
            if gpu.mig is None:
                raise pynvml.NVMLError_NotSupported()
            return [1, 1]

        def max_mig(handle: FakeHandle) -> int:
            self._tick("nvmlDeviceGetMaxMigDeviceCount")
            gpu = board(handle)
            if gpu.mig is None:
                raise pynvml.NVMLError_NotSupported()
            return 7

        def mig_by_index(handle: FakeHandle, slot: int) -> FakeHandle:
            self._tick("nvmlDeviceGetMigDeviceHandleByIndex")
            gpu = board(handle)
            if gpu.mig is None:
                raise pynvml.NVMLError_NotSupported()
            if slot >= len(gpu.mig):
                raise pynvml.NVMLError_NotFound()
            return FakeHandle(handle.gpu, slot)

        def is_mig(handle: FakeHandle) -> bool:
            self._tick("nvmlDeviceIsMigDeviceHandle")
            self._gpu(handle)
            return handle.mig is not None

        def parent(handle: FakeHandle) -> FakeHandle:
            self._tick("nvmlDeviceGetDeviceHandleFromMigDeviceHandle")
            self._gpu(handle)
            if handle.mig is None:
                raise pynvml.NVMLError_InvalidArgument()
            return FakeHandle(handle.gpu)

        def instance_id(handle: FakeHandle) -> int:
            self._tick("nvmlDeviceGetGpuInstanceId")
            self._gpu(handle)
            if handle.mig is None:
                raise pynvml.NVMLError_InvalidArgument()
            return handle.mig + 1

        def compute_id(handle: FakeHandle) -> int:
            self._tick("nvmlDeviceGetComputeInstanceId")
            self._gpu(handle)
            if handle.mig is None:
                raise pynvml.NVMLError_InvalidArgument()
            return 0

        return {
            "_nvmlGetFunctionPointer": not_found,
            "nvmlInit": init,
            "nvmlInitWithFlags": init,
            "nvmlShutdown": shutdown,
            "nvmlSystemGetDriverVersion": driver_version,
            "nvmlDeviceGetCount": count,
            "nvmlDeviceGetHandleByIndex": handle_by_index,
            "nvmlDeviceGetName": name,
            "nvmlDeviceGetUUID": uuid,
            "nvmlDeviceGetIndex": index,
            "nvmlDeviceGetUtilizationRates": utilization,
            "nvmlDeviceGetMemoryInfo": memory,
            "nvmlDeviceGetPowerUsage": power,
            "nvmlDeviceGetTotalEnergyConsumption": energy,
            "nvmlDeviceGetTemperature": temperature,
            "nvmlDeviceGetTemperatureV": temperature_v,
            "nvmlDeviceGetMigMode": mig_mode,
            "nvmlDeviceGetMaxMigDeviceCount": max_mig,
            "nvmlDeviceGetMigDeviceHandleByIndex": mig_by_index,
            "nvmlDeviceIsMigDeviceHandle": is_mig,
            "nvmlDeviceGetDeviceHandleFromMigDeviceHandle": parent,
            "nvmlDeviceGetGpuInstanceId": instance_id,
            "nvmlDeviceGetComputeInstanceId": compute_id,
        }
