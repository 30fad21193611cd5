"""``tokentop db info`` and ``tokentop db compact``: the database file, and its retention.

``db info`` prints each table's rows, size and time range, ``usage`` per resolution (one-minute
buckets, folded hours, days) and where the retention horizons stand. ``db compact`` folds what
is older than the ``[retention]`` settings now (the collector does it every few minutes anyway),
then shrinks the file unless a collector is writing to it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from tokentop.store.text import clean


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``db info`` and ``db compact`` to the ``tokentop`` parser."""
    db = sub.add_parser(
        "db", parents=[common], help="the database: sizes and ranges, retention, compaction"
    )
    dsub = db.add_subparsers(dest="db_command", metavar="{info,compact}", parser_class=type(db))
    dsub.required = True
    info = dsub.add_parser(
        "info", parents=[common], help="rows, size and time range per table and resolution"
    )
    info.add_argument("--json", action="store_true")
    compact = dsub.add_parser(
        "compact",
        parents=[common],
        help="fold data older than the retention settings now, then shrink the file",
    )
    compact.add_argument(
        "--minutes-days",
        type=_days,
        metavar="D",
        help="days of one-minute data to keep (default: [retention] minutes_days, 35)",
    )
    compact.add_argument(
        "--hours-days",
        type=_days,
        metavar="D",
        help="days of hourly data to keep (default: [retention] hours_days, 400)",
    )
    compact.add_argument(
        "--no-vacuum",
        action="store_true",
        help="leave the freed pages for new writes to reuse instead of shrinking the file",
    )
    compact.add_argument("--json", action="store_true")


def _days(value: str) -> float:
    from tokentop.collectors.config import RETENTION_DAYS_MAX

    try:
        days = float(value)
    except ValueError:
        days = -1.0
    if not 1 <= days <= RETENTION_DAYS_MAX:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"expected a number of days from 1 to {RETENTION_DAYS_MAX:g}, got {value!r}"
        )
    return days


def _usage_error(message: str) -> Exception:
    from tokentop.tui.cli import UsageError

    return UsageError(message)


def periodic_tasks(config: Any, store: Any) -> list[Any]:
    """The runner's periodic compaction (``[retention]``), beside the alert engine."""
    from tokentop.collectors.compaction import Compactor

    return [Compactor(store, config.retention)]


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def _when(value: datetime | None) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M}"


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _db(ctx: Any) -> int:
    if not ctx.db_path.exists():
        raise _usage_error(f"no database at {ctx.db_path} (pass --db)")
    if ctx.args.db_command == "info":
        return _info(ctx)
    return _compact(ctx)


def _info(ctx: Any) -> int:
    from tokentop.store.db import Store, StoreError
    from tokentop.store.retention import database_info

    try:
        store = Store(ctx.db_path, readonly=True)
    except StoreError as exc:
        raise _usage_error(str(exc)) from None
    try:
        info = database_info(store)
    finally:
        store.close()
    retention = ctx.config.retention
    if ctx.args.json:
        print(
            json.dumps(
                {
                    "database": str(info.path),
                    "file_bytes": info.file_bytes,
                    "free_bytes": info.free_bytes,
                    "retention": {
                        "minutes_days": retention.minutes_days,
                        "hours_days": retention.hours_days,
                        "minutes_since": _iso(info.minutes_before),
                        "hours_since": _iso(info.hours_before),
                    },
                    "tables": [
                        {
                            "name": t.name,
                            "rows": t.rows,
                            "bytes": t.bytes,
                            "first": _iso(t.first),
                            "last": _iso(t.last),
                        }
                        for t in info.tables
                    ],
                    "usage_by_resolution": [
                        {
                            "resolution": t.name,
                            "rows": t.rows,
                            "first": _iso(t.first),
                            "last": _iso(t.last),
                        }
                        for t in info.usage_by_width
                    ],
                },
                indent=2,
            )
        )
        return 0
    print(
        f"database {clean(str(info.path))}: {_mib(info.file_bytes)}"
        f" ({_mib(info.free_bytes)} freed, reused before the file grows)"
    )
    if info.minutes_before is None:
        print(
            f"retention: one-minute data for {retention.minutes_days:g} days, hourly for"
            f" {retention.hours_days:g}, daily forever; nothing compacted yet"
        )
    else:
        days = f"; daily before {_when(info.hours_before)} UTC" if info.hours_before else ""
        print(
            f"retention: one-minute data since {_when(info.minutes_before)} UTC; hourly before"
            f" that{days} (kept: {retention.minutes_days:g} days of minutes,"
            f" {retention.hours_days:g} of hours)"
        )
    print(f"\n{'table':18s} {'rows':>12s} {'size':>12s}  {'first (UTC)':16s}  {'last (UTC)':16s}")
    for t in info.tables:
        print(
            f"{t.name:18s} {t.rows:>12,} {_mib(t.bytes):>12s}  {_when(t.first):16s}"
            f"  {_when(t.last):16s}"
        )
    print("\nusage by resolution kept (a folded bucket holds up to an hour, or a day, of minutes)")
    for t in info.usage_by_width:
        print(f"  {t.name:16s} {t.rows:>12,} {'':12s}  {_when(t.first):16s}  {_when(t.last):16s}")
    return 0


