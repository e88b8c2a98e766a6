"""The job lifecycle of the real `baqup-run`, end to end.

Real supervisor subprocesses, real children (Python snippets, `sh -c`, `tar`), and the
real redis-server wherever the bus matters: states and their order, signals (SIGUSR1
answered, SIGHUP/SIGQUIT/SIGUSR2 forwarded, SIGTERM in RUNNING and in COMPLETING, a
second SIGTERM), reaping of orphans, job and stall timeouts, intents, every exit-code
path of INTERFACE.md section 7, retries, and `kill -9` never leaving a manifest that
names something missing or corrupt.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import RedisServer, python_child, run_baqup
from tests.jobs import (
    Job,
    NotifyListener,
    job_dir,
    log_records,
    prefix,
    read_hash,
    read_stream,
    redis_env,
    start_job,
    wait_for,
)

Launch = Callable[..., Job]

# --- children --------------------------------------------------------------------------

# A child that records every signal it gets (and so does a grandchild it forks) as a file
# `{who}.{SIGNAME}` in argv[1]; it writes `{who}.ready` once its handlers are in place,
# runs until a `stop` file appears, then writes an artifact and exits 0. SIGTERM makes
# both exit at once (after recording it).
RECORDER = r"""
import os, signal, sys, time
from pathlib import Path
d = Path(sys.argv[1])
who = "child"
def record(signum, frame):
    (d / f"{who}.{signal.Signals(signum).name}").write_text(str(os.getpid()))
    if signum == signal.SIGTERM:
        os._exit(0)
for s in (signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
    signal.signal(s, record)
Path(os.environ["BAQUP_WORK_DIR"], "partial.dat").write_text("half a backup\n")
if os.fork() == 0:
    who = "grandchild"
    (d / "grandchild.ready").write_text(str(os.getpid()))
    while not (d / "stop").exists():
        time.sleep(0.01)
    os._exit(0)
(d / "child.ready").write_text(str(os.getpid()))
while not (d / "stop").exists():
    time.sleep(0.01)
os.wait()
Path(os.environ["BAQUP_WORK_DIR"], "partial.dat").write_text("a whole backup\n")
"""

# Ignores SIGTERM; says it is ready; sleeps a minute.
STUBBORN = r"""
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGTERM, signal.SIG_IGN)
Path(sys.argv[1], "child.ready").write_text("")
time.sleep(60)
"""

# Writes sparse artifacts of the sizes in argv[1:] (MiB): cheap to write, slow to checksum.
BIG_ARTIFACTS = r"""
import os, sys
for i, mib in enumerate(sys.argv[1:]):
    with open(os.path.join(os.environ["BAQUP_WORK_DIR"], f"part{i}.bin"), "wb") as f:
        f.write(b"baqup")
        f.truncate(int(mib) << 20)
