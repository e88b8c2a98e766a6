"""What a controller sees of a job: the bus keys, the control channel's effects, the output.

Every test runs the real `baqup-run` as a subprocess with real children (`sh -c` with
`baqup emit`, or Python) against the real redis-server from conftest, and checks Redis
(TYPE, TTL, fields), the job dir and the manifest the way a controller would
(INTERFACE.md sections 3, 4 and 5; spec sections 3, 4, 5 and Appendix C).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from jsonschema import Draft202012Validator, FormatChecker

from baqup_supervisor.bus import read_lines
from baqup_supervisor.staging import manifest_schema, validate_manifest
from tests.conftest import RedisServer, start_redis
from tests.jobs import Job, NotifyListener, job_dir, prefix, redis_env, start_job, wait_for

BIN = Path(sys.executable).parent
DAY = 24 * 3600
MB = 1000 * 1000

# --- spec Appendix C, written out independently of the package's copy -------------------

APPENDIX_C: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["version", "job_id", "agent", "role", "created_at", "artifacts"],
    "properties": {
        "version": {"type": "string", "const": "1.0"},
        "job_id": {"type": "string", "format": "uuid"},
        "agent": {"type": "string"},
        "agent_version": {"type": "string"},
        "role": {"type": "string", "enum": ["snapshot", "restore", "migrate", "sync"]},
        "created_at": {"type": "string", "format": "date-time"},
        "artifacts": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["filename", "size_bytes", "checksum"],
                "properties": {
                    "filename": {"type": "string"},
                    "size_bytes": {"type": "integer", "minimum": 0},
                    "checksum": {
                        "type": "object",
                        "required": ["algorithm", "value"],
                        "properties": {
                            "algorithm": {"type": "string"},
                            "value": {"type": "string"},
                        },
                    },
                    "compression": {"type": "string"},
                    "encrypted": {"type": "boolean"},
                },
            },
        },
        "source_metadata": {"type": "object"},
    },
}

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-](\d{2}):(\d{2}))"
)


def is_rfc3339(value: object) -> bool:
    """RFC 3339 `date-time` (jsonschema only checks it when rfc3339-validator is installed)."""
    if not isinstance(value, str):
        return True
    match = _RFC3339.fullmatch(value)
    if match is None:
        return False
    try:
        datetime.strptime(value[:19].replace("t", "T"), "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return False
    offset = match.group(9)
    return offset is None or (int(offset) < 24 and int(match.group(10)) < 60)


def appendix_c_errors(document: Mapping[str, Any]) -> list[str]:
    checker = FormatChecker()
    checker.checks("date-time")(is_rfc3339)
    validator = Draft202012Validator(APPENDIX_C, format_checker=checker)
    return [e.message for e in validator.iter_errors(dict(document))]


def parse_time(text: str) -> datetime:
    assert is_rfc3339(text), text
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- helpers ----------------------------------------------------------------------------


def child_env(env: Mapping[str, str], sync: Path | None = None) -> dict[str, str]:
    """The job's environment with the venv's bin (the `baqup` tool) first on PATH."""
    assert (BIN / "baqup").exists(), BIN
    out = dict(env)
    out["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', os.defpath)}"
    if sync is not None:
        sync.mkdir(parents=True, exist_ok=True)
        out["SYNC"] = str(sync)
    return out


def wait_file(name: str, limit: int = 1200) -> str:
    """A shell loop waiting for $SYNC/name (the test creates it); gives up after a while."""
    return (
        f'i=0; while [ ! -e "$SYNC/{name}" ]; do i=$((i+1)); '
        f"[ $i -gt {limit} ] && exit 9; sleep 0.05; done"
    )


def sh_job(script: str, env: Mapping[str, str], name: str = "job") -> Job:
    return start_job(["--", "sh", "-c", "set -e\n" + script], env, name=name)


def py_job(code: str, env: Mapping[str, str], name: str = "job") -> Job:
    return start_job(["--", sys.executable, "-c", code], env, name=name)


def finish(job: Job, expected: int, timeout: float = 60) -> int:
    code = job.wait(timeout)
    assert code == expected, f"exit {code}, expected {expected}; stderr:\n{job.stderr()[-4000:]}"
    return code


def raw_hash(client: redis.Redis, key: str) -> dict[str, str]:
    return cast("dict[str, str]", client.hgetall(key))


def stream(client: redis.Redis, key: str) -> list[tuple[str, dict[str, str]]]:
    return cast("list[tuple[str, dict[str, str]]]", client.xrange(key))


def key_type(client: redis.Redis, key: str) -> str:
    return str(client.type(key))


def ttl(client: redis.Redis, key: str) -> int:
    return int(client.ttl(key))


def assert_day_ttl(client: redis.Redis, key: str) -> None:
    value = ttl(client, key)
    assert DAY - 120 <= value <= DAY, (key, value)


def decode(raw: Mapping[str, str], strings: set[str]) -> dict[str, Any]:
    """Check INTERFACE.md section 4's encoding and decode: `strings` are stored as they are,
    every other field is compact JSON."""
    out: dict[str, Any] = {}
    for name, text in raw.items():
        if name in strings:
            out[name] = text
            continue
        try:
            value = json.loads(text)
        except ValueError:
            raise AssertionError(f"field {name!r} is not JSON: {text!r}") from None
        compact = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        assert text == compact, f"field {name!r} is not compact JSON: {text!r}"
        assert not isinstance(value, str), f"string field {name!r} stored JSON-quoted: {text!r}"
        out[name] = value
    return out


HEARTBEAT_STRINGS = {"type", "job_id", "agent_id", "agent", "role", "timestamp", "state"}
PROGRESS_STRINGS = {"type", "job_id", "agent_id", "timestamp", "current_file"}
EVENT_STRINGS = {
    "type",
    "job_id",
    "agent_id",
    "timestamp",
    "severity",
    "code",
    "message",
    "first_occurrence",
    "last_occurrence",
}
STATUS_STRINGS = {
    "type",
    "job_id",
    "agent_id",
    "agent",
    "agent_version",
    "role",
    "status",
    "started_at",
    "completed_at",
    "manifest",
}


def keys_of(env: Mapping[str, str]) -> dict[str, str]:
    p, job = prefix(env), env["BAQUP_JOB_ID"]
    return {
        "heartbeat": f"{p}heartbeat:{env['BAQUP_AGENT_ID']}",
        "progress": f"{p}progress:{job}",
        "status": f"{p}status:{job}",
        "events": f"{p}events:{job}",
        "notify": f"{p}notify",
    }


def status_of(client: redis.Redis, env: Mapping[str, str]) -> dict[str, Any]:
    raw = raw_hash(client, keys_of(env)["status"])
    assert raw, "no status hash"
    return decode(raw, STATUS_STRINGS)


def events_of(client: redis.Redis, env: Mapping[str, str]) -> list[dict[str, Any]]:
    return [decode(fields, EVENT_STRINGS) for _, fields in stream(client, keys_of(env)["events"])]


def file_digest(path: Path, algorithm: str) -> str:
    """The checksum by the real coreutils / b3sum binary."""
    tool = {"sha256": "sha256sum", "sha512": "sha512sum", "blake3": "b3sum"}[algorithm]
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, check=True).stdout
    return out.split()[0]


def staged_files(env: Mapping[str, str]) -> list[str]:
    work = job_dir(env) / ".staging"
    if not work.exists():
        return []
    return sorted(str(p.relative_to(work)) for p in work.rglob("*") if not p.is_dir())


def child_records(job: Job) -> list[dict[str, Any]]:
    return [r for r in job.logs() if r.get("component") == "child"]


# --- section 4: the keys, their types, TTLs and fields -------------------------------------


def test_heartbeat_progress_events_and_status_keys(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    job_env: dict[str, str],
    tmp_path: Path,
    jobs: list[Job],
) -> None:
    env = child_env(redis_env(job_env, redis_server), tmp_path / "sync")
    env["BAQUP_AGENT_HEARTBEAT_INTERVAL"] = "2"
    keys = keys_of(env)
    listener = NotifyListener(redis_client, keys["notify"])
    script = f"""
