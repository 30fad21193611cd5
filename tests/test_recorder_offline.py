"""Metered requests are never lost: a tokenizer that cannot be downloaded, a shutdown under load,
a database that cannot be written."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tiktoken
import tiktoken.load

from tests.fakes.upstream import FakeUpstream
from tests.test_meter import BOOK, T0
from tokentop.collectors.meter import CHAT, Exchange, Recorder
from tokentop.pricing import tokens
from tokentop.store.db import Store

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "SECRET-PROMPT " + "x" * 40
PROMPT_BODY = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}
).encode()


def _estimated(i: int) -> Exchange:
    """A stream that reported no usage: its tokens must be estimated."""
    delta = {"model": "gpt-4o-mini", "choices": [{"delta": {"content": "hello there"}}]}
    return Exchange(
        api=CHAT,
        provider="openai",
        ts=T0,
        request_body=PROMPT_BODY,
        request_id=f"estimated-{i}",
        status=200,
        sse=True,
        text_events=[json.dumps(delta).encode()],
        complete=True,
    )


def _exact(i: int) -> Exchange:
    body = {"model": "gpt-4o-mini", "usage": {"prompt_tokens": 10, "completion_tokens": 5}}
    return Exchange(
        api=CHAT,
        provider="openai",
        ts=T0,
        request_body=PROMPT_BODY,
        request_id=f"exact-{i}",
        status=200,
        body=json.dumps(body).encode(),
        complete=True,
    )


def _rows(db_path: Path) -> dict[str, int]:
    with Store(db_path) as store:
        return {r[0]: r[1] for r in store.query("SELECT request_id, estimated FROM request")}


@pytest.fixture
def no_tokenizer_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENTOP_OFFLINE")
    monkeypatch.setattr(tokens, "_cache", {})


@pytest.mark.usefixtures("no_tokenizer_cache")
def test_exact_usage_never_waits_behind_an_estimate(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    def hung_download(name: str) -> object:
        release.wait(30)
        raise OSError("offline")

    monkeypatch.setattr(tiktoken, "get_encoding", hung_download)
    recorder = Recorder(db_path, BOOK, health_name="", flush_interval_s=0.01)
    try:
        recorder(_estimated(0))  # its estimate waits for the (hung) tokenizer download
        for i in range(3):
            recorder(_exact(i))
        deadline = time.monotonic() + 5
        while len(_rows(db_path)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _rows(db_path) == {"exact-0": 0, "exact-1": 0, "exact-2": 0}
        started = time.monotonic()
        recorder.close()  # the estimate stops waiting and is written with the fallback
        assert time.monotonic() - started < 3
    finally:
        release.set()
    assert _rows(db_path) == {"exact-0": 0, "exact-1": 0, "exact-2": 0, "estimated-0": 1}
    assert recorder.written == 4


@pytest.mark.usefixtures("no_tokenizer_cache")
def test_unavailable_tokenizer_is_tried_once(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # TIKTOKEN_CACHE_DIR is an empty folder (conftest), and the download fails at once, offline.
    fetched: list[str] = []

    def no_network(blobpath: str) -> bytes:
        fetched.append(blobpath)
        raise OSError("no network in tests")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    recorder = Recorder(db_path, BOOK, health_name="", flush_interval_s=0.01)
    started = time.monotonic()
    for i in range(400):
        recorder(_estimated(i))
    assert recorder.flush(30)
    elapsed = time.monotonic() - started
    recorder.close()
    rows = _rows(db_path)
    assert len(rows) == 400 and set(rows.values()) == {1}
    assert len(fetched) == 1  # one try, remembered
    assert elapsed < 10


def test_unwritable_database_spills_and_the_next_recorder_imports(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def locked(self: Store, batch: object) -> None:
        raise OSError("database is locked")

    recorder = Recorder(db_path, BOOK, health_name="", flush_interval_s=0.01)
    with monkeypatch.context() as m:
        m.setattr(Store, "write_batch", locked)
        for i in range(5):
            recorder(_exact(i))
        recorder.close()
    assert (recorder.written, recorder.spilled, recorder.dropped) == (0, 5, 0)
    spill = recorder.spill_path
    assert spill.parent == db_path.parent and spill.exists()
    assert PROMPT.encode() not in spill.read_bytes()  # the request's text is never kept

    second = Recorder(db_path, BOOK, health_name="", flush_interval_s=0.01)
    assert second.flush()
    second.close()
    assert second.imported == 5
    assert not spill.exists() and not list(db_path.parent.glob("*.importing"))
    with Store(db_path) as store:
        rows = store.query("SELECT COUNT(*), SUM(cost_nano) FROM request")[0]
    assert tuple(rows) == (5, 5 * (10 * 150 + 5 * 600))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=["refused", "silent"])
def offline_proxy(request: pytest.FixtureRequest) -> Iterator[str]:
    """Where tiktoken's download goes: a closed port, or one that accepts and never answers
    (a download that hangs, as a DNS lookup does on a host without network)."""
    if request.param == "refused":
        yield f"http://127.0.0.1:{_closed_port()}"
        return
    with socket.create_server(("127.0.0.1", 0), backlog=16) as silent:
        yield f"http://127.0.0.1:{silent.getsockname()[1]}"


def test_proxy_offline_then_sigterm_records_every_request(
    db_path: Path, tmp_path: Path, offline_proxy: str
) -> None:
    """400 streams without usage, no network, no TOKENTOP_OFFLINE, then SIGTERM: all recorded.

    Kept offline this way: tiktoken finds no cached encoding (an empty TIKTOKEN_CACHE_DIR) and
    downloads through ``requests``, which the proxy variables send to 127.0.0.1 (a closed port,
    or a socket that never answers), so nothing leaves the host and no name is looked up.
    """
    env = {k: v for k, v in os.environ.items() if k != "TOKENTOP_OFFLINE"}
    env["TIKTOKEN_CACHE_DIR"] = str(tmp_path / "empty-tiktoken-cache")
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
        env[name] = env[name.lower()] = offline_proxy
    env["NO_PROXY"] = env["no_proxy"] = ""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with FakeUpstream(record=False) as up:
        command = [sys.executable, "-m", "tokentop", "--db", str(db_path), "proxy"]
        command += ["--port", "0", "--upstream-openai", up.url, "--upstream-anthropic", up.url]
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            assert "listening on http://127.0.0.1:" in line, line
            url = line.split("listening on ", 1)[1].split()[0]
            statuses: list[int] = []

            def client() -> None:
                with httpx.Client(base_url=url, trust_env=False) as c:
                    for _ in range(50):
                        r = c.post("/v1/chat/completions", json=body)
                        statuses.append(r.status_code)

            threads = [threading.Thread(target=client) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            proc.send_signal(signal.SIGTERM)  # at once: estimates may still be queued
            assert proc.wait(120) == 0
            rest = proc.stderr.read()
        finally:
            proc.kill()
            proc.wait()
    assert statuses == [200] * 400
    assert "tokentop proxy stopped: 400 requests, 400 recorded" in rest, rest
    with Store(db_path) as store:
        assert tuple(store.query("SELECT COUNT(*), SUM(estimated) FROM request")[0]) == (400, 400)


def test_proxy_refuses_a_database_it_cannot_write(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tokentop", "--db", str(tmp_path), "proxy", "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"tokentop: error: --db: cannot write {tmp_path}")
