"""Bad paths and values, as a careless user (or an attacker) gives them: each ends in one line
naming the value and exit 2 (usage or configuration; ``check``: 3, UNKNOWN, the
monitoring-plugin convention) or 1 (runtime), never a traceback. Readers open the database
read-only, work on a read-only file or folder and never write or create one; a report reads one
consistent snapshot of the file.

Each case is one ``python -m tokentop`` subprocess, as scripts run it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import bucket
from tokentop.store import queries
from tokentop.store.db import Store, StoreError
from tokentop.store.records import SourceHealth
from tokentop.tui import cli

READERS: dict[str, tuple[str, ...]] = {
    "report": ("report",),
    "report-json": ("report", "--json"),
    "export-json": ("export", "--format", "json"),
    "export-csv": ("export", "--format", "csv"),
    "export-md": ("export", "--format", "md"),
    "export-svg": ("export", "--format", "svg"),
    "sources": ("sources",),
    "status": ("status",),
    "check": ("check",),
    "db-info": ("db", "info"),
}
WRITER = ("collect", "--once", "--demo")
FAST_READERS = ("report", "export-csv", "sources", "status", "check", "db-info")
"""Those that fail before any Textual or price book is loaded; the SVG and the other formats
take the same path to the file, tried on a few of the cases."""


def run(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "tokentop", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line(
    result: subprocess.CompletedProcess[str], codes: tuple[int, ...], *needles: str
) -> str:
    """Exit code in ``codes``, one line on stderr (``check``: on stdout) naming the needles."""
    output = result.stdout if result.returncode == 3 else result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.returncode in codes, (result.returncode, result.stderr, result.stdout)
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    line = lines[0]
    assert line.startswith("UNKNOWN - " if result.returncode == 3 else "tokentop: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


NOW = datetime.now(UTC).replace(second=0, microsecond=0)


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small database a collector could have written: usage in the last hour (enough pages
    to break some past the schema) and one fresh source."""
    path = tmp_path_factory.mktemp("demo") / "demo.db"
    with Store(path) as store:
        store.write_usage(
            bucket(NOW - timedelta(minutes=m), model=f"model-{m % 7}", cost="0.01", tag=f"t{m}")
            for m in range(1, 50)
        )
        store.record_health(
            SourceHealth("src", "openai", state="ok", last_success=NOW, interval_s=600), now=NOW
        )
    return path


def _broken_copy(db: Path, to: Path) -> Path:
    """A copy whose usage tables are overwritten (their root pages), the schema, ``meta`` and
    ``source`` intact: it opens, and fails while being read."""
    conn = sqlite3.connect(db)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    roots = [
        r[0]
        for r in conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name LIKE 'usage%' AND rootpage > 1"
        )
    ]
    conn.close()
    data = bytearray(db.read_bytes())
    for root in roots:
        data[(root - 1) * page_size : root * page_size] = b"\xa5" * page_size
    return _write(to, bytes(data))


BAD_PATHS: dict[str, Callable[[Path, Path], Path]] = {
    "folder": lambda tmp, _db: _mkdir(tmp / "folder.db"),
    "dev-null": lambda _tmp, _db: Path("/dev/null"),
    "not-sqlite": lambda tmp, _db: _write(tmp / "notes.db", b"just some notes\n" * 200),
    "sqlite-truncated": lambda tmp, db: _write(tmp / "cut.db", db.read_bytes()[:4096]),
    "under-proc": lambda _tmp, _db: Path("/proc/self/tokentop.db"),
    "under-a-file": lambda _tmp, _db: Path("/etc/passwd/x.db"),
}
"""--db values that can never be a tokentop database (for the readers, not even a missing one)."""


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("command", (*FAST_READERS, "writer"))
@pytest.mark.parametrize("case", list(BAD_PATHS))
def test_a_bad_db_path_is_one_line(case: str, command: str, tmp_path: Path, demo_db: Path) -> None:
    path = BAD_PATHS[case](tmp_path, demo_db)
    args = WRITER if command == "writer" else READERS[command]
    codes = (3,) if command == "check" else (1, 2)
    # A source list needs no database: one not yet made (under /proc) lists the sources.
    if command == "sources" and case == "under-proc":
        assert run(*args, "--db", str(path)).returncode == 0
        return
    assert_one_line(run(*args, "--db", str(path)), codes, str(path))


