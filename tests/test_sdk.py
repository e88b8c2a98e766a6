"""The in-process SDK (`baqup_supervisor.agent`): a Python agent on baqup-run's own core.

Real buses (the embedded file bus and the session's redis-server), real staging dirs
and `baqup verify`: the happy path with every reporting call, partial failure in
`fail` and `warn` modes, an exception and a BaqupError in the body, a configuration
error, and, in a child process since it signals the process, SIGUSR1 (a beat at once)
and SIGTERM (ShutdownRequested raised into the body, status failed/ABORTED). Last, the
SDK and baqup-run must share their lifecycle code rather than each having one.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import baqup_supervisor.agent as agent_module
import baqup_supervisor.lifecycle as lifecycle_module
import baqup_supervisor.session as session_module
import baqup_supervisor.supervisor as supervisor_module
from baqup_supervisor.agent import Agent, run
from baqup_supervisor.contract import AgentState, ExitCode
from baqup_supervisor.errors import (
    BaqupError,
    ConfigError,
    DataError,
    ResourceUnavailable,
    SecurityViolation,
    StorageIOError,
)
from tests.conftest import REPO, RedisServer, python_child, run_baqup
from tests.jobs import NotifyListener, job_dir, prefix, read_hash, read_stream, redis_env, wait_for

AGENT = "agent-sdk-test"
VERSION = "2.3.4"
SECRET = "sdk-secret-value-4242"


@pytest.fixture
def schema(tmp_path: Path) -> str:
    path = tmp_path / "agent-schema.json"
    path.write_text(
        json.dumps(
            {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "properties": {
                    "BAQUP_SOURCE_PATH": {"type": "string", "format": "path", "default": "/srv"},
                    "BAQUP_SECRET_TOKEN": {"type": "string"},
                },
                "x-baqup-agent": {"agent": AGENT, "version": VERSION, "roles": ["snapshot"]},
            }
        )
    )
    return str(path)


@pytest.fixture(params=["file", "redis"])
def env(
    request: pytest.FixtureRequest, job_env: dict[str, str], redis_server: RedisServer
) -> dict[str, str]:
    out = redis_env(job_env, redis_server) if request.param == "redis" else dict(job_env)
    out["BAQUP_SECRET_TOKEN"] = SECRET
    return out


class Bus:
    """Reads what a job wrote, on whichever bus `env` names."""

    def __init__(self, env: dict[str, str], client: redis.Redis) -> None:
        self.env = env
        self.client = client
        self.redis = env["BAQUP_BUS_URL"].startswith("redis://")
        self.prefix = prefix(env)
        self.job_id = env["BAQUP_JOB_ID"]
        self.directory = Path(env["BAQUP_BUS_URL"].removeprefix("file://"))
        self.listener = NotifyListener(client, f"{self.prefix}notify") if self.redis else None

    def lines(self, key: str) -> list[dict[str, Any]]:
        path = self.directory / f"{key}.jsonl"
        if not path.exists():
            return []
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]

    def status(self) -> dict[str, Any]:
        key = f"{self.prefix}status:{self.job_id}"
        if self.redis:
            return read_hash(self.client, key)
        found = self.lines(key)
        return found[-1] if found else {}

    def progress(self) -> dict[str, Any]:
        key = f"{self.prefix}progress:{self.job_id}"
        if self.redis:
            return read_hash(self.client, key)
        found = self.lines(key)
        return found[-1] if found else {}

    def events(self) -> dict[str, dict[str, Any]]:
        key = f"{self.prefix}events:{self.job_id}"
        entries = read_stream(self.client, key) if self.redis else self.lines(key)
        latest: dict[str, dict[str, Any]] = {}
        for entry in entries:
            latest[str(entry["code"])] = entry
        return latest

    def heartbeat(self) -> dict[str, Any]:
        key = f"{self.prefix}heartbeat:{self.env['BAQUP_AGENT_ID']}"
        if self.redis:
            return read_hash(self.client, key)
        found = self.lines(key)
        return found[-1] if found else {}

    def notify(self, until: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
        if self.listener is not None:
            return self.listener.collect(until, timeout=10)
        found = self.lines(f"{self.prefix}notify")
        assert until(found), found
        return found

    def everything(self) -> str:
        if self.redis:
            parts = []
            for key in self.client.scan_iter(match=f"{self.prefix}*"):
                kind = self.client.type(key)
                if kind == "hash":
                    parts.append(json.dumps(self.client.hgetall(key)))
                elif kind == "stream":
                    parts.append(json.dumps(self.client.xrange(key)))
            if self.listener is not None:
                parts.append(json.dumps(self.listener.poll()))
            return "\n".join(parts)
        return "\n".join(p.read_text() for p in sorted(self.directory.glob("*.jsonl")))

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()


@pytest.fixture
def bus(env: dict[str, str], redis_client: redis.Redis) -> Iterator[Bus]:
    reader = Bus(env, redis_client)
    yield reader
    reader.close()


def states(messages: list[dict[str, Any]]) -> list[str]:
    return [m["state"] for m in messages if m.get("type") == "state"]


def final_status_seen(messages: list[dict[str, Any]]) -> bool:
    return any(m.get("type") == "status" for m in messages)


def verify(path: Path, env: dict[str, str]) -> int:
    return run_baqup(["verify", str(path)], env, tool=True).returncode


# --- the happy path ------------------------------------------------------------------------


def test_happy_path(env: dict[str, str], bus: Bus, schema: str) -> None:
    with Agent(environ=env, schema=schema) as agent:
        assert agent.state is AgentState.RUNNING
        assert agent["BAQUP_SOURCE_PATH"] == "/srv"  # the schema's default
        token = agent.secret("BAQUP_SECRET_TOKEN")
        assert token is not None
        assert token.reveal() == SECRET
        assert str(token) == "[REDACTED]"
        agent.intent("dump", expected_seconds=30, detail="the orders table")

        def beat_with_intent() -> dict[str, Any] | None:
            beat = bus.heartbeat()
            return beat if (beat.get("intent") or {}).get("operation") == "dump" else None

        beat = wait_for(beat_with_intent, timeout=5, what="a heartbeat carrying the intent")
        assert beat is not None
        assert beat["intent"] == {
            "operation": "dump",
            "expected_duration_seconds": 30,
            "detail": "the orders table",
        }
        assert beat["state"] == "running"
        agent.progress(50, bytes=1000, files=1, current_file="orders")
        agent.event("PERMISSION_DENIED", message="not readable", path="/srv/a")
        agent.event("PERMISSION_DENIED", message="not readable", path="/srv/b")
        agent.event("FILE_CHANGED", severity="info", message="grew", path="/srv/c")
        data = agent.artifact_path("sub/orders.json")
        assert data == agent.work_dir / "sub" / "orders.json"
        data.write_text(json.dumps({"rows": 3, "token": "not the secret"}))
        agent.component("orders", "success", artifact="sub/orders.json")
        agent.metadata(type="sdk-test", rows=3)
        agent.metadata(tables=["orders"])
        agent.intent(None)
        agent.progress(100, bytes=2000, files=2)
    assert agent.exit_code == 0
    assert agent.result is ExitCode.SUCCESS
    assert agent.state is AgentState.TERMINATED

    jdir = job_dir(env)
    assert verify(jdir, env) == 0
    manifest = json.loads((jdir / "manifest.json").read_text())
    assert manifest["agent"] == AGENT
    assert manifest["agent_version"] == VERSION
    assert manifest["role"] == "snapshot"
    assert [a["filename"] for a in manifest["artifacts"]] == ["sub/orders.json"]
    assert manifest["source_metadata"] == {"type": "sdk-test", "rows": 3, "tables": ["orders"]}

    notified = bus.notify(final_status_seen)
    assert states(notified) == ["running", "completing", "terminated"]
    status = bus.status()
    assert status["status"] == "success"
    assert status["exit_code"] == 0
    assert status["error"] is None
    assert status["role"] == "snapshot"
    assert status["agent"] == AGENT
    (listed,) = status["files"]
    assert listed["path"] == str(jdir / "sub" / "orders.json")
    assert listed["checksum_sha256"] == manifest["artifacts"][0]["checksum"]["value"]
    assert status["warnings_summary"] == {"PERMISSION_DENIED": 2, "FILE_CHANGED": 1}
    assert status["summary"] == {"total": 1, "succeeded": 1, "failed": 0}
    assert status["components"] == [
        {"name": "orders", "status": "success", "artifact": "sub/orders.json"}
    ]
    assert status["metrics"]["files_processed"] == 2
    assert status["metrics"]["bytes_processed"] == 2000
    progress = bus.progress()
    assert progress["percent_complete"] == 100
    assert progress["bytes_processed"] == 2000
    events = bus.events()
    assert events["PERMISSION_DENIED"]["count"] == 2
    assert events["PERMISSION_DENIED"]["sample_paths"] == ["/srv/a", "/srv/b"]
    assert events["FILE_CHANGED"]["severity"] == "info"
    last_beat = bus.heartbeat()
    assert last_beat["state"] == "terminated"
    assert last_beat["intent"] is None
    assert SECRET not in bus.everything()


# --- partial failure -------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "code"), [("fail", 76), ("warn", 0)])
def test_partial_failure(mode: str, code: int, env: dict[str, str], bus: Bus, schema: str) -> None:
    env["BAQUP_AGENT_PARTIAL_FAILURE_MODE"] = mode
    with Agent(environ=env, schema=schema) as agent:
        agent.artifact_path("db1.sql").write_text("one\n")
        agent.component("db1", "success", artifact="db1.sql")
        agent.artifact_path("db2.sql").write_text("half of two\n")
        agent.component(
            "db2", "failed", artifact="db2.sql", error={"code": "DUMP_FAILED", "message": "x"}
        )
        with pytest.raises(ValueError, match="status"):
            agent.component("db3", "maybe")
    assert agent.exit_code == code
    jdir = job_dir(env)
    assert verify(jdir, env) == 0
    manifest = json.loads((jdir / "manifest.json").read_text())
    assert [a["filename"] for a in manifest["artifacts"]] == ["db1.sql"]
    assert not (jdir / "db2.sql").exists()
    status = bus.status()
    assert status["status"] == "partial"
    assert status["exit_code"] == code
    assert status["summary"] == {"total": 2, "succeeded": 1, "failed": 1}
    assert status["components"] == [
        {"name": "db1", "status": "success", "artifact": "db1.sql"},
        {
            "name": "db2",
            "status": "failed",
            "artifact": "db2.sql",
            "error": {"code": "DUMP_FAILED", "message": "x"},
        },
    ]
    assert [f["path"] for f in status["files"]] == [str(jdir / "db1.sql")]
    assert states(bus.notify(final_status_seen))[-1] == "terminated"


# --- failures in the body ----------------------------------------------------------------------


def test_exception_in_the_body(env: dict[str, str], bus: Bus, schema: str) -> None:
    agent = Agent(environ=env, schema=schema)

    def body() -> None:
        with agent:
            agent.artifact_path("half.bin").write_bytes(b"half")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):  # not swallowed: the agent's own bug
        body()
    assert agent.exit_code == 70
    assert agent.state is AgentState.FAILED
    jdir = job_dir(env)
    assert not (jdir / "manifest.json").exists()
    assert not (jdir / "half.bin").exists()
    assert verify(jdir, env) == 65
    status = bus.status()
    assert status["status"] == "failed"
    assert status["exit_code"] == 70
    assert status["error"]["code"] == "INTERNAL_ERROR"
    assert "RuntimeError: boom" in status["error"]["message"]
    assert status["files"] == []
    assert states(bus.notify(final_status_seen))[-1] == "failed"


def test_run_returns_the_exit_code_of_an_exception(
    env: dict[str, str], bus: Bus, schema: str
) -> None:
    calls: list[Agent] = []

    def body(agent: Agent) -> None:
        calls.append(agent)
        raise KeyError("missing")

    assert run(body, environ=env, schema=schema) == 70
    assert len(calls) == 1
    assert bus.status()["status"] == "failed"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (DataError("the source is corrupt", code="SOURCE_CORRUPT"), 65),
        (ResourceUnavailable("the database is down", code="DB_DOWN"), 69),
        (StorageIOError("disk full", code="DISK_FULL"), 74),
    ],
    ids=["data", "unavailable", "io"],
)
def test_baqup_error_in_the_body(
    error: BaqupError, code: int, env: dict[str, str], bus: Bus, schema: str
) -> None:
    with Agent(environ=env, schema=schema) as agent:  # the error is handled, not re-raised
        agent.artifact_path("x.bin").write_bytes(b"x")
        raise error
    assert agent.exit_code == code
    assert not (job_dir(env) / "manifest.json").exists()
    status = bus.status()
    assert status["status"] == "failed"
    assert status["exit_code"] == code
    assert status["error"]["code"] == error.code
    assert status["error"]["message"] == error.message
    assert status["error"]["retriable"] is error.retriable


def test_artifact_outside_the_work_dir_is_refused(
    env: dict[str, str], bus: Bus, schema: str
) -> None:
    with Agent(environ=env, schema=schema) as agent:
        with pytest.raises(SecurityViolation):
            agent.artifact_path("../escape.txt")
        agent.artifact_path("/etc/evil")
    assert agent.exit_code == 65
    assert not (job_dir(env).parent / "escape.txt").exists()
    assert bus.status()["error"]["code"] == "SECURITY_VIOLATION"


def test_config_error(job_env: dict[str, str], schema: str) -> None:
    env = {k: v for k, v in job_env.items() if k != "BAQUP_BUS_URL"}
    called: list[Agent] = []
    assert run(called.append, environ=env, schema=schema) == 64
    assert called == []
    with pytest.raises(ConfigError) as raised:
        Agent(environ=env, schema=schema)
    assert [p.variable for p in raised.value.problems] == ["BAQUP_BUS_URL"]
    assert not job_dir(job_env).exists()


# --- signals, in a child process ----------------------------------------------------------------

SIGNALLED = r"""
import os, sys, time
from pathlib import Path
from baqup_supervisor.agent import Agent
from baqup_supervisor.errors import ShutdownRequested

