"""The cost of one evaluation of every alert rule, on the 30-day benchmark history.

    python -m bench.alerts_bench [--keep DB] [--days 30] [--reps 50]

``DB`` is reused when it holds the dataset asked for (``python -m bench.generate``), otherwise it
is generated there (about a minute for 30 days on 2 cores). Prints, in milliseconds (p50/p95
over ``--reps`` runs after one warm-up, nearest rank):

- **evaluate, all rules**: :func:`tokentop.collectors.alerts.evaluate` of one rule of every kind
  (budget day and month, spike with its weekly baseline, runway, source_down, unpriced,
  new_model, cost_per_request by model, gpu_idle) at the end of the dataset, through the
  writer's connection as the collector runs it. Target: p95 <= 20 ms.
- **engine step**: the same plus the state machine's transaction (what the collector's alert
  task does every ``evaluate_every_s``, before delivery).
- **evaluate, CPU time**: the process's CPU time for the same runs; on a machine shared with other
  work the wall figures wander (a p95 well above the p50 is usually another process), this one
  much less.
- each rule alone, to show where the time goes.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from bench.generate import DEFAULT_END, dataset_info, generate
from bench.generate import print_summary as print_generation
from tokentop.collectors.alerts import AlertEngine, evaluate
from tokentop.collectors.config import parse_config
from tokentop.store.db import Store, StoreError

TARGET_MS = 20.0
RULES = """
budget_daily_usd = 5000
budget_monthly_usd = 100000

[[alert]]
name = "daily-budget"
kind = "budget"

[[alert]]
name = "monthly-projected"
kind = "budget"
period = "month"
basis = "projected"

[[alert]]
name = "spike"
kind = "spike"

[[alert]]
name = "openai-spike"
kind = "spike"
provider = "openai"
window = "1h"

[[alert]]
name = "runway"
kind = "runway"

[[alert]]
name = "sources"
kind = "source_down"

[[alert]]
name = "unpriced"
kind = "unpriced"

[[alert]]
name = "new-model"
kind = "new_model"

[[alert]]
name = "new-key"
kind = "new_model"
dimension = "api_key"
window = "1d"

[[alert]]
name = "cost-per-request"
kind = "cost_per_request"
by = "model"

[[alert]]
name = "gpu-idle"
kind = "gpu_idle"
"""


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))]


def _time(fn: Callable[[], object], reps: int, cpu: list[float] | None = None) -> list[float]:
    """Wall milliseconds of ``reps`` runs (and, into ``cpu``, this process's CPU milliseconds:
    on a machine shared with other work, the part that is this code's own)."""
    fn()  # warm-up: page cache and statement cache
    gc.collect()
    out = []
    for _ in range(reps):
        began, began_cpu = time.perf_counter(), time.process_time()
        fn()
        out.append((time.perf_counter() - began) * 1000)
        if cpu is not None:
            cpu.append((time.process_time() - began_cpu) * 1000)
    return out


def _dataset(args: argparse.Namespace, tmp: Path) -> Path:
    keep: Path | None = args.keep
    if keep is not None and keep.exists():
        try:
            with Store(keep, readonly=True) as store:
                info = dataset_info(store)
        except StoreError as exc:
            sys.exit(f"--keep {keep}: {exc}; or delete it and let this regenerate it")
        wanted = {"days": args.days, "series": args.series, "seed": args.seed}
        if info is None or any(info.get(k) != v for k, v in wanted.items()):
            sys.exit(f"--keep {keep}: holds {info}, not {wanted}; delete it or pick another")
        print(f"dataset: reusing {keep} ({info})")
        return keep
    path = keep if keep is not None else tmp / "bench.db"
    print(f"dataset: generating {args.days} days x {args.series} series into {path}")
    print_generation(generate(path, days=args.days, series=args.series, seed=args.seed))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.alerts_bench", description=__doc__)
    parser.add_argument("--keep", type=Path, help="database to reuse, or to generate and keep")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--series", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args(argv)
    config = parse_config(tomllib.loads(RULES)).alerts
    now = DEFAULT_END
    with tempfile.TemporaryDirectory(prefix="tokentop-alerts-bench-") as tmp:
        path = _dataset(args, Path(tmp))
        # A copy, so that the engine's tables and states never touch a kept dataset.
        work = Path(tmp) / "work.db"
        with Store(path, readonly=True) as src:
            src.conn.execute("VACUUM INTO ?", (str(work),))
        store = Store(work)
        try:
            results = evaluate(store, config.rules, now)
            print(f"\nrules at {now.isoformat()} (the dataset's end):")
            for r in results:
                status = ("OK", "WARNING", "CRITICAL", "UNKNOWN")[r.code]
                print(f"  {r.rule.name:<18} {status:<8} {r.line[:90]}")
            cpu: list[float] = []
            all_rules = _time(lambda: evaluate(store, config.rules, now), args.reps, cpu)
            engine = AlertEngine(store, config, clock=lambda: now)
            ticks = iter(range(10**9))
            step = _time(
                lambda: engine.step(now + timedelta(seconds=next(ticks) * 0.001)), args.reps
            )
            print(f"\none evaluation, {len(config.rules)} rules, {args.reps} runs (ms):")
            print(
                f"  {'evaluate, all rules':<28} p50 {statistics.median(all_rules):6.2f}"
                f"   p95 {_pct(all_rules, 0.95):6.2f}"
            )
            print(
                f"  {'engine step (+ transaction)':<28} p50 {statistics.median(step):6.2f}"
                f"   p95 {_pct(step, 0.95):6.2f}"
            )
            print(
                f"  {'evaluate, CPU time':<28} p50 {statistics.median(cpu):6.2f}"
                f"   p95 {_pct(cpu, 0.95):6.2f}"
            )
            print("\nper rule (p50 ms):")
            for rule in config.rules:
                times = _time(
                    lambda rule=rule: evaluate(store, [rule], now), max(5, args.reps // 5)
                )
                print(f"  {rule.name:<18} {rule.kind:<17} {statistics.median(times):6.2f}")
            p95 = _pct(all_rules, 0.95)
            verdict = "PASS" if p95 <= TARGET_MS else "FAIL"
            print(
                f"\ntarget: one evaluation of all rules p95 <= {TARGET_MS:.0f} ms: {verdict}"
                f" ({p95:.1f} ms)"
            )
        finally:
            store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
