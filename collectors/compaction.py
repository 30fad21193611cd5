"""Retention in the collector: compaction as a periodic task of the runner, off the poll path.

The :class:`Compactor` is one of the runner's ``periodic`` tasks (as the alert engine is): it
runs once every source has been polled and then every :data:`COMPACT_EVERY_S`. Each step of
:func:`~tokentop.store.retention.compact_step` is one bounded transaction in a worker thread;
between steps the event loop (and the polls' writes, which wait for the store's lock) get their
turn, and a tick stops after :attr:`Compactor.budget_s` to carry on at the next one, so a large
first compaction (a file from before retention) never holds the collector up.
"""

from __future__ import annotations

import asyncio
import logging

from tokentop.collectors.base import Clock, utcnow
from tokentop.store.db import Store
from tokentop.store.retention import MAX_ROWS, Retention, Step, compact_step

log = logging.getLogger(__name__)

COMPACT_EVERY_S = 600.0
"""Seconds between compactions (a step's worth of new data is an hour of minutes)."""


class Compactor:
    """Folds data older than the retention horizons, a bounded step at a time.

    Args:
        store: the writer's store.
        retention: days of one-minute and of hourly data.
        clock: injected time.
        interval_s: seconds between ticks.
        budget_s: seconds of steps per tick at most; the rest waits for the next tick.
        pause_s: pause between steps, so that the polls' writes are never starved.
        max_rows: buckets one step reads at most.
    """

    name = "compaction"

    def __init__(
        self,
        store: Store,
        retention: Retention,
        *,
        clock: Clock = utcnow,
        interval_s: float = COMPACT_EVERY_S,
        budget_s: float = 20.0,
        pause_s: float = 0.05,
        max_rows: int = MAX_ROWS,
    ) -> None:
        self.store = store
        self.retention = retention
        self.clock = clock
        self.interval_s = interval_s
        self.budget_s = budget_s
        self.pause_s = pause_s
        self.max_rows = max_rows
        self.steps: list[Step] = []
        """The steps of the last tick."""
        self.done = False
        """Whether the last tick left nothing to compact."""
        self.errors = 0

    async def tick(self) -> None:
        """Compact for at most ``budget_s``. Failures are logged, never raised."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.budget_s
        self.steps, self.done = [], False
        try:
            while True:
                step = await asyncio.to_thread(
                    compact_step, self.store, self.clock(), self.retention, self.max_rows
                )
                if step is None:
                    self.done = True
                    break
                self.steps.append(step)
                log.info("compacted %s", step.describe())
                if loop.time() >= deadline:
                    break
                await asyncio.sleep(self.pause_s)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.errors += 1
            log.exception("compaction failed")

    async def aclose(self) -> None:
        """Nothing to release: the store belongs to the runner."""