baqup emit progress --percent 50 --bytes 1024 --files 3 --current-file /data/x --eta 12
baqup emit event PERMISSION_DENIED -m denied --path /data/a
printf 'hello world' > "$BAQUP_WORK_DIR/data.bin"
touch "$SYNC/ready"
{wait_file("go")}
"""
    job = sh_job(script, env)
    jobs.append(job)
    try:
        check_running_job(redis_client, env, job, tmp_path / "sync")
        check_final_status(redis_client, env)
        # notify: state changes and the final status, each a whole JSON document
        messages = listener.collect(lambda ms: any(m.get("type") == "status" for m in ms), 10)
    finally:
        listener.close()
    final = next(m for m in messages if m.get("type") == "status")
    assert final["status"] == "success"
    assert final["job_id"] == env["BAQUP_JOB_ID"]
    assert final["warnings_summary"] == {"PERMISSION_DENIED": 1}
    states = [m.get("state") for m in messages if m.get("type") != "status"]
    assert "running" in states
    assert "terminated" in states


def check_running_job(
    redis_client: redis.Redis, env: Mapping[str, str], job: Job, sync: Path
) -> None:
    keys = keys_of(env)
    wait_for((sync / "ready").exists, 20, what="child ready")

    # heartbeat: a hash with a TTL of about 3 x interval, state running
    heartbeat_key = keys["heartbeat"]
    assert key_type(redis_client, heartbeat_key) == "hash"
    assert 3 <= ttl(redis_client, heartbeat_key) <= 6
    beat = decode(raw_hash(redis_client, heartbeat_key), HEARTBEAT_STRINGS)
    assert {"type", "job_id", "agent_id", "timestamp", "state", "intent"} <= set(beat)
    assert beat["type"] == "heartbeat"
    assert beat["job_id"] == env["BAQUP_JOB_ID"]
    assert beat["agent_id"] == env["BAQUP_AGENT_ID"]
    assert beat["state"] == "running"
    assert beat["intent"] is None
    parse_time(beat["timestamp"])
    # it keeps beating (every 2 s), and each beat renews the TTL
    first = beat["timestamp"]
    wait_for(
        lambda: raw_hash(redis_client, heartbeat_key).get("timestamp", first) != first,
        8,
        what="a second heartbeat",
    )
    assert 3 <= ttl(redis_client, heartbeat_key) <= 6

    # progress: a hash kept 24 h
    assert key_type(redis_client, keys["progress"]) == "hash"
    assert_day_ttl(redis_client, keys["progress"])
    progress = decode(raw_hash(redis_client, keys["progress"]), PROGRESS_STRINGS)
    assert progress["type"] == "progress"
    assert progress["job_id"] == env["BAQUP_JOB_ID"]
    assert progress["percent_complete"] == 50
    assert progress["bytes_processed"] == 1024
    assert progress["files_processed"] == 3
    assert progress["current_file"] == "/data/x"
    assert progress["estimated_remaining_seconds"] == 12
    parse_time(progress["timestamp"])

    # events: a stream kept 24 h
    assert key_type(redis_client, keys["events"]) == "stream"
    assert_day_ttl(redis_client, keys["events"])
    events = events_of(redis_client, env)
    assert events
    event = events[-1]
    assert event["type"] == "event"
    assert event["code"] == "PERMISSION_DENIED"
    assert event["severity"] == "warn"
    assert event["message"] == "denied"
    assert event["count"] == 1
    assert event["sample_paths"] == ["/data/a"]
    assert parse_time(event["first_occurrence"]) <= parse_time(event["last_occurrence"])

    assert not redis_client.exists(keys["status"])
    (sync / "go").touch()
    finish(job, 0)


def check_final_status(redis_client: redis.Redis, env: Mapping[str, str]) -> None:
    keys = keys_of(env)
    # status: a hash kept 24 h, written once at the end
    assert key_type(redis_client, keys["status"]) == "hash"
    assert_day_ttl(redis_client, keys["status"])
    raw = raw_hash(redis_client, keys["status"])
    assert raw["error"] == "null"
    status = decode(raw, STATUS_STRINGS)
    required = {
        "type",
        "job_id",
        "agent",
        "role",
        "status",
        "started_at",
        "completed_at",
        "files",
        "metrics",
        "warnings_summary",
        "error",
    }
    assert required <= set(status)
    assert status["type"] == "status"
    assert status["job_id"] == env["BAQUP_JOB_ID"]
    assert isinstance(status["agent"], str)
    assert status["agent"]
    assert status["role"] == "snapshot"
    assert status["status"] == "success"
    assert parse_time(status["started_at"]) <= parse_time(status["completed_at"])
    assert status["error"] is None
    assert status["warnings_summary"] == {"PERMISSION_DENIED": 1}
    metrics = status["metrics"]
    assert {"duration_seconds", "bytes_processed", "files_processed"} <= set(metrics)
    assert isinstance(metrics["duration_seconds"], (int, float))
    assert metrics["duration_seconds"] >= 0
    assert metrics["bytes_processed"] == 1024
    assert metrics["files_processed"] == 3
    assert len(status["files"]) == 1
    entry = status["files"][0]
    path = Path(entry["path"])
    assert path.is_absolute()
    assert path == job_dir(env) / "data.bin"
    assert path.read_bytes() == b"hello world"
    assert entry["size_bytes"] == 11
    assert entry["checksum_sha256"] == hashlib.sha256(b"hello world").hexdigest()

    # the final heartbeat says the job is over
    beat = decode(raw_hash(redis_client, keys["heartbeat"]), HEARTBEAT_STRINGS)
    assert beat["state"] == "terminated"


def test_intent_is_carried_in_heartbeats_until_cleared(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    job_env: dict[str, str],
    tmp_path: Path,
    jobs: list[Job],
) -> None:
    env = child_env(redis_env(job_env, redis_server), tmp_path / "sync")
    env["BAQUP_AGENT_HEARTBEAT_INTERVAL"] = "30"  # only intent changes can explain new beats
    key = keys_of(env)["heartbeat"]
    script = f"""
