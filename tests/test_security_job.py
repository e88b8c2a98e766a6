"""Job-level hostile cases with the real baqup-run, real children and real redis-servers.

- Tampering: a manifest checksum or an artifact altered by one bit, an artifact swapped
  for a symlink, a manifest naming a file outside the job dir: `baqup verify` exits 65,
  and a restore with `--stdin-artifact` exits 65 without ever starting its child.
- Secrets (spec section 7, "Secret Handling"): a child that leaks BAQUP_SECRET_* values
  and the bus URL's password in every way it can (plain, split across two writes, URL,
  base64, hex and JSON encoded, in progress, events, metadata, logs, intents, a broken
  control line) leaks them into no sink: stderr, stdout, every Redis key, the heartbeat,
  the notify channel, the manifest, the fallback buffer, `.baqup-status.json`.
- Resource limits: memory of the child tree (`BAQUP_AGENT_MEMORY_LIMIT`, grandchildren
  included) and the files limit (`BAQUP_SOURCE_MAX_FILES`) abort the job (exit 1).
- Log sanitising (`BAQUP_AGENT_LOG_SANITIZE`) of the child's lines, in all three modes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import textwrap
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import RedisServer, free_port, start_redis
from tests.jobs import (
    Job,
    NotifyListener,
    job_dir,
    prefix,
    read_hash,
    read_stream,
    redis_env,
    restore_env,
    start_job,
    wait_for,
)

BIN = Path(sys.executable).parent
BAQUP = str(BIN / "baqup")
PYTHON = sys.executable

TOKEN = "some-long-secret-value-123"
# A second secret whose URL, JSON and base64 spellings all differ from the plain one.
PASSWORD = 'pä"ss\\w/rd:+&=42 x'
BUS_PASSWORD = "bus-Pa55word-9931"


def finish(job: Job, expected: int, timeout: float = 60) -> None:
    code = job.wait(timeout)
    assert code == expected, f"exit {code}, expected {expected}; stderr:\n{job.stderr()[-4000:]}"


def py_job(code: str, env: Mapping[str, str], jobs: list[Job], *extra: str) -> Job:
    job = start_job([*extra, "--", PYTHON, "-c", textwrap.dedent(code)], env)
    jobs.append(job)
    return job


def status_of(client: redis.Redis, env: Mapping[str, str]) -> dict[str, Any]:
    status = read_hash(client, f"{prefix(env)}status:{env['BAQUP_JOB_ID']}")
    assert status, "no status hash"
    return status


def events_of(client: redis.Redis, env: Mapping[str, str]) -> list[dict[str, Any]]:
    return read_stream(client, f"{prefix(env)}events:{env['BAQUP_JOB_ID']}")


# --- tampering: verify and restore ------------------------------------------------------------

SNAPSHOT = """
import os
data = bytes((i * 7 + 3) % 251 for i in range(200_000))
with open(os.path.join(os.environ["BAQUP_WORK_DIR"], "data.bin"), "wb") as out:
    out.write(data)
"""

RESTORE = """
import os, sys
marker = os.environ["MARKER"]
open(marker, "w").close()
data = sys.stdin.buffer.read()
with open(marker, "wb") as out:
    out.write(data)
