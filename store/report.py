"""The report of a time window (``tokentop report --json``) and its exports (JSON, CSV, Markdown).

The report is a contract: scripts and later checks read its fields. Every export carries the same
fields, so a snapshot is self-describing: the window, the totals, per-model rows, GPU cost, which
prices produced the figures and how fresh the data was.
"""

from __future__ import annotations

import csv
import io
import json
import shlex
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from tokentop.store import queries
from tokentop.store.db import Store
from tokentop.store.queries import CostRow, GpuOverview, ProviderDay, Totals
from tokentop.store.records import SourceHealth
from tokentop.store.text import csv_cell, csv_comment, md_cell
from tokentop.store.view import DEFAULT_SORT, sort_name, sort_rows

FORMATS = ("json", "csv", "md")
"""Text formats rendered here; ``svg`` is a picture of the screen, made by the app."""

REPORT_VERSION = 1

PRICE_FLAG = "[flagged: "
"""Marks a price reference whose figure fell back to list price (an unknown tier, a context
window without its rates). The price book writes it (``pricing.book.FLAG_MARK``); the store
imports nothing of the project, so it keeps the same text."""


def usd(value: Decimal | None) -> float | None:
    """A dollar figure for JSON: rounded to the nano-dollar, ``None`` stays ``None``."""
    if value is None:
        return None
    return float(round(value, 9))


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _resolution(r: queries.Resolution) -> dict[str, Any]:
    return {
        "step": r.step,
        "note": r.note,
        "minutes_since": _iso(r.minutes_since),
        "hours_since": _iso(r.hours_since),
    }


def build_report(
    store: Store,
    start: datetime,
    end: datetime,
    now: datetime,
    prices: dict[str, Any],
    label: str = "",
    gpu_rates: list[dict[str, Any]] | None = None,
    *,
    text: str = "",
    group: str = "model",
    sort: tuple[str, bool] | None = None,
    window: str = "",
) -> dict[str, Any]:
    """Everything known about ``[start, end)``, as plain JSON-ready data.

    ``text``, ``group`` and ``sort`` are the view, as on the screen: the usage figures (totals,
    metered, per model, per group, unpriced) count only the rows the filter selects, ``by_group``
    lists the grouping's rows in the sort's order, and ``view`` records all three (GPU cost,
    bills and sources are not filtered, as in the TUI).

    Args:
        store: the database.
        start: window start (UTC).
        end: window end (UTC).
        now: when the report is made (freshness is measured against it).
        prices: the price book's description (``PriceBook.describe()``).
        label: ``"demo"`` for simulated data.
        gpu_rates: the GPU rates in force, for the record.
        text: the filter (:mod:`tokentop.store.filters`).
        group: ``model``, ``project``, ``api_key`` or ``tag``.
        sort: (column, descending) of ``by_group`` (:data:`tokentop.store.view.SORT_COLUMNS`).
        window: the window's name on the screen (``1h``), for the record.
    """
    sort = sort or DEFAULT_SORT
    by_model = queries.cost_by(store, start, end, "model", text)
    by_group = sort_rows(
        by_model if group == "model" else queries.cost_by(store, start, end, group, text), sort
    )
    head = {
        "tokentop": {
            "report_version": REPORT_VERSION,
            "generated_at": now.isoformat(),
            "label": label,
            "demo": label == "demo",
            "database": str(store.path),
        },
        "window": {"start": start.isoformat(), "end": end.isoformat()},
        # Behind the retention horizon one-minute buckets are folded into hours (then days):
        # a window that starts there is exact to the hour (day) at its start; the note says so.
        "resolution": _resolution(queries.resolution(store, start)),
        "view": {
            "filter": text,
            "group_by": group,
            "sort": sort_name(sort),
            "window": window or None,
            # The same figures from the command line (while no bucket of the window changes).
            "command": shlex.join(
                [
                    "tokentop",
                    "export",
                    "--db",
                    str(store.path),
                    "--format",
                    "json",
                    "--since",
                    start.isoformat(),
                    "--until",
                    end.isoformat(),
                    *(["--filter", text] if text else []),
                    "--group-by",
                    group,
                    "--sort",
                    sort_name(sort),
                ]
            ),
        },
    }
    return assemble_report(
        head,
        now=now,
        totals=queries.totals(store, start, end, text),
        metered=queries.totals(store, start, end, text, scope="metered"),
        billed=queries.billed_total(store, start, end),
        total_sources=queries.total_sources(store, start, end),
        by_model=by_model,
        by_group=[_group_row(row, group) for row in by_group],
        unpriced=queries.unpriced(store, start, end, text),
        provider_days=queries.billed_vs_estimated(store, start, end),
        gpu=queries.gpu_overview(store, start, end),
        gpu_rates=gpu_rates,
        sources=queries.sources(store, now),
        newest_usage=queries.newest_complete_usage(store, now),
        prices=_prices(store, start, end, prices),
    )