printf 'x' > "$BAQUP_WORK_DIR/data.bin"
{wait_file("start")}
baqup emit intent vacuum --expected-seconds 45 --detail "table users"
{wait_file("clear")}
baqup emit intent --clear
{wait_file("go")}
"""
    job = sh_job(script, env)
    jobs.append(job)
    wait_for(lambda: raw_hash(redis_client, key).get("state") == "running", 20, what="running")
    before = int(raw_hash(redis_client, key)["sequence"])
    (tmp_path / "sync" / "start").touch()

    def intent() -> Any:
        raw = raw_hash(redis_client, key)
        return decode(raw, HEARTBEAT_STRINGS)["intent"] if raw else None

    # the intent change beats at once (the interval is 30 s)
    value = wait_for(intent, 10, what="intent in the heartbeat")
    assert value == {
        "operation": "vacuum",
        "expected_duration_seconds": 45,
        "detail": "table users",
    }
    assert int(raw_hash(redis_client, key)["sequence"]) > before
    (tmp_path / "sync" / "clear").touch()
    wait_for(lambda: raw_hash(redis_client, key).get("intent") == "null", 10, what="cleared")
    (tmp_path / "sync" / "go").touch()
    finish(job, 0)


def hset_calls(client: redis.Redis) -> int:
    """HSET calls the server has executed (0 before the first)."""
    stats = cast("dict[str, dict[str, Any]]", client.info("commandstats"))
    return int(stats.get("cmdstat_hset", {}).get("calls", 0))


def test_progress_is_replaced_whole_rate_limited_and_the_last_always_written(
    tmp_path: Path, job_env: dict[str, str], jobs: list[Job]
) -> None:
    server = start_redis(tmp_path / "private-redis")
    client = server.client()
    try:
        env = child_env(redis_env(job_env, server))
        keys = keys_of(env)
        code = """
