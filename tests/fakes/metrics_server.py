"""Fake inference servers' Prometheus ``/metrics`` on 127.0.0.1, for tests and end-to-end runs.

One :class:`MetricsServer` speaks one kind (``vllm``, ``sglang``, ``tgi``, ``llamacpp``,
``triton``) with the metric names of the research notes, for one or more models. Its counters move
by hand (:meth:`MetricsServer.advance`), or with wall time at a steady :class:`Traffic` rate, and
can be reset as if the server restarted. Faults: a status code, a raw body, a delay.

    with MetricsServer("vllm", traffic=Traffic(good_per_s=10, aborted_per_s=2)) as server:
        ...  # point an InferenceCollector (or a config's [[inference]] url) at server.url

From a shell (prints the URL, serves until killed)::

    python -m tests.fakes.metrics_server --kind vllm --good-per-s 10 --aborted-per-s 2
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

from tests.fakes.served import ServedInThread

KINDS = ("vllm", "sglang", "tgi", "llamacpp", "triton")


@dataclass
class Traffic:
    """A steady load per model: requests per second and tokens per request."""

    good_per_s: float = 10.0
    aborted_per_s: float = 0.0
    errored_per_s: float = 0.0
    prompt_tokens_per_request: int = 200
    generation_tokens_per_request: int = 50


@dataclass
class _Model:
    stop: float = 0
    length: float = 0
    abort: float = 0
    error: float = 0
    prompt: float = 0
    generation: float = 0
    created: float = field(default_factory=time.time)


class MetricsServer(ServedInThread):
    """A threaded HTTP server on ``127.0.0.1`` serving one kind's ``/metrics``.

    Args:
        kind: which server to imitate.
        models: model names, one label set each (llama.cpp and TGI expose no model label, so
            their counters are the sums over models).
        traffic: if given, counters also grow with wall time at this rate (per model).
        engines: vLLM data-parallel engines per model (``engine`` label), splitting the counts.

    Attributes:
        status: the HTTP status to answer (200).
        body: if not ``None``, served as is instead of the metrics.
        delay_s: seconds to wait before answering.
        flood_bytes: if not ``None``, the metrics followed by comment lines up to this many
            bytes (a body too large to read).
        flood_length: whether a flood declares its ``Content-Length``; without one it ends when
            the connection closes.
        scrapes: requests served so far.
    """

    def __init__(
        self,
        kind: str = "vllm",
        *,
        models: tuple[str, ...] = ('meta-llama/Llama-3.1-8B-Instruct "q4"',),
        traffic: Traffic | None = None,
        engines: int = 1,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.models = {name: [_Model() for _ in range(engines)] for name in models}
        self.traffic = traffic
        self.status = 200
        self.body: str | None = None
        self.delay_s = 0.0
        self.flood_bytes: int | None = None
        self.flood_length = True
        self.scrapes = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._last = time.monotonic()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True

    @property
    def url(self) -> str:
        """The metrics URL, ``http://127.0.0.1:<port>/metrics``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/metrics"

    def stop(self) -> None:
        self._stopping.set()
        super().stop()

    def advance(
        self,
        good: int = 0,
        *,
        length: int = 0,
        aborted: int = 0,
        errored: int = 0,
        prompt_tokens: int = 0,
        generation_tokens: int = 0,
        model: str | None = None,
    ) -> None:
        """Count requests and tokens, for one model or (``model=None``) for each model.

        ``good`` finish with "stop" and ``length`` with "length" (both are served inferences);
        ``aborted`` and ``errored`` are not. Aborted requests' prompt tokens are counted only
        if passed in ``prompt_tokens``.
        """
        amounts = {
            "stop": good,
            "length": length,
            "abort": aborted,
            "error": errored,
            "prompt": prompt_tokens,
            "generation": generation_tokens,
        }
        with self._lock:
            for name, engines in self.models.items():
                if model is not None and name != model:
                    continue
                for key, amount in amounts.items():
                    # Whole counts per engine, the remainder to the first ones.
                    each, extra = divmod(amount, len(engines))
                    for i, m in enumerate(engines):
                        setattr(m, key, getattr(m, key) + each + (1 if i < extra else 0))

    def reset(self) -> None:
        """Every counter back to zero, as after a restart (new ``_created`` times)."""
        with self._lock:
            now = time.time()
            for engines in self.models.values():
                for i in range(len(engines)):
                    engines[i] = _Model(created=now + 1)

    def totals(self) -> dict[str, int]:
        """Current counter totals over every model: stop, length, abort, error, prompt,
        generation."""
        with self._lock:
            self._flow()
            out: dict[str, float] = {}
            for engines in self.models.values():
                for m in engines:
                    for key in ("stop", "length", "abort", "error", "prompt", "generation"):
                        out[key] = out.get(key, 0) + getattr(m, key)
            return {k: round(v) for k, v in out.items()}

    def render(self) -> str:
        """The current exposition text."""
        with self._lock:
            self._flow()
            return _RENDERERS[self.kind](self)

    def _flow(self) -> None:
        now = time.monotonic()
        elapsed, self._last = now - self._last, now
        t = self.traffic
        if t is None or elapsed <= 0:
            return
        for engines in self.models.values():
            share = elapsed / len(engines)
            for m in engines:
                served = t.good_per_s * share
                m.stop += served
                m.abort += t.aborted_per_s * share
                m.error += t.errored_per_s * share
                m.prompt += (served + t.aborted_per_s * share) * t.prompt_tokens_per_request
                m.generation += served * t.generation_tokens_per_request

    def _series(self) -> list[tuple[str, str, _Model]]:
        """(model name, engine index, counters) for every label set."""
        return [
            (name, str(i), m)
            for name, engines in self.models.items()
            for i, m in enumerate(engines)
        ]

    def _summed(self) -> _Model:
        total = _Model(created=min(m.created for _, _, m in self._series()))
        for _, _, m in self._series():
            for key in ("stop", "length", "abort", "error", "prompt", "generation"):
                setattr(total, key, getattr(total, key) + getattr(m, key))
        return total


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _n(value: float) -> str:
    # prometheus_client prints floats (1.0, 1.2e+06); keep whole counts whole.
    return repr(float(int(value)))


