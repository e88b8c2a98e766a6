"""`baqup watch JOB_ID`: an operator following a real job, on Redis and on a file bus.

Piped, watch writes one JSON object per line (`kind` heartbeat, progress, event or
status); on a terminal (a pseudo-terminal made by util-linux `script`) it draws a
live line with a progress bar and ends with the status. It always ends when the
status arrives, with the job's exit code, or with 69 after `--timeout` seconds.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RedisServer, python_child
from tests.jobs import Job, redis_env, start_job

BAQUP = Path(sys.executable).parent / "baqup"

# Reports progress from 10 to 100 % over about 3 s, one warning, then writes its dump
# and exits with $EXIT_CODE.
CHILD = r"""
import json, os, sys, time
control = os.fdopen(int(os.environ["BAQUP_CONTROL_FD"]), "w", buffering=1)
for step in range(1, 11):
    control.write(json.dumps({"type": "progress", "percent_complete": step * 10,
                              "bytes_processed": step * 1024 * 1024,
                              "files_processed": step}) + "\n")
    if step == 3:
        control.write(json.dumps({"type": "event", "severity": "warn",
                                  "code": "FILE_CHANGED", "message": "changed while read",
                                  "path": "/data/a"}) + "\n")
    time.sleep(0.3)
with open(os.path.join(os.environ["BAQUP_WORK_DIR"], "dump.bin"), "wb") as handle:
    handle.write(b"dump" * 256)
sys.exit(int(os.environ.get("EXIT_CODE", "0")))
"""

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Watchers the test started; any still running at the end is killed by its PID."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def watch_env(env: dict[str, str]) -> dict[str, str]:
    """Only what a controller's shell would have: the bus URL and the key prefix."""
    keep = {k: v for k, v in env.items() if not k.startswith("BAQUP_")}
    keep.update(
        BAQUP_BUS_URL=env["BAQUP_BUS_URL"], BAQUP_BUS_KEY_PREFIX=env["BAQUP_BUS_KEY_PREFIX"]
    )
    return keep


def start_watch(
    env: dict[str, str], processes: list[subprocess.Popen[bytes]], *args: str
) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [str(BAQUP), "watch", env["BAQUP_JOB_ID"], "--interval", "0.1", *args],
        env=watch_env(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    processes.append(process)
    return process


def finish(process: subprocess.Popen[bytes], timeout: float = 30) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out.decode(), err.decode()


def bus_env(kind: str, job_env: dict[str, str], redis_server: RedisServer) -> dict[str, str]:
    env = redis_env(job_env, redis_server) if kind == "redis" else dict(job_env)
    env["BAQUP_AGENT_HEARTBEAT_INTERVAL"] = "1"
    return env


@pytest.mark.parametrize("kind", ["redis", "file"])
def test_watch_follows_a_job_as_json_lines(
    kind: str,
    redis_server: RedisServer,
    job_env: dict[str, str],
    jobs: list[Job],
    processes: list[subprocess.Popen[bytes]],
) -> None:
    env = bus_env(kind, job_env, redis_server)
    watcher = start_watch(env, processes)
    time.sleep(0.3)  # watching a job that has not started yet is part of the test
    assert watcher.poll() is None
    job = start_job(["--", *python_child(CHILD)], env)
    jobs.append(job)
    assert job.wait(60) == 0
    code, out, err = finish(watcher)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert all(set(line) == {"kind", "message"} for line in lines)
    kinds = [line["kind"] for line in lines]
    assert {"heartbeat", "progress", "event", "status"} <= set(kinds), kinds
    assert kinds[-1] == "status"
    assert kinds.count("status") == 1
    status = lines[-1]["message"]
    assert status["status"] == "success"
    assert status["exit_code"] == 0
    assert status["job_id"] == env["BAQUP_JOB_ID"]
    percents = [line["message"]["percent_complete"] for line in lines if line["kind"] == "progress"]
    assert percents == sorted(percents)
    assert len(percents) >= 2
    assert percents[-1] == 100
    events = [line["message"] for line in lines if line["kind"] == "event"]
    assert [e["code"] for e in events][:1] == ["FILE_CHANGED"]
    assert events[0]["sample_paths"] == ["/data/a"]
    heartbeats = [line["message"] for line in lines if line["kind"] == "heartbeat"]
    assert all(h["agent_id"] == env["BAQUP_AGENT_ID"] for h in heartbeats)
    assert "running" in {h["state"] for h in heartbeats}


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_watch_exits_with_the_jobs_exit_code(
    kind: str,
    redis_server: RedisServer,
    job_env: dict[str, str],
    jobs: list[Job],
    processes: list[subprocess.Popen[bytes]],
) -> None:
    env = bus_env(kind, job_env, redis_server)
    env["EXIT_CODE"] = "65"
    watcher = start_watch(env, processes)
    job = start_job(["--", *python_child(CHILD)], env)
    jobs.append(job)
    assert job.wait(60) == 65
    code, out, err = finish(watcher)
    assert code == 65, err
    status = json.loads(out.splitlines()[-1])
    assert status["kind"] == "status"
    assert status["message"]["status"] == "failed"
    assert status["message"]["exit_code"] == 65


@pytest.mark.parametrize("kind", ["redis", "file"])
def test_watch_timeout_on_an_unknown_job_exits_69(
    kind: str,
    redis_server: RedisServer,
    job_env: dict[str, str],
    processes: list[subprocess.Popen[bytes]],
) -> None:
    env = bus_env(kind, job_env, redis_server)
    started = time.monotonic()
    watcher = start_watch(env, processes, "--timeout", "1")
    code, out, err = finish(watcher)
    elapsed = time.monotonic() - started
    assert code == 69, err
    assert 1 <= elapsed < 10
    assert out == ""
    assert "timeout" in err
    assert "Traceback" not in err


def test_watch_on_a_terminal_draws_a_progress_bar(
    redis_server: RedisServer,
    job_env: dict[str, str],
    jobs: list[Job],
    processes: list[subprocess.Popen[bytes]],
) -> None:
    env = bus_env("redis", job_env, redis_server)
    command = shlex.join([str(BAQUP), "watch", env["BAQUP_JOB_ID"], "--interval", "0.1"])
    terminal_env = {**watch_env(env), "COLUMNS": "120", "TERM": "xterm"}
    watcher = subprocess.Popen(
        ["script", "-qec", command, "/dev/null"],
        env=terminal_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    processes.append(watcher)
    job = start_job(["--", *python_child(CHILD)], env)
    jobs.append(job)
    assert job.wait(60) == 0
    code, out, err = finish(watcher)
    assert code == 0, (out, err)
    screen = [ANSI.sub("", part).strip() for part in re.split(r"[\r\n]+", out)]
    shown = [part for part in screen if part]
    assert not any(part.startswith("{") for part in shown), shown  # not JSON on a terminal
    bars = [part for part in shown if re.search(r"\[#{4,}-*\]", part)]
    assert bars, shown
    assert any("running" in part and "%" in part for part in bars), bars
    assert "FILE_CHANGED" in out  # events are printed as they come
    last = shown[-1]
    assert "success" in last, shown[-3:]
    assert "(exit 0)" in last
