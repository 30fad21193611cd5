"""A fleet on loopback: a real Prometheus scraping N ``tokentop collect --demo`` exporters.

For each N (default 1, 10, 50), starts N demo collectors, each on its own database with its own
``/metrics`` port (every host's series are its own: Prometheus' ``instance`` label), and prints:

1. **Scrape size per host**: bytes of one ``/metrics`` answer (text format and OpenMetrics) and
   its samples, and what Prometheus recorded (``scrape_samples_scraped``,
   ``scrape_duration_seconds``).
2. **Exporter CPU per scrape**: the exporter process's CPU time (``/proc/PID/stat``) over a burst
   of back-to-back scrapes, less its idle CPU (its collector polls meanwhile) over as long.
3. **TUI refresh over Prometheus**: ``build_prometheus_snapshot`` (the TUI's refresh) with
   every pane visible, window 1h, p50/p95 over ``--reps`` runs after ``--duration`` seconds
   of scraping; and ``report --prometheus``'s queries (:func:`prometheus_report`) likewise.
   Twice: *under load* (the N exporters and the 1 s scraping share the machine with the
   queries, as they do on a 2-core laptop) and *quiet* (the exporters paused with SIGSTOP and
   every query evaluated at a moment just before: a Prometheus on its own machine).
   Target: a full refresh over 50 hosts at most 300 ms p95. Beside them: the requests a refresh
   sends, the CPU a quiet refresh costs Prometheus and this process (a figure that depends
   less on what else runs than the times do), and the 1-minute load average before and after.

The hosts start from one demo database made once (``collect --demo --once``: 24 h of history)
and copied, so that starting 50 of them does not mean 50 backfills; each then polls every
``--interval`` seconds. Prometheus keeps only ``--duration`` seconds of samples here, so a 1 h
window holds fewer samples than it would after an hour of scraping: the figures are a lower
bound for long-running servers (at a 1 s scrape, 2 minutes hold as many samples per series as
30 minutes at a 15 s scrape).

Usage::

    python -m bench.prometheus_bench [--hosts 1,10,50] [--duration 120] [--scrape 1s]
                                     [--interval 5] [--reps 40] [--burst 50]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.prometheus_server import PrometheusServer, find_prometheus  # noqa: E402
from tokentop.collectors.promql import PromClient  # noqa: E402
from tokentop.collectors.promsource import PromSource, prometheus_report  # noqa: E402
from tokentop.tui.snapshot import RefreshRequest  # noqa: E402
from tokentop.tui.snapshot_prometheus import build_prometheus_snapshot  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class Host:
    """One ``tokentop collect --demo --metrics-port 0`` on its own database."""

    def __init__(self, db: Path, interval: float) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "tokentop", "--db", str(db), "collect", "--demo",
                "--interval", str(interval), "--metrics-port", "0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self.url = ""
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            m = re.search(r"metrics on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()

    def wait(self, timeout: float = 120) -> str:
        if not self._ready.wait(timeout) or not self.url:
            raise RuntimeError(f"host did not serve metrics (exit {self.proc.poll()})")
        return self.url

    @property
    def target(self) -> str:
        return re.sub(r"^http://([^/]+)/.*$", r"\1", self.url)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered)) - 1))]


def seed(workdir: Path) -> Path:
    db = workdir / "seed.db"
    began = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "tokentop", "--db", str(db), "collect", "--demo", "--once"],
        check=True,
        capture_output=True,
    )
    print(f"seed database (24 h of demo history): {time.monotonic() - began:.1f} s", flush=True)
    return db


def scrape_size(url: str) -> tuple[int, int, int]:
    text = httpx.get(url, timeout=30).text
    om = httpx.get(
        url, timeout=30, headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    ).text
    samples = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    return len(text.encode()), len(om.encode()), samples


def exporter_cpu(host: Host, burst: int) -> float:
    """CPU seconds one scrape costs the exporter process (idle polling subtracted)."""
    pid = host.proc.pid
    with httpx.Client(timeout=30) as client:
        client.get(host.url)  # warm
        c0, t0 = cpu_seconds(pid), time.monotonic()
        for _ in range(burst):
            client.get(host.url)
        busy, wall = cpu_seconds(pid) - c0, time.monotonic() - t0
    c1 = cpu_seconds(pid)
    time.sleep(max(wall, 2.0))
    idle_rate = (cpu_seconds(pid) - c1) / max(wall, 2.0)
    return max(0.0, busy - idle_rate * wall) / burst


@dataclass
class Timed:
    """``reps`` full TUI refreshes and as many report query sets."""

    refresh: list[float] = field(default_factory=list)
    """Seconds of each refresh."""
    report: list[float] = field(default_factory=list)
    prom_cpu: float = 0.0
    """Prometheus' CPU seconds during the refreshes (all of its work, scraping included)."""
    client_cpu: float = 0.0
    """This process's CPU seconds during the refreshes (the client: HTTP, JSON, folding)."""
    requests: int = 0
    """HTTP requests the refreshes sent."""
    load: tuple[float, float] = (0.0, 0.0)
    """The 1-minute load average before and after."""

    def per_refresh_ms(self, seconds: float) -> float:
        return seconds / max(1, len(self.refresh)) * 1000