def _days_touched(window: dict[str, str]) -> dict[str, str]:
    """The first and last UTC day a window (ISO ``start``, exclusive ``end``) touches."""
    start = datetime.fromisoformat(window["start"]).astimezone(UTC)
    end = datetime.fromisoformat(window["end"]).astimezone(UTC) - timedelta(microseconds=1)
    return {"from": start.date().isoformat(), "to": max(start, end).date().isoformat()}


def _billed_note(report: dict[str, Any]) -> list[str]:
    """Under the totals: which days the billed figure covers, when it is not the window."""
    days = report.get("billed_days_covered")
    if not days:
        return []
    span = days["from"] if days["from"] == days["to"] else f"{days['from']} to {days['to']}"
    return [f"- Billed: whole UTC days {span} (providers bill per day), not only the window", ""]


def assemble_report(
    head: dict[str, Any],
    *,
    now: datetime,
    totals: Totals,
    metered: Totals,
    billed: Decimal | None,
    total_sources: dict[str, dict[str, list[str]]],
    by_model: Iterable[CostRow],
    unpriced: dict[str, int],
    provider_days: Sequence[ProviderDay],
    gpu: GpuOverview,
    gpu_rates: list[dict[str, Any]] | None,
    sources: Iterable[SourceHealth],
    newest_usage: datetime | None,
    prices: dict[str, Any],
    by_group: list[dict[str, Any]] | None = None,
    freshness: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report's fields from its figures, in the contract's order, wherever they were read
    (the database here; a Prometheus server in :mod:`tokentop.collectors.promsource`).

    Args:
        head: the fields before the figures (``tokentop``, ``window``, and what describes the
            source: ``resolution`` and ``view``, or ``via`` and ``not_available``).
        now: when the report is made (ages are measured against it).
        totals: the window's usage, each dollar once.
        metered: the request meter's part of ``totals``.
        billed: the providers' billed cost (``None`` where it cannot be known).
        total_sources: per provider, the sources its totals come from.
        by_model: the window's rows by model.
        unpriced: tokens of unpriced models, by ``provider/model``.
        provider_days: billed beside estimated, per provider and day.
        gpu: GPU cost per inference over the window.
        gpu_rates: the GPU rates in force, for the record.
        sources: every source's health.
        newest_usage: the newest complete usage minute.
        prices: the ``prices`` section.
        by_group: the group table's rows (``None``: not part of this report).
        freshness: more ``freshness`` fields.
    """
    # Billed vs estimated compares the same settled days: a day the provider has not billed yet
    # is left out of both sides and listed as not billed yet.
    providers: dict[str, dict[str, Decimal]] = {}
    for day in provider_days:
        if day.billed is None:
            continue
        p = providers.setdefault(day.provider, {"estimated": Decimal(0), "billed": Decimal(0)})
        p["estimated"] += day.estimated
        p["billed"] += day.billed
    report = {
        **head,
        "total_usd": usd(totals.cost),
        "billed_usd": usd(billed),
        # Providers bill whole UTC days: the billed figure covers every day the window touches.
        "billed_days_covered": None if billed is None else _days_touched(head["window"]),
        "requests": totals.requests,
        "cost_per_request_usd": usd(totals.cost_per_request),
        # $/request is the priced cost over the priced requests of the same rows.
        "cost_per_request_excludes_unpriced_requests": totals.unpriced_requests,
        "input_tokens": totals.input_total,
        "cached_input_tokens": totals.cache_read,
        "cache_write_tokens": totals.cache_write,
        "output_tokens": totals.output,
        # A dollar is counted once: where an admin-API source covers a provider, the meter's
        # records of it are inside these totals (attributed by tag, test, session), not added.
        "of_which_metered": {
            "usd": usd(metered.cost),
            "requests": metered.requests,
            "input_tokens": metered.input_total,
            "output_tokens": metered.output,
        },
        "total_sources": total_sources,
        "by_model": [
            {
                "provider": row.provider,
                "model": row.key,
                "requests": row.totals.requests,
                "input_tokens": row.totals.input_total,
                "cached_input_tokens": row.totals.cache_read,
                "cache_write_tokens": row.totals.cache_write,
                "output_tokens": row.totals.output,
                "cost_usd": usd(row.totals.cost) if row.priced else None,
                "cost_per_request_usd": usd(row.totals.cost_per_request) if row.priced else None,
                "priced": row.priced,
            }
            for row in by_model
        ],
        **({} if by_group is None else {"by_group": by_group}),
        "unpriced": unpriced,
        "by_provider": [
            {
                "provider": name,
                "days": sum(
                    1 for d in provider_days if d.provider == name and d.billed is not None
                ),
                "estimated_usd": usd(p["estimated"]),
                "billed_usd": usd(p["billed"]),
                "gap_usd": usd(p["billed"] - p["estimated"]),
            }
            for name, p in sorted(providers.items())
        ],
        "not_billed_yet": [
            {
                "provider": d.provider,
                "day": d.day.date().isoformat(),
                "estimated_usd": usd(d.estimated),
            }
            for d in provider_days
            if d.billed is None
        ],
        "billed_days": [
            {
                "provider": d.provider,
                "day": d.day.date().isoformat(),
                "estimated_usd": usd(d.estimated),
                "billed_usd": usd(d.billed),
                "gap_usd": usd(d.gap),
            }
            for d in provider_days
        ],
        "gpu": _gpu(gpu, gpu_rates),
        "sources": [
            {
                "name": s.name,
                "kind": s.kind,
                # "stale" (a meter: "stopped") when it says ok but has not succeeded for three
                # of its intervals (at least 10 s): its process died or hangs.
                "state": s.shown_state(now),
                "stale": s.stale(now),
                "age_s": None if s.last_success is None else round(s.age_s(now) or 0.0, 1),
                "interval_s": s.interval_s,
                "last_success": _iso(s.last_success),
                "last_error": s.last_error,
                "last_error_at": _iso(s.last_error_at),
                "lag_s": None if s.lag_s is None else round(s.lag_s, 1),
                "calls_last_hour": s.calls_last_hour,
                "newest_data": _iso(s.newest_data),
            }
            for s in sources
        ],
        "freshness": {
            "newest_usage": _iso(newest_usage),
            "usage_age_s": None
            if newest_usage is None
            else round((now - newest_usage).total_seconds(), 1),
            "newest_gpu": _iso(gpu.newest),
            **(freshness or {}),
        },
        "prices": prices,
    }
    return report


def _gpu(gpu: GpuOverview, rates: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {
        "cost_usd": usd(gpu.cost),
        "inferences": gpu.inferences,
        "cost_per_inference_usd": usd(gpu.cost_per_inference),
        "cost_per_1m_tokens_usd": usd(gpu.cost_per_1m_tokens),
        "idle_cost_usd": usd(gpu.idle_cost),
        "prompt_tokens": gpu.prompt_tokens,
        "generation_tokens": gpu.generation_tokens,
        "devices": [
            {
                "source": d.source,
                "device": d.device,
                "name": d.name,
                "index": d.index,
                "cost_usd": usd(d.cost),
                "idle_cost_usd": usd(d.idle_cost),
                "seconds": round(d.seconds, 3),
                "util_pct": d.util_pct,
                "power_w": d.power_w,
                "usd_per_hour": usd(d.usd_per_hour),
                "last_seen": _iso(d.last_seen),
                "cost_basis": d.cost_ref,
            }
            for d in gpu.devices
        ],
        "endpoints": [
            {
                "source": e.source,
                "endpoint": e.endpoint,
                "kind": e.kind,
                "inferences": e.requests,
                "prompt_tokens": e.prompt_tokens,
                "generation_tokens": e.generation_tokens,
                "inferences_per_s": None if e.per_second is None else round(e.per_second, 4),
            }
            for e in gpu.endpoints
        ],
        "rates": rates or [],
    }


def _group_row(row: CostRow, group: str) -> dict[str, Any]:
    """One row of the group table, with the figures its columns show."""
    t = row.totals
    per = t.requests or None
    return {
        "group_by": group,
        "key": row.key,
        "provider": row.provider,
        "requests": t.requests,
        "input_tokens": t.input_total,
        "cached_input_tokens": t.cache_read,
        "cache_write_tokens": t.cache_write,
        "output_tokens": t.output,
        "cost_usd": usd(t.cost) if row.priced or t.cost > 0 else None,
        "cost_per_request_usd": usd(t.cost_per_request) if row.priced or t.cost > 0 else None,
        "input_tokens_per_request": None if per is None else round(t.input_total / per, 3),
        "output_tokens_per_request": None if per is None else round(t.output / per, 3),
        "cache_hit_rate": None if row.cache_hit_rate is None else round(row.cache_hit_rate, 6),
        # Of $/request against the previous window of the same length, as the Δ column shows.
        "change_cost_per_request": None if row.change is None else round(row.change, 6),
        "priced": row.priced,
    }


def _prices(store: Store, start: datetime, end: datetime, prices: dict[str, Any]) -> dict[str, Any]:
    """The price book's description, the references that priced the window and how much each
    priced (``by_ref``), and those of them flagged as possibly off (``flagged``)."""
    used = [
        {
            "price_ref": u.price_ref,
            "tokens": u.tokens,
            "requests": u.requests,
            "cost_usd": usd(u.cost) if u.priced else None,
            "flagged": PRICE_FLAG in u.price_ref,
        }
        for u in queries.usage_by_price_ref(store, start, end)
    ]
    return {
        **prices,
        "refs": queries.price_refs(store, start, end),
        "by_ref": used,
        "flagged": [u for u in used if u["flagged"]],
    }


def render(report: dict[str, Any], fmt: str) -> str:
    """The report as ``json``, ``csv`` or ``md`` text."""
    if fmt == "json":
        return json.dumps(report, indent=2) + "\n"
    if fmt == "csv":
        return _csv(report)
    if fmt == "md":
        return _markdown(report)
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}, svg")


def _money(value: float | None, unpriced: bool = False) -> str:
    if unpriced:
        return "unpriced"
    if value is None:
        return "n/a"
    sign = "-" if value < 0 else ""
    if abs(value) >= 1:
        return f"{sign}${abs(value):,.2f}"
    return f"{sign}${abs(value):.6f}"


_CSV_COLUMNS = (
    "provider",
    "model",
    "requests",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "cost_usd",
    "cost_per_request_usd",
    "priced",
)


def _csv(report: dict[str, Any]) -> str:
    out = io.StringIO()
    meta = report["tokentop"]
    # Comment lines carry the context (readers such as pandas take comment="#").
    demo = " (DEMO: simulated data)" if meta["demo"] else ""
    lines = [
        f"# tokentop report v{meta['report_version']}{demo}",
        f"# generated_at: {meta['generated_at']}",
        f"# window: {report['window']['start']} .. {report['window']['end']}",
        *_view_comments(report),
        f"# total_usd: {report['total_usd']}",
        f"# billed_usd: {report['billed_usd']}"
        + (
            f" (whole UTC days {report['billed_days_covered']['from']}"
            f" to {report['billed_days_covered']['to']})"
            if report.get("billed_days_covered")
            else ""
        ),
        f"# requests: {report['requests']}",
        f"# cost_per_request_usd: {report['cost_per_request_usd']}",
        f"# gpu_cost_usd: {report['gpu']['cost_usd']}",
        f"# gpu_cost_per_inference_usd: {report['gpu']['cost_per_inference_usd']}",
        f"# newest_usage: {report['freshness']['newest_usage']}"
        f" (age {report['freshness']['usage_age_s']} s)",
        f"# prices: {report['prices']['source']} {report['prices']['version']},"
        f" online updates {'on' if report['prices']['online_updates'] else 'off'},"
        f" {len(report['prices']['overrides'])} override(s)",
    ]
    for ref in report["prices"]["refs"]:
        lines.append(f"# price used: {csv_comment(ref)}")
    for s in report["sources"]:
        error = f", last error: {csv_comment(s['last_error'])}" if s["last_error"] else ""
        lines.append(
            f"# source {csv_comment(s['name'])}: {csv_comment(s['state'])},"
            f" last success {s['last_success']} (age {s['age_s']} s), lag {s['lag_s']} s{error}"
        )
    out.write("\n".join(lines) + "\n")
    writer = csv.writer(out, lineterminator="\n")
    group = (report.get("view") or {}).get("group_by", "model")
    # The rows of the screen's table: its grouping, in its order.
    columns = _CSV_COLUMNS if group == "model" else (group, *_CSV_COLUMNS[2:])
    rows = report["by_model"]
    if "by_group" in report:
        first = "model" if group == "model" else group
        rows = [{**r, first: r["key"]} for r in report["by_group"]]
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row[c] is None else csv_cell(row[c]) for c in columns])
    return out.getvalue()


def _view_comments(report: dict[str, Any]) -> list[str]:
    view = report.get("view")
    if not view:
        return []
    return [
        f"# filter: {csv_comment(view['filter']) or '(none)'}",
        f"# group_by: {view['group_by']}",
        f"# sort: {view['sort']}",
    ]


def _excl(report: dict[str, Any]) -> str:
    n = report["cost_per_request_excludes_unpriced_requests"]
    return f" (excl. {n:,} unpriced requests)" if n else ""


def _sources_of_totals(report: dict[str, Any]) -> list[str]:
    """Which source each provider's total comes from, and the metered part inside it."""
    lines = []
    for provider, entry in report["total_sources"].items():
        line = f"- {md_cell(provider)}: from {md_cell(', '.join(entry['counted']) or 'none')}"
        if entry["metered"]:
            line += f"; metered by {md_cell(', '.join(entry['metered']))} (inside the total)"
        lines.append(line)
    metered = report["of_which_metered"]
    if metered["requests"]:
        lines.append(
            f"- Of which metered: {_money(metered['usd'])} in {metered['requests']:,} requests"
        )
    return [*lines, ""] if lines else []


def _view_lines(report: dict[str, Any]) -> list[str]:
    view = report.get("view")
    if not view:
        return []
    shown = f"`{md_cell(view['filter'])}`" if view["filter"] else "none"
    return [f"- Filter: {shown}; by {view['group_by']}; sorted by {view['sort']}"]


def _group_table(report: dict[str, Any]) -> list[str]:
    """The screen's group table when it is not the per-model one above."""
    group = (report.get("view") or {}).get("group_by", "model")
    if group == "model" or "by_group" not in report:
        return []
    name = group.replace("_", " ")
    lines = [
        "",
        f"## By {name}",
        "",
        f"| {name.capitalize()} | Requests | Input | Output | Cost | $/request |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["by_group"]:
        unpriced = r["cost_usd"] is None
        lines.append(
            f"| {md_cell(r['key']) or '(none)'} | {r['requests']:,} | {r['input_tokens']:,} |"
            f" {r['output_tokens']:,} | {_money(r['cost_usd'], unpriced)} |"
            f" {_money(r['cost_per_request_usd'], unpriced)} |"
        )
    return lines


def _markdown(report: dict[str, Any]) -> str:
    meta = report["tokentop"]
    w = report["window"]
    lines = [
        f"# tokentop report{' — DEMO (simulated data)' if meta['demo'] else ''}",
        "",
        f"- Window: {w['start']} to {w['end']}",
        *_view_lines(report),
        f"- Generated: {meta['generated_at']}",
        f"- Data freshness: newest usage {report['freshness']['newest_usage']}"
        f" ({report['freshness']['usage_age_s']} s old)",
        f"- Prices: {report['prices']['source']} {report['prices']['version']}"
        f" (online updates {'on' if report['prices']['online_updates'] else 'off'}),"
        f" {len(report['prices']['overrides'])} override(s)",
        "",
        "## Totals",
        "",
        "| Estimated | Billed | Requests | $/request | GPU cost | GPU $/inference |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {_money(report['total_usd'])} | {_money(report['billed_usd'])} |"
        f" {report['requests']:,} | {_money(report['cost_per_request_usd'])}{_excl(report)} |"
        f" {_money(report['gpu']['cost_usd'])} |"
        f" {_money(report['gpu']['cost_per_inference_usd'])} |",
        "",
        *_billed_note(report),
        *_sources_of_totals(report),
        "## By model",
        "",
        "| Provider | Model | Requests | Input | Cached | Cache writes | Output | Cost"
        " | $/request |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["by_model"]:
        lines.append(
            f"| {md_cell(r['provider'])} | {md_cell(r['model'])} | {r['requests']:,} |"
            f" {r['input_tokens']:,} |"
            f" {r['cached_input_tokens']:,} | {r['cache_write_tokens']:,} |"
            f" {r['output_tokens']:,} | {_money(r['cost_usd'], not r['priced'])} |"
            f" {_money(r['cost_per_request_usd'], not r['priced'])} |"
        )
    lines += _group_table(report)
    if report["unpriced"]:
        lines += ["", "Unpriced models (tokens counted, cost unknown):", ""]
        lines += [
            f"- {md_cell(model)}: {tokens:,} tokens" for model, tokens in report["unpriced"].items()
        ]
    if report["by_provider"]:
        lines += [
            "",
            "## Billed vs estimated",
            "",
            "Settled days only: each side covers the days the provider has billed.",
            "",
            "| Provider | Days | Estimated | Billed | Gap |",
            "|---|---:|---:|---:|---:|",
        ]
        for p in report["by_provider"]:
            lines.append(
                f"| {md_cell(p['provider'])} | {p['days']} | {_money(p['estimated_usd'])} |"
                f" {_money(p['billed_usd'])} |"
                f" {_money(p['gap_usd'])} |"
            )
    if report["not_billed_yet"]:
        days = ", ".join(
            f"{md_cell(d['provider'])} {d['day']} ({_money(d['estimated_usd'])} estimated)"
            for d in report["not_billed_yet"]
        )
        lines += ["", f"Not billed yet (left out of both sides): {days}"]
    gpu = report["gpu"]
    if gpu["devices"]:
        lines += [
            "",
            "## GPUs",
            "",
            "| GPU | Name | Cost | Idle cost | $/h | Basis |",
            "|---|---|---:|---:|---:|---|",
        ]
        for d in gpu["devices"]:
            lines.append(
                f"| {d['index']} | {md_cell(d['name'])} | {_money(d['cost_usd'])} |"
                f" {_money(d['idle_cost_usd'])} | {_money(d['usd_per_hour'])} |"
                f" {md_cell(d['cost_basis'])} |"
            )
        lines.append("")
        lines.append(
            f"Inferences: {gpu['inferences']:,}; $/1M tokens:"
            f" {_money(gpu['cost_per_1m_tokens_usd'])}; idle burn: {_money(gpu['idle_cost_usd'])}"
        )
    lines += [
        "",
        "## Sources",
        "",
        "| Source | Kind | State | Last success | Lag | Last error |",
        "|---|---|---|---|---:|---|",
    ]
    for s in report["sources"]:
        lines.append(
            f"| {md_cell(s['name'])} | {md_cell(s['kind'])} | {md_cell(s['state'])} |"
            f" {s['last_success'] or 'never'}"
            f"{'' if s['age_s'] is None else ' (' + str(s['age_s']) + ' s ago)'} |"
            f" {'' if s['lag_s'] is None else str(s['lag_s']) + ' s'} |"
            f" {md_cell(s['last_error'])} |"
        )
    if report["prices"]["refs"]:
        lines += ["", "## Prices used", ""] + [
            f"- {md_cell(ref)}" for ref in report["prices"]["refs"]
        ]
    return "\n".join(lines) + "\n"
