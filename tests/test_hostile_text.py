"""Text from outside never reaches a terminal, a file or a log as an instruction: escape sequences,
CSV formulas and Markdown are neutralised at every display boundary, and the database keeps the
original."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tokentop.store.db import Store
from tokentop.store.records import Batch, SourceHealth, UsageBucket
from tokentop.store.text import clean, csv_cell, csv_comment, md_cell

TITLE = "\x1b]0;pwned\x07"
CLEAR = "\x1b[2J"
FORMULA = "=cmd|' /C calc'!A0"
MODEL = f"gpt-4o{TITLE}{CLEAR}"
TAG = f"{FORMULA}{TITLE}"
ERROR = f"HTTP 500: {CLEAR}\x9b31m{TITLE} =1+1 \u202egnp.exe\u202c [red]markup[/]"
FORBIDDEN = ("\x1b", "\x07", "\x9b", "\u202e")


def test_clean_escapes_controls_and_bidi_and_keeps_the_rest() -> None:
    assert clean(TITLE) == "\\x1b]0;pwned\\x07"
    assert clean("tab\there\nnew\x7f\x9b") == "tab\\x09here\\x0anew\\x7f\\x9b"
    assert clean("a\u202eb\u2066c\u2028") == "a\\u202eb\\u2066c\\u2028"
    assert clean("claude-opus-4 • 日本語 [b]x[/b]") == "claude-opus-4 • 日本語 [b]x[/b]"
    assert clean(None) == ""


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_csv_cells_never_start_a_formula(start: str) -> None:
    cell = csv_cell(f"{start}1+1")
    assert isinstance(cell, str) and cell.startswith("'")
    assert csv_cell(-1.5) == -1.5 and csv_cell(3) == 3 and csv_cell(None) is None
    assert csv_cell("gpt-4o") == "gpt-4o"


def test_csv_comments_and_markdown() -> None:
    assert csv_comment(f"error, {FORMULA}; -2") == "error, '" + FORMULA + "; '-2"
    assert md_cell("a|b *c* [x](http://e) <img>") == ("a\\|b \\*c\\* \\[x\\](http://e) \\<img\\>")


@pytest.fixture
def hostile_db(tmp_path: Path) -> Path:
    path = tmp_path / "hostile.db"
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    with Store(path) as store:
        store.write_batch(
            Batch(
                usage=(
                    UsageBucket(
                        "demo",
                        "openai",
                        MODEL,
                        now - timedelta(minutes=3),
                        tag=TAG,
                        project=FORMULA,
                        input_uncached=1000,
                        output=200,
                        requests=2,
                    ),
                    UsageBucket(
                        "demo",
                        "openai",
                        FORMULA,
                        now - timedelta(minutes=2),
                        input_uncached=10,
                        requests=1,
                    ),
                )
            )
        )
        store.record_health(
            SourceHealth(
                TAG, "openai", state="error", last_error=ERROR, last_error_at=now, detail=ERROR
            ),
            now=now,
        )
        stored = store.query("SELECT model FROM series WHERE model LIKE 'gpt-4o%'")
        assert stored and stored[0][0] == MODEL, "the database keeps the original"
    return path


def tokentop(db: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "tokentop", "--db", str(db), *args],
        capture_output=True,
        timeout=120,
        check=False,
    )


def assert_inert(data: bytes) -> str:
    text = data.decode("utf-8")
    assert not [c for c in FORBIDDEN if c in text], text
    return text


@pytest.mark.parametrize(
    "args",
    [
        ("report", "--since", "1h"),
        ("report", "--since", "1h", "--json"),
        ("sources",),
        ("export", "--since", "1h", "--format", "md"),
        ("export", "--since", "1h", "--format", "json"),
    ],
)
def test_text_outputs_carry_no_control_characters(hostile_db: Path, args: tuple[str, ...]) -> None:
    done = tokentop(hostile_db, *args)
    assert_inert(done.stderr)
    text = assert_inert(done.stdout)
    assert "pwned" in text, "the name is shown, escaped"


def test_csv_export_neutralises_formulas(hostile_db: Path) -> None:
    done = tokentop(hostile_db, "export", "--since", "1h", "--format", "csv")
    assert done.returncode == 0, done.stderr
    text = assert_inert(done.stdout)
    comments = [line for line in text.splitlines() if line.startswith("#")]
    for line in comments:
        for piece in next(csv.reader([line])):
            assert not piece.strip().startswith(("=", "+", "@")), line
    rows = list(csv.DictReader(line for line in io.StringIO(text) if not line.startswith("#")))
    models = {row["model"] for row in rows}
    assert "'" + FORMULA in models
    assert all(not v.startswith(("=", "+", "-", "@")) for row in rows for v in row.values() if v)


def test_svg_export_is_well_formed_xml(hostile_db: Path, tmp_path: Path) -> None:
    out = tmp_path / "screen.svg"
    done = tokentop(hostile_db, "export", "--since", "1h", "--format", "svg", "-o", str(out))
    assert done.returncode == 0, done.stderr
    svg = out.read_text(encoding="utf-8")
    ET.fromstring(svg)
    assert not [c for c in FORBIDDEN if c in svg]
