"""Start-up of ``tokentop status`` (what a status bar pays every few seconds) against
``python -c pass``.

    python -m bench.status_bench [--db DB] [--reps 15]

``DB`` defaults to a small database made here (the line's cost does not grow with history: it
reads rollups). Prints, in milliseconds, the median and the best of ``--reps`` runs of each
command, interleaved so that noise hits both; the modules ``status`` imports that take longest
(``python -X importtime``); and whether Textual or the price data (genai-prices) were imported.
Target: ``tokentop status`` answers in 150 ms or less.
"""

from __future__ import annotations

import argparse
import os
import re
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


def _run(cmd: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=os.environ.copy())
    return (time.perf_counter() - began) * 1000


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
        print("line:", subprocess.run(status, capture_output=True, text=True).stdout.strip())
        _run(status), _run(baseline)  # warm the page cache
        times: dict[str, list[float]] = {"python -c pass": [], "tokentop status": []}
        for _ in range(args.reps):
            times["python -c pass"].append(_run(baseline))
            times["tokentop status"].append(_run(status))
        print(f"\nstart-up, {args.reps} runs each (ms):")
        for name, values in times.items():
            print(f"  {name:<16} median {statistics.median(values):6.1f}   best {min(values):6.1f}")
        extra = statistics.median(times["tokentop status"]) - statistics.median(
            times["python -c pass"]
        )
        print(f"  {'status - python':<16} median {extra:6.1f}")
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
        median = statistics.median(times["tokentop status"])
        verdict = "PASS" if median <= TARGET_MS else "FAIL"
        print(f"\ntarget: tokentop status <= {TARGET_MS:.0f} ms: {verdict} ({median:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
