"""Print tokentop's ingest rate and pane refresh times on a generated history.

``python -m bench.run [--days 30] [--series 40] [--keep DB] [--reps 20] [--ingest-rows 200000]``

1. **Ingest**: ``Store.write_batch`` of one-minute usage buckets, in rows per second, as a share
   of a raw ``executemany`` of the same rows into a plain table with the same columns (same
   PRAGMAs, same transactions), best of several runs, all in this process. The price step
   (``price_batch``) is timed on its own.
2. **Pane refresh queries**: p50 and p95 of every query a pane refresh runs, for each time window,
   with "now" at the end of the generated history, and of one full refresh (all of them, with
   the slowest of the four ``cost_by`` groups: a refresh shows one).

At org scale (``--series 400``, anything but ``--baseline``, default 40) every figure is taken
for both series counts in the same run and printed side by side with their ratio, and
3. **Database size**: a ``--size-days`` (60) history of each, before and after compaction with
   ``--minutes-days`` (35) of one-minute data (and a check that the totals did not move).

Timings only; nothing here asserts. See ``bench/README.md`` for what each figure means.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from bench.generate import (
    CORE_SERIES,
    DAY,
    DEFAULT_END,
    TAIL_RATE,
    dataset_info,
    day_usage,
    generate,
    make_series,
)
from bench.generate import print_summary as print_generation
from tokentop.collectors.runner import price_batch
from tokentop.pricing.book import PriceBook
from tokentop.store import queries
from tokentop.store.db import SERIES_COLUMNS, USAGE_SUMS, Store, StoreError
from tokentop.store.records import USAGE_DIMENSIONS, Batch, UsageBucket, to_epoch
from tokentop.store.retention import Retention, compact

WINDOWS: dict[str, timedelta] = {
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "6h": timedelta(hours=6),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}
SUMMED_REFRESH = "full refresh (sum)"
"""Every pane query of one run summed, with the slowest ``cost_by`` group of the four (the Cost
pane shows one grouping; which one is the user's choice)."""
INGEST_TARGET = 0.70
"""``write_batch`` rows/s as a share of raw ``executemany``."""
REFRESH_TARGET_MS = 50.0
"""p95 of a full refresh (and so of every query in it)."""
RATIO_TARGET = 1.5
"""p95 of the spend queries at org scale over the baseline's."""
SIZE_RATIO_TARGET = 2.0
"""Database size at org scale over the baseline's, after compaction."""
SPEND_QUERIES = ("spend_summary", "totals", "spend_series")
"""The queries summed over every series: served by the per-origin rollups."""
COMPARED = ("tui build_snapshot", *SPEND_QUERIES, "cost_by model", "model_mix", "gpu_overview")
"""The rows of the side-by-side table."""


def ingest_data(
    rows: int, series: int, seed: int, tail_rate: float = TAIL_RATE
) -> list[list[UsageBucket]]:
    """``rows`` unpriced one-minute buckets from the generator, in batches of one UTC day each
    (time order, as a backfill writes them)."""
    all_series = make_series(series, seed, tail_rate)
    end_s = to_epoch(DEFAULT_END)
    day = end_s // DAY - 60  # any whole days will do; these go into fresh files
    batches: list[list[UsageBucket]] = []
    left = rows
    while left > 0:
        usage = day_usage(all_series, seed, day, day * DAY, (day + 1) * DAY, end_s)[:left]
        batches.append(usage)
        left -= len(usage)
        day += 1
    return batches


PLAIN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("start", "INTEGER"),
    ("source", "TEXT"),
    ("width", "INTEGER"),
    ("provider", "TEXT"),
    ("model", "TEXT"),
    *((d, "TEXT") for d in USAGE_DIMENSIONS),
    *((c, "INTEGER") for c in USAGE_SUMS),
    ("priced", "INTEGER"),
    ("price_ref", "TEXT"),
)
"""Every field of a usage bucket, as :func:`_row` gives them: the plain table's columns."""


