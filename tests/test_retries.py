"""Retries of a child that exits with a retriable code (INTERFACE.md section 9, spec 5).

`BAQUP_JOB_RETRY_MAX=N` allows at most 1 + N runs of the child, only for the retriable
exit codes (69, 73, 74), with `BAQUP_JOB_RETRY_BACKOFF` between them; each run is one
entry in `attempts`; the work dir is cleared before each new run; a SIGTERM during the
wait ends the job; `BAQUP_JOB_TIMEOUT` bounds all the runs together. The child counts
its runs in a file, so the tests know exactly how often it ran. What a failed run left in
the work dir is moved to `.attempts/{n}/` before the next run.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import redis

from tests.conftest import RedisServer, python_child, run_baqup
from tests.jobs import job_dir, prefix, read_hash, read_stream, redis_env, start_job, wait_for

# Counts its runs in $COUNTER. A run that finds anything in the work dir exits 65 (so a
# dirty work dir fails the test); the first $FAIL_TIMES runs leave debris there (a file,
# a hidden file, a directory) and exit $FAIL_CODE after $RUN_SECONDS; later runs succeed.
CHILD = r"""
import os, sys, time
work = os.environ["BAQUP_WORK_DIR"]
counter = os.environ["COUNTER"]
run = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
with open(counter, "w") as handle:
    handle.write(str(run))
left = sorted(os.listdir(work))
if left:
    print("work dir not empty at start: %s" % left, file=sys.stderr)
    sys.exit(65)
time.sleep(float(os.environ.get("RUN_SECONDS", "0")))
if run <= int(os.environ.get("FAIL_TIMES", "2")):
    with open(os.path.join(work, "leftover.part"), "wb") as handle:
        handle.write(b"half a dump")
    open(os.path.join(work, ".hidden"), "w").close()
    os.makedirs(os.path.join(work, "partial", "deeper"))
    open(os.path.join(work, "partial", "deeper", "x"), "w").close()
    sys.exit(int(os.environ.get("FAIL_CODE", "69")))
with open(os.path.join(work, "dump.sql"), "wb") as handle:
    handle.write(b"-- a whole dump, run %d\n" % run)
