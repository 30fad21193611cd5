"""The TUI at every terminal size, htop-style tables and a snapshot that is what the screen shows.

Data injected (tests/test_tui_seed.py), clock frozen, no collectors; nothing here times anything.
"""

from __future__ import annotations

import asyncio
import csv
import html
import io
import json
import re
import threading
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from textual.widgets import Static

from tokentop.store.db import Store
from tokentop.store.filters import drill_term, filter_sql, parse_filter
from tokentop.store.queries import cost_by
from tokentop.store.view import parse_sort, sort_rows
from tokentop.tui.app import TokentopApp, layout_for
from tokentop.tui.columns import Column, fit_columns
from tokentop.tui.format import fit, usd
from tokentop.tui.panes.cost_per_query import CostPerQueryPane
from tokentop.tui.panes.sources import SourcesPane
from tokentop.tui.snapshot import PANES, RefreshRequest, Snapshot, build_snapshot
from tokentop.tui.widgets.freshness import FreshnessBadge
from tokentop.tui.widgets.table import ThemedTable

try:
    from tests.test_tui_app import cost_keys, make_app, settle, text_of
    from tests.test_tui_seed import FROZEN, frozen_clock, seed_store
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from test_tui_app import cost_keys, make_app, settle, text_of  # type: ignore[no-redef]
    from test_tui_seed import FROZEN, frozen_clock, seed_store  # type: ignore[no-redef]

SIZES = [(80, 24), (100, 30), (160, 48), (240, 70)]


def read(path: str) -> str:
    """A file's text (a helper, so that async tests read files without ruff's ASYNC rule)."""
    return Path(path).read_text(encoding="utf-8")


def svg_lines(svg: str) -> list[str]:
    """The text rows of an SVG screenshot (text elements joined by their y)."""
    rows: dict[float, list[str]] = {}
    for y, text in re.findall(r'<text[^>]*y="([\d.]+)"[^>]*>(.*?)</text>', svg):
        rows.setdefault(float(y), []).append(html.unescape(text).replace("\xa0", " "))
    return ["".join(rows[y]) for y in sorted(rows)]


TITLES = {"spend": "Spend", "cost": "Cost per query", "mix": "Model mix", "gpu": "GPU"}
TITLES["sources"] = "Sources"


def test_layout_for_each_size() -> None:
    assert layout_for(80, 24) == "compact"
    assert layout_for(99, 40) == "medium"  # narrow but tall: stacked
    assert layout_for(100, 30) == "medium"
    assert layout_for(129, 60) == "medium"
    assert layout_for(160, 48) == "large"
    assert layout_for(240, 70) == "large"
    assert layout_for(200, 27) == "compact"


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
async def test_every_pane_is_named_at_every_size(tmp_path: Path, size: tuple[int, int]) -> None:
    app = make_app(tmp_path, label="demo")
    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        shown = app.visible_panes()
        bar = app.query_one("#pane-bar", Static)
        named = set(shown)
        if bar.display:
            text = str(bar.render())
            named |= {pane for pane, title in TITLES.items() if title in text}
        assert named == set(PANES), size
        # Each pane on screen is inside the screen and at least its header tall.
        for pane in app.panes:
            if pane.display:
                assert pane.region.height >= 4 and pane.region.right <= size[0], pane.id


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
async def test_tab_reaches_every_pane_and_shows_it(tmp_path: Path, size: tuple[int, int]) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        seen = []
        for _ in PANES:
            await pilot.press("tab")
            await settle(pilot)
            seen.append(app.active)
            pane = app.pane(app.active)
            assert pane.display, (size, app.active)
            assert app.snapshot is not None and app.active in app.snapshot.request.panes
            assert app.focused is pane.focus_target
        assert sorted(seen) == sorted(PANES)
        await pilot.press("shift+tab")
        assert app.active == seen[-2]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
async def test_labels_stay_with_their_values(tmp_path: Path, size: tuple[int, int]) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        app.active = "spend"
        await settle(pilot)
        lines = text_of(app, "#spend-figures").splitlines()
        width = app.pane("spend").content_size.width
        for label in ("since:00", "today", "month"):
            line = next(x for x in lines if x.startswith(label))
            assert "$" in line, (size, line)
        for burn in ("5m", "15m", "60m"):
            line = next(x for x in lines if f" {burn} " in x)
            assert line.rstrip().endswith("/h"), (size, line)
        assert all(len(x) <= width for x in lines), size
        app.active = "gpu"
        await settle(pilot)
        gpu = text_of(app, "#gpu-lines").splitlines()
        head = next(x for x in gpu if x.startswith("GPU"))
        assert head.split()[-1] in ("$/h", "idle/h") and "idle/h" in head, (size, head)
        assert all(len(x) <= app.pane("gpu").content_size.width for x in gpu)


