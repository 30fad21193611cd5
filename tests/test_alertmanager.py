"""Against a real Prometheus Alertmanager on 127.0.0.1 (Debian's ``prometheus-alertmanager``):
the alert is active there with its labels, then resolved; a local webhook receiver gets one
message per transition; Alertmanager's own webhook receiver is told of both.

Skipped, with the reason printed, where the binary is missing outside CI; failed in CI.

Alertmanager judges ``startsAt`` and ``endsAt`` by its own clock, so these tests run on the real
time: the engine's clock is frozen at the real "now" the test starts with (the data is written at
that instant, so a day turning over in between changes nothing), and moved to the real time for
the resolution.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.alertmanager import (
    Alertmanager,
    WebhookReceiver,
    alertmanager_binary,
    running_alertmanager,
)
from tests.helpers import Clock, bucket
from tokentop.collectors.alerts import AlertEngine
from tokentop.collectors.config import parse_config
from tokentop.store.db import Store
from tokentop.store.records import Batch


@pytest.fixture
def am_hook() -> Iterator[WebhookReceiver]:
    """Where Alertmanager itself sends its notifications."""
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture
def hook() -> Iterator[WebhookReceiver]:
    """tokentop's plain webhook (a stand-in for Slack)."""
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture
def alertmanager(tmp_path: Path, am_hook: WebhookReceiver) -> Iterator[Alertmanager]:
    alertmanager_binary()
    with running_alertmanager(tmp_path / "am", am_hook.url) as am:
        yield am


def config_text(am: Alertmanager, hook: WebhookReceiver, budget: float, every: float = 30) -> str:
    return f"""
budget_daily_usd = {budget}

[alerts]
alertmanager_url = "{am.url}"
webhook_url = "{hook.url}"
evaluate_every_s = {every}
resend_s = {every * 2}
instance = "test-box"

[[alert]]
name = "daily-budget"
kind = "budget"
crit_pct = 100

[[alert]]
name = "spike"
kind = "spike"
"""


def engine(store: Store, text: str, clock: Clock) -> AlertEngine:
    config = parse_config(tomllib.loads(text)).alerts
    return AlertEngine(store, config, clock=clock, client=httpx.AsyncClient(timeout=10))


def firing(messages: list[dict[str, Any]], name: str, status: str) -> list[dict[str, Any]]:
    return [m for m in messages if m.get("alertname") == name and m.get("status") == status]


async def test_budget_alert_is_active_in_alertmanager_then_resolved(
    db_path: Path, alertmanager: Alertmanager, hook: WebhookReceiver, am_hook: WebhookReceiver
) -> None:
    now = datetime.now(UTC)
    clock = Clock(now)
    store = Store(db_path)
    store.write_batch(Batch(usage=(bucket(now.replace(second=0, microsecond=0), cost="2.50"),)))
    e = engine(store, config_text(alertmanager, hook, 1), clock)
    for _ in range(5):  # five evaluations, one message
        await e.tick()
        clock.advance(1)
    await e.aclose()

    (alert,) = alertmanager.named("daily-budget")
    assert alert["labels"] == {
        "alertname": "daily-budget",
        "severity": "critical",
        "rule_kind": "budget",
        "instance": "test-box",
    }
    assert alert["annotations"]["summary"].startswith("$2.50 of $1.00 today (250%), burn $2.50/h")
    assert alert["status"]["state"] == "active"
    assert len(firing(hook.received(), "daily-budget", "firing")) == 1
    # Alertmanager routes it on to its own receivers.
    am_hook.wait_for(
        lambda ms: [m for m in ms if m["status"] == "firing"], what="Alertmanager's notification"
    )

    # Restarted with the budget raised: resolved, in Alertmanager and once on the webhook.
    # The resolution must not end in Alertmanager's future: wait out the clock's lead.
    await asyncio.sleep(max(0.0, (clock.now - datetime.now(UTC)).total_seconds()) + 0.05)
    clock.now = datetime.now(UTC)
    e = engine(store, config_text(alertmanager, hook, 1000), clock)
    await e.tick()
    await e.tick()
    await e.aclose()
    assert alertmanager.named("daily-budget") == []
    messages = hook.received()
    assert len(firing(messages, "daily-budget", "firing")) == 1
    (resolved,) = firing(messages, "daily-budget", "resolved")
    assert resolved["text"].startswith("[RESOLVED] daily-budget on test-box")
    notice = am_hook.wait_for(
        lambda ms: [m for m in ms if m["status"] == "resolved"],
        what="Alertmanager's resolved notification",
    )
    assert notice[0]["alerts"][0]["labels"]["alertname"] == "daily-budget"
    store.close()


def _tokentop(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tokentop", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ},
        **kwargs,
    )


def _stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGTERM)
    try:
        out, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate(timeout=10)
    return out or ""


def test_collect_demo_pages_through_alertmanager_then_resolves(
    tmp_path: Path, alertmanager: Alertmanager, hook: WebhookReceiver
) -> None:
    db = tmp_path / "demo.db"
    config = tmp_path / "config.toml"
    # Projected, so that the demo's spend crosses $1 whatever the hour (even at 00:00 UTC).
    text = config_text(alertmanager, hook, 1, every=1).replace(
        "crit_pct = 100", 'crit_pct = 100\nbasis = "projected"'
    )
    config.write_text(text, encoding="utf-8")
    collector = _tokentop("collect", "--demo", "--config", str(config), "--db", str(db))
    try:
        (alert,) = alertmanager.wait_for(
            lambda alerts: [a for a in alerts if a["labels"]["alertname"] == "daily-budget"],
            timeout=90,
            what="daily-budget active",
        )
        assert alert["labels"]["severity"] == "critical"
        time.sleep(3)  # three more evaluations: still one message
        check = subprocess.run(
            [sys.executable, "-m", "tokentop", "check", "--config", str(config), "--db", str(db)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 2, check.stdout + check.stderr
        assert check.stdout.startswith("CRITICAL - daily-budget: projected $"), check.stdout
    finally:
        out = _stop(collector)
    assert len(firing(hook.received(), "daily-budget", "firing")) == 1, out

    config.write_text(text.replace("budget_daily_usd = 1\n", "budget_daily_usd = 1e9\n"))
    collector = _tokentop("collect", "--demo", "--config", str(config), "--db", str(db))
    try:
        alertmanager.wait_for(
            lambda alerts: not [a for a in alerts if a["labels"]["alertname"] == "daily-budget"],
            timeout=60,
            what="daily-budget resolved",
        )
        hook.wait_for(lambda ms: firing(ms, "daily-budget", "resolved"), what="resolved message")
        time.sleep(2)
    finally:
        out = _stop(collector)
    messages = hook.received()
    assert len(firing(messages, "daily-budget", "firing")) == 1, out
    assert len(firing(messages, "daily-budget", "resolved")) == 1, out
    assert json.dumps(messages)  # plain JSON, Slack-compatible "text" in each
    assert all(isinstance(m["text"], str) and m["text"] for m in messages)
