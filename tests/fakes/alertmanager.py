"""A real Prometheus Alertmanager on 127.0.0.1 for tests, and a local webhook receiver.

Alertmanager is Debian's ``prometheus-alertmanager`` (``.ci/run`` installs it). Tests that need
it call :func:`alertmanager_binary`: outside CI a missing binary skips them with the reason
printed (on stderr, and as a warning in pytest's summary); in CI (``CI=true``) it fails them.

The :class:`WebhookReceiver` is a tiny HTTP server that keeps every JSON body POSTed to it: it
stands for Slack (tokentop's webhook) and for Alertmanager's own webhook receiver.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

BINARIES = ("prometheus-alertmanager", "alertmanager")


def alertmanager_binary() -> str:
    """The Alertmanager executable; skips (outside CI) or fails (in CI) the test without it."""
    for name in BINARIES:
        found = shutil.which(name)
        if found:
            return found
    missing = "prometheus-alertmanager is not installed (apt-get install prometheus-alertmanager)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{missing}: CI must run the tests against a real Alertmanager")
    reason = f"{missing}: the tests against a real Alertmanager are skipped"
    print(f"\nSKIPPED: {reason}", file=sys.__stderr__, flush=True)
    warnings.warn(reason, stacklevel=2)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Alertmanager:
    """A running Alertmanager; use :func:`running_alertmanager`."""

    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log

    def alerts(self, **filters: str) -> list[dict[str, Any]]:
        """``GET /api/v2/alerts``: the alerts Alertmanager holds as active (not resolved)."""
        response = httpx.get(f"{self.url}/api/v2/alerts", params=filters, timeout=5)
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()
        return result

    def named(self, alertname: str) -> list[dict[str, Any]]:
        """The active alerts called ``alertname``."""
        return [a for a in self.alerts() if a["labels"].get("alertname") == alertname]

    def wait_for(self, predicate: Any, timeout: float = 30.0, what: str = "") -> Any:
        """Poll Alertmanager's API until ``predicate(alerts)`` is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self.alerts())
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"Alertmanager: timed out waiting for {what or predicate}; it holds"
                    f" {self.alerts()}"
                )
            time.sleep(0.2)


def _config(webhook_url: str | None) -> str:
    receiver = "  - name: default\n"
    if webhook_url:
        receiver += (
            f"    webhook_configs:\n      - url: {webhook_url}\n        send_resolved: true\n"
        )
    return (
        "route:\n"
        "  receiver: default\n"
        "  group_by: [alertname]\n"
        "  group_wait: 1s\n"
        "  group_interval: 1s\n"
        "  repeat_interval: 1h\n"
        f"receivers:\n{receiver}"
    )


@contextmanager
def running_alertmanager(tmp: Path, webhook_url: str | None = None) -> Iterator[Alertmanager]:
    """Start Alertmanager on a free 127.0.0.1 port with a minimal config (and, given a URL, a
    webhook receiver that is told of resolutions too); stop it afterwards."""
    binary = alertmanager_binary()
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "alertmanager.yml"
    config.write_text(_config(webhook_url), encoding="utf-8")
    port = free_port()
    log = tmp / "alertmanager.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"Alertmanager exited ({process.returncode}): {log.read_text()[-2000:]}"
                )
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"Alertmanager not ready: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield Alertmanager(url, process, log)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 keeping every JSON body POSTed to it.

    ``fail_next`` answers that many POSTs with HTTP 500 (and does not keep them).
    """

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.fail_next = 0
        self.refused = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                with receiver._lock:
                    fail = receiver.fail_next > 0
                    if fail:
                        receiver.fail_next -= 1
                        receiver.refused += 1
                    else:
                        receiver.messages.append(json.loads(body or b"null"))
                self.send_response(500 if fail else 200)
                self.send_header("content-type", "text/plain")
                self.end_headers()
                self.wfile.write(b"no" if fail else b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook/T0/B0/secret"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def received(self) -> list[dict[str, Any]]:
        """Every message kept so far."""
        with self._lock:
            return list(self.messages)

    def wait_for(self, predicate: Any, timeout: float = 30.0, what: str = "") -> Any:
        """Wait until ``predicate(messages)`` is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self.received())
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"webhook: timed out waiting for {what or predicate}; got {self.received()}"
                )
            time.sleep(0.1)
