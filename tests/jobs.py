"""Shared helpers for tests that run real `baqup-run` jobs (not a test module).

Stable API (keep it small; other test files import it):

- `start_job(args, env, workdir=None) -> Job`: start `python -m baqup_supervisor *args` in
  the background; stdout/stderr go to files under `workdir` (no pipe can fill up). `Job`
  has `.process`, `.pid`, `.wait(timeout) -> int`, `.stdout()`, `.stderr()`, `.logs()`
  and `.stop()` (SIGTERM then SIGKILL by PID, a no-op once it has exited).
- `read_hash(client, key) -> dict[str, Any]`: a Redis hash with each field JSON-decoded
  when it is JSON (strings are stored as they are, so non-JSON text stays a str).
- `decode_fields(fields) -> dict[str, Any]`: the same decoding for a stream entry.
- `read_stream(client, key) -> list[dict[str, Any]]`: every entry of a Redis stream, in
  order, each decoded like `decode_fields`.
- `wait_for(predicate, timeout, interval) -> T`: poll until `predicate()` is truthy and
  return its value; raise `AssertionError` on timeout.
- `log_records(stderr_text) -> list[dict]`: the JSON log records in a stderr text
  (non-JSON lines are skipped).
- `redis_env(job_env, redis_server) -> dict[str, str]`: a copy of `job_env` whose
  `BAQUP_BUS_URL` is the real redis server.
- `job_dir(env) -> Path`: `$BAQUP_STAGING_DIR/$BAQUP_JOB_ID`.
- `restore_env(snapshot_env, **extra) -> dict[str, str]`: a restore of that snapshot as a
  job of its own (a new `BAQUP_JOB_ID`, `BAQUP_RESTORE_FROM` its job dir).
- `prefix(env) -> str`: the key prefix (`BAQUP_BUS_KEY_PREFIX`).
- `NotifyListener(client, channel)`: a pub/sub subscription made *before* the job
  starts; `.collect(until, timeout)` gathers decoded JSON messages until `until(msgs)`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis

from tests.conftest import RedisServer, stop_pid

T = TypeVar("T")

__all__ = [
    "Job",
    "NotifyListener",
    "decode_fields",
    "decode_value",
    "job_dir",
    "log_records",
    "prefix",
    "read_hash",
    "read_stream",
    "redis_env",
    "start_job",
    "wait_for",
]


@dataclass
class Job:
    """A running `baqup-run` subprocess whose output goes to files."""

    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    _closed: list[Any] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self, timeout: float = 60) -> int:
        """Wait for the exit code; on timeout kill the job and fail the test."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"baqup-run did not exit within {timeout}s; stderr tail:\n{self.stderr()[-3000:]}"
            ) from None

    def poll(self) -> int | None:
        return self.process.poll()

    def signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def logs(self) -> list[dict[str, Any]]:
        return log_records(self.stderr())

    def stop(self) -> None:
        """Stop baqup-run by its PID if still running (SIGTERM, then SIGKILL)."""
        if self.process.poll() is None:
            try:
                stop_pid(self.process, timeout=5)
            except subprocess.TimeoutExpired:
                pass
            if self.process.poll() is None:
                try:
                    os.kill(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=10)


def start_job(
    args: list[str], env: Mapping[str, str], workdir: Path | None = None, *, name: str = "job"
) -> Job:
    """Start the real baqup-run in the background.

    Its stdout and stderr go to `workdir/{name}.out` and `.err` (`workdir` defaults to
    the directory holding `$BAQUP_STAGING_DIR`, i.e. the test's tmp_path with `job_env`);
    a numeric suffix keeps the names of several jobs in one directory apart.
    """
    if workdir is None:
        workdir = Path(env["BAQUP_STAGING_DIR"]).parent / "jobs-output"
    workdir.mkdir(parents=True, exist_ok=True)
    stem, index = name, 1
    while (workdir / f"{stem}.err").exists():
        index += 1
        stem = f"{name}-{index}"
    out_path = workdir / f"{stem}.out"
    err_path = workdir / f"{stem}.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "baqup_supervisor", *args],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    return Job(process, out_path, err_path)


