"""Command-line parts of the per-request meter (``proxy`` and ``session``).

::

    tokentop proxy [--port 8787] [--host 127.0.0.1] [--upstream-openai URL]
                   [--upstream-anthropic URL] [--tag TAG]
    tokentop session start NAME [--tag T]
    tokentop session stop [NAME]
    tokentop session list [--json]
    tokentop session show NAME [--json]
    tokentop session diff A B [--fail-over PCT] [--json]

``session diff`` exits 1 when the cost per request rose by more than ``--fail-over`` percent
(or cannot be compared), so it can gate a CI job.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from tokentop.store.text import clean

FAILURE = 1


def _percent(value: str) -> float:
    try:
        number = float(value.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage, got {value!r}") from None
    if number < 0 or number != number:
        raise argparse.ArgumentTypeError(f"expected a non-negative percentage, got {value!r}")
    return number


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the meter's subcommands to the ``tokentop`` parser."""
    from tokentop.tui import cli_prometheus

    proxy = sub.add_parser(
        "proxy",
        parents=[common],
        help="run the local metering proxy",
        description="Forward OpenAI and Anthropic API calls, recording each request's cost. "
        "Point the OpenAI SDK at http://HOST:PORT/v1 and the Anthropic SDK at http://HOST:PORT.",
    )
    proxy.add_argument(
        "--port", type=cli_prometheus.port_number, default=8787, help="port to listen on (0: any)"
    )
    proxy.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: loopback only)"
    )
    proxy.add_argument(
        "--upstream-openai", default="https://api.openai.com", metavar="URL", help="OpenAI base"
    )
    proxy.add_argument(
        "--upstream-anthropic",
        default="https://api.anthropic.com",
        metavar="URL",
        help="Anthropic base",
    )
    proxy.add_argument("--tag", default="", help="tag of requests without X-Tokentop-Tag")
    cli_prometheus.add_metrics_options(proxy)

    session = sub.add_parser(
        "session", parents=[common], help="named windows of metered requests, and their diff"
    )
    ssub = session.add_subparsers(
        dest="session_command", metavar="{start,stop,list,show,diff}", parser_class=type(session)
    )
    ssub.required = True
    start = ssub.add_parser("start", parents=[common], help="open a session")
    start.add_argument("name")
    start.add_argument("--tag", default="", help="only requests with this tag (* globs)")
    stop = ssub.add_parser("stop", parents=[common], help="close the open session")
    stop.add_argument("name", nargs="?")
    listing = ssub.add_parser("list", parents=[common], help="every session")
    listing.add_argument("--json", action="store_true")
    show = ssub.add_parser("show", parents=[common], help="a session's figures")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    compare = ssub.add_parser("diff", parents=[common], help="compare two sessions")
    compare.add_argument("a")
    compare.add_argument("b")
    compare.add_argument(
        "--fail-over",
        type=_percent,
        metavar="PCT",
        help="exit 1 when $/request rose by more than PCT percent",
    )
    compare.add_argument("--json", action="store_true")


def _usage_error(message: str) -> Exception:
    from tokentop.tui.cli import UsageError

    return UsageError(message)


# The proxy.