def _row(b: UsageBucket) -> tuple[Any, ...]:
    # Every field of the bucket, in PLAIN_COLUMNS order.
    return (
        to_epoch(b.start),
        b.source,
        b.width_s,
        b.provider,
        b.model,
        b.project,
        b.api_key,
        b.workspace,
        b.tag,
        b.service_tier,
        b.batch,
        b.context_window,
        b.input_uncached,
        b.cache_read,
        b.cache_write_5m,
        b.cache_write_1h,
        b.output,
        b.requests,
        b.web_searches,
        b.cost_nano,
        int(b.priced),
        b.price_ref,
    )


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path)
    conn.isolation_level = None
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def _keyed_rows(
    path: Path, batches: Sequence[Sequence[tuple[Any, ...]]]
) -> list[list[tuple[Any, ...]]]:
    """The rows as the store's ``usage`` table holds them (origin, series and price ids in
    place of the dimensions and the price reference), the ``series`` and ``price`` rows stored
    beforehand in ``path``."""
    ids: dict[tuple[Any, ...], int] = {}
    origins: dict[tuple[Any, ...], int] = {}
    prices: dict[str, int] = {}
    out = []
    for rows in batches:
        out.append(
            [
                (
                    r[0],
                    origins.setdefault((r[1], r[3]), len(origins) + 1),
                    ids.setdefault((r[1], *r[3:12]), len(ids) + 1),
                    r[2],
                    *r[12:21],
                    prices.setdefault(r[21], len(prices) + 1),
                )
                for r in rows
            ]
        )
    conn = _connect(path)
    conn.executemany(
        f"INSERT INTO series (id, {', '.join(SERIES_COLUMNS)})"
        f" VALUES ({', '.join('?' * (len(SERIES_COLUMNS) + 1))})",
        [(i, *key) for key, i in ids.items()],
    )
    conn.executemany(
        "INSERT INTO price (id, ref) VALUES (?, ?)", [(i, r) for r, i in prices.items()]
    )
    conn.close()
    return out


def _raw(path: Path, batches: Sequence[Sequence[tuple[Any, ...]]], keyed: bool) -> float:
    """Seconds to ``executemany`` the rows, one transaction per batch.

    ``keyed``: into the store's own ``usage`` table (its primary key, ``INSERT OR REPLACE``), the
    series ids resolved beforehand; otherwise the bucket's every field (:data:`PLAIN_COLUMNS`)
    into a plain table with those columns and declared types, and no key.
    """
    Store(path).close()
    if keyed:
        batches = _keyed_rows(path, batches)
        width = len(batches[0][0]) if batches and batches[0] else 0
        sql = f"INSERT OR REPLACE INTO usage VALUES ({', '.join('?' * width)})"
    conn = _connect(path)
    if not keyed:
        conn.execute(f"CREATE TABLE raw_usage ({', '.join(f'{n} {t}' for n, t in PLAIN_COLUMNS)})")
        sql = f"INSERT INTO raw_usage VALUES ({', '.join('?' * len(PLAIN_COLUMNS))})"
    gc.collect()
    began = time.perf_counter()
    for rows in batches:
        conn.execute("BEGIN")
        conn.executemany(sql, rows)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - began
    conn.close()
    return elapsed


def _store(path: Path, batches: Sequence[Batch]) -> float:
    with Store(path) as store:
        gc.collect()
        began = time.perf_counter()
        for batch in batches:
            store.write_batch(batch)
        return time.perf_counter() - began


def _price(batches: Sequence[Batch]) -> float:
    book = PriceBook()  # cold: each model's rates are resolved once per hour, as in production
    gc.collect()
    began = time.perf_counter()
    for batch in batches:
        price_batch(book, batch)
    return time.perf_counter() - began


