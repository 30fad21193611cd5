"""Every usage rollup recomputed from ``usage`` with independent SQL, and compared.

The store keeps its rollups in step incrementally (some summed in Python on the way in, the rest
recomputed over the hours a write touched); this module recomputes each one from scratch, with
plain ``GROUP BY`` queries written apart from the store's own, so a test can assert that they
agree after any sequence of writes and compactions.
"""

from __future__ import annotations

from typing import Any

from tokentop.store.db import DAY, HOUR, SUMMED, USAGE_SUMS, Store

_SUMS = ", ".join(f"SUM(u.{c})" for c in USAGE_SUMS)
_TOKENS = "u.input_uncached + u.cache_read + u.cache_write_5m + u.cache_write_1h + u.output"
_SUMMED = (
    f"{_SUMS}, SUM(CASE WHEN u.priced = 0 THEN {_TOKENS} ELSE 0 END),"
    " SUM(CASE WHEN u.priced = 0 THEN u.requests ELSE 0 END)"
)
_FLAT = (
    "(SELECT u.*, s.stream_id AS stream_id, t.origin_id AS series_origin, s.project AS project,"
    " s.api_key AS api_key, s.tag AS tag FROM usage AS u JOIN series AS s ON s.id = u.series_id"
    " JOIN stream AS t ON t.id = s.stream_id)"
)


def _expected(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    def rows(sql: str) -> list[tuple[Any, ...]]:
        return sorted(tuple(r) for r in store.query(sql))

    out: dict[str, list[tuple[Any, ...]]] = {}
    for table, period in (("usage_hour", HOUR), ("usage_day", DAY)):
        out[table] = rows(
            f"SELECT (u.start / {period}) * {period} AS p, u.series_id, u.priced, {_SUMS}"
            f" FROM {_FLAT} AS u GROUP BY p, u.series_id, u.priced"
        )
    for suffix, period in (("", 1), ("_hour", HOUR), ("_day", DAY)):
        out[f"usage_total{suffix}"] = rows(
            f"SELECT (u.start / {period}) * {period} AS p, u.series_origin, {_SUMMED}"
            f" FROM {_FLAT} AS u GROUP BY p, u.series_origin"
        )
    for suffix, period in (("_hour", HOUR), ("_day", DAY)):
        out[f"usage_model{suffix}"] = rows(
            f"SELECT (u.start / {period}) * {period} AS p, u.stream_id, {_SUMMED}"
            f" FROM {_FLAT} AS u GROUP BY p, u.stream_id"
        )
        out[f"usage_group{suffix}"] = sorted(
            row
            for dim in ("project", "api_key", "tag")
            for row in rows(
                f"SELECT '{dim}', (u.start / {period}) * {period} AS p, u.{dim}, u.series_origin,"
                f" {_SUMMED} FROM {_FLAT} AS u GROUP BY p, u.{dim}, u.series_origin"
            )
        )
    return out


def _stored(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    def rows(sql: str) -> list[tuple[Any, ...]]:
        return sorted(tuple(r) for r in store.query(sql))

    summed = ", ".join(SUMMED)
    out = {
        table: rows(f"SELECT start, series_id, priced, {', '.join(USAGE_SUMS)} FROM {table}")
        for table in ("usage_hour", "usage_day")
    }
    for suffix in ("", "_hour", "_day"):
        out[f"usage_total{suffix}"] = rows(
            f"SELECT start, origin_id, {summed} FROM usage_total{suffix}"
        )
    for suffix in ("_hour", "_day"):
        out[f"usage_model{suffix}"] = rows(
            f"SELECT start, stream_id, {summed} FROM usage_model{suffix}"
        )
        out[f"usage_group{suffix}"] = rows(
            f"SELECT dim, start, value, origin_id, {summed} FROM usage_group{suffix}"
        )
    return out


def rollup_mismatches(store: Store) -> dict[str, tuple[list[Any], list[Any]]]:
    """Tables whose rows differ from a recomputation: ``{table: (missing, unexpected)}``.

    Also checks that each bucket's ``origin_id`` is its series' (``usage`` is clustered on it).
    """
    expected, stored = _expected(store), _stored(store)
    out: dict[str, tuple[list[Any], list[Any]]] = {}
    for table, rows in expected.items():
        have = stored[table]
        if rows != have:
            missing = sorted(set(rows) - set(have))
            extra = sorted(set(have) - set(rows))
            out[table] = (missing[:5], extra[:5])
    wrong = store.query(f"SELECT COUNT(*) FROM {_FLAT} AS u WHERE u.origin_id != u.series_origin")[
        0
    ][0]
    if wrong:
        out["usage.origin_id"] = ([wrong], [])
    return out
