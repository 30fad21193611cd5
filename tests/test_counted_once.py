"""A dollar is counted once: the meter's records of a provider an admin source covers attribute
spend ("of which metered"); they are never added to it. Where no admin source covers a provider,
the meter is the total."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from pathlib import Path

from tests.helpers import T0, at, bucket
from tokentop.store import queries
from tokentop.store.db import Store
from tokentop.store.records import Batch, SourceHealth
from tokentop.store.report import build_report, render

END = T0 + timedelta(hours=1)


def _fill(store: Store) -> None:
    store.write_batch(
        Batch(
            usage=(
                bucket(at(1), source="openai-admin", cost="5.00", requests=50),
                bucket(at(2), source="openai-admin", cost="3.00", requests=30),
                # The proxy saw 4 of the admin API's requests; they are in its $8.00.
                bucket(at(1), source="proxy", cost="0.40", requests=4, tag="checkout"),
                # Nothing covers acme: the meter is its total.
                bucket(at(3), source="proxy", provider="acme", model="m", cost="1.25", requests=5),
            )
        )
    )
    store.record_health(SourceHealth("openai-admin", "openai", state="ok"), now=END)
    store.record_health(SourceHealth("proxy", "meter", state="ok"), now=END)


def test_metered_records_of_a_covered_provider_are_not_added(db_path: Path) -> None:
    with Store(db_path) as store:
        _fill(store)
        counted = queries.totals(store, T0, END)
        assert counted.cost == Decimal("9.25") and counted.requests == 85
        metered = queries.totals(store, T0, END, scope="metered")
        assert metered.cost == Decimal("0.40") and metered.requests == 4
        assert queries.totals(store, T0, END, scope="all").cost == Decimal("9.65")
        mix = {m.model: m.cost for m in queries.model_mix(store, T0, END)}
        assert mix == {"gpt-4o": Decimal("8.00"), "m": Decimal("1.25")}
        summary = queries.spend_summary(store, END)
        assert summary.today == Decimal("9.25")
        assert sum(v for _, v in queries.spend_series(store, T0, END, 60)) == Decimal("9.25")
        assert queries.total_sources(store, T0, END) == {
            "acme": {"counted": ["proxy"], "metered": []},
            "openai": {"counted": ["openai-admin"], "metered": ["proxy"]},
        }
        report = build_report(store, T0, END, END, {"source": "test", "version": "0"})
    assert report["total_usd"] == 9.25
    assert report["of_which_metered"]["usd"] == 0.4
    assert report["of_which_metered"]["requests"] == 4
    md = render(
        {
            **report,
            "prices": {**report["prices"], "overrides": [], "online_updates": False, "refs": []},
        },
        "md",
    )
    assert "- openai: from openai-admin; metered by proxy (inside the total)" in md
    assert "Of which metered: $0.400000 in 4 requests" in md


def test_without_an_admin_source_the_meter_is_the_total(db_path: Path) -> None:
    with Store(db_path) as store:
        store.write_batch(Batch(usage=(bucket(at(1), source="proxy", cost="0.40", requests=4),)))
        store.record_health(SourceHealth("proxy", "meter", state="ok"), now=END)
        assert queries.totals(store, T0, END).cost == Decimal("0.40")
        assert queries.totals(store, T0, END, scope="metered").requests == 0