def _vllm(server: MetricsServer) -> str:
    lines = [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
    ]
    for name, engine, _ in server._series():
        lines.append(
            f'vllm:num_requests_running{{engine="{engine}",model_name="{_esc(name)}"}} 3.0'
        )
    lines += [
        "# HELP vllm:request_success_total Count of successfully processed requests.",
        "# TYPE vllm:request_success_total counter",
    ]
    for name, engine, m in server._series():
        for reason in ("stop", "length", "abort", "error"):
            labels = f'engine="{engine}",finished_reason="{reason}",model_name="{_esc(name)}"'
            lines.append(f"vllm:request_success_total{{{labels}}} {_n(getattr(m, reason))}")
            lines.append(f"vllm:request_success_created{{{labels}}} {m.created}")
    for metric, attr, doc in (
        ("prompt_tokens", "prompt", "Number of prefill tokens processed."),
        ("generation_tokens", "generation", "Number of generation tokens processed."),
    ):
        lines += [f"# HELP vllm:{metric}_total {doc}", f"# TYPE vllm:{metric}_total counter"]
        for name, engine, m in server._series():
            labels = f'engine="{engine}",model_name="{_esc(name)}"'
            lines.append(f"vllm:{metric}_total{{{labels}}} {_n(getattr(m, attr))}")
            lines.append(f"vllm:{metric}_created{{{labels}}} {m.created}")
    lines += [
        "# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.",
        "# TYPE vllm:e2e_request_latency_seconds histogram",
    ]
    for name, engine, m in server._series():
        labels = f'engine="{engine}",model_name="{_esc(name)}"'
        done = int(m.stop + m.length)
        for le in ("0.3", "1.0", "5.0", "+Inf"):
            lines.append(f'vllm:e2e_request_latency_seconds_bucket{{{labels},le="{le}"}} {done}.0')
        lines.append(f"vllm:e2e_request_latency_seconds_count{{{labels}}} {done}.0")
        lines.append(f"vllm:e2e_request_latency_seconds_sum{{{labels}}} {done * 0.8}")
    lines.append(
        'vllm:cache_config_info{block_size="16",cache_dtype="auto",'
        'prefix_caching="True \\\\ on"} 1.0'
    )
    return "\n".join(lines) + "\n"


