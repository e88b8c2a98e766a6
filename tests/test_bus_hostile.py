"""A hostile or unusual bus: every send error is "not delivered", never "delivered" (#11).

INTERFACE.md section 10: a send error of any kind ends in the fallback buffer and then
in exit 75 with `.baqup-status.json`; valid but unusual data (huge numbers, deep
nesting) is delivered; `baqup watch` never lets a child's escape sequences reach a
terminal and keeps its JSON lines valid when piped.

The hostile servers are written here: `HostileRedis` speaks enough of the Redis
protocol for redis-py (HELLO, CLIENT, PING, MULTI/EXEC, the writes baqup-run makes)
and misbehaves on the commands a test names: a garbage or binary reply, a reply cut
off by a close, or no reply at all. Everything else runs for real: `baqup-run` and
its child as subprocesses, the shared redis-server, `baqup watch` under a real
pseudo-terminal.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import socketserver
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis

from baqup_supervisor.bus import read_lines
from tests.conftest import RedisServer, free_port, python_child, run_baqup
from tests.jobs import Job, job_dir, prefix, read_hash, redis_env, start_job, wait_for

BAQUP = Path(sys.executable).parent / "baqup"
BIG = 100000000000000000000  # 10**20: beyond 64 bits
DEPTH = 300  # beyond orjson's 254 levels

# Writes one artifact; with HUGE set, a progress with numbers beyond 64 bits and a
# failed component whose error is nested DEPTH levels; with EVENT set, one event.
CHILD = r"""
import json, os, sys
control = os.fdopen(int(os.environ["BAQUP_CONTROL_FD"]), "w", buffering=1)
if os.environ.get("HUGE"):
    depth = int(os.environ["HUGE"])
    control.write('{"type":"progress","percent_complete":50,"bytes_processed":1e20,'
                  '"files_processed":100000000000000000000}\n')
    control.write('{"type":"component","name":"db1","status":"failed","error":'
                  + '{"nested":' * depth + '"bottom"' + '}' * depth + '}\n')
if os.environ.get("EVENT"):
    control.write(json.dumps({"type": "event", "severity": "warn", "code": "FILE_CHANGED",
                              "message": os.environ["EVENT"], "path": "/data/a"}) + "\n")
with open(os.path.join(os.environ["BAQUP_WORK_DIR"], "dump.bin"), "wb") as handle:
    handle.write(b"dump" * 256)