import json, os, time
fd = int(os.environ["BAQUP_CONTROL_FD"])
with open(os.path.join(os.environ["BAQUP_WORK_DIR"], "data.bin"), "wb") as f:
    f.write(b"payload")
first = {"type": "progress", "percent_complete": 0, "current_file": "/first",
         "estimated_remaining_seconds": 99}
os.write(fd, json.dumps(first).encode() + b"\\n")
for i in range(1, 501):
    line = {"type": "progress", "percent_complete": i // 5, "bytes_processed": i,
            "files_processed": i}
    os.write(fd, json.dumps(line).encode() + b"\\n")
    time.sleep(0.003)
"""
        before = hset_calls(client)
        job = py_job(code, env)
        jobs.append(job)
        finish(job, 0)
        after = hset_calls(client)
        writes = after - before
        # 501 progress lines: a few progress writes, plus heartbeats and the status
        assert 2 <= writes <= 25, writes

        assert key_type(client, keys["progress"]) == "hash"
        assert_day_ttl(client, keys["progress"])
        progress = decode(raw_hash(client, keys["progress"]), PROGRESS_STRINGS)
        assert progress["percent_complete"] == 100
        assert progress["bytes_processed"] == 500
        assert progress["files_processed"] == 500
        # replaced whole: nothing of the first message survives
        assert "current_file" not in progress
        assert "estimated_remaining_seconds" not in progress
        status = status_of(client, env)
        assert status["metrics"]["bytes_processed"] == 500
        assert status["metrics"]["files_processed"] == 500
    finally:
        client.close()
        server.stop()


def test_events_are_aggregated_per_code(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    job_env: dict[str, str],
    jobs: list[Job],
) -> None:
    env = child_env(redis_env(job_env, redis_server))
    code = """
import json, os
fd = int(os.environ["BAQUP_CONTROL_FD"])
with open(os.path.join(os.environ["BAQUP_WORK_DIR"], "data.bin"), "wb") as f:
    f.write(b"payload")
for i in range(1000):
    line = {"type": "event", "severity": "warn", "code": "PERMISSION_DENIED",
            "message": "permission denied", "path": "/data/secret/%02d" % (i % 20)}
    os.write(fd, json.dumps(line).encode() + b"\\n")
