"""The ``tokentop`` command. Imports the Textual app only for the commands that show it.

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error (one line naming the value).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

from tokentop import __version__
from tokentop.collectors.base import utcnow
from tokentop.collectors.config import Config, ConfigError, default_db_path, load_config
from tokentop.store.basics import usd_to_nano
from tokentop.store.text import clean

USAGE_ERROR = 2
FAILURE = 1

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
"""The earliest time a window may start: nothing was metered before, and dates stay in range."""
LATEST = datetime(3000, 1, 1, tzinfo=UTC)
"""The latest end of a window: the window before it (of equal length, for the change
columns) still starts after year 1."""
MAX_TOKENS = 10**15
"""Token counts ``price`` accepts: a quadrillion tokens is far above any real query, and keeps
the arithmetic on prices exact."""


class UsageError(Exception):
    """A bad flag or value; printed as one line, exit code 2."""


class Failure(Exception):
    """A runtime failure; printed as one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def parse_since(value: str, now: datetime) -> datetime:
    """``15m``, ``1h``, ``7d`` ago, or an ISO timestamp (UTC unless it says otherwise)."""
    m = _DURATION.match(value)
    if m:
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
        if seconds > (now - EPOCH).total_seconds():
            raise UsageError(f"--since: {value!r} reaches back before 1970-01-01")
        return now - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(value.strip())
        when = (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):
        raise UsageError(
            f"--since: cannot read {value!r} (use 15m, 1h, 7d or an ISO timestamp)"
        ) from None
    if when > now:
        raise UsageError(f"--since: {value!r} is in the future")
    if when < EPOCH:
        raise UsageError(f"--since: {value!r} is before 1970-01-01")
    return when


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative whole number of tokens, got {value!r}"
        ) from None
    if number < 0:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative whole number of tokens, got {value!r}"
        )
    if number > MAX_TOKENS:
        raise argparse.ArgumentTypeError(f"expected at most 10^15 tokens, got {value!r}")
    return number


def _interval(value: str) -> float:
    from tokentop.collectors.config import LOCAL_INTERVAL_MIN_S

    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if not LOCAL_INTERVAL_MIN_S <= number <= 86400:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"expected seconds from {LOCAL_INTERVAL_MIN_S:g} to 86400, got {value!r}"
        )
    return number


def _at(value: str) -> datetime:
    try:
        when = datetime.fromisoformat(value)
        when = (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"expected a date or ISO timestamp, got {value!r}"
        ) from None
    if not EPOCH <= when < LATEST:
        raise argparse.ArgumentTypeError(f"expected a date from 1970 to 2999, got {value!r}")
    return when


def _common(suppress: bool) -> argparse.ArgumentParser:
    # Subcommands repeat the global options; their defaults are suppressed so that a global
    # option given before the subcommand is not reset by the subcommand's default.
    extra: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    common = _Parser(add_help=False)
    common.add_argument("--db", type=Path, help="database file (env TOKENTOP_DB)", **extra)
    common.add_argument(
        "--config", type=Path, help="config file, TOML (env TOKENTOP_CONFIG)", **extra
    )
    common.add_argument(
        "--demo", action="store_true", help="use simulated traffic (no keys)", **extra
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log to stderr", **extra)
    from tokentop.tui import cli_prometheus

    cli_prometheus.add_prometheus_option(common, **extra)
    return common


def _export_formats(value: str) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(f.strip().lower() for f in value.split(",") if f.strip()))
    bad = [f for f in formats if f not in ("json", "csv", "md")]
    if bad or not formats:
        raise argparse.ArgumentTypeError(f"{value!r}: use json, csv or md, comma-separated")
    return formats