"""


@pytest.fixture
def snapshot_env(job_env: dict[str, str], tmp_path: Path, jobs: list[Job]) -> dict[str, str]:
    """A committed snapshot job (its job dir holds data.bin and manifest.json)."""
    finish(py_job(SNAPSHOT, job_env, jobs), 0)
    assert (job_dir(job_env) / "manifest.json").exists()
    env = dict(job_env)
    env["MARKER"] = str(tmp_path / "restore-child-ran")
    return env


def baqup_verify(directory: Path) -> tuple[int, dict[str, Any]]:
    result = subprocess.run(
        [BAQUP, "verify", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def restore(env: Mapping[str, str], jobs: list[Job], name: str = "data.bin") -> Job:
    return py_job(RESTORE, restore_env(env), jobs, "--role", "restore", "--stdin-artifact", name)


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_an_untouched_job_verifies_and_restores(
    snapshot_env: dict[str, str], jobs: list[Job]
) -> None:
    """The control: with nothing altered, verify exits 0 and the restore child gets the data."""
    code, report = baqup_verify(job_dir(snapshot_env))
    assert code == 0, report
    assert report["valid"] is True
    finish(restore(snapshot_env, jobs), 0)
    expected = bytes((i * 7 + 3) % 251 for i in range(200_000))
    assert Path(snapshot_env["MARKER"]).read_bytes() == expected


def test_a_manifest_checksum_altered_by_one_bit_is_refused(
    snapshot_env: dict[str, str], jobs: list[Job]
) -> None:
    manifest_path = job_dir(snapshot_env) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    value: str = manifest["artifacts"][0]["checksum"]["value"]
    last = format(int(value[-1], 16) ^ 1, "x")  # one bit of the digest
    manifest["artifacts"][0]["checksum"]["value"] = value[:-1] + last
    manifest_path.write_text(json.dumps(manifest, indent=2))
    code, report = baqup_verify(job_dir(snapshot_env))
    assert code == 65
    assert report["valid"] is False
    assert any("mismatch" in e for e in report["errors"]), report
    job = restore(snapshot_env, jobs)
    finish(job, 65)
    assert not Path(snapshot_env["MARKER"]).exists(), "the restore child was started"
    assert not [r for r in job.logs() if r.get("message") == "child started"]


def test_an_artifact_altered_by_one_bit_is_refused(
    snapshot_env: dict[str, str], jobs: list[Job]
) -> None:
    flip_bit(job_dir(snapshot_env) / "data.bin", 100_000, bit=3)
    code, report = baqup_verify(job_dir(snapshot_env))
    assert code == 65
    assert report["valid"] is False
    assert report["artifacts"][0]["checksum_ok"] is False
    job = restore(snapshot_env, jobs)
    finish(job, 65)
    assert not Path(snapshot_env["MARKER"]).exists(), "the restore child was started"
    assert not [r for r in job.logs() if r.get("message") == "child started"]


def test_an_artifact_swapped_for_a_symlink_to_the_same_bytes_is_refused(
    snapshot_env: dict[str, str], tmp_path: Path, jobs: list[Job]
) -> None:
    artifact = job_dir(snapshot_env) / "data.bin"
    elsewhere = tmp_path / "elsewhere.bin"
    elsewhere.write_bytes(artifact.read_bytes())
    artifact.unlink()
    artifact.symlink_to(elsewhere)
    code, report = baqup_verify(job_dir(snapshot_env))
    assert code == 65, report
    finish(restore(snapshot_env, jobs), 65)
    assert not Path(snapshot_env["MARKER"]).exists()


def test_a_manifest_naming_a_file_outside_the_job_dir_is_refused(
    snapshot_env: dict[str, str], tmp_path: Path, jobs: list[Job]
) -> None:
    """Size and checksum match the outside file: only the path rule can catch it."""
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"not part of any backup" * 100)
    manifest_path = job_dir(snapshot_env) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["artifacts"][0]
    entry["filename"] = "../../victim.bin"
    entry["size_bytes"] = victim.stat().st_size
    entry["checksum"] = {
        "algorithm": "sha256",
        "value": hashlib.sha256(victim.read_bytes()).hexdigest(),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    code, _ = baqup_verify(job_dir(snapshot_env))
    assert code == 65
    finish(restore(snapshot_env, jobs, name="../../victim.bin"), 65)
    assert not Path(snapshot_env["MARKER"]).exists()


# --- secrets in no sink ---------------------------------------------------------------------------


def spellings(value: str) -> set[str]:
    """Every spelling of a secret a sink could hold: plain, URL, JSON, base64, hex."""
    raw = value.encode()
    forms = {
        value,
        urllib.parse.quote(value, safe=""),
        urllib.parse.quote_plus(value),
        urllib.parse.quote(value),
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
        raw.hex(),
        raw.hex().upper(),
    }
    return {f for f in forms if len(f) >= 8}


def halves(value: str) -> set[str]:
    return {value[: len(value) // 2], value[len(value) // 2 :]}


def leaf_strings(value: Any) -> Iterator[str]:
    """Every string inside a JSON-like value, and inside JSON found in those strings."""
    if isinstance(value, str):
        yield value
        stripped = value.strip()
        if stripped[:1] in ("{", "[", '"'):
            try:
                inner = json.loads(stripped)
            except ValueError:
                return
            yield from leaf_strings(inner)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from leaf_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from leaf_strings(item)


def text_sink(text: str) -> list[str]:
    """A text sink as itself plus the decoded strings of every JSON line in it."""
    out = [text]
    for line in text.splitlines():
        out.extend(leaf_strings(line))
    return out


def redis_sinks(client: redis.Redis, key_prefix: str) -> dict[str, list[str]]:
    """Every key under the prefix, by type, as the strings it holds."""
    sinks: dict[str, list[str]] = {}
    for key in client.scan_iter(match=f"{key_prefix}*"):
        kind = str(client.type(key))
        values: list[str] = []
        if kind == "hash":
            fields: dict[str, str] = client.hgetall(key)  # type: ignore[assignment]
            for name, text in fields.items():
                values.extend([name, *leaf_strings(text)])
        elif kind == "stream":
            entries: list[tuple[str, dict[str, str]]] = client.xrange(key)  # type: ignore[assignment]
            for _, entry in entries:
                for name, text in entry.items():
                    values.extend([name, *leaf_strings(text)])
        elif kind == "string":
            values.extend(leaf_strings(str(client.get(key))))
        else:
            values.append(f"unexpected key type {kind}")
        sinks[f"redis {key}"] = values
    return sinks


def assert_no_leak(sinks: Mapping[str, Iterable[str]], needles: Iterable[str]) -> None:
    needles = sorted(set(needles))
    leaks = [
        (name, needle, text[max(0, text.find(needle) - 60) : text.find(needle) + 60])
        for name, texts in sinks.items()
        for text in texts
        for needle in needles
        if needle in text
    ]
    assert not leaks, "secrets leaked:\n" + "\n".join(map(repr, leaks[:20]))


LEAKY_CHILD = """
import base64, json, os, sys, time, urllib.parse
token = os.environ["BAQUP_SECRET_TOKEN"]
password = os.environ["BAQUP_SECRET_DB_PASSWORD"]
bus = os.environ["BAQUP_BUS_URL"]
sync = os.environ["SYNC"]
ctl = os.fdopen(int(os.environ["BAQUP_CONTROL_FD"]), "w", buffering=1)

