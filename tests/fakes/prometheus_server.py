"""A real Prometheus server on loopback, for the tests and benchmarks that need one.

Not a fake: it runs the ``prometheus`` binary (Debian's ``prometheus`` package; ``.ci/run``
installs it) with its own configuration, a throw-away TSDB folder and a free loopback port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

BINARY_ENV = "TOKENTOP_PROMETHEUS_BIN"
"""Names the binary when it is not ``prometheus`` on the PATH."""


def find_prometheus() -> str | None:
    """The Prometheus binary, or ``None`` when it is not installed."""
    named = os.environ.get(BINARY_ENV)
    if named:
        return named if Path(named).exists() else None
    return shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )


def require_prometheus() -> str:
    """The binary; without one, skip the test with a printed reason, or fail it in CI."""
    import pytest

    binary = find_prometheus()
    if binary is not None:
        return binary
    reason = (
        "Prometheus is not installed: `apt-get install -y prometheus` (or set"
        f" {BINARY_ENV}) to run the tests against a real server"
    )
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI: {reason}")
    print(f"\nSKIPPED: {reason}", file=sys.__stderr__, flush=True)
    pytest.skip(reason)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (free when asked; a race is possible but rare)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_config(
    targets: Sequence[str], *, interval: str = "1s", rule_files: Sequence[Path] = ()
) -> str:
    """A ``prometheus.yml`` scraping ``targets`` (``host:port``) as job ``tokentop``."""
    lines = [
        "global:",
        f"  scrape_interval: {interval}",
        f"  evaluation_interval: {interval}",
    ]
    if rule_files:
        lines.append("rule_files:")
        lines += [f"  - {p}" for p in rule_files]
    lines += [
        "scrape_configs:",
        "  - job_name: tokentop",
        f"    scrape_timeout: {interval}",
        "    static_configs:",
        "      - targets:",
    ]
    lines += [f"          - {t}" for t in targets]
    return "\n".join(lines) + "\n"


class PrometheusServer:
    """Starts Prometheus scraping ``targets`` every ``interval``; ``stop()`` ends it.

    Args:
        workdir: a folder for the configuration, the TSDB and the log.
        targets: ``host:port`` of each exporter.
        interval: scrape and rule evaluation interval.
        binary: the ``prometheus`` executable (default: :func:`find_prometheus`).
    """

    def __init__(
        self,
        workdir: Path,
        targets: Sequence[str],
        *,
        interval: str = "1s",
        binary: str | None = None,
        rule_files: Sequence[Path] = (),
    ) -> None:
        self.workdir = workdir
        self.binary = binary or find_prometheus() or "prometheus"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "prometheus.yml"
        self.config.write_text(
            scrape_config(targets, interval=interval, rule_files=rule_files), encoding="utf-8"
        )
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready(30.0)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready after {timeout} s: {self.log()}")

    def log(self) -> str:
        """The server's log so far (its last 2,000 characters)."""
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-2000:]

    def query(self, promql: str) -> list[dict[str, object]]:
        """An instant query's result list (test convenience)."""
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10).json()
        assert body["status"] == "success", body
        result = body["data"]["result"]
        assert isinstance(result, list)
        return result

    def wait_for(self, promql: str, count: int = 1, timeout: float = 60.0) -> None:
        """Wait until an instant query returns at least ``count`` series."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.query(promql)) >= count:
                return
            time.sleep(0.25)
        raise AssertionError(f"{promql!r} gave fewer than {count} series in {timeout} s")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._log.close()

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