def bench_ingest(
    rows: int, series: int, seed: int, reps: int, tail_rate: float = TAIL_RATE
) -> float:
    """Print ingest rates, best of ``reps`` each, the variants interleaved so noise hits all;
    returns ``write_batch``'s share of the plain raw rate."""
    unpriced = [Batch(usage=tuple(b)) for b in ingest_data(rows, series, seed, tail_rate)]
    n = sum(len(b.usage) for b in unpriced)
    book = PriceBook()
    priced = [price_batch(book, b) for b in unpriced]
    tuples = [[_row(u) for u in b.usage] for b in priced]
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="tokentop-ingest-") as tmp:
        for rep in range(reps):
            runs: dict[str, Callable[[Path], float]] = {
                "plain": lambda p: _raw(p, tuples, keyed=False),
                "keyed": lambda p: _raw(p, tuples, keyed=True),
                "store": lambda p: _store(p, priced),
            }
            for name, run in runs.items():
                path = Path(tmp) / f"{name}-{rep}.db"
                best[name] = min(best.get(name, math.inf), run(path))
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
            best["price"] = min(best.get("price", math.inf), _price(unpriced))
    rate = {k: n / v for k, v in best.items()}
    share = rate["store"] / rate["plain"]
    print(
        f"\nIngest, {series} series: {n:,} one-minute usage buckets in {len(priced)} batches"
        f" (one UTC day, one transaction each), best of {reps}"
    )
    verdict = "PASS" if share >= INGEST_TARGET else "FAIL"
    lines = [
        ("raw executemany, plain table, same columns", rate["plain"], "rows/s", "100%", ""),
        (
            "raw executemany, the store's usage table",
            rate["keyed"],
            "rows/s",
            f"{rate['keyed'] / rate['plain']:.0%}",
            "its key, ids given, INSERT OR REPLACE, no rollup",
        ),
        (
            "Store.write_batch (rollups included)",
            rate["store"],
            "rows/s",
            f"{share:.0%}",
            f"target >= {INGEST_TARGET:.0%} of plain raw: {verdict}",
        ),
        ("price_batch (PriceBook, cold)", rate["price"], "buckets/s", "", "before the write"),
    ]
    for label, r, unit, pct, note in lines:
        print(f"  {label:42s} {r:>10,.0f} {unit:9s} {pct:>5s}  {note}")
    return share


@dataclass(frozen=True, slots=True)
class Timing:
    """Milliseconds of each run."""

    runs: list[float]

    def pct(self, q: float) -> float:
        """Nearest-rank percentile."""
        ordered = sorted(self.runs)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def pane_queries(
    store: Store, now: datetime, window: timedelta
) -> list[tuple[str, Callable[[], object]]]:
    """Every query of one refresh of every pane, as the panes call them."""
    start, end = now - window, now
    step = queries.series_step(start, end)
    gstep = queries.series_step(start, end, 60)
    out: list[tuple[str, Callable[[], object]]] = [
        ("spend_summary", lambda: queries.spend_summary(store, now)),
        ("totals", lambda: queries.totals(store, start, end)),
        ("spend_series", lambda: queries.spend_series(store, start, end, step)),
    ]
    for group in queries.GROUPS:
        out.append((f"cost_by {group}", partial(queries.cost_by, store, start, end, group)))
    out += [
        ("model_mix", lambda: queries.model_mix(store, start, end)),
        ("unpriced", lambda: queries.unpriced(store, start, end)),
        ("billed_vs_estimated", lambda: queries.billed_vs_estimated(store, start, end)),
        ("gpu_overview", lambda: queries.gpu_overview(store, start, end)),
        ("gpu_series", lambda: queries.gpu_series(store, start, end, gstep)),
        ("sources", lambda: queries.sources(store, now)),
        ("newest_usage", lambda: queries.newest_usage(store, now)),
    ]
    return out


def _snapshot_refresh(store: Store, now: datetime, window: str) -> Callable[[], object] | None:
    """The TUI's own refresh (one ``cost_by`` group), when its headless module imports."""
    try:
        from tokentop.tui.snapshot import WINDOWS as TUI_WINDOWS
        from tokentop.tui.snapshot import RefreshRequest, build_snapshot
    except ImportError:
        return None
    if window not in TUI_WINDOWS:
        return None
    request = RefreshRequest(seq=0, now=now, window=window)
    return lambda: build_snapshot(store, request)


Table = dict[str, dict[str, Timing]]
"""Timings by query name, then by window name."""


