"""Screenshots of the whole screen at every layout, dark and light, data injected, clock frozen.

80x24 is the compact layout (one pane, the others named in the pane bar), 100x30 the medium one
(Spend, Cost per query and one of the other three), 160x48 and 240x70 the large one.

Update with ``pytest tests/test_tui_snapshots.py --snapshot-update`` only after looking at the
new SVGs.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot

from tokentop.collectors.config import Config
from tokentop.tui.app import TokentopApp
from tokentop.tui.panes.sources import CpuMeter

try:
    from tests.test_tui_seed import frozen_clock, seed_store
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from test_tui_seed import frozen_clock, seed_store  # type: ignore[no-redef]


@pytest.fixture(autouse=True)
def steady_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The monitor's own CPU figure is real and would differ on every run."""
    monkeypatch.setattr(CpuMeter, "sample", lambda self: 0.4)


@pytest.mark.parametrize(
    ("size", "theme", "budget", "gpu"),
    [
        pytest.param((160, 48), "textual-dark", False, True, id="160x48-dark"),
        pytest.param((160, 48), "textual-light", True, False, id="160x48-light-budget-nogpu"),
        pytest.param((100, 30), "textual-dark", True, True, id="100x30-dark-budget"),
        pytest.param((100, 30), "textual-light", False, True, id="100x30-light"),
        pytest.param((80, 24), "textual-dark", True, True, id="80x24-dark-budget"),
        pytest.param((80, 24), "textual-light", False, True, id="80x24-light"),
        pytest.param((240, 70), "textual-dark", False, True, id="240x70-dark"),
        pytest.param((240, 70), "textual-light", True, False, id="240x70-light-budget-nogpu"),
    ],
)
def test_screen(
    snap_compare: Any, tmp_path: Path, size: tuple[int, int], theme: str, budget: bool, gpu: bool
) -> None:
    config = Config(budget_daily_usd=Decimal(50), budget_monthly_usd=Decimal(1000))
    app = TokentopApp(
        seed_store(tmp_path / "tokentop.db", gpu=gpu),
        config=config if budget else None,
        clock=frozen_clock,
        label="demo",
        refresh_s=3600,
    )

    async def run_before(pilot: Pilot[None]) -> None:
        pilot.app.theme = theme
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
        # Panes lay their text out for their size once they have one: a pass or two of
        # layout after the data arrives (each pause runs one).
        for _ in range(3):
            await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=run_before)