"""


def retry_env(
    job_env: dict[str, str], redis_server: RedisServer, tmp_path: Path, **extra: str | float
) -> dict[str, str]:
    env = redis_env(job_env, redis_server)
    env.update(
        BAQUP_JOB_RETRY_BACKOFF="constant",
        BAQUP_AGENT_HEARTBEAT_INTERVAL="1",
        COUNTER=str(tmp_path / "runs"),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def runs(env: dict[str, str]) -> int:
    path = Path(env["COUNTER"])
    return int(path.read_text()) if path.exists() else 0


def status_of(client: redis.Redis, env: dict[str, str]) -> dict[str, Any]:
    status = read_hash(client, f"{prefix(env)}status:{env['BAQUP_JOB_ID']}")
    assert status, "no status on the bus"
    return status


def retry_events(client: redis.Redis, env: dict[str, str]) -> list[dict[str, Any]]:
    entries = read_stream(client, f"{prefix(env)}events:{env['BAQUP_JOB_ID']}")
    return [e for e in entries if e.get("code") == "JOB_RETRY"]


def test_fails_twice_then_succeeds(
    redis_server: RedisServer, redis_client: redis.Redis, job_env: dict[str, str], tmp_path: Path
) -> None:
    env = retry_env(job_env, redis_server, tmp_path, BAQUP_JOB_RETRY_MAX=3)
    started = time.monotonic()
    result = run_baqup(["--", *python_child(CHILD)], env)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert "work dir not empty" not in result.stderr
    assert runs(env) == 3
    assert elapsed >= 2 * 0.9  # two constant waits of 1 s (+/- 10 %)

    directory = job_dir(env)
    manifests = sorted(p.name for p in directory.rglob("manifest*.json"))
    assert manifests == ["manifest.json"]
    assert sorted(p.name for p in directory.iterdir()) == [
        ".attempts",
        ".staging",
        "dump.sql",
        "manifest.json",
    ]
    # each failed run's debris is kept aside for the controller, never committed nor deleted
    for attempt in ("1", "2"):
        kept = directory / ".attempts" / attempt
        assert sorted(p.name for p in kept.iterdir()) == [".hidden", "leftover.part", "partial"]
        assert (kept / "leftover.part").read_bytes() == b"half a dump"
    assert (directory / "dump.sql").read_bytes() == b"-- a whole dump, run 3\n"

    status = status_of(redis_client, env)
    assert status["status"] == "success"
    assert status["exit_code"] == 0
    assert status["error"] is None
    attempts = status["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a.get("error") for a in attempts] == ["exit 69", "exit 69", None]
    assert all(isinstance(a["duration_ms"], int) and a["duration_ms"] >= 0 for a in attempts)
    assert attempts[0]["timestamp"] < attempts[1]["timestamp"] < attempts[2]["timestamp"]
    assert status["warnings_summary"]["JOB_RETRY"] == 2

    events = retry_events(redis_client, env)
    assert events, "no JOB_RETRY event on the bus"
    assert events[-1]["count"] == 2
    assert events[-1]["severity"] == "warn"
    assert "of 4" in events[-1]["message"]  # attempt 3 of 1 + BAQUP_JOB_RETRY_MAX


def test_retry_max_one_gives_up_after_two_runs(
    redis_server: RedisServer, redis_client: redis.Redis, job_env: dict[str, str], tmp_path: Path
) -> None:
    env = retry_env(job_env, redis_server, tmp_path, BAQUP_JOB_RETRY_MAX=1)
    result = run_baqup(["--", *python_child(CHILD)], env)
    assert result.returncode == 69, result.stderr[-3000:]
    assert runs(env) == 2
    assert not (job_dir(env) / "manifest.json").exists()
    status = status_of(redis_client, env)
    assert status["status"] == "failed"
    assert status["exit_code"] == 69
    error = status["error"]
    assert error["retriable"] is True
    assert [a["attempt"] for a in error["attempts"]] == [1, 2]
    assert [a["error"] for a in error["attempts"]] == ["exit 69", "exit 69"]
    assert status["warnings_summary"]["JOB_RETRY"] == 1
    assert "Traceback" not in result.stderr


def test_data_error_is_not_retried(
    redis_server: RedisServer, redis_client: redis.Redis, job_env: dict[str, str], tmp_path: Path
) -> None:
    env = retry_env(job_env, redis_server, tmp_path, BAQUP_JOB_RETRY_MAX=3, FAIL_CODE=65)
    result = run_baqup(["--", *python_child(CHILD)], env)
    assert result.returncode == 65, result.stderr[-3000:]
    assert runs(env) == 1
    status = status_of(redis_client, env)
    assert status["exit_code"] == 65
    assert status["error"]["retriable"] is False
    assert [a["error"] for a in status["error"]["attempts"]] == ["exit 65"]
    assert "JOB_RETRY" not in status["warnings_summary"]
    assert retry_events(redis_client, env) == []


def test_retriable_codes_73_and_74_are_retried(
    redis_server: RedisServer, redis_client: redis.Redis, job_env: dict[str, str], tmp_path: Path
) -> None:
    for code in (73, 74):
        env = retry_env(
            job_env,
            redis_server,
            tmp_path / str(code),
            BAQUP_JOB_RETRY_MAX=1,
            FAIL_TIMES=1,
            FAIL_CODE=code,
            BAQUP_JOB_ID=f"{job_env['BAQUP_JOB_ID'][:-2]}{code}",
        )
        Path(env["COUNTER"]).parent.mkdir()
        result = run_baqup(["--", *python_child(CHILD)], env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert runs(env) == 2
        attempts = status_of(redis_client, env)["attempts"]
        assert [a.get("error") for a in attempts] == [f"exit {code}", None]


def test_sigterm_during_the_retry_wait_ends_the_job(
    redis_server: RedisServer, redis_client: redis.Redis, job_env: dict[str, str], tmp_path: Path
) -> None:
    # Exponential backoff: 1 s, then 2 s. The SIGTERM comes as the 2 s wait begins.
    env = retry_env(
        job_env,
        redis_server,
        tmp_path,
        BAQUP_JOB_RETRY_MAX=5,
        BAQUP_JOB_RETRY_BACKOFF="exponential",
        FAIL_TIMES=10,
    )
    job = start_job(["--", *python_child(CHILD)], env)
    try:

        def waits() -> list[dict[str, Any]]:
            return [r for r in job.logs() if r.get("message") == "retrying the command"]

        wait_for(lambda: len(waits()) >= 2, 30, 0.01, "the second retry wait")
        job.signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert job.wait(30) == 1
        assert time.monotonic() - signalled < 1.5
    finally:
        job.stop()
    assert waits()[-1]["context"]["wait_seconds"] >= 1.5
    assert runs(env) == 2  # no run after the SIGTERM
    status = status_of(redis_client, env)
    assert status["status"] == "failed"
    assert status["exit_code"] == 1
    assert status["error"]["code"] == "ABORTED"
    assert [a["error"] for a in status["error"]["attempts"]] == ["exit 69", "exit 69"]
    assert "Traceback" not in job.stderr()


def test_job_timeout_bounds_all_attempts_together(
    redis_server: RedisServer, redis_client: redis.Redis, job_env: dict[str, str], tmp_path: Path
) -> None:
    # Runs of 2.2 s and waits of 1 s (+/- 10 %): the third run starts at about 6.4 s
    # and cannot end before 8.4 s; the 8 s job timeout ends it (each run alone is far
    # below the timeout, and 1 + 10 runs are allowed).
    env = retry_env(
        job_env,
        redis_server,
        tmp_path,
        BAQUP_JOB_RETRY_MAX=10,
        BAQUP_JOB_TIMEOUT=8,
        FAIL_TIMES=100,
        RUN_SECONDS=2.2,
    )
    started = time.monotonic()
    result = run_baqup(["--", *python_child(CHILD)], env)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-3000:]
    assert 8 <= elapsed < 8 + 3
    assert runs(env) == 3
    status = status_of(redis_client, env)
    assert status["error"]["code"] == "JOB_TIMEOUT"
    assert [a["error"] for a in status["error"]["attempts"]] == [
        "exit 69",
        "exit 69",
        "JOB_TIMEOUT",
    ]


def test_no_retry_wait_that_would_outlast_the_job_timeout(
    redis_server: RedisServer, redis_client: redis.Redis, job_env: dict[str, str], tmp_path: Path
) -> None:
    # A 2.2 s run and a 1 s wait would cross the 3 s timeout: the first failure is final.
    env = retry_env(
        job_env,
        redis_server,
        tmp_path,
        BAQUP_JOB_RETRY_MAX=10,
        BAQUP_JOB_TIMEOUT=3,
        FAIL_TIMES=100,
        RUN_SECONDS=2.2,
    )
    started = time.monotonic()
    result = run_baqup(["--", *python_child(CHILD)], env)
    assert time.monotonic() - started < 3 + 2
    assert result.returncode == 69, result.stderr[-3000:]
    assert runs(env) == 1
    status = status_of(redis_client, env)
    assert [a["error"] for a in status["error"]["attempts"]] == ["exit 69"]
    assert "JOB_RETRY" not in status["warnings_summary"]
