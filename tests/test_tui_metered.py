"""Metered requests (proxy, httpx hook, pytest plugin) in the Cost per query pane."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from textual.widgets import Static

from tokentop.collectors.runner import price_request
from tokentop.pricing.book import PriceBook
from tokentop.store.db import Store
from tokentop.store.records import Batch, MeteredRequest
from tokentop.tui.app import TokentopApp

try:
    from tests.test_tui_seed import FROZEN, frozen_clock
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from test_tui_seed import FROZEN, frozen_clock  # type: ignore[no-redef]


def _requests() -> list[MeteredRequest]:
    book = PriceBook()
    out = []
    for i in range(20):
        out.append(
            price_request(
                book,
                MeteredRequest(
                    ts=FROZEN - timedelta(seconds=30 + i),
                    provider="openai",
                    model="gpt-4o-2024-05-13",
                    request_id=f"r{i}",
                    input_uncached=1000,
                    output=200 if i < 19 else 2000,
                    tag="tests/test_search.py::test_answer" if i < 10 else "checkout",
                ),
            )
        )
    return out


async def test_metered_requests_show_p50_p95_and_the_tag(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    store = Store(db)
    store.write_batch(Batch(requests=tuple(_requests())))
    store.close()
    app = TokentopApp(db, clock=frozen_clock, refresh_s=3600)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        line = str(app.query_one("#cost-metered", Static).render())
        # 19 requests at $0.008 and one at $0.035 (1,000 in, 2,000 out at $5/$15 per M).
        assert "metered 20 req" in line
        assert "p50 $0.00800" in line
        assert "p95 $0.00800" in line
        assert "top " in line
        assert app.query_one("#cost-metered", Static).display


async def test_no_metered_line_without_metered_requests(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    Store(db).close()
    app = TokentopApp(db, clock=frozen_clock, refresh_s=3600)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert not app.query_one("#cost-metered", Static).display