os.write(fd, b'{"type":"event","severity":"info","code":"SYMLINK_SKIPPED","path":"/l"}\\n')
"""
    job = py_job(code, env)
    jobs.append(job)
    finish(job, 0)
    key = keys_of(env)["events"]
    assert key_type(redis_client, key) == "stream"
    assert_day_ttl(redis_client, key)
    length = int(redis_client.xlen(key))
    assert 2 <= length <= 40, length  # far fewer entries than the 1001 events
    events = events_of(redis_client, env)
    denied = [e for e in events if e["code"] == "PERMISSION_DENIED"]
    counts = [e["count"] for e in denied]
    assert counts == sorted(counts)
    last = denied[-1]
    assert last["count"] == 1000
    assert last["severity"] == "warn"
    assert last["message"] == "permission denied"
    assert parse_time(last["first_occurrence"]) <= parse_time(last["last_occurrence"])
    assert last["first_occurrence"] == denied[0]["first_occurrence"]
    samples = last["sample_paths"]
    assert 1 <= len(samples) <= 10
    assert len(set(samples)) == len(samples)
    assert set(samples) <= {f"/data/secret/{i:02d}" for i in range(20)}
    skipped = [e for e in events if e["code"] == "SYMLINK_SKIPPED"]
    assert skipped[-1]["count"] == 1
    assert skipped[-1]["severity"] == "info"
    status = status_of(redis_client, env)
    assert status["warnings_summary"] == {"PERMISSION_DENIED": 1000, "SYMLINK_SKIPPED": 1}
    assert status["status"] == "success"


# --- section 3: artifacts, components, metadata, log ---------------------------------------


def test_declared_artifacts_components_metadata_and_log(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    job_env: dict[str, str],
    jobs: list[Job],
) -> None:
    env = child_env(redis_env(job_env, redis_server))
    script = """
mkdir -p "$BAQUP_WORK_DIR/sub/dir"
printf 'alpha' > "$BAQUP_WORK_DIR/a.bin"
printf 'nested' > "$BAQUP_WORK_DIR/sub/dir/file.tar"
printf 'not an artifact' > "$BAQUP_WORK_DIR/extra.tmp"
baqup emit artifact a.bin
baqup emit artifact sub/dir/file.tar --compression none
baqup emit component users_db --status success --artifact a.bin
baqup emit component files --status success --artifact sub/dir/file.tar
baqup emit metadata type=filesystem files_included=12 'nested={"k":[1,2]}'
baqup emit metadata path=/data files_included=13
baqup emit log "hello from the child" --level warn --context table=users --context rows=42
"""
    job = sh_job(script, env)
    jobs.append(job)
    finish(job, 0)
    jdir = job_dir(env)
    manifest = json.loads((jdir / "manifest.json").read_text())
    assert sorted(a["filename"] for a in manifest["artifacts"]) == ["a.bin", "sub/dir/file.tar"]
    assert (jdir / "a.bin").read_bytes() == b"alpha"
    assert (jdir / "sub/dir/file.tar").read_bytes() == b"nested"
    # the undeclared file is not an artifact: it stays in the work dir
    assert not (jdir / "extra.tmp").exists()
    assert staged_files(env) == ["extra.tmp"]
    nested = next(a for a in manifest["artifacts"] if a["filename"] == "sub/dir/file.tar")
    assert nested["compression"] == "none"
    assert manifest["source_metadata"] == {
        "type": "filesystem",
        "files_included": 13,
        "nested": {"k": [1, 2]},
        "path": "/data",
    }
    status = status_of(redis_client, env)
    assert status["status"] == "success"
    assert sorted(Path(f["path"]).name for f in status["files"]) == ["a.bin", "file.tar"]
    assert status.get("components") == [
        {"name": "users_db", "status": "success", "artifact": "a.bin"},
        {"name": "files", "status": "success", "artifact": "sub/dir/file.tar"},
    ]
    assert status.get("summary") == {"total": 2, "succeeded": 2, "failed": 0}
    logged = [r for r in child_records(job) if r.get("message") == "hello from the child"]
    assert len(logged) == 1
    assert logged[0]["level"] == "warn"
    assert logged[0]["job_id"] == env["BAQUP_JOB_ID"]
    assert logged[0]["context"] == {"table": "users", "rows": 42}


def test_child_stderr_lines_are_child_log_records(job_env: dict[str, str], jobs: list[Job]) -> None:
    env = child_env(job_env)
    job = sh_job("""printf 'x' > "$BAQUP_WORK_DIR/a"; echo "to stderr" >&2""", env)
    jobs.append(job)
    finish(job, 0)
    records = [r for r in child_records(job) if r.get("message") == "to stderr"]
    assert len(records) == 1
    assert records[0]["context"].get("stream") == "stderr"


# --- section 5: the manifest and checksums -------------------------------------------------


def test_shipped_manifest_schema_is_appendix_c() -> None:
    Draft202012Validator.check_schema(APPENDIX_C)
    shipped = {k: v for k, v in manifest_schema().items() if k not in ("$id", "title")}
    assert shipped == APPENDIX_C


GOOD_MANIFEST: dict[str, Any] = {
    "version": "1.0",
    "job_id": "123e4567-e89b-12d3-a456-426614174000",
    "agent": "agent-fs",
    "role": "snapshot",
    "created_at": "2024-01-15T03:05:47Z",
    "artifacts": [
        {"filename": "a", "size_bytes": 1, "checksum": {"algorithm": "sha256", "value": "ab"}}
    ],
}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("version", "2.0"),
        ("job_id", "abc123"),
        ("role", "backup"),
        ("created_at", "yesterday"),
        ("created_at", "2024-13-45T99:99:99Z"),
        ("artifacts", []),
        ("artifacts", [{"filename": "a", "size_bytes": -1, "checksum": {}}]),
        ("source_metadata", ["not", "an", "object"]),
    ],
)
def test_validate_manifest_rejects_what_appendix_c_rejects(field: str, value: Any) -> None:
    assert validate_manifest(GOOD_MANIFEST) == []
    assert appendix_c_errors(GOOD_MANIFEST) == []
    bad = {**GOOD_MANIFEST, field: value}
    assert appendix_c_errors(bad), "the independent validator must reject it"
    assert validate_manifest(bad), f"validate_manifest accepted {field}={value!r}"


@pytest.mark.parametrize("algorithm", ["sha256", "sha512", "blake3"])
def test_manifest_is_valid_and_checksums_match_the_real_tools(
    algorithm: str,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    job_env: dict[str, str],
    jobs: list[Job],
) -> None:
    env = child_env(redis_env(job_env, redis_server))
    env["BAQUP_ARTIFACT_CHECKSUM_ALGORITHM"] = algorithm
    code = """