"""
BIG_SIZES = (300, 310, 320)


def write_artifact_then(shell: str) -> list[str]:
    """`sh -c` writing one artifact, then running `shell`."""
    return ["sh", "-c", f'echo data > "$BAQUP_WORK_DIR/a.txt"; {shell}']


# --- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture
def env(job_env: dict[str, str], redis_server: RedisServer) -> dict[str, str]:
    """job_env on the real redis-server, with no retries unless a test asks for them."""
    out = redis_env(job_env, redis_server)
    out["BAQUP_JOB_RETRY_MAX"] = "0"
    return out


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """Start baqup-run jobs; at the end none is left running, nor any group it left behind."""
    started: list[Job] = []

    def _launch(args: list[str], job_env: Mapping[str, str]) -> Job:
        job = start_job(args, job_env, tmp_path / "out")
        started.append(job)
        return job

    yield _launch
    for job in started:
        job.stop()
        if job.process.returncode is not None and job.process.returncode < 0:
            for pid in child_pids(job):  # baqup-run was killed: its child's group survived it
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def child_pids(job: Job) -> list[int]:
    return [
        int(r["context"]["pid"])
        for r in job.logs()
        if r.get("message") == "child started" and "pid" in r.get("context", {})
    ]


def status_of(client: redis.Redis, env: Mapping[str, str]) -> dict[str, Any]:
    status = read_hash(client, f"{prefix(env)}status:{env['BAQUP_JOB_ID']}")
    assert status, "no status hash on the bus"
    return status


def error_code(status: Mapping[str, Any]) -> str:
    error = status.get("error")
    assert isinstance(error, dict), f"status has no error object: {status!r}"
    return str(error["code"])


def manifest_of(env: Mapping[str, str]) -> dict[str, Any] | None:
    path = job_dir(env) / "manifest.json"
    if not path.exists():
        return None
    value: dict[str, Any] = json.loads(path.read_text())
    return value


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process from /proc, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def zombies_of(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = proc_stat(int(entry.name))
            if stat is not None and stat[0] == "Z" and stat[1] == parent:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def state_chain(messages: list[dict[str, Any]]) -> list[str]:
    states = [m for m in messages if m.get("type") == "state"]
    if not states:
        return []
    return [str(states[0]["previous"]), *(str(m["state"]) for m in states)]


def exist(*paths: Path) -> Callable[[], bool]:
    return lambda: all(p.exists() for p in paths)


def newer_beat(client: redis.Redis, key: str, sequence: int) -> Callable[[], dict[str, Any]]:
    """A predicate: the heartbeat hash once its sequence is past `sequence`, else {}."""

    def check() -> dict[str, Any]:
        beat = read_hash(client, key)
        return beat if int(beat.get("sequence", 0)) > sequence else {}

    return check


def has_status(messages: list[dict[str, Any]]) -> bool:
    return any(m.get("type") == "status" for m in messages)


# --- a successful job -----------------------------------------------------------------------


def test_tar_job_succeeds_with_states_in_order_each_logged_once(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path, launch: Launch
) -> None:
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    (source / "hello.txt").write_text("hello\n")
    (source / "sub" / "data.bin").write_bytes(os.urandom(4096))
    listener = NotifyListener(redis_client, f"{prefix(env)}notify")
    try:
        job = launch(
            ["--", "sh", "-c", 'tar -cf "$BAQUP_WORK_DIR/data.tar" -C "$1" .', "sh", str(source)],
            env,
        )
        assert job.wait(30) == 0, job.stderr()
        messages = listener.collect(has_status, timeout=10)
    finally:
        listener.close()

    assert state_chain(messages) == ["initializing", "running", "completing", "terminated"]
    assert messages[-1]["type"] == "status"
    assert messages[-1]["status"] == "success"
    assert all(m["job_id"] == env["BAQUP_JOB_ID"] for m in messages)

    transitions = [
        r["message"]
        for r in job.logs()
        if r.get("component") == "supervisor" and str(r.get("message", "")).startswith("state ")
    ]
    assert transitions == [
        "state initializing -> running",
        "state running -> completing",
        "state completing -> terminated",
    ]

    manifest = manifest_of(env)
    assert manifest is not None
    [artifact] = manifest["artifacts"]
    assert artifact["filename"] == "data.tar"
    tar_path = job_dir(env) / "data.tar"
    assert artifact["checksum"] == {"algorithm": "sha256", "value": file_digest(tar_path, "sha256")}
    assert artifact["size_bytes"] == tar_path.stat().st_size
    with tarfile.open(tar_path) as archive:
        names = {n.lstrip("./") for n in archive.getnames()}
    assert {"hello.txt", "sub/data.bin"} <= names

    status = status_of(redis_client, env)
    assert status["status"] == "success"
    assert status["error"] is None
    assert status["files"] == [
        {
            "path": str(tar_path),
            "size_bytes": tar_path.stat().st_size,
            "checksum_sha256": artifact["checksum"]["value"],
        }
    ]


# --- signals ---------------------------------------------------------------------------------


def test_sigusr1_beats_within_100ms_and_is_not_forwarded(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path, launch: Launch
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    env["BAQUP_AGENT_HEARTBEAT_INTERVAL"] = "30"
    key = f"{prefix(env)}heartbeat:{env['BAQUP_AGENT_ID']}"
    job = launch(["--", *python_child(RECORDER), str(marks)], env)
    wait_for(exist(marks / "child.ready", marks / "grandchild.ready"))
    wait_for(lambda: read_hash(redis_client, key).get("state") == "running", what="running beat")

    for _ in range(5):
        before = read_hash(redis_client, key)
        sent = time.monotonic()
        job.signal(signal.SIGUSR1)
        after = wait_for(
            newer_beat(redis_client, key, int(before["sequence"])),
            timeout=5,
            interval=0.002,
            what="a heartbeat after SIGUSR1",
        )
        elapsed = time.monotonic() - sent
        assert elapsed < 0.1, f"SIGUSR1 answered after {elapsed * 1000:.0f} ms"
        assert after["sequence"] == before["sequence"] + 1
        assert after["timestamp"] != before["timestamp"]
        assert after["state"] == "running"

    # A forwarded signal sent after them arrives; the SIGUSR1s never did.
    job.signal(signal.SIGUSR2)
    wait_for(exist(marks / "child.SIGUSR2"), what="SIGUSR2 forwarded")
    (marks / "stop").write_text("")
    assert job.wait(30) == 0, job.stderr()
    assert not (marks / "child.SIGUSR1").exists()
    assert not (marks / "grandchild.SIGUSR1").exists()


def test_sighup_sigquit_sigusr2_reach_the_whole_child_group(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path, launch: Launch
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    job = launch(["--", *python_child(RECORDER), str(marks)], env)
    wait_for(exist(marks / "child.ready", marks / "grandchild.ready"))
    for signum in (signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR2):
        name = signal.Signals(signum).name
        job.signal(signum)
        wait_for(
            exist(marks / f"child.{name}", marks / f"grandchild.{name}"),
            what=f"{name} in child and grandchild",
        )
        assert job.poll() is None, f"baqup-run died of {name}"
    (marks / "stop").write_text("")
    assert job.wait(30) == 0, job.stderr()
    assert status_of(redis_client, env)["status"] == "success"
    assert not (marks / "child.SIGTERM").exists()


def test_sigterm_in_running_aborts_the_whole_group_without_a_manifest(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path, launch: Launch
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    listener = NotifyListener(redis_client, f"{prefix(env)}notify")
    try:
        job = launch(["--", *python_child(RECORDER), str(marks)], env)
        wait_for(exist(marks / "child.ready", marks / "grandchild.ready"))
        job.signal(signal.SIGTERM)
        assert job.wait(30) == 1, job.stderr()
        messages = listener.collect(has_status, timeout=10)
    finally:
        listener.close()
    assert state_chain(messages) == ["initializing", "running", "failed"]
    assert (marks / "child.SIGTERM").exists()
    assert (marks / "grandchild.SIGTERM").exists()
    status = status_of(redis_client, env)
    assert status["status"] == "failed"
    assert error_code(status) == "ABORTED"
    assert status["exit_code"] == 1
    assert not (job_dir(env) / "manifest.json").exists()
    assert not (job_dir(env) / "partial.dat").exists()


def test_child_ignoring_sigterm_is_killed_after_the_grace_period(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path, launch: Launch
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    job = launch(["--grace", "1", "--", *python_child(STUBBORN), str(marks)], env)
    wait_for(exist(marks / "child.ready"))
    [pid] = child_pids(job)
    sent = time.monotonic()
    job.signal(signal.SIGTERM)
    assert job.wait(20) == 1, job.stderr()
    elapsed = time.monotonic() - sent
    assert 0.9 <= elapsed < 8, f"ended {elapsed:.2f} s after SIGTERM with --grace 1"
    assert not alive(pid)
    assert any("SIGKILL" in str(r.get("message")) for r in job.logs())
    assert error_code(status_of(redis_client, env)) == "ABORTED"


def test_second_sigterm_during_the_grace_period_escalates_at_once(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path, launch: Launch
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    job = launch(["--grace", "30", "--", *python_child(STUBBORN), str(marks)], env)
    wait_for(exist(marks / "child.ready"))
    [pid] = child_pids(job)
    sent = time.monotonic()
    job.signal(signal.SIGTERM)
    wait_for(lambda: "aborting the job" in job.stderr(), what="the abort to begin")
    assert job.poll() is None  # the child ignores SIGTERM: the grace period is running
    job.signal(signal.SIGTERM)
    assert job.wait(20) == 1, job.stderr()
    assert time.monotonic() - sent < 8
    assert not alive(pid)
    assert error_code(status_of(redis_client, env)) == "ABORTED"


def test_sigusr1_is_answered_while_completing_checksums(
    env: dict[str, str], redis_client: redis.Redis, launch: Launch
) -> None:
    env.update(BAQUP_ARTIFACT_CHECKSUM_ALGORITHM="sha512", BAQUP_AGENT_HEARTBEAT_INTERVAL="30")
    key = f"{prefix(env)}heartbeat:{env['BAQUP_AGENT_ID']}"
    listener = NotifyListener(redis_client, f"{prefix(env)}notify")
    try:
        job = launch(["--", *python_child(BIG_ARTIFACTS), *map(str, BIG_SIZES)], env)
        listener.collect(lambda ms: "completing" in state_chain(ms), timeout=30)
    finally:
        listener.close()
    # The state change beats once by itself; SIGUSR1s come after it.
    wait_for(lambda: read_hash(redis_client, key).get("state") == "completing", timeout=5)
    for _ in range(3):
        before = read_hash(redis_client, key)
        sent = time.monotonic()
        job.signal(signal.SIGUSR1)
        after = wait_for(
            newer_beat(redis_client, key, int(before["sequence"])), timeout=5, interval=0.002
        )
        elapsed = time.monotonic() - sent
        assert elapsed < 0.1, f"SIGUSR1 in COMPLETING answered after {elapsed * 1000:.0f} ms"
        assert after["state"] == "completing", "COMPLETING ended too soon: make it slower"
    assert job.wait(60) == 0, job.stderr()
    assert manifest_of(env) is not None


@functools.cache
def zeros_digest(size: int, algorithm: str) -> str:
    """The digest of a BIG_ARTIFACTS file: b"baqup" then zeros up to `size` bytes."""
    digest = hashlib.new(algorithm)
    digest.update(b"baqup")
    block = bytes(1 << 20)
    left = size - 5
    while left > 0:
        digest.update(block[: min(left, len(block))])
        left -= len(block)
    return digest.hexdigest()


def test_sigterm_in_completing_lets_the_commit_finish(
    env: dict[str, str], redis_client: redis.Redis, launch: Launch
) -> None:
    env["BAQUP_ARTIFACT_CHECKSUM_ALGORITHM"] = "sha512"
    listener = NotifyListener(redis_client, f"{prefix(env)}notify")
    try:
        job = launch(["--", *python_child(BIG_ARTIFACTS), *map(str, BIG_SIZES)], env)
        listener.collect(lambda ms: "completing" in state_chain(ms), timeout=30)
        job.signal(signal.SIGTERM)
        assert job.wait(60) == 0, job.stderr()
        messages = listener.collect(has_status, timeout=10)
    finally:
        listener.close()
    assert state_chain(messages)[-1] == "terminated"
    assert any("SIGTERM during COMPLETING" in str(r.get("message")) for r in job.logs()), (
        "the SIGTERM did not arrive during COMPLETING: make the commit slower"
    )
    manifest = manifest_of(env)
    assert manifest is not None
    assert sorted(a["filename"] for a in manifest["artifacts"]) == [
        "part0.bin",
        "part1.bin",
        "part2.bin",
    ]
    for entry in manifest["artifacts"]:
        path = job_dir(env) / entry["filename"]
        assert entry["size_bytes"] == path.stat().st_size
        assert entry["checksum"]["algorithm"] == "sha512"
        assert entry["checksum"]["value"] == zeros_digest(entry["size_bytes"], "sha512")
    status = status_of(redis_client, env)
    assert status["status"] == "success"
    assert status["error"] is None


# --- orphans ---------------------------------------------------------------------------------

ORPHAN_MAKER = r"""
import os, subprocess, sys, time
from pathlib import Path
d = Path(sys.argv[1])
subprocess.run(["sh", "-c", 'sleep 1 & echo $! > "$1"', "sh", str(d / "orphan.pid")], check=True)
(d / "child.ready").write_text(str(os.getpid()))
while not (d / "stop").exists():
    time.sleep(0.01)
