"""Progress adapters: `pv -n` and `restic --json` output turned into progress.

The parsers are pure functions (one line in, progress fields or None out), tested on
lines in the formats the tools document; then real jobs: the real `pv -n` under
`baqup-run --progress-from pv` (and through a schema's per-role `progress_from`),
and restic-format status lines under `--progress-from restic-json`, with the progress
hash read from the real redis-server. `pv` is required: a missing `pv` fails.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from baqup_supervisor.adapters import ADAPTERS, pv, restic_json
from tests.conftest import RedisServer, python_child, run_baqup
from tests.jobs import job_dir, log_records, prefix, read_hash, redis_env, start_job

# --- pv -n ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"0\n", {"percent_complete": 0}),
        (b"45\n", {"percent_complete": 45}),
        (b"100\n", {"percent_complete": 100}),
        (b"  7 \n", {"percent_complete": 7}),
        (b"1048576\n", {"bytes_processed": 1048576}),  # `pv -n -b`: a byte count
        (b"", None),
        (b"\n", None),
        (b"-5\n", None),
        (b"12.5\n", None),
        (b"pv: /nope: No such file or directory\n", None),
        (b"\xff\xfe\n", None),
    ],
)
def test_pv(line: bytes, expected: dict[str, Any] | None) -> None:
    assert pv(line) == expected


# --- restic --json --------------------------------------------------------------------------------

# `restic backup --json`: status lines while it runs, then one summary (restic's docs,
# "JSON output": message_type status | verbose_status | error | summary)
BACKUP_STATUS = (
    b'{"message_type":"status","seconds_elapsed":3,"seconds_remaining":9,'
    b'"percent_done":0.2513,"total_files":1024,"files_done":257,"total_bytes":104857600,'
    b'"bytes_done":26345062,"current_files":["/home/user/a.db","/home/user/b.log"]}\n'
)
RESTORE_STATUS = (
    b'{"message_type":"status","seconds_elapsed":5,"percent_done":0.5,"total_files":10,'
    b'"files_restored":5,"total_bytes":2000,"bytes_restored":1000}\n'
)
SUMMARY = (
    b'{"message_type":"summary","files_new":1024,"files_changed":0,"files_unmodified":0,'
    b'"dirs_new":12,"data_added":104857600,"total_files_processed":1024,'
    b'"total_bytes_processed":104857600,"total_duration":12.5,"snapshot_id":"1a2b3c4d"}\n'
)
ERROR = (
    b'{"message_type":"error","error":{"message":"permission denied"},'
    b'"during":"archival","item":"/home/user/secret"}\n'
)
VERBOSE = (
    b'{"message_type":"verbose_status","action":"new","item":"/home/user/a.db",'
    b'"duration":0.1,"data_size":100,"metadata_size":0,"total_files":1}\n'
)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            BACKUP_STATUS,
            {
                "percent_complete": 25.13,
                "bytes_processed": 26345062,
                "files_processed": 257,
                "estimated_remaining_seconds": 9,
                "current_file": "/home/user/a.db",
            },
        ),
        (
            RESTORE_STATUS,
            {"percent_complete": 50.0, "bytes_processed": 1000, "files_processed": 5},
        ),
        (b'{"message_type":"status","percent_done":1}\n', {"percent_complete": 100.0}),
        (b'{"message_type":"status","percent_done":1.7}\n', {"percent_complete": 100.0}),
        (b'{"message_type":"status","percent_done":-0.1}\n', {"percent_complete": 0.0}),
        (b'{"message_type":"status","percent_done":0}\n', {"percent_complete": 0.0}),
        (b'{"message_type":"status","bytes_done":-1,"files_done":"7"}\n', None),
        (b'{"message_type":"status","current_files":[]}\n', None),
        (b'{"message_type":"status"}\n', None),
        (SUMMARY, None),
        (ERROR, None),
        (VERBOSE, None),
        (b"repository 1a2b3c4d opened (version 2, compression level auto)\n", None),
        (b'{"message_type":"status",', None),
        (b"[1, 2]\n", None),
        (b"", None),
    ],
    ids=[
        "backup",
        "restore",
        "done",
        "clamped-high",
        "clamped-low",
        "zero",
        "bad-types",
        "no-current-file",
        "empty-status",
        "summary",
        "error",
        "verbose",
        "text",
        "torn",
        "array",
        "empty",
    ],
)
def test_restic_json(line: bytes, expected: dict[str, Any] | None) -> None:
    assert restic_json(line) == expected


def test_adapter_table() -> None:
    expected = {"pv": (pv, "stderr"), "restic-json": (restic_json, "stdout")}
    assert expected == ADAPTERS


# --- real jobs --------------------------------------------------------------------------------


def pv_binary() -> str:
    found = shutil.which("pv")
    assert found is not None, "pv is not installed: tests/run must apt-get install pv"
    return found


@pytest.fixture
def env(job_env: dict[str, str], redis_server: RedisServer) -> dict[str, str]:
    out = redis_env(job_env, redis_server)
    out["BAQUP_JOB_RETRY_MAX"] = "0"
    return out


def progress_key(env: dict[str, str]) -> str:
    return f"{prefix(env)}progress:{env['BAQUP_JOB_ID']}"


def test_pv_job(env: dict[str, str], redis_client: redis.Redis, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(3_000_000))
    command = f'{pv_binary()} -n -i 0.2 -L 1500000 "$0" > "$BAQUP_WORK_DIR/copy.bin"'
    job = start_job(["--progress-from", "pv", "--", "sh", "-c", command, str(source)], env)
    seen: list[float] = []
    try:
        while job.poll() is None:
            value = read_hash(redis_client, progress_key(env)).get("percent_complete")
            if isinstance(value, (int, float)) and (not seen or seen[-1] != value):
                seen.append(value)
            time.sleep(0.02)
        code = job.wait(timeout=30)
    finally:
        job.stop()
    assert code == 0, job.stderr()[-3000:]
    final = read_hash(redis_client, progress_key(env))
    assert final["percent_complete"] == 100
    assert any(0 < v < 100 for v in seen), seen  # it moved while pv ran
    assert seen == sorted(seen)
    # pv's numbers became progress, not log lines
    child_lines = [r for r in job.logs() if r.get("component") == "child"]
    assert not any(str(r.get("message", "")).strip().isdigit() for r in child_lines)
    assert (job_dir(env) / "copy.bin").read_bytes() == source.read_bytes()
    status = read_hash(redis_client, f"{prefix(env)}status:{env['BAQUP_JOB_ID']}")
    assert status["status"] == "success"


def test_pv_through_the_schema(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    """`progress_from` as a per-role option of x-baqup-agent.commands."""
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(200_000))
    schema = tmp_path / "agent-schema.json"
    schema.write_text(
        json.dumps(
            {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "properties": {"BAQUP_SOURCE_PATH": {"type": "string", "format": "path"}},
                "x-baqup-agent": {
                    "agent": "agent-pv",
                    "version": "1.0.0",
                    "roles": ["snapshot"],
                    "commands": {
                        "snapshot": {
                            "argv": ["sh", "-c", f'{pv_binary()} -n "$BAQUP_SOURCE_PATH"'],
                            "stdout_artifact": "copy.bin",
                            "progress_from": "pv",
                        }
                    },
                },
            }
        )
    )
    env["BAQUP_SOURCE_PATH"] = str(source)
    env["BAQUP_ARTIFACT_COMPRESS"] = "false"
    result = run_baqup(["--schema", str(schema), "snapshot"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_hash(redis_client, progress_key(env))["percent_complete"] == 100
    assert (job_dir(env) / "copy.bin").read_bytes() == source.read_bytes()
    child = [r for r in log_records(result.stderr) if r.get("component") == "child"]
    assert not any(str(r.get("message", "")).strip() == "100" for r in child)


RESTIC = r"""
import os, sys
lines = [l.encode() for l in sys.argv[1:]]
for line in lines:
    sys.stdout.buffer.write(line + b"\n")
    sys.stdout.flush()
