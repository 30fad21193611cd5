"""Anthropic Admin API collector: ``/v1/organizations/usage_report/messages`` in 1-minute
buckets and ``/v1/organizations/cost_report`` by day.

Token kinds come straight from the report: ``uncached_input_tokens`` already excludes cache
reads and writes, and cache writes are the nested ``cache_creation`` object (there is no flat
``cache_creation_input_tokens`` in the report; reading one under-counts).

The usage report has no request count, so ``requests`` stays 0 for this source: cost per query
needs another source of request counts (the per-request meter).

``service_tier == "batch"`` also sets the bucket's ``batch`` dimension to ``"true"`` (any other
known tier ``"false"``), so that batch usage can be told apart the same way for both providers;
it never splits a group, since it follows from the tier.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from tokentop.collectors.http import (
    AdminApiCollector,
    MalformedResponse,
    Params,
    as_decimal,
    as_dim,
    as_int,
    as_list,
    as_obj,
    floor_day,
    floor_minute,
)
from tokentop.store.records import BilledCost, UsageBucket, usd_to_nano

USAGE_GROUP_BY = ("model", "api_key_id", "workspace_id", "service_tier", "context_window")
COST_GROUP_BY = ("workspace_id", "description")
USAGE_LIMIT_1M = 1440
COST_LIMIT = 31
API_VERSION = "2023-06-01"


def rfc3339(when: datetime) -> str:
    """``2025-08-01T00:00:00Z``."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any, name: str) -> datetime:
    """An RFC 3339 timestamp from the report."""
    if not isinstance(value, str):
        raise MalformedResponse(f"{name} is not a timestamp")
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise MalformedResponse(f"{name} is not a timestamp") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


class AnthropicCollector(AdminApiCollector):
    """Usage and billed cost of one Anthropic organization, read with an admin key.

    Buckets are grouped by model, API key id, workspace, service tier and context window.
    """

    kind = "anthropic"
    default_base_url = "https://api.anthropic.com"
    base_url_env = "TOKENTOP_ANTHROPIC_BASE_URL"
    usage_path = "/v1/organizations/usage_report/messages"
    cost_path = "/v1/organizations/cost_report"

    def _auth_headers(self, key: str) -> dict[str, str]:
        return {
            "x-api-key": key,
            "anthropic-version": API_VERSION,
            "User-Agent": "tokentop/0.1",
        }

    async def _read_usage(
        self, start: datetime, end: datetime, send_end: bool
    ) -> list[UsageBucket]:
        params: list[tuple[str, str]] = [
            ("starting_at", rfc3339(start)),
            ("bucket_width", "1m"),
            ("limit", str(USAGE_LIMIT_1M)),
            *(("group_by[]", g) for g in USAGE_GROUP_BY),
        ]
        # Whether an ending_at in the future is accepted is not documented; the trailing read
        # leaves it out (up to now) and only catch-up chunks, which end in the past, send it.
        if send_end:
            params.append(("ending_at", rfc3339(end)))
        return await self._read_all(self.usage_path, params, self._usage_of)

    def _usage_of(self, bucket: Mapping[str, Any]) -> list[UsageBucket]:
        start = floor_minute(parse_time(bucket.get("starting_at"), "starting_at"))
        out = []
        for item in as_list(bucket.get("results"), "results"):
            r = as_obj(item, "result")
            cache = as_obj(r.get("cache_creation"), "cache_creation")
            tools = as_obj(r.get("server_tool_use"), "server_tool_use")
            tier = as_dim(r.get("service_tier"))
            out.append(
                UsageBucket(
                    source=self.name,
                    provider="anthropic",
                    model=as_dim(r.get("model")),
                    start=start,
                    width_s=60,
                    api_key=as_dim(r.get("api_key_id")),
                    workspace=as_dim(r.get("workspace_id")),
                    service_tier=tier,
                    batch=("true" if tier == "batch" else "false") if tier else "",
                    context_window=as_dim(r.get("context_window")),
                    input_uncached=as_int(r.get("uncached_input_tokens"), "uncached_input_tokens"),
                    cache_read=as_int(r.get("cache_read_input_tokens"), "cache_read_input_tokens"),
                    cache_write_5m=as_int(
                        cache.get("ephemeral_5m_input_tokens"), "ephemeral_5m_input_tokens"
                    ),
                    cache_write_1h=as_int(
                        cache.get("ephemeral_1h_input_tokens"), "ephemeral_1h_input_tokens"
                    ),
                    output=as_int(r.get("output_tokens"), "output_tokens"),
                    web_searches=as_int(tools.get("web_search_requests"), "web_search_requests"),
                )
            )
        return out

    async def _read_costs(self, first_day: datetime, end_day: datetime) -> list[BilledCost]:
        # A starting_at inside today was seen refused with a 400 (third-party report), and
        # today's partial day may never be returned; first_day is always days back, and
        # ending_at is left out so the report runs as far as it has data.
        params: Params = [
            ("starting_at", rfc3339(first_day)),
            ("bucket_width", "1d"),
            ("limit", str(COST_LIMIT)),
            *(("group_by[]", g) for g in COST_GROUP_BY),
        ]
        return await self._read_all(self.cost_path, params, self._costs_of)

    def _costs_of(self, bucket: Mapping[str, Any]) -> list[BilledCost]:
        day = floor_day(parse_time(bucket.get("starting_at"), "starting_at"))
        out = []
        for item in as_list(bucket.get("results"), "results"):
            r = as_obj(item, "result")
            if r.get("amount") is None:
                continue
            cents = as_decimal(r.get("amount"), "amount")
            currency = r.get("currency")
            out.append(
                BilledCost(
                    source=self.name,
                    provider="anthropic",
                    day=day,
                    amount_nano=usd_to_nano(cents.scaleb(-2)),
                    line_item=as_dim(r.get("description")),
                    workspace=as_dim(r.get("workspace_id")),
                    currency=currency.lower() if isinstance(currency, str) else "usd",
                )
            )
        return out