def time_queries(stores: Sequence[tuple[Store, datetime]], reps: int) -> list[Table]:
    """Time every pane query of every window on each store, the stores taking turns run by
    run (so that another process's noise hits them alike), after one warm-up run each."""
    tables: list[Table] = [{} for _ in stores]
    for wname, window in WINDOWS.items():
        plans = []
        for store, now in stores:
            calls = pane_queries(store, now, window)
            for _, call in calls:  # warm the page cache and the statement cache
                call()
            runs: dict[str, list[float]] = {name: [] for name, _ in calls}
            runs[SUMMED_REFRESH] = []
            runs["tui build_snapshot"] = []
            plans.append((calls, _snapshot_refresh(store, now, wname), runs))
        gc.collect()
        for _ in range(reps):
            for calls, snapshot, runs in plans:
                total = grouped = 0.0
                for name, call in calls:
                    began = time.perf_counter()
                    call()
                    ms = (time.perf_counter() - began) * 1000
                    runs[name].append(ms)
                    if name.startswith("cost_by "):
                        grouped = max(grouped, ms)  # the pane shows one group at a time
                    else:
                        total += ms
                runs[SUMMED_REFRESH].append(total + grouped)
                if snapshot is not None:
                    began = time.perf_counter()
                    snapshot()
                    runs["tui build_snapshot"].append((time.perf_counter() - began) * 1000)
        for table, (_calls, _snapshot, runs) in zip(tables, plans, strict=True):
            for name, values in runs.items():
                if values:
                    table.setdefault(name, {})[wname] = Timing(values)
    return tables


def print_queries(table: Table, now: datetime, reps: int, label: str = "") -> None:
    """Print the p50/p95 table of every pane query per window, and the verdicts."""
    print(f"\nPane refresh queries{label}: ms p50/p95 over {reps} runs, now = {now.isoformat()}")
    print(f"  {'query':22s}" + "".join(f"{w:>14s}" for w in WINDOWS))
    for name, by_window in table.items():
        if name == SUMMED_REFRESH:
            print("  " + "-" * (22 + 14 * len(WINDOWS)))
        cells = [
            f"{t.pct(0.5):.1f}/{t.pct(0.95):.1f}" if (t := by_window.get(w)) else "-"
            for w in WINDOWS
        ]
        print(f"  {name:22s}" + "".join(f"{c:>14s}" for c in cells))
    for name in (SUMMED_REFRESH, "tui build_snapshot"):
        if name in table:
            verdicts = [
                f"{w} {'PASS' if t.pct(0.95) <= REFRESH_TARGET_MS else 'FAIL'}"
                for w, t in table[name].items()
            ]
            print(f"  {name} p95 <= {REFRESH_TARGET_MS:.0f} ms: " + ", ".join(verdicts))
    slowest = max(
        (
            (t.pct(0.95), name, w)
            for name, bw in table.items()
            for w, t in bw.items()
            if name not in (SUMMED_REFRESH, "tui build_snapshot")
        ),
    )
    print(
        f"  every single query p95 <= {REFRESH_TARGET_MS:.0f} ms: "
        f"{'PASS' if slowest[0] <= REFRESH_TARGET_MS else 'FAIL'} "
        f"(slowest: {slowest[1]} at {slowest[2]}, {slowest[0]:.1f} ms)"
    )


def bench_queries(store: Store, now: datetime, reps: int, label: str = "") -> Table:
    """Time and print every pane query of one store (see :func:`time_queries`)."""
    (table,) = time_queries([(store, now)], reps)
    print_queries(table, now, reps, label)
    return table


def compare_queries(base: Table, scaled: Table, b: int, n: int) -> None:
    """Print p50 and p95 at ``b`` and ``n`` series side by side, with ratios, and the verdicts.

    The ratio target is judged on p50: the spend queries take a fraction of a millisecond, so
    their p95 is the scheduler's (a 0.1 ms query that waited 4 ms for a core once in twenty
    runs), not the query's; p95 is shown beside it, and the 50 ms target uses it."""
    print(f"\nSide by side: ms at {b} / {n} series, p50 (ratio) and p95, timed in turns")
    print(f"  {'query':20s}" + "".join(f"{w:>27s}" for w in WINDOWS))
    worst: dict[str, float] = {}
    for name in COMPARED:
        if name not in base or name not in scaled:
            continue
        cells = []
        for w in WINDOWS:
            x, y = base[name].get(w), scaled[name].get(w)
            if x is None or y is None:
                cells.append("-")
                continue
            ratio = y.pct(0.5) / max(x.pct(0.5), 1e-9)
            worst[name] = max(worst.get(name, 0.0), ratio)
            p95 = f"{x.pct(0.95):.0f}/{y.pct(0.95):.0f}"
            cells.append(f"{x.pct(0.5):.1f}/{y.pct(0.5):.1f} ({ratio:.2f}) {p95}")
        print(f"  {name:20s}" + "".join(f"{c:>27s}" for c in cells))
    spend = [worst[q] for q in SPEND_QUERIES if q in worst]
    if spend:
        verdict = "PASS" if max(spend) <= RATIO_TARGET else "FAIL"
        print(
            f"  spend queries p50 ratio {n}/{b} <= {RATIO_TARGET}, every window: {verdict}"
            f" (worst {max(spend):.2f})"
        )
    tui = scaled.get("tui build_snapshot")
    if tui:
        slow = max((t.pct(0.95), w) for w, t in tui.items())
        verdict = "PASS" if slow[0] <= REFRESH_TARGET_MS else "FAIL"
        print(
            f"  tui build_snapshot p95 <= {REFRESH_TARGET_MS:.0f} ms at {n} series, every"
            f" window: {verdict} (slowest {slow[1]}, {slow[0]:.1f} ms)"
        )