Path(os.environ["BAQUP_WORK_DIR"], "out.txt").write_text("x")
"""


def test_orphaned_grandchildren_are_adopted_and_reaped(
    env: dict[str, str], tmp_path: Path, launch: Launch
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    job = launch(["--", *python_child(ORPHAN_MAKER), str(marks)], env)
    wait_for(exist(marks / "child.ready"), timeout=15)
    orphan = int((marks / "orphan.pid").read_text())
    stat = proc_stat(orphan)
    assert stat is not None, "the orphan ended before it could be inspected"
    assert stat[1] == job.pid, "the orphan was not re-parented to baqup-run (subreaper)"
    # The orphan exits after a second; baqup-run must reap it while the child runs on.
    wait_for(lambda: proc_stat(orphan) is None, timeout=5, what="the orphan to be reaped")
    assert zombies_of(job.pid) == []
    assert job.poll() is None
    (marks / "stop").write_text("")
    assert job.wait(30) == 0, job.stderr()


def test_a_group_member_outliving_the_child_is_ended(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path, launch: Launch
) -> None:
    """INTERFACE.md 10: what the child leaves running gets --grace to finish, then is killed
    and the job fails (DESCENDANTS_KILLED); tests/test_descendants.py has the variants."""
    pid_file = tmp_path / "orphan.pid"
    started = time.monotonic()
    job = launch(
        [
            "--grace",
            "1",
            "--",
            *write_artifact_then('sleep 30 & echo $! > "$1"; exit 0'),
            "sh",
            str(pid_file),
        ],
        env,
    )
    assert job.wait(20) == 1, job.stderr()
    assert time.monotonic() - started < 15
    orphan = int(pid_file.read_text())
    assert not alive(orphan), "the orphaned sleep outlived the job"
    assert error_code(status_of(redis_client, env)) == "DESCENDANTS_KILLED"
    assert manifest_of(env) is None


# --- timeouts ----------------------------------------------------------------------------------


def test_job_timeout_aborts_quickly(
    env: dict[str, str], redis_client: redis.Redis, launch: Launch
) -> None:
    env["BAQUP_JOB_TIMEOUT"] = "2"
    started = time.monotonic()
    job = launch(["--", "sleep", "60"], env)
    assert job.wait(30) == 1, job.stderr()
    assert 1.8 <= time.monotonic() - started < 8
    status = status_of(redis_client, env)
    assert status["status"] == "failed"
    assert error_code(status) == "JOB_TIMEOUT"


def test_stall_timeout_aborts_a_silent_child(
    env: dict[str, str], redis_client: redis.Redis, launch: Launch
) -> None:
    env["BAQUP_AGENT_STALL_TIMEOUT"] = "2"
    started = time.monotonic()
    job = launch(["--", "sleep", "60"], env)
    assert job.wait(30) == 1, job.stderr()
    assert 1.8 <= time.monotonic() - started < 8
    assert error_code(status_of(redis_client, env)) == "STALLED"


INTENT_THEN_SILENCE = r"""
import os, time
from pathlib import Path
fd = int(os.environ["BAQUP_CONTROL_FD"])
os.write(fd, b'{"type": "intent", "operation": "scan", "expected_duration_seconds": 5}\n')
time.sleep(3.5)
Path(os.environ["BAQUP_WORK_DIR"], "scan.txt").write_text("scanned\n")
"""


def test_an_intent_extends_the_stall_allowance(
    env: dict[str, str], redis_client: redis.Redis, launch: Launch
) -> None:
    env["BAQUP_AGENT_STALL_TIMEOUT"] = "2"
    job = launch(["--", *python_child(INTENT_THEN_SILENCE)], env)
    assert job.wait(30) == 0, job.stderr()
    status = status_of(redis_client, env)
    assert status["status"] == "success"
    assert manifest_of(env) is not None


# --- exit codes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("child_code", "expected"),
    [(65, 65), (69, 69), (73, 73), (74, 74), (76, 76), (3, 1), (255, 1)],
)
def test_child_exit_codes_map_per_the_taxonomy(
    env: dict[str, str], redis_client: redis.Redis, child_code: int, expected: int
) -> None:
    result = run_baqup(["--", *write_artifact_then(f"exit {child_code}")], env, timeout=30)
    assert result.returncode == expected, result.stderr
    status = status_of(redis_client, env)
    assert status["status"] == "failed"
    assert status["exit_code"] == expected
    assert error_code(status) == "CHILD_FAILED"
    assert str(child_code) in status["error"]["message"]
    assert manifest_of(env) is None


def test_child_killed_by_a_signal_gives_1(env: dict[str, str], redis_client: redis.Redis) -> None:
    result = run_baqup(["--", *write_artifact_then("kill -KILL $$")], env, timeout=30)
    assert result.returncode == 1, result.stderr
    status = status_of(redis_client, env)
    assert error_code(status) == "CHILD_KILLED"
    assert "SIGKILL" in status["error"]["message"]
    assert manifest_of(env) is None


@pytest.mark.parametrize("command", ["/nonexistent/bin/backup-tool", "no-such-backup-tool-xyz"])
def test_command_not_found_gives_64(
    env: dict[str, str], redis_client: redis.Redis, command: str
) -> None:
    result = run_baqup(["--", command, "--flag"], env, timeout=30)
    assert result.returncode == 64, result.stderr
    assert status_of(redis_client, env)["exit_code"] == 64


def test_non_executable_command_gives_1(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    script = tmp_path / "backup.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    result = run_baqup(["--", str(script)], env, timeout=30)
    assert result.returncode == 1, result.stderr
    status = status_of(redis_client, env)
    assert status["status"] == "failed"
    assert status["exit_code"] == 1


def test_invalid_config_gives_64_and_starts_nothing(env: dict[str, str], tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    env["BAQUP_JOB_TIMEOUT"] = "soon"
    result = run_baqup(["--", "sh", "-c", 'touch "$1"', "sh", str(marker)], env, timeout=30)
    assert result.returncode == 64, result.stderr
    assert "BAQUP_JOB_TIMEOUT" in result.stderr + result.stdout
    assert not marker.exists()


RETRY_COUNTER = r"""
import os, sys
from pathlib import Path
counter = Path(sys.argv[1])
n = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(n))
if n < 3:
    Path(os.environ["BAQUP_WORK_DIR"], f"attempt{n}.tmp").write_text("junk\n")
    sys.exit(69)
