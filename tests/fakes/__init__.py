"""Test doubles shared by tests: a local fake of the provider admin APIs, and helpers to point
the admin-API collectors at it and to apply their batches the way the store does."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from tests.fakes.provider_server import (
    ANTHROPIC_KEY,
    OPENAI_KEY,
    Behaviour,
    FakeProviderServer,
    Fault,
    RecordedRequest,
)
from tokentop.collectors.anthropic import AnthropicCollector
from tokentop.collectors.base import PollContext
from tokentop.collectors.config import ProviderConfig
from tokentop.collectors.http import AdminApiCollector
from tokentop.collectors.openai import OpenAICollector
from tokentop.store.records import Batch, BilledCost, UsageBucket

__all__ = [
    "ANTHROPIC_KEY",
    "KEYS",
    "KEY_ENV",
    "OPENAI_KEY",
    "Behaviour",
    "FakeProviderServer",
    "Fault",
    "RecordedRequest",
    "ReplacingStore",
    "make_collector",
    "poll_context",
    "sum_usage",
]

KEY_ENV = {"openai": "OPENAI_ADMIN_KEY", "anthropic": "ANTHROPIC_ADMIN_KEY"}
KEYS = {"openai": OPENAI_KEY, "anthropic": ANTHROPIC_KEY}


def make_collector(
    server: FakeProviderServer, provider: str, *, costs: bool = True, **options: Any
) -> AdminApiCollector:
    """A collector of ``provider`` aimed at ``server``, with a short timeout and backoff.

    The key is read from :data:`KEY_ENV` as usual: set it (``monkeypatch.setenv``).
    """
    base = server.openai_base_url if provider == "openai" else server.anthropic_base_url
    config = ProviderConfig(name=provider, key_env=KEY_ENV[provider], base_url=base, costs=costs)
    options.setdefault("timeout_s", 1.0)
    options.setdefault("backoff_s", 0.01)
    options.setdefault("clock", server.now)
    cls = OpenAICollector if provider == "openai" else AnthropicCollector
    return cls(config, **options)


def poll_context(
    now: datetime, watermark: datetime | None = None, backfill_hours: float = 2.0
) -> PollContext:
    """What the runner would pass."""
    return PollContext(
        now=now, watermark=watermark, backfill_start=now - timedelta(hours=backfill_hours)
    )


@dataclass
class ReplacingStore:
    """The store's replacement rule in memory: a batch's windows (and billed day ranges) are
    cleared for its source, then its records are upserted by key."""

    usage: dict[tuple[Any, ...], UsageBucket] = field(default_factory=dict)
    billed: dict[tuple[Any, ...], BilledCost] = field(default_factory=dict)
    watermark: datetime | None = None

    def apply(self, batch: Batch) -> None:
        """Write one batch."""
        for w in batch.windows:
            for key in [k for k, b in self.usage.items() if _in_window(b, w.source, w.width_s, w)]:
                del self.usage[key]
        for source, start, end in batch.billed_days:
            for key in [
                k for k, c in self.billed.items() if c.source == source and start <= c.day < end
            ]:
                del self.billed[key]
        for b in batch.usage:
            self.usage[_usage_key(b)] = b
        for c in batch.billed:
            self.billed[(c.source, c.day, c.project, c.line_item, c.workspace)] = c
        if batch.watermark is not None:
            self.watermark = batch.watermark

    def totals(self, start: datetime | None = None, end: datetime | None = None) -> dict[str, int]:
        """Summed token kinds, requests and web searches of buckets starting in [start, end)."""
        return sum_usage(
            b
            for b in self.usage.values()
            if (start is None or b.start >= start) and (end is None or b.start < end)
        )

    def billed_nano(self) -> int:
        """Summed billed amount."""
        return sum(c.amount_nano for c in self.billed.values())


KINDS = (
    "input_uncached",
    "cache_read",
    "cache_write_5m",
    "cache_write_1h",
    "output",
    "requests",
    "web_searches",
)


def sum_usage(buckets: Iterable[UsageBucket]) -> dict[str, int]:
    """Totals in the same keys as :meth:`FakeProviderServer.usage_totals`."""
    out = dict.fromkeys(KINDS, 0)
    for b in buckets:
        for kind in KINDS:
            out[kind] += getattr(b, kind)
    return out


def _in_window(b: UsageBucket, source: str, width_s: int, w: Any) -> bool:
    return b.source == source and b.width_s == width_s and w.start <= b.start < w.end


def _usage_key(b: UsageBucket) -> tuple[Any, ...]:
    return (
        b.source,
        b.start,
        b.width_s,
        b.model,
        b.project,
        b.api_key,
        b.workspace,
        b.tag,
        b.service_tier,
        b.batch,
        b.context_window,
    )
