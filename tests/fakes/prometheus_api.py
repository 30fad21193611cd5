"""A fake Prometheus HTTP API on 127.0.0.1: a test says what each PromQL query answers.

For command-line tests (``status``, ``check``, ``report`` with ``--prometheus``) that need a
server to connect to but not a real Prometheus (``tests/fakes/prometheus_server.py`` runs the
real one). The test's function gets each instant query's PromQL and evaluation time and returns
the vector's samples as ``(labels, value)`` pairs; label endpoints answer from ``labels`` and
``label_values``. Every request is recorded in :attr:`FakePrometheusAPI.requests`.

    def answer(promql: str, at: float) -> list[tuple[dict[str, str], float]]:
        return [({}, 12.5)] if "tokentop_cost_usd_total" in promql else []

    with FakePrometheusAPI(answer) as prom:
        ...  # tokentop status --prometheus prom.url
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fakes.served import ServedInThread

Answer = Callable[[str, float], Sequence[tuple[dict[str, str], float]]]
"""PromQL and evaluation time (Unix seconds) -> the samples of the answer."""


class FakePrometheusAPI(ServedInThread):
    """``/api/v1/query``, ``/api/v1/query_range``, ``/api/v1/labels`` and
    ``/api/v1/label/<name>/values``, answered by ``answer`` and the label tables.

    Args:
        answer: the instant queries' samples (a range query repeats them at every step).
        labels: label names of the usage series (``/api/v1/labels``).
        label_values: values per label name (``/api/v1/label/<name>/values``).

    Attributes:
        flood_bytes: if not ``None``, every query is answered with a valid answer of about this
            many bytes (a label padded out): an answer too large to read.
        flood_length: whether a flood declares its ``Content-Length``; without one it ends when
            the connection closes.
    """

    def __init__(
        self,
        answer: Answer,
        *,
        labels: Sequence[str] = ("__name__", "source", "provider", "model", "kind", "priced"),
        label_values: dict[str, list[str]] | None = None,
    ) -> None:
        self.answer = answer
        self.labels = list(labels)
        self.label_values = label_values or {}
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        self.flood_bytes: int | None = None
        self.flood_length = True
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, body: Any, status: int = 200) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _flood(self, size: int, declared: bool) -> None:
                result = [{"metric": {"pad": "x" * size}, "value": [0, "1"]}]
                data = json.dumps(
                    {"status": "success", "data": {"resultType": "vector", "result": result}}
                ).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    if declared:
                        self.send_header("Content-Length", str(len(data)))
                    else:
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    self.end_headers()
                    for at in range(0, len(data), 65536):
                        self.wfile.write(data[at : at + 65536])
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading at its limit

            def _serve(self, params: dict[str, list[str]]) -> None:
                path = urlsplit(self.path).path
                fake.requests.append((path, params))
                if fake.flood_bytes is not None:
                    self._flood(fake.flood_bytes, fake.flood_length)
                    return
                try:
                    self._reply({"status": "success", "data": fake.data(path, params)})
                except Exception as exc:  # a bad query in a test: an API error, as Prometheus
                    self._reply(
                        {"status": "error", "errorType": "bad_data", "error": str(exc)}, 400
                    )

            def do_GET(self) -> None:
                self._serve(parse_qs(urlsplit(self.path).query))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                self._serve(parse_qs(self.rfile.read(length).decode()))

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def queries(self) -> list[str]:
        """The PromQL of every query received so far."""
        return [p["query"][0] for _, p in self.requests if "query" in p]

    def data(self, path: str, params: dict[str, list[str]]) -> Any:
        """The ``data`` of an answer."""
        if path == "/api/v1/labels":
            return self.labels
        if path.startswith("/api/v1/label/") and path.endswith("/values"):
            return self.label_values.get(path.split("/")[4], [])
        if path == "/api/v1/query":
            at = float(params["time"][0])
            samples = self.samples(params["query"][0], at)
            return {
                "resultType": "vector",
                "result": [{"metric": m, "value": [at, str(v)]} for m, v in samples],
            }
        if path == "/api/v1/query_range":
            start, end = float(params["start"][0]), float(params["end"][0])
            step = float(params["step"][0])
            times = [start + i * step for i in range(int((end - start) / step) + 1)]
            samples = self.samples(params["query"][0], end)
            return {
                "resultType": "matrix",
                "result": [
                    {"metric": m, "values": [[t, str(v)] for t in times]} for m, v in samples
                ],
            }
        raise ValueError(f"no such endpoint {path}")

    def samples(self, promql: str, at: float) -> list[tuple[dict[str, str], float]]:
        """The answer to ``promql``; a batch of tagged parts (``label_replace(q, "tag", "name",
        "", "") or ...``, as tokentop sends small queries) is answered part by part."""
        parts = _batch_parts(promql)
        if not parts:
            return list(self.answer(promql, at))
        out = []
        for tag, name, inner in parts:
            out += [({**labels, tag: name}, value) for labels, value in self.answer(inner, at)]
        return out


_TAGGED = re.compile(r'^label_replace\((.*), "([a-z_]+)", "([^"]*)", "", ""\)$', re.S)


def _batch_parts(promql: str) -> list[tuple[str, str, str]]:
    """(tag label, name, inner PromQL) of each part of a batch, or ``[]`` for one query."""
    parts, depth, begin = [], 0, 0
    for i, ch in enumerate(promql):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0 and promql.startswith(" or ", i):
            parts.append(promql[begin:i])
            begin = i + 4
    parts.append(promql[begin:])
    found = [_TAGGED.match(part) for part in parts]
    if not all(found):
        return []
    return [(m.group(2), m.group(3), m.group(1)) for m in found if m]