def _time_refreshes(
    source: PromSource, n: int, reps: int, at: datetime | None, prom_pid: int
) -> Timed:
    """``reps`` full TUI refreshes and as many report query sets (after two warm-ups),
    evaluated now or at ``at``: their times, and the CPU and requests of the refreshes."""
    out = Timed(load=(os.getloadavg()[0], 0.0))
    for i in range(reps + 2):
        now = at or datetime.now(UTC)
        calls, prom, client = source.client.calls, cpu_seconds(prom_pid), time.process_time()
        t = time.perf_counter()
        snap = build_prometheus_snapshot(source, RefreshRequest(seq=i, now=now, window="1h"))
        elapsed = time.perf_counter() - t
        if i >= 2:
            out.refresh.append(elapsed)
            out.prom_cpu += cpu_seconds(prom_pid) - prom
            out.client_cpu += time.process_time() - client
            out.requests += source.client.calls - calls
        t = time.perf_counter()
        prometheus_report(source, now - timedelta(hours=1), now)
        if i >= 2:
            out.report.append(time.perf_counter() - t)
    out.load = (out.load[0], os.getloadavg()[0])
    assert len(snap.gpu.devices) == 2 * n, len(snap.gpu.devices)
    assert snap.window_totals.requests > 0
    return out


def run(n: int, seed_db: Path, workdir: Path, args: argparse.Namespace) -> dict[str, float]:
    hosts_dir = workdir / f"n{n}"
    hosts_dir.mkdir()
    hosts = []
    began = time.monotonic()
    try:
        for i in range(n):
            db = hosts_dir / f"host{i}.db"
            shutil.copyfile(seed_db, db)
            hosts.append(Host(db, args.interval))
        for h in hosts:
            h.wait()
        print(f"N={n}: {n} exporters serving in {time.monotonic() - began:.1f} s", flush=True)
        time.sleep(args.interval + 1)  # a first poll each
        text_bytes, om_bytes, samples = scrape_size(hosts[0].url)
        cpu = exporter_cpu(hosts[0], args.burst)
        with PrometheusServer(
            workdir / f"prom{n}", [h.target for h in hosts], interval=args.scrape
        ) as prom:
            prom.wait_for("up == 1", count=n, timeout=120)
            time.sleep(args.duration)
            scraped = prom.query("avg(scrape_samples_scraped)")
            took = prom.query("avg(scrape_duration_seconds)")
            prom_samples = float(scraped[0]["value"][1]) if scraped else float("nan")  # type: ignore[index]
            prom_scrape_s = float(took[0]["value"][1]) if took else float("nan")  # type: ignore[index]
            source = PromSource(PromClient(prom.url, timeout_s=30))
            try:
                # Under load: the N exporters and Prometheus' scraping share the machine.
                pid = prom.process.pid
                loaded = _time_refreshes(source, n, args.reps, None, pid)
                # Quiet: the exporters paused (SIGSTOP), every query evaluated at a moment just
                # before, as a Prometheus on its own machine would answer it.
                at = datetime.now(UTC)
                for h in hosts:
                    h.proc.send_signal(signal.SIGSTOP)
                try:
                    quiet = _time_refreshes(source, n, args.reps, at, pid)
                finally:
                    for h in hosts:
                        h.proc.send_signal(signal.SIGCONT)
            finally:
                source.close()
        return {
            "n": n,
            "text_bytes": text_bytes,
            "om_bytes": om_bytes,
            "samples": samples,
            "prom_samples": prom_samples,
            "prom_scrape_ms": prom_scrape_s * 1000,
            "cpu_ms": cpu * 1000,
            "refresh_p50": percentile(loaded.refresh, 50) * 1000,
            "refresh_p95": percentile(loaded.refresh, 95) * 1000,
            "report_p50": percentile(loaded.report, 50) * 1000,
            "report_p95": percentile(loaded.report, 95) * 1000,
            "quiet_p50": percentile(quiet.refresh, 50) * 1000,
            "quiet_p95": percentile(quiet.refresh, 95) * 1000,
            "quiet_report_p95": percentile(quiet.report, 95) * 1000,
            "requests": loaded.requests / max(1, len(loaded.refresh)),
            "prom_cpu_ms": quiet.per_refresh_ms(quiet.prom_cpu),
            "client_cpu_ms": quiet.per_refresh_ms(quiet.client_cpu),
            "load_before": loaded.load[0],
            "load_after": quiet.load[1],
        }
    finally:
        for h in hosts:
            h.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="1,10,50", help="comma-separated N")
    parser.add_argument("--duration", type=float, default=120, help="seconds of scraping")
    parser.add_argument("--scrape", default="1s", help="Prometheus scrape interval")
    parser.add_argument("--interval", type=float, default=5.0, help="demo poll interval, s")
    parser.add_argument("--reps", type=int, default=40, help="timed refreshes per N")
    parser.add_argument("--burst", type=int, default=50, help="scrapes timed for exporter CPU")
    args = parser.parse_args()
    if find_prometheus() is None:
        sys.exit("prometheus is not installed (apt-get install -y prometheus)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tokentop-prom-bench-") as tmp:
        workdir = Path(tmp)
        seed_db = seed(workdir)
        for n in (int(x) for x in args.hosts.split(",")):
            rows.append(run(n, seed_db, workdir, args))
            r = rows[-1]
            print(
                f"N={n}: scrape {r['text_bytes']:,} B text / {r['om_bytes']:,} B OpenMetrics,"
                f" {r['samples']} samples; exporter CPU {r['cpu_ms']:.1f} ms/scrape;"
                f" TUI refresh p50 {r['refresh_p50']:.0f} ms p95 {r['refresh_p95']:.0f} ms"
                f" (quiet: p50 {r['quiet_p50']:.0f} ms p95 {r['quiet_p95']:.0f} ms);"
                f" {r['requests']:.0f} requests, CPU per refresh (quiet): Prometheus"
                f" {r['prom_cpu_ms']:.0f} ms, client {r['client_cpu_ms']:.0f} ms;"
                f" load average {r['load_before']:.1f} -> {r['load_after']:.1f}",
                flush=True,
            )
    print()
    print(
        f"{'N':>3} {'text B':>8} {'OM B':>8} {'samples':>7} {'prom samples':>12}"
        f" {'prom scrape':>11} {'CPU/scrape':>10} {'refresh p50/p95':>16} {'report p50/p95':>15}"
        f" {'quiet refresh':>14} {'quiet report p95':>16} {'requests':>8}"
        f" {'CPU prom/client':>15} {'load':>10}"
    )
    for r in rows:
        print(
            f"{r['n']:>3} {r['text_bytes']:>8,} {r['om_bytes']:>8,} {r['samples']:>7}"
            f" {r['prom_samples']:>12.0f} {r['prom_scrape_ms']:>9.1f}ms {r['cpu_ms']:>8.1f}ms"
            f" {r['refresh_p50']:>7.0f}/{r['refresh_p95']:<4.0f}ms"
            f" {r['report_p50']:>7.0f}/{r['report_p95']:<4.0f}ms"
            f" {r['quiet_p50']:>6.0f}/{r['quiet_p95']:<4.0f}ms {r['quiet_report_p95']:>14.0f}ms"
            f" {r['requests']:>8.0f} {r['prom_cpu_ms']:>8.0f}/{r['client_cpu_ms']:<4.0f}ms"
            f" {r['load_before']:>4.1f}->{r['load_after']:<4.1f}"
        )
    largest = max(rows, key=lambda r: r["n"])
    for key, what in (("refresh_p95", "under load"), ("quiet_p95", "quiet")):
        worst = largest[key]
        verdict = "PASS" if worst <= 300 else "FAIL"
        print(
            f"full TUI refresh over {largest['n']:.0f} hosts, {what}: p95 {worst:.0f} ms"
            f" (target <= 300 ms): {verdict}"
        )
    print(f"after {args.duration:.0f} s of scraping every {args.scrape}")


if __name__ == "__main__":
    main()
