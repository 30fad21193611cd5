"""The Prometheus configuration in docs/prometheus.md is valid: ``promtool`` (from Debian's
``prometheus`` package) checks the recording and alerting rules and the scrape configuration."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fakes.prometheus_server import require_prometheus

DOC = Path(__file__).resolve().parents[1] / "docs" / "prometheus.md"


def _promtool() -> str:
    binary = require_prometheus()  # skip (printed) or fail in CI without the package
    tool = shutil.which("promtool") or str(Path(binary).with_name("promtool"))
    if not Path(tool).exists():
        pytest.fail(f"promtool not found beside {binary}")
    return tool


def _yaml_blocks(start: str) -> list[str]:
    return re.findall(rf"```yaml\n({start}.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def test_recording_and_alerting_rules_pass_promtool(tmp_path: Path) -> None:
    tool = _promtool()
    blocks = _yaml_blocks("groups:")
    assert len(blocks) == 2  # recording, alerting
    files = []
    for i, block in enumerate(blocks):
        path = tmp_path / f"rules{i}.yml"
        path.write_text(block, encoding="utf-8")
        files.append(str(path))
    result = subprocess.run(
        [tool, "check", "rules", *files], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 14 rules found" in result.stdout
    assert "SUCCESS: 11 rules found" in result.stdout


def test_scrape_configuration_passes_promtool(tmp_path: Path) -> None:
    tool = _promtool()
    (block,) = _yaml_blocks("# prometheus.yml")
    path = tmp_path / "prometheus.yml"
    path.write_text(block, encoding="utf-8")
    result = subprocess.run(
        [tool, "check", "config", "--syntax-only", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