def _proxy(ctx: Any) -> int:
    from tokentop.collectors.meter import Recorder
    from tokentop.collectors.proxy import MeteringProxy, ProxyConfig, serve
    from tokentop.collectors.runner import HEARTBEAT_S
    from tokentop.pricing.book import PriceBook

    args = ctx.args
    config = ProxyConfig(
        host=args.host,
        port=args.port,
        openai=args.upstream_openai,
        anthropic=args.upstream_anthropic,
        default_tag=args.tag,
    )
    try:
        proxy = MeteringProxy(config)
    except ValueError as exc:
        flag = "--upstream-openai" if args.upstream_openai in str(exc) else "--upstream-anthropic"
        raise _usage_error(f"{flag}: {exc}") from None
    _check_writable(ctx.db_path)
    recorder = Recorder(
        ctx.db_path,
        PriceBook(ctx.config.pricing),
        health_name="proxy",
        detail=f"{config.host}:{config.port} -> {proxy.openai.url}, {proxy.anthropic.url}",
        # Its own heartbeat: a killed proxy shows as stopped, not "ok, listening" forever.
        heartbeat_s=HEARTBEAT_S,
    )
    proxy.sink = recorder

    def ready(p: MeteringProxy) -> None:
        recorder.detail = f"listening on {p.url}"
        if config.host not in ("127.0.0.1", "localhost", "::1"):
            print(
                f"tokentop proxy: warning: listening on {config.host}, not loopback; anyone who"
                " can reach it can spend through the API keys its clients send",
                file=sys.stderr,
            )
        print(
            f"tokentop proxy listening on {p.url} (OpenAI: {p.url}/v1 -> {p.openai.url}; "
            f"Anthropic: {p.url} -> {p.anthropic.url}); recording to {ctx.db_path}",
            file=sys.stderr,
            flush=True,
        )

    # The recorder thread parses and prices in short slices; a short switch interval keeps it
    # from holding the GIL for long while the event loop has a response to relay.
    sys.setswitchinterval(0.001)
    import asyncio  # here, not at the top: `tokentop status` must start fast

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(proxy, stop, ready)

    from tokentop.tui import cli_prometheus

    metrics = None
    try:
        metrics = cli_prometheus.start_metrics(ctx)
        asyncio.run(main())
    except OSError as exc:
        raise _usage_error(
            f"--port: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
        ) from None
    finally:
        if metrics is not None:
            metrics.close()
        # Everything queued is written before exit (estimates no longer wait for a tokenizer).
        recorder.close(timeout=120)
    summary = f"tokentop proxy stopped: {proxy.requests} requests, {recorder.written} recorded"
    if recorder.imported:
        summary += f" (and {recorder.imported} left by an earlier run)"
    if recorder.spilled:
        summary += f"; {recorder.spilled} kept in {recorder.spill_path} for the next start"
    if recorder.dropped:
        summary += f"; {recorder.dropped} lost: {recorder.last_error}"
    print(summary, file=sys.stderr)
    return 0


def _check_writable(db_path: Any) -> None:
    """Refuse to start a recorder on a database it cannot write (one line, exit 2)."""
    from tokentop.store.db import Store

    try:
        Store(db_path).close()  # creates or migrates the file: a write
    except Exception as exc:
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise _usage_error(f"--db: cannot write {db_path}: {why}") from None


# Sessions.


def _money(value: Decimal | float | None) -> str:
    if value is None:
        return "-"
    d = Decimal(str(value)).quantize(Decimal("0.000000001")).normalize()
    text = f"{d:f}"
    if "." not in text:
        text += ".00"
    elif len(text.split(".")[1]) < 2:
        text += "0"
    return f"${text}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}%"