def _sglang(server: MetricsServer) -> str:
    lines: list[str] = []
    for name, engine, m in server._series():
        base = f'engine_type="unified",model_name="{_esc(name)}",pp_rank="0",tp_rank="{engine}"'
        # SGLang finishes errors as aborts (FINISH_ABORT), and counts an aborted request that
        # reached the scheduler in num_requests_total too (unconfirmed; see the collector).
        finished = m.stop + m.length + m.error + m.abort
        aborted = m.abort + m.error
        lines += [
            "# HELP sglang:num_requests_total Number of requests processed.",
            "# TYPE sglang:num_requests_total counter",
            f'sglang:num_requests_total{{{base},is_streaming="false"}} {_n(finished)}',
            "# HELP sglang:num_aborted_requests_total Number of requests aborted.",
            "# TYPE sglang:num_aborted_requests_total counter",
            f"sglang:num_aborted_requests_total{{{base}}} {_n(aborted)}",
            "# TYPE sglang:prompt_tokens_total counter",
            f'sglang:prompt_tokens_total{{{base},is_streaming="false"}} {_n(m.prompt)}',
            "# TYPE sglang:generation_tokens_total counter",
            f'sglang:generation_tokens_total{{{base},is_streaming="false"}} {_n(m.generation)}',
            "# TYPE sglang:realtime_tokens_total counter",
            f'sglang:realtime_tokens_total{{{base},mode="decode"}} {_n(m.generation)}',
            "# TYPE sglang:num_running_reqs gauge",
            f"sglang:num_running_reqs{{{base}}} 2.0",
            "# TYPE sglang:token_usage gauge",
            f"sglang:token_usage{{{base}}} 0.28",
        ]
    return "\n".join(lines) + "\n"


def _histogram(name: str, total: float, count: float) -> list[str]:
    lines = [f"# TYPE {name} histogram"]
    for le in ("1", "10", "100", "1000", "+Inf"):
        lines.append(f'{name}_bucket{{le="{le}"}} {int(count)}')
    lines += [f"{name}_sum {int(total)}", f"{name}_count {int(count)}"]
    return lines


def _tgi(server: MetricsServer) -> str:
    m = server._summed()
    served = m.stop + m.length
    everything = served + m.abort + m.error
    lines = [
        "# TYPE tgi_request_count counter",
        f"tgi_request_count {int(everything)}",
        "# TYPE tgi_request_success counter",
        f"tgi_request_success {int(served)}",
        "# TYPE tgi_request_failure counter",
        f'tgi_request_failure{{err="generation"}} {int(m.error)}',
        f'tgi_request_failure{{err="incomplete"}} {int(m.abort)}',
        "# TYPE tgi_queue_size gauge",
        "tgi_queue_size 0",
    ]
    lines += _histogram("tgi_request_input_length", m.prompt, everything)
    lines += _histogram("tgi_request_generated_tokens", m.generation, served)
    return "\n".join(lines) + "\n"


def _llamacpp(server: MetricsServer) -> str:
    m = server._summed()
    return (
        "\n".join(
            [
                "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.",
                "# TYPE llamacpp:prompt_tokens_total counter",
                f"llamacpp:prompt_tokens_total {int(m.prompt)}",
                "# TYPE llamacpp:prompt_seconds_total counter",
                f"llamacpp:prompt_seconds_total {m.prompt / 2000:.3f}",
                "# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.",
                "# TYPE llamacpp:tokens_predicted_total counter",
                f"llamacpp:tokens_predicted_total {int(m.generation)}",
                "# TYPE llamacpp:tokens_predicted_seconds_total counter",
                f"llamacpp:tokens_predicted_seconds_total {m.generation / 50:.3f}",
                "# TYPE llamacpp:n_decode_total counter",
                f"llamacpp:n_decode_total {int(m.generation)}",
                "# TYPE llamacpp:requests_processing gauge",
                "llamacpp:requests_processing 1",
                "# TYPE llamacpp:requests_deferred gauge",
                "llamacpp:requests_deferred 0",
            ]
        )
        + "\n"
    )