def _sort(value: str) -> tuple[str, bool]:
    from tokentop.store.view import parse_sort

    try:
        return parse_sort(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _view_options(parser: argparse.ArgumentParser) -> None:
    """The view of the TUI, for ``report`` and ``export``: the same rows as the screen."""
    from tokentop.store.basics import GROUPS

    parser.add_argument(
        "--until", metavar="ISO", help="window end, an ISO timestamp (default: now)"
    )
    parser.add_argument(
        "--filter",
        default="",
        metavar="TEXT",
        help="as the TUI's /: substrings of provider, model, project, tag or key, and"
        " model:NAME, project:NAME, tag:NAME, key:NAME, provider:NAME for exact values",
    )
    parser.add_argument(
        "--group-by",
        default="model",
        choices=GROUPS,
        help="the group table's rows (default model)",
    )
    parser.add_argument(
        "--sort",
        type=_sort,
        default=None,
        metavar="COLUMN[:asc|desc]",
        help="order of the group table: name, per_request, change, requests, cost, in, out,"
        " cache (default cost:desc)",
    )


class _Unbuilt:
    """Stands for a parser (or group, or subparsers action) of a command not being parsed:
    whatever is added to it is dropped."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: _Unbuilt()


class _OneCommand:
    """The subparsers action as the code adding commands sees it when only ``name`` is parsed:
    the other commands' parsers are never built."""

    def __init__(self, sub: Any, name: str) -> None:
        self._sub = sub
        self._name = name

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        return self._sub.add_parser(name, **kwargs) if name == self._name else _Unbuilt()


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line, as DESIGN.md fixes it; with ``only``, the top level and that command
    alone (see :func:`parse_args`)."""
    common = _common(suppress=True)

    parser = _Parser(
        prog="tokentop",
        description="Live LLM unit economics in the terminal.",
        parents=[_common(suppress=False)],
    )
    parser.add_argument("--version", action="version", version=f"tokentop {__version__}")
    parser.add_argument(
        "--window",
        default="1h",
        choices=["15m", "1h", "6h", "24h", "7d", "30d"],
        help="initial time window of the TUI",
    )
    parser.add_argument(
        "--watch-only",
        action="store_true",
        help="only view: never collect, not even when the collector being watched stops",
    )
    parser.add_argument(
        "--export-dir",
        type=Path,
        metavar="DIR",
        help="where `e` writes snapshots (default: the user data folder's snapshots/)",
    )
    parser.add_argument(
        "--export-format",
        type=_export_formats,
        default=("json",),
        metavar="FORMATS",
        help="what `e` writes beside the SVG: json, csv, md, comma-separated (default json)",
    )
    sub: Any = parser.add_subparsers(dest="command", parser_class=_Parser)
    if only is not None:
        sub = _OneCommand(sub, only)

    collect = sub.add_parser("collect", parents=[common], help="run the collectors headless")
    collect.add_argument("--once", action="store_true", help="poll every source once and exit")
    collect.add_argument(
        "--interval",
        type=_interval,
        metavar="S",
        help="poll interval for GPU, inference and demo sources",
    )
    from tokentop.tui import cli_prometheus

    cli_prometheus.add_metrics_options(collect)

    report = sub.add_parser("report", parents=[common], help="summarise a time window")
    report.add_argument("--since", default="1h", help="15m, 1h, 7d or an ISO timestamp")
    _view_options(report)
    report.add_argument("--json", action="store_true", help="machine-readable output")

    export = sub.add_parser("export", parents=[common], help="write a snapshot of a window")
    export.add_argument("--since", default="2h", help="15m, 1h, 7d or an ISO timestamp")
    _view_options(export)
    export.add_argument("--format", required=True, help="json, csv, md or svg")
    export.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")

    price = sub.add_parser("price", parents=[common], help="price some tokens of a model")
    price.add_argument("model")
    price.add_argument("--input", type=_count, default=None, help="input tokens, cached included")
    price.add_argument("--output", type=_count, default=0, help="output tokens")
    price.add_argument("--cached", type=_count, default=0, help="of the input, cache reads")
    price.add_argument(
        "--cache-write", type=_count, default=0, help="of the input, cache writes (5 minute)"
    )
    price.add_argument("--input-file", type=Path, help="count the input tokens of this file")
    price.add_argument("--provider", default="", help="openai, anthropic, ...")
    price.add_argument("--at", type=_at, help="price in force at this date (default: now)")
    price.add_argument(
        "--batch", action="store_true", help="served by the Batch API / Message Batches"
    )
    price.add_argument(
        "--service-tier",
        default="",
        metavar="TIER",
        help="the tier that served it: default, priority, flex, ... (unknown: list, flagged)",
    )
    price.add_argument("--json", action="store_true")

    sources = sub.add_parser("sources", parents=[common], help="configured sources and health")
    sources.add_argument("--json", action="store_true")

    from tokentop.tui import cli_alerts, cli_db, cli_meter

    cli_meter.add_commands(sub, common)
    cli_alerts.add_commands(sub, common)
    cli_db.add_commands(sub, common)
    return parser


_LEADING_WITH_VALUE = frozenset({"--db", "--config", "--prometheus"})
_LEADING_FLAGS = frozenset({"--demo", "-v", "--verbose"})


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line, building the parser of the command given alone when the words
    before it are plain global options: a status bar's ``tokentop status`` does not build the
    parsers of every other command. Whatever that parser refuses, the whole one parses again,
    so errors (and help) read as they always have."""
    words = list(sys.argv[1:] if argv is None else argv)
    i = 0
    while i < len(words):
        word = words[i]
        if word in _LEADING_WITH_VALUE:
            i += 2
        elif word in _LEADING_FLAGS or word.split("=", 1)[0] in _LEADING_WITH_VALUE:
            i += 1
        else:
            break
    if i < len(words) and not words[i].startswith("-"):
        try:
            return build_parser(only=words[i]).parse_args(words)
        except UsageError:
            pass
    return build_parser().parse_args(words)


@dataclass
class _Context:
    args: argparse.Namespace
    config: Config
    db_path: Path
    label: str


def _context(args: argparse.Namespace) -> _Context:
    config = load_config(args.config, explicit=args.config is not None)
    db_path = args.db if args.db is not None else default_db_path(demo=args.demo)
    return _Context(args, config, db_path, "demo" if args.demo else "")


_NO_STDOUT = frozenset({"tui", "collect", "proxy"})
"""Commands whose results do not go to standard output."""


_NO_LOGGING = frozenset({"status"})
"""Commands that log nothing (unless ``-v``): a status bar's line starts without ``logging``."""


def _configure_logging(verbose: bool) -> None:
    """Log to stderr, from INFO up with ``-v`` (else only CRITICAL). Log lines carry error bodies
    and names from outside: their control characters are escaped (a traceback, added after the
    message, keeps its own lines)."""
    import logging

    class CleanFormatter(logging.Formatter):
        def formatMessage(self, record: logging.LogRecord) -> str:
            return clean(super().formatMessage(record))

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(CleanFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.CRITICAL, handlers=[handler])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    db_path: Path | None = None
    try:
        args = parse_args(argv)
        command = args.command or "tui"
        if sys.stdout is None and command not in _NO_STDOUT and not getattr(args, "output", None):
            print("tokentop: error: standard output is closed", file=sys.stderr)
            return FAILURE
        if args.verbose or command not in _NO_LOGGING:
            _configure_logging(args.verbose)
        ctx = _context(args)
        db_path = ctx.db_path
        from tokentop.tui import cli_alerts, cli_db, cli_meter

        handler = {
            "tui": _tui,
            "collect": _collect,
            "report": _report,
            "export": _export,
            "price": _price,
            "sources": _sources,
            **cli_meter.HANDLERS,
            **cli_alerts.HANDLERS,
            **cli_db.HANDLERS,
        }[command]
        return handler(ctx)
    except (UsageError, ConfigError) as exc:
        return _usage_error(exc, argv)
    except Failure as exc:
        print(f"tokentop: error: {clean(exc)}", file=sys.stderr)
        return FAILURE
    except BrokenPipeError:
        # The reader went away (``| head``): say so once; nothing more can be written there.
        _silence_stdout()
        print("tokentop: error: standard output closed before all was written", file=sys.stderr)
        return FAILURE
    except Exception as exc:
        if _is_store_error(exc):
            # A database file that cannot be used is a bad --db (or TOKENTOP_DB) value.
            return _usage_error(exc, argv)
        sqlite = sys.modules.get("sqlite3")
        if sqlite is None or not isinstance(exc, sqlite.Error):
            raise
        # Found broken while reading (a truncated file, a disk error): a runtime failure.
        where = f"{db_path}: " if db_path is not None else ""
        print(f"tokentop: error: {clean(where)}database error: {clean(exc)}", file=sys.stderr)
        return FAILURE
    except KeyboardInterrupt:
        return 130


def _usage_error(exc: Exception, argv: Sequence[str] | None) -> int:
    from tokentop.tui import cli_alerts

    if cli_alerts.is_check(argv):  # the monitoring-plugin convention: UNKNOWN, exit 3
        return cli_alerts.check_usage_error(exc)
    print(f"tokentop: error: {clean(exc)}", file=sys.stderr)
    return USAGE_ERROR


def _is_store_error(exc: BaseException) -> bool:
    # Without importing the store (``status`` starts without it): no store, no StoreError.
    db = sys.modules.get("tokentop.store.db")
    return db is not None and isinstance(exc, db.StoreError)


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that the flush at exit raises nothing more."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _open_store(ctx: _Context, *, must_exist: bool, readonly: bool = False) -> Any:
    """The database: a reader's opens read-only (never a write, never a schema; the file must
    exist), a writer's creates the file and its schema when missing."""
    from tokentop.store.db import Store

    if (must_exist or readonly) and not _exists(ctx.db_path):
        hint = "tokentop collect --demo --once" if ctx.args.demo else "tokentop collect"
        raise UsageError(f"no database at {ctx.db_path} (run `{hint}` first, or pass --db)")
    store = Store(ctx.db_path, readonly=readonly)
    if ctx.label and not readonly:
        store.set_meta("label", ctx.label)
    return store


def _exists(path: Path) -> bool:
    """Whether something is at ``path`` (what it is, the store says); ``False`` for a path
    under a file (``/etc/passwd/x.db``), which the store names as such."""
    try:
        path.stat()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # let the store say what is wrong with it
    return True


def _tui(ctx: _Context) -> int:
    from tokentop.collectors.runner import Runner, acquire_collector
    from tokentop.collectors.sources import build_sources
    from tokentop.pricing.book import PriceBook
    from tokentop.tui import cli_alerts, cli_db, cli_prometheus
    from tokentop.tui.app import TokentopApp

    if cli_prometheus.prometheus_url(ctx):
        return cli_prometheus.tui(ctx)
    watch_only = bool(ctx.args.watch_only)
    # Only watching: read-only, so a viewer without write access can watch, and nothing is
    # created (the collector watched makes the file).
    store = _open_store(ctx, must_exist=False, readonly=watch_only)
    label = ctx.label or (store.get_meta("label") or "")

    def make_runner() -> Runner:
        # A viewer that collects hands over to a ``tokentop collect`` that asks (role "tui").
        collectors = build_sources(ctx.config, demo=ctx.args.demo)
        alerts = cli_alerts.alert_tasks(ctx.config, store, collectors, ctx.args.demo)
        alerts += cli_db.periodic_tasks(ctx.config, store)  # retention: compaction
        return Runner(store, collectors, PriceBook(ctx.config.pricing), role="tui", periodic=alerts)

    runner = None
    if not watch_only:
        runner = make_runner()
        if runner.collectors and acquire_collector(store, utcnow(), role="tui") is not None:
            # Another process (``tokentop collect`` or another TUI) fills this database: watch
            # it rather than poll the same APIs twice (and take over if it stops).
            import asyncio

            asyncio.run(runner.aclose())
            runner = None
    app = TokentopApp(
        ctx.db_path,
        config=ctx.config,
        runner=runner,
        label=label,
        refresh_s=ctx.config.refresh_s,
        start_window=ctx.args.window,
        export_dir=ctx.args.export_dir,
        export_formats=ctx.args.export_format,
        collector_factory=None if watch_only else make_runner,
        watch_only=watch_only,
        readonly=watch_only,
    )
    try:
        app.run()
    finally:
        store.close()
    return app.return_code or 0


NO_SOURCES = (
    "no sources configured: set OPENAI_ADMIN_KEY or ANTHROPIC_ADMIN_KEY, add [[inference]] to"
    " the config, meter requests through `tokentop proxy`, or try --demo"
)
"""What to do when there is nothing to collect (one line)."""


def _collect(ctx: _Context) -> int:
    from tokentop.collectors.runner import Runner
    from tokentop.collectors.sources import build_sources, optional_sources
    from tokentop.pricing.book import PriceBook
    from tokentop.tui import cli_alerts, cli_db

    collectors = build_sources(ctx.config, demo=ctx.args.demo, interval_s=ctx.args.interval)
    optional = optional_sources(ctx.config, ctx.args.demo)
    if not collectors:
        print(f"tokentop: error: {NO_SOURCES}", file=sys.stderr)
        return FAILURE
    # The price book loads before the lock is taken: the first heartbeat follows soon after.
    book = PriceBook(ctx.config.pricing)
    store = _open_store(ctx, must_exist=False)
    signalled: list[int] = []
    if not ctx.args.once:
        # From here a SIGINT or SIGTERM is noted, not acted on: it ends a wait for the lock, and
        # once the lock is held the runner stops at once, in order (it lets the lock go).
        _defer_stop_signals(signalled)
        other = _lock_for_collect(store, ctx.db_path, signalled)
        if other is not None:
            store.close()
            if signalled:
                return 128 + signalled[0]
            print(
                f"tokentop: error: another collector (pid {other}) is already writing "
                f"{ctx.db_path}; stop it first",
                file=sys.stderr,
            )
            return FAILURE
    show_progress = sys.stderr.isatty()

    def progress(name: str, fraction: float) -> None:
        if show_progress:
            bar = "#" * int(fraction * 30)
            end = "\n" if fraction >= 1 else ""
            print(f"\r{name:>12} backfill [{bar:<30}] {fraction:4.0%}", end=end, file=sys.stderr)

    alerts = cli_alerts.alert_tasks(ctx.config, store, collectors, ctx.args.demo)
    alerts += cli_db.periodic_tasks(ctx.config, store)  # retention: compaction
    runner = Runner(store, collectors, book, on_progress=progress, periodic=alerts)
    from tokentop.tui import cli_prometheus

    metrics = None
    try:
        metrics = cli_prometheus.start_metrics(ctx)
        if ctx.args.once:
            import asyncio

            results = asyncio.run(runner.run_once_and_close())
            from tokentop.store import queries

            health = {h.name: h for h in queries.sources(store, utcnow())}
            failed = False
            absent = 0
            for name, ok in results.items():
                h = health.get(name)
                status = "ok" if ok else f"{h.state if h else 'error'}: {h.last_error if h else ''}"
                print(f"{clean(name)}: {clean(status)}", file=sys.stderr)
                # A GPU source tried on the off chance is no failure on a machine without GPUs.
                merely_absent = name in optional and h is not None and h.state == "unavailable"
                absent += merely_absent
                failed = failed or not (ok or merely_absent)
            if absent == len(results):
                # Only the GPU was tried, and there is none: nothing at all is configured.
                print(f"tokentop: error: {NO_SOURCES}", file=sys.stderr)
                return FAILURE
            return FAILURE if failed else 0
        import asyncio

        asyncio.run(_run_until_signal(runner, signalled))
        if runner.lost_to is not None:
            print(
                f"tokentop: error: collector pid {runner.lost_to.pid} took {ctx.db_path} over;"
                " stopped collecting",
                file=sys.stderr,
            )
            return FAILURE
        return 0
    finally:
        if metrics is not None:
            metrics.close()
        store.close()


def _lock_for_collect(store: Any, db_path: Path, signalled: Sequence[int] = ()) -> int | None:
    """Take the file's collector lock; ``None`` once held, else the pid that keeps it.

    A headless collector that holds it keeps it. A viewer that collects (role ``tui``) is asked
    to hand over, and this waits (at most :data:`HANDOVER_WAIT_S`) until its last poll has landed
    and it has let go: never two writers. A signal noted in ``signalled`` ends the wait.
    """
    import time

    from tokentop.collectors.runner import (
        HANDOVER_WAIT_S,
        acquire_collector,
        clear_handover,
        request_handover,
    )

    other = acquire_collector(store, utcnow())
    if other is None or other.role != "tui":
        return None if other is None else other.pid
    print(
        f"tokentop: taking over collection from the viewer (pid {other.pid}) that collects into"
        f" {db_path}",
        file=sys.stderr,
    )
    request_handover(store, utcnow())
    try:
        deadline = time.monotonic() + HANDOVER_WAIT_S
        while (
            other is not None
            and other.role == "tui"
            and time.monotonic() < deadline
            and not signalled
        ):
            time.sleep(0.25)
            other = acquire_collector(store, utcnow())
    finally:
        clear_handover(store)
    return None if other is None else other.pid


def _defer_stop_signals(signalled: list[int]) -> None:
    """Note SIGINT and SIGTERM in ``signalled`` instead of acting on them, until
    :func:`_run_until_signal` hands them to the runner."""

    def note(signum: int, _frame: object) -> None:
        signalled.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, note)