def send(**message):
    ctl.write(json.dumps(message) + "\\n")
    ctl.flush()

print("plain", token, password, flush=True)
print("stderr", token, password, file=sys.stderr, flush=True)
half = len(token) // 2
sys.stdout.write("split " + token[:half])
sys.stdout.flush()
time.sleep(0.4)
sys.stdout.write(token[half:] + " end of the line\\n")
sys.stdout.flush()
for value in (token, password, bus):
    print("url", urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value), flush=True)
    print("b64", base64.b64encode(value.encode()).decode(), flush=True)
    print("b64url", base64.urlsafe_b64encode(value.encode()).decode(), flush=True)
    print("json", json.dumps({"value": value}), json.dumps(value, ensure_ascii=False), flush=True)
    print("hex", value.encode().hex(), value.encode().hex().upper(), file=sys.stderr, flush=True)
print("bus url", bus, flush=True)
send(type="progress", percent_complete=50, files_processed=1,
     current_file=f"/data/{token}/file-{password}")
send(type="event", severity="warn", code="FILE_CHANGED",
     message=f"changed {token} {password} {bus}", path=f"/data/{token}/{password}")
send(type="metadata", source_metadata={
    "dsn": f"postgres://user:{token}@db/x", "token": token, "password": password,
    "nested": {"list": [token, password, bus]}, token: "as a key"})