def _triton(server: MetricsServer) -> str:
    lines = [
        "# HELP nv_inference_request_success Number of successful inference requests",
        "# TYPE nv_inference_request_success counter",
    ]
    for name, engine, m in server._series():
        labels = f'model="{_esc(name)}",version="{int(engine) + 1}"'
        lines.append(f"nv_inference_request_success{{{labels}}} {int(m.stop + m.length)}")
    lines.append("# TYPE nv_inference_request_failure counter")
    for name, engine, m in server._series():
        labels = f'model="{_esc(name)}",version="{int(engine) + 1}"'
        lines.append(f"nv_inference_request_failure{{{labels}}} {int(m.abort + m.error)}")
    lines.append("# TYPE nv_inference_count counter")
    for name, engine, m in server._series():
        labels = f'model="{_esc(name)}",version="{int(engine) + 1}"'
        lines.append(f"nv_inference_count{{{labels}}} {int(m.stop + m.length)}")
    lines += [
        "# TYPE nv_gpu_utilization gauge",
        'nv_gpu_utilization{gpu_uuid="GPU-00000000-0000-0000-0000-000000000000"} 0.5',
        "# TYPE nv_energy_consumption counter",
        'nv_energy_consumption{gpu_uuid="GPU-00000000-0000-0000-0000-000000000000"} 1.5e+06',
    ]
    return "\n".join(lines) + "\n"


_RENDERERS = {
    "vllm": _vllm,
    "sglang": _sglang,
    "tgi": _tgi,
    "llamacpp": _llamacpp,
    "triton": _triton,
}


def _handler(server: MetricsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version: ClassVar[str] = "HTTP/1.1"  # type: ignore[misc]

        def do_GET(self) -> None:
            with server._lock:
                server.scrapes += 1
            if server.delay_s:
                server._stopping.wait(server.delay_s)
            if self.path.split("?")[0] != "/metrics":
                self._send(404, "not found\n")
            elif server.flood_bytes is not None:
                self._flood(server.render().encode(), server.flood_bytes, server.flood_length)
            elif server.body is not None:
                self._send(server.status, server.body)
            else:
                self._send(server.status, server.render())

        def _send(self, status: int, text: str) -> None:
            data = text.encode("utf-8")
            try:
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout test)

        def _flood(self, head: bytes, size: int, declared: bool) -> None:
            line = b"# " + b"x" * 1021 + b"\n"
            tail = b"# end\n"
            lines = max(0, size - len(head) - len(tail)) // len(line)
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                if declared:
                    length = len(head) + lines * len(line) + len(tail)
                    self.send_header("Content-Length", str(length))
                else:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(head)
                for _ in range(lines):
                    self.wfile.write(line)
                self.wfile.write(tail)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading at its limit

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def main(argv: list[str] | None = None) -> int:
    """Serve one fake endpoint until interrupted; prints its URL first."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=KINDS, default="vllm")
    parser.add_argument("--good-per-s", type=float, default=10.0)
    parser.add_argument("--aborted-per-s", type=float, default=0.0)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--generation-tokens", type=int, default=50)
    args = parser.parse_args(argv)
    traffic = Traffic(
        good_per_s=args.good_per_s,
        aborted_per_s=args.aborted_per_s,
        prompt_tokens_per_request=args.prompt_tokens,
        generation_tokens_per_request=args.generation_tokens,
    )
    with MetricsServer(args.kind, traffic=traffic) as server:
        print(server.url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