import os
work = os.environ["BAQUP_WORK_DIR"]
os.makedirs(os.path.join(work, "sub", "dir"))
with open(os.path.join(work, "db.sql.zst"), "wb") as f:
    f.write(os.urandom(300_000))
with open(os.path.join(work, "sub", "dir", "file"), "wb") as f:
    f.write(b"nested artifact\\n" * 1000)
"""
    job = py_job(code, env)
    jobs.append(job)
    finish(job, 0)
    jdir = job_dir(env)
    manifest = json.loads((jdir / "manifest.json").read_text())
    assert validate_manifest(manifest) == []
    assert appendix_c_errors(manifest) == []
    assert manifest["job_id"] == env["BAQUP_JOB_ID"]
    assert manifest["role"] == "snapshot"
    parse_time(manifest["created_at"])
    by_name = {a["filename"]: a for a in manifest["artifacts"]}
    assert set(by_name) == {"db.sql.zst", "sub/dir/file"}
    assert by_name["db.sql.zst"]["compression"] == "zstd"
    for name, artifact in by_name.items():
        path = jdir / name
        assert path.is_file()
        assert artifact["size_bytes"] == path.stat().st_size
        assert artifact["checksum"]["algorithm"] == algorithm
        assert artifact["checksum"]["value"] == file_digest(path, algorithm)
    # nothing left behind in the work dir
    assert staged_files(env) == []
    status = status_of(redis_client, env)
    assert status["status"] == "success"
    assert len(status["files"]) == 2
    for entry in status["files"]:
        path = Path(entry["path"])
        assert path.is_absolute()
        assert path.is_file()
        assert entry["size_bytes"] == path.stat().st_size
        assert entry[f"checksum_{algorithm}"] == file_digest(path, algorithm)
        name = str(path.relative_to(jdir))
        assert entry[f"checksum_{algorithm}"] == by_name[name]["checksum"]["value"]


# --- failures -------------------------------------------------------------------------------


@pytest.mark.parametrize("retain", [None, "false"])
def test_child_failure_leaves_no_manifest(
    retain: str | None,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    job_env: dict[str, str],
    jobs: list[Job],
) -> None:
    env = child_env(redis_env(job_env, redis_server))
    if retain is not None:
        env["BAQUP_ARTIFACT_RETAIN_ON_FAILURE"] = retain
    script = """
mkdir -p "$BAQUP_WORK_DIR/sub"
printf 'partial dump' > "$BAQUP_WORK_DIR/a.bin"
printf 'more' > "$BAQUP_WORK_DIR/sub/b.bin"
exit 1
"""
    job = sh_job(script, env)
    jobs.append(job)
    finish(job, 1)
    jdir = job_dir(env)
    assert not (jdir / "manifest.json").exists()
    assert not (jdir / "a.bin").exists()
    if retain is None:  # BAQUP_ARTIFACT_RETAIN_ON_FAILURE defaults to true
        assert staged_files(env) == ["a.bin", "sub/b.bin"]
    else:
        assert staged_files(env) == []
        work = jdir / ".staging"
        assert not work.exists() or list(work.iterdir()) == []
    status = status_of(redis_client, env)
    assert status["status"] == "failed"
    assert status["files"] == []
    assert isinstance(status["error"], dict)
    assert status["error"]["code"]
    assert status["error"]["message"]


@pytest.mark.parametrize(
    "script",
    [
        ': > "$BAQUP_WORK_DIR/empty.bin"',
        "true",
        'printf x > "$BAQUP_WORK_DIR/a.bin"; : > "$BAQUP_WORK_DIR/b.bin"',
        'printf x > "$BAQUP_WORK_DIR/a.bin"; baqup emit artifact never-written.bin',
    ],
    ids=["zero-bytes", "no-artifact", "one-of-two-empty", "declared-not-written"],
)
def test_empty_or_missing_artifact_is_exit_65(
    script: str,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    job_env: dict[str, str],
    jobs: list[Job],
) -> None:
    env = child_env(redis_env(job_env, redis_server))
    job = sh_job(script, env)
    jobs.append(job)
    finish(job, 65)
    assert not (job_dir(env) / "manifest.json").exists()
    status = status_of(redis_client, env)
    assert status["status"] == "failed"
    assert status["error"]["code"] == "EMPTY_ARTIFACT"
    assert status["files"] == []


# --- bad input ------------------------------------------------------------------------------

FLOOD_CHILD = """
import os, sys
work = os.environ["BAQUP_WORK_DIR"]
with open(os.path.join(work, "data.bin"), "wb") as f:
    f.write(b"payload\\n")