send(type="log", level="warn", message=f"log line {token} {password} {bus}",
     context={"secret": token, "url": bus, "password": password})
send(type="intent", operation=f"dumping {token}", detail=f"with {password} on {bus}",
     expected_duration_seconds=30)
ctl.write(f"this is not json {token} {password}\\n")
ctl.flush()
ctl.write(json.dumps({"type": "no-such-type", "payload": token}) + "\\n")
ctl.flush()
open(os.path.join(sync, "ready"), "w").close()
for _ in range(400):
    if os.path.exists(os.path.join(sync, "go")):
        break
    time.sleep(0.05)
send(type="intent", operation=None)
with open(os.path.join(os.environ["BAQUP_WORK_DIR"], "dump.sql"), "w") as out:
    out.write("-- a harmless artifact\\n")
"""


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, with a password."""
    server = start_redis(tmp_path / "private-redis")
    # set after the start: conftest's readiness PING does not authenticate
    with server.client() as admin:
        admin.config_set("requirepass", BUS_PASSWORD)
    try:
        with server.client() as anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        yield server
    finally:
        server.stop()


def secret_env(job_env: Mapping[str, str], bus_url: str, sync: Path) -> dict[str, str]:
    env = dict(job_env)
    env.update(
        BAQUP_BUS_URL=bus_url,
        BAQUP_SECRET_TOKEN=TOKEN,
        BAQUP_SECRET_DB_PASSWORD=PASSWORD,
        BAQUP_AGENT_HEARTBEAT_INTERVAL="1",
        SYNC=str(sync),
    )
    sync.mkdir()
    return env


def needles(bus_password: str = BUS_PASSWORD) -> set[str]:
    return spellings(TOKEN) | spellings(PASSWORD) | spellings(bus_password) | halves(TOKEN)


def test_secrets_reach_no_sink(
    job_env: dict[str, str], private_redis: RedisServer, tmp_path: Path, jobs: list[Job]
) -> None:
    client = redis.Redis(
        host="127.0.0.1", port=private_redis.port, password=BUS_PASSWORD, decode_responses=True
    )
    bus_url = f"redis://:{BUS_PASSWORD}@127.0.0.1:{private_redis.port}/0"
    env = secret_env(job_env, bus_url, tmp_path / "sync")
    p = prefix(env)
    listener = NotifyListener(client, f"{p}notify")
    try:
        job = py_job(LEAKY_CHILD, env, jobs)
        wait_for((tmp_path / "sync" / "ready").exists, timeout=30, what="child ready")
        heartbeat_key = f"{p}heartbeat:{env['BAQUP_AGENT_ID']}"
        # while the intent is set: the heartbeat carries it, progress and events are out
        beat = wait_for(
            lambda: read_hash(client, heartbeat_key).get("intent"), timeout=10, what="intent"
        )
        assert beat is not None
        mid_job = redis_sinks(client, p)
        (tmp_path / "sync" / "go").touch()
        finish(job, 0)
        messages = listener.collect(lambda ms: any(m.get("type") == "status" for m in ms))
    finally:
        listener.close()
    sinks: dict[str, list[str]] = {
        "stderr": text_sink(job.stderr()),
        "stdout": text_sink(job.stdout()),
        "notify": [s for m in messages for s in leaf_strings(m)],
    }
    sinks.update({f"mid-job {k}": v for k, v in mid_job.items()})
    sinks.update(redis_sinks(client, p))
    for path in sorted(job_dir(env).rglob("*")):
        if path.is_file() and path.name != "dump.sql":
            sinks[str(path)] = text_sink(path.read_text(errors="replace"))
    client.close()
    # the sinks are really there, holding what the child sent (masked)
    keys = {name.split(" ", 1)[1] for name in sinks if name.startswith("redis ")}
    job_id = env["BAQUP_JOB_ID"]
    assert {f"{p}status:{job_id}", f"{p}events:{job_id}", f"{p}progress:{job_id}"} <= keys
    assert any(k.startswith("mid-job redis") and "heartbeat" in k for k in sinks)
    assert any("[REDACTED]" in s for s in sinks[f"redis {p}progress:{job_id}"])
    assert any("[REDACTED]" in s for s in sinks[str(job_dir(env) / "manifest.json")])
    assert any("PROTOCOL_ERROR" in s for s in sinks[f"redis {p}events:{job_id}"])
    assert any("split" in s and "end of the line" in s for s in sinks["stderr"])
    assert len(messages) >= 3
    assert_no_leak(sinks, needles())


