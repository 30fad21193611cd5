"""The runner: polls every collector on its own interval, prices usage, writes the store.

Each source runs a chained loop: the next poll is scheduled when the last one finishes, so polls
of one source never overlap and a slow source stretches only its own cycle. Failures back off
exponentially with jitter (a 429's ``Retry-After`` is honoured; refused credentials wait long and
say so). No failure of a source stops the runner or another source. Store writes and pricing run
in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from tokentop.collectors.base import (
    Clock,
    Collector,
    Periodic,
    PollContext,
    SourceError,
    utcnow,
)
from tokentop.pricing.book import PriceBook, PriceTier, TokenCounts
from tokentop.store.db import Store
from tokentop.store.records import (
    Batch,
    MeteredRequest,
    SourceHealth,
    UsageBucket,
    from_epoch,
    usd_to_nano,
)

log = logging.getLogger("tokentop.runner")

ProgressHook = Callable[[str, float], None]
"""Called with a source name and the fraction of its backfill done."""


_Priceable = TypeVar("_Priceable", UsageBucket, MeteredRequest)


def _price(book: PriceBook, record: _Priceable, at: datetime, tier: PriceTier) -> _Priceable:
    if record.priced or record.price_ref:
        return record
    quote = book.quote(
        record.provider,
        record.model,
        TokenCounts(
            record.input_uncached,
            record.cache_read,
            record.cache_write_5m,
            record.cache_write_1h,
            record.output,
            record.web_searches,
        ),
        at,
        tier,
    )
    return dataclasses.replace(
        record,
        cost_nano=usd_to_nano(quote.cost) if quote.cost is not None else 0,
        priced=quote.priced,
        price_ref=quote.price_ref,
    )


def price_usage(book: PriceBook, bucket: UsageBucket) -> UsageBucket:
    """The bucket with its cost filled in at the prices in force at its start, for its tier
    (batch, service tier, context window)."""
    tier = PriceTier(bucket.service_tier, bucket.batch == "true", bucket.context_window)
    return _price(book, bucket, bucket.start, tier)


def price_request(book: PriceBook, request: MeteredRequest) -> MeteredRequest:
    """A metered request with its cost filled in at the prices in force when it was made, for
    its service tier and (long context) its input size."""
    if request.priced or request.price_ref:
        return request
    counts = TokenCounts(
        request.input_uncached,
        request.cache_read,
        request.cache_write_5m,
        request.cache_write_1h,
        request.output,
        request.web_searches,
    )
    cost = request_cost(
        book, request.provider, request.model, counts, request.ts, request.service_tier
    )
    return dataclasses.replace(request, **cost)


def request_cost(
    book: PriceBook,
    provider: str,
    model: str,
    counts: TokenCounts,
    at: datetime,
    service_tier: str,
) -> dict[str, Any]:
    """The fields :func:`price_request` fills in (``cost_nano``, ``priced``, ``price_ref``), for
    a caller that builds the request with them (the meter, once per request)."""
    tier = PriceTier(service_tier, request_input=counts.input_total)
    quote = book.quote(provider, model, counts, at, tier)
    return {
        "cost_nano": usd_to_nano(quote.cost) if quote.cost is not None else 0,
        "priced": quote.priced,
        "price_ref": quote.price_ref,
    }


def price_batch(book: PriceBook, batch: Batch) -> Batch:
    """Price every usage bucket and metered request of a batch."""
    if not batch.usage and not batch.requests:
        return batch
    return dataclasses.replace(
        batch,
        usage=tuple(price_usage(book, b) for b in batch.usage),
        requests=tuple(price_request(book, r) for r in batch.requests),
    )


COLLECTOR_KEY = "collector"
"""``meta`` key where the one process collecting into a file leaves its heartbeat: the lock
that keeps a database to one writer (see :class:`Holder`)."""
HANDOVER_KEY = "collector_handover"
"""``meta`` key where ``tokentop collect`` asks a viewer that collects to hand the lock over."""
HEARTBEAT_S = 2.0
"""Seconds between heartbeats: short enough that a viewer sees a collector stop within 10 s."""
MISSED_BEATS = 3
"""A holder whose last heartbeat is older than this many of its intervals has stopped."""
LEGACY_HEARTBEAT_S = 10.0
"""The interval of heartbeats written by older versions (``"<pid> <unix time>"``)."""
STALL_S = 60.0
"""On its own host, a holder whose process still exists is taken as stopped (hung) only after
this long without a heartbeat: a busy collector on a loaded machine can miss a few beats, and
taking its lock away then would make two writers."""
HANDOVER_WAIT_S = 30.0
"""How long ``tokentop collect`` waits for a viewer to hand over before it gives up."""


def this_host() -> str:
    """This machine's name, recorded with a heartbeat: pids mean something only on their host."""
    return socket.gethostname()


