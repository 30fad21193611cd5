"""The demo source: simulated API traffic and a simulated self-hosted GPU, so every pane moves.

Traffic is a deterministic function of (seed, series, minute): a daily rhythm, noise, short bursts
and an occasional spike. The open minute grows as it elapses, as a provider's newest bucket does,
and is rewritten (never added to) on every poll. Because the history is a pure function of time, a
restart regenerates exactly what is stored and nothing is counted twice. As OpenAI bills no cache
writes, its series have none. Each settled UTC day gets a bill (list price, a few percent off), so
the billed-vs-estimated figures a real user sees are exercised too.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from tokentop.collectors.base import Clock, PollContext, utcnow
from tokentop.pricing.book import PriceBook, TokenCounts
from tokentop.pricing.gpu import GpuCostModel
from tokentop.store.records import (
    Batch,
    BilledCost,
    GpuSample,
    InferenceSample,
    UsageBucket,
    UsageWindow,
    from_epoch,
    to_epoch,
    usd_to_nano,
)

MINUTE = 60
DAY = 86_400
BILLED_PROVIDERS = ("openai", "anthropic")
_TOKEN_KEYS = (
    "input_uncached",
    "cache_read",
    "cache_write_5m",
    "cache_write_1h",
    "output",
    "web_searches",
)
"""Providers whose (simulated) cost endpoints bill each settled UTC day."""


@dataclass(frozen=True, slots=True)
class Series:
    """One simulated stream of requests: a model used by a project under a tag."""

    provider: str
    model: str
    project: str
    tag: str
    api_key: str
    per_minute: float
    """Mean requests per minute at the daily peak."""
    input_tokens: int
    output_tokens: int
    cache_share: float = 0.0
    """Share of input read from cache."""
    cache_write_share: float = 0.0
    web_search_rate: float = 0.0
    """Web searches per request."""


SERIES: tuple[Series, ...] = (
    Series("openai", "gpt-4o-2024-08-06", "search", "prod", "key_search", 22, 1800, 350, 0.45),
    Series("openai", "gpt-4o-mini-2024-07-18", "search", "prod", "key_search", 60, 900, 120, 0.3),
    Series(
        "openai",
        "gpt-4o-mini-2024-07-18",
        "support-bot",
        "prod",
        "key_support",
        35,
        2400,
        260,
        0.6,
    ),
    Series("openai", "o3-mini", "batch-summarise", "eval", "key_batch", 6, 6000, 1400),
    Series(
        "openai",
        "gpt-4o-2024-08-06",
        "search",
        "staging",
        "key_staging",
        4,
        1700,
        330,
        0.2,
        web_search_rate=0.3,
    ),
    Series(
        "anthropic",
        "claude-sonnet-4-20250514",
        "support-bot",
        "prod",
        "key_ant_support",
        18,
        3200,
        420,
        0.7,
        0.08,
    ),
    Series(
        "anthropic",
        "claude-3-5-haiku-20241022",
        "search",
        "prod",
        "key_ant_search",
        40,
        1100,
        150,
        0.35,
        0.03,
    ),
    Series(
        "anthropic",
        "claude-opus-4-1-20250805",
        "batch-summarise",
        "eval",
        "key_ant_batch",
        1.5,
        9000,
        1800,
        0.2,
        0.1,
    ),
    Series(
        "anthropic",
        "claude-sonnet-4-20250514",
        "search",
        "staging",
        "key_ant_staging",
        3,
        2800,
        380,
        0.5,
        0.05,
        0.2,
    ),
    Series("acme", "acme-llm-70b-ft", "support-bot", "eval", "key_acme", 2, 1500, 300),
)
"""The demo's traffic mix; the last series has no known price, so it shows as unpriced."""


def _rng(seed: int, *parts: object) -> random.Random:
    return random.Random(f"{seed}:" + ":".join(str(p) for p in parts))


def _diurnal(minute: int) -> float:
    """Traffic rhythm over a UTC day: low at night, peak mid-afternoon."""
    hour = (minute % 1440) / 60
    return 0.25 + 0.75 * (0.5 + 0.5 * math.cos((hour - 15) / 24 * 2 * math.pi))


def _intensity(seed: int, minute: int) -> float:
    """Bursts (a few minutes, x2-3) and rare spikes (x6-10) shared by all series."""
    factor = 1.0
    block = minute // 7
    if _rng(seed, "burst", block).random() < 0.12:
        factor *= 2 + _rng(seed, "burst-size", block).random()
    window = minute // 45
    spike_rng = _rng(seed, "spike", window)
    if spike_rng.random() < 0.08:
        start = window * 45 + spike_rng.randrange(40)
        if start <= minute < start + 4:
            factor *= 6 + 4 * spike_rng.random()
    return factor