def test_secrets_reach_no_sink_when_the_bus_is_down(
    job_env: dict[str, str], tmp_path: Path, jobs: list[Job]
) -> None:
    """The status goes to .baqup-status.json and messages to the fallback buffer: both
    are sinks too."""
    closed = free_port()
    env = secret_env(job_env, f"redis://:{BUS_PASSWORD}@127.0.0.1:{closed}/0", tmp_path / "sync")
    env.update(
        BAQUP_BUS_GRACE_PERIOD="1",
        BAQUP_BUS_RECONNECT_MAX_ATTEMPTS="1",
        BAQUP_BUS_TIMEOUT="1",
    )
    (tmp_path / "sync" / "go").touch()
    job = py_job(LEAKY_CHILD, env, jobs)
    finish(job, 75)
    status_file = job_dir(env) / ".baqup-status.json"
    status = json.loads(status_file.read_text())
    assert status["status"] == "success"
    assert status["exit_code"] == 0
    sinks: dict[str, list[str]] = {
        "stderr": text_sink(job.stderr()),
        "stdout": text_sink(job.stdout()),
    }
    files = [p for p in job_dir(env).rglob("*") if p.is_file() and p.name != "dump.sql"]
    files += [p for p in Path(env["BAQUP_BUS_FALLBACK_DIR"]).rglob("*") if p.is_file()]
    for path in files:
        sinks[str(path)] = text_sink(path.read_text(errors="replace"))
    assert str(status_file) in sinks
    assert any("[REDACTED]" in s for s in sinks[str(status_file)] + sinks["stderr"])
    assert_no_leak(sinks, needles())


# --- resource limits ------------------------------------------------------------------------------

ALLOCATE = """
import time
chunks = []
for _ in range(90):  # up to 720 MB, 8 MB at a time, every byte touched
    chunks.append(b"\\x01" * (8 << 20))
    time.sleep(0.03)
time.sleep(30)
"""

FORKS_AN_ALLOCATING_GRANDCHILD = f"""
import subprocess, sys
grandchild = subprocess.Popen([sys.executable, "-c", {ALLOCATE!r}])
sys.exit(grandchild.wait())
"""


@pytest.mark.parametrize(
    "code", [ALLOCATE, FORKS_AN_ALLOCATING_GRANDCHILD], ids=["child", "grandchild"]
)
def test_memory_past_the_limit_of_the_child_tree_aborts_the_job(
    job_env: dict[str, str],
    redis_server: RedisServer,
    redis_client: redis.Redis,
    jobs: list[Job],
    code: str,
) -> None:
    env = redis_env(job_env, redis_server)
    env["BAQUP_AGENT_MEMORY_LIMIT"] = "100M"
    started = time.monotonic()
    job = py_job(code, env, jobs)
    finish(job, 1, timeout=60)
    assert time.monotonic() - started < 25, "the limit was not enforced before the child ended"
    events = events_of(redis_client, env)
    exceeded = [e for e in events if e.get("code") == "RESOURCE_LIMIT_EXCEEDED"]
    assert exceeded, events
    assert exceeded[0]["severity"] == "error"
    status = status_of(redis_client, env)
    assert status["status"] == "failed"
    assert status["exit_code"] == 1
    assert status["error"]["code"] == "RESOURCE_LIMIT_EXCEEDED"
    assert not (job_dir(env) / "manifest.json").exists()