def pid_exists(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (``True`` when that cannot be told)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, as another user's process
        return True
    return True


@dataclass(frozen=True, slots=True)
class Holder:
    """The process that holds a database's collector lock, as its last heartbeat says.

    Stored in ``meta`` as ``"<pid> <unix time> <interval s> <host> <role>"``; the role is
    ``collect`` (headless) or ``tui`` (a viewer that collects until a headless one comes).
    """

    pid: int
    beat: float
    """Unix time of the last heartbeat."""
    interval_s: float = HEARTBEAT_S
    host: str = ""
    """Host name; ``""`` when unknown (then the pid cannot be checked)."""
    role: str = ""

    def encode(self) -> str:
        """The ``meta`` value."""
        return (
            f"{self.pid} {self.beat:.3f} {self.interval_s:g} {self.host or '-'} {self.role or '-'}"
        )

    @staticmethod
    def parse(value: str | None) -> Holder | None:
        """The holder a ``meta`` value names; ``None`` for an empty or unreadable value."""
        parts = (value or "").split()
        try:
            if len(parts) == 2:
                return Holder(int(parts[0]), float(parts[1]), LEGACY_HEARTBEAT_S)
            if len(parts) == 5:
                host, role = ("" if p == "-" else p for p in parts[3:])
                return Holder(int(parts[0]), float(parts[1]), float(parts[2]), host, role)
        except ValueError:
            return None
        return None

    @property
    def beat_at(self) -> datetime:
        """The last heartbeat as a datetime."""
        return from_epoch(self.beat)

    def age_s(self, now: datetime) -> float:
        """Seconds since the last heartbeat."""
        return max(0.0, now.timestamp() - self.beat)

    def mine(self) -> bool:
        """Whether this process is the holder."""
        return self.pid == os.getpid() and self.host in ("", this_host())

    def late(self, now: datetime) -> bool:
        """More than :data:`MISSED_BEATS` heartbeats missed."""
        return self.age_s(now) > MISSED_BEATS * self.interval_s

    def alive(self, now: datetime) -> bool:
        """Still collecting. On another host: a heartbeat within :data:`MISSED_BEATS`
        intervals. On this one: a process with that pid (gone means stopped at once), which
        has beaten within :data:`STALL_S` (or those intervals, if longer)."""
        if self.host != this_host():
            return not self.late(now)
        if not pid_exists(self.pid):
            return False
        return self.age_s(now) <= max(MISSED_BEATS * self.interval_s, STALL_S)


def read_holder(store: Store) -> Holder | None:
    """The holder the database names (alive or not), if any."""
    return Holder.parse(store.get_meta(COLLECTOR_KEY))


def active_collector(store: Store, now: datetime) -> int | None:
    """The pid of another process collecting into this database right now, if any."""
    holder = read_holder(store)
    if holder is None or holder.mine() or not holder.alive(now):
        return None
    return holder.pid


def acquire_collector(
    store: Store, now: datetime, *, interval_s: float = HEARTBEAT_S, role: str = "collect"
) -> Holder | None:
    """Become (or stay) the one collector of this database, atomically: read the holder, check
    that it is alive, write ours, in one write transaction. Returns ``None`` when this process
    holds the lock now, else the live holder that keeps it."""
    ours = Holder(os.getpid(), now.timestamp(), interval_s, this_host(), role)
    with store.transaction() as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (COLLECTOR_KEY,)).fetchone()
        current = Holder.parse(row[0] if row else None)
        if current is not None and not current.mine() and current.alive(now):
            return current
        conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (COLLECTOR_KEY, ours.encode()),
        )
    return None


def release_collector(store: Store) -> None:
    """Give the lock up, if this process holds it."""
    with store.transaction() as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (COLLECTOR_KEY,)).fetchone()
        current = Holder.parse(row[0] if row else None)
        if current is not None and current.mine():
            conn.execute("UPDATE meta SET value = '' WHERE key = ?", (COLLECTOR_KEY,))


