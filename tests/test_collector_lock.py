"""One writer per database: the collector lock is atomic, knows a dead holder, and passes from
a viewer that collects to ``tokentop collect`` without two writers at any time."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.helpers import FakeCollector
from tokentop.collectors.runner import (
    COLLECTOR_KEY,
    HANDOVER_KEY,
    STALL_S,
    Holder,
    Runner,
    acquire_collector,
    active_collector,
    handover_requested,
    read_holder,
    release_collector,
    this_host,
)
from tokentop.pricing.book import PriceBook
from tokentop.store.db import Store

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store(db_path)
    yield s
    s.close()


@pytest.fixture
def other_process() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that is not this one (its pid stands for another collector)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def beat(store: Store, pid: int, at: datetime, *, host: str | None = None, role: str = "") -> None:
    holder = Holder(pid, at.timestamp(), 2.0, this_host() if host is None else host, role)
    store.set_meta(COLLECTOR_KEY, holder.encode())


def test_holder_round_trips_and_reads_the_old_format() -> None:
    holder = Holder(42, 1700000000.5, 2.0, "db-1", "tui")
    assert Holder.parse(holder.encode()) == holder
    assert Holder.parse("42 1700000000") == Holder(42, 1700000000.0, 10.0, "", "")
    for garbage in ("", "garbage", "1 2 3", "x 1 2 h r"):
        assert Holder.parse(garbage) is None


def test_a_holder_whose_pid_is_gone_on_this_host_is_dead_at_once() -> None:
    fresh = NOW.timestamp()
    assert not Holder(dead_pid(), fresh, 2.0, this_host(), "collect").alive(NOW)
    # On another host the pid means nothing: only the heartbeat counts (three beats).
    elsewhere = Holder(dead_pid(), fresh, 2.0, "another-host", "collect")
    assert elsewhere.alive(NOW + timedelta(seconds=6))
    assert not elsewhere.alive(NOW + timedelta(seconds=6.5))


def test_a_live_pid_on_this_host_is_late_before_it_is_dead(
    other_process: subprocess.Popen[bytes],
) -> None:
    holder = Holder(other_process.pid, NOW.timestamp(), 2.0, this_host(), "collect")
    assert holder.alive(NOW) and not holder.late(NOW)
    # Busy (a long write) or hung: late after three beats, taken as stopped after STALL_S.
    assert holder.late(NOW + timedelta(seconds=7))
    assert holder.alive(NOW + timedelta(seconds=7))
    assert not holder.alive(NOW + timedelta(seconds=STALL_S + 1))


def test_acquire_is_refused_by_a_live_holder_and_granted_over_a_dead_one(
    store: Store, other_process: subprocess.Popen[bytes]
) -> None:
    assert acquire_collector(store, NOW) is None
    assert read_holder(store) == Holder(os.getpid(), NOW.timestamp(), 2.0, this_host(), "collect")
    # Renewing one's own lock is always granted.
    assert acquire_collector(store, NOW + timedelta(seconds=2)) is None

    beat(store, other_process.pid, NOW, role="collect")
    refused = acquire_collector(store, NOW + timedelta(seconds=1))
    assert refused is not None and refused.pid == other_process.pid
    assert active_collector(store, NOW + timedelta(seconds=1)) == other_process.pid
    assert read_holder(store).pid == other_process.pid  # type: ignore[union-attr]

    # kill -9: the heartbeat is fresh, but its pid is gone on this host. Not a holder.
    beat(store, dead_pid(), NOW, role="collect")
    assert active_collector(store, NOW) is None
    assert acquire_collector(store, NOW) is None
    assert read_holder(store).pid == os.getpid()  # type: ignore[union-attr]

    release_collector(store)
    assert read_holder(store) is None


def test_release_leaves_another_holders_lock_alone(
    store: Store, other_process: subprocess.Popen[bytes]
) -> None:
    beat(store, other_process.pid, NOW)
    release_collector(store)
    assert read_holder(store).pid == other_process.pid  # type: ignore[union-attr]


async def test_a_runner_that_finds_a_live_holder_never_polls(
    store: Store, other_process: subprocess.Popen[bytes]
) -> None:
    now = datetime.now(UTC)
    beat(store, other_process.pid, now, role="collect")
    source = FakeCollector(interval_s=0.01)
    runner = Runner(store, [source], PriceBook())
    await asyncio.wait_for(runner.run(), timeout=30)
    assert runner.lost_to is not None and runner.lost_to.pid == other_process.pid
    assert source.polls == 0 and source.closed == 1
    assert read_holder(store).pid == other_process.pid  # type: ignore[union-attr]


async def test_a_viewer_that_collects_hands_over_when_asked(
    store: Store, other_process: subprocess.Popen[bytes]
) -> None:
    polled = asyncio.Event()
    source = FakeCollector(interval_s=0.01, on_poll=lambda c: c.polls >= 2 and polled.set())
    runner = Runner(store, [source], PriceBook(), role="tui", heartbeat_s=0.05)
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(polled.wait(), timeout=30)
    assert read_holder(store).role == "tui"  # type: ignore[union-attr]
    # What `tokentop collect` does when a viewer holds the lock.
    asking = f"{other_process.pid} {datetime.now(UTC).timestamp():.3f} {this_host()}"
    store.set_meta(HANDOVER_KEY, asking)
    assert handover_requested(store, datetime.now(UTC)) == other_process.pid
    await asyncio.wait_for(task, timeout=30)
    assert runner.handed_over_to == other_process.pid
    # Every poll has landed, and then the lock was let go: the asker can take it.
    assert source.active == 0
    assert read_holder(store) is None
    assert source.closed == 1


async def test_a_headless_collector_ignores_handover_requests(
    store: Store, other_process: subprocess.Popen[bytes]
) -> None:
    polled = asyncio.Event()
    source = FakeCollector(interval_s=0.01, on_poll=lambda c: c.polls >= 5 and polled.set())
    runner = Runner(store, [source], PriceBook(), heartbeat_s=0.02)
    store.set_meta(
        HANDOVER_KEY, f"{other_process.pid} {datetime.now(UTC).timestamp():.3f} {this_host()}"
    )
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(polled.wait(), timeout=30)
    assert not task.done()
    runner.stop()
    await asyncio.wait_for(task, timeout=30)
    assert runner.handed_over_to is None


def _collect(db: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tokentop", "collect", "--demo", "--db", str(db), *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_holder(db: Path, pid: int, deadline_s: float = 60) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if db.exists():
            with Store(db) as store:
                holder = read_holder(store)
            if holder is not None and holder.pid == pid:
                return True
        time.sleep(0.2)
    return False


def test_fourteen_collectors_started_together_make_one_writer(tmp_path: Path) -> None:
    db = tmp_path / "fresh.db"
    procs = [_collect(db) for _ in range(14)]
    try:
        refused: dict[int, str] = {}
        deadline = time.monotonic() + 120
        while len(refused) < 13 and time.monotonic() < deadline:
            for p in procs:
                if p.pid not in refused and p.poll() is not None:
                    refused[p.pid] = p.stderr.read() if p.stderr else ""
            time.sleep(0.2)
        running = [p for p in procs if p.poll() is None]
        assert len(running) == 1, refused
        winner = running[0]
        for p in procs:
            if p is not winner:
                assert p.returncode == 1, refused[p.pid]
                lines = refused[p.pid].strip().splitlines()
                assert lines == [
                    f"tokentop: error: another collector (pid {winner.pid}) is already writing"
                    f" {db}; stop it first"
                ]
        assert _wait_for_holder(db, winner.pid)
        winner.send_signal(signal.SIGINT)
        _out, err = winner.communicate(timeout=60)
        # 130: the SIGINT came before the collector's loop installed its handler (an
        # interrupted start); either way it stops cleanly, without a traceback.
        assert winner.returncode in (0, 130), err
        assert "Traceback" not in err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_after_kill_9_a_new_collector_starts_at_once(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    first = _collect(db)
    second = None
    try:
        assert _wait_for_holder(db, first.pid)
        first.kill()  # SIGKILL: no chance to clear its heartbeat
        first.wait()
        with Store(db) as store:
            dead = read_holder(store)
        assert dead is not None and dead.pid == first.pid  # the heartbeat is still there
        second = _collect(db)
        # Not refused (no waiting for the heartbeat to age): it takes the lock and collects.
        assert _wait_for_holder(db, second.pid)
        assert second.poll() is None
        second.send_signal(signal.SIGINT)
        _out, err = second.communicate(timeout=60)
        # 130: the SIGINT came before the collector's loop installed its handler (an
        # interrupted start); either way it stops cleanly, without a traceback.
        assert second.returncode in (0, 130), err
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


async def test_tokentop_collect_takes_over_from_a_viewer_that_collects(db_path: Path) -> None:
    """Never two writers: the viewer's runner lands its last poll and lets go, then the
    headless collector takes the lock and collects."""
    polled = asyncio.Event()
    source = FakeCollector(interval_s=0.05, on_poll=lambda _c: polled.set())
    with Store(db_path) as store:
        viewer = Runner(store, [source], PriceBook(), role="tui", heartbeat_s=0.2)
        task = asyncio.create_task(viewer.run())
        await asyncio.wait_for(polled.wait(), timeout=30)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "tokentop", "collect", "--demo", "--db", str(db_path)),
            cwd=ROOT,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await asyncio.wait_for(task, timeout=60)
            assert viewer.handed_over_to == proc.pid
            assert source.active == 0  # its last poll landed before the lock was let go
            holder = None
            deadline = time.monotonic() + 60
            while (holder is None or holder.pid != proc.pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                holder = await asyncio.to_thread(read_holder, store)
            assert holder is not None and holder.pid == proc.pid and holder.role == "collect"
            assert proc.returncode is None
            proc.send_signal(signal.SIGINT)
            _out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
            # The lock is held, so the signal is kept even before the event loop runs: an
            # orderly stop, whenever it comes.
            assert proc.returncode == 0, err
            assert b"taking over collection from the viewer" in err
            assert b"Traceback" not in err
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def test_a_stop_signal_before_the_event_loop_stops_the_runner_in_order(db_path: Path) -> None:
    """Between taking the lock and the event loop's own handlers, SIGINT and SIGTERM are noted,
    not acted on (no KeyboardInterrupt, no death by SIGTERM with the lock held); the runner
    then stops before polling and lets the lock go."""
    from tokentop.tui.cli import _defer_stop_signals, _run_until_signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    source = FakeCollector(interval_s=0.05)
    try:
        signalled: list[int] = []
        _defer_stop_signals(signalled)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 5
        while len(signalled) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # Python runs the handlers between bytecodes
        assert sorted(signalled) == sorted([signal.SIGTERM, signal.SIGINT])
        with Store(db_path) as store:
            assert acquire_collector(store, datetime.now(UTC)) is None
            runner = Runner(store, [source], PriceBook())
            asyncio.run(asyncio.wait_for(_run_until_signal(runner, signalled), timeout=30))
            assert runner.stopping
            assert source.polls == 0
            assert read_holder(store) is None
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
