"""Redis Sentinel: a job keeps reporting through a failover (INTERFACE.md section 4).

A real Sentinel setup on loopback: one primary, one replica and three sentinels, each
its own process. The job reaches the bus through `redis+sentinel://`, the primary is
killed with SIGKILL mid-job, the sentinels promote the replica, and the job must end
successfully with its status and every event readable on the new primary, as a
controller following the same sentinels would read them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import RedisServer, free_port, start_redis, stop_pid
from tests.jobs import Job, wait_for
from tests.test_bus_faults import (
    assert_committed,
    assert_delivered,
    assert_no_traceback,
    assert_retried,
    final_count,
    start_steps,
    status_key,
    step_env,
    touch,
)

SERVICE = "mymaster"


class Cluster:
    """The processes of one Sentinel setup; every one stopped by its PID at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers: list[RedisServer] = []
        self.sentinels: list[tuple[int, subprocess.Popen[bytes]]] = []

    def redis(self, name: str, *extra: str) -> RedisServer:
        server = start_redis(self.directory / name, None, *extra)
        self.servers.append(server)
        return server

    def sentinel(self, primary_port: int) -> int:
        binary = shutil.which("redis-sentinel")
        assert binary is not None, "redis-sentinel is not installed (tests/run installs it)"
        for _ in range(5):
            port = free_port()
            directory = self.directory / f"sentinel-{port}"
            directory.mkdir(parents=True)
            config = directory / "sentinel.conf"
            config.write_text(
                f"port {port}\n"
                "bind 127.0.0.1\n"
                "daemonize no\n"
                f'dir "{directory}"\n'
                f'logfile "{directory / "sentinel.log"}"\n'
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            process = subprocess.Popen(
                [binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            self.sentinels.append((port, process))
            try:
                wait_for(partial(_started, port, process), 10)
            except AssertionError:
                pass
            if process.poll() is None and _answers(port):
                return port
            stop_pid(process)
        raise RuntimeError("redis-sentinel did not start")

    def stop(self) -> None:
        for _, process in self.sentinels:
            stop_pid(process)
        for server in self.servers:
            stop_pid(server.process)


def _started(port: int, process: subprocess.Popen[bytes]) -> bool:
    return process.poll() is not None or _answers(port)


def command(client: redis.Redis, *args: str) -> Any:
    """A raw command (redis-py's SENTINEL helpers are untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(host="127.0.0.1", port=port, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def sentinel_client(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=2)


def sees_everyone(port: int, replica_port: int) -> bool:
    """This sentinel knows the replica (linked up) and the two other sentinels."""
    client = sentinel_client(port)
    try:
        replicas: list[dict[str, Any]] = command(client, "SENTINEL REPLICAS", SERVICE)
        others: list[dict[str, Any]] = command(client, "SENTINEL SENTINELS", SERVICE)
    except redis.RedisError:
        return False
    finally:
        client.close()
    linked = [
        r
        for r in replicas
        if int(r.get("port", 0)) == replica_port
        and r.get("master-link-status") == "ok"
        and not ({"s_down", "o_down", "disconnected"} & set(str(r.get("flags")).split(",")))
    ]
    return bool(linked) and len(others) == 2


def primary_port_seen_by(port: int) -> int | None:
    client = sentinel_client(port)
    try:
        address = command(client, "SENTINEL GET-MASTER-ADDR-BY-NAME", SERVICE)
    except redis.RedisError:
        return None
    finally:
        client.close()
    return int(address[1]) if address else None


def names_primary(port: int, expected: int) -> bool:
    return primary_port_seen_by(port) == expected


def is_primary(port: int) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=2)
    try:
        return client.info("replication").get("role") == "master"
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    setup = Cluster(tmp_path / "cluster")
    try:
        yield setup
    finally:
        setup.stop()


@pytest.mark.parametrize("named", [3, 1], ids=["three-sentinels-in-url", "one-sentinel-in-url"])
def test_job_survives_a_sentinel_failover(
    cluster: Cluster, job_env: dict[str, str], jobs: list[Job], tmp_path: Path, named: int
) -> None:
    primary = cluster.redis("primary")
    replica = cluster.redis("replica", "--replicaof", "127.0.0.1", str(primary.port))
    sentinels = [cluster.sentinel(primary.port) for _ in range(3)]
    for port in sentinels:
        wait_for(partial(sees_everyone, port, replica.port), 30, 0.2, f"sentinel {port}")

    hosts = ",".join(f"127.0.0.1:{port}" for port in sentinels[:named])
    sync = tmp_path / "sync"
    env = step_env(
        job_env,
        f"redis+sentinel://{hosts}/{SERVICE}",
        sync,
        GATE_AT=5,
        MIN_STEPS=40,
        STEP_DELAY=0.25,
        BAQUP_BUS_RECONNECT_BACKOFF="constant",
        BAQUP_BUS_RECONNECT_MAX_ATTEMPTS=60,
    )
    job = start_steps(env, jobs)
    wait_for(lambda: (sync / "gate").exists() or job.poll() is not None, 20, what="step 5")
    assert job.poll() is None, job.stderr()[-3000:]

    # Everything the primary acknowledged so far is on the replica before the kill:
    # Redis replication is asynchronous, and losing unreplicated writes is not the job's.
    writer = primary.client()
    writer.set(f"{env['BAQUP_BUS_KEY_PREFIX']}fence", "1")
    assert int(command(writer, "WAIT", "1", "5000")) == 1
    writer.close()
    os.kill(primary.process.pid, signal.SIGKILL)
    primary.process.wait(timeout=10)
    killed = time.monotonic()
    touch(sync, "go")

    for port in sentinels:
        wait_for(
            partial(names_primary, port, replica.port),
            40,
            0.2,
            f"sentinel {port} to name the replica as primary",
        )
    wait_for(lambda: is_primary(replica.port), 20, 0.2, "the replica to be promoted")
    assert job.poll() is None  # the failover happened mid-job
    assert time.monotonic() - killed < 40
    touch(sync, "finish")
    assert job.wait(60) == 0

    new_primary = replica.client()
    assert_delivered(new_primary, env, final_count(sync))
    assert_retried(new_primary, env)
    assert new_primary.hget(status_key(env), "status") == "success"
    assert_committed(env)
    assert_no_traceback(job)