def request_handover(store: Store, now: datetime) -> None:
    """Ask the viewer that collects into this database to stop and leave it to this process."""
    store.set_meta(HANDOVER_KEY, f"{os.getpid()} {now.timestamp():.3f} {this_host()}")


def clear_handover(store: Store) -> None:
    """Withdraw this process's handover request (or a stale one)."""
    store.set_meta(HANDOVER_KEY, "")


def handover_requested(store: Store, now: datetime) -> int | None:
    """The pid of a live ``tokentop collect`` waiting for this file's lock, if any."""
    parts = (store.get_meta(HANDOVER_KEY) or "").split()
    if len(parts) != 3:
        return None
    try:
        pid, asked = int(parts[0]), float(parts[1])
    except ValueError:
        return None
    if now.timestamp() - asked > HANDOVER_WAIT_S + 5:
        return None
    if parts[2] == this_host() and (pid == os.getpid() or not pid_exists(pid)):
        return None
    return pid


def one_line(text: str, limit: int = 300) -> str:
    """A message folded to one line of at most ``limit`` characters (for the Sources pane)."""
    folded = " ".join(text.split())
    return folded if len(folded) <= limit else folded[: limit - 1] + "…"


def _newest(batch: Batch) -> datetime | None:
    times: list[datetime] = [b.end for b in batch.usage]
    times += [g.ts for g in batch.gpu] + [i.ts for i in batch.inference]
    times += [r.ts for r in batch.requests]
    return max(times, default=None)


