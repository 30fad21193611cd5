"""OpenAI Admin API collector: ``/organization/usage/completions`` and
``/organization/usage/embeddings`` in 1-minute buckets, and ``/organization/costs`` by day.

Token kinds: ``input_tokens`` includes cached tokens (and, in the 2026 schema, cache writes), so
``input_uncached = input_tokens - input_cached_tokens - input_cache_write_tokens``. OpenAI does
not say how long its cache writes live; they are counted as 5-minute writes. Audio and image
input tokens stay inside ``input_uncached`` (tokentop has no separate kind for them).

Embeddings are one more paged read of the same window per poll: ``input_tokens`` (never cached)
become ``input_uncached``, with no output. Both reads are returned under the one window, so a
failure of either fails the poll whole. An organization (or a proxy) without the embeddings
endpoint answers 404: that is logged once, said once in the poll's ``detail``, and embeddings are
not asked for again by this collector. Images, audio, moderations and the tool-call endpoints are
not read (further calls, and not token-priced); their spend still shows in the billed cost.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from tokentop.collectors.base import PollContext
from tokentop.collectors.http import (
    AdminApiCollector,
    NotFound,
    Params,
    as_decimal,
    as_dim,
    as_int,
    as_list,
    as_obj,
    floor_day,
    floor_minute,
)
from tokentop.store.records import Batch, BilledCost, UsageBucket, from_epoch, to_epoch, usd_to_nano

log = logging.getLogger("tokentop.openai")

USAGE_GROUP_BY = ("model", "project_id", "api_key_id", "batch", "service_tier")
EMBEDDINGS_GROUP_BY = ("model", "project_id", "api_key_id")
"""The embeddings endpoint has no ``batch`` or ``service_tier`` to group by."""
EMBEDDINGS_PATH = "/organization/usage/embeddings"
COST_GROUP_BY = ("project_id", "line_item")
USAGE_LIMIT_1M = 1440
COST_LIMIT = 180


class OpenAICollector(AdminApiCollector):
    """Usage and billed cost of one OpenAI organization, read with an admin key.

    Completions buckets are grouped by model, project, API key id, batch and service tier;
    embeddings buckets by model, project and API key id (their batch and service tier are "").
    """

    kind = "openai"
    default_base_url = "https://api.openai.com/v1"
    base_url_env = "TOKENTOP_OPENAI_BASE_URL"
    usage_path = "/organization/usage/completions"
    cost_path = "/organization/costs"

    embeddings_path = EMBEDDINGS_PATH
    read_embeddings: bool = True
    """Set False on the instance once the embeddings endpoint answered 404 (not asked again)."""
    _note: str = ""
    """Said once in the next good poll's ``extra["detail"]``."""

    def _auth_headers(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}", "User-Agent": "tokentop/0.1"}

    async def poll(self, ctx: PollContext) -> Batch:
        """As the base class; the first good poll after embeddings went missing says so."""
        batch = await super().poll(ctx)
        if not self._note:
            return batch
        note, self._note = self._note, ""
        return dataclasses.replace(batch, extra={**batch.extra, "detail": note})

    async def _read_usage(
        self, start: datetime, end: datetime, send_end: bool
    ) -> list[UsageBucket]:
        window: list[tuple[str, str]] = [
            ("start_time", str(to_epoch(start))),
            ("bucket_width", "1m"),
            ("limit", str(USAGE_LIMIT_1M)),
        ]
        # Without end_time the API reads up to "now" (documented); an end_time in the future
        # is not, so the trailing read leaves it out and only catch-up chunks send one.
        end_param = [("end_time", str(to_epoch(end)))] if send_end else []
        completions = await self._read_all(
            self.usage_path,
            [*window, *(("group_by[]", g) for g in USAGE_GROUP_BY), *end_param],
            self._usage_of,
        )
        if not self.read_embeddings:
            return completions
        # Any other failure of this read fails the poll whole, as for completions (the
        # completions just read are dropped with it: never half a window).
        missing = False
        try:
            embeddings = await self._read_all(
                self.embeddings_path,
                [*window, *(("group_by[]", g) for g in EMBEDDINGS_GROUP_BY), *end_param],
                self._embeddings_of,
            )
        except NotFound:
            missing = True
        if missing:
            self.read_embeddings = False
            self._note = "no embeddings usage endpoint (404): reading completions only"
            log.warning("%s: %s", self.name, self._note)
            return completions
        # Could an embeddings bucket share its store key with a completions bucket of the
        # same minute, model, project and key? Not in practice: embedding models
        # (text-embedding-*) are never completions models, and a completions bucket carries
        # the batch ("true"/"false") and service tier it is grouped by where an embeddings
        # bucket has "" for both. Were it ever to happen, merge_usage sums the two: nothing
        # is lost or counted twice.
        return completions + embeddings

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

    def _embeddings_of(self, bucket: Mapping[str, Any]) -> list[UsageBucket]:
        start = floor_minute(from_epoch(as_int(bucket.get("start_time"), "start_time")))
        out = []
        for item in as_list(bucket.get("results"), "results"):
            r = as_obj(item, "result")
            out.append(
                UsageBucket(
                    source=self.name,
                    provider="openai",
                    model=as_dim(r.get("model")),
                    start=start,
                    width_s=60,
                    project=as_dim(r.get("project_id")),
                    api_key=as_dim(r.get("api_key_id")),
                    input_uncached=as_int(r.get("input_tokens"), "input_tokens"),
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
