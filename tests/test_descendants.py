"""RUNNING ends only when nothing the job started can still write (INTERFACE.md 10).

Real `baqup-run` jobs whose command leaves processes behind: a script that forgets
`wait`, a daemon in its own session (`setsid`), a process holding the captured stdout,
a hundred orphans, and the same as PID 1 of a PID namespace (`unshare`, we are root).
What finishes within `--grace` is waited for and committed whole; what does not is
killed (TERM, then KILL, wherever its group or session) and the job fails with
`DESCENDANTS_KILLED`, exit 1, no manifest.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import RedisServer
from tests.jobs import job_dir, prefix, read_hash, redis_env, wait_for

# Appends a numbered line to argv[1] every 0.1 s, argv[2] times: a dump still writing.
SLOW_WRITER = (
    "import sys, time\n"
    "for i in range(int(sys.argv[2])):\n"
    "    with open(sys.argv[1], 'a') as f: f.write(f'line {i}\\n')\n"
    "    time.sleep(0.1)\n"
)


@pytest.fixture
def env(job_env: dict[str, str], redis_server: RedisServer) -> dict[str, str]:
    out = redis_env(job_env, redis_server)
    out["BAQUP_JOB_RETRY_MAX"] = "0"
    out["BAQUP_ARTIFACT_COMPRESS"] = "false"
    return out


def status_of(client: redis.Redis, env: Mapping[str, str]) -> dict[str, Any]:
    status = read_hash(client, f"{prefix(env)}status:{env['BAQUP_JOB_ID']}")
    assert status, "no status hash on the bus"
    return status


def alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] not in "ZX"


def writer(path: str, lines: int) -> str:
    return f'{sys.executable} -c "$WRITER" {path} {lines}'


def test_a_script_that_forgets_wait_is_waited_for_and_committed_whole(
    env: dict[str, str], redis_client: redis.Redis, launch: Any
) -> None:
    """`sh -c 'dump > out & sleep .5'`: the dump outlives the script by a second."""
    env["WRITER"] = SLOW_WRITER
    script = f"{writer('$BAQUP_WORK_DIR/dump.txt', 15)} & sleep .5"
    started = time.monotonic()
    job = launch(["--grace", "20", "--", "sh", "-c", script], env)
    assert job.wait(40) == 0, job.stderr()
    assert time.monotonic() - started >= 1.4, "committed before the dump finished"
    lines = (job_dir(env) / "dump.txt").read_text().splitlines()
    assert lines == [f"line {i}" for i in range(15)]
    assert (job_dir(env) / "manifest.json").exists()
    assert status_of(redis_client, env)["status"] == "success"
    assert any("still run" in str(r.get("message")) for r in job.logs())


def test_a_descendant_outliving_the_grace_is_killed_and_nothing_committed(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path, launch: Any
) -> None:
    env["WRITER"] = SLOW_WRITER
    pid_file = tmp_path / "writer.pid"
    script = f"{writer('$BAQUP_WORK_DIR/dump.txt', 600)} & echo $! > {pid_file}; sleep .2"
    started = time.monotonic()
    job = launch(["--grace", "1", "--", "sh", "-c", script], env)
    assert job.wait(30) == 1, job.stderr()
    assert time.monotonic() - started < 15
    assert not alive(int(pid_file.read_text()))
    status = status_of(redis_client, env)
    assert status["status"] == "failed"
    assert status["error"]["code"] == "DESCENDANTS_KILLED"
    assert status["exit_code"] == 1
    assert not (job_dir(env) / "manifest.json").exists()


SETSID_DAEMON = r"""
import os, signal, sys, time
from pathlib import Path
if os.fork() == 0:
    os.setsid()                                  # out of the child's group and session
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(sys.argv[1]).write_text(str(os.getpid()))
    work = Path(os.environ["BAQUP_WORK_DIR"], "daemon.log")
    while True:
        with work.open("a") as f:
            f.write("still writing\n")
        time.sleep(0.05)
while not Path(sys.argv[1]).exists():
    time.sleep(0.01)