def _compact(ctx: Any) -> int:
    from tokentop.collectors.base import utcnow
    from tokentop.collectors.runner import active_collector
    from tokentop.store.db import Store, StoreError
    from tokentop.store.retention import Retention, Step, compact

    args = ctx.args
    retention = ctx.config.retention
    minutes = args.minutes_days if args.minutes_days is not None else retention.minutes_days
    hours = args.hours_days if args.hours_days is not None else retention.hours_days
    if hours < minutes:
        raise _usage_error(f"--hours-days {hours:g} is less than the minutes kept ({minutes:g})")
    try:
        store = Store(ctx.db_path)
    except StoreError as exc:
        raise _usage_error(str(exc)) from None
    try:
        size = _file_bytes(ctx.db_path)
        steps: list[Step] = []

        def progress(step: Step) -> None:
            steps.append(step)
            if not args.json and sys.stderr.isatty():
                print(f"\r{step.describe()[:100]:100s}", end="", file=sys.stderr)

        compact(store, utcnow(), Retention(minutes, hours), on_step=progress)
        if not args.json and sys.stderr.isatty() and steps:
            print(file=sys.stderr)
        writer = active_collector(store, utcnow())
        vacuumed = not args.no_vacuum and writer is None
        if vacuumed:
            store.conn.execute("VACUUM")
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        store.close()
    after = _file_bytes(ctx.db_path)
    summary = _summary(steps)
    if args.json:
        print(
            json.dumps(
                {
                    "database": str(ctx.db_path),
                    "minutes_days": minutes,
                    "hours_days": hours,
                    **summary,
                    "vacuumed": vacuumed,
                    "file_bytes_before": size,
                    "file_bytes_after": after,
                },
                indent=2,
            )
        )
        return 0
    print(
        f"compacted {clean(str(ctx.db_path))}: {summary['steps']} steps; usage rows"
        f" {summary['usage_rows_before']:,} -> {summary['usage_rows_after']:,} in the slices"
        f" folded; {summary['samples_deleted']:,} samples and requests deleted"
    )
    if vacuumed:
        print(f"file {_mib(size)} -> {_mib(after)}")
    elif writer is not None:
        print(
            f"file {_mib(after)}: collector pid {writer} is writing, so the file was not shrunk"
            " (new writes reuse the freed pages); stop it and run again to shrink it"
        )
    else:
        print(f"file {_mib(after)} (not shrunk: --no-vacuum)")
    return 0


def _summary(steps: Sequence[Any]) -> dict[str, int]:
    return {
        "steps": len(steps),
        "usage_rows_before": sum(s.rows_before for s in steps),
        "usage_rows_after": sum(s.rows_after for s in steps),
        "samples_deleted": sum(s.samples_deleted for s in steps),
    }


def _file_bytes(path: Any) -> int:
    files = [path, path.with_name(path.name + "-wal")]
    return sum(p.stat().st_size for p in files if p.exists())


HANDLERS: dict[str, Callable[[Any], int]] = {"db": _db}