def decode_value(value: str) -> Any:
    """A bus field: JSON when it parses as JSON, else the string itself."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def decode_fields(fields: Mapping[str, str]) -> dict[str, Any]:
    return {k: decode_value(v) for k, v in fields.items()}


def read_hash(client: redis.Redis, key: str) -> dict[str, Any]:
    """A Redis hash, each field JSON-decoded where it is JSON ({} when the key is absent).

    `client` must use decode_responses=True (the `redis_client` fixture does).
    """
    raw: dict[str, str] = client.hgetall(key)  # type: ignore[assignment]
    return decode_fields(raw)


def read_stream(client: redis.Redis, key: str) -> list[dict[str, Any]]:
    """Every entry of a Redis stream (XRANGE - +), in order, fields decoded."""
    entries: list[tuple[str, dict[str, str]]] = client.xrange(key)  # type: ignore[assignment]
    return [decode_fields(fields) for _, fields in entries]


def wait_for(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll `predicate` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate!r}")
        time.sleep(interval)


def log_records(stderr_text: str) -> list[dict[str, Any]]:
    """Every stderr line that is a JSON object (the structured log records)."""
    records: list[dict[str, Any]] = []
    for raw in stderr_text.splitlines():
        line = raw.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records


def redis_env(job_env: Mapping[str, str], redis_server: RedisServer) -> dict[str, str]:
    """A copy of `job_env` whose bus is the real redis-server."""
    env = dict(job_env)
    env["BAQUP_BUS_URL"] = redis_server.url
    return env


def job_dir(env: Mapping[str, str]) -> Path:
    return Path(env["BAQUP_STAGING_DIR"]) / env["BAQUP_JOB_ID"]


def restore_env(snapshot_env: Mapping[str, str], **extra: str) -> dict[str, str]:
    """The environment of a restore of `snapshot_env`'s committed job: a job of its own
    (a new BAQUP_JOB_ID) reading the snapshot from BAQUP_RESTORE_FROM (INTERFACE.md 11)."""
    env = {**snapshot_env, **extra}
    env.setdefault("BAQUP_RESTORE_FROM", str(job_dir(snapshot_env)))
    if env["BAQUP_JOB_ID"] == snapshot_env["BAQUP_JOB_ID"]:
        env["BAQUP_JOB_ID"] = str(uuid.uuid4())
    return env


def prefix(env: Mapping[str, str]) -> str:
    return env.get("BAQUP_BUS_KEY_PREFIX", "baqup:")


class NotifyListener:
    """A pub/sub subscription on one channel, made before the job starts."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self.pubsub = client.pubsub()  # type: ignore[no-untyped-call]
        self.pubsub.subscribe(channel)
        self.messages: list[dict[str, Any]] = []
        # Wait for the subscription to be confirmed so no early message is missed.
        deadline = time.monotonic() + 5
        while True:
            msg = self.pubsub.get_message(timeout=0.1)
            if msg and msg.get("type") == "subscribe":
                break
            if time.monotonic() >= deadline:
                raise AssertionError(f"no confirmation of SUBSCRIBE {channel}")

    def poll(self, timeout: float = 0.05) -> list[dict[str, Any]]:
        """Read whatever has arrived; return all messages so far."""
        end = time.monotonic() + timeout
        while True:
            msg = self.pubsub.get_message(timeout=max(0.0, end - time.monotonic()))
            if msg is None:
                if time.monotonic() >= end:
                    break
                continue
            if msg.get("type") == "message":
                data = msg["data"]
                if isinstance(data, bytes):
                    data = data.decode()
                value = decode_value(str(data))
                self.messages.append(value if isinstance(value, dict) else {"raw": value})
        return self.messages

    def collect(
        self, until: Callable[[list[dict[str, Any]]], bool], timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        """Gather messages until `until(messages)` holds; fail on timeout."""
        deadline = time.monotonic() + timeout
        while not until(self.messages):
            if time.monotonic() >= deadline:
                raise AssertionError(f"notify: condition not met; got {self.messages!r}")
            self.poll(0.05)
        return self.messages

    def close(self) -> None:
        self.pubsub.close()


def job_keys(client: redis.Redis, env: dict[str, str]) -> dict[str, Any]:
    """Every key of the job `env` names, with its value (hashes, streams, strings)."""
    found: dict[str, Any] = {}
    for key in client.scan_iter(match=f"{prefix(env)}*{env['BAQUP_JOB_ID']}*"):
        kind = client.type(key)
        if kind == "hash":
            found[key] = client.hgetall(key)
        elif kind == "stream":
            found[key] = client.xrange(key)
        else:
            found[key] = client.get(key) if kind == "string" else kind
    return found
