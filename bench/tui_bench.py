"""First paint and idle CPU of the TUI, against a baseline measured in the same run.

    python -m bench.tui_bench --db DB [--seconds 20] [--size 160x48] [--no-live]

``DB`` should hold a realistic history (``python -m bench.generate --db DB``). Prints:

- **first paint**: from constructing the app to the first snapshot applied to the panes, in a
  headless terminal (``--size``, default 160x48), for the 1h and 30d windows; the baseline is an
  empty Textual app's time to its first screen in the same process. Target <= 500 ms.
- **idle CPU, still database**: process CPU time over wall time while the app watches ``DB``
  (no collectors) at a 1 s refresh, as % of one core; the baseline is an empty Textual app
  idling as long. Target <= 2%.
- **idle CPU, live demo**: the same while a ``tokentop collect --demo --interval 1`` (started
  here, on a new database in a temporary folder) writes every second and the app watches it,
  as a viewer of a real collector does; the collector's own CPU is printed beside it, measured
  from ``/proc`` over the same seconds. Target <= 2% for the viewer.
- **import**: the time to import the app module in a fresh interpreter.

Every figure is a wall-clock or CPU measurement of this machine at this moment: on a shared or
loaded machine run it twice and read the lower figures as the nearer to the truth.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from textual.app import App
from textual.widgets import Static

from tokentop.store.db import Store
from tokentop.store.records import from_epoch
from tokentop.tui.app import TokentopApp
from tokentop.tui.messages import SnapshotReady


class _Empty(App[None]):
    def compose(self):  # type: ignore[no-untyped-def]
        yield Static("baseline")


def _dataset_end(db: Path) -> datetime:
    store = Store(db, readonly=True)
    try:
        newest = store.query("SELECT MAX(start) FROM usage")[0][0]
    finally:
        store.close()
    return from_epoch(newest + 60) if newest else datetime.now(UTC)


def _proc_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) of process ``pid`` so far, from ``/proc`` (Linux only)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_for_usage(db: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if db.exists():
            try:
                store = Store(db, readonly=True)
                try:
                    if store.query("SELECT 1 FROM usage LIMIT 1"):
                        return True
                finally:
                    store.close()
            except Exception:
                pass  # not created or migrated yet
        time.sleep(0.5)
    return False


def _live_cpu(seconds: float, size: tuple[int, int]) -> tuple[float, float | None, int] | None:
    """(viewer % of a core, collector % of a core, refreshes) while ``collect --demo`` writes
    every second into a new database; ``None`` when the collector did not start."""
    with tempfile.TemporaryDirectory(prefix="tokentop-bench-") as tmp:
        db = Path(tmp) / "live.db"
        collector = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tokentop",
                "--db",
                str(db),
                "collect",
                "--demo",
                *("--interval", "1"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            if not _wait_for_usage(db, 60):
                return None
            time.sleep(3)  # past the backfill: the collector writes once a second

            async def measure() -> tuple[float, float | None, int]:
                app = TokentopApp(db, refresh_s=1.0, watch_only=True, label="demo")
                async with app.run_test(size=size) as pilot:
                    await pilot.pause(2.0)
                    k0 = _proc_cpu_s(collector.pid)
                    cpu0, wall0 = time.process_time(), time.perf_counter()
                    count0 = app.refresh_count
                    await asyncio.sleep(seconds)
                    cpu1, wall1 = time.process_time(), time.perf_counter()
                    k1 = _proc_cpu_s(collector.pid)
                    wall = wall1 - wall0
                    other = None if k0 is None or k1 is None else (k1 - k0) / wall * 100
                    return (cpu1 - cpu0) / wall * 100, other, app.refresh_count - count0

            return asyncio.run(measure())
        finally:
            collector.terminate()
            collector.wait(10)


async def _first_paint(
    app: App[None], size: tuple[int, int] = (160, 48), cpu: list[float] | None = None
) -> float:
    painted = asyncio.Event()

    def hook(message: object) -> None:
        if isinstance(message, SnapshotReady):
            # The panes apply the snapshot in this message's handler; the next idle is painted.
            painted.set()

    started, cpu_started = time.perf_counter(), time.process_time()
    async with app.run_test(size=size, message_hook=hook) as pilot:
        if isinstance(app, TokentopApp):
            await asyncio.wait_for(painted.wait(), 30)
        await pilot.pause()
        elapsed = time.perf_counter() - started
        if cpu is not None:  # all threads: the UI and the query worker
            cpu.append(time.process_time() - cpu_started)
    return elapsed


async def _idle_cpu(app: App[None], seconds: float, size: tuple[int, int] = (160, 48)) -> float:
    async with app.run_test(size=size) as pilot:
        await pilot.pause(1.0)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        cpu1, wall1 = time.process_time(), time.perf_counter()
    return (cpu1 - cpu0) / (wall1 - wall0) * 100


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size", default="160x48", help="terminal size, WIDTHxHEIGHT")
    parser.add_argument("--no-live", action="store_true", help="skip the live demo collector")
    args = parser.parse_args(argv)
    if hasattr(os, "getloadavg"):
        one, five, _ = os.getloadavg()
        print(f"machine: {os.cpu_count()} CPUs, load average {one:.2f} (1 min), {five:.2f} (5 min)")
    end = _dataset_end(args.db)
    width, _, height = args.size.partition("x")
    size = (int(width), int(height))

    def clock() -> datetime:
        return end

    import_times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import tokentop.tui.app"], check=True)
        import_times.append(time.perf_counter() - t)
    base_imports = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import textual.app"], check=True)
        base_imports.append(time.perf_counter() - t)
    print(
        f"import tokentop.tui.app (fresh interpreter): {min(import_times) * 1000:.0f} ms; "
        f"baseline import textual.app {min(base_imports) * 1000:.0f} ms"
    )

    base = [asyncio.run(_first_paint(_Empty())) for _ in range(args.repeat)]
    print(
        f"baseline first screen (empty Textual app): median {statistics.median(base) * 1000:.0f} ms"
    )
    for window in ("1h", "30d"):
        cpu: list[float] = []
        runs = [
            asyncio.run(
                _first_paint(
                    TokentopApp(args.db, clock=clock, start_window=window, refresh_s=1.0),
                    size,
                    cpu,
                )
            )
            for _ in range(args.repeat)
        ]
        med = statistics.median(runs)
        verdict = "PASS" if med <= 0.5 else "FAIL"
        print(
            f"first paint {window:>3} at {args.size}: median {med * 1000:.0f} ms, best"
            f" {min(runs) * 1000:.0f} ms ({med / statistics.median(base):.1f}x baseline;"
            f" process CPU median {statistics.median(cpu) * 1000:.0f} ms)"
            f"  target <= 500 ms  {verdict}"
        )

    base_cpu = asyncio.run(_idle_cpu(_Empty(), args.seconds, size))
    cpu = asyncio.run(
        _idle_cpu(
            TokentopApp(args.db, clock=clock, start_window="1h", refresh_s=1.0), args.seconds, size
        )
    )
    verdict = "PASS" if cpu <= 2.0 else "FAIL"
    print(
        f"idle CPU at 1 s refresh (1h window, {args.seconds:.0f} s): {cpu:.2f}% of a core; "
        f"baseline empty app {base_cpu:.2f}%  target <= 2%  {verdict}"
    )
    # The same on the wall clock: the window slides and the freshness badges age every second,
    # so some text changes on every refresh.
    live = asyncio.run(
        _idle_cpu(TokentopApp(args.db, start_window="1h", refresh_s=1.0), args.seconds, size)
    )
    verdict = "PASS" if live <= 2.0 else "FAIL"
    print(
        f"idle CPU at 1 s refresh, wall clock (window slides, badges age): {live:.2f}% of a "
        f"core  target <= 2%  {verdict}"
    )
    if not args.no_live:
        result = _live_cpu(args.seconds, size)
        if result is None:
            print("idle CPU watching a live collect --demo: the collector did not start")
        else:
            viewer, collector, refreshes = result
            verdict = "PASS" if viewer <= 2.0 else "FAIL"
            other = "n/a" if collector is None else f"{collector:.2f}%"
            print(
                f"idle CPU at 1 s refresh watching a live collect --demo ({args.seconds:.0f} s,"
                f" {refreshes} refreshes): {viewer:.2f}% of a core (the collector: {other})"
                f"  target <= 2%  {verdict}"
            )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {os.cpu_count()} CPUs, load average {load:.2f} (1 min) at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