async def test_narrow_tables_drop_the_stated_columns_and_never_the_money(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        pane = app.query_one(CostPerQueryPane)
        assert pane.fitted is not None
        keys = pane.fitted.keys
        assert {"name", "per_request", "cost"} <= set(keys)
        # The stated order: cache, out, in, requests, change: what is gone is a prefix of it.
        dropped = pane.fitted.dropped
        assert dropped == ("cache", "out", "in", "requests", "change")[: len(dropped)]
        assert dropped  # 100 columns: Cost per query has 56 of them
        await pilot.press("z")
        await settle(pilot)
        assert pane.fitted.dropped == ()


def test_names_that_do_not_fit_end_in_an_ellipsis() -> None:
    assert fit("gpt-4o-mini-2024-07-18", 12) == "gpt-4o-mini…"
    assert fit("o3-mini", 12) == "o3-mini"
    assert fit("模型模型模型", 5) == "模型…"  # wide characters count two cells
    fitted = fit_columns(
        40,
        ("Model", ["claude-sonnet-4-20250514", "o3"]),
        [(Column("cost", "Cost", 6), ["$1.00"]), (Column("in", "In/req", 6), ["1.2k"])],
        ("in",),
        name_floor=18,
    )
    # 40 cells: Cost (8) and In/req (8) leave 22 for names with the padding: no drop needed.
    assert fitted.keys == ("name", "cost", "in") and fitted.name_width == 22
    tight = fit_columns(
        30,
        ("Model", ["claude-sonnet-4-20250514"]),
        [(Column("cost", "Cost", 6), ["$1.00"]), (Column("in", "In/req", 6), ["1.2k"])],
        ("in",),
        name_floor=18,
    )
    assert tight.keys == ("name", "cost") and tight.dropped == ("in",)
    assert tight.name_width == 20


async def test_cut_names_end_in_an_ellipsis_and_get_the_free_width(tmp_path: Path) -> None:
    db = seed_store(tmp_path / "tokentop.db")
    with Store(db) as store:
        from tokentop.store.records import Batch, UsageBucket

        long = "gpt-4o-mini-2024-07-18-with-a-very-long-fine-tune-suffix"
        store.write_batch(
            Batch(
                usage=(
                    UsageBucket(
                        "openai",
                        "openai",
                        long,
                        FROZEN.replace(minute=10),
                        input_uncached=10,
                        output=5,
                        requests=1,
                        cost_nano=1_000_000,
                        priced=True,
                    ),
                )
            )
        )
    app = TokentopApp(db, clock=frozen_clock, refresh_s=3600)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        table = app.query_one(CostPerQueryPane).table
        name = table.get_cell(f"openai\x1f{long}", "name").plain
        width = table.columns[0].width
        assert name.endswith("…") and len(name) == width
        # The name column takes what the other columns leave.
        used = sum(c.width + 2 for c in table.columns)
        assert table.size.width - used < 2


async def test_s_sorts_by_the_next_column_and_the_heading_says_so(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        table = app.query_one(CostPerQueryPane).table
        assert app.sort == ("cost", True)
        assert [c.label for c in table.columns if "▼" in c.label] == ["Cost ▼"]
        await pilot.press("s")  # cost -> in (the next column)
        await settle(pilot)
        assert app.sort == ("in", True)
        assert any(c.label == "In/req ▼" for c in table.columns)

        def tokens(text: str) -> float:
            return float(text[:-1]) * 1000 if text.endswith("k") else float(text)

        per_request = [tokens(table.get_cell(k, "in").plain) for k in table.row_keys]
        assert per_request == sorted(per_request, reverse=True)
        await pilot.press("S")
        await settle(pilot)
        assert app.sort == ("in", False)
        assert any(c.label == "In/req ▲" for c in table.columns)


async def test_a_click_on_a_heading_sorts_by_it(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        table = app.query_one(CostPerQueryPane).table
        x = table.columns[0].width + 2 + 1  # inside the second column: $/req
        await pilot.click(ThemedTable, offset=(x, 0))
        await settle(pilot)
        assert app.sort == ("per_request", True)
        await pilot.click(ThemedTable, offset=(x, 0))
        await settle(pilot)
        assert app.sort == ("per_request", False)
        assert cost_keys(app)[0] == "gpt-4o-mini"  # cheapest per request first; unpriced last
        assert cost_keys(app)[-1] == "ft:acme-internal"


async def test_sources_table_sorts_too(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        app.active = "sources"
        await settle(pilot)
        pane = app.query_one(SourcesPane)
        assert pane.table.row_keys[0] == "anthropic"  # failing first
        await pilot.click("#sources-table", offset=(2, 0))  # the Source heading
        await settle(pilot)
        assert pane.sort == ("name", False)
        assert pane.table.row_keys == sorted(pane.table.row_keys)


async def test_enter_drills_down_and_escape_goes_back(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        table = app.query_one(CostPerQueryPane).table
        row = cost_keys(app).index("claude-sonnet-4")
        table.move_cursor(row)
        await pilot.press("enter")
        await settle(pilot)
        assert app.filter_text == "model:claude-sonnet-4"
        assert app.group == "project"  # one model: show what it is spent on
        assert cost_keys(app) == ["support"]
        state = str(app.query_one("#top-state", Static).render())
        assert "model:claude-sonnet-4" in state
        # The whole screen follows: spend and mix count that model only.
        assert app.snapshot is not None
        assert {m.model for m in app.snapshot.mix} == {"claude-sonnet-4"}
        await pilot.press("enter")  # and further: that project
        await settle(pilot)
        assert app.filter_text == "model:claude-sonnet-4 project:support"
        assert app.group == "api_key"
        await pilot.press("escape")
        await settle(pilot)
        assert (app.filter_text, app.group) == ("model:claude-sonnet-4", "project")
        await pilot.press("escape")
        await settle(pilot)
        assert (app.filter_text, app.group) == ("", "model")
        assert len(cost_keys(app)) == 3


async def test_the_filter_is_shown_in_full(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    long = "model:claude-sonnet-4 project:support tag:chat key:key_support"
    app.filter_text = long
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        top = app.query_one("#top-state", Static)
        second = app.query_one("#top-filter", Static)
        shown = str(top.render()) + str(second.render())
        assert long in shown
        assert cost_keys(app) == ["claude-sonnet-4"]


def test_filter_terms() -> None:
    assert [(t.column, t.value) for t in parse_filter("gpt model:ft:acme")] == [
        (None, "gpt"),
        ("model", "ft:acme"),
    ]
    assert parse_filter("ft:acme")[0].column is None  # ft is no dimension
    assert parse_filter(drill_term("tag", "a b"))[0].value == "a b"
    assert parse_filter(drill_term("tag", ""))[0].value == ""
    sql, params = filter_sql("project:x", ("tag", "model"))
    assert sql == " AND (0)" and params == []  # the requests table has no project


def test_sort_rows(tmp_path: Path) -> None:
    db = seed_store(tmp_path / "t.db")
    with Store(db) as store:
        rows = cost_by(store, FROZEN.replace(hour=11), FROZEN)
    assert [r.key for r in sort_rows(rows, parse_sort("name"))] == [
        "claude-sonnet-4",
        "ft:acme-internal",
        "gpt-4o-mini",
    ]
    # Unpriced ($/request unknown) sorts last either way.
    assert sort_rows(rows, ("per_request", True))[-1].key == "ft:acme-internal"
    assert sort_rows(rows, ("per_request", False))[-1].key == "ft:acme-internal"
    with pytest.raises(ValueError, match="cannot sort by"):
        parse_sort("colour")


async def test_export_is_what_the_screen_shows(tmp_path: Path) -> None:
    out = tmp_path / "exports"
    app = make_app(tmp_path, export_dir=out, export_formats=("json", "csv", "md"), label="demo")
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        await pilot.press("slash", *"gpt", "enter", "g", "s")
        await settle(pilot)
        assert (app.filter_text, app.group) == ("gpt", "project")
        await pilot.press("e")
        for _ in range(50):
            await settle(pilot)
            if app.exported:
                break
            await asyncio.sleep(0.02)
        paths = {Path(p).suffix: Path(p) for p in app.exported}
        assert set(paths) == {".json", ".csv", ".md", ".svg"}
        assert all(p.parent == out for p in paths.values())
        report = json.loads(paths[".json"].read_text())
        view = report["view"]
        assert (view["filter"], view["group_by"], view["window"]) == ("gpt", "project", "1h")
        assert view["sort"] == f"{app.sort[0]}:{'desc' if app.sort[1] else 'asc'}"
        # The same figures as the screen: totals, rows and their order.
        snapshot = app.snapshot
        assert snapshot is not None
        assert Decimal(str(report["total_usd"])) == snapshot.window_totals.cost
        assert report["requests"] == snapshot.window_totals.requests
        assert [r["key"] for r in report["by_group"]] == cost_keys(app)
        svg = paths[".svg"].read_text()
        lines = svg_lines(svg)
        caption = f"window {usd(snapshot.window_totals.cost)} {snapshot.window_totals.requests:,}"
        assert any(caption in line for line in lines)
        assert any("filter gpt" in line and "by project" in line for line in lines)
        text = paths[".csv"].read_text()
        assert "# filter: gpt" in text and "# group_by: project" in text
        body = [line for line in text.splitlines() if not line.startswith("#")]
        rows = list(csv.DictReader(io.StringIO("\n".join(body))))
        assert [r["project"] for r in rows] == cost_keys(app)
        assert "Filter: `gpt`; by project" in paths[".md"].read_text()


async def test_export_while_paused_keeps_the_paused_window(tmp_path: Path) -> None:
    now = [FROZEN]
    app = make_app(tmp_path, export_dir=tmp_path / "out", clock=lambda: now[0])
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        await pilot.press("p")
        now[0] = FROZEN.replace(hour=13)
        await pilot.press("e")
        for _ in range(50):
            await settle(pilot)
            if app.exported:
                break
            await asyncio.sleep(0.02)
    report = json.loads(read(app.exported[0]))
    assert report["window"]["end"] == FROZEN.isoformat()


async def test_first_paint_says_loading_until_the_first_refresh(tmp_path: Path) -> None:
    db = seed_store(tmp_path / "tokentop.db")
    release = threading.Event()

    def slow(request: RefreshRequest) -> Snapshot:
        release.wait(10)
        with Store(db) as store:
            return build_snapshot(store, request)

    app = TokentopApp(db, clock=frozen_clock, refresh_s=3600, snapshot_builder=slow)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        badges = [str(b.render()) for b in app.query(FreshnessBadge)]
        assert badges and all(b == "loading…" for b in badges)
        assert "no data" not in "".join(badges)
        release.set()
        await settle(pilot)
        assert app.query_one("#spend").query_one(FreshnessBadge).state == "live"
        assert "loading" not in str(app.query_one("#spend").query_one(FreshnessBadge).render())


async def test_paused_replaces_live_on_every_badge(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        live = [b for b in app.query(FreshnessBadge) if b.state == "live"]
        assert live
        await pilot.press("p")
        await pilot.pause()
        for badge in live:
            text = str(badge.render())
            assert text.startswith("paused") and "live" not in text
        await pilot.press("p")
        await settle(pilot)
        assert all(str(b.render()).startswith("live") for b in live)


async def test_one_sources_count(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    from tokentop.store.records import SourceHealth

    with Store(db) as store:
        for name in ("a", "b", "c"):
            store.record_health(
                SourceHealth(name, "openai", "auth failed", last_error="401"), now=FROZEN
            )
    app = TokentopApp(db, clock=frozen_clock, refresh_s=3600)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        info = text_of(app, "#sources .pane-info")
        badge = str(app.query_one(SourcesPane).badge.render())
        assert info.startswith("3 sources") and "3 failing" in info
        assert "no sources" not in badge


async def test_help_lines_are_not_cut(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        table = app.screen.query_one("#help-keys")
        widths = {c.key.value: c.width for c in table.columns.values()}  # type: ignore[attr-defined]
        assert all(len(d) <= widths["action"] for _, d in app.key_help())


async def test_a_click_on_a_pane_name_shows_that_pane(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert app.visible_panes() == {"spend"}
        bar = app.query_one("#pane-bar", Static)
        x = str(bar.render()).index("GPU")
        await pilot.click("#pane-bar", offset=(x, 0))
        await settle(pilot)
        assert app.active == "gpu" and app.visible_panes() == {"gpu"}
        assert "NVIDIA H100" in text_of(app, "#gpu-lines")


async def test_s_in_a_pane_without_a_table_sorts_and_shows_the_cost_table(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert app.active == "spend"
        await pilot.press("s")
        await settle(pilot)
        assert app.active == "cost" and app.visible_panes() == {"cost"}
        assert app.sort != ("cost", True)


async def test_model_mix_folds_what_does_not_fit_into_one_line(tmp_path: Path) -> None:
    from tokentop.store.records import Batch, UsageBucket

    db = tmp_path / "many.db"
    with Store(db) as store:
        store.write_batch(
            Batch(
                usage=tuple(
                    UsageBucket(
                        "openai",
                        "openai",
                        f"model-{i:02d}",
                        FROZEN.replace(minute=10),
                        input_uncached=10,
                        output=5,
                        requests=20 - i,
                        cost_nano=(20 - i) * 1_000_000,
                        priced=True,
                    )
                    for i in range(14)
                )
            )
        )
    app = TokentopApp(db, clock=frozen_clock, refresh_s=3600)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        lines = text_of(app, "#mix-lines").splitlines()
        total = text_of(app, "#mix-total")
        pane = app.pane("mix")
        assert len(lines) + 1 <= pane.content_size.height - 1  # no line out of sight
        assert any(line.startswith("+") and "more" in line for line in lines)
        assert total.startswith("total") and "$0.189" in total and "189 req" in total
        assert app.query_one("#mix-total").region.bottom <= pane.content_region.bottom


def many_models(db: Path, count: int) -> Path:
    """A database with ``count`` models of falling cost, in the frozen clock's hour."""
    from tokentop.store.records import Batch, UsageBucket

    with Store(db) as store:
        store.write_batch(
            Batch(
                usage=tuple(
                    UsageBucket(
                        "openai",
                        "openai",
                        f"model-{i:02d}",
                        FROZEN.replace(minute=10),
                        input_uncached=10,
                        output=5,
                        requests=count + 10 - i,
                        cost_nano=(count + 10 - i) * 1_000_000,
                        priced=True,
                    )
                    for i in range(count)
                )
            )
        )
    return db


async def test_small_tables_list_what_fits_and_an_others_row_that_adds_up(tmp_path: Path) -> None:
    from tokentop.store.queries import OTHERS, totals

    db = many_models(tmp_path / "many.db", 40)
    with Store(db) as store:
        full = cost_by(store, FROZEN - timedelta(hours=1), FROZEN)
        window = totals(store, FROZEN - timedelta(hours=1), FROZEN)
    assert len(full) == 40
    app = TokentopApp(db, clock=frozen_clock, refresh_s=3600)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        app.active = "cost"
        await settle(pilot)
        await settle(pilot)  # a pane laid out after its first request asks again for its room
        pane = app.query_one(CostPerQueryPane)
        table = pane.table
        assert app.snapshot is not None and app.snapshot.request.top_n == pane.top_n > 0
        rows = app.snapshot.cost_rows
        # Every row in sight: the groups that fit, then one that sums the rest.
        assert table.row_count == len(rows) <= table.size.height - 1
        assert rows[-1].key == OTHERS and rows[-1].others == 40 - (len(rows) - 1)
        assert table.row_keys[-1] == f"\x1f{OTHERS}"
        assert table.get_cell(table.row_keys[-1], "name").plain == f"+{rows[-1].others} others"
        assert [r.key for r in rows[:-1]] == [r.key for r in full[: len(rows) - 1]]
        assert sum((r.totals.cost for r in rows), Decimal(0)) == window.cost
        assert sum(r.totals.requests for r in rows) == window.requests
        assert "40 models" in str(pane.query_one(".pane-info", Static).render())
        small = len(rows)
        # More room (a bigger terminal, then a zoom): the table asks for more rows each time.
        await pilot.resize_terminal(100, 40)
        await settle(pilot)
        await settle(pilot)
        assert app.layout == "medium" and app.snapshot.request.top_n == pane.top_n
        rows = app.snapshot.cost_rows
        assert small < len(rows) <= table.size.height - 1 and rows[-1].key == OTHERS
        assert sum((r.totals.cost for r in rows), Decimal(0)) == window.cost
        medium = len(rows)
        await pilot.press("z")
        await settle(pilot)
        await settle(pilot)
        assert app.zoomed == "cost" and app.snapshot.request.top_n == pane.top_n
        rows = app.snapshot.cost_rows
        assert medium < len(rows) <= table.size.height - 1 and rows[-1].key == OTHERS
        assert sum((r.totals.cost for r in rows), Decimal(0)) == window.cost
        await pilot.press("z")
        await settle(pilot)
        # The Model mix folds the same way, its total line still the window's.
        app.active = "mix"
        await settle(pilot)
        await settle(pilot)
        mix = app.snapshot.mix
        assert app.snapshot.request.mix_top_n == app.query_one("#mix").top_n  # type: ignore[attr-defined]
        assert mix[-1].model == OTHERS and len(mix) < 40
        lines = text_of(app, "#mix-lines").splitlines()
        assert lines[-1].startswith(f"+{mix[-1].others} more")
        assert f"{window.requests:,} req" in text_of(app, "#mix-total")


def test_a_mix_row_summing_an_unpriced_model_keeps_its_share_of_spend() -> None:
    from tokentop.store.queries import OTHERS, MixRow
    from tokentop.tui.panes.model_mix import ModelMixPane

    def line(row: MixRow) -> str:
        return ModelMixPane._line("name", 8, 10, row).plain

    others = MixRow("", OTHERS, Decimal("0.9"), 300, 0.073, 0.71, priced=False, others=3)
    assert "7.3%" in line(others) and "unpriced" not in line(others)
    alone = MixRow("acme", "ft", Decimal(0), 80, 0.0, 0.01, priced=False)
    assert "unpriced" in line(alone)


async def test_one_group_past_the_room_is_listed_not_summed(tmp_path: Path) -> None:
    from tokentop.store.queries import OTHERS

    db = many_models(tmp_path / "many.db", 40)
    with Store(db) as store:
        request = RefreshRequest(seq=1, now=FROZEN, window="1h", top_n=39, mix_top_n=5)
        snapshot = build_snapshot(store, request)
    assert len(snapshot.cost_rows) == 40 and all(r.key != OTHERS for r in snapshot.cost_rows)
    assert len(snapshot.mix) == 6 and snapshot.mix[-1].others == 35


async def test_a_reused_snapshot_sums_the_rows_of_its_own_window(tmp_path: Path) -> None:
    """The store sums the buckets starting in [start, end) at whole seconds: a window that ends
    at 12:30:00.5 still holds the 11:30 bucket, one ending at 12:30:01.5 no longer does. A
    still screen may reuse its last query within a minute, never across that edge."""
    from tokentop.store.queries import totals
    from tokentop.store.records import Batch, UsageBucket

    db = tmp_path / "edge.db"
    with Store(db) as store:
        store.write_batch(
            Batch(
                usage=tuple(
                    UsageBucket(
                        "openai",
                        "openai",
                        "gpt-4o",
                        start,
                        input_uncached=10,
                        output=5,
                        requests=requests,
                        cost_nano=requests * 1_000_000,
                        priced=True,
                    )
                    for start, requests in (
                        (FROZEN - timedelta(hours=1), 7),  # 11:30, the window's first bucket
                        (FROZEN - timedelta(minutes=20), 3),
                    )
                )
            )
        )
    now = [FROZEN + timedelta(seconds=0.5)]
    app = TokentopApp(db, clock=lambda: now[0], refresh_s=3600)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        assert app.snapshot is not None and app.snapshot.window_totals.requests == 10
        now[0] = FROZEN + timedelta(seconds=1.5)
        app.refresh_tick()
        await settle(pilot)
        with Store(db) as store:
            fresh = totals(store, now[0] - timedelta(hours=1), now[0])
        assert fresh.requests == 3
        assert app.snapshot.now == now[0] and app.snapshot.window_totals == fresh
        now[0] = FROZEN + timedelta(seconds=30)  # the same rows: reused, and still right
        app.refresh_tick()
        await settle(pilot)
        assert app.snapshot.elapsed_s == 0.0 and app.snapshot.window_totals == fresh


async def test_a_still_database_is_not_queried_every_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tokentop.tui.app as app_module
    from tokentop.store.records import SourceHealth

    calls: list[RefreshRequest] = []
    real = app_module.build_snapshot

    def counting(store: Store, request: RefreshRequest) -> Snapshot:
        calls.append(request)
        return real(store, request)

    monkeypatch.setattr(app_module, "build_snapshot", counting)
    app = make_app(tmp_path)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        first = len(calls)
        count = app.refresh_count
        for _ in range(3):
            app.refresh_tick()
            await settle(pilot)
        # Nothing was written and the clock (frozen) stays in its minute: the snapshot is
        # re-applied (badges and ages follow the clock) without querying again.
        assert len(calls) == first and app.refresh_count == count + 3
        with Store(app.db_path) as store:  # another connection writes: query again
            store.record_health(SourceHealth("openai", "openai", "ok"), now=FROZEN)
        app.refresh_tick()
        await settle(pilot)
        assert len(calls) == first + 1
