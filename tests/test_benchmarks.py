"""The benchmark suite keeps working: CI runs it once at its tiny size.

Benchmarks are not tests: nothing here times anything or asserts a target. It checks
that `benchmarks/run --quick` runs every benchmark to the end, that none crashed, and
that every figure it prints is a real number with a verdict.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

BENCHMARKS = {"1.job", "2.startup", "3.heartbeat", "4.control", "5.memory", "6.fleet", "7.capture"}


@pytest.mark.timeout(600)
def test_the_quick_benchmark_suite_runs_every_benchmark(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    (tmp_path / "work").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BAQUP_", "COV_", "COVERAGE"))}
    result = subprocess.run(
        [
            str(REPO / "benchmarks" / "run"),
            "--quick",
            "--tmpdir",
            str(tmp_path / "work"),
            "--output",
            str(output),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=580,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["crashes"] == []
    assert report["mode"] == "quick"
    figures = report["figures"]
    assert {f["bench"].split(":")[0] for f in figures} >= BENCHMARKS
    for figure in figures:
        assert isinstance(figure["value"], (int, float)), figure
        assert figure["result"] in ("PASS", "MISS", "info"), figure
    assert "baqup-run benchmarks (quick" in result.stdout