async def _run_until_signal(runner: Any, signalled: Sequence[int] = ()) -> None:
    """Run ``runner`` until SIGINT or SIGTERM (one already noted stops it at once)."""
    import asyncio

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, runner.stop)
    if signalled:
        runner.stop()
    await runner.run()


def _window(ctx: _Context, since: str) -> tuple[datetime, datetime, datetime]:
    now = utcnow()
    start = parse_since(since, now)
    until = getattr(ctx.args, "until", None)
    if not until:
        return start, now + timedelta(seconds=1), now
    try:
        end = datetime.fromisoformat(until.strip())
        end = (end if end.tzinfo else end.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):
        raise UsageError(f"--until: cannot read {until!r} (use an ISO timestamp)") from None
    if end >= LATEST:
        raise UsageError(f"--until: {until!r} is after 2999")
    if end <= start:
        raise UsageError(f"--until: {until!r} is not after --since {since!r}")
    return start, end, now


def _no_view_over_prometheus(ctx: _Context) -> None:
    args = ctx.args
    if args.filter or args.group_by != "model" or args.sort or args.until:
        raise UsageError(
            "--filter, --group-by, --sort and --until read the database; not with --prometheus"
        )


def _build_report(ctx: _Context, since: str) -> dict[str, Any]:
    from tokentop.pricing.book import PriceBook
    from tokentop.store.report import build_report

    start, end, now = _window(ctx, since)
    rates = [r.describe() for r in ctx.config.gpu_rates]
    store = _open_store(ctx, must_exist=True, readonly=True)
    try:
        prices = PriceBook(ctx.config.pricing).describe()
        # One read transaction: a write landing between two of the report's queries cannot
        # make a total differ from the sum of its rows.
        with store.read_snapshot():
            return build_report(
                store,
                start,
                end,
                now,
                prices,
                store.get_meta("label") or ctx.label,
                rates,
                text=ctx.args.filter,
                group=ctx.args.group_by,
                sort=ctx.args.sort,
                window=since if not ctx.args.until else "",
            )
    finally:
        store.close()


