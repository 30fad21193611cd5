"""OpenAI Admin API collector: ``/organization/usage/completions`` in 1-minute buckets and
``/organization/costs`` by day.

Token kinds: ``input_tokens`` includes cached tokens (and, in the 2026 schema, cache writes), so
``input_uncached = input_tokens - input_cached_tokens - input_cache_write_tokens``. OpenAI does
not say how long its cache writes live; they are counted as 5-minute writes. Audio and image
input tokens stay inside ``input_uncached`` (tokentop has no separate kind for them).

Only completions usage is read: embeddings, images, audio and the tool-call endpoints are
further calls per poll and carry no cached or output tokens; their spend still shows in the
billed cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from collectors.http import (
    AdminApiCollector,
    Params,
    as_decimal,
    as_dim,
    as_int,
    as_list,
    as_obj,
    floor_day,
    floor_minute,
)
from store.records import BilledCost, UsageBucket, from_epoch, to_epoch, usd_to_nano

USAGE_GROUP_BY = ("model", "project_id", "api_key_id", "batch", "service_tier")
COST_GROUP_BY = ("project_id", "line_item")
USAGE_LIMIT_1M = 1440
COST_LIMIT = 180


class OpenAICollector(AdminApiCollector):
    """Usage and billed cost of one OpenAI organization, read with an admin key.

    Buckets are grouped by model, project, API key id, batch and service tier.
    """

    kind = "openai"
    default_base_url = "https://api.openai.com/v1"
    base_url_env = "TOKENTOP_OPENAI_BASE_URL"
    usage_path = "/organization/usage/completions"
    cost_path = "/organization/costs"

    def _auth_headers(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}", "User-Agent": "tokentop/0.1"}

    async def _read_usage(
        self, start: datetime, end: datetime, send_end: bool
    ) -> list[UsageBucket]:
        params: list[tuple[str, str]] = [
            ("start_time", str(to_epoch(start))),
            ("bucket_width", "1m"),
            ("limit", str(USAGE_LIMIT_1M)),
            *(("group_by[]", g) for g in USAGE_GROUP_BY),
        ]
        # Without end_time the API reads up to "now" (documented); an end_time in the future
        # is not, so the trailing read leaves it out and only catch-up chunks send one.
        if send_end:
            params.append(("end_time", str(to_epoch(end))))
        return await self._read_all(self.usage_path, params, self._usage_of)

    def _usage_of(self, bucket: Mapping[str, Any]) -> list[UsageBucket]:
        start = floor_minute(from_epoch(as_int(bucket.get("start_time"), "start_time")))
        out = []
        for item in as_list(bucket.get("results"), "results"):
            r = as_obj(item, "result")
            total_in = as_int(r.get("input_tokens"), "input_tokens")
            cached = as_int(r.get("input_cached_tokens"), "input_cached_tokens")
            written = as_int(r.get("input_cache_write_tokens"), "input_cache_write_tokens")
            out.append(
                UsageBucket(
                    source=self.name,
                    provider="openai",
                    model=as_dim(r.get("model")),
                    start=start,
                    width_s=60,
                    project=as_dim(r.get("project_id")),
                    api_key=as_dim(r.get("api_key_id")),
                    service_tier=as_dim(r.get("service_tier")),
                    batch=as_dim(r.get("batch")),
                    input_uncached=max(0, total_in - cached - written),
                    cache_read=cached,
                    cache_write_5m=written,
                    output=as_int(r.get("output_tokens"), "output_tokens"),
                    requests=as_int(r.get("num_model_requests"), "num_model_requests"),
                )
            )
        return out

    async def _read_costs(self, first_day: datetime, end_day: datetime) -> list[BilledCost]:
        # end_time is left out for the same reason as above: the range runs up to now, with
        # today's partial day included.
        params: Params = [
            ("start_time", str(to_epoch(first_day))),
            ("bucket_width", "1d"),
            ("limit", str(COST_LIMIT)),
            *(("group_by[]", g) for g in COST_GROUP_BY),
        ]
        return await self._read_all(self.cost_path, params, self._costs_of)

    def _costs_of(self, bucket: Mapping[str, Any]) -> list[BilledCost]:
        day = floor_day(from_epoch(as_int(bucket.get("start_time"), "start_time")))
        out = []
        for item in as_list(bucket.get("results"), "results"):
            r = as_obj(item, "result")
            amount = as_obj(r.get("amount"), "amount")
            if "value" not in amount:
                continue
            currency = amount.get("currency")
            out.append(
                BilledCost(
                    source=self.name,
                    provider="openai",
                    day=day,
                    amount_nano=usd_to_nano(as_decimal(amount.get("value"), "amount.value")),
                    project=as_dim(r.get("project_id")),
                    line_item=as_dim(r.get("line_item")),
                    currency=currency.lower() if isinstance(currency, str) else "usd",
                )
            )
        return out
