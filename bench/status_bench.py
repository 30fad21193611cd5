"""Start-up of ``tokentop status`` (what a status bar pays every few seconds) against
``python -c pass``.

    python -m bench.status_bench [--db DB] [--reps 15]

``DB`` defaults to a small database made here (the line's cost does not grow with history: it
reads rollups). Runs, interleaved so that noise hits each alike, ``python -c pass`` and
``tokentop status`` twice: with the bytecode cached, as an installed tokentop runs (pip compiles
it; here a private ``PYTHONPYCACHEPREFIX``), and as this environment runs it (with
``PYTHONDONTWRITEBYTECODE`` set, a checkout's modules are compiled on every start). Prints, in
milliseconds, the median and best wall time and the median CPU time (user + system, which load
from other processes inflates less) of each, the ratio to ``python -c pass``, the load average
before and after; the modules ``status`` imports that take longest (``python -X importtime``);
and whether Textual, httpx, sqlite-utils or the price data (genai-prices) were imported.
Target: ``tokentop status`` answers in 150 ms or less.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

TARGET_MS = 150.0


def _command() -> list[str]:
    script = Path(sys.executable).with_name("tokentop")
    return [str(script)] if script.exists() else [sys.executable, "-m", "tokentop"]


def _small_db(path: Path) -> None:
    from tokentop.store.db import Store
    from tokentop.store.records import Batch, SourceHealth, UsageBucket

    now = datetime.now(UTC)
    with Store(path) as store:
        store.record_health(
            SourceHealth(name="demo", kind="demo", state="ok", last_success=now), now=now
        )
        store.write_batch(
            Batch(
                usage=tuple(
                    UsageBucket(
                        source="demo",
                        provider="openai",
                        model="gpt-4o",
                        start=(now - timedelta(minutes=m)).replace(second=0, microsecond=0),
                        requests=3,
                        cost_nano=12_000_000,
                        priced=True,
                        price_ref="bench",
                    )
                    for m in range(180)
                )
            )
        )


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU (user + system) milliseconds of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    wall = (time.perf_counter() - began) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000
    return wall, cpu


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _importtime(cmd: list[str]) -> list[tuple[int, str]]:
    python = [sys.executable, "-X", "importtime", "-c", "from tokentop.tui.cli import main; main()"]
    env = {**os.environ}
    result = subprocess.run(
        [*python, *cmd[-3:]], capture_output=True, text=True, env=env, check=False
    )
    found = []
    for line in result.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m and len(m.group(3)) <= 3:  # top-level imports and their direct children
            found.append((int(m.group(2)), m.group(3) + m.group(4)))
    return sorted(found, reverse=True)[:10]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.status_bench", description=__doc__)
    parser.add_argument("--db", type=Path, help="database (default: a small one made here)")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tokentop-status-bench-") as tmp:
        db = args.db
        if db is None:
            db = Path(tmp) / "status.db"
            _small_db(db)
        status = [*_command(), "status", "--db", str(db)]
        baseline = [sys.executable, "-c", "pass"]
        as_is = os.environ.copy()
        cached = {k: v for k, v in as_is.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        no_cache = "PYTHONDONTWRITEBYTECODE" in as_is
        runs = {
            "python -c pass": (baseline, cached),
            "status, bytecode cached": (status, cached),
            "status, as this env runs": (status, as_is),
        }
        print("line:", subprocess.run(status, capture_output=True, text=True).stdout.strip())
        for cmd, env in runs.values():  # warm the page cache and the bytecode cache
            _run(cmd, env)
        load_before = _load()
        walls: dict[str, list[float]] = {name: [] for name in runs}
        cpus: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.reps):
            for name, (cmd, env) in runs.items():
                wall, cpu = _run(cmd, env)
                walls[name].append(wall)
                cpus[name].append(cpu)
        print(f"\nstart-up, {args.reps} runs each (ms); load average {load_before} before,")
        print(f"{_load()} after, on {os.cpu_count()} CPUs")
        if not no_cache:
            print("(PYTHONDONTWRITEBYTECODE is not set here: the last two rows run alike)")
        base_wall = statistics.median(walls["python -c pass"])
        base_cpu = statistics.median(cpus["python -c pass"])
        for name in runs:
            wall, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
            print(
                f"  {name:<25} wall median {wall:6.1f} best {min(walls[name]):6.1f}"
                f"  ({wall / base_wall:4.1f}x)   cpu median {cpu:6.1f} ({cpu / base_cpu:4.1f}x)"
            )
        probe = (
            "import sys; from tokentop.tui.cli import main; main(sys.argv[1:]); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'textual', 'genai_prices',"
            " 'sqlite_utils', 'httpx'}), file=sys.stderr)"
        )
        loaded = subprocess.run(
            [sys.executable, "-c", probe, "status", "--db", str(db)],
            capture_output=True,
            text=True,
        ).stderr.strip()
        print(f"\nheavy packages imported by `status`: {loaded}")
        print("slowest imports (cumulative us):")
        for us, name in _importtime(["status", "--db", str(db)]):
            print(f"  {us:>8}  {name}")
        print(f"\ntarget: tokentop status <= {TARGET_MS:.0f} ms (median wall time):")
        for name in ("status, bytecode cached", "status, as this env runs"):
            median = statistics.median(walls[name])
            verdict = "PASS" if median <= TARGET_MS else "FAIL"
            print(f"  {name:<25} {verdict} ({median:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