def _report(ctx: _Context) -> int:
    from tokentop.store.report import render
    from tokentop.tui import cli_prometheus

    if cli_prometheus.prometheus_url(ctx):
        _no_view_over_prometheus(ctx)
        return cli_prometheus.report(ctx)
    report = _build_report(ctx, ctx.args.since)
    sys.stdout.write(render(report, "json" if ctx.args.json else "md"))
    return 0


def _export(ctx: _Context) -> int:
    from tokentop.store.report import FORMATS, render
    from tokentop.tui import cli_prometheus

    if cli_prometheus.prometheus_url(ctx):
        _no_view_over_prometheus(ctx)
        return cli_prometheus.export(ctx)
    fmt = ctx.args.format.lower()
    if fmt not in (*FORMATS, "svg"):
        raise UsageError(f"--format: unknown format {ctx.args.format!r} (use json, csv, md or svg)")
    text = _export_svg(ctx) if fmt == "svg" else render(_build_report(ctx, ctx.args.since), fmt)
    if ctx.args.output is None:
        sys.stdout.write(text)
    else:
        try:
            ctx.args.output.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"-o: cannot write {str(ctx.args.output)!r}: {exc.strerror}") from None
        print(f"wrote {ctx.args.output}", file=sys.stderr)
    return 0


