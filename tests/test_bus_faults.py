"""Bus faults: what a controller finds after Redis dies, hangs or never comes back.

Each test starts its own redis-server (with an fsynced append-only file, so a server
killed with SIGKILL and restarted on the same port keeps what it had acknowledged, as a
production Redis would), runs the real `baqup-run` with a child that reports one
distinct event code per step (`STEP_001`, `STEP_002`, ...) and a growing
`bytes_processed`, injects the fault, and then reads Redis, the job dir and the
fallback buffer the way a controller would (INTERFACE.md section 4, spec section 3
"Bus Unavailability"): nothing lost, order kept, the final progress last, the status
with its exit code, the buffer removed after replay; or, when the bus stays away,
exit 75 with `.baqup-status.json` beside a committed manifest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis

from baqup_supervisor.bus import read_lines
from tests.conftest import RedisServer, python_child, start_redis, stop_pid
from tests.jobs import (
    Job,
    job_dir,
    prefix,
    read_hash,
    read_stream,
    start_job,
    wait_for,
)

AOF = ("--appendonly", "yes", "--appendfsync", "always")

# The child: one distinct event code per step and a progress with growing bytes, every
# STEP_DELAY seconds, until the test creates $SYNC/finish (and MIN_STEPS are done).
# It publishes its step count in $SYNC/step; with GATE_AT=N it stops after step N
# (creating $SYNC/gate) until the test creates $SYNC/go. At the end it writes one
# artifact and its final count in $SYNC/count; with HOLD_EXIT set it then waits for
# $SYNC/exit before exiting.
# Every wait gives up after a minute (exit 9), so a failed test never leaves it hanging.
STEP_CHILD = r"""
import json, os, sys, time
sync = os.environ["SYNC"]
delay = float(os.environ.get("STEP_DELAY", "0.2"))
min_steps = int(os.environ.get("MIN_STEPS", "5"))
control = os.fdopen(int(os.environ["BAQUP_CONTROL_FD"]), "w", buffering=1)
job_dir = os.environ["BAQUP_JOB_DIR"]

def send(message):
    control.write(json.dumps(message) + "\n")

def mark(name, text=""):
    tmp = os.path.join(sync, name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, os.path.join(sync, name))

def wait(name):
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(sync, name)):
        if time.monotonic() > deadline:
            sys.exit(9)
        time.sleep(0.02)

if os.environ.get("STATUS_FILE_AS_DIR"):
    os.makedirs(os.path.join(job_dir, ".baqup-status.json"))
filler = "x" * int(os.environ.get("MESSAGE_SIZE", "0"))
step = 0
started = time.monotonic()
while True:
    step += 1
    send({"type": "event", "severity": "info", "code": "STEP_%03d" % step,
          "message": "step %d %s" % (step, filler), "path": "/f%d" % step})
    send({"type": "progress", "bytes_processed": step * 1000, "files_processed": step,
          "current_file": "/f%d" % step})
    mark("step", str(step))
    if step == int(os.environ.get("GATE_AT", "0")):
        mark("gate")
        wait("go")
    if step >= min_steps and os.path.exists(os.path.join(sync, "finish")):
        break
    if step >= 300 or time.monotonic() - started > 90:
        sys.exit(9)
    time.sleep(delay)
with open(os.path.join(os.environ["BAQUP_WORK_DIR"], "data.bin"), "wb") as handle:
    handle.write(b"backup " * 1000)
mark("count", str(step))
if os.environ.get("HOLD_EXIT"):
    mark("ready")
    wait("exit")
