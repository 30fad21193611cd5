"""Command-line parts of tokentop beyond one machine.

::

    tokentop collect --metrics-port 9464 [--metrics-host 127.0.0.1]   # /metrics of this host
    tokentop proxy --metrics-port 9465                                # /metrics of the meter
    tokentop report --prometheus http://prometheus:9090 --since 1h [--json]
    tokentop export --prometheus URL --format json|csv|md
    tokentop status --prometheus URL                                  # the fleet's status line
    tokentop check --prometheus URL                                   # the rules, on the fleet
    tokentop --prometheus URL                                         # the TUI over the fleet

``--prometheus`` (or ``[prometheus] url`` in the config) reads the fleet through Prometheus'
HTTP query API instead of the local database.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tokentop.store.text import clean


def port_number(value: str) -> int:
    """An argparse type: a TCP port, 0 (any free port) to 65535."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port between 0 and 65535, got {value!r}")
    return port


def add_metrics_options(parser: argparse.ArgumentParser) -> None:
    """``--metrics-port`` and ``--metrics-host`` (``collect`` and ``proxy``)."""
    parser.add_argument(
        "--metrics-port",
        type=port_number,
        metavar="PORT",
        help="serve Prometheus metrics on /metrics at this port (0: any free port)",
    )
    parser.add_argument(
        "--metrics-host",
        metavar="ADDR",
        help="address for /metrics (default 127.0.0.1, or [metrics] host)",
    )


def add_prometheus_option(parser: argparse.ArgumentParser, **extra: Any) -> None:
    """``--prometheus URL``: read the fleet from a Prometheus server."""
    parser.add_argument(
        "--prometheus",
        metavar="URL",
        help="read from this Prometheus (its HTTP query API) instead of the database;"
        " TUI, report, export, sources, status, check",
        **extra,
    )


def _usage_error(message: str) -> Exception:
    from tokentop.tui.cli import UsageError

    return UsageError(message)