@pytest.mark.parametrize("command", ["report-json", "export-json", "export-md", "export-svg"])
@pytest.mark.parametrize("case", ["folder", "not-sqlite"])
def test_every_export_format_names_a_bad_db_path(
    case: str, command: str, tmp_path: Path, demo_db: Path
) -> None:
    path = BAD_PATHS[case](tmp_path, demo_db)
    assert_one_line(run(*READERS[command], "--db", str(path)), (1, 2), str(path))


@pytest.mark.parametrize("command", ["report", "export-csv", "export-svg", "db-info", "status"])
def test_a_database_broken_past_its_schema_is_a_runtime_failure(
    command: str, tmp_path: Path, demo_db: Path
) -> None:
    path = _broken_copy(demo_db, tmp_path / "broken.db")
    line = assert_one_line(run(*READERS[command], "--db", str(path)), (1,), str(path))
    assert "malformed" in line


def test_a_collector_on_a_broken_database_says_so_per_source(tmp_path: Path, demo_db: Path) -> None:
    path = _broken_copy(demo_db, tmp_path / "broken.db")
    result = run(*WRITER, "--db", str(path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = dict(line.split(": ", 1) for line in result.stderr.strip().splitlines())
    assert set(lines) == {"demo", "demo-gpu"}
    assert "malformed" in lines["demo"]  # its usage tables are broken, the GPU's are not


# Readers never write: not a schema into an empty file, not a file where there was none.


@pytest.mark.parametrize("command", [*FAST_READERS, "export-svg"])
def test_a_reader_leaves_an_empty_file_empty(command: str, tmp_path: Path) -> None:
    empty = _write(tmp_path / "empty.db", b"")
    codes = (3,) if command == "check" else (1, 2)
    assert_one_line(run(*READERS[command], "--db", str(empty)), codes, str(empty))
    assert empty.stat().st_size == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db"]


@pytest.mark.parametrize("command", [c for c in (*FAST_READERS, "export-svg") if c != "sources"])
def test_a_reader_creates_no_database(command: str, tmp_path: Path) -> None:
    missing = tmp_path / "sub" / "none.db"
    codes = (3,) if command == "check" else (2,)
    assert_one_line(run(*READERS[command], "--db", str(missing)), codes, str(missing))
    assert not (tmp_path / "sub").exists()


def test_sources_without_a_database_creates_none(tmp_path: Path) -> None:
    missing = tmp_path / "sub" / "none.db"
    result = run("--demo", "sources", "--db", str(missing))
    assert result.returncode == 1  # configured, never polled
    assert "never polled" in result.stdout
    assert not (tmp_path / "sub").exists()


# Read-only files and folders: readers work, a writer says it cannot write, nothing changes.


def _without_write_access() -> tuple[str, ...]:
    """A command prefix that makes this process subject to file permissions: as root,
    ``setpriv`` drops the capabilities that override them (skipped where it cannot)."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    prefix = (setpriv or "setpriv", "--bounding-set=-dac_override,-dac_read_search", "--")
    probe = subprocess.run([*prefix, "true"], capture_output=True, check=False) if setpriv else None
    if probe is None or probe.returncode != 0:
        pytest.skip(
            "running as root without setpriv to drop CAP_DAC_OVERRIDE: permissions cannot"
            " stop writes here"
        )
    return prefix


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(params=["read-only file", "read-only folder"])
def read_only_db(request: pytest.FixtureRequest, tmp_path: Path, demo_db: Path) -> Iterator[Path]:
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "tokentop.db"
    shutil.copyfile(demo_db, path)
    path.chmod(0o444)
    if request.param == "read-only folder":
        folder.chmod(0o555)
    yield path
    folder.chmod(0o755)


@pytest.mark.parametrize("command", ["report-json", "export-csv", "sources", "db-info", "check"])
def test_readers_work_on_a_read_only_database(command: str, read_only_db: Path) -> None:
    prefix = _without_write_access()
    before = _digest(read_only_db.parent)
    result = run(*READERS[command], "--db", str(read_only_db), prefix=prefix)
    assert "Traceback" not in result.stderr
    assert result.returncode in ((0, 1, 2) if command == "check" else (0,)), result.stderr
    if command == "report-json":
        assert json.loads(result.stdout)["requests"] == 49
    after = _digest(read_only_db.parent)
    assert after[read_only_db.name] == before[read_only_db.name]


def test_a_writer_on_a_read_only_database_is_one_line(read_only_db: Path) -> None:
    prefix = _without_write_access()
    before = _digest(read_only_db.parent)
    result = run(*WRITER, "--db", str(read_only_db), prefix=prefix)
    assert_one_line(result, (1, 2), str(read_only_db), "cannot write")
    assert _digest(read_only_db.parent)[read_only_db.name] == before[read_only_db.name]


# Bad values.

HUGE = "1" + "0" * 30

BAD_VALUES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("report", "--since", "99999999999d"), ("--since", "'99999999999d'")),
    (("report", "--since", "0001-01-01"), ("--since", "'0001-01-01'")),
    (("export", "--format", "json", "--since", "0001-01-01"), ("--since", "'0001-01-01'")),
    (("report", "--since", "9999-12-31T23:59:59-05:00"), ("--since", "9999-12-31")),
    (("report", "--until", "9999-12-31"), ("--until", "'9999-12-31'")),
    (("report", "--until", "0001-01-01T00:00:00+05:00"), ("--until", "0001-01-01")),
    (("price", "gpt-4o", "--input", HUGE), ("--input", repr(HUGE))),
    (("price", "gpt-4o", "--input", "1", "--output", HUGE), ("--output", repr(HUGE))),
    (("price", "gpt-4o", "--input", "1", "--at", "0001-01-01"), ("--at", "'0001-01-01'")),
    (("price", "gpt-4o", "--input", "1", "--at", "9999-12-31T23:59:59-05:00"), ("--at",)),
    (("collect", "--demo", "--once", "--interval", "0.01"), ("--interval", "'0.01'")),
    (("collect", "--demo", "--once", "--interval", "nan"), ("--interval", "'nan'")),
    (("db", "compact", "--minutes-days", "99999999999"), ("--minutes-days", "'99999999999'")),
    (("db", "compact", "--hours-days", "1e12"), ("--hours-days", "'1e12'")),
]


@pytest.mark.parametrize(("args", "needles"), BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_exit_2(
    args: tuple[str, ...], needles: tuple[str, ...], demo_db: Path
) -> None:
    assert_one_line(run(*args, "--db", str(demo_db)), (2,), *needles)


BAD_CONFIG: list[tuple[str, tuple[str, ...]]] = [
    ("refresh_s = 0.01", ("refresh_s", "0.01")),
    ("[openai]\ninterval_s = 1e-9", ("openai.interval_s", "1e-09")),
    ("[[gpu]]\nusd_per_hour = 2\npue = 0", ("gpu.pue", "0")),
    ("[[gpu]]\nusd_per_hour = nan", ("gpu.usd_per_hour", "nan")),
    (
        "[[pricing.model]]\nprovider = 5\nmodel = 'x'\ninput_per_mtok = 1\noutput_per_mtok = 1",
        ("pricing.model[0].provider", "5"),
    ),
]


@pytest.mark.parametrize(("text", "needles"), BAD_CONFIG, ids=[t for t, _ in BAD_CONFIG])
def test_a_bad_config_value_is_one_line(
    text: str, needles: tuple[str, ...], tmp_path: Path
) -> None:
    config = _write(tmp_path / "config.toml", text.encode() + b"\n")
    assert_one_line(run("--config", str(config), "sources"), (2,), str(config), *needles)


def test_check_says_a_bad_config_value_is_unknown(tmp_path: Path) -> None:
    config = _write(tmp_path / "config.toml", BAD_CONFIG[2][0].encode() + b"\n")
    assert_one_line(run("--config", str(config), "check"), (3,), str(config), "gpu.pue")


@pytest.mark.parametrize("command", ["report", "export-md"])
def test_closed_stdout_is_one_line_exit_1(command: str, demo_db: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tokentop", *READERS[command], "--db", str(demo_db)],
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.close(1),  # fd 1 closed in the child: sys.stdout is None
    )
    result.stdout = ""
    assert_one_line(result, (1,), "standard output is closed")


def test_a_reader_gone_mid_output_is_one_line_exit_1(demo_db: Path, tmp_path: Path) -> None:
    """``| head -c 1``: the SVG (about 200 kB) cannot fit in the pipe once its reader left."""
    err = tmp_path / "stderr"
    with err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokentop", *READERS["export-svg"], "--db", str(demo_db)],
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        assert proc.stdout is not None
        proc.stdout.close()
        code = proc.wait(timeout=120)
    result = subprocess.CompletedProcess(proc.args, code, "", err.read_text())
    assert_one_line(result, (1,), "standard output")


# One consistent snapshot per report.


def test_read_snapshot_hides_a_write_committed_meanwhile(db_path: Path) -> None:
    start, end = NOW - timedelta(hours=1), NOW + timedelta(minutes=1)
    with Store(db_path) as writer:
        writer.write_usage([bucket(NOW - timedelta(minutes=5), cost="1.00", requests=2)])
        with Store(db_path, readonly=True) as reader:
            with reader.read_snapshot():
                first = queries.cost_by(reader, start, end, "model", "")
                writer.write_usage([bucket(NOW - timedelta(minutes=4), model="o3", cost="9")])
                second = queries.cost_by(reader, start, end, "model", "")
            after = queries.cost_by(reader, start, end, "model", "")
    assert [r.key for r in first] == [r.key for r in second] == ["gpt-4o"]
    assert sorted(r.key for r in after) == ["gpt-4o", "o3"]


def test_a_report_is_one_snapshot_while_a_collector_writes(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A write lands between the report's first query (the rows) and its totals: neither
    shows it, so the total is the sum of the rows."""
    with Store(db_path) as seed:
        seed.write_usage([bucket(NOW - timedelta(minutes=5), cost="1.00", requests=2)])
    writer = Store(db_path)
    real = queries.cost_by
    calls = 0

    def cost_by_then_a_write(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        rows = real(*args, **kwargs)
        calls += 1
        if calls == 1:
            writer.write_usage(
                [bucket(NOW - timedelta(minutes=3), model="o3", cost="5.00", requests=3)]
            )
        return rows

    monkeypatch.setattr(queries, "cost_by", cost_by_then_a_write)
    try:
        assert cli.main(["report", "--json", "--db", str(db_path)]) == 0
    finally:
        writer.close()
    report = json.loads(capsys.readouterr().out)
    assert calls >= 1
    assert [row["model"] for row in report["by_model"]] == ["gpt-4o"]
    assert report["total_usd"] == sum(row["cost_usd"] for row in report["by_model"]) == 1.0
    assert report["requests"] == 2


def test_store_readonly_refuses_what_is_no_tokentop_database(tmp_path: Path) -> None:
    empty = _write(tmp_path / "empty.db", b"")
    with pytest.raises(StoreError, match="not a tokentop database"):
        Store(empty, readonly=True)
    assert empty.stat().st_size == 0
    with pytest.raises(StoreError, match="no database at"):
        Store(tmp_path / "none.db", readonly=True)
    assert not (tmp_path / "none.db").exists()
    with pytest.raises(StoreError, match="is a folder"):
        Store(tmp_path)
    with pytest.raises(StoreError, match="/etc/passwd is not a folder"):
        Store("/etc/passwd/x.db")


def test_the_tui_names_a_bad_db_before_it_starts(tmp_path: Path) -> None:
    missing = tmp_path / "none.db"
    assert_one_line(run("--watch-only", "--db", str(missing)), (2,), str(missing))
    assert not missing.exists()
    folder = _mkdir(tmp_path / "folder.db")
    assert_one_line(run("--db", str(folder)), (2,), str(folder))


async def test_a_watch_only_viewer_reads_without_writing(tmp_path: Path, demo_db: Path) -> None:
    from tokentop.tui.app import TokentopApp

    path = tmp_path / "tokentop.db"
    shutil.copyfile(demo_db, path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    app = TokentopApp(path, watch_only=True, readonly=True, clock=lambda: NOW)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.refresh_count >= 1 and not app.refresh_error
        assert app.store is not None and app.store.readonly
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            app.store.set_meta("label", "x")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