def minute_usage(seed: int, series_index: int, minute: int) -> dict[str, int]:
    """The complete usage of one series in one minute (Unix minute number)."""
    s = SERIES[series_index]
    rng = _rng(seed, series_index, minute)
    mean = s.per_minute * _diurnal(minute) * _intensity(seed, minute)
    requests = max(0, round(rng.gauss(mean, math.sqrt(mean) + 0.5)))
    if requests == 0:
        return {}
    input_total = round(requests * s.input_tokens * rng.uniform(0.7, 1.3))
    cache_read = round(input_total * s.cache_share * rng.uniform(0.8, 1.1))
    cache_read = min(cache_read, input_total)
    write = round(input_total * s.cache_write_share * rng.uniform(0.5, 1.5))
    write = min(write, input_total - cache_read)
    write_1h = write // 4 if s.provider == "anthropic" else 0
    return {
        "requests": requests,
        "input_uncached": input_total - cache_read - write,
        "cache_read": cache_read,
        "cache_write_5m": write - write_1h,
        "cache_write_1h": write_1h,
        "output": round(requests * s.output_tokens * rng.uniform(0.7, 1.3)),
        "web_searches": round(requests * s.web_search_rate * rng.uniform(0.5, 1.5)),
    }


def _scaled(counts: dict[str, int], fraction: float) -> dict[str, int]:
    if fraction >= 1:
        return counts
    return {k: int(v * fraction) for k, v in counts.items()}