def start_metrics(ctx: Any) -> Any:
    """Start ``/metrics`` for this process's database when asked to; ``None`` otherwise.

    The caller closes what it returns. The port comes from ``--metrics-port``, else from
    ``[metrics] port``.
    """
    from tokentop.collectors.exporter import MetricsServer
    from tokentop.pricing.gpu import GpuCostModel

    args, config = ctx.args, ctx.config.metrics
    port = getattr(args, "metrics_port", None)
    if port is not None and getattr(args, "once", False):
        raise _usage_error("--metrics-port: a metrics endpoint needs a running collect, not --once")
    if port is None and not getattr(args, "once", False):
        port = config.port
    if port is None:
        return None
    host = getattr(args, "metrics_host", None) or config.host
    try:
        server = MetricsServer(
            ctx.db_path,
            config,
            port=port,
            host=host,
            gpu_costs=GpuCostModel(ctx.config.gpu_rates),
        )
    except OSError as exc:
        raise _usage_error(
            f"--metrics-port: cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None
    print(f"tokentop: metrics on {server.url}", file=sys.stderr, flush=True)
    return server


def prometheus_url(ctx: Any) -> str:
    """The Prometheus to read from (``--prometheus``, else ``[prometheus] url``), or ``""``."""
    from tokentop.collectors.metrics_config import MetricsConfigError, check_url

    url = getattr(ctx.args, "prometheus", None)
    if url is None:
        return str(ctx.config.prometheus.url)
    try:
        return check_url(url, "--prometheus")
    except MetricsConfigError as exc:
        raise _usage_error(str(exc)) from None


def open_source(ctx: Any, url: str) -> Any:
    """A :class:`~tokentop.collectors.promsource.PromSource` on ``url`` with the config's
    timeout, answer size limit, GPU rates and GPU metrics (the caller closes it)."""
    from tokentop.collectors.promql import PromClient
    from tokentop.collectors.promsource import PromSource

    client = PromClient(
        url,
        timeout_s=ctx.config.prometheus.timeout_s,
        max_response_mb=ctx.config.prometheus.max_response_mb,
    )
    return PromSource(
        client,
        gpu_rates=ctx.config.gpu_rates,
        gpu_metrics=ctx.config.prometheus.gpu_metrics,
    )


def fleet_status(ctx: Any, url: str) -> Any:
    """``tokentop status --prometheus URL``: the fleet's status figures
    (:class:`~tokentop.store.status.StatusFigures`), or the line that says why there are none
    (the server is unreachable or a query failed: a source error, never $0)."""
    from tokentop.collectors.base import utcnow
    from tokentop.collectors.prom_check import fleet_status as read
    from tokentop.collectors.promql import PromError

    source = open_source(ctx, url)
    try:
        return read(source, utcnow())
    except PromError as exc:
        return clean(f"Prometheus error: {url}: {exc}")
    finally:
        source.close()


def tui(ctx: Any) -> int:
    """``tokentop --prometheus URL``: the panes over the fleet; nothing is collected here."""
    from tokentop.tui.app import TokentopApp
    from tokentop.tui.snapshot_prometheus import build_prometheus_snapshot, via

    url = prometheus_url(ctx)
    source = open_source(ctx, url)
    app = TokentopApp(
        ctx.db_path,
        config=ctx.config,
        label=ctx.label,
        note=f"via Prometheus {url}",
        refresh_s=ctx.config.refresh_s,
        start_window=ctx.args.window,
        snapshot_builder=lambda request: build_prometheus_snapshot(source, request),
        via=lambda snapshot: via(source, snapshot),
    )
    try:
        app.run()
    finally:
        source.close()
    return app.return_code or 0


def build_report(ctx: Any, since: str) -> dict[str, Any]:
    """The report of ``--since`` read from Prometheus (raises the CLI's errors)."""
    from tokentop.collectors.base import utcnow
    from tokentop.collectors.promql import PromError
    from tokentop.collectors.promsource import prometheus_report
    from tokentop.tui.cli import parse_since

    url = prometheus_url(ctx)
    now = utcnow()
    start = parse_since(since, now)
    source = open_source(ctx, url)
    rates = [r.describe() for r in ctx.config.gpu_rates]
    try:
        return prometheus_report(source, start, now, rates)
    except PromError as exc:
        raise RuntimeFailure(f"Prometheus {url}: {exc}") from None
    finally:
        source.close()


def sources(ctx: Any) -> int:
    """``tokentop sources --prometheus URL``: every source of the fleet; exit 1 when one is
    failing or stale, or when Prometheus cannot be read."""
    import json

    from tokentop.collectors.base import utcnow
    from tokentop.collectors.promql import PromError

    url = prometheus_url(ctx)
    now = utcnow()
    source = open_source(ctx, url)
    try:
        health = source.sources(now)
    except PromError as exc:
        print(f"tokentop: error: Prometheus {clean(url)}: {clean(exc)}", file=sys.stderr)
        return 1
    finally:
        source.close()
    rows = [
        {
            "name": h.name,
            "kind": h.kind,
            "state": h.shown_state(now),
            "last_success": h.last_success.isoformat() if h.last_success else None,
            "age_s": None if h.last_success is None else round(h.age_s(now) or 0.0, 1),
            "last_error": h.last_error,
            "detail": h.detail,
        }
        for h in health
    ]
    failing = any(h.failing(now) for h in health)
    if ctx.args.json:
        print(json.dumps({"prometheus": url, "sources": rows}, indent=2))
        return 1 if failing else 0
    print(f"{'SOURCE':<32} {'KIND':<10} {'STATE':<9} {'AGE':>8}  LAST ERROR / DETAIL")
    for r in rows:
        age = "never" if r["age_s"] is None else f"{r['age_s']:.0f}s"
        note = r["last_error"] or r["detail"]
        print(
            f"{clean(r['name']):<32} {clean(r['kind']):<10} {clean(r['state']):<9} {age:>8}"
            f"  {clean(note)}"
        )
    return 1 if failing else 0


def _svg(ctx: Any) -> str:
    """The TUI's screen over Prometheus, as SVG (``export --format svg --prometheus``)."""
    from tokentop.collectors.base import utcnow
    from tokentop.collectors.promql import PromError
    from tokentop.tui.app import TokentopApp
    from tokentop.tui.cli import parse_since
    from tokentop.tui.snapshot_prometheus import build_prometheus_snapshot, via

    url = prometheus_url(ctx)
    now = utcnow()
    span = now - parse_since(ctx.args.since, now)
    source = open_source(ctx, url)
    try:
        source.client.query("vector(1)", now)  # reachable, or a source error (exit 1)
        app = TokentopApp(
            ctx.db_path,
            config=ctx.config,
            label=ctx.label,
            note=f"via Prometheus {url}",
            window_span=span,
            snapshot_builder=lambda request: build_prometheus_snapshot(source, request),
            via=lambda snapshot: via(source, snapshot),
        )
        svg = str(app.render_svg(size=(160, 48)))
    except PromError as exc:
        raise RuntimeFailure(f"Prometheus {url}: {exc}") from None
    finally:
        source.close()
    if app.refresh_error or app.snapshot is None:
        raise RuntimeFailure(f"Prometheus {url}: {app.refresh_error or 'no data'}")
    return svg


class RuntimeFailure(Exception):
    """The source failed (exit 1): never a report of $0."""


def report(ctx: Any) -> int:
    """``tokentop report --prometheus URL``."""
    from tokentop.store.report import render

    try:
        data = build_report(ctx, ctx.args.since)
    except RuntimeFailure as exc:
        print(f"tokentop: error: {clean(exc)}", file=sys.stderr)
        return 1
    sys.stdout.write(render(data, "json" if ctx.args.json else "md"))
    return 0


def export(ctx: Any) -> int:
    """``tokentop export --prometheus URL --format json|csv|md``."""
    from tokentop.store.report import FORMATS, render

    fmt = ctx.args.format.lower()
    if fmt not in (*FORMATS, "svg"):
        raise _usage_error(
            f"--format: unknown format {ctx.args.format!r} (use json, csv, md or svg)"
        )
    try:
        text = _svg(ctx) if fmt == "svg" else render(build_report(ctx, ctx.args.since), fmt)
    except RuntimeFailure as exc:
        print(f"tokentop: error: {clean(exc)}", file=sys.stderr)
        return 1
    if ctx.args.output is None:
        sys.stdout.write(text)
    else:
        try:
            ctx.args.output.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise _usage_error(
                f"-o: cannot write {str(ctx.args.output)!r}: {exc.strerror}"
            ) from None
        print(f"wrote {ctx.args.output}", file=sys.stderr)
    return 0
