"""A fake OpenAI and Anthropic inference API on 127.0.0.1, for the meter, proxy and plugin tests.

It speaks real HTTP/1.1 with keep-alive (asyncio, in a daemon thread) and answers:

- ``POST .../chat/completions`` and ``.../completions``: JSON, or SSE when ``"stream": true``,
  with the final ``include_usage`` chunk only when ``stream_options.include_usage`` is set;
- ``POST .../responses``: JSON, or SSE ending in ``response.completed`` with the usage;
- ``POST .../messages``: JSON, or SSE with ``message_start``, text deltas, two cumulative
  ``message_delta`` events (the last carries the totals) and ``message_stop``;
- ``POST .../embeddings`` and ``GET .../models``.

The usage it reports is :data:`CHAT_USAGE`, :data:`RESPONSES_USAGE` and :data:`MESSAGES_USAGE`
unless a test sets others; the model is the one the request named. Streams are sent with chunked
transfer encoding, one event per chunk. ``hold`` makes a stream send its first event, then wait
until the test sets the event (``released_by_client`` says whether it was set, or the wait timed
out), which proves that a client saw chunk 1 before the rest existed.

Run it alone for a benchmark with ``python -m tests.fakes.upstream --port 0`` (prints the port).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import gzip
import json
import ssl
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

CHAT_USAGE: dict[str, Any] = {
    "prompt_tokens": 1200,
    "completion_tokens": 300,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 200, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 50, "audio_tokens": 0},
}
"""Chat usage: 1,000 uncached + 200 cached input, 300 output."""

RESPONSES_USAGE: dict[str, Any] = {
    "input_tokens": 900,
    "input_tokens_details": {"cached_tokens": 100},
    "output_tokens": 250,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 1150,
}
"""Responses usage: 800 uncached + 100 cached input, 250 output."""

MESSAGES_USAGE: dict[str, Any] = {
    "input_tokens": 500,
    "cache_creation_input_tokens": 500,
    "cache_read_input_tokens": 1000,
    "cache_creation": {"ephemeral_5m_input_tokens": 300, "ephemeral_1h_input_tokens": 200},
    "output_tokens": 400,
    "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 0},
    "service_tier": "standard",
}
"""Messages usage: 500 uncached, 1,000 cache read, 300 5m + 200 1h writes, 400 out, 2 searches."""

TEXT = "Hello from the fake upstream, streamed in pieces."


@dataclass
class Received:
    """A request as the upstream saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeUpstream:
    """The fake API. Use as a context manager; ``url`` is its base (no ``/v1``)."""

    chat_usage: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(CHAT_USAGE))
    responses_usage: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(RESPONSES_USAGE))
    messages_usage: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(MESSAGES_USAGE))
    text: str = TEXT
    gzip_json: bool = False
    """Compress JSON bodies when the client accepts gzip."""
    hold: threading.Event | None = None
    hold_timeout_s: float = 10.0
    record: bool = True
    tls: ssl.SSLContext | None = None
    """Serve HTTPS with this server context."""
    port: int = 0
    received: list[Received] = field(default_factory=list)
    released_by_client: bool | None = None
    fail_next: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    """Statuses and bodies for the next requests, first first."""

    def __post_init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeUpstream:
        self._thread = threading.Thread(target=self._run, name="fake-upstream", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server = await asyncio.start_server(
            self._client, "127.0.0.1", self.port, backlog=1024, ssl=self.tls
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        self._server.close()
        # Closing the sockets ends each connection's task (cancelling them trips a Python 3.11
        # asyncio bug in StreamReaderProtocol).
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.sleep(0.01)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head[:-4].decode("latin-1").split("\r\n")
                method, path, _version = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                body = await reader.readexactly(length) if length else b""
                if self.record:
                    self.received.append(Received(method, path, headers, body))
                keep = await self._respond(method, path, headers, body, writer)
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except ConnectionError:
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _respond(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        writer: asyncio.StreamWriter,
    ) -> bool:
        path = path.split("?", 1)[0]
        if self.fail_next:
            status, payload = self.fail_next.pop(0)
            self._json(writer, status, payload, headers)
            return True
        request: dict[str, Any] = json.loads(body) if body else {}
        model = str(request.get("model") or "gpt-4o-mini")
        stream = bool(request.get("stream"))
        if method == "GET" and path.endswith("/models"):
            self._json(writer, 200, {"object": "list", "data": [{"id": model}]}, headers)
        elif method != "POST":
            self._json(writer, 405, {"error": {"message": "method not allowed"}}, headers)
        elif path.endswith("/chat/completions"):
            if stream:
                include = bool((request.get("stream_options") or {}).get("include_usage"))
                await self._sse(writer, self._chat_events(model, include))
            else:
                self._json(writer, 200, self._chat(model), headers)
        elif path.endswith("/responses"):
            if stream:
                await self._sse(writer, self._responses_events(model))
            else:
                self._json(writer, 200, self._response(model), headers)
        elif path.endswith("/messages"):
            if stream:
                await self._sse(writer, self._messages_events(model))
            else:
                self._json(writer, 200, self._message(model), headers)
        elif path.endswith("/embeddings"):
            self._json(
                writer,
                200,
                {
                    "object": "list",
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                    "model": model,
                    "usage": {"prompt_tokens": 42, "total_tokens": 42},
                },
                headers,
            )
        elif path.endswith("/completions"):
            self._json(writer, 200, self._completion(model), headers)
        else:
            self._json(writer, 404, {"error": {"message": f"no route {path}"}}, headers)
        await writer.drain()
        return True

    def _json(
        self, writer: asyncio.StreamWriter, status: int, obj: Any, request_headers: dict[str, str]
    ) -> None:
        data = json.dumps(obj).encode()
        extra = b""
        if self.gzip_json and "gzip" in request_headers.get("accept-encoding", ""):
            data = gzip.compress(data)
            extra = b"content-encoding: gzip\r\n"
        writer.write(
            b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"x-request-id: req_%s\r\n%s\r\n%s"
            % (status, len(data), uuid.uuid4().hex.encode(), extra, data)
        )

    async def _sse(self, writer: asyncio.StreamWriter, events: list[str]) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n"
            b"request-id: req_%s\r\n\r\n" % uuid.uuid4().hex.encode()
        )
        for i, event in enumerate(events):
            data = event.encode()
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
            if i == 0 and self.hold is not None:
                loop = asyncio.get_running_loop()
                self.released_by_client = await loop.run_in_executor(
                    None, self.hold.wait, self.hold_timeout_s
                )
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    def _words(self) -> list[str]:
        words = self.text.split(" ")
        return [w if i == 0 else " " + w for i, w in enumerate(words)]

    # OpenAI Chat Completions.

    def _chat(self, model: str) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.text, "refusal": None},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": self.chat_usage,
            "service_tier": "default",
        }

    def _completion(self, model: str) -> dict[str, Any]:
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:12]}",
            "object": "text_completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [{"index": 0, "text": self.text, "finish_reason": "stop"}],
            "usage": self.chat_usage,
        }

    def _chat_events(self, model: str, include_usage: bool) -> list[str]:
        cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            body: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": 1_700_000_000,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        events = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"content": w}) for w in self._words()]
        events.append(chunk({}, "stop"))
        if include_usage:
            final = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": 1_700_000_000,
                "model": model,
                "choices": [],
                "usage": self.chat_usage,
            }
            events.append(f"data: {json.dumps(final)}\n\n")
        events.append("data: [DONE]\n\n")
        return events

    # OpenAI Responses.

    def _response(self, model: str, rid: str = "", status: str = "completed") -> dict[str, Any]:
        return {
            "id": rid or f"resp_{uuid.uuid4().hex[:12]}",
            "object": "response",
            "created_at": 1_700_000_000,
            "status": status,
            "model": model,
            "output": [
                {
                    "type": "message",
                    "id": "msg_1",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": self.text, "annotations": []}],
                }
            ]
            if status == "completed"
            else [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": self.responses_usage if status == "completed" else None,
        }

    def _responses_events(self, model: str) -> list[str]:
        rid = f"resp_{uuid.uuid4().hex[:12]}"
        seq = iter(range(10_000))

        def event(kind: str, **body: Any) -> str:
            payload = {"type": kind, "sequence_number": next(seq), **body}
            return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

        created = self._response(model, rid, status="in_progress")
        events = [
            event("response.created", response=created),
            event("response.in_progress", response=created),
            event(
                "response.output_item.added",
                output_index=0,
                item={
                    "type": "message",
                    "id": "msg_1",
                    "status": "in_progress",
                    "role": "assistant",
                    "content": [],
                },
            ),
            event(
                "response.content_part.added",
                item_id="msg_1",
                output_index=0,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": []},
            ),
        ]
        events += [
            event(
                "response.output_text.delta",
                item_id="msg_1",
                output_index=0,
                content_index=0,
                delta=w,
                logprobs=[],
            )
            for w in self._words()
        ]
        events += [
            event(
                "response.output_text.done",
                item_id="msg_1",
                output_index=0,
                content_index=0,
                text=self.text,
                logprobs=[],
            ),
            event("response.completed", response=self._response(model, rid)),
        ]
        return events

    # Anthropic Messages.

    def _message(self, model: str) -> dict[str, Any]:
        return {
            "id": f"msg_{uuid.uuid4().hex[:12]}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": self.text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": self.messages_usage,
        }

    def _messages_events(self, model: str) -> list[str]:
        def event(kind: str, **body: Any) -> str:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **body})}\n\n"

        usage = self.messages_usage
        start_usage = {k: v for k, v in usage.items() if k != "server_tool_use"}
        start_usage["output_tokens"] = 1
        message = {
            "id": f"msg_{uuid.uuid4().hex[:12]}",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": start_usage,
        }
        half = max(int(usage.get("output_tokens", 0)) // 2, 1)
        events = [
            event("message_start", message=message),
            event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
            event("ping"),
        ]
        events += [
            event("content_block_delta", index=0, delta={"type": "text_delta", "text": w})
            for w in self._words()
        ]
        events += [
            event("content_block_stop", index=0),
            # Cumulative deltas: the first is a running total, the last the final one.
            event(
                "message_delta",
                delta={"stop_reason": None, "stop_sequence": None},
                usage={"output_tokens": half},
            ),
            event(
                "message_delta",
                delta={"stop_reason": "end_turn", "stop_sequence": None},
                usage=usage,
            ),
            event("message_stop"),
        ]
        return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    upstream = FakeUpstream(port=args.port, record=False)
    with upstream:
        print(upstream.port, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
