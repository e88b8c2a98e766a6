"""INTERFACE.md section 12: BAQUP_STAGING_DIR must exist; baqup-run never creates it."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_baqup
from tests.jobs import log_records


def test_a_missing_staging_dir_is_73_and_nothing_is_created(
    job_env: dict[str, str], tmp_path: Path
) -> None:
    typo = tmp_path / "stagign" / "deeper"
    env = dict(job_env, BAQUP_STAGING_DIR=str(typo))
    result = run_baqup(["--", "sh", "-c", 'echo data > "$BAQUP_WORK_DIR/out.txt"'], env)
    assert result.returncode == 73, result.stderr
    assert not (tmp_path / "stagign").exists()
    failure = [r for r in log_records(result.stderr) if r["level"] == "error"][-1]
    assert str(typo) in failure["message"]
    assert "does not exist" in failure["message"]
    bus = Path(env["BAQUP_BUS_URL"].removeprefix("file://"))
    status_file = bus / f"{env['BAQUP_BUS_KEY_PREFIX']}status:{env['BAQUP_JOB_ID']}.jsonl"
    status = json.loads(status_file.read_text().splitlines()[-1])
    assert status["error"]["code"] == "STAGING_DIR_MISSING"
    assert status["exit_code"] == 73