fd = int(os.environ["BAQUP_CONTROL_FD"])
os.write(fd, b"\\xff\\xfe not utf-8 \\xc3\\x28\\n")
err = sys.stderr.buffer
err.write(b"\\xff\\xfe stderr not utf-8 \\xc3\\x28\\n")
block = b"".join(b"line %06d\\n" % i for i in range(1000))
for _ in range(1000):
    err.write(block)
err.flush()
chunk = b"x" * (1024 * 1024)
for _ in range(10):
    os.write(fd, chunk)
"""


def read_status_value(pid: int, field: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def test_flood_of_output_and_a_huge_control_line(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    job_env: dict[str, str],
    jobs: list[Job],
) -> None:
    env = child_env(redis_env(job_env, redis_server))
    env["BAQUP_AGENT_HEARTBEAT_INTERVAL"] = "1"
    key = keys_of(env)["heartbeat"]
    job = py_job(FLOOD_CHILD, env)
    jobs.append(job)
    peak = 0
    changes: list[float] = []
    last_sequence: str | None = None
    try:
        while job.poll() is None:
            hwm = read_status_value(job.pid, "VmHWM")
            if hwm is not None:
                peak = max(peak, hwm)
            sequence = cast("str | None", redis_client.hget(key, "sequence"))
            if sequence is not None and sequence != last_sequence:
                changes.append(time.monotonic())
                last_sequence = sequence
            time.sleep(0.05)
        ended = time.monotonic()
        finish(job, 0)
        stderr = job.stderr_path.read_bytes()
        child_lines = stderr.count(b'"component":"child"')
        tail = stderr[-4000:].decode(errors="replace")
    finally:
        job.stderr_path.unlink(missing_ok=True)  # about 200 MB of log records
    # the heartbeat kept beating through the flood
    assert changes, "no heartbeat seen"
    gaps = [b - a for a, b in zip(changes, [*changes[1:], ended], strict=True)]
    assert max(gaps) <= 2.5, (gaps, tail)
    # memory stayed bounded
    assert 0 < peak < 100 * MB, peak
    # every stderr line was logged as the child's (1,000,001 lines)
    assert child_lines >= 1_000_001, child_lines
    status = status_of(redis_client, env)
    assert status["status"] == "success"
    # the invalid UTF-8 line and the 10 MiB line: one PROTOCOL_ERROR each
    assert status["warnings_summary"] == {"PROTOCOL_ERROR": 2}
    events = [e for e in events_of(redis_client, env) if e["code"] == "PROTOCOL_ERROR"]
    assert events[-1]["count"] == 2
    assert len(events[-1]["message"]) <= 400
    assert (job_dir(env) / "manifest.json").exists()


def test_garbage_on_the_control_fd_is_a_warning_not_a_failure(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    job_env: dict[str, str],
    jobs: list[Job],
) -> None:
    env = child_env(redis_env(job_env, redis_server))
    secret = "hunter2-Very-Secret"
    env["BAQUP_SECRET_DB_PASSWORD"] = secret
    code = f"""
import os
fd = int(os.environ["BAQUP_CONTROL_FD"])
with open(os.path.join(os.environ["BAQUP_WORK_DIR"], "data.bin"), "wb") as f:
    f.write(b"payload")
for line in [
    b"not json at all {secret}",
    b"[1, 2, 3]",
    b'{{"type": "teleport"}}',
    b'{{"type": "progress", "percent_complete": 900}}',
    b"\\xff\\xfe\\xfd",
    b"y" * 70000,
    b'{{"type": "log", "message": "' + b"z" * 5000 + b'"',
]:
    os.write(fd, line + b"\\n")
