"""The collector interface: an async source that the runner polls on its own interval."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # the records only as types: `tokentop status` imports this for utcnow
    from tokentop.store.records import Batch

Clock = Callable[[], datetime]
"""Returns the current time, timezone-aware UTC. Injected so tests can freeze or move it."""


def utcnow() -> datetime:
    """The real clock."""
    return datetime.now(UTC)


class SourceError(Exception):
    """A poll failed in a way the runner understands.

    Args:
        message: one line for the Sources pane; never contains a secret.
        retry_after: seconds the source asked us to wait (HTTP ``Retry-After``), if any.
        auth: the credentials were refused; the runner stops retrying quickly and says so.
        fatal: retrying cannot help (for example a missing driver); polled rarely.
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        auth: bool = False,
        fatal: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.auth = auth
        self.fatal = fatal


@dataclass(frozen=True, slots=True)
class PollContext:
    """What the runner tells a collector before a poll.

    Attributes:
        now: the runner's clock at the start of the poll.
        watermark: the newest point the source recorded as complete in an earlier poll (from the
            store, so it survives restarts); ``None`` on first start.
        backfill_start: where a first start should begin reading history.
    """

    now: datetime
    watermark: datetime | None
    backfill_start: datetime


@runtime_checkable
class Collector(Protocol):
    """An async source of records.

    ``name`` is unique among configured sources and is the ``source`` of every record it returns.
    ``kind`` says what it speaks (``openai``, ``anthropic``, ``nvml``, ``prometheus``, ``demo``).
    ``calls`` counts API calls made so far (the runner records the delta after each poll).
    """

    name: str
    kind: str
    interval_s: float
    calls: int

    async def poll(self, ctx: PollContext) -> Batch:
        """Read the source once and return what it produced. Raise :class:`SourceError` on a
        failure the runner should report; any other exception is reported as a bug in the
        collector, and the runner keeps going."""
        ...

    async def aclose(self) -> None:
        """Release connections, threads and libraries."""
        ...


@runtime_checkable
class Periodic(Protocol):
    """Work the runner does on its own interval beside the polls, off their path (the alert
    engine). ``tick`` never raises; ``aclose`` releases what it holds."""

    name: str
    interval_s: float

    async def tick(self) -> None:
        """Do the work once."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
