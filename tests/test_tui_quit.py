"""Quitting the TUI as users of htop, nvitop and k9s do: ``q``, ``ctrl+c`` (from anywhere, the
filter box included) and Textual's ``ctrl+q``, each exiting 0 with the collectors stopped."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.test_tui_app import SIZE, FakeRunner, settle
from tests.test_tui_seed import frozen_clock
from tokentop.tui.app import TokentopApp


@pytest.mark.parametrize("keys", [["ctrl+c"], ["ctrl+q"], ["slash", "g", "ctrl+c"]])
async def test_quit_keys_exit_cleanly_and_stop_the_collectors(
    tmp_path: Path, keys: list[str]
) -> None:
    runner = FakeRunner(tmp_path / "fresh.db")
    app = TokentopApp(tmp_path / "fresh.db", runner=runner, clock=frozen_clock, refresh_s=3600)
    async with app.run_test(size=SIZE) as pilot:
        await asyncio.wait_for(runner.wrote.wait(), 5)
        await settle(pilot)
        await pilot.press(*keys)
        await pilot.pause()
        await app.workers.wait_for_complete()
        assert not app.is_running
    assert app.return_code == 0
    assert runner.stopped and runner.finished
