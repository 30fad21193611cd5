"""Generate a realistic tokentop history: one-minute usage, GPU and inference samples, bills.

``python -m bench.generate --db PATH [--days 30] [--series 40] [--seed 1] [--end ISO]
[--tail-rate 0.1]``

About 40 usage series (model x project x tag x API key, across OpenAI and Anthropic models that
genai-prices knows, plus one model it does not) with four traffic shapes: a daily rhythm, business
hours only (zeros at night and at weekends), nightly batch jobs and sparse low-rate traffic. More
series than 40 (``--series 400``) add an organisation's long tail: a key per developer and CI job,
each with little traffic (:func:`tail_series`). Bursts
and spikes are shared by every series, as a product launch or an incident would be. Four GPUs
serve two inference endpoints, sampled once a minute; one endpoint is idle outside business hours,
so idle burn shows. Priced and unpriced providers get daily bills a few percent off the estimate.

The data goes in the way production writes it: each UTC day is one
:class:`~tokentop.store.records.Batch`, priced by the runner's
:func:`~tokentop.collectors.runner.price_batch` and written by
:meth:`Store.write_batch`, which keeps the hourly rollups in step. Bulk loading and calling
``rebuild_rollups()`` would be faster, but it would not exercise (or time) the write path that a
backfill uses. Everything is a pure function of the seed, the series index and the time, so two
runs with the same arguments give the same database.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from tokentop.collectors.runner import price_batch
from tokentop.pricing.book import PriceBook
from tokentop.pricing.gpu import GpuCostModel
from tokentop.store.db import Store
from tokentop.store.records import (
    Batch,
    BilledCost,
    GpuSample,
    InferenceSample,
    SourceHealth,
    UsageBucket,
    UsageWindow,
    from_epoch,
    to_epoch,
    usd_to_nano,
)

MINUTE = 60
DAY = 86400
DEFAULT_END = datetime(2025, 11, 20, 14, 37, 30, tzinfo=UTC)
"""End of the generated history (and the benchmark's "now"): mid-minute and mid-hour, so every
query window has ragged edges read from the fine tables."""
META_KEY = "bench.dataset"


@dataclass(frozen=True, slots=True)
class Model:
    """A model's per-request token profile."""

    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    cache_share: float = 0.0
    """Share of input read from cache."""
    cache_write_share: float = 0.0
    web_search_rate: float = 0.0
    """Web searches per request."""
    traffic: float = 1.0
    """Relative request rate: dear models see less traffic, as they do in practice."""


PRICED_MODELS: tuple[Model, ...] = (
    Model("openai", "gpt-4o-2024-08-06", 1800, 350, 0.45, traffic=0.5),
    Model("openai", "gpt-4o-mini-2024-07-18", 900, 120, 0.3),
    Model("openai", "gpt-4.1-2025-04-14", 2500, 400, 0.5, web_search_rate=0.1, traffic=0.5),
    Model("openai", "gpt-4.1-mini-2025-04-14", 1200, 200, 0.4),
    Model("openai", "gpt-4.1-nano-2025-04-14", 600, 80, 0.2),
    Model("openai", "o3-mini", 6000, 1400, traffic=0.3),
    Model("openai", "o4-mini-2025-04-16", 4000, 1600, 0.3, traffic=0.3),
    Model("openai", "gpt-5-2025-08-07", 3000, 900, 0.5, web_search_rate=0.2, traffic=0.3),
    Model("openai", "gpt-5-mini-2025-08-07", 1500, 500, 0.4),
    Model("openai", "text-embedding-3-small", 400, 0),
    Model("anthropic", "claude-sonnet-4-20250514", 3200, 420, 0.7, 0.08, traffic=0.3),
    Model("anthropic", "claude-3-5-haiku-20241022", 1100, 150, 0.35, 0.03),
    Model("anthropic", "claude-opus-4-1-20250805", 9000, 1800, 0.2, 0.1, traffic=0.03),
    Model("anthropic", "claude-3-7-sonnet-20250219", 2800, 380, 0.5, 0.05, 0.2, traffic=0.3),
    Model("anthropic", "claude-sonnet-4-5-20250929", 3500, 500, 0.6, 0.06, traffic=0.3),
)
UNPRICED_MODEL = Model("acme", "acme-llm-70b-ft", 1500, 300)
"""No price is known for it: its tokens must show as unpriced, never as $0."""

SOURCES = {"openai": "openai", "anthropic": "anthropic", "acme": "acme-gateway"}
"""Usage source name per provider."""
PROJECTS = ("search", "support-bot", "internal-tools", "eval-harness", "batch-summarise")
TAGS = ("prod", "prod", "staging", "eval", "")
SHAPES = {"diurnal": 65, "business": 15, "nightly": 8, "sparse": 12}
"""Traffic shapes and their weights: most series run all day, a few leave minutes empty."""


@dataclass(frozen=True, slots=True)
class Series:
    """One stream of usage buckets: a model used by a project, under a tag and an API key."""

    model: Model
    project: str
    tag: str
    api_key: str
    shape: str
    """``diurnal``, ``business`` (zero at night and weekends), ``nightly`` or ``sparse``."""
    per_minute: float
    """Mean requests per minute at the shape's peak."""
    service_tier: str = ""
    batch: str = ""

    @property
    def source(self) -> str:
        """The source that reports it."""
        return SOURCES[self.model.provider]


CORE_SERIES = 40
"""Series beyond this many are the long tail of an organisation (see :func:`tail_series`)."""
TAIL_RATE = 0.1
"""Mean requests per minute, at its shape's peak, of a long-tail series (median)."""
TAIL_PROJECTS = tuple(f"team-{k:02d}" for k in range(24))
TAIL_TAGS = ("dev", "test", "ci", "eval", "", "feature-search", "feature-agents", "staging")


def make_series(count: int, seed: int, tail_rate: float = TAIL_RATE) -> tuple[Series, ...]:
    """``count`` distinct series; every priced model appears, and one is unpriced (the last of
    the first :data:`CORE_SERIES`, so the first 40 are the same whatever the count).

    Beyond :data:`CORE_SERIES`, the series are an organisation's long tail: see
    :func:`tail_series`."""
    core = _core_series(min(count, CORE_SERIES), seed)
    return core + tail_series(count - len(core), seed, tail_rate)


def tail_series(count: int, seed: int, tail_rate: float = TAIL_RATE) -> tuple[Series, ...]:
    """``count`` long-tail series: every developer's key, every CI job's, every feature tag.

    Each has its own API key (two models per key), one of 24 projects and 8 tags, and little
    traffic: business hours (half of them), sparse all day (four in ten) or a nightly CI run;
    a rate drawn around ``tail_rate`` requests a minute at the shape's peak (lognormal, a
    spread of e). So the tail adds many series and few buckets, as it does in an organisation:
    most of the spend and traffic stays with the core series."""
    rng = random.Random(f"{seed}:tail")
    out: list[Series] = []
    keys: set[tuple[str, ...]] = set()
    for i in range(count):
        model = rng.choice(PRICED_MODELS)
        shape = rng.choices(("business", "sparse", "nightly"), weights=(50, 40, 10))[0]
        rate = min(rng.lognormvariate(math.log(tail_rate), 1.0), 20 * tail_rate)
        who = "ci" if shape == "nightly" else "dev"
        project = rng.choice(TAIL_PROJECTS)
        tag = "ci" if shape == "nightly" else rng.choice(TAIL_TAGS)
        key = f"key_{who}{i // 2:04d}_{model.provider[:3]}"
        if (model.model, project, tag, key) in keys:  # the pair's other series: its own key
            key = f"key_{who}{i:04d}x_{model.provider[:3]}"
        keys.add((model.model, project, tag, key))
        out.append(
            Series(
                model=model,
                project=project,
                tag=tag,
                api_key=key,
                shape=shape,
                per_minute=round(rate * (4 if shape == "nightly" else 1), 4),
                service_tier="default" if model.provider == "openai" else "standard",
            )
        )
    return tuple(out)


def _core_series(count: int, seed: int) -> tuple[Series, ...]:
    rng = random.Random(f"{seed}:series")
    out: list[Series] = []
    keys: set[tuple[str, ...]] = set()
    for i in range(count):
        model = (
            UNPRICED_MODEL
            if i == count - 1 and count > 1
            else PRICED_MODELS[i % len(PRICED_MODELS)]
        )
        shape = rng.choices(list(SHAPES), weights=list(SHAPES.values()))[0]
        while True:
            project = "batch-summarise" if shape == "nightly" else rng.choice(PROJECTS[:-1])
            tag = rng.choice(TAGS)
            key = (model.model, project, tag)
            if key not in keys:
                keys.add(key)
                break
        peak = {
            "diurnal": rng.lognormvariate(math.log(12), 0.8),
            "business": rng.lognormvariate(math.log(8), 0.6),
            "nightly": rng.uniform(20, 40),
            "sparse": rng.uniform(0.05, 0.5),
        }[shape]
        peak *= model.traffic
        if shape != "sparse":
            peak = max(peak, 0.8)  # a low-rate series still has most of its minutes
        if model is UNPRICED_MODEL:
            peak = min(peak, 3.0)
        out.append(
            Series(
                model=model,
                project=project,
                tag=tag,
                api_key=f"key_{project.replace('-', '')[:6]}_{model.provider[:3]}",
                shape=shape,
                per_minute=round(peak, 3),
                service_tier="default" if model.provider == "openai" else "standard",
                batch="true" if shape == "nightly" and model.provider == "openai" else "",
            )
        )
    return tuple(out)


def _diurnal(minute_of_day: int) -> float:
    """Low at night, peak mid-afternoon UTC."""
    hour = minute_of_day / 60
    return 0.25 + 0.75 * (0.5 + 0.5 * math.cos((hour - 15) / 24 * 2 * math.pi))


def _shape(shape: str, day: int, minute_of_day: int) -> float:
    hour = minute_of_day // 60
    if shape == "business":
        weekday = (day + 3) % 7 < 5  # the Unix epoch began on a Thursday
        return 0.6 + 0.4 * _diurnal(minute_of_day) if weekday and 7 <= hour < 19 else 0.0
    if shape == "nightly":
        return 1.0 if 1 <= hour < 4 else 0.0
    return _diurnal(minute_of_day)


def day_intensity(seed: int, day: int) -> list[float]:
    """Per minute of a UTC day: bursts (a few minutes, x2-3) and rare spikes (x6-10) that every
    series shares."""
    rng = random.Random(f"{seed}:intensity:{day}")
    factor = [1.0] * 1440
    for block in range(0, 1440, 7):
        if rng.random() < 0.12:
            boost = 2 + rng.random()
            for m in range(block, min(block + 7, 1440)):
                factor[m] *= boost
    for window in range(0, 1440, 45):
        if rng.random() < 0.08:
            start = window + rng.randrange(40)
            boost = 6 + 4 * rng.random()
            for m in range(start, min(start + 4, 1440)):
                factor[m] *= boost
    return factor


def _poisson(rng: random.Random, mean: float) -> int:
    if mean <= 0:
        return 0
    if mean > 30:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def day_usage(
    series: tuple[Series, ...], seed: int, day: int, lo: int, hi: int, end_s: int
) -> list[UsageBucket]:
    """Unpriced one-minute buckets of every series for the minutes of UTC ``day`` that start in
    ``[lo, hi)`` (epoch seconds), oldest first. The minute holding ``end_s`` is open: its counts
    are partial."""
    intensity = day_intensity(seed, day)
    day_s = day * DAY
    out: list[UsageBucket] = []
    for index, s in enumerate(series):
        m = s.model
        # One generator per series and day, always drawn over the whole day, so a bucket does not
        # depend on where a run starts or ends.
        rng = random.Random(f"{seed}:{index}:{day}")
        for minute in range(1440):
            start_s = day_s + minute * MINUTE
            mean = s.per_minute * _shape(s.shape, day, minute) * intensity[minute]
            requests = _poisson(rng, mean)
            if not requests:
                continue
            jitter = rng.random()
            if not lo <= start_s < hi:
                continue
            input_total = round(requests * m.input_tokens * (0.7 + 0.6 * jitter))
            cache_read = min(input_total, round(input_total * m.cache_share * (0.8 + 0.3 * jitter)))
            write = min(input_total - cache_read, round(input_total * m.cache_write_share))
            write_1h = write // 4 if m.provider == "anthropic" else 0
            output = round(requests * m.output_tokens * (1.3 - 0.6 * jitter))
            searches = round(requests * m.web_search_rate * (0.5 + jitter))
            counts = [
                requests,
                input_total - cache_read - write,
                cache_read,
                write - write_1h,
                write_1h,
                output,
                searches,
            ]
            if start_s <= end_s < start_s + MINUTE:
                fraction = (end_s - start_s + 1) / MINUTE
                counts = [int(c * fraction) for c in counts]
                if not counts[0]:
                    continue
            out.append(
                UsageBucket(
                    source=s.source,
                    provider=m.provider,
                    model=m.model,
                    start=from_epoch(start_s),
                    width_s=MINUTE,
                    project=s.project,
                    api_key=s.api_key,
                    tag=s.tag,
                    service_tier=s.service_tier,
                    batch=s.batch,
                    requests=counts[0],
                    input_uncached=counts[1],
                    cache_read=counts[2],
                    cache_write_5m=counts[3],
                    cache_write_1h=counts[4],
                    output=counts[5],
                    web_searches=counts[6],
                )
            )
    # Providers page usage by time bucket, so a batch arrives in time order (which is also the
    # order of the usage table's key: a series-major order would make every insert a random one).
    out.sort(key=lambda b: b.start)
    return out


@dataclass(frozen=True, slots=True)
class _Gpu:
    device: str
    name: str
    index: int
    endpoint: str


GPUS = (
    _Gpu("GPU-bench-0000", "NVIDIA H100 80GB HBM3", 0, "vllm llama-3.1-70b"),
    _Gpu("GPU-bench-0001", "NVIDIA H100 80GB HBM3", 1, "vllm llama-3.1-70b"),
    _Gpu("GPU-bench-0002", "NVIDIA L40S", 2, "tgi mistral-7b"),
    _Gpu("GPU-bench-0003", "NVIDIA L40S", 3, "tgi mistral-7b"),
)
ENDPOINTS = {
    "vllm llama-3.1-70b": ("vllm", "diurnal", 9.0),
    "tgi mistral-7b": ("tgi", "business", 20.0),
}
"""Endpoint: (server kind, traffic shape, inferences per second at peak)."""
GPU_SOURCE, INFERENCE_SOURCE = "nvml", "inference"


def day_gpu(
    seed: int, day: int, lo: int, hi: int, costs: GpuCostModel
) -> tuple[list[GpuSample], list[InferenceSample]]:
    """One sample per GPU and per endpoint for every minute of ``day`` that ends in ``(lo, hi]``."""
    rng = random.Random(f"{seed}:gpu:{day}")
    gpus: list[GpuSample] = []
    inference: list[InferenceSample] = []
    seconds = Decimal(MINUTE)
    for minute in range(1440):
        end_s = day * DAY + (minute + 1) * MINUTE
        draws = [rng.random() for _ in range(3)]
        if not lo < end_s <= hi:
            continue
        ts = from_epoch(end_s)
        for endpoint, (kind, shape, peak) in ENDPOINTS.items():
            rate = peak * _shape(shape, day, minute) * (0.7 + 0.6 * draws[0])
            requests = round(rate * MINUTE)
            devices = [g for g in GPUS if g.endpoint == endpoint]
            inference.append(
                InferenceSample(
                    source=INFERENCE_SOURCE,
                    endpoint=endpoint,
                    ts=ts,
                    interval_s=MINUTE,
                    kind=kind,
                    requests=requests,
                    prompt_tokens=requests * round(700 + 200 * draws[1]),
                    generation_tokens=requests * round(180 + 80 * draws[2]),
                    devices=tuple(g.device for g in devices),
                )
            )
            for g in devices:
                util = min(100.0, rate / peak * 85 * (0.9 + 0.2 * draws[g.index % 3]))
                power_mw = round((70 + 6.3 * util) * 1000)
                cost = costs.interval_cost(g.name, seconds, power_mw * MINUTE)
                nano = usd_to_nano(cost.cost)
                gpus.append(
                    GpuSample(
                        source=GPU_SOURCE,
                        device=g.device,
                        ts=ts,
                        interval_s=MINUTE,
                        name=g.name,
                        index=g.index,
                        util_pct=round(util, 1),
                        mem_used_bytes=round((18 + util * 0.55) * 2**30),
                        mem_total_bytes=80 * 2**30 if "H100" in g.name else 48 * 2**30,
                        power_mw=power_mw,
                        energy_mj=power_mw * MINUTE,
                        temp_c=round(34 + util * 0.4),
                        cost_nano=nano,
                        idle_cost_nano=nano if requests == 0 else 0,
                        cost_ref=f"{cost.rate.mode} ${cost.rate.usd_per_hour}/h"
                        + (" estimated" if cost.estimated else ""),
                    )
                )
    return gpus, inference


def day_bills(seed: int, day: int, usage: Sequence[UsageBucket]) -> list[BilledCost]:
    """What the providers' cost endpoints bill for a complete day: the estimate, a few percent
    off (rounding, discounts, line items the usage API does not show). Unpriced models are
    billed too (the provider knows its price even when tokentop does not)."""
    rng = random.Random(f"{seed}:billed:{day}")
    est: dict[tuple[str, str, str, str], int] = defaultdict(int)
    for b in usage:
        nano = b.cost_nano if b.priced else (b.input_total + b.output) * 2000  # $2 per 1M
        est[(b.source, b.provider, b.project, b.model)] += nano
    return [
        BilledCost(
            source=source,
            provider=provider,
            day=from_epoch(day * DAY),
            amount_nano=round(nano * rng.uniform(0.97, 1.05)),
            project=project,
            line_item=model,
        )
        for (source, provider, project, model), nano in sorted(est.items())
    ]


@dataclass
class Summary:
    """What a generation wrote and how long each step took (seconds)."""

    rows: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    make_s: float = 0.0
    """Building the records in Python."""
    price_s: float = 0.0
    """``price_batch`` over the usage buckets."""
    write_s: float = 0.0
    """``Store.write_batch``, rollups included."""
    total_s: float = 0.0
    db_bytes: int = 0


def generate(
    path: Path,
    *,
    days: int = 30,
    series: int = 40,
    seed: int = 1,
    end: datetime = DEFAULT_END,
    progress: Callable[[str], None] | None = None,
    tail_rate: float = TAIL_RATE,
) -> Summary:
    """Write ``days`` of history ending at ``end`` into a new database at ``path``."""
    if path.exists():
        raise FileExistsError(f"{path} exists; generate into a new file")
    began = time.perf_counter()
    summary = Summary()
    all_series = make_series(series, seed, tail_rate)
    book, costs = PriceBook(), GpuCostModel()
    end_s = to_epoch(end)
    first_s = (end_s // MINUTE - days * 1440 + 1) * MINUTE
    with Store(path) as store:
        for day in range(first_s // DAY, end_s // DAY + 1):
            lo, hi = max(first_s, day * DAY), min((day + 1) * DAY, end_s + 1)
            t0 = time.perf_counter()
            usage = day_usage(all_series, seed, day, lo, hi, end_s)
            gpu, inference = day_gpu(seed, day, lo, end_s if hi > end_s else hi, costs)
            windows = tuple(
                UsageWindow(source, MINUTE, from_epoch(lo), from_epoch(hi))
                for source in sorted({s.source for s in all_series})
            )
            t1 = time.perf_counter()
            priced = price_batch(book, Batch(usage=tuple(usage))).usage
            t2 = time.perf_counter()
            complete = hi == (day + 1) * DAY
            bills = day_bills(seed, day, priced) if complete else []
            batch = Batch(
                usage=priced,
                windows=windows,
                gpu=tuple(gpu),
                inference=tuple(inference),
                billed=tuple(bills),
            )
            t3 = time.perf_counter()
            store.write_batch(batch)
            t4 = time.perf_counter()
            summary.make_s += (t1 - t0) + (t3 - t2)
            summary.price_s += t2 - t1
            summary.write_s += t4 - t3
            for name, n in (
                ("usage", len(usage)),
                ("gpu", len(gpu)),
                ("inference", len(inference)),
                ("billed", len(bills)),
            ):
                summary.rows[name] += n
            if progress is not None:
                progress(f"{from_epoch(day * DAY).date()}: {len(usage):,} usage buckets")
        _record_sources(store, all_series, end)
        store.set_meta(
            META_KEY,
            json.dumps(
                {
                    "days": days,
                    "series": series,
                    "seed": seed,
                    "end": end.isoformat(),
                    **({"tail_rate": tail_rate} if series > CORE_SERIES else {}),
                }
            ),
        )
        for table in ("usage_hour", "gpu_hour", "inference_hour"):
            summary.rows[table] = store.query(f"SELECT COUNT(*) FROM {table}")[0][0]
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    summary.total_s = time.perf_counter() - began
    summary.db_bytes = sum(
        p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists()
    )
    return summary


def _record_sources(store: Store, all_series: tuple[Series, ...], end: datetime) -> None:
    kinds = {"openai": "openai", "anthropic": "anthropic", "acme-gateway": "openai-compatible"}
    kinds |= {GPU_SOURCE: "nvml", INFERENCE_SOURCE: "prometheus"}
    minute = from_epoch(to_epoch(end) // MINUTE * MINUTE)
    for name in sorted({s.source for s in all_series} | {GPU_SOURCE, INFERENCE_SOURCE}):
        for back in range(60, -1, -5):
            store.record_health(
                SourceHealth(
                    name=name,
                    kind=kinds[name],
                    state="ok",
                    last_success=end,
                    lag_s=30.0,
                    watermark=minute,
                    newest_data=end,
                ),
                calls_delta=2,
                now=end - timedelta(minutes=back),
            )


def dataset_info(store: Store) -> dict[str, object] | None:
    """The arguments a database was generated with, or ``None`` if it was not."""
    raw = store.get_meta(META_KEY)
    return None if raw is None else dict(json.loads(raw))


def _parse_end(text: str) -> datetime:
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"--end {text!r}: give a timezone, e.g. {text}Z")
    return when.astimezone(UTC)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__)
    parser.add_argument("--db", type=Path, required=True, help="new database file to write")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--series", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--end", type=_parse_end, default=DEFAULT_END, help="ISO time, UTC")
    parser.add_argument(
        "--tail-rate",
        type=float,
        default=TAIL_RATE,
        help=f"requests/min of a series beyond the first {CORE_SERIES} (median, at peak)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-day progress")
    args = parser.parse_args(argv)
    if args.days < 1 or args.series < 1:
        parser.error("--days and --series must be at least 1")
    if args.db.exists():
        parser.error(f"--db {args.db}: file exists; generate into a new file")
    summary = generate(
        args.db,
        days=args.days,
        series=args.series,
        seed=args.seed,
        end=args.end,
        progress=None if args.quiet else lambda line: print(line, file=sys.stderr),
        tail_rate=args.tail_rate,
    )
    print_summary(summary)
    return 0


def print_summary(summary: Summary) -> None:
    """Rows written and where the time went."""
    fine = sum(summary.rows[t] for t in ("usage", "gpu", "inference", "billed"))
    print("rows written: " + ", ".join(f"{k} {v:,}" for k, v in summary.rows.items()))
    usage = summary.rows["usage"]
    print(
        f"time: {summary.total_s:.1f} s total; build {summary.make_s:.1f} s, "
        f"price {summary.price_s:.1f} s ({usage / max(summary.price_s, 1e-9):,.0f} buckets/s), "
        f"write {summary.write_s:.1f} s ({fine / max(summary.write_s, 1e-9):,.0f} rows/s)"
    )
    print(f"database: {summary.db_bytes / 2**20:,.1f} MiB")


if __name__ == "__main__":
    sys.exit(main())