def _kept(args: argparse.Namespace, days: int, series: int) -> Path | None:
    """Where ``--keep`` keeps a dataset: the path itself for the one dataset of a plain run,
    else one file per days and series beside it (``tt-d30-s400.db``)."""
    keep: Path | None = args.keep
    if keep is None:
        return None
    if series == args.series and days == args.days and args.series == args.baseline:
        return keep
    return keep.with_name(f"{keep.stem}-d{days}-s{series}{keep.suffix or '.db'}")


def _dataset(args: argparse.Namespace, tmp: Path, days: int, series: int) -> Path:
    keep = _kept(args, days, series)
    wanted: dict[str, object] = {"days": days, "series": series, "seed": args.seed}
    if series > CORE_SERIES:
        wanted["tail_rate"] = args.tail_rate
    if keep is not None and keep.exists():
        try:
            with Store(keep, readonly=True) as store:
                info = dataset_info(store)
        except StoreError as exc:  # e.g. generated before a schema change
            sys.exit(f"--keep {keep}: {exc}; or delete it and let this regenerate it")
        if info is None or any(info.get(k) != v for k, v in wanted.items()):
            sys.exit(f"--keep {keep}: holds {info}, not {wanted}; delete it or pick another")
        print(f"dataset: reusing {keep} ({info})")
        return keep
    path = keep if keep is not None else tmp / f"bench-d{days}-s{series}.db"
    print(f"dataset: generating {days} days x {series} series into {path}")
    summary = generate(path, days=days, series=series, seed=args.seed, tail_rate=args.tail_rate)
    print_generation(summary)
    return path


@dataclass(frozen=True, slots=True)
class Size:
    """A history's file before and after compaction."""

    series: int
    buckets: int
    before: int
    after: int
    after_rows: int
    totals_kept: bool
    """Totals over the whole history (cost to the nano-dollar, tokens, requests) unchanged."""
    seconds: float


def bench_size(args: argparse.Namespace, tmp: Path, series: int) -> Size:
    """A ``--size-days`` history of ``series``: its file, then a compacted copy's (one-minute
    data for ``--minutes-days``, shrunk with ``VACUUM``, as ``tokentop db compact`` leaves it)."""
    source = _dataset(args, tmp, args.size_days, series)
    path = tmp / f"size-s{series}.db"
    shutil.copyfile(source, path)
    with Store(path) as store:
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        info = dataset_info(store) or {}
        end = datetime.fromisoformat(str(info.get("end", DEFAULT_END.isoformat())))
        whole = (end - timedelta(days=args.size_days + 1), end + timedelta(seconds=1))
        buckets = store.query("SELECT COUNT(*) FROM usage")[0][0]
        before_totals = queries.totals(store, *whole)
        before = path.stat().st_size
        began = time.perf_counter()
        compact(store, end, Retention(minutes_days=args.minutes_days))
        seconds = time.perf_counter() - began
        store.conn.execute("VACUUM")
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        kept = queries.totals(store, *whole) == before_totals
        rows = store.query("SELECT COUNT(*) FROM usage")[0][0]
    after = sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())
    path.unlink()
    return Size(series, buckets, before, after, rows, kept, seconds)


