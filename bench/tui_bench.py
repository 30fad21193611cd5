"""First paint and idle CPU of the TUI, against a baseline measured in the same run.

    python -m bench.tui_bench --db DB [--seconds 20]

``DB`` should hold a realistic history (``python -m bench.generate --db DB``). Prints:

- **first paint**: from constructing the app to the first snapshot applied to the panes, in a
  headless 160x48 terminal, for the 1h and 30d windows; the baseline is an empty Textual app's time
  to its first screen in the same process.
- **idle CPU**: process CPU time over wall time while the app watches the database (no collectors)
  at a 1 s refresh, as % of one core; the baseline is an empty Textual app idling as long.
- **import**: the time to import the app module in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
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


async def _first_paint(app: App[None]) -> float:
    painted = asyncio.Event()

    def hook(message: object) -> None:
        if isinstance(message, SnapshotReady):
            # The panes apply the snapshot in this message's handler; the next idle is painted.
            painted.set()

    started = time.perf_counter()
    async with app.run_test(size=(160, 48), message_hook=hook) as pilot:
        if isinstance(app, TokentopApp):
            await asyncio.wait_for(painted.wait(), 30)
        await pilot.pause()
        elapsed = time.perf_counter() - started
    return elapsed


async def _idle_cpu(app: App[None], seconds: float) -> float:
    async with app.run_test(size=(160, 48)) as pilot:
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
    args = parser.parse_args(argv)
    end = _dataset_end(args.db)

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
        runs = [
            asyncio.run(
                _first_paint(TokentopApp(args.db, clock=clock, start_window=window, refresh_s=1.0))
            )
            for _ in range(args.repeat)
        ]
        med = statistics.median(runs)
        verdict = "PASS" if med <= 1.0 else "FAIL"
        print(
            f"first paint {window:>3}: median {med * 1000:.0f} ms "
            f"({med / statistics.median(base):.1f}x baseline)  target <= 1000 ms  {verdict}"
        )

    base_cpu = asyncio.run(_idle_cpu(_Empty(), args.seconds))
    cpu = asyncio.run(
        _idle_cpu(TokentopApp(args.db, clock=clock, start_window="1h", refresh_s=1.0), args.seconds)
    )
    verdict = "PASS" if cpu <= 2.0 else "FAIL"
    print(
        f"idle CPU at 1 s refresh (1h window, {args.seconds:.0f} s): {cpu:.2f}% of a core; "
        f"baseline empty app {base_cpu:.2f}%  target <= 2%  {verdict}"
    )
    # The same on the wall clock: the window slides and the freshness badges age every second,
    # so some text changes on every refresh.
    live = asyncio.run(
        _idle_cpu(TokentopApp(args.db, start_window="1h", refresh_s=1.0), args.seconds)
    )
    verdict = "PASS" if live <= 2.0 else "FAIL"
    print(
        f"idle CPU at 1 s refresh, wall clock (window slides, badges age): {live:.2f}% of a "
        f"core  target <= 2%  {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
