"""The test harness: real servers on loopback, real child processes, a clean environment.

- `redis_server` (session): a private redis-server on a free 127.0.0.1 port, in a temp
  dir, stopped by its PID at the end. Never a fake.
- `redis_client`: a client on that server; each test gets its own key prefix through
  `job_env`, so tests never see each other's keys.
- `job_env`: a minimal valid BAQUP_* environment for one job in a temp staging dir.
- `run_baqup`: run the real `baqup-run` (`python -m baqup_supervisor`) as a subprocess.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

if TYPE_CHECKING:  # tests/jobs.py imports this module: no cycle at run time
    from tests.jobs import Job

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """A redis-server process this test session started and owns."""

    port: int
    process: subprocess.Popen[bytes]
    directory: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)

    def stop(self) -> None:
        stop_pid(self.process)


def stop_pid(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a process we started, by its PID: SIGTERM, then SIGKILL."""
    if process.poll() is not None:
        return
    try:
        os.kill(process.pid, signal.SIGCONT)
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


def start_redis(directory: Path, port: int | None = None, *extra: str) -> RedisServer:
    """Start redis-server on loopback; retry on a port race; wait until it answers PING."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: run ./tests/run (it installs it)")
    directory.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for _ in range(5):
        chosen = port or free_port()
        log = directory / f"redis-{chosen}.log"
        process = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(chosen),
                "--dir",
                str(directory),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
                "--logfile",
                str(log),
                "--daemonize",
                "no",
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            try:
                if redis.Redis(host="127.0.0.1", port=chosen, socket_timeout=1).ping():
                    return RedisServer(chosen, process, directory)
            except redis.RedisError:
                time.sleep(0.02)
        last_error = log.read_text() if log.exists() else "no log"
        stop_pid(process)
        if port is not None:
            break
    raise RuntimeError(f"redis-server did not start: {last_error[-500:]}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture
def job_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def job_env(tmp_path: Path, job_id: str) -> dict[str, str]:
    """A valid minimal environment: only what the test machine needs plus the job's BAQUP_*."""
    staging = tmp_path / "staging"
    staging.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAQUP_")}
    env.update(
        BAQUP_JOB_ID=job_id,
        BAQUP_STAGING_DIR=str(staging),
        BAQUP_BUS_URL=f"file://{tmp_path / 'bus'}",
        BAQUP_BUS_FALLBACK_DIR=str(tmp_path / "fallback"),
        BAQUP_BUS_KEY_PREFIX=f"t{uuid.uuid4().hex[:8]}:",
        BAQUP_AGENT_ID=f"agent-test-{job_id[:6]}",
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env


@pytest.fixture
def jobs() -> Iterator[list[Job]]:
    """Jobs a test started (tests/jobs.py `start_job`); any still running at the end is
    stopped by its PID."""
    started: list[Job] = []
    try:
        yield started
    finally:
        for job in started:
            job.stop()


@pytest.fixture
def launch(jobs: list[Job], tmp_path: Path) -> Callable[[list[str], Mapping[str, str]], Job]:
    """Start a baqup-run job (`start_job`, output under tmp_path/out), stopped by its PID at
    the end like every job in `jobs`."""
    from tests.jobs import start_job

    def _launch(args: list[str], job_env: Mapping[str, str]) -> Job:
        job = start_job(args, job_env, tmp_path / "out")
        jobs.append(job)
        return job

    return _launch


def run_baqup(
    args: list[str],
    env: dict[str, str],
    *,
    timeout: float = 60,
    cwd: Path | None = None,
    stdin: bytes | None = None,
    tool: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the real baqup-run (or `baqup` with tool=True) and capture its output as text."""
    argv = (
        [PYTHON, "-c", "from baqup_supervisor.tool import tool_main; tool_main()"]
        if tool
        else [PYTHON, "-m", "baqup_supervisor"]
    )
    return subprocess.run(
        [*argv, *args],
        env=env,
        cwd=cwd,
        input=stdin.decode() if stdin else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def python_child(code: str) -> list[str]:
    """argv running `code` in a real Python child process (trio's `python(code)` helper)."""
    return [PYTHON, "-c", code]
