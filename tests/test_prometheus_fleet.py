"""A fleet read through a real Prometheus: two ``collect --demo --metrics-port`` hosts on their
own databases and a metering proxy, scraped every second; ``report --prometheus`` must equal the
sum of the hosts' own reports for the same window, within the traffic of the time the reports
took plus one scrape interval and one poll.

Needs the ``prometheus`` binary (Debian's package): skipped with a printed reason without it,
failed in CI (``CI=true``), where ``.ci/run`` installs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.prometheus_server import PrometheusServer, require_prometheus
from tests.fakes.upstream import FakeUpstream

pytestmark = pytest.mark.timeout(480)

SCRAPE_S = 1.0
POLL_S = 1.0
FIELDS = ("total_usd", "requests", "input_tokens", "cached_input_tokens", "output_tokens")


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tokentop", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait_line(proc: subprocess.Popen[str], pattern: str, timeout: float = 90.0) -> str:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before printing {pattern!r}")
        m = re.search(pattern, line)
        if m:
            return m.group(1)
    raise AssertionError(f"{pattern!r} not printed in {timeout} s")


def _reports(*runs: tuple[str, ...]) -> tuple[list[dict[str, Any]], float]:
    """``report --since 2m --json`` with each set of arguments, all started at once (so that
    they read at nearly the same moment), and the seconds they took together."""
    began = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tokentop", *args, "report", "--since", "2m", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in runs
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        out.append(json.loads(stdout))
    return out, time.monotonic() - began


def _window_start(report: dict[str, Any]) -> datetime:
    """The first whole minute of a report's window (where its one-minute buckets begin)."""
    start = datetime.fromisoformat(report["window"]["start"])
    floor = start.replace(second=0, microsecond=0)
    return floor if floor == start else floor + timedelta(minutes=1)


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate(timeout=10)