Path(os.environ["BAQUP_WORK_DIR"], "main.txt").write_text("done\n")
"""


def test_a_daemon_in_its_own_session_is_found_and_killed(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path, launch: Any
) -> None:
    pid_file = tmp_path / "daemon.pid"
    started = time.monotonic()
    job = launch(["--grace", "1", "--", sys.executable, "-c", SETSID_DAEMON, str(pid_file)], env)
    assert job.wait(30) == 1, job.stderr()
    assert time.monotonic() - started < 15
    daemon = int(pid_file.read_text())
    assert not alive(daemon), "the setsid daemon (it ignores SIGTERM) survived the job"
    assert status_of(redis_client, env)["error"]["code"] == "DESCENDANTS_KILLED"
    assert not (job_dir(env) / "manifest.json").exists()
    assert any("SIGKILL" in str(r.get("message")) for r in job.logs())


def test_a_descendant_holding_the_captured_stdout_is_read_to_the_end(
    env: dict[str, str], redis_client: redis.Redis, launch: Any
) -> None:
    script = "echo head; (sleep 1; echo tail) & exit 0"
    job = launch(["--grace", "20", "--stdout-artifact", "out.txt", "--", "sh", "-c", script], env)
    assert job.wait(40) == 0, job.stderr()
    assert (job_dir(env) / "out.txt").read_text() == "head\ntail\n"


def test_a_descendant_holding_the_captured_stdout_past_the_grace_fails_the_job(
    env: dict[str, str], redis_client: redis.Redis, launch: Any
) -> None:
    script = "echo head; (sleep 60; echo tail) & exit 0"
    started = time.monotonic()
    job = launch(["--grace", "1", "--stdout-artifact", "out.txt", "--", "sh", "-c", script], env)
    assert job.wait(30) == 1, job.stderr()
    assert time.monotonic() - started < 15
    assert status_of(redis_client, env)["error"]["code"] == "DESCENDANTS_KILLED"
    assert not (job_dir(env) / "manifest.json").exists()


def test_a_failed_command_has_what_it_left_ended_at_once(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path, launch: Any
) -> None:
    pid_file = tmp_path / "sleep.pid"
    started = time.monotonic()
    script = f"sleep 60 & echo $! > {pid_file}; exit 3"
    job = launch(["--grace", "30", "--", "sh", "-c", script], env)
    assert job.wait(30) == 1, job.stderr()
    assert time.monotonic() - started < 10, "waited for the grace although the command failed"
    assert not alive(int(pid_file.read_text()))
    assert status_of(redis_client, env)["error"]["code"] == "CHILD_FAILED"


def test_sigterm_while_descendants_finish_aborts(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path, launch: Any
) -> None:
    job = launch(["--grace", "30", "--", "sh", "-c", "sleep 60 & exit 0"], env)
    wait_for(lambda: any("still run" in str(r.get("message")) for r in job.logs()), timeout=20)
    sent = time.monotonic()
    job.signal(signal.SIGTERM)
    assert job.wait(30) == 1, job.stderr()
    assert time.monotonic() - sent < 10
    assert status_of(redis_client, env)["error"]["code"] == "ABORTED"


HUNDRED_ORPHANS = "for i in $(seq 100); do (sleep 0.3 &) ; done; echo ok > $BAQUP_WORK_DIR/a.txt"


def test_a_hundred_orphans_are_reaped_before_the_commit(
    env: dict[str, str], redis_client: redis.Redis, launch: Any
) -> None:
    job = launch(["--grace", "30", "--", "sh", "-c", HUNDRED_ORPHANS], env)
    assert job.wait(60) == 0, job.stderr()
    assert status_of(redis_client, env)["status"] == "success"
    assert (job_dir(env) / "manifest.json").exists()


def run_as_pid_1(args: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    unshare = shutil.which("unshare")
    assert unshare is not None, "util-linux unshare is needed (Debian's Essential util-linux)"
    namespace = [unshare, "--fork", "--pid", "--mount-proc"]
    return subprocess.run(
        [*namespace, sys.executable, "-m", "baqup_supervisor", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_as_pid_1_orphans_are_reaped_and_waited_for(
    env: dict[str, str], redis_client: redis.Redis
) -> None:
    result = run_as_pid_1(["--grace", "30", "--", "sh", "-c", HUNDRED_ORPHANS], env)
    assert result.returncode == 0, result.stderr
    assert '"pid":1' in result.stderr.replace(" ", ""), "baqup-run was not PID 1"
    assert (job_dir(env) / "manifest.json").exists()


def test_as_pid_1_a_lingering_descendant_is_killed(
    env: dict[str, str], redis_client: redis.Redis
) -> None:
    started = time.monotonic()
    result = run_as_pid_1(["--grace", "1", "--", "sh", "-c", "setsid sleep 60 & exit 0"], env)
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 20
    assert status_of(redis_client, env)["error"]["code"] == "DESCENDANTS_KILLED"
    assert not os.path.exists(job_dir(env) / "manifest.json")
