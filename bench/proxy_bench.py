"""The metering proxy's added latency and throughput on loopback, against the upstream direct.

Starts the fake upstream (``tests/fakes/upstream.py``) and ``tokentop proxy`` (recording to a
temporary database, as in real use) as separate processes, then, from this process and in the
same run:

1. **Latency**: sequential requests over one keep-alive connection, alternating blocks sent
   directly and through the proxy so that drift hits both alike. p50 and p99 of each; the added
   latency is proxy minus direct. Two kinds: a JSON chat completion, and an SSE stream (11
   chunks, with the final usage chunk) timed to its last byte.
2. **Throughput**: ``--concurrency`` keep-alive connections sending JSON chat completions for
   ``--seconds``, directly and then through the proxy; requests per second, and the CPU time
   per request of the proxy's threads (its event loop, the recorder that parses, prices and
   writes) and of the upstream. The load generator, the upstream and the proxy share this
   machine's CPUs, so on a small machine the rates say more about the machine than the proxy:
   the proxy's own ceiling is printed as ``1 / its CPU per request``, the rate its threads (one
   GIL) could reach with a core to themselves.

Then checks that the proxy recorded every request it metered. Prints figures, ratios and the
load average (other processes on the machine skew every figure).

Usage::

    python bench/proxy_bench.py [--requests 2000] [--concurrency 32] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WARM_UP = 200
CHAT = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello."}]}
).encode()
STREAM = json.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello."}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
).encode()


def request_bytes(port: int, body: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n"
        b"authorization: Bearer sk-bench\r\ncontent-type: application/json\r\n"
        b"accept: application/json\r\ncontent-length: %d\r\n\r\n%s" % (port, len(body), body)
    )


class Conn:
    """A blocking keep-alive HTTP/1.1 client connection with just enough parsing."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        self.buf += data

    def _until(self, marker: bytes) -> bytes:
        while True:
            i = self.buf.find(marker)
            if i >= 0:
                out, self.buf = self.buf[: i + len(marker)], self.buf[i + len(marker) :]
                return out
            self._fill()

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def request(self, data: bytes) -> int:
        self.sock.sendall(data)
        head = self._until(b"\r\n\r\n").lower()
        status = int(head.split(b" ", 2)[1])
        m = re.search(rb"content-length: *(\d+)", head)
        if m:
            self._exactly(int(m.group(1)))
        else:  # chunked
            while True:
                size = int(self._until(b"\r\n").split(b";")[0], 16)
                self._exactly(size + 2)
                if size == 0:
                    break
        return status