def test_report_over_prometheus_equals_the_sum_of_the_hosts(tmp_path: Path) -> None:
    binary = require_prometheus()
    config = tmp_path / "config.toml"
    # New series show their history for 1 s (one scrape interval) before their total: with the
    # default 60 s, a fresh host's first minute of traffic would land up to 60 s late.
    config.write_text("[metrics]\nnew_series_hold_s = 1\n", encoding="utf-8")
    procs: list[subprocess.Popen[str]] = []
    with FakeUpstream() as upstream:
        try:
            for i in range(2):
                db = str(tmp_path / f"host{i}.db")
                procs.append(
                    _start("--config", str(config), "--db", db, "collect", "--demo",
                           "--metrics-port", "0")
                )  # fmt: skip
            procs.append(
                _start(
                    "--config", str(config), "--db", str(tmp_path / "proxy.db"), "proxy",
                    "--port", "0", "--upstream-openai", upstream.url, "--metrics-port", "0",
                    "--tag", "feature-x",
                )
            )  # fmt: skip
            urls = [_wait_line(p, r"metrics on (http://\S+)") for p in procs]
            proxy_url = _wait_line(procs[2], r"listening on (http://\S+)")
            targets = [re.sub(r"^http://([^/]+)/.*$", r"\1", u) for u in urls]
            with PrometheusServer(tmp_path / "prom", targets, binary=binary) as prom:
                prom.wait_for("count by (instance) (tokentop_source_up)", count=3)
                first_sample = datetime.now(UTC)
                # The window of --since 2m must begin after Prometheus' first samples.
                while _window_start({"window": {"start": _ago(120)}}) < first_sample + timedelta(
                    seconds=2
                ):
                    time.sleep(1)
                    assert all(p.poll() is None for p in procs), "a tokentop process exited"
                for _ in range(4):
                    r = httpx.post(
                        f"{proxy_url}/v1/chat/completions",
                        json={
                            "model": "gpt-4o-mini",
                            "messages": [{"role": "user", "content": "x"}],
                        },
                        headers={"Authorization": "Bearer sk-test"},
                    )
                    assert r.status_code == 200
                prom.wait_for('sum(tokentop_requests_total{metered="true"}) >= 4', timeout=30)
                time.sleep(10)  # several samples after the step: increase() extrapolates little
                for _attempt in range(3):
                    (a, b, c), took = _reports(
                        ("--db", str(tmp_path / "host0.db")),
                        ("--db", str(tmp_path / "host1.db")),
                        ("--prometheus", prom.url),
                    )
                    if len({_window_start(x) for x in (a, b, c)}) == 1:
                        break  # the same whole minutes (not straddling a minute boundary)
                else:
                    pytest.fail("the three reports never saw the same window")
                _compare(a, b, c, took, [tmp_path / f"host{i}.db" for i in range(2)])
                # The proxy's requests are OpenAI's, which the demo (an admin source) covers:
                # inside the totals, as "of which metered", never added.
                openai = c["total_sources"]["openai"]
                assert openai["metered"] == ["meter"]
                assert "meter" not in openai["counted"]
                assert abs(c["of_which_metered"]["requests"] - 4) <= 1
                assert c["tokentop"]["prometheus"] == prom.url
                assert c["sources"][0]["name"] == "prometheus"
                assert c["via"] == f"Prometheus {prom.url}"
                assert c["freshness"]["sample_age_s"] is not None
                assert c["freshness"]["sample_age_s"] < 30
                _tui_over(prom.url, tmp_path)
                svg = subprocess.run(
                    [sys.executable, "-m", "tokentop", "export", "--prometheus", prom.url,
                     "--since", "15m", "--format", "svg"],
                    capture_output=True, text=True, timeout=120,
                )  # fmt: skip
                assert svg.returncode == 0, svg.stderr
                assert svg.stdout.startswith("<svg") and "via&#160;Prometheus" in svg.stdout
                listed = subprocess.run(
                    [sys.executable, "-m", "tokentop", "sources", "--prometheus", prom.url,
                     "--json"],
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                assert listed.returncode == 0, listed.stdout + listed.stderr
                names = [r["name"] for r in json.loads(listed.stdout)["sources"]]
                assert names[0] == "prometheus"
                assert sum(n.startswith(("demo@", "demo-gpu@")) for n in names) == 4
                assert any(n.startswith("proxy@") for n in names)
                _check_and_status(prom.url, tmp_path)
            # Prometheus stopped: a source error (exit 1, one line), never a report of $0.
            gone = subprocess.run(
                [sys.executable, "-m", "tokentop", "report", "--prometheus", prom.url, "--json"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert gone.returncode == 1
            assert gone.stdout == ""
            assert prom.url in gone.stderr and len(gone.stderr.strip().splitlines()) == 1
            status = _tokentop("status", "--prometheus", prom.url)
            assert status.returncode == 1
            assert status.stdout.startswith(f"Prometheus error: {prom.url}: unreachable")
            check = _tokentop("--config", str(tmp_path / "rules.toml"), "check",
                              "--prometheus", prom.url)  # fmt: skip
            assert check.returncode == 3
            assert check.stdout.startswith(f"UNKNOWN - Prometheus {prom.url}: unreachable")
        finally:
            _stop(procs)


def _tokentop(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokentop", *args], capture_output=True, text=True, timeout=120
    )


RULES = """
budget_daily_usd = 1000000
[[alert]]
name = "daily"
kind = "budget"
[[alert]]
name = "runway"
kind = "runway"
[[alert]]
name = "spike"
kind = "spike"
provider = "openai"
[[alert]]
name = "down"
kind = "source_down"
[[alert]]
name = "unpriced"
kind = "unpriced"
[[alert]]
name = "new-project"
kind = "new_model"
dimension = "project"
window = "1m"
[[alert]]
name = "per-request"
kind = "cost_per_request"
by = "tag"
window = "1m"
min_requests = 1
[[alert]]
name = "gpu-idle"
kind = "gpu_idle"
usd_per_hour = 1000000
[[alert]]
name = "by-key"
kind = "budget"
budget_usd = 5
api_key = "key_search"
"""


def _check_and_status(url: str, tmp_path: Path) -> None:
    """``status`` and ``check`` read the fleet: every rule kind is PromQL the real server
    answers; a scope by a label the hosts do not export (``api_key``) is UNKNOWN, saying so."""
    status = _tokentop("status", "--prometheus", url, "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    fields = json.loads(status.stdout)
    assert float(fields["today_usd"]) > 0 and fields["stale"] == "", fields
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES, encoding="utf-8")
    check = _tokentop("--config", str(rules), "check", "--prometheus", url, "--json")
    data = json.loads(check.stdout)
    assert data["prometheus"] == url, data
    found = {r["name"]: r for r in data["rules"]}
    errors = {name: r["error"] for name, r in found.items() if r["error"]}
    assert set(errors) == {"by-key"}, errors
    assert "no api_key label" in errors["by-key"]
    assert check.returncode == 3  # the worst: the rule that cannot be evaluated
    assert found["daily"]["status"] == "OK" and found["gpu-idle"]["status"] == "OK"
    # The demo's hosts and the proxy are up: nothing down.
    assert found["down"]["status"] == "OK", found["down"]
    # A brand-new fleet: every project is new within the last minute... or has no history.
    assert found["new-project"]["status"] in ("OK", "WARNING")


def _ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()


_PER_MINUTE = {
    "total_usd": "SUM(CASE WHEN priced THEN cost_nano ELSE 0 END) / 1e9",
    "requests": "SUM(requests)",
    "input_tokens": "SUM(input_uncached + cache_read + cache_write_5m + cache_write_1h)",
    "cached_input_tokens": "SUM(cache_read)",
    "output_tokens": "SUM(output)",
}


def _peak_rate(dbs: list[Path], start: datetime, field: str) -> float:
    """The fleet's busiest minute since ``start``, per second (the demo's traffic comes in
    bursts: a window's average rate can be far below the rate at its end)."""
    per_minute: dict[int, float] = {}
    for db in dbs:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            for minute, value in conn.execute(
                f"SELECT start, {_PER_MINUTE[field]} FROM usage WHERE start >= ? GROUP BY start",
                (int(start.timestamp()),),
            ):
                per_minute[minute] = per_minute.get(minute, 0.0) + (value or 0.0)
    return max(per_minute.values(), default=0.0) / 60


def _compare(
    a: dict[str, Any], b: dict[str, Any], c: dict[str, Any], took: float, dbs: list[Path]
) -> None:
    """Prometheus' figure equals the hosts' sum within one scrape interval, one poll and the
    spread of the three reports' reading times (each doubled), of traffic at the fleet's peak
    one-minute rate in the window."""
    start = _window_start(a)
    ends = [datetime.fromisoformat(x["window"]["end"]) for x in (a, b, c)]
    spread = (max(ends) - min(ends)).total_seconds()
    slack = 2 * (SCRAPE_S + POLL_S + spread)
    assert took < 60
    for field in FIELDS:
        local = a[field] + b[field]
        assert local > 0, field
        allowed = _peak_rate(dbs, start, field) * slack
        assert abs(c[field] - local) <= allowed, (field, c[field], local, allowed)
        print(f"{field}: prometheus {c[field]} hosts {local} ({c[field] / local - 1:+.2%})")
    # Every model of the hosts is in the fleet's table, but one whose requests all came in the
    # last scrape interval (within the same slack) may not have been scraped yet.
    models = {(m["provider"], m["model"]) for m in c["by_model"]}
    local_requests: dict[tuple[str, str], int] = {}
    for m in a["by_model"] + b["by_model"]:
        key = (m["provider"], m["model"])
        local_requests[key] = local_requests.get(key, 0) + m["requests"]
    recent = _peak_rate(dbs, start, "requests") * slack
    assert {k for k, n in local_requests.items() if n > recent} <= models
    unpriced = {k: a["unpriced"].get(k, 0) + b["unpriced"].get(k, 0) for k in a["unpriced"]}
    for model, tokens in unpriced.items():
        assert abs(c["unpriced"].get(model, 0) - tokens) <= tokens / 60 * slack + 1


def _tui_over(url: str, tmp_path: Path) -> None:
    """Every pane of the TUI is fed from Prometheus and says so."""
    from tokentop.collectors.promql import PromClient
    from tokentop.collectors.promsource import PromSource
    from tokentop.tui.app import TokentopApp
    from tokentop.tui.snapshot import PANES, RefreshRequest
    from tokentop.tui.snapshot_prometheus import build_prometheus_snapshot, via

    source = PromSource(PromClient(url))
    try:
        snap = build_prometheus_snapshot(
            source, RefreshRequest(seq=1, now=datetime.now(UTC), window="15m")
        )
        assert snap.spend is not None and snap.spend.hour > 0
        assert snap.spend.burn_per_hour[5] > 0
        assert snap.window_totals.requests > 0 and snap.window_totals.cost > 0
        assert any(v > 0 for v in snap.series)
        assert {r.key for r in snap.cost_rows} >= {"gpt-4o-2024-08-06", "o3-mini"}
        assert abs(sum(m.cost_share for m in snap.mix) - 1) < 1e-6
        assert len(snap.gpu.devices) == 4  # two hosts x two demo GPUs, kept apart by instance
        assert snap.gpu.cost > 0
        assert snap.sources[0].name == "prometheus"
        assert sum(s.kind == "demo" for s in snap.sources) == 4  # demo, demo-gpu on two hosts

        app = TokentopApp(
            tmp_path / "viewer.db",
            refresh_s=3600,
            snapshot_builder=lambda request: build_prometheus_snapshot(source, request),
            via=lambda shot: via(source, shot),
            note=f"via Prometheus {url}",
        )

        async def drive() -> None:
            async with app.run_test(size=(160, 48)) as pilot:
                await pilot.pause()
                await app.workers.wait_for_complete()
                await pilot.pause()
                assert app.snapshot is not None and app.refresh_error == ""
                assert app.snapshot.request.panes == frozenset(PANES)
                for pane in app.panes:
                    assert f"via Prometheus {url}" in str(pane.border_subtitle)
                    assert "newest sample" in str(pane.border_subtitle)

        asyncio.run(drive())
    finally:
        source.close()