def _export_svg(ctx: _Context) -> str:
    from tokentop.tui.app import TokentopApp

    start, end, now = _window(ctx, ctx.args.since)
    store = _open_store(ctx, must_exist=True, readonly=True)
    label = store.get_meta("label") or ctx.label
    store.close()
    until = end if ctx.args.until else now
    app = TokentopApp(
        ctx.db_path,
        config=ctx.config,
        readonly=True,
        label=label,
        window_span=until - start,
        clock=lambda: until,
    )
    app.filter_text = ctx.args.filter
    app.group = ctx.args.group_by
    if ctx.args.sort:
        app.sort = ctx.args.sort
    svg = str(app.render_svg(size=(160, 48)))
    if app.refresh_error:  # a picture of an error is no snapshot
        raise Failure(f"{ctx.db_path}: {app.refresh_error}")
    return svg


def _price(ctx: _Context) -> int:
    from tokentop.pricing.book import PriceBook, PriceTier, TokenCounts

    args = ctx.args
    book = PriceBook(ctx.config.pricing)
    counted = None
    if args.input_file is not None:
        from tokentop.pricing.tokens import count_tokens

        try:
            text = args.input_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--input-file: cannot read {str(args.input_file)!r}: {exc}") from None
        counted = count_tokens(text, args.model, args.provider)
        input_total = counted.tokens + (args.input or 0)
    else:
        input_total = args.input if args.input is not None else 0
    if args.input is None and counted is None:
        raise UsageError("price: give --input N (and --output N), or --input-file FILE")
    uncached = input_total - args.cached - args.cache_write
    if uncached < 0:
        raise UsageError(
            f"--cached {args.cached} plus --cache-write {args.cache_write} exceed --input "
            f"{input_total}"
        )
    at = args.at or utcnow()
    tokens = TokenCounts(
        input_uncached=uncached,
        cache_read=args.cached,
        cache_write_5m=args.cache_write,
        output=args.output,
    )
    tier = PriceTier(service_tier=args.service_tier, batch=args.batch)
    quote = book.quote(args.provider, args.model, tokens, at, tier)
    approximate = counted is not None and counted.approximate
    result: dict[str, Any] = {
        "model": args.model,
        "provider": quote.provider or args.provider or None,
        "model_id": quote.model_id or None,
        "at": at.isoformat(),
        "input_tokens": input_total,
        "cached_input_tokens": args.cached,
        "cache_write_tokens": args.cache_write,
        "output_tokens": args.output,
        "priced": quote.priced,
        "total_usd": _exact(quote.cost),
        "breakdown_usd": {k: _exact(v) for k, v in quote.breakdown.items()},
        "rates_usd_per_mtok": {k: _exact(v) for k, v in quote.rates.items() if k != "web_searches"},
        "price_ref": quote.price_ref,
        "tier": quote.tier or "standard",
        "tier_priced_by": quote.tier_source or ("list" if quote.priced else None),
        "tier_rule": quote.rule or None,
        "flagged": quote.flag or None,
        "approximate": approximate,
        "token_count_method": counted.method if counted else "given",
        "prices": book.describe(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if not quote.priced:
        print(
            f"{args.model}: unpriced (no price known for {args.provider or 'any provider'}"
            f"/{args.model}); {input_total:,} input and {args.output:,} output tokens"
        )
        return 0
    assert quote.cost is not None
    mark = "~" if approximate else ""
    print(
        f"{args.model}: {mark}${_exact(quote.cost)}  ({input_total:,} in, {args.cached:,} cached,"
        f" {args.output:,} out; {quote.price_ref}; at {at.date()})"
    )
    if counted is not None:
        print(f"input tokens counted by {counted.method}")
    return 0


def _exact(value: Decimal | None) -> float | None:
    """A dollar figure rounded to the nano-dollar (what the store keeps)."""
    if value is None:
        return None
    return usd_to_nano(value) / 1_000_000_000


def _sources(ctx: _Context) -> int:
    """List the sources; exit 1 when a configured one is failing, stale or never polled."""
    from tokentop.collectors.sources import build_sources, optional_sources
    from tokentop.store import queries
    from tokentop.store.db import Store
    from tokentop.store.records import HEARTBEAT_KINDS
    from tokentop.tui import cli_prometheus

    if cli_prometheus.prometheus_url(ctx):
        return cli_prometheus.sources(ctx)
    now = utcnow()
    configured = [(c.name, c.kind) for c in build_sources(ctx.config, demo=ctx.args.demo)]
    health = {}
    if _exists(ctx.db_path):
        store = Store(ctx.db_path, readonly=True)
        try:
            health = {h.name: h for h in queries.sources(store, now)}
        finally:
            store.close()
    optional = optional_sources(ctx.config, ctx.args.demo)
    failing = False
    stale_notes: dict[str, str] = {}
    rows = []
    for name, kind in configured + [
        (n, h.kind) for n, h in health.items() if n not in dict(configured)
    ]:
        h = health.get(name)
        if name in dict(configured):
            # A GPU tried on the off chance is no failure on a machine without one.
            absent = name in optional and (h is None or h.state == "unavailable")
            failing = failing or (not absent and (h is None or h.failing(now)))
        if h is not None and h.stale(now):
            silent = "heartbeat" if h.kind in HEARTBEAT_KINDS else "successful poll"
            stale_notes[name] = (
                f"no {silent} for {_age(h.age_s(now) or 0)}"
                f" (stale after {_age(h.stale_after_s or 0)})"
            )
        rows.append(
            {
                "name": name,
                "kind": kind,
                "configured": name in dict(configured),
                "state": h.shown_state(now) if h else "never polled",
                "last_success": h.last_success.isoformat() if h and h.last_success else None,
                "age_s": round((now - h.last_success).total_seconds(), 1)
                if h and h.last_success
                else None,
                "lag_s": None if not h or h.lag_s is None else round(h.lag_s, 1),
                "last_error": h.last_error if h else "",
                "last_error_at": h.last_error_at.isoformat() if h and h.last_error_at else None,
                "calls_last_hour": h.calls_last_hour if h else 0,
                "detail": h.detail if h else "",
            }
        )
    if ctx.args.json:
        print(json.dumps({"database": str(ctx.db_path), "sources": rows}, indent=2))
        return FAILURE if failing else 0
    if not rows:
        print("no sources configured (set OPENAI_ADMIN_KEY / ANTHROPIC_ADMIN_KEY, or use --demo)")
        return 0
    print(
        f"{'SOURCE':<14} {'KIND':<10} {'STATE':<13} {'LAST SUCCESS':<14} {'LAG':>8} "
        f"{'CALLS/H':>7}  LAST ERROR"
    )
    for r in rows:
        age = "never" if r["age_s"] is None else f"{_age(r['age_s'])} ago"
        lag = "" if r["lag_s"] is None else _age(r["lag_s"])
        print(
            f"{clean(r['name']):<14} {clean(r['kind']):<10} {clean(r['state']):<13} {age:<14}"
            f" {lag:>8} {r['calls_last_hour']:>7}"
            f"  {clean(stale_notes.get(str(r['name'])) or str(r['last_error']))}"
        )
    return FAILURE if failing else 0


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


if __name__ == "__main__":
    sys.exit(main())