mark("exited", repr(time.time()))
"""


class PrivateRedis:
    """One test's own redis-server: killed, paused and restarted on the same port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.server: RedisServer = start_redis(directory, None, *AOF)
        self.port = self.server.port
        self.started: list[RedisServer] = [self.server]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=5
        )

    def kill(self) -> float:
        """SIGKILL the server (by its PID); the monotonic time it died."""
        process = self.server.process
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        return time.monotonic()

    def restart(self) -> None:
        self.server = start_redis(self.directory, self.port, *AOF)
        self.started.append(self.server)

    def pause(self) -> float:
        os.kill(self.server.process.pid, signal.SIGSTOP)
        return time.monotonic()

    def resume(self) -> None:
        os.kill(self.server.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        for server in self.started:
            stop_pid(server.process)


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


# --- helpers (also used by test_sentinel.py) ---------------------------------------------


def step_env(
    job_env: Mapping[str, str], url: str, sync: Path, **extra: str | float | Path
) -> dict[str, str]:
    """The job's environment: the bus at `url`, fast heartbeats and bus timeouts."""
    sync.mkdir(parents=True, exist_ok=True)
    env = dict(job_env)
    env.update(
        BAQUP_BUS_URL=url,
        BAQUP_BUS_TIMEOUT="1",
        BAQUP_AGENT_HEARTBEAT_INTERVAL="1",
        BAQUP_BUS_GRACE_PERIOD="30",
        BAQUP_AGENT_LOG_LEVEL="debug",
        SYNC=str(sync),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_steps(env: Mapping[str, str], jobs: list[Job]) -> Job:
    job = start_job(["--", *python_child(STEP_CHILD)], env)
    jobs.append(job)
    return job


def child_step(sync: Path) -> int:
    """How many steps the child has reported so far (0 before the first)."""
    try:
        return int((sync / "step").read_text() or 0)
    except FileNotFoundError:
        return 0


def touch(sync: Path, name: str) -> None:
    (sync / name).write_text("")


def final_count(sync: Path) -> int:
    """The child's total number of steps (written once it stops stepping)."""
    path = sync / "count"
    wait_for(path.exists, 30, what="the child's step count")
    return int(path.read_text())


def events_key(env: Mapping[str, str]) -> str:
    return f"{prefix(env)}events:{env['BAQUP_JOB_ID']}"


def status_key(env: Mapping[str, str]) -> str:
    return f"{prefix(env)}status:{env['BAQUP_JOB_ID']}"


def progress_key(env: Mapping[str, str]) -> str:
    return f"{prefix(env)}progress:{env['BAQUP_JOB_ID']}"


def buffer_path(env: Mapping[str, str]) -> Path:
    return Path(env["BAQUP_BUS_FALLBACK_DIR"]) / env["BAQUP_JOB_ID"] / "buffer.jsonl"


def stream_codes(client: redis.Redis, env: Mapping[str, str]) -> list[str]:
    try:
        return [str(e.get("code")) for e in read_stream(client, events_key(env))]
    except redis.RedisError:
        return []


def has_step(client: redis.Redis, env: Mapping[str, str], step: int) -> bool:
    return f"STEP_{step:03d}" in stream_codes(client, env)


def buffered(env: Mapping[str, str]) -> list[dict[str, Any]]:
    """The messages waiting in the fallback buffer (as written: kind, key, body)."""
    return read_lines(buffer_path(env))


def buffered_steps(env: Mapping[str, str]) -> list[str]:
    return [
        str(m["body"].get("code"))
        for m in buffered(env)
        if m.get("kind") == "event" and str(m["body"].get("code", "")).startswith("STEP_")
    ]


def assert_no_traceback(job: Job) -> None:
    stderr = job.stderr()
    assert "Traceback" not in stderr, stderr[-4000:]


def assert_steps_in_order(entries: list[dict[str, Any]], count: int) -> None:
    """Every STEP_nnn from 1 to `count` once, in increasing order.

    A message whose acknowledgement was lost (the server applied it, then died or hung
    before replying) is sent again from the buffer, so an exact repeat right after the
    original is tolerated: anything else (a gap, a swap, a changed repeat) is not.
    """
    steps = [e for e in entries if str(e.get("code", "")).startswith("STEP_")]
    collapsed: list[dict[str, Any]] = []
    for entry in steps:
        if collapsed and entry["code"] == collapsed[-1]["code"]:
            assert entry == collapsed[-1], f"a changed repeat of {entry['code']}"
            continue
        collapsed.append(entry)
    codes = [e["code"] for e in collapsed]
    assert codes == [f"STEP_{i:03d}" for i in range(1, count + 1)], codes
    for entry in collapsed:
        assert entry["count"] == 1
        assert entry["sample_paths"] == [f"/f{int(entry['code'][5:])}"]


def assert_delivered(
    client: redis.Redis, env: Mapping[str, str], count: int, exit_code: int = 0
) -> dict[str, Any]:
    """What a controller reads after the job: every step, the last progress, the status."""
    entries = read_stream(client, events_key(env))
    assert_steps_in_order(entries, count)
    progress = read_hash(client, progress_key(env))
    assert progress["bytes_processed"] == count * 1000, progress
    assert progress["files_processed"] == count
    assert progress["current_file"] == f"/f{count}"
    status = read_hash(client, status_key(env))
    assert status, "no status hash"
    assert status["status"] == "success"
    assert status["exit_code"] == exit_code
    assert status["error"] is None
    assert [Path(f["path"]).name for f in status["files"]] == ["data.bin"]
    assert Path(status["files"][0]["path"]) == job_dir(env) / "data.bin"
    assert status["files"][0]["size_bytes"] == 7000
    summary = status["warnings_summary"]
    assert {k: v for k, v in summary.items() if k.startswith("STEP_")} == {
        f"STEP_{i:03d}": 1 for i in range(1, count + 1)
    }
    assert not buffer_path(env).exists(), buffered(env)
    assert not buffer_path(env).parent.exists()
    assert not (job_dir(env) / ".baqup-status.json").exists()
    return status


def assert_retried(client: redis.Redis, env: Mapping[str, str]) -> None:
    entries = read_stream(client, events_key(env))
    retries = [e for e in entries if e.get("code") == "CONNECTION_RETRY"]
    assert retries, [e.get("code") for e in entries]
    assert retries[-1]["severity"] == "info"
    assert retries[-1]["count"] >= 1


def assert_committed(env: Mapping[str, str]) -> dict[str, Any]:
    """The manifest and its artifact are in the job dir, as on any successful job."""
    directory = job_dir(env)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert [a["filename"] for a in manifest["artifacts"]] == ["data.bin"]
    assert (directory / "data.bin").read_bytes() == b"backup " * 1000
    return dict(manifest)


def status_file(env: Mapping[str, str]) -> dict[str, Any]:
    path = job_dir(env) / ".baqup-status.json"
    assert path.is_file(), sorted(p.name for p in job_dir(env).iterdir())
    return dict(json.loads(path.read_text()))


def assert_unreported_status(env: Mapping[str, str]) -> dict[str, Any]:
    """Exit 75's file: the final status a controller would have read on the bus."""
    document = status_file(env)
    assert document["type"] == "status"
    assert document["job_id"] == env["BAQUP_JOB_ID"]
    assert document["status"] == "success"
    assert document["exit_code"] == 0
    assert document["error"] is None
    assert [Path(f["path"]) for f in document["files"]] == [job_dir(env) / "data.bin"]
    assert document["files"][0]["size_bytes"] == 7000
    assert len(document["files"][0]["checksum_sha256"]) == 64
    return document


def assert_status_buffered(env: Mapping[str, str]) -> None:
    """The final status waits in the buffer, after every step (only retries follow it)."""
    # "job success" is logged a moment before the status is handed to the outbox
    wait_for(lambda: any(m["kind"] == "status" for m in buffered(env)), 10, what="status buffered")
    kinds = [(m["kind"], str(m["body"].get("code", ""))) for m in buffered(env)]
    assert ("status", "") in kinds, kinds
    after = kinds[kinds.index(("status", "")) + 1 :]
    assert all(code == "CONNECTION_RETRY" or kind != "event" for kind, code in after), after


def has_log(job: Job, text: str) -> bool:
    return any(text in str(r.get("message", "")) for r in job.logs())


def sleep_until(moment: float) -> None:
    """The outage itself: a fault lasts this long whatever happens meanwhile."""
    time.sleep(max(0.0, moment - time.monotonic()))


# --- Redis killed and back ---------------------------------------------------------------


def test_redis_down_before_start_then_back(
    bus: PrivateRedis, job_env: dict[str, str], jobs: list[Job], tmp_path: Path
) -> None:
    sync = tmp_path / "sync"
    env = step_env(job_env, bus.url, sync)
    killed = bus.kill()
    job = start_steps(env, jobs)
    wait_for(lambda: "STEP_002" in buffered_steps(env), 20, what="steps in the buffer")
    assert job.poll() is None
    sleep_until(killed + 2)
    bus.restart()
    client = bus.client()
    wait_for(lambda: not buffer_path(env).exists(), 20, what="the buffer to be replayed")
    reached = child_step(sync)
    wait_for(lambda: has_step(client, env, reached + 1), 10, what="live sending after replay")
    touch(sync, "finish")
    assert job.wait(60) == 0
    count = final_count(sync)
    assert_delivered(client, env, count)
    assert_retried(client, env)
    assert_committed(env)
    assert has_log(job, "bus unreachable at start")
    assert has_log(job, "bus reconnected")
    assert_no_traceback(job)


def test_redis_killed_mid_job_and_back_after_two_seconds(
    bus: PrivateRedis, job_env: dict[str, str], jobs: list[Job], tmp_path: Path
) -> None:
    sync = tmp_path / "sync"
    env = step_env(job_env, bus.url, sync)
    client = bus.client()
    job = start_steps(env, jobs)
    wait_for(lambda: has_step(client, env, 3), 20, what="STEP_003 on the bus")
    killed = bus.kill()
    at_kill = child_step(sync)
    wait_for(
        lambda: f"STEP_{at_kill + 2:03d}" in buffered_steps(env), 20, what="steps in the buffer"
    )
    sleep_until(killed + 2)
    assert job.poll() is None
    bus.restart()
    client = bus.client()
    wait_for(lambda: not buffer_path(env).exists(), 20, what="the buffer to be replayed")
    reached = child_step(sync)
    wait_for(lambda: has_step(client, env, reached + 1), 10, what="live sending after replay")
    assert job.poll() is None  # the replay happened mid-job
    touch(sync, "finish")
    assert job.wait(60) == 0
    count = final_count(sync)
    assert count > reached
    assert_delivered(client, env, count)
    assert_retried(client, env)
    assert_committed(env)
    assert has_log(job, "bus unreachable; buffering messages")
    assert_no_traceback(job)


def test_long_outage_outlasting_the_job_is_covered_by_the_grace_period(
    bus: PrivateRedis, job_env: dict[str, str], jobs: list[Job], tmp_path: Path
) -> None:
    # The reconnection attempts run out mid-job (3 attempts: about 3.5 s), the job ends
    # while Redis is still down, and the grace period's fresh attempts find it again.
    sync = tmp_path / "sync"
    env = step_env(
        job_env, bus.url, sync, BAQUP_BUS_RECONNECT_MAX_ATTEMPTS=3, BAQUP_BUS_GRACE_PERIOD=25
    )
    client = bus.client()
    job = start_steps(env, jobs)
    wait_for(lambda: has_step(client, env, 3), 20, what="STEP_003 on the bus")
    killed = bus.kill()
    wait_for(
        lambda: has_log(job, "bus unreachable after all reconnection attempts"),
        15,
        what="the reconnection attempts to run out",
    )
    touch(sync, "finish")
    wait_for(lambda: has_log(job, "job success"), 20, what="the end of the job")
    assert_status_buffered(env)
    sleep_until(killed + 9)
    assert job.poll() is None  # still within the grace period
    bus.restart()
    restarted = time.monotonic()
    assert job.wait(30) == 0
    assert time.monotonic() - restarted < 8  # grace-period attempts are at most 2 s apart
    client = bus.client()
    assert_delivered(client, env, final_count(sync))
    assert_retried(client, env)
    assert_committed(env)
    assert_no_traceback(job)


def test_redis_killed_and_never_back_exits_75_with_the_status_file(
    bus: PrivateRedis, job_env: dict[str, str], jobs: list[Job], tmp_path: Path
) -> None:
    sync = tmp_path / "sync"
    env = step_env(job_env, bus.url, sync, BAQUP_BUS_GRACE_PERIOD=3, HOLD_EXIT=1)
    client = bus.client()
    job = start_steps(env, jobs)
    wait_for(lambda: has_step(client, env, 3), 20, what="STEP_003 on the bus")
    bus.kill()
    at_kill = child_step(sync)
    touch(sync, "finish")
    wait_for((sync / "ready").exists, 20, what="the child's last step")
    touch(sync, "exit")
    wait_for((sync / "exited").exists, 20, what="the child's exit")
    child_exit = time.monotonic()
    assert job.wait(30) == 75
    # The grace period, plus at most a bus timeout or two: never blocked on the bus.
    assert time.monotonic() - child_exit < 3 + 6
    count = final_count(sync)
    document = assert_unreported_status(env)
    assert document["warnings_summary"]["STEP_001"] == 1
    assert document["metrics"]["bytes_processed"] == count * 1000
    manifest = assert_committed(env)
    assert document["files"][0]["checksum_sha256"] == manifest["artifacts"][0]["checksum"]["value"]
    # Nothing sent during the outage was dropped: it is all still in the buffer, in order.
    steps = buffered_steps(env)
    assert steps, buffered(env)
    first = int(steps[0][5:])
    assert first <= at_kill + 1
    assert steps == [f"STEP_{i:03d}" for i in range(first, count + 1)]
    assert_status_buffered(env)
    records = job.logs()
    assert any(
        "final status written to a file" in str(r.get("message")) and r["level"] == "error"
        for r in records
    )
    assert_no_traceback(job)


def test_redis_killed_as_the_job_ends_status_arrives_after_restart(
    bus: PrivateRedis, job_env: dict[str, str], jobs: list[Job], tmp_path: Path
) -> None:
    sync = tmp_path / "sync"
    env = step_env(job_env, bus.url, sync, HOLD_EXIT=1, BAQUP_BUS_GRACE_PERIOD=20)
    client = bus.client()
    job = start_steps(env, jobs)
    wait_for(lambda: has_step(client, env, 3), 20, what="STEP_003 on the bus")
    touch(sync, "finish")
    wait_for((sync / "ready").exists, 20, what="the child's last step")
    count = final_count(sync)
    wait_for(lambda: has_step(client, env, count), 10, what="the last step on the bus")
    killed = bus.kill()
    touch(sync, "exit")  # the child exits right after the kill: the end meets a dead bus
    wait_for(lambda: has_log(job, "job success"), 20, what="the end of the job")
    wait_for(
        lambda: any(m["kind"] == "status" for m in buffered(env)), 10, what="the buffered status"
    )
    sleep_until(killed + 2)
    bus.restart()
    assert job.wait(30) == 0
    client = bus.client()
    status = assert_delivered(client, env, count)
    assert status["manifest"] == str(job_dir(env) / "manifest.json")
    assert_committed(env)
    assert_retried(client, env)
    heartbeat = read_hash(client, f"{prefix(env)}heartbeat:{env['BAQUP_AGENT_ID']}")
    assert heartbeat["state"] == "terminated"  # the newest heartbeat, not a stale one
    assert_no_traceback(job)


def test_redis_paused_mid_job_does_not_block_the_job(
    bus: PrivateRedis, job_env: dict[str, str], jobs: list[Job], tmp_path: Path
) -> None:
    # SIGSTOP: connections are accepted by the kernel but never answered. Every bus call
    # must give up after BAQUP_BUS_TIMEOUT (1 s) and the job must go on at its own pace.
    sync = tmp_path / "sync"
    env = step_env(job_env, bus.url, sync, BAQUP_BUS_GRACE_PERIOD=30)
    client = bus.client()
    job = start_steps(env, jobs)
    wait_for(lambda: has_step(client, env, 3), 20, what="STEP_003 on the bus")
    bus.pause()
    try:
        at_pause = child_step(sync)
        paused_at = time.monotonic()
        wait_for(lambda: child_step(sync) >= at_pause + 10, 10, what="the child to go on")
        # 10 steps of 0.2 s: the child was not slowed down by the hung bus.
        assert time.monotonic() - paused_at < 2 + 2
        wait_for(lambda: f"STEP_{at_pause + 8:03d}" in buffered_steps(env), 10, what="buffering")
        touch(sync, "finish")
        wait_for((sync / "exited").exists, 20, what="the child's exit")
        child_exit = time.monotonic()
        wait_for(lambda: has_log(job, "job success"), 10, what="the end of the job")
        assert time.monotonic() - child_exit < 4
        assert job.poll() is None  # waiting for the bus, within the grace period
    finally:
        bus.resume()
    assert job.wait(30) == 0
    assert_delivered(client, env, final_count(sync))
    assert_retried(client, env)
    assert_committed(env)
    assert_no_traceback(job)


def test_redis_paused_for_good_exits_75_within_the_grace_period(
    bus: PrivateRedis, job_env: dict[str, str], jobs: list[Job], tmp_path: Path
) -> None:
    sync = tmp_path / "sync"
    env = step_env(job_env, bus.url, sync, BAQUP_BUS_GRACE_PERIOD=3)
    client = bus.client()
    job = start_steps(env, jobs)
    wait_for(lambda: has_step(client, env, 3), 20, what="STEP_003 on the bus")
    bus.pause()
    try:
        touch(sync, "finish")
        wait_for((sync / "exited").exists, 20, what="the child's exit")
        child_exit = time.monotonic()
        assert job.wait(30) == 75
        assert time.monotonic() - child_exit < 3 + 8
    finally:
        bus.resume()
    assert_unreported_status(env)
    assert_committed(env)
    assert_no_traceback(job)


# --- the fallback buffer and the status file cannot be written ---------------------------


def test_unwritable_fallback_dir_still_commits_and_exits_75(
    bus: PrivateRedis, job_env: dict[str, str], jobs: list[Job], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    sync = tmp_path / "sync"
    env = step_env(
        job_env, bus.url, sync, BAQUP_BUS_GRACE_PERIOD=3, BAQUP_BUS_FALLBACK_DIR=blocker / "fb"
    )
    client = bus.client()
    job = start_steps(env, jobs)
    wait_for(lambda: has_step(client, env, 3), 20, what="STEP_003 on the bus")
    bus.kill()
    touch(sync, "finish")
    assert job.wait(40) == 75
    assert_unreported_status(env)
    assert_committed(env)
    assert blocker.read_text() == "not a directory\n"
    assert any(
        "fallback buffer cannot be written" in str(r.get("message")) and r["level"] == "error"
        for r in job.logs()
    )
    assert_no_traceback(job)


def test_unwritable_fallback_dir_status_still_arrives_when_redis_returns_in_grace(
    bus: PrivateRedis, job_env: dict[str, str], jobs: list[Job], tmp_path: Path
) -> None:
    # Spec section 3: a job that completes before the bus is back stays alive for the
    # grace period. Without a fallback buffer the messages of the outage may be lost,
    # but the final status must still reach the bus when it returns in time.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    sync = tmp_path / "sync"
    env = step_env(
        job_env, bus.url, sync, BAQUP_BUS_GRACE_PERIOD=20, BAQUP_BUS_FALLBACK_DIR=blocker / "fb"
    )
    client = bus.client()
    job = start_steps(env, jobs)
    wait_for(lambda: has_step(client, env, 3), 20, what="STEP_003 on the bus")
    killed = bus.kill()
    touch(sync, "finish")
    wait_for((sync / "exited").exists, 20, what="the child's exit")
    sleep_until(killed + 3)
    bus.restart()
    assert job.wait(30) == 0
    status = read_hash(bus.client(), status_key(env))
    assert status.get("status") == "success", status
    assert status["exit_code"] == 0
    assert not (job_dir(env) / ".baqup-status.json").exists()
    assert_committed(env)
    assert_no_traceback(job)


def test_full_fallback_dir_still_exits_75_with_the_status_file(
    bus: PrivateRedis, job_env: dict[str, str], jobs: list[Job], tmp_path: Path
) -> None:
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True, timeout=30
    )
    try:
        # Leave one page free: the buffer fills up after a few messages.
        (mount / "filler").write_bytes(b"\0" * (60 * 1024))
        sync = tmp_path / "sync"
        env = step_env(
            job_env,
            bus.url,
            sync,
            BAQUP_BUS_GRACE_PERIOD=3,
            BAQUP_BUS_FALLBACK_DIR=mount,
            MESSAGE_SIZE=900,
            MIN_STEPS=30,
            STEP_DELAY=0.05,
        )
        client = bus.client()
        job = start_steps(env, jobs)
        wait_for(lambda: has_step(client, env, 3), 20, what="STEP_003 on the bus")
        bus.kill()
        touch(sync, "finish")
        assert job.wait(40) == 75
        assert_unreported_status(env)
        assert_committed(env)
        assert any(
            "fallback buffer cannot be written" in str(r.get("message"))
            and "space" in str(r.get("context", {}).get("reason", "")).lower()
            for r in job.logs()
        ), job.stderr()[-3000:]
        # What did fit is whole lines in order (a torn last line at most).
        steps = buffered_steps(env)
        assert steps == sorted(steps)
        assert_no_traceback(job)
    finally:
        subprocess.run(["umount", str(mount)], check=False, timeout=30)


def test_status_file_unwritable_with_the_bus_down_exits_73(
    bus: PrivateRedis, job_env: dict[str, str], jobs: list[Job], tmp_path: Path
) -> None:
    sync = tmp_path / "sync"
    env = step_env(job_env, bus.url, sync, BAQUP_BUS_GRACE_PERIOD=3, STATUS_FILE_AS_DIR=1)
    client = bus.client()
    job = start_steps(env, jobs)
    wait_for(lambda: has_step(client, env, 3), 20, what="STEP_003 on the bus")
    bus.kill()
    touch(sync, "finish")
    assert job.wait(40) == 73
    assert (job_dir(env) / ".baqup-status.json").is_dir()
    assert list((job_dir(env) / ".baqup-status.json").iterdir()) == []
    assert_committed(env)  # the backup itself is fine; only its report is lost
    records = job.logs()
    fatal = [r for r in records if r.get("level") == "fatal"]
    assert any("could not be reported nor written" in str(r.get("message")) for r in fatal)
    assert fatal[-1]["context"]["original_exit_code"] == 0
    assert_no_traceback(job)