FILES_PAST_THE_LIMIT = """
import json, os, time
ctl = os.fdopen(int(os.environ["BAQUP_CONTROL_FD"]), "w", buffering=1)
for files in (10, 95, 96, 101):
    ctl.write(json.dumps({"type": "progress", "files_processed": files}) + "\\n")
    ctl.flush()
    time.sleep(0.1)
time.sleep(30)
"""


def test_files_past_baqup_source_max_files_warn_then_abort(
    job_env: dict[str, str],
    redis_server: RedisServer,
    redis_client: redis.Redis,
    jobs: list[Job],
) -> None:
    env = redis_env(job_env, redis_server)
    env["BAQUP_SOURCE_MAX_FILES"] = "100"
    started = time.monotonic()
    finish(py_job(FILES_PAST_THE_LIMIT, env, jobs), 1)
    assert time.monotonic() - started < 25
    codes = [e["code"] for e in events_of(redis_client, env)]
    assert "RESOURCE_LIMIT_APPROACHING" in codes
    assert "RESOURCE_LIMIT_EXCEEDED" in codes
    assert codes.index("RESOURCE_LIMIT_APPROACHING") < codes.index("RESOURCE_LIMIT_EXCEEDED")
    status = status_of(redis_client, env)
    assert status["exit_code"] == 1
    assert status["error"]["code"] == "RESOURCE_LIMIT_EXCEEDED"
    assert status["warnings_summary"]["RESOURCE_LIMIT_APPROACHING"] == 1


# --- log sanitising -------------------------------------------------------------------------------

CHATTY_CHILD = """
import os, sys
print("uploaded /data/uploads/alice/cv.pdf", file=sys.stderr, flush=True)
print("connecting to postgres://bob:hunter2@db/x", flush=True)
print("the token is", os.environ["BAQUP_SECRET_TOKEN"], file=sys.stderr, flush=True)
with open(os.path.join(os.environ["BAQUP_WORK_DIR"], "out.txt"), "w") as out:
    out.write("artifact\\n")
"""


@pytest.mark.parametrize("mode", ["strict", "moderate", "none"])
def test_child_lines_are_sanitised_per_mode_and_secrets_always_masked(
    job_env: dict[str, str], jobs: list[Job], mode: str
) -> None:
    env = dict(job_env)
    env.update(BAQUP_AGENT_LOG_SANITIZE=mode, BAQUP_SECRET_TOKEN=TOKEN)
    job = py_job(CHATTY_CHILD, env, jobs)
    finish(job, 0)
    stderr = job.stderr()
    child = [r["message"] for r in job.logs() if r.get("component") == "child"]
    assert len(child) == 3, child
    upload = next(m for m in child if m.startswith("uploaded"))
    dsn = next(m for m in child if m.startswith("connecting"))
    token = next(m for m in child if m.startswith("the token"))
    assert "[REDACTED]" in token
    assert_no_leak({"stderr": text_sink(stderr)}, spellings(TOKEN))
    if mode == "strict":
        assert "alice" not in stderr
        assert "cv.pdf" not in upload
        assert upload.endswith(".pdf")
        assert "hunter2" not in stderr
    elif mode == "moderate":
        assert "hunter2" not in stderr
        assert "postgres://bob:" in dsn
        assert "/data/uploads/alice/cv.pdf" in upload
    else:
        assert "postgres://bob:hunter2@db/x" in dsn
        assert "/data/uploads/alice/cv.pdf" in upload
