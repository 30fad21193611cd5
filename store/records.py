"""Typed records that collectors produce and the store writes.

The store owns these types because it owns their schema; collectors and panes import them from
here. Money is integer nano-dollars (``1 USD == 1_000_000_000``); time is timezone-aware UTC.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from tokentop.store.basics import GROUPS as GROUPS
from tokentop.store.basics import NANO_PER_USD as NANO_PER_USD
from tokentop.store.basics import from_epoch as from_epoch
from tokentop.store.basics import nano_to_usd as nano_to_usd
from tokentop.store.basics import to_epoch as to_epoch
from tokentop.store.basics import usd_to_nano as usd_to_nano

USAGE_DIMENSIONS: tuple[str, ...] = (
    "project",
    "api_key",
    "workspace",
    "tag",
    "service_tier",
    "batch",
    "context_window",
)
"""Group-by dimensions of a usage bucket besides source, provider, model, start and width.

An absent dimension is stored as ``""`` (never NULL) so that it takes part in the unique key.
"""

TOKEN_KINDS: tuple[str, ...] = (
    "input_uncached",
    "cache_read",
    "cache_write_5m",
    "cache_write_1h",
    "output",
)
"""Token kinds priced separately, stored as integer columns of the same names."""


@dataclass(frozen=True, slots=True)
class UsageBucket:
    """Token usage of one model in one time bucket, for one combination of dimensions.

    ``input_uncached`` excludes cache reads and cache writes; the total input of the bucket is
    :attr:`input_total`. ``cost_nano`` and ``price_ref`` are filled in by the price book
    (``priced`` False means the model had no price and the cost is unknown, not zero).
    """

    source: str
    provider: str
    model: str
    start: datetime
    width_s: int = 60
    project: str = ""
    api_key: str = ""
    workspace: str = ""
    tag: str = ""
    service_tier: str = ""
    batch: str = ""
    context_window: str = ""
    input_uncached: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    output: int = 0
    requests: int = 0
    web_searches: int = 0
    cost_nano: int = 0
    priced: bool = False
    price_ref: str = ""

    @property
    def input_total(self) -> int:
        """All input tokens: uncached, cache reads and both kinds of cache write."""
        return self.input_uncached + self.cache_read + self.cache_write_5m + self.cache_write_1h

    @property
    def end(self) -> datetime:
        """Exclusive end of the bucket."""
        return from_epoch(to_epoch(self.start) + self.width_s)


@dataclass(frozen=True, slots=True)
class UsageWindow:
    """A poll's statement that it read every bucket of ``width_s`` in ``[start, end)``.

    The store deletes that source's buckets of that width in the window before writing the new
    ones, so a bucket that was revised away (a group that disappeared) does not linger.
    """

    source: str
    width_s: int
    start: datetime
    end: datetime


@dataclass(frozen=True, slots=True)
class BilledCost:
    """A provider's billed cost for one UTC day and line (from a cost endpoint)."""

    source: str
    provider: str
    day: datetime
    amount_nano: int
    project: str = ""
    line_item: str = ""
    workspace: str = ""
    currency: str = "usd"


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU (or MIG instance) over one sampling interval ending at ``ts``.

    ``cost_nano`` is the cost of the interval under the GPU cost model; ``idle_cost_nano`` the part
    of it spent while the GPU served nothing. Optional readings are ``None`` when not available.
    """

    source: str
    device: str
    ts: datetime
    interval_s: float
    name: str = ""
    index: int = 0
    util_pct: float | None = None
    mem_used_bytes: int | None = None
    mem_total_bytes: int | None = None
    power_mw: int | None = None
    energy_mj: int | None = None
    temp_c: int | None = None
    cost_nano: int = 0
    idle_cost_nano: int = 0
    cost_ref: str = ""


@dataclass(frozen=True, slots=True)
class InferenceSample:
    """Counter deltas of one inference endpoint over one interval ending at ``ts``."""

    source: str
    endpoint: str
    ts: datetime
    interval_s: float
    kind: str = ""
    requests: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    devices: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MeteredRequest:
    """One request observed by the per-request meter (proxy, httpx hook or pytest plugin)."""

    ts: datetime
    provider: str
    model: str
    source: str = "meter"
    request_id: str = ""
    input_uncached: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    output: int = 0
    web_searches: int = 0
    cost_nano: int = 0
    priced: bool = False
    price_ref: str = ""
    latency_ms: float = 0.0
    status: int = 200
    tag: str = ""
    estimated: bool = False
    service_tier: str = ""
    """The tier that served it (the response's ``service_tier``). It prices the request and is
    not stored: ``price_ref`` records the rule that priced it."""


STALE_POLLS = 3
"""A source is stale after this many of its intervals without a successful poll..."""
STALE_FLOOR_S = 10.0
"""...and never sooner than this many seconds (a 1 s source is stale after 10 s)."""
DEFAULT_INTERVAL_S = 60.0
"""The interval assumed for a polled source whose row predates stored intervals."""
LIVE_STATES = frozenset({"ok", "backfilling"})
"""Recorded states that claim the source is working (and so can turn out stale)."""
HEARTBEAT_KINDS = frozenset({"meter"})
"""Kinds that are not polled but beat while alive (the proxy): stale means stopped."""


def stale_after(interval_s: float) -> float:
    """Seconds without a successful poll after which a source of this interval is stale."""
    return max(STALE_POLLS * interval_s, STALE_FLOOR_S)


@dataclass(frozen=True, slots=True)
class SourceHealth:
    """How one source is doing, as the runner recorded it."""

    name: str
    kind: str
    state: str = "starting"
    last_success: datetime | None = None
    last_error: str = ""
    last_error_at: datetime | None = None
    lag_s: float | None = None
    calls: int = 0
    calls_last_hour: int = 0
    watermark: datetime | None = None
    detail: str = ""
    newest_data: datetime | None = None
    interval_s: float | None = None
    """Seconds between polls (or heartbeats, for a meter); ``None`` when not recorded."""

    @property
    def stale_after_s(self) -> float | None:
        """Seconds without a success after which this source is stale; ``None`` for a meter
        that leaves no heartbeat (it only writes when traffic passes, so silence says nothing).
        """
        if self.interval_s is None:
            return None if self.kind in HEARTBEAT_KINDS else stale_after(DEFAULT_INTERVAL_S)
        return stale_after(self.interval_s)

    def age_s(self, now: datetime) -> float | None:
        """Seconds since the last successful poll (or heartbeat); ``None`` if there was none."""
        if self.last_success is None:
            return None
        return max(0.0, (now - self.last_success).total_seconds())

    def overdue(self, now: datetime) -> bool:
        """No successful poll for longer than :attr:`stale_after_s` (whatever the state says)."""
        limit, age = self.stale_after_s, self.age_s(now)
        return limit is not None and age is not None and age > limit

    def stale(self, now: datetime) -> bool:
        """The recorded state says the source works, but it has not succeeded for too long:
        its process stopped (or hangs)."""
        return self.state in LIVE_STATES and self.overdue(now)

    def shown_state(self, now: datetime) -> str:
        """The state to show: ``stale`` (``stopped`` for a meter) instead of a recorded ``ok``
        that is no longer true, else the recorded state."""
        if self.stale(now):
            return "stopped" if self.kind in HEARTBEAT_KINDS else "stale"
        return self.state

    def failing(self, now: datetime) -> bool:
        """Not working right now: a failure state, stale, or never succeeded."""
        return self.state not in LIVE_STATES or self.last_success is None or self.stale(now)


@dataclass(frozen=True, slots=True)
class Batch:
    """What one poll of one source produced; written by the store in one transaction."""

    usage: tuple[UsageBucket, ...] = ()
    windows: tuple[UsageWindow, ...] = ()
    billed: tuple[BilledCost, ...] = ()
    billed_days: tuple[tuple[str, datetime, datetime], ...] = ()
    gpu: tuple[GpuSample, ...] = ()
    inference: tuple[InferenceSample, ...] = ()
    requests: tuple[MeteredRequest, ...] = ()
    watermark: datetime | None = None
    progress: float | None = None
    extra: dict[str, str] = field(default_factory=dict)
