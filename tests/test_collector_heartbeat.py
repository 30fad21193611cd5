"""A running collector says so in the database; a viewer started meanwhile watches instead of
polling the same APIs a second time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tokentop.collectors.runner import COLLECTOR_KEY, active_collector
from tokentop.store.db import Store

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def test_active_collector_reads_a_fresh_heartbeat_of_another_process(db_path: Path) -> None:
    store = Store(db_path)
    try:
        assert active_collector(store, NOW) is None
        store.set_meta(COLLECTOR_KEY, f"{os.getpid() + 1} {int(NOW.timestamp()) - 5}")
        assert active_collector(store, NOW) == os.getpid() + 1
        # A heartbeat gone quiet (a collector that was killed) no longer counts.
        assert active_collector(store, NOW + timedelta(minutes=2)) is None
        # This process's own heartbeat is not "another collector".
        store.set_meta(COLLECTOR_KEY, f"{os.getpid()} {int(NOW.timestamp())}")
        assert active_collector(store, NOW) is None
        store.set_meta(COLLECTOR_KEY, "garbage")
        assert active_collector(store, NOW) is None
    finally:
        store.close()


def test_collect_beats_while_it_runs_and_clears_on_sigint(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokentop", "collect", "--demo", "--db", str(db)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = None
        deadline = time.monotonic() + 30
        while seen is None and time.monotonic() < deadline:
            time.sleep(0.2)
            if db.exists():
                store = Store(db)
                try:
                    seen = active_collector(store, datetime.now(UTC))
                finally:
                    store.close()
        assert seen == proc.pid
        # A second collector on the same file refuses, in one line, and changes nothing.
        second = subprocess.run(
            [sys.executable, "-m", "tokentop", "collect", "--demo", "--db", str(db)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert f"pid {proc.pid}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    store = Store(db)
    try:
        assert active_collector(store, datetime.now(UTC)) is None
    finally:
        store.close()
