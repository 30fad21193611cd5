"""How long each resolution is kept: the ``[retention]`` settings, apart from compaction.

The config parser builds a :class:`Retention` for every command, ``tokentop status`` included, so
it lives here, with the standard library only; :mod:`tokentop.store.retention` (compaction, which
needs the store's writer) re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from tokentop.store.basics import to_epoch

DEFAULT_MINUTES_DAYS = 35.0
DEFAULT_HOURS_DAYS = 400.0
_HOUR = 3600
_DAY = 86400


@dataclass(frozen=True, slots=True)
class Retention:
    """How long each resolution is kept (days)."""

    minutes_days: float = DEFAULT_MINUTES_DAYS
    """One-minute buckets (and GPU samples, metered requests) younger than this are kept."""
    hours_days: float = DEFAULT_HOURS_DAYS
    """Hourly buckets younger than this are kept; older ones are folded into UTC days."""

    def horizons(self, now: datetime) -> tuple[int, int]:
        """The (minutes, hours) horizons for ``now``, Unix seconds: a whole hour, a midnight."""
        minutes = to_epoch(now - timedelta(days=self.minutes_days)) // _HOUR * _HOUR
        hours = to_epoch(now - timedelta(days=self.hours_days)) // _DAY * _DAY
        return minutes, min(hours, minutes // _DAY * _DAY)