d = Path(sys.argv[1])
agent = Agent(schema=sys.argv[2])
with agent:
    agent.artifact_path("partial.bin").write_bytes(b"half a backup")
    (d / "ready").write_text(str(os.getpid()))
    try:
        while True:
            time.sleep(0.02)
    except ShutdownRequested as exc:
        (d / "shutdown-seen").write_text(str(exc.signum))
        raise
    (d / "not-reached").write_text("")
raise SystemExit(agent.exit_code)
"""


def test_sigusr1_beats_and_sigterm_aborts(
    job_env: dict[str, str], schema: str, tmp_path: Path
) -> None:
    env = dict(job_env)
    env["BAQUP_AGENT_HEARTBEAT_INTERVAL"] = "600"  # no beat but the ones asked for
    marks = tmp_path / "marks"
    marks.mkdir()
    bus_dir = Path(env["BAQUP_BUS_URL"].removeprefix("file://"))
    beats_file = bus_dir / f"{prefix(env)}heartbeat:{env['BAQUP_AGENT_ID']}.jsonl"

    def beats() -> int:
        return len(beats_file.read_text().splitlines()) if beats_file.exists() else 0

    with (tmp_path / "child.err").open("wb") as err:
        child = subprocess.Popen(
            [*python_child(SIGNALLED), str(marks), schema],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        wait_for((marks / "ready").exists, timeout=15, what="the agent's body")
        # let the start-up beats (first beat, state change) land, then count
        previous = -1
        while (count := beats()) != previous:
            previous = count
            time.sleep(0.3)
        sent = time.monotonic()
        os.kill(child.pid, signal.SIGUSR1)
        wait_for(lambda: beats() > count, timeout=5, what="a heartbeat after SIGUSR1")
        assert time.monotonic() - sent < 5
        assert child.poll() is None  # SIGUSR1 does not end the job
        last = json.loads(beats_file.read_text().splitlines()[-1])
        assert last["state"] == "running"

        os.kill(child.pid, signal.SIGTERM)
        code = child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
    stderr = (tmp_path / "child.err").read_text()
    assert code == 1, stderr[-3000:]
    assert (marks / "shutdown-seen").read_text() == str(int(signal.SIGTERM))
    assert not (marks / "not-reached").exists()
    jdir = job_dir(env)
    assert not (jdir / "manifest.json").exists()
    assert (jdir / ".staging" / "partial.bin").exists()  # BAQUP_ARTIFACT_RETAIN_ON_FAILURE
    status_lines = (bus_dir / f"{prefix(env)}status:{env['BAQUP_JOB_ID']}.jsonl").read_text()
    status = json.loads(status_lines.splitlines()[-1])
    assert status["status"] == "failed"
    assert status["exit_code"] == 1
    assert status["error"]["code"] == "ABORTED"
    assert "SIGTERM" in status["error"]["message"]
    notify = (bus_dir / f"{prefix(env)}notify.jsonl").read_text().splitlines()
    assert [json.loads(n).get("state") for n in notify if '"type":"state"' in n][-1] == "failed"


# --- one lifecycle for baqup-run and the SDK ---------------------------------------------------


def test_sdk_and_supervisor_share_the_lifecycle(job_env: dict[str, str], schema: str) -> None:
    source = inspect.getsource(agent_module)
    assert "TRANSITIONS" not in source
    assert not re.search(r"def\s+advance\b", source)
    assert not re.search(r"class\s+\w*(Lifecycle|State)\w*", source)
    assert vars(agent_module)["Session"] is session_module.Session
    assert vars(supervisor_module)["Session"] is session_module.Session
    assert "TRANSITIONS" not in inspect.getsource(supervisor_module)
    assert not re.search(r"def\s+advance\b", inspect.getsource(supervisor_module))
    agent = Agent(environ=job_env, schema=schema, handle_signals=False)
    assert isinstance(agent.session, session_module.Session)
    assert isinstance(agent.session.lifecycle, lifecycle_module.Lifecycle)
    assert agent.state is AgentState.INITIALIZING