os.write(fd, b'{{"type": "event", "code": "FILE_CHANGED", "path": "/f"}}\\n')
"""
    job = py_job(code, env)
    jobs.append(job)
    finish(job, 0)
    status = status_of(redis_client, env)
    assert status["status"] == "success"
    assert status["error"] is None
    assert status["warnings_summary"]["PROTOCOL_ERROR"] == 7
    assert status["warnings_summary"]["FILE_CHANGED"] == 1
    assert (job_dir(env) / "manifest.json").exists()
    events = [e for e in events_of(redis_client, env) if e["code"] == "PROTOCOL_ERROR"]
    assert events[-1]["count"] == 7
    assert events[-1]["severity"] == "warn"
    # the first one went out at once, with an excerpt of the line, the secret redacted
    assert events[0]["count"] == 1
    assert "not json at all" in events[0]["message"]
    everything = json.dumps(events_of(redis_client, env)) + job.stderr()
    assert secret not in everything
    for event in events:
        assert "y" * 201 not in event["message"]
        assert "z" * 201 not in event["message"]


@pytest.mark.parametrize(
    "script",
    [
        "baqup emit artifact /etc/hostname",
        'printf esc > "$BAQUP_JOB_DIR/escape.bin"; baqup emit artifact ../escape.bin',
        "baqup emit artifact sub/../../escape.bin",
        'ln -s /etc/hostname "$BAQUP_WORK_DIR/link.bin"; baqup emit artifact link.bin',
        'ln -s /etc "$BAQUP_WORK_DIR/etc"; baqup emit artifact etc/hostname',
    ],
    ids=["absolute", "dotdot", "nested-dotdot", "symlink-outside", "symlinked-dir-outside"],
)
def test_artifact_names_leaving_the_work_dir_are_security_violations(
    script: str,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    job_env: dict[str, str],
    jobs: list[Job],
) -> None:
    env = child_env(redis_env(job_env, redis_server))
    full = f"""
printf 'good' > "$BAQUP_WORK_DIR/good.bin"
baqup emit artifact good.bin
{script}
"""
    job = sh_job(full, env)
    jobs.append(job)
    finish(job, 65)
    jdir = job_dir(env)
    assert not (jdir / "manifest.json").exists()
    assert not (jdir / "hostname").exists()
    assert not (jdir / "good.bin").exists()
    status = status_of(redis_client, env)
    assert status["status"] == "failed"
    assert status["error"]["code"] == "SECURITY_VIOLATION"
    assert status["files"] == []


# --- the file bus -----------------------------------------------------------------------------


def test_file_bus_writes_json_lines_per_key_and_ignores_a_torn_line(
    job_env: dict[str, str], jobs: list[Job]
) -> None:
    env = child_env(job_env)
    assert env["BAQUP_BUS_URL"].startswith("file://")
    directory = Path(env["BAQUP_BUS_URL"][len("file://") :])
    script = """
baqup emit intent dumping --expected-seconds 5
baqup emit progress --percent 10 --bytes 7
baqup emit event FILE_VANISHED --path /gone -m vanished
printf 'data' > "$BAQUP_WORK_DIR/data.bin"
baqup emit intent --clear
"""
    job = sh_job(script, env)
    jobs.append(job)
    finish(job, 0)
    keys = keys_of(env)
    files = {kind: directory / f"{key}.jsonl" for kind, key in keys.items()}
    for kind, path in files.items():
        assert path.is_file(), (kind, sorted(p.name for p in directory.iterdir()))
        raw_lines = path.read_bytes().split(b"\n")
        assert raw_lines[-1] == b"", f"{kind}: last line not terminated"
        for raw in raw_lines[:-1]:
            assert isinstance(json.loads(raw), dict)

    beats = read_lines(files["heartbeat"])
    assert all(b["type"] == "heartbeat" for b in beats)
    assert any(
        isinstance(b["intent"], dict) and b["intent"]["operation"] == "dumping" for b in beats
    )
    assert beats[-1]["intent"] is None
    assert beats[-1]["state"] == "terminated"
    progress = read_lines(files["progress"])
    assert progress[-1]["bytes_processed"] == 7
    events = read_lines(files["events"])
    assert events[-1]["code"] == "FILE_VANISHED"
    assert events[-1]["sample_paths"] == ["/gone"]
    statuses = read_lines(files["status"])
    assert len(statuses) == 1
    status = statuses[0]
    assert status["status"] == "success"
    assert status["warnings_summary"] == {"FILE_VANISHED": 1}
    assert Path(status["files"][0]["path"]) == job_dir(env) / "data.bin"
    notify = read_lines(files["notify"])
    assert notify[-1]["type"] == "status"

    # a torn last line (a crash mid-write) is ignored by readers
    for path in files.values():
        before = read_lines(path)
        with path.open("ab") as handle:
            handle.write(b'{"type": "status", "status": "succ')
        assert read_lines(path) == before