def start(
    cmd: list[str], pattern: bytes, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    stream = proc.stdout if pattern == b"" else proc.stderr
    assert stream is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        m = re.search(pattern + rb"(\d+)", line)
        if m:
            return proc, int(m.group(1))
    proc.kill()
    raise SystemExit(f"could not start {' '.join(cmd)}")


def latency(ports: dict[str, int], body: bytes, n: int, block: int = 100) -> dict[str, list[float]]:
    conns = {k: Conn(p) for k, p in ports.items()}
    reqs = {k: request_bytes(p, body) for k, p in ports.items()}
    for k in ports:
        for _ in range(WARM_UP):
            conns[k].request(reqs[k])
    out: dict[str, list[float]] = {k: [] for k in ports}
    clock = time.perf_counter
    for _ in range(max(n // block, 1)):
        for k in ports:
            conn, req, samples = conns[k], reqs[k], out[k]
            for _ in range(block):
                t = clock()
                status = conn.request(req)
                samples.append((clock() - t) * 1e6)
                assert status == 200, status
    return out


async def throughput(port: int, concurrency: int, seconds: float) -> int:
    req = request_bytes(port, CHAT)
    done = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < stop:
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            m = re.search(rb"content-length: *(\d+)", head.lower())
            assert m is not None
            await reader.readexactly(int(m.group(1)))
            done += 1
        writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of the main thread of ``pid`` (the proxy's event loop) and of its other
    threads together (the recorder, and the estimator when a response has no usage)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = "event loop" if task.name == str(pid) else "recorder"
        seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        out[name] = out.get(name, 0.0) + seconds
    return out


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description="metering proxy latency and throughput")
    parser.add_argument("--requests", type=int, default=2000, help="latency samples per kind")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput run")
    args = parser.parse_args()

    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENTOP_OFFLINE": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="tokentop-bench-"))
    db = tmp / "bench.db"
    upstream, up_port = start(
        [sys.executable, "-m", "tests.fakes.upstream", "--port", "0"], b"", env
    )
    proxy, px_port = start(
        [
            sys.executable,
            "-m",
            "tokentop",
            "--db",
            str(db),
            "proxy",
            "--port",
            "0",
            "--upstream-openai",
            f"http://127.0.0.1:{up_port}",
            "--upstream-anthropic",
            f"http://127.0.0.1:{up_port}",
        ],
        rb"listening on http://127\.0\.0\.1:",
        env,
    )
    sent = 0
    try:
        print(f"CPUs: {os.cpu_count()}  Python {sys.version.split()[0]}  loopback")
        print(f"load average at start: {load()}")
        ports = {"direct": up_port, "proxy": px_port}
        for kind, body in (("JSON chat completion", CHAT), ("SSE stream (11 chunks)", STREAM)):
            res = latency(ports, body, args.requests)
            sent += len(res["proxy"]) + WARM_UP
            d50, d99 = pct(res["direct"], 50), pct(res["direct"], 99)
            p50, p99 = pct(res["proxy"], 50), pct(res["proxy"], 99)
            print(f"\nlatency, {kind}: {len(res['proxy'])} sequential requests each")
            print(f"  direct          p50 {d50:8.0f} us   p99 {d99:8.0f} us")
            print(f"  through proxy   p50 {p50:8.0f} us   p99 {p99:8.0f} us")
            mean_added = statistics.mean(res["proxy"]) - statistics.mean(res["direct"])
            print(
                f"  added           p50 {p50 - d50:8.0f} us   p99 {p99 - d99:8.0f} us"
                f"   (ratio p50 {p50 / d50:.2f}x, p99 {p99 / d99:.2f}x;"
                f" mean added {mean_added:.0f} us)"
            )

        print(f"\nthroughput: {args.concurrency} keep-alive connections, {args.seconds:g} s each")
        up0 = cpu_seconds(upstream.pid)
        direct = asyncio.run(throughput(up_port, args.concurrency, args.seconds))
        up1 = cpu_seconds(upstream.pid)
        cpu0, threads0 = cpu_seconds(proxy.pid), thread_cpu_seconds(proxy.pid)
        via = asyncio.run(throughput(px_port, args.concurrency, args.seconds))
        sent += via
        cpu1, threads1 = cpu_seconds(proxy.pid), thread_cpu_seconds(proxy.pid)
        rd, rp = direct / args.seconds, via / args.seconds
        print(f"  direct          {rd:8.0f} req/s")
        print(f"  through proxy   {rp:8.0f} req/s   (ratio {rp / rd:.2f}x)")
        print(
            f"  proxy CPU       {(cpu1 - cpu0) / via * 1e6:8.0f} us per request (recorder included)"
        )
        per = {
            name: (threads1[name] - threads0.get(name, 0.0)) / via * 1e6
            for name in threads1
            if threads1[name] - threads0.get(name, 0.0) > 0
        }
        for name, us in sorted(per.items(), key=lambda kv: -kv[1]):
            print(f"    {name:<13} {us:8.0f} us per request")
        print(f"  upstream CPU    {(up1 - up0) / direct * 1e6:8.0f} us per request (direct run)")
        bound = sum(per.values())
        if bound:
            print(
                f"  proxy ceiling   {1e6 / bound:8.0f} req/s   (1 / its CPU per request: what its"
                " threads, one GIL, reach on a core of their own)"
            )
        print(f"load average at end: {load()}")
    finally:
        proxy.send_signal(signal.SIGINT)
        try:
            proxy.wait(30)
        except subprocess.TimeoutExpired:
            proxy.kill()
        upstream.kill()
        upstream.wait()
    with sqlite3.connect(db) as conn:
        recorded = conn.execute("SELECT COUNT(*) FROM request").fetchone()[0]
        tokens = conn.execute("SELECT SUM(input_uncached), SUM(output) FROM request").fetchone()
    print(
        f"\nsent {sent:,} requests through the proxy; it recorded {recorded:,}"
        f" ({tokens[0]:,} input and {tokens[1]:,} output tokens)"
    )


if __name__ == "__main__":
    main()
