"""GPU cost per inference end to end: fake H100s at the pynvml boundary, a fake vLLM server,
``tokentop collect --interval 0.2`` in a subprocess stopped by SIGINT, then ``report --json``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.fakes.metrics_server import MetricsServer, Traffic

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 20
"""GPU rows (both boards together) to collect before stopping: about 2 s at 0.2 s a sample."""


def test_two_h100s_serving_vllm_cost_per_inference(tmp_path: Path) -> None:
    spec = tmp_path / "gpus.json"
    spec.write_text(json.dumps({"gpus": [{"util": 80}, {"util": 75}]}))
    db = tmp_path / "gpu.db"
    with MetricsServer("vllm", traffic=Traffic(good_per_s=10, aborted_per_s=3)) as server:
        config = tmp_path / "config.toml"
        config.write_text(
            '[[gpu]]\nmatch = "H100"\nusd_per_hour = 2.99\nmode = "rented"\n\n'
            f'[[inference]]\nurl = "{server.url}"\n'
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.fakes.run_with_fake_nvml",
                str(spec),
                "--",
                "--config",
                str(config),
                "--db",
                str(db),
                "collect",
                "--interval",
                "0.2",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # Wait for the collector to have run for a while (its own database says so).
            deadline = time.monotonic() + 60
            samples = 0
            while time.monotonic() < deadline and samples < SAMPLES:
                time.sleep(0.1)
                if db.exists():
                    from tokentop.store.db import Store

                    store = Store(db, readonly=True)
                    try:
                        samples = store.query("SELECT COUNT(*) FROM gpu")[0][0]
                    except Exception:
                        samples = 0
                    finally:
                        store.close()
            proc.send_signal(signal.SIGINT)
            _out, err = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    result = subprocess.run(
        [sys.executable, "-m", "tokentop", "--db", str(db), "report", "--since", "5m", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    gpu = json.loads(result.stdout)["gpu"]
    expected = 2 * 2.99 / 3600 / 10
    assert abs(gpu["cost_per_inference_usd"] - expected) / expected < 0.15, gpu
    assert len(gpu["devices"]) == 2
    assert all("H100" in d["name"] for d in gpu["devices"])
    # Aborted requests never count: 10 good per second, not 13.
    (endpoint,) = gpu["endpoints"]
    assert abs(endpoint["inferences_per_s"] - 10) / 10 < 0.15, endpoint