with open(os.path.join(os.environ["BAQUP_WORK_DIR"], "snapshot.id"), "w") as f:
    f.write("1a2b3c4d\n")
"""


def test_restic_json_job(env: dict[str, str], redis_client: redis.Redis) -> None:
    lines = [
        "repository 1a2b3c4d opened (version 2, compression level auto)",
        BACKUP_STATUS.decode().strip(),
        b'{"message_type":"status","seconds_elapsed":6,"seconds_remaining":0,"percent_done":1,'
        b'"total_files":1024,"files_done":1024,"total_bytes":104857600,'
        b'"bytes_done":104857600}'.decode(),
        SUMMARY.decode().strip(),
    ]
    result = run_baqup(["--progress-from", "restic-json", "--", *python_child(RESTIC), *lines], env)
    assert result.returncode == 0, result.stderr[-3000:]
    progress = read_hash(redis_client, progress_key(env))
    assert progress["percent_complete"] == 100
    assert progress["files_processed"] == 1024
    assert progress["bytes_processed"] == 104857600
    assert progress["estimated_remaining_seconds"] == 0
    child = [
        str(r.get("message")) for r in log_records(result.stderr) if r.get("component") == "child"
    ]
    # the lines that are not status messages are logged as usual; the status ones are not
    assert any(m.startswith("repository 1a2b3c4d opened") for m in child)
    assert any('"message_type":"summary"' in m for m in child)
    assert not any('"message_type":"status"' in m for m in child)
    status = read_hash(redis_client, f"{prefix(env)}status:{env['BAQUP_JOB_ID']}")
    assert status["status"] == "success"
    assert status["metrics"]["files_processed"] == 1024