class DemoCollector:
    """Simulated OpenAI and Anthropic traffic across projects, tags and keys.

    Args:
        seed: makes the traffic reproducible.
        interval_s: seconds between polls.
        clock: injected time source.
        name: the source name.
    """

    kind = "demo"

    def __init__(
        self,
        *,
        seed: int = 7,
        interval_s: float = 1.0,
        clock: Clock = utcnow,
        name: str = "demo",
        book: PriceBook | None = None,
    ) -> None:
        self.seed = seed
        self.interval_s = interval_s
        self.clock = clock
        self.name = name
        self.book = book
        self.calls = 0

    async def poll(self, ctx: PollContext) -> Batch:
        """Every minute from the watermark (or the backfill start) to now, the open one partial;
        and, with a price book, the bill of each UTC day that closed since the last poll."""
        now_s = to_epoch(ctx.now)
        current = now_s // MINUTE
        if ctx.watermark is not None:
            first = to_epoch(ctx.watermark) // MINUTE
        else:
            # Whole UTC days, so that a billed day is compared with a whole day's estimate.
            first = to_epoch(ctx.backfill_start) // DAY * DAY // MINUTE
        first = min(first, current)
        buckets: list[UsageBucket] = []
        for minute in range(first, current + 1):
            start = from_epoch(minute * MINUTE)
            fraction = 1.0 if minute < current else (now_s - minute * MINUTE + 1) / MINUTE
            for i, s in enumerate(SERIES):
                counts = _scaled(minute_usage(self.seed, i, minute), fraction)
                if not counts or not counts["requests"]:
                    continue
                buckets.append(
                    UsageBucket(
                        source=self.name,
                        provider=s.provider,
                        model=s.model,
                        start=start,
                        width_s=MINUTE,
                        project=s.project,
                        api_key=s.api_key,
                        tag=s.tag,
                        service_tier="default" if s.provider == "openai" else "standard",
                        input_uncached=counts["input_uncached"],
                        cache_read=counts["cache_read"],
                        cache_write_5m=counts["cache_write_5m"],
                        cache_write_1h=counts["cache_write_1h"],
                        output=counts["output"],
                        requests=counts["requests"],
                        web_searches=counts["web_searches"],
                    )
                )
        window = UsageWindow(
            self.name, MINUTE, from_epoch(first * MINUTE), from_epoch((current + 1) * MINUTE)
        )
        billed, billed_days = await asyncio.to_thread(self._bills, first * MINUTE, now_s)
        return Batch(
            usage=tuple(buckets),
            windows=(window,),
            billed=billed,
            billed_days=billed_days,
            watermark=from_epoch(current * MINUTE),
        )

    def _bills(
        self, since_s: int, now_s: int
    ) -> tuple[tuple[BilledCost, ...], tuple[tuple[str, datetime, datetime], ...]]:
        """What OpenAI's and Anthropic's cost endpoints would report for the UTC days that ended
        in ``(since_s, now_s]``: the list price of the day's usage, a few percent off (as real
        bills are), provider by provider. The unpriced provider has no bill."""
        if self.book is None:
            return (), ()
        bills: list[BilledCost] = []
        days: list[tuple[str, datetime, datetime]] = []
        for day_end in range((since_s // DAY + 1) * DAY, now_s + 1, DAY):
            day = day_end - DAY
            costs: dict[str, Decimal] = {}
            # Priced an hour of a series at a time (prices change by date, not by minute).
            for hour in range(day, day_end, 3600):
                for i, s in enumerate(SERIES):
                    if s.provider not in BILLED_PROVIDERS:
                        continue
                    sums = dict.fromkeys(_TOKEN_KEYS, 0)
                    for minute in range(hour // MINUTE, (hour + 3600) // MINUTE):
                        for key, value in minute_usage(self.seed, i, minute).items():
                            if key in sums:
                                sums[key] += value
                    tokens = TokenCounts(*(sums[k] for k in _TOKEN_KEYS))
                    quote = self.book.quote(s.provider, s.model, tokens, from_epoch(hour))
                    if quote.cost is not None:
                        costs[s.provider] = costs.get(s.provider, Decimal(0)) + quote.cost
            for provider, cost in sorted(costs.items()):
                off = Decimal(str(round(_rng(self.seed, "bill", provider, day).uniform(-3, 3), 2)))
                bills.append(
                    BilledCost(
                        self.name,
                        provider,
                        from_epoch(day),
                        usd_to_nano(cost * (1 + off / 100)),
                        line_item=f"{provider} API usage",
                    )
                )
            days.append((self.name, from_epoch(day), from_epoch(day_end)))
        return tuple(bills), tuple(days)

    async def aclose(self) -> None:
        """Nothing to release."""


@dataclass(frozen=True, slots=True)
class _Gpu:
    device: str
    name: str
    index: int


DEMO_GPUS = (
    _Gpu("GPU-demo-0000-h100", "NVIDIA H100 80GB HBM3", 0),
    _Gpu("GPU-demo-0001-h100", "NVIDIA H100 80GB HBM3", 1),
)
DEMO_ENDPOINT = "demo-vllm (llama-3.1-8b)"


def gpu_load(seed: int, minute: int) -> float:
    """Simulated inferences per second on the self-hosted endpoint: idle at night."""
    hour = (minute % 1440) / 60
    if 1 <= hour < 5:
        return 0.0
    base = 14 * _diurnal(minute)
    return max(0.0, base * _rng(seed, "gpu", minute).uniform(0.6, 1.4))


class DemoGpuCollector:
    """Two simulated H100s serving a vLLM endpoint, costed by the GPU cost model.

    Args:
        costs: the GPU cost model (configured rates, or labelled defaults).
        seed: makes the load reproducible.
        interval_s: seconds between samples.
        clock: injected time source.
        name: the source name.
    """

    kind = "demo"

    def __init__(
        self,
        costs: GpuCostModel,
        *,
        seed: int = 7,
        interval_s: float = 1.0,
        clock: Clock = utcnow,
        name: str = "demo-gpu",
    ) -> None:
        self.costs = costs
        self.seed = seed
        self.interval_s = interval_s
        self.clock = clock
        self.name = name
        self.calls = 0
        self._last: datetime | None = None

    def _samples(self, start: datetime, end: datetime) -> tuple[list[GpuSample], InferenceSample]:
        seconds = (end - start).total_seconds()
        minute = to_epoch(end) // MINUTE
        rate = gpu_load(self.seed, minute)
        rng = _rng(self.seed, "gpu-sample", to_epoch(end))
        requests = round(rate * seconds * rng.uniform(0.9, 1.1))
        samples = []
        for gpu in DEMO_GPUS:
            util = min(100.0, rate * 5.5 * rng.uniform(0.85, 1.15)) if rate else 0.0
            power_mw = round((70 + 6.3 * util) * 1000)
            cost = self.costs.interval_cost(
                gpu.name, Decimal(str(seconds)), round(power_mw * seconds)
            )
            nano = usd_to_nano(cost.cost)
            samples.append(
                GpuSample(
                    source=self.name,
                    device=gpu.device,
                    ts=end,
                    interval_s=seconds,
                    name=gpu.name,
                    index=gpu.index,
                    util_pct=round(util, 1),
                    mem_used_bytes=round((18 + util * 0.55) * 2**30),
                    mem_total_bytes=80 * 2**30,
                    power_mw=power_mw,
                    temp_c=round(34 + util * 0.4),
                    cost_nano=nano,
                    idle_cost_nano=nano if requests == 0 else 0,
                    cost_ref=f"{cost.rate.mode} ${cost.rate.usd_per_hour}/h ({cost.rate.source})"
                    + (" estimated" if cost.estimated else ""),
                )
            )
        inference = InferenceSample(
            source=self.name,
            endpoint=DEMO_ENDPOINT,
            ts=end,
            interval_s=seconds,
            kind="vllm",
            requests=requests,
            prompt_tokens=requests * round(rng.uniform(700, 900)),
            generation_tokens=requests * round(rng.uniform(180, 260)),
            devices=tuple(g.device for g in DEMO_GPUS),
        )
        return samples, inference

    async def poll(self, ctx: PollContext) -> Batch:
        """One sample per GPU since the last poll; a first start backfills per minute."""
        now = ctx.now
        gpu: list[GpuSample] = []
        inference: list[InferenceSample] = []
        if self._last is None:
            # After a restart, resume from the watermark; on a first start, backfill.
            t = ctx.watermark or ctx.backfill_start
            step = timedelta(minutes=1)
            while t + step <= now:
                samples, inf = self._samples(t, t + step)
                gpu += samples
                inference.append(inf)
                t += step
            self._last = t
        if now > self._last:
            samples, inf = self._samples(self._last, now)
            gpu += samples
            inference.append(inf)
            self._last = now
        return Batch(gpu=tuple(gpu), inference=tuple(inference), watermark=now)

    async def aclose(self) -> None:
        """Nothing to release."""


def demo_backfill() -> timedelta:
    """How much history the demo creates on first start."""
    return timedelta(hours=24)