Path(os.environ["BAQUP_WORK_DIR"], "final.dat").write_text("good\n")
"""


def test_retriable_exit_is_retried_until_success(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    counter = tmp_path / "counter"
    env.update(BAQUP_JOB_RETRY_MAX="3", BAQUP_JOB_RETRY_BACKOFF="constant")
    result = run_baqup(["--", *python_child(RETRY_COUNTER), str(counter)], env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert counter.read_text() == "3"
    manifest = manifest_of(env)
    assert manifest is not None
    assert [a["filename"] for a in manifest["artifacts"]] == ["final.dat"]
    events = read_stream(redis_client, f"{prefix(env)}events:{env['BAQUP_JOB_ID']}")
    retries = [e for e in events if e.get("code") == "JOB_RETRY"]
    assert retries, "no JOB_RETRY event"
    assert retries[-1]["count"] == 2
    assert status_of(redis_client, env)["status"] == "success"


# --- kill -9 --------------------------------------------------------------------------------------


def check_manifest_invariant(env: Mapping[str, str]) -> bool:
    """No manifest, or one whose every artifact is present, whole, with its checksum."""
    manifest = manifest_of(env)
    if manifest is None:
        return False
    for entry in manifest["artifacts"]:
        path = job_dir(env) / entry["filename"]
        assert path.is_file(), f"manifest names {entry['filename']}, which is missing"
        assert path.stat().st_size == entry["size_bytes"]
        algorithm = entry["checksum"]["algorithm"]
        assert file_digest(path, algorithm) == entry["checksum"]["value"]
    return True


def test_kill_9_while_the_child_runs_leaves_no_manifest(
    env: dict[str, str], tmp_path: Path, launch: Launch
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    job = launch(["--", *python_child(RECORDER), str(marks)], env)
    wait_for(exist(marks / "child.ready", marks / "grandchild.ready"))
    job.signal(signal.SIGKILL)
    assert job.wait(10) == -signal.SIGKILL
    assert not (job_dir(env) / "manifest.json").exists()
    assert not (job_dir(env) / "partial.dat").exists()
    assert (job_dir(env) / ".staging" / "partial.dat").exists()


# Writes argv[1] small artifacts of random bytes: COMPLETING then spends a few hundred ms
# moving them one by one, a window a kill can land in.
MANY_ARTIFACTS = r"""
import os, sys
for i in range(int(sys.argv[1])):
    with open(os.path.join(os.environ["BAQUP_WORK_DIR"], f"small{i:05}.dat"), "wb") as f:
        f.write(os.urandom(1024))
