"""Sessions (named windows of metered requests), their snapshots and diffs, the ``session``
commands, and the metered-request queries behind them and the Cost per query pane."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from tokentop.collectors.base import utcnow
from tokentop.store import sessions
from tokentop.store.db import Store
from tokentop.store.records import Batch, GpuSample, InferenceSample, MeteredRequest
from tokentop.store.request_queries import latest_requests, request_stats, request_stats_by
from tokentop.tui import cli

T0 = datetime(2025, 8, 1, 12, tzinfo=UTC)


def req(
    at: datetime,
    cost_nano: int,
    *,
    tag: str = "",
    model: str = "gpt-4o-mini",
    priced: bool = True,
    rid: str = "",
    input_uncached: int = 100,
    cache_read: int = 0,
    output: int = 10,
    estimated: bool = False,
) -> MeteredRequest:
    return MeteredRequest(
        ts=at,
        provider="anthropic" if model.startswith("claude") else "openai",
        model=model,
        request_id=rid or f"{at.timestamp()}-{cost_nano}-{tag}-{model}",
        input_uncached=input_uncached,
        cache_read=cache_read,
        output=output,
        cost_nano=cost_nano if priced else 0,
        priced=priced,
        price_ref="test",
        latency_ms=20.0,
        tag=tag,
        estimated=estimated,
    )


@pytest.fixture
def store(db_path: Path) -> Store:
    return Store(db_path)


def test_request_stats_percentiles_groups_and_latest(store: Store) -> None:
    costs = list(range(1, 21))  # 1..20 (x 1000 nano)
    batch = [req(T0 + timedelta(seconds=i), c * 1000, tag="a") for i, c in enumerate(costs)]
    batch += [req(T0 + timedelta(seconds=30), 500_000, tag="b", model="claude-sonnet-4")]
    batch += [req(T0 + timedelta(seconds=31), 0, tag="b", model="mystery", priced=False)]
    batch += [req(T0 - timedelta(hours=1), 9_999_999, tag="a", rid="before")]
    store.write_batch(Batch(requests=tuple(batch)))
    end = T0 + timedelta(minutes=5)

    whole = request_stats(store, T0, end)
    assert whole.requests == 22 and whole.priced_requests == 21 and whole.unpriced_requests == 1
    assert whole.cost == Decimal(sum(costs) * 1000 + 500_000) / 10**9
    # Nearest rank over the 21 priced: p50 is the 11th (11k), p95 the 20th (20k).
    assert whole.p50 == Decimal("0.000011") and whole.p95 == Decimal("0.00002")
    assert whole.max == Decimal("0.0005")

    by_tag = {s.key: s for s in request_stats_by(store, T0, end, "tag")}
    assert list(by_tag) == ["b", "a"]  # dearest first
    a = by_tag["a"]
    assert (a.requests, a.p50, a.p95) == (20, Decimal("0.00001"), Decimal("0.000019"))
    assert a.cost_per_request == Decimal(sum(costs) * 1000) / 20 / 10**9
    assert by_tag["b"].unpriced_requests == 1 and by_tag["b"].p50 == Decimal("0.0005")
    models = {s.key: s for s in request_stats_by(store, T0, end, "model")}
    assert models["claude-sonnet-4"].provider == "anthropic"
    assert request_stats(store, T0, end, tag="a").requests == 20
    assert request_stats(store, T0, end, text="claude").requests == 1

    newest = latest_requests(store, 3)
    assert [r.model for r in newest] == ["mystery", "claude-sonnet-4", "gpt-4o-mini"]
    assert newest[1].cost_nano == 500_000 and newest[1].priced
    assert latest_requests(store, 100, start=T0, tag="b")[0].tag == "b"
    with pytest.raises(ValueError):
        request_stats_by(store, T0, end, "nonsense")


def test_sessions_lifecycle_snapshot_and_diff(store: Store) -> None:
    a = sessions.start_session(store, "before", T0)
    with pytest.raises(sessions.SessionError, match="already exists"):
        sessions.start_session(store, "before", T0)
    b = sessions.start_session(store, "after", T0 + timedelta(minutes=10), tag="feat*")
    with pytest.raises(sessions.SessionError, match="several sessions are open"):
        sessions.stop_session(store, T0)
    a = sessions.stop_session(store, T0 + timedelta(minutes=5), "before")
    with pytest.raises(sessions.SessionError, match="already stopped"):
        sessions.stop_session(store, T0, "before")
    b = sessions.stop_session(store, T0 + timedelta(minutes=15))
    with pytest.raises(sessions.SessionError, match="no open session"):
        sessions.stop_session(store, T0)
    with pytest.raises(sessions.SessionError, match="unknown session"):
        sessions.get_session(store, "nope")
    assert [s.name for s in sessions.list_sessions(store)] == ["before", "after"]

    t_a, t_b = T0 + timedelta(minutes=1), T0 + timedelta(minutes=11)
    store.write_batch(
        Batch(
            requests=(
                req(t_a, 1000, input_uncached=80, cache_read=20, output=10),
                req(t_a, 3000, model="claude-sonnet-4", input_uncached=100, output=30),
                req(t_b, 3000, tag="feature-x", input_uncached=50, cache_read=50, output=20),
                req(t_b, 5000, tag="feature-x", input_uncached=100, output=40),
                req(t_b, 7000, tag="other"),  # outside the tag filter of "after"
                req(T0 + timedelta(minutes=7), 1, rid="between"),  # in neither window
            ),
            gpu=(GpuSample("nvml", "gpu0", T0 + timedelta(minutes=12), 60.0, cost_nano=40_000),),
            inference=(
                InferenceSample("vllm", "http://x", T0 + timedelta(minutes=12), 60.0, requests=8),
            ),
        )
    )
    snap_a = sessions.snapshot(store, a, T0 + timedelta(hours=1))
    snap_b = sessions.snapshot(store, b, T0 + timedelta(hours=1))
    assert snap_a.stats.requests == 2 and snap_b.stats.requests == 2
    assert snap_a.stats.cost_per_request == Decimal("0.000002")
    assert snap_b.stats.cost_per_request == Decimal("0.000004")
    assert snap_a.stats.cache_hit_rate == 0.1  # 20 of 200 input tokens
    assert [(m.model, m.requests) for m in snap_a.models] == [
        ("claude-sonnet-4", 1),
        ("gpt-4o-mini", 1),
    ]
    assert snap_a.models[0].cost_share == 0.75
    assert snap_b.gpu_cost == Decimal("0.00004") and snap_b.gpu_inferences == 8
    assert snap_a.gpu_cost == 0

    changes = {c.metric: c for c in sessions.diff(snap_a, snap_b)}
    assert changes["cost_per_request_usd"].change_pct == 100.0
    assert changes["input_tokens_per_request"].change_pct == 0.0
    assert changes["output_tokens_per_request"].change_pct == 50.0
    assert changes["gpu_cost_per_inference_usd"].a is None
    data = sessions.snapshot_dict(snap_b)
    assert data["tag"] == "feat*" and data["cost_per_request_usd"] == 0.000004
    assert data["gpu"]["cost_per_inference_usd"] == 0.000005


def _seed_two_sessions(db_path: Path, before_nano: int, after_nano: int) -> None:
    with Store(db_path) as store:
        sessions.start_session(store, "base", T0)
        sessions.stop_session(store, T0 + timedelta(minutes=5))
        sessions.start_session(store, "change", T0 + timedelta(minutes=10))
        sessions.stop_session(store, T0 + timedelta(minutes=15))
        store.write_batch(
            Batch(
                requests=(
                    req(T0 + timedelta(minutes=1), before_nano),
                    req(T0 + timedelta(minutes=11), after_nano),
                )
            )
        )


def test_session_diff_exit_codes(db_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _seed_two_sessions(db_path, 1000, 1300)
    db = ["--db", str(db_path)]
    assert cli.main([*db, "session", "diff", "base", "change"]) == 0
    out = capsys.readouterr().out
    assert "$/request" in out and "+30.0%" in out
    assert cli.main([*db, "session", "diff", "base", "change", "--fail-over", "50"]) == 0
    assert "ok:" in capsys.readouterr().out
    assert cli.main([*db, "session", "diff", "base", "change", "--fail-over", "20"]) == 1
    assert "FAIL: $/request rose 30.0%, more than the allowed 20%" in capsys.readouterr().out
    assert cli.main([*db, "session", "diff", "base", "change", "--fail-over", "20", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["failed"] and data["changes"][0]["change_pct"] == 30.0
    # A cheaper change never fails.
    assert cli.main([*db, "session", "diff", "change", "base", "--fail-over", "0"]) == 0
    capsys.readouterr()
    # Unknown names and bad values: one line, exit 2.
    assert cli.main([*db, "session", "diff", "base", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown session 'nope'" in err
    assert cli.main([*db, "session", "diff", "base", "change", "--fail-over", "x"]) == 2
    assert "--fail-over" in capsys.readouterr().err


def test_session_commands_record_a_real_window(
    db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = ["--db", str(db_path)]
    assert cli.main([*db, "session", "show", "x"]) == 2  # no database yet
    assert "no database" in capsys.readouterr().err
    assert cli.main([*db, "session", "start", "feature", "--tag", "checkout"]) == 0
    assert "started session feature" in capsys.readouterr().out
    assert cli.main([*db, "session", "start", "feature"]) == 2
    assert "already exists" in capsys.readouterr().err
    with Store(db_path) as store:
        store.write_batch(
            Batch(
                requests=(
                    req(utcnow(), 2000, tag="checkout", cache_read=100),
                    req(utcnow(), 9000, tag="search"),
                )
            )
        )
    assert cli.main([*db, "session", "stop"]) == 0
    assert "1 requests, $0.000002 ($0.000002/request)" in capsys.readouterr().out
    assert cli.main([*db, "session", "show", "feature", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["requests"] == 1 and shown["cache_hit_rate"] == 0.5 and not shown["open"]
    assert shown["models"][0]["model"] == "gpt-4o-mini"
    assert cli.main([*db, "session", "show", "feature"]) == 0
    text = capsys.readouterr().out
    assert "session feature (stopped)" in text and "cache hit rate     50.0%" in text
    assert cli.main([*db, "session", "list", "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)["sessions"]
    assert listed["name"] == "feature" and listed["requests"] == 1
    assert cli.main([*db, "session", "list"]) == 0
    assert "feature" in capsys.readouterr().out
    assert cli.main([*db, "session", "stop"]) == 2
    assert "no open session" in capsys.readouterr().err
    assert cli.main([*db, "session", "start", "bad name!"]) == 2
    assert cli.main([*db, "session"]) == 2