class Runner:
    """Schedules collectors, prices what they return and writes it to the store.

    Args:
        store: the writer's store connection.
        collectors: the sources, each with a unique ``name``.
        book: the price book for usage records.
        clock: injected time source.
        backfill: how far back a source's first start reads.
        on_progress: called as backfills advance (for a progress bar).
        max_backoff_s: ceiling of the delay after repeated failures.
        heartbeat_s: seconds between heartbeats (the collector lock is renewed with each).
        role: ``collect`` (headless: keeps the lock) or ``tui`` (a viewer that collects: hands
            the lock over to a ``tokentop collect`` that asks for it).
        stop_grace_s: how long a poll in flight at :meth:`stop` may take to land its batch
            before it is cancelled.
        periodic: work done on its own interval beside the polls (the alert engine), once
            every source has been polled; :meth:`run_once` runs each once after its polls.
    """

    def __init__(
        self,
        store: Store,
        collectors: Sequence[Collector],
        book: PriceBook,
        *,
        clock: Clock = utcnow,
        backfill: timedelta = timedelta(hours=24),
        on_progress: ProgressHook | None = None,
        max_backoff_s: float = 600.0,
        heartbeat_s: float = HEARTBEAT_S,
        role: str = "collect",
        stop_grace_s: float = 5.0,
        periodic: Sequence[Periodic] = (),
    ) -> None:
        names = [c.name for c in collectors]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        self.store = store
        self.collectors = list(collectors)
        self.book = book
        self.clock = clock
        self.backfill = backfill
        self.on_progress = on_progress
        self.max_backoff_s = max_backoff_s
        self.heartbeat_s = heartbeat_s
        self.role = role
        self.stop_grace_s = stop_grace_s
        self.periodic = list(periodic)
        self.lost_to: Holder | None = None
        """The live process that held the collector lock when this runner wanted it."""
        self.handed_over_to: int | None = None
        """The pid of the ``tokentop collect`` this runner stopped for."""
        self.failures: dict[str, int] = {}
        self._retry_after: dict[str, float | None] = {}
        self._backfilling: set[str] = set()
        self._watermarks: dict[str, datetime | None] = {}
        self._stopped = False
        self._stop: asyncio.Event | None = None

    def stop(self) -> None:
        """Ask :meth:`run` to finish: in-flight polls complete and are written first."""
        self._stopped = True
        if self._stop is not None:
            self._stop.set()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopped

    async def run(self) -> None:
        """Poll every source on its own interval until :meth:`stop`."""
        self._stop = stop = asyncio.Event()
        if self._stopped:
            stop.set()
        # The lock first: a second writer must not poll even once.
        if self.collectors and not stop.is_set() and not await self._beat():
            await self.aclose()
            return
        tasks = [asyncio.create_task(self._loop(c), name=f"poll-{c.name}") for c in self.collectors]
        if self.collectors:
            tasks.append(asyncio.create_task(self._heartbeat(stop), name="heartbeat"))
        tasks += [asyncio.create_task(self._every(p, stop), name=p.name) for p in self.periodic]
        try:
            await stop.wait()
        finally:
            stop.set()
            # Loops notice the stop between polls; a poll in flight gets a grace period to land
            # its batch, then is cancelled.
            _done, pending = await asyncio.wait(tasks, timeout=self.stop_grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Only once every poll has landed or been cancelled: never two writers.
            if self.collectors:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(release_collector, self.store)
            await self.aclose()

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        """Say in the database that this process collects, so that a viewer started meanwhile
        watches instead of polling the same APIs a second time, and sees it stop if it dies."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.heartbeat_s)
            if stop.is_set() or not await self._beat():
                return

    async def _beat(self) -> bool:
        """Renew the collector lock; ``False`` (and the runner stops) when another live process
        holds it, or when this viewer is asked to hand over to ``tokentop collect``."""
        now = self.clock()
        try:
            other = await asyncio.to_thread(
                acquire_collector, self.store, now, interval_s=self.heartbeat_s, role=self.role
            )
            asking = None
            if other is None and self.role == "tui":
                asking = await asyncio.to_thread(handover_requested, self.store, now)
        except Exception:
            # A busy or broken database: the next beat tries again (the polls will say why).
            log.warning("heartbeat failed", exc_info=True)
            return True
        if other is not None:
            log.warning("collector pid %d holds %s; stopping", other.pid, self.store.path)
            self.lost_to = other
            self.stop()
            return False
        if asking is not None:
            log.info("handing collection over to pid %d", asking)
            self.handed_over_to = asking
            self.stop()
            return False
        return True

    async def run_once(self, max_polls: int = 40) -> dict[str, bool]:
        """Poll every source once, concurrently; returns which succeeded. A source that is
        backfilling in chunks is polled again until its backfill is done (``max_polls`` at most).
        """

        async def complete(collector: Collector) -> bool:
            ok = await self.poll(collector)
            polls = 1
            while ok and collector.name in self._backfilling and polls < max_polls:
                ok = await self.poll(collector)
                polls += 1
            return ok

        results = await asyncio.gather(*(complete(c) for c in self.collectors))
        for task in self.periodic:
            await task.tick()
        return {c.name: ok for c, ok in zip(self.collectors, results, strict=True)}

    async def run_once_and_close(self) -> dict[str, bool]:
        """:meth:`run_once`, then close every collector."""
        try:
            return await self.run_once()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close every collector (and periodic task)."""
        closing: list[Collector | Periodic] = [*self.collectors, *self.periodic]
        for c in closing:
            try:
                await c.aclose()
            except Exception:
                log.exception("closing %s failed", c.name)

    async def _every(self, task: Periodic, stop: asyncio.Event) -> None:
        """Run ``task`` every ``task.interval_s`` until the stop, starting once every source
        has been polled and no backfill is running (so that its first look sees the data), or
        after one interval at the latest."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + task.interval_s
        while not stop.is_set() and loop.time() < deadline:
            polled = all(c.name in self.failures for c in self.collectors)
            if polled and not self._backfilling:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.2)
        while not stop.is_set():
            started = loop.time()
            await task.tick()
            delay = task.interval_s - (loop.time() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, delay))

    async def _loop(self, collector: Collector) -> None:
        loop = asyncio.get_running_loop()
        stop = self._stop
        assert stop is not None
        while not stop.is_set():
            started = loop.time()
            await self.poll(collector)
            delay = self.next_delay(collector) - (loop.time() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, delay))

    def backfill_of(self, collector: Collector) -> timedelta:
        """How far back ``collector``'s first start reads: its own ``backfill`` (a provider's
        ``backfill_hours``) if it has one, else the runner's."""
        own = getattr(collector, "backfill", None)
        return own if isinstance(own, timedelta) else self.backfill

    def next_delay(self, collector: Collector) -> float:
        """Seconds from the start of the last poll to the next one."""
        failures = self.failures.get(collector.name, 0)
        retry = self._retry_after.get(collector.name)
        if not failures:
            # A backfill in chunks goes on at once; the source bounds each chunk itself.
            return 0.0 if collector.name in self._backfilling else float(collector.interval_s)
        base = float(collector.interval_s) * (2 ** min(failures - 1, 10))
        delay = min(self.max_backoff_s, base * random.uniform(0.8, 1.2))
        if retry is not None:
            delay = max(delay, retry)
        return float(delay)

    async def poll(self, collector: Collector) -> bool:
        """Poll one source once, write what it returned and record its health."""
        now = self.clock()
        if collector.name not in self._watermarks:
            self._watermarks[collector.name] = await asyncio.to_thread(
                self.store.get_watermark, collector.name
            )
        ctx = PollContext(
            now=now,
            watermark=self._watermarks[collector.name],
            backfill_start=now - self.backfill_of(collector),
        )
        calls_before = collector.calls
        health = SourceHealth(
            name=collector.name, kind=collector.kind, interval_s=float(collector.interval_s)
        )
        try:
            batch = await collector.poll(ctx)
        except SourceError as exc:
            return await self._failed(collector, exc, calls_before)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("source %s failed", collector.name)
            error = SourceError(f"internal error: {type(exc).__name__}: {exc}")
            return await self._failed(collector, error, calls_before)
        try:
            # The store serialises writers, so concurrent polls may hand over at once.
            await asyncio.to_thread(self._write, batch)
        except Exception as exc:
            # Nothing of the batch was stored (one transaction); say so and carry on.
            log.exception("writing %s's batch failed", collector.name)
            error = SourceError(f"batch not stored: {type(exc).__name__}: {exc}")
            return await self._failed(collector, error, calls_before)
        self.failures[collector.name] = 0
        self._retry_after[collector.name] = None
        if batch.watermark is not None:
            self._watermarks[collector.name] = batch.watermark
        newest = _newest(batch)
        end = self.clock()
        state = "ok"
        detail = ""
        if batch.progress is not None and batch.progress < 1:
            state = "backfilling"
            detail = f"backfill {batch.progress:.0%}"
            self._backfilling.add(collector.name)
        else:
            self._backfilling.discard(collector.name)
        if batch.progress is not None and self.on_progress is not None:
            self.on_progress(collector.name, batch.progress)
        lag = None
        if batch.watermark is not None:
            lag = max(0.0, (end - batch.watermark).total_seconds())
        elif newest is not None:
            lag = max(0.0, (end - newest).total_seconds())
        health = dataclasses.replace(
            health,
            state=state,
            last_success=end,
            lag_s=lag,
            watermark=batch.watermark,
            detail=detail or batch.extra.get("detail", ""),
            newest_data=newest,
            # A partial problem (one GPU lost of several) is shown while the source stays up.
            last_error=batch.extra.get("error", ""),
            last_error_at=end if batch.extra.get("error") else None,
        )
        await self._record(health, collector.calls - calls_before, end)
        return True

    def _write(self, batch: Batch) -> None:
        self.store.write_batch(price_batch(self.book, batch))

    async def _failed(self, collector: Collector, exc: SourceError, calls_before: int) -> bool:
        failures = self.failures.get(collector.name, 0) + 1
        self.failures[collector.name] = failures
        if exc.auth:
            state = "auth failed"
            # A refused key will not fix itself in seconds: wait long, do not storm the API.
            retry: float | None = max(300.0, collector.interval_s)
        elif exc.fatal:
            state = "unavailable"
            retry = max(600.0, collector.interval_s)
        elif exc.retry_after is not None:
            state = "rate limited"
            retry = exc.retry_after
        else:
            state = "error"
            retry = None
        self._retry_after[collector.name] = retry
        now = self.clock()
        watermark = self._watermarks.get(collector.name)
        message = one_line(exc.message)
        log.warning("source %s: %s", collector.name, message)
        health = SourceHealth(
            name=collector.name,
            kind=collector.kind,
            interval_s=float(collector.interval_s),
            state=state,
            last_error=message,
            last_error_at=now,
            lag_s=None if watermark is None else max(0.0, (now - watermark).total_seconds()),
            detail=f"{failures} failure(s) in a row",
        )
        await self._record(health, collector.calls - calls_before, now)
        return False

    async def _record(self, health: SourceHealth, calls: int, now: datetime) -> None:
        await asyncio.to_thread(self.store.record_health, health, calls_delta=calls, now=now)