"""
MANY = 2000


def first_artifact_visible(job: Job, directory: Path) -> None:
    """Return as soon as anything but `.staging` appears in the job dir (or the job ends)."""
    deadline = time.monotonic() + 30
    while job.poll() is None and time.monotonic() < deadline:
        if any(name != ".staging" for name in os.listdir(directory)):
            return
        time.sleep(0.0005)


@pytest.mark.parametrize(
    ("scenario", "delay"),
    [("checksumming", 0.3), ("moving", 0.0), ("moving", 0.15), ("moving", 0.25), ("moving", 0.4)],
)
def test_kill_9_during_completing_never_shows_a_false_manifest(
    env: dict[str, str], redis_client: redis.Redis, launch: Launch, scenario: str, delay: float
) -> None:
    if scenario == "checksumming":
        env["BAQUP_ARTIFACT_CHECKSUM_ALGORITHM"] = "sha512"
        child = [*python_child(BIG_ARTIFACTS), *map(str, BIG_SIZES)]
        expected = {f"part{i}.bin" for i in range(len(BIG_SIZES))}
    else:
        child = [*python_child(MANY_ARTIFACTS), str(MANY)]
        expected = {f"small{i:05}.dat" for i in range(MANY)}
    listener = NotifyListener(redis_client, f"{prefix(env)}notify")
    try:
        job = launch(["--", *child], env)
        listener.collect(lambda ms: "completing" in state_chain(ms), timeout=30)
    finally:
        listener.close()
    if scenario == "moving":
        first_artifact_visible(job, job_dir(env))
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.002)
    if job.poll() is None:
        job.signal(signal.SIGKILL)
    code = job.wait(10)

    committed = check_manifest_invariant(env)
    names = {p.name for p in job_dir(env).iterdir()}
    staged = {p.name for p in (job_dir(env) / ".staging").iterdir()}
    if code == 0:
        assert committed, "exit 0 without a manifest"
    else:
        assert code == -signal.SIGKILL
    if committed:
        manifest = manifest_of(env)
        assert manifest is not None
        assert {a["filename"] for a in manifest["artifacts"]} == expected
    else:
        assert "manifest.json" not in names
        # Whatever was not moved yet is still in the work dir: nothing was lost.
        assert expected <= names | staged
    if scenario == "moving" and delay == 0.0:
        # Killed right after the first move: some artifacts moved, and no manifest.
        assert code == -signal.SIGKILL
        assert not committed
        assert names & expected


def test_log_records_keeps_only_json_objects() -> None:
    """Guards the helper the other tests read stderr with."""
    text = '{"a": 1}\nnot json\n[1, 2]\n  {"b": "x"}  \n{broken\n'
    assert log_records(text) == [{"a": 1}, {"b": "x"}]


EARLY_SIGNALS = r"""
import os, signal, time
from baqup_supervisor.signals import SignalRouter, block_job_signals
block_job_signals()
os.kill(os.getpid(), signal.SIGUSR1)   # the default action would kill the process
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.05)
seen = []
with SignalRouter(lambda info: seen.append(info.si_signo), on_error=print):
    deadline = time.monotonic() + 10
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
print("SEEN", sorted(signal.Signals(s).name for s in seen))
"""


def test_signals_before_the_router_are_remembered_and_replayed() -> None:
    """A SIGTERM or SIGUSR1 during start-up neither kills baqup-run nor is lost: blocked
    from the first line, it waits in the kernel until the router takes it."""
    result = subprocess.run(
        [sys.executable, "-c", EARLY_SIGNALS],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "SEEN ['SIGTERM', 'SIGUSR1']" in result.stdout, result.stdout