"""

CLOSE = "close"  # answer with the start of a bulk string, then close the connection
SILENT = "silent"  # never answer


def parse_commands(buffer: bytearray) -> list[list[bytes]]:
    """Take every complete RESP command (an array of bulk strings) off `buffer`."""
    commands: list[list[bytes]] = []
    while buffer.startswith(b"*"):
        end = buffer.find(b"\r\n")
        if end < 0:
            break
        count, position, args = int(buffer[1:end]), end + 2, []
        for _ in range(count):
            end = buffer.find(b"\r\n", position)
            if end < 0:
                return commands
            size = int(buffer[position + 1 : end])
            position = end + 2
            if len(buffer) < position + size + 2:
                return commands
            args.append(bytes(buffer[position : position + size]))
            position += size + 2
        commands.append(args)
        del buffer[:position]
    return commands


class HostileRedis:
    """A TCP server on 127.0.0.1 that plays Redis except for the commands in `faults`.

    `faults` maps a command name (`PING`, `CLIENT`, `EXEC`, `HSET`... or `*` for every
    command) to the raw bytes to answer, CLOSE or SILENT.
    """

    def __init__(self, faults: Mapping[str, bytes | str]) -> None:
        self.faults = dict(faults)
        self.seen: list[bytes] = []
        self.connections: list[socket.socket] = []
        hostile = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                hostile.serve(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def answer(self, name: bytes, queued: int) -> bytes:
        if name == b"HELLO":
            return b"%1\r\n$5\r\nproto\r\n:3\r\n"
        if name == b"PING":
            return b"+PONG\r\n"
        if name == b"EXEC":
            return b"*%d\r\n" % queued + b":1\r\n" * queued
        if name == b"XADD":
            return b"$3\r\n1-1\r\n"
        if name in (b"HSET", b"DEL", b"EXPIRE", b"PUBLISH"):
            return b":1\r\n"
        return b"+OK\r\n"

    def serve(self, sock: socket.socket) -> None:
        self.connections.append(sock)
        buffer, queued, in_multi = bytearray(), 0, False
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buffer += data
            for command in parse_commands(buffer):
                name = command[0].upper()
                self.seen.append(name)
                fault = self.faults.get(name.decode(), self.faults.get("*"))
                if fault == SILENT:
                    continue
                if fault == CLOSE:
                    sock.sendall(b"$10\r\nabc")
                    sock.close()
                    return
                if isinstance(fault, bytes):
                    reply = fault
                elif in_multi and name not in (b"EXEC", b"DISCARD"):
                    queued += 1
                    reply = b"+QUEUED\r\n"
                else:
                    reply = self.answer(name, queued)
                if name == b"MULTI":
                    in_multi, queued = True, 0
                elif name in (b"EXEC", b"DISCARD"):
                    in_multi, queued = False, 0
                sock.sendall(reply)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for sock in self.connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


@pytest.fixture
def hostile() -> Iterator[list[HostileRedis]]:
    """Hostile servers a test started; each is stopped at the end."""
    servers: list[HostileRedis] = []
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def fast_env(job_env: Mapping[str, str], url: str, **extra: str) -> dict[str, str]:
    env = dict(job_env)
    env.update(
        BAQUP_BUS_URL=url,
        BAQUP_BUS_TIMEOUT="0.5",
        BAQUP_BUS_GRACE_PERIOD="1",
        BAQUP_AGENT_HEARTBEAT_INTERVAL="1",
        BAQUP_AGENT_LOG_LEVEL="debug",
    )
    env.update(extra)
    return env


def run_child(env: Mapping[str, str], jobs: list[Job]) -> Job:
    job = start_job(["--", *python_child(CHILD)], env)
    jobs.append(job)
    return job


def fallback(env: Mapping[str, str], name: str = "buffer.jsonl") -> Path:
    return Path(env["BAQUP_BUS_FALLBACK_DIR"]) / env["BAQUP_JOB_ID"] / name


def status_file(env: Mapping[str, str]) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((job_dir(env) / ".baqup-status.json").read_bytes())
    return document


def assert_no_crash(job: Job) -> None:
    stderr = job.stderr()
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not [r for r in job.logs() if r.get("level") == "fatal"], stderr[-3000:]


def assert_unreported(job: Job, env: Mapping[str, str]) -> dict[str, Any]:
    """Exit 75, the child ran and committed, the status in the file and in the buffer."""
    assert job.wait(60) == 75, job.stderr()[-3000:]
    assert_no_crash(job)
    manifest = json.loads((job_dir(env) / "manifest.json").read_bytes())
    assert [a["filename"] for a in manifest["artifacts"]] == ["dump.bin"]
    document = status_file(env)
    assert document["job_id"] == env["BAQUP_JOB_ID"]
    assert document["status"] == "success"
    assert document["exit_code"] == 0
    assert [Path(f["path"]).name for f in document["files"]] == ["dump.bin"]
    buffered = read_lines(fallback(env))
    statuses = [m for m in buffered if m["kind"] == "status"]
    assert [m["body"] for m in statuses] == [document]
    assert not fallback(env, "rejected.jsonl").exists()  # an outage: nothing set aside
    return document


# --- item 19: a server that answers garbage, closes mid-reply or never answers ---------

HOSTILE_CASES: dict[str, dict[str, bytes | str]] = {
    "ping-garbage": {"PING": b"+garbage\r\n"},
    "ping-binary": {"PING": b"\x00\xff\xfe\x80 binary\r\n"},
    "ping-closed-mid-reply": {"PING": CLOSE},
    "setname-garbage": {"CLIENT": b"+garbage\r\n"},
    "setname-binary": {"CLIENT": b"\xff\xfe\x00\r\n"},
    "setname-closed-mid-reply": {"CLIENT": CLOSE},
    "hello-closed-mid-reply": {"HELLO": CLOSE},
    "never-answers": {"*": SILENT},
    "exec-garbage": {"EXEC": b"+garbage\r\n"},
    "exec-binary": {"EXEC": b"*2\r\n\x00\xff\r\n"},
    "hset-not-an-integer": {"HSET": b":notanint\r\n"},  # the first heartbeat: was exit 70
    # error replies about the server, not the message: an outage, never set aside
    "exec-misconf": {"EXEC": b"-MISCONF Errors writing to disk\r\n"},
    "hset-oom": {"HSET": b"-OOM command not allowed when used memory > 'maxmemory'\r\n"},
    "ping-loading": {"PING": b"-LOADING Redis is loading the dataset in memory\r\n"},
}


@pytest.mark.parametrize("case", list(HOSTILE_CASES))
def test_a_server_answering_garbage_is_an_unusable_bus_and_the_job_ends_75(
    case: str, hostile: list[HostileRedis], job_env: dict[str, str], jobs: list[Job]
) -> None:
    server = HostileRedis(HOSTILE_CASES[case])
    hostile.append(server)
    env = fast_env(job_env, server.url)
    job = run_child(env, jobs)
    assert_unreported(job, env)
    assert server.seen, "baqup-run never talked to the hostile server"


def test_a_server_answering_exec_with_garbage_gets_no_status_counted_as_delivered(
    hostile: list[HostileRedis], job_env: dict[str, str], jobs: list[Job]
) -> None:
    """Heartbeats (no MULTI) get through; every MULTI is answered with garbage."""
    server = HostileRedis({"EXEC": b"+garbage\r\n"})
    hostile.append(server)
    env = fast_env(job_env, server.url, EVENT="changed while read")
    job = run_child(env, jobs)
    document = assert_unreported(job, env)
    assert document["warnings_summary"] == {"FILE_CHANGED": 1}
    assert b"HSET" in server.seen
    assert server.seen.count(b"EXEC") >= 2  # retried after the first garbage
    buffered = read_lines(fallback(env))
    kinds = [m["kind"] for m in buffered]
    assert "event" in kinds
    assert kinds.index("event") < kinds.index("status")  # order kept in the buffer


# --- item 2: huge numbers, deep nesting, and a message Redis refuses ------------------


def depth_of(value: Any) -> int:
    depth = 0
    while isinstance(value, dict) and "nested" in value:
        value, depth = value["nested"], depth + 1
    assert value == "bottom"
    return depth


def test_huge_numbers_and_deep_nesting_reach_redis_exactly(
    redis_server: RedisServer, redis_client: redis.Redis, job_env: dict[str, str], jobs: list[Job]
) -> None:
    env = fast_env(job_env, redis_server.url, HUGE=str(DEPTH))
    env["BAQUP_BUS_GRACE_PERIOD"] = "10"
    job = run_child(env, jobs)
    assert job.wait(60) == 76, job.stderr()[-3000:]  # a failed component: partial
    assert_no_crash(job)
    status = read_hash(redis_client, f"{prefix(env)}status:{env['BAQUP_JOB_ID']}")
    assert status["status"] == "partial"
    assert status["exit_code"] == 76
    assert status["metrics"]["bytes_processed"] == BIG
    assert status["metrics"]["files_processed"] == BIG
    assert depth_of(status["components"][0]["error"]) == DEPTH
    progress = read_hash(redis_client, f"{prefix(env)}progress:{env['BAQUP_JOB_ID']}")
    assert progress["files_processed"] == BIG
    assert progress["bytes_processed"] == 1e20
    assert not (job_dir(env) / ".baqup-status.json").exists()
    assert not fallback(env).parent.exists()


def test_huge_numbers_and_deep_nesting_are_buffered_exactly_when_the_bus_is_down(
    job_env: dict[str, str], jobs: list[Job]
) -> None:
    env = fast_env(job_env, f"redis://127.0.0.1:{free_port()}/0", HUGE=str(DEPTH))
    job = run_child(env, jobs)
    assert job.wait(60) == 75, job.stderr()[-3000:]
    assert_no_crash(job)
    raw = (job_dir(env) / ".baqup-status.json").read_bytes()
    assert b'"bytes_processed": 100000000000000000000' in raw
    document = json.loads(raw)
    assert document["exit_code"] == 76  # what the job would have exited with
    assert document["metrics"]["files_processed"] == BIG
    assert depth_of(document["components"][0]["error"]) == DEPTH
    buffer = fallback(env).read_bytes()
    assert b'"files_processed":100000000000000000000' in buffer
    lines = [json.loads(line) for line in buffer.splitlines()]  # every line valid JSON
    statuses = [m["body"] for m in lines if m["kind"] == "status"]
    assert statuses == [document]


def test_a_message_redis_refuses_is_set_aside_and_the_status_still_arrives(
    redis_server: RedisServer, redis_client: redis.Redis, job_env: dict[str, str], jobs: list[Job]
) -> None:
    """The events key holds a string: every XADD gets WRONGTYPE. The event is retried,
    set aside, and what follows it (the status) is delivered; the job ends 75."""
    env = fast_env(job_env, redis_server.url, EVENT="changed while read")
    env["BAQUP_BUS_GRACE_PERIOD"] = "20"
    events = f"{prefix(env)}events:{env['BAQUP_JOB_ID']}"
    redis_client.set(events, "not a stream")
    started = time.monotonic()
    job = run_child(env, jobs)
    assert job.wait(60) == 75, job.stderr()[-3000:]
    assert time.monotonic() - started < 20  # not held until the end of the grace period
    assert_no_crash(job)
    status = read_hash(redis_client, f"{prefix(env)}status:{env['BAQUP_JOB_ID']}")
    assert status["status"] == "success"
    assert status["exit_code"] == 0
    assert status_file(env) == status
    rejected = read_lines(fallback(env, "rejected.jsonl"))
    assert rejected
    assert {m["key"] for m in rejected} == {events}
    assert rejected[0]["body"]["code"] == "FILE_CHANGED"
    assert not fallback(env).exists()  # everything else was delivered
    assert redis_client.get(events) == "not a stream"
    set_aside = [r for r in job.logs() if "set aside" in r.get("message", "")]
    assert set_aside
    assert "WRONGTYPE" in set_aside[0]["context"]["reason"]


@pytest.fixture
def acl_user(redis_client: redis.Redis) -> Iterator[str]:
    name = f"baqup-{uuid.uuid4().hex[:8]}"
    yield name
    redis_client.acl_deluser(name)


def test_a_status_redis_refuses_ends_75_with_the_status_file(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    acl_user: str,
    job_env: dict[str, str],
    jobs: list[Job],
) -> None:
    """An ACL lets the job write its heartbeat, progress and events but not its status:
    NOPERM is not a bus outage, yet the status is never counted as delivered."""
    env = fast_env(job_env, redis_server.url, BAQUP_BUS_GRACE_PERIOD="20")
    p = prefix(env)
    redis_client.execute_command(  # type: ignore[no-untyped-call]
        "ACL", "SETUSER", acl_user, "on", ">secret-pw", "resetkeys",
        f"~{p}heartbeat:*", f"~{p}progress:*", f"~{p}events:*", "resetchannels", "&*",
        "+@all",
    )  # fmt: skip
    env["BAQUP_BUS_URL"] = f"redis://{acl_user}:secret-pw@127.0.0.1:{redis_server.port}/0"
    started = time.monotonic()
    job = run_child(env, jobs)
    assert job.wait(60) == 75, job.stderr()[-3000:]
    assert time.monotonic() - started < 15  # set aside, not held for the grace period
    assert_no_crash(job)
    assert not redis_client.exists(f"{p}status:{env['BAQUP_JOB_ID']}")
    heartbeat = read_hash(redis_client, f"{p}heartbeat:{env['BAQUP_AGENT_ID']}")
    assert heartbeat["state"] == "terminated"  # the bus itself was usable
    document = status_file(env)
    assert document["status"] == "success"
    rejected = read_lines(fallback(env, "rejected.jsonl"))
    assert [m["body"] for m in rejected if m["kind"] == "status"] == [document]
    assert not fallback(env).exists()
    assert "secret-pw" not in job.stderr()


# --- item 12: baqup watch on a terminal and piped --------------------------------------

HOSTILE_TEXT = (
    "before\x1b]0;pwned-title\x07\x1b[2J\x1b[H\x1b]52;c;cm0gLXJmIH4=\x07"
    "\x9b2J\x1bPdcs\x1b\\\x07\x1b7\u202eevil\x08middle\r\nafter"
)

# Sets an intent with escape sequences, reports an event whose message is full of
# them, waits for $SYNC/go (the watcher has seen it), then exits.
WATCHED_CHILD = r"""
import json, os, sys, time
control = os.fdopen(int(os.environ["BAQUP_CONTROL_FD"]), "w", buffering=1)
text = os.environ["HOSTILE_TEXT"]
control.write(json.dumps({"type": "intent", "operation": "dump\x1b]0;op-title\x07ing",
                          "expected_duration_seconds": 30}) + "\n")