def print_sizes(sizes: Sequence[Size], args: argparse.Namespace) -> None:
    """Print the file sizes side by side and the ratio to the first."""
    print(
        f"\nDatabase size: {args.size_days} days of history, compacted to {args.minutes_days:g}"
        " days of one-minute data (VACUUM after)"
    )
    print(
        f"  {'series':>6s} {'buckets':>12s} {'before':>12s} {'after':>12s} {'rows after':>12s}"
        f" {'ratio':>7s}  totals unchanged  compaction"
    )
    first = sizes[0]
    for sz in sizes:
        print(
            f"  {sz.series:>6d} {sz.buckets:>12,} {sz.before / 2**20:>8,.1f} MiB"
            f" {sz.after / 2**20:>8,.1f} MiB {sz.after_rows:>12,}"
            f" {sz.after / first.after:>7.2f}  {'yes' if sz.totals_kept else 'NO':16s}"
            f"  {sz.seconds:.1f} s"
        )
    if len(sizes) > 1:
        ratio = sizes[-1].after / first.after
        verdict = "PASS" if ratio <= SIZE_RATIO_TARGET else "FAIL"
        print(
            f"  {sizes[-1].series}-series file <= {SIZE_RATIO_TARGET:g} x the"
            f" {first.series}-series file after compaction: {verdict} ({ratio:.2f})"
        )


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--days", type=int, default=30, help="history to generate (2: quick)")
    parser.add_argument("--series", type=int, default=40)
    parser.add_argument(
        "--baseline",
        type=int,
        default=CORE_SERIES,
        help="series count compared with --series, in the same run (default 40)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--tail-rate",
        type=float,
        default=TAIL_RATE,
        help=f"requests/min of a series beyond the first {CORE_SERIES} (median, at peak)",
    )
    parser.add_argument("--keep", type=Path, help="database to reuse, or to generate and keep")
    parser.add_argument("--reps", type=int, default=20, help="runs of each query per window")
    parser.add_argument("--ingest-rows", type=int, default=200_000)
    parser.add_argument("--ingest-reps", type=int, default=3)
    parser.add_argument("--no-ingest", action="store_true")
    parser.add_argument("--no-queries", action="store_true")
    parser.add_argument(
        "--size-days",
        type=int,
        default=60,
        help="history of the size comparison, at org scale (0: skip it)",
    )
    parser.add_argument("--minutes-days", type=float, default=35.0)
    args = parser.parse_args(argv)
    if min(args.days, args.series, args.reps, args.ingest_rows, args.ingest_reps) < 1:
        parser.error("--days, --series, --reps, --ingest-rows and --ingest-reps must be >= 1")
    if args.baseline < 1 or args.size_days < 0 or args.minutes_days < 1 or args.tail_rate <= 0:
        parser.error("--baseline and --minutes-days must be >= 1, --size-days >= 0")
    counts = [args.series] if args.series == args.baseline else [args.baseline, args.series]
    print(
        f"python {platform.python_version()}, sqlite {sqlite3.sqlite_version}, "
        f"{os.cpu_count()} CPUs, {platform.machine()} {platform.system()}"
    )
    with tempfile.TemporaryDirectory(prefix="tokentop-bench-") as tmp:
        if not args.no_ingest:
            shares = [
                bench_ingest(args.ingest_rows, n, args.seed, args.ingest_reps, args.tail_rate)
                for n in counts
            ]
            if len(shares) > 1:
                print(
                    f"  write_batch share of plain raw at {counts[0]} / {counts[1]} series:"
                    f" {shares[0]:.0%} / {shares[1]:.0%}"
                )
        if not args.no_queries:
            print()
            paths = [_dataset(args, Path(tmp), args.days, n) for n in counts]
            stores = [Store(path, readonly=True) for path in paths]
            try:
                ends = [
                    datetime.fromisoformat(
                        str((dataset_info(st) or {}).get("end", DEFAULT_END.isoformat()))
                    )
                    for st in stores
                ]
                tables = time_queries(list(zip(stores, ends, strict=True)), args.reps)
            finally:
                for st in stores:
                    st.close()
            for n, end, table in zip(counts, ends, tables, strict=True):
                print_queries(table, end, args.reps, f", {n} series")
            if len(tables) > 1:
                compare_queries(tables[0], tables[1], *counts)
        if len(counts) > 1 and args.size_days:
            print()
            print_sizes([bench_size(args, Path(tmp), n) for n in counts], args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
