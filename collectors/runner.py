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
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import TypeVar

from tokentop.collectors.base import Clock, Collector, PollContext, SourceError, utcnow
from tokentop.pricing.book import PriceBook, TokenCounts
from tokentop.store.db import Store
from tokentop.store.records import (
    Batch,
    MeteredRequest,
    SourceHealth,
    UsageBucket,
    to_epoch,
    usd_to_nano,
)

log = logging.getLogger("tokentop.runner")

ProgressHook = Callable[[str, float], None]
"""Called with a source name and the fraction of its backfill done."""


_Priceable = TypeVar("_Priceable", UsageBucket, MeteredRequest)


def _price(book: PriceBook, record: _Priceable, at: datetime) -> _Priceable:
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
    )
    return dataclasses.replace(
        record,
        cost_nano=usd_to_nano(quote.cost) if quote.cost is not None else 0,
        priced=quote.priced,
        price_ref=quote.price_ref,
    )


def price_usage(book: PriceBook, bucket: UsageBucket) -> UsageBucket:
    """The bucket with its cost filled in at the prices in force at its start."""
    return _price(book, bucket, bucket.start)


def price_request(book: PriceBook, request: MeteredRequest) -> MeteredRequest:
    """A metered request with its cost filled in at the prices in force when it was made."""
    return _price(book, request, request.ts)


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
"""``meta`` key where a running collector leaves ``"<pid> <unix time>"``."""
HEARTBEAT_S = 10.0


def active_collector(store: Store, now: datetime) -> int | None:
    """The pid of another process collecting into this database right now, if any."""
    value = store.get_meta(COLLECTOR_KEY) or ""
    parts = value.split()
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    pid, beat = int(parts[0]), int(parts[1])
    if pid == os.getpid() or to_epoch(now) - beat > 3 * HEARTBEAT_S:
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
        tasks = [asyncio.create_task(self._loop(c), name=f"poll-{c.name}") for c in self.collectors]
        if self.collectors:
            tasks.append(asyncio.create_task(self._heartbeat(stop), name="heartbeat"))
        try:
            await stop.wait()
        finally:
            stop.set()
            # Loops notice the stop between polls; a poll in flight gets a grace period to land
            # its batch, then is cancelled.
            _done, pending = await asyncio.wait(tasks, timeout=5.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.aclose()

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        """Say in the database that this process collects, so that a viewer started meanwhile
        watches instead of polling the same APIs a second time."""
        marker = f"{os.getpid()}"
        try:
            while not stop.is_set():
                beat = f"{marker} {to_epoch(self.clock())}"
                await asyncio.to_thread(self.store.set_meta, COLLECTOR_KEY, beat)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=HEARTBEAT_S)
        finally:
            with contextlib.suppress(Exception):
                current = await asyncio.to_thread(self.store.get_meta, COLLECTOR_KEY)
                if current is not None and current.split()[0] == marker:
                    await asyncio.to_thread(self.store.set_meta, COLLECTOR_KEY, "")

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
        return {c.name: ok for c, ok in zip(self.collectors, results, strict=True)}

    async def run_once_and_close(self) -> dict[str, bool]:
        """:meth:`run_once`, then close every collector."""
        try:
            return await self.run_once()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close every collector."""
        for c in self.collectors:
            try:
                await c.aclose()
            except Exception:
                log.exception("closing %s failed", c.name)

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
            backfill_start=now - self.backfill,
        )
        calls_before = collector.calls
        health = SourceHealth(name=collector.name, kind=collector.kind)
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