def _num(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _session(ctx: Any) -> int:
    from tokentop.collectors.base import utcnow
    from tokentop.store import sessions
    from tokentop.store.db import Store

    args = ctx.args
    command = args.session_command
    if command != "start" and not ctx.db_path.exists():
        raise _usage_error(f"no database at {ctx.db_path} (start a session first, or pass --db)")
    store = Store(ctx.db_path)
    now = utcnow()
    try:
        if command == "start":
            s = sessions.start_session(store, args.name, now, args.tag)
            tag = f" for tag {s.tag!r}" if s.tag else ""
            print(f"started session {s.name}{tag} at {s.started.isoformat(timespec='seconds')}")
            return 0
        if command == "stop":
            s = sessions.stop_session(store, now, args.name)
            st = sessions.session_stats(store, s, now)
            print(
                f"stopped session {s.name}: {st.requests:,} requests, {_money(st.cost)}"
                f" ({_money(st.cost_per_request)}/request)"
            )
            return 0
        if command == "list":
            return _list(store, now, args.json)
        if command == "show":
            snap = sessions.snapshot(store, sessions.get_session(store, args.name), now)
            data = sessions.snapshot_dict(snap)
            if args.json:
                print(json.dumps(data, indent=2))
            else:
                _print_snapshot(data)
            return 0
        return _diff(store, now, args)
    except sessions.SessionError as exc:
        raise _usage_error(str(exc)) from None
    finally:
        store.close()


def _list(store: Any, now: Any, as_json: bool) -> int:
    from tokentop.store import sessions

    rows: list[dict[str, Any]] = []
    for s in sessions.list_sessions(store):
        st = sessions.session_stats(store, s, now)
        rows.append(
            {
                "name": s.name,
                "tag": s.tag,
                "start": s.started.isoformat(),
                "end": s.stopped.isoformat() if s.stopped else None,
                "open": s.is_open,
                "requests": st.requests,
                "cost_usd": float(round(st.cost, 9)),
                "cost_per_request_usd": None
                if st.cost_per_request is None
                else float(round(st.cost_per_request, 9)),
            }
        )
    if as_json:
        print(json.dumps({"sessions": rows}, indent=2))
        return 0
    if not rows:
        print("no sessions (start one with `tokentop session start NAME`)")
        return 0
    print(f"{'NAME':<24} {'STARTED':<20} {'STATE':<8} {'REQUESTS':>9} {'$/REQUEST':>14}  TAG")
    for r in rows:
        state = "open" if r["open"] else "stopped"
        started = r["start"][:19].replace("T", " ")
        print(
            f"{clean(r['name']):<24} {started:<20} {state:<8} {r['requests']:>9,}"
            f" {_money(r['cost_per_request_usd']):>14}  {clean(r['tag'])}"
        )
    return 0


def _print_snapshot(d: dict[str, Any]) -> None:
    state = "open" if d["open"] else "stopped"
    print(f"session {clean(d['session'])} ({state}) {d['start']} .. {d['end']}")
    if d["tag"]:
        print(f"  tag                {clean(d['tag'])}")
    print(f"  requests           {d['requests']:,}", end="")
    notes = []
    if d["unpriced_requests"]:
        notes.append(f"{d['unpriced_requests']:,} unpriced")
    if d["estimated_requests"]:
        notes.append(f"{d['estimated_requests']:,} estimated")
    print(f" ({', '.join(notes)})" if notes else "")
    print(f"  cost               {_money(d['cost_usd'])}")
    print(
        f"  $/request          {_money(d['cost_per_request_usd'])}"
        f"  (p50 {_money(d['p50_cost_per_request_usd'])},"
        f" p95 {_money(d['p95_cost_per_request_usd'])})"
    )
    print(
        f"  tokens/request     {_num(d['input_tokens_per_request'])} in,"
        f" {_num(d['output_tokens_per_request'])} out"
    )
    rate = d["cache_hit_rate"]
    print(f"  cache hit rate     {'-' if rate is None else f'{rate:.1%}'}")
    if d["models"]:
        print("  models")
        for m in d["models"]:
            share = m["cost_share"]
            print(
                f"    {clean(m['provider'] + '/' + m['model']):<40} {m['requests']:>7,} req"
                f"  {_money(m['cost_usd']) if m['priced'] else 'unpriced':>14}"
                f"  {'' if share is None else f'{share:.0%} of cost'}"
            )
    gpu = d["gpu"]
    if gpu["cost_usd"] or gpu["inferences"]:
        print(
            f"  GPU                {_money(gpu['cost_usd'])} for {gpu['inferences']:,} inferences"
            f" ({_money(gpu['cost_per_inference_usd'])}/inference)"
        )


def _diff(store: Any, now: Any, args: argparse.Namespace) -> int:
    from tokentop.store import sessions

    a = sessions.snapshot(store, sessions.get_session(store, args.a), now)
    b = sessions.snapshot(store, sessions.get_session(store, args.b), now)
    changes = sessions.diff(a, b)
    per_request = next(c for c in changes if c.metric == "cost_per_request_usd")
    verdict = "ok"
    code = 0
    if args.fail_over is not None:
        if per_request.change_pct is None:
            verdict = "cannot compare $/request (a session has no priced requests)"
            code = FAILURE
        elif per_request.change_pct > args.fail_over:
            verdict = (
                f"$/request rose {per_request.change_pct:.1f}%, more than the allowed"
                f" {args.fail_over:g}%"
            )
            code = FAILURE
    if args.json:
        print(
            json.dumps(
                {
                    "a": args.a,
                    "b": args.b,
                    "changes": [
                        {
                            "metric": c.metric,
                            "a": c.a,
                            "b": c.b,
                            "change_pct": c.change_pct,
                        }
                        for c in changes
                    ],
                    "fail_over_pct": args.fail_over,
                    "failed": code != 0,
                    "verdict": verdict,
                },
                indent=2,
            )
        )
        return code
    print(f"{'':<24} {args.a:>16} {args.b:>16} {'change':>9}")
    for c in changes:
        fmt: Callable[[Any], str] = _num
        if c.metric.endswith("_usd"):
            fmt = _money
        elif c.metric == "cache_hit_rate":
            fmt = _rate
        print(f"{c.label:<24} {fmt(c.a):>16} {fmt(c.b):>16} {_pct(c.change_pct):>9}")
    if args.fail_over is not None:
        print(("FAIL: " if code else "ok: ") + verdict)
    return code


HANDLERS: dict[str, Callable[[Any], int]] = {"proxy": _proxy, "session": _session}
"""Subcommand name to handler taking the CLI context (``tui.cli._Context``)."""