control.write(json.dumps({"type": "progress", "percent_complete": 40,
                          "bytes_processed": 2048}) + "\n")
control.write(json.dumps({"type": "event", "severity": "warn", "code": "FILE_CHANGED",
                          "message": text, "path": "/data/a"}) + "\n")
deadline = time.monotonic() + 30
while not os.path.exists(os.environ["GO"]) and time.monotonic() < deadline:
    time.sleep(0.05)
with open(os.path.join(os.environ["BAQUP_WORK_DIR"], "dump.bin"), "wb") as handle:
    handle.write(b"dump")
"""


def watch_argv(env: Mapping[str, str], *extra: str) -> list[str]:
    return [
        str(BAQUP),
        "watch",
        env["BAQUP_JOB_ID"],
        "--interval",
        "0.1",
        "--timeout",
        "60",
        *extra,
    ]


def watch_env(env: Mapping[str, str]) -> dict[str, str]:
    keep = {k: v for k, v in env.items() if not k.startswith("BAQUP_")}
    keep.update(
        BAQUP_BUS_URL=env["BAQUP_BUS_URL"],
        BAQUP_BUS_KEY_PREFIX=env["BAQUP_BUS_KEY_PREFIX"],
        COLUMNS="200",
        TERM="xterm",
    )
    return keep


class Terminal:
    """`argv` on a real pseudo-terminal (pty.fork); the screen bytes it wrote."""

    def __init__(self, argv: list[str], env: Mapping[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes the watcher, or exits at once
            try:
                os.execve(argv[0], argv, dict(env))
            finally:
                os._exit(127)
        self.screen = bytearray()
        self.code: int | None = None

    def read(self, timeout: float = 0.1) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return b""
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the watcher has exited and closed the terminal
            data = b""
        self.screen += data
        return data

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.code is None:
            self.read()
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                while self.read(0.05):
                    pass
                self.code = os.waitstatus_to_exitcode(status)
            elif time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"watch did not exit; screen: {bytes(self.screen)!r}")
        os.close(self.fd)
        return self.code

    def kill(self) -> None:
        if self.code is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.code = -9


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    started: list[Terminal] = []
    try:
        yield started
    finally:
        for terminal in started:
            terminal.kill()


ONLY_OWN_ESCAPES = re.compile(rb"\x1b\[K")


def test_watch_on_a_terminal_strips_the_childs_escape_sequences(
    redis_server: RedisServer,
    job_env: dict[str, str],
    jobs: list[Job],
    terminals: list[Terminal],
    tmp_path: Path,
) -> None:
    env = redis_env(job_env, redis_server)
    env.update(HOSTILE_TEXT=HOSTILE_TEXT, GO=str(tmp_path / "go"))
    terminal = Terminal(watch_argv(env), watch_env(env))
    terminals.append(terminal)
    job = start_job(["--", *python_child(WATCHED_CHILD)], env)
    jobs.append(job)

    def intent_seen() -> bool:
        terminal.read()
        return b"(dumping)" in terminal.screen

    wait_for(intent_seen, 30, what="the live line with the intent")
    (tmp_path / "go").touch()
    assert job.wait(60) == 0, job.stderr()[-3000:]
    assert terminal.wait(30) == 0, bytes(terminal.screen)
    screen = bytes(terminal.screen)
    assert b"before" in screen
    assert b"after" in screen
    assert b"success (exit 0)" in screen
    rest = ONLY_OWN_ESCAPES.sub(b"", screen)
    assert b"\x1b" not in rest, screen
    assert b"\x07" not in rest
    assert b"\x08" not in rest
    assert "\x9b".encode() not in rest
    assert "\u202e".encode() not in rest
    for secret in (b"pwned-title", b"op-title", b"cm0gLXJmIH4=", b"dcs"):
        assert secret not in screen
    # one line per event: the message's own CR LF did not break it in two
    assert re.search(rb"FILE_CHANGED x1: before *evil *middle *after", rest), screen


def test_watch_piped_writes_valid_json_whatever_the_values(
    redis_server: RedisServer, job_env: dict[str, str], jobs: list[Job]
) -> None:
    """The escapes travel intact as JSON escapes; a status nested past orjson's limit
    (a component error DEPTH levels deep) is still one valid JSON line."""
    env = redis_env(job_env, redis_server)
    env.update(HUGE=str(DEPTH), EVENT=HOSTILE_TEXT)
    job = run_child(env, jobs)
    assert job.wait(60) == 76, job.stderr()[-3000:]
    result = run_baqup(
        ["watch", env["BAQUP_JOB_ID"], "--interval", "0.1", "--timeout", "30"],
        watch_env(env),
        tool=True,
    )
    assert result.returncode == 76, result.stderr
    assert "Traceback" not in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert "\x1b" not in result.stdout  # JSON escapes every control character
    events = [line["message"] for line in lines if line["kind"] == "event"]
    assert events[0]["message"] == HOSTILE_TEXT
    status = lines[-1]["message"]
    assert lines[-1]["kind"] == "status"
    assert status["metrics"]["files_processed"] == BIG
    assert depth_of(status["components"][0]["error"]) == DEPTH


def test_watch_on_a_terminal_survives_values_of_any_type(
    job_env: dict[str, str], terminals: list[Terminal], tmp_path: Path
) -> None:
    """A file bus written by hand: a state that is an object, a percent that is text,
    an infinite byte count, an error that is a string with a title sequence."""
    directory = tmp_path / "bus"
    directory.mkdir(exist_ok=True)
    env = dict(job_env, BAQUP_BUS_URL=f"file://{directory}")
    p, job_id = prefix(env), env["BAQUP_JOB_ID"]

    def put(key: str, message: dict[str, Any]) -> None:
        with (directory / f"{key}.jsonl").open("a") as handle:
            handle.write(json.dumps(message) + "\n")

    put(f"{p}heartbeat:a1", {"agent_id": "a1", "state": {"odd": 1}, "intent": "text"})
    put(f"{p}progress:{job_id}", {
        "agent_id": "a1", "percent_complete": "half\x1b[2J", "bytes_processed": "1e999",
        "files_processed": [1, 2],
    })  # fmt: skip
    put(f"{p}events:{job_id}", {"severity": ["x"], "code": {"c": 1}, "count": None})
    put(f"{p}status:{job_id}", {
        "agent_id": "a1", "status": "failed\x1b]0;t\x07", "exit_code": 3,
        "error": "plain text\x1b]0;title\x07",
    })  # fmt: skip
    terminal = Terminal(watch_argv(env), watch_env(env))
    terminals.append(terminal)
    assert terminal.wait(30) == 3, bytes(terminal.screen)
    screen = bytes(terminal.screen)
    assert b"Traceback" not in screen
    assert b"\x1b" not in ONLY_OWN_ESCAPES.sub(b"", screen), screen
    assert b"failed (exit 3): plain text" in screen


@pytest.mark.parametrize("fault", [CLOSE, b"+garbage\r\n"], ids=["closes", "garbage"])
def test_watch_keeps_watching_through_an_unreadable_bus_until_its_timeout(
    fault: bytes | str, hostile: list[HostileRedis], job_env: dict[str, str]
) -> None:
    server = HostileRedis({"*": fault})
    hostile.append(server)
    env = dict(job_env, BAQUP_BUS_URL=server.url)
    started = time.monotonic()
    result = run_baqup(
        ["watch", env["BAQUP_JOB_ID"], "--interval", "0.1", "--timeout", "1"],
        watch_env(env),
        tool=True,
    )
    assert result.returncode == 69, result.stderr
    assert 1 <= time.monotonic() - started < 20
    assert "Traceback" not in result.stderr
    assert result.stderr.count("cannot read the bus") == 1
    assert "no status before the timeout" in result.stderr
    assert len(server.seen) > 2  # it kept polling
