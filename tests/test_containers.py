"""The images built from the checkout and run the way the controller runs them.

Dockerfile.base and the agent images are built with podman (tests/containers.py: runc, a
private configuration and store, a Debian stand-in for the python base where it cannot be
pulled), then started as `podman run --rm --read-only IMAGE ROLE` as UID 1000: agent-fs and
agent-postgres snapshot and restore round trips on a Redis bus (the session's redis-server
over `--network host`) and a file bus; `podman stop` mid-job (SIGTERM to baqup-run as PID 1:
ABORTED, no manifest, the status written); `podman kill -s USR1` (a heartbeat at once);
`podman kill -s KILL` (the last heartbeat is all the controller has: no status, no manifest,
no process left); `--info` and `--validate` inside the image and the image's labels equal to
`baqup labels`; `BAQUP_AGENT_MEMORY_LIMIT=auto` reading `--memory 256m`; the Rust agent's
image. Root only: podman builds and runs images here as root.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import REPO, RedisServer, run_baqup
from tests.containers import (
    Images,
    Podman,
    build_images,
    build_rust,
    container_args,
    owned_by_agent,
    start_container,
)
from tests.jobs import Job, read_hash, wait_for
from tests.postgres import PostgresServer
from tests.test_agent_fs import describe
from tests.test_agent_postgres import contents, recreate_empty, seeded_database

pytestmark = [
    pytest.mark.containers,
    pytest.mark.skipif(
        os.geteuid() != 0, reason="the container suite needs root (podman builds and runs as root)"
    ),
    # the first test to ask for the images pays for the build: minutes on a fresh machine
    # (mmdebstrap), seconds once the stand-in is cached; each test itself takes seconds
    pytest.mark.timeout(600),
]

FS_SCHEMA = REPO / "docker" / "agent-fs" / "agent-schema.json"
PG_SCHEMA = REPO / "docker" / "agent-postgres" / "agent-schema.json"
RUST_SCHEMA = REPO / "examples" / "rust-agent" / "agent-schema.json"
MTIME = 981173106
MIB = 1024 * 1024


@pytest.fixture(scope="session")
def podman() -> Podman:
    return Podman()


@pytest.fixture(scope="session")
def images(podman: Podman) -> Images:
    return build_images(podman)


@pytest.fixture
def names(podman: Podman) -> Iterator[list[str]]:
    """Container names a test starts; any left at the end is removed (by its name)."""
    started: list[str] = []
    yield started
    for name in started:
        podman.run(["rm", "-f", "-t", "0", name], check=False)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = PostgresServer.start()
    yield server
    server.stop()


def tool_env() -> dict[str, str]:
    return {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "LANG": "C.UTF-8"}


@dataclass
class Box:
    """One job's host side: its staging dir and file bus dir (writable by UID 1000) and the
    variables the controller gives the container."""

    root: Path
    bus: str  # "redis" or "file"
    redis_url: str
    job_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    prefix: str = field(default_factory=lambda: f"c{uuid.uuid4().hex[:8]}:")
    agent_id: str = field(default_factory=lambda: f"agent-c-{uuid.uuid4().hex[:6]}")

    def __post_init__(self) -> None:
        owned_by_agent(self.staging, self.bus_dir)

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    @property
    def bus_dir(self) -> Path:
        return self.root / "bus"

    @property
    def job_dir(self) -> Path:
        return self.staging / self.job_id

    @property
    def network(self) -> str:
        return "host" if self.bus == "redis" else "none"

    def env(self, **more: str) -> dict[str, str]:
        return {
            "BAQUP_JOB_ID": self.job_id,
            "BAQUP_BUS_URL": self.redis_url if self.bus == "redis" else "file:///bus",
            "BAQUP_BUS_KEY_PREFIX": self.prefix,
            "BAQUP_BUS_FALLBACK_DIR": "/staging/.fallback",
            "BAQUP_AGENT_ID": self.agent_id,
            "BAQUP_JOB_RETRY_MAX": "0",
            **more,
        }

    def args(
        self,
        image: str,
        args: list[str],
        *,
        env: dict[str, str] | None = None,
        volumes: list[tuple[Path, str]] | None = None,
        name: str | None = None,
        extra: list[str] | None = None,
    ) -> list[str]:
        """The `podman run` line of this job (staging at /staging, the file bus at /bus)."""
        return container_args(
            image,
            args,
            env=self.env(**(env or {})),
            volumes=[(self.staging, "/staging"), (self.bus_dir, "/bus"), *(volumes or [])],
            network=self.network,
            name=name,
            extra=extra or [],
        )

    def read(self, client: redis.Redis, key: str) -> dict[str, Any]:
        """The last message under `{prefix}key` ({} when there is none), on either bus."""
        if self.bus == "redis":
            return read_hash(client, f"{self.prefix}{key}")
        path = self.bus_dir / f"{self.prefix}{key}.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        found: dict[str, Any] = json.loads(lines[-1]) if lines else {}
        return found

    def status(self, client: redis.Redis) -> dict[str, Any]:
        return self.read(client, f"status:{self.job_id}")

    def heartbeat(self, client: redis.Redis) -> dict[str, Any]:
        return self.read(client, f"heartbeat:{self.agent_id}")


@pytest.fixture
def box(tmp_path: Path, redis_server: RedisServer) -> Callable[[str], Box]:
    def make(bus: str = "redis") -> Box:
        return Box(tmp_path / f"box-{uuid.uuid4().hex[:6]}", bus, redis_server.url)

    return make


def verify(job: Path) -> dict[str, Any]:
    result = run_baqup(["verify", str(job)], tool_env(), tool=True)
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["valid"] is True
    return report


def started(podman: Podman, names: list[str], jobs: list[Job], job: Box, line: list[str]) -> Job:
    """Start the `podman run` line in the background (it carries `--name names[-1]`); the
    podman client is a Job of the conftest `jobs` fixture, stopped by its PID at the end."""
    container = start_container(podman, line, job.root / "output", names[-1])
    jobs.append(container)
    return container


def new_name(names: list[str]) -> str:
    names.append(f"baqup-test-{uuid.uuid4().hex[:10]}")
    return names[-1]


def running(job: Box, client: redis.Redis) -> dict[str, Any]:
    beat = job.heartbeat(client)
    return beat if beat.get("state") == "running" and beat.get("job_id") == job.job_id else {}


# --- the images: labels, --info, --validate, the user ------------------------------------------


def test_labels_info_and_validate_in_the_images(
    podman: Podman, images: Images, tmp_path: Path
) -> None:
    base = podman.inspect(images.base)
    assert base["Config"]["User"] == "1000:1000"
    assert base["Config"]["Entrypoint"] == ["baqup-run"]
    assert base["Labels"]["io.baqup.agent"] == "true"
    staging = tmp_path / "staging"
    owned_by_agent(staging)
    complete = {
        "agent-fs": {"BAQUP_SOURCE_PATH": "/data"},
        "agent-postgres": {"BAQUP_SOURCE_HOST": "db.example.org", "BAQUP_SOURCE_DATABASE": "app"},
    }
    for agent, image, schema in (
        ("agent-fs", images.fs, FS_SCHEMA),
        ("agent-postgres", images.postgres, PG_SCHEMA),
    ):
        expected = run_baqup(
            ["labels", "--schema", str(schema), "--format", "json"], tool_env(), tool=True
        )
        assert expected.returncode == 0, expected.stderr
        labels = {k: v for k, v in podman.labels(image).items() if k.startswith("io.baqup.")}
        assert labels == json.loads(expected.stdout), agent

        info = podman.run(container_args(image, ["--info"], env={}))
        host = run_baqup(["--info", "--schema", str(schema)], tool_env())
        assert json.loads(info.stdout) == json.loads(host.stdout), agent

        env = {"BAQUP_JOB_ID": str(uuid.uuid4()), "BAQUP_BUS_URL": "file:///staging/bus"}
        volumes = [(staging, "/staging")]
        ok = podman.run(
            container_args(image, ["--validate"], env={**env, **complete[agent]}, volumes=volumes),
            check=False,
        )
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert json.loads(ok.stdout)["valid"] is True
        for missing in complete[agent]:
            partial = {k: v for k, v in complete[agent].items() if k != missing}
            bad = podman.run(
                container_args(image, ["--validate"], env={**env, **partial}, volumes=volumes),
                check=False,
            )
            assert bad.returncode == 64, bad.stdout + bad.stderr
            report = json.loads(bad.stdout)
            assert [e["variable"] for e in report["errors"]] == [missing]


def test_a_job_runs_as_uid_1000_on_a_read_only_root(
    podman: Podman, images: Images, box: Callable[[str], Box], redis_client: redis.Redis
) -> None:
    job = box("file")
    probe = "id -u; id -g; touch /usr/probe 2>&1; tr '\\0' ' ' </proc/1/cmdline"
    result = podman.run(
        job.args(
            images.base,
            ["--stdout-artifact", "probe.txt", "--", "sh", "-c", probe],
            env={"BAQUP_ARTIFACT_COMPRESS": "false"},
        ),
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    uid, gid, touch, pid1 = (job.job_dir / "probe.txt").read_text().splitlines()
    assert (uid, gid) == ("1000", "1000")
    assert "Read-only file system" in touch
    assert "baqup-run --stdout-artifact probe.txt" in pid1  # baqup-run is PID 1
    manifest = job.job_dir / "manifest.json"
    assert manifest.stat().st_uid == 1000
    assert job.status(redis_client)["status"] == "success"
    verify(job.job_dir)


def test_the_base_image_adds_little_to_its_python(podman: Podman, images: Images) -> None:
    """What Dockerfile.base adds to the python image it is FROM (the stand-in's size minus
    its own here): the real python:3.12-slim-bookworm is about 125 MB unpacked, so the base
    stays under 200 MB with room for a lock upgrade."""
    added = podman.size(images.base) - podman.size(images.python)
    assert 0 < added < 70_000_000
    for agent in (images.fs, images.postgres):
        assert podman.size(agent) > podman.size(images.base)


# --- round trips ------------------------------------------------------------------------------


def make_source(root: Path) -> None:
    """A small tree with what a file backup must keep: names, modes, times, links, holes."""
    files = {
        "Ünïcødé 東京.txt": ("grüße 🐘\n".encode(), 0o644),
        "empty": (b"", 0o600),
        "run.sh": (b"#!/bin/sh\necho hi\n", 0o755),
        "readonly.cfg": (b"ro=1\n", 0o444),
        "a/b/deep.txt": (b"deep\n" * 1000, 0o640),
        "a/random.bin": (secrets.token_bytes(3 * MIB), 0o600),
    }
    for relative, (content, mode) in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)
    (root / "emptydir").mkdir()
    (root / "link-to-deep").symlink_to("a/b/deep.txt")
    (root / "a" / "b").chmod(0o750)
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        os.lchown(path, 1000, 1000)
        if not path.is_symlink():
            os.utime(path, (MTIME, MTIME + len(path.parts)))
    os.chown(root, 1000, 1000)


@pytest.mark.parametrize("bus", ["redis", "file"])
def test_agent_fs_round_trip(
    bus: str,
    podman: Podman,
    images: Images,
    box: Callable[[str], Box],
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    job = box(bus)
    source, target = tmp_path / "source", tmp_path / "restored"
    source.mkdir()
    make_source(source)
    owned_by_agent(target)
    env = {"BAQUP_SOURCE_PATH": "/data", "BAQUP_TARGET_PATH": "/restore"}
    volumes = [(source, "/data:ro"), (target, "/restore")]

    snap = podman.run(job.args(images.fs, ["snapshot"], env=env, volumes=volumes), check=False)
    assert snap.returncode == 0, snap.stderr[-3000:]
    manifest = json.loads((job.job_dir / "manifest.json").read_text())
    assert [a["filename"] for a in manifest["artifacts"]] == ["source.tar.zst"]
    assert manifest["source_metadata"]["files_included"] == 6
    verify(job.job_dir)
    status = job.status(redis_client)
    assert (status["role"], status["status"], status["exit_code"]) == ("snapshot", "success", 0)
    assert status["files"][0]["path"].startswith(f"/staging/{job.job_id}/")

    restore = podman.run(job.args(images.fs, ["restore"], env=env, volumes=volumes), check=False)
    assert restore.returncode == 0, restore.stderr[-3000:]
    assert describe(target) == describe(source)
    status = job.status(redis_client)
    assert (status["role"], status["status"]) == ("restore", "success")
    assert json.loads((job.job_dir / "manifest.json").read_text()) == manifest


def test_agent_postgres_round_trip(
    podman: Podman,
    images: Images,
    box: Callable[[str], Box],
    redis_client: redis.Redis,
    pg_server: PostgresServer,
) -> None:
    job = box("redis")  # --network host: the server listens on the host's loopback
    db, original = seeded_database(pg_server)
    env = pg_server.job_env(db)
    snap = podman.run(job.args(images.postgres, ["snapshot"], env=env), check=False)
    assert snap.returncode == 0, snap.stderr[-3000:]
    manifest = json.loads((job.job_dir / "manifest.json").read_text())
    assert [a["filename"] for a in manifest["artifacts"]] == ["db.dump.zst"]
    verify(job.job_dir)
    assert job.status(redis_client)["status"] == "success"

    recreate_empty(pg_server, db)
    restore = podman.run(job.args(images.postgres, ["restore"], env=env), check=False)
    assert restore.returncode == 0, restore.stderr[-3000:]
    assert contents(pg_server, db) == original
    status = job.status(redis_client)
    assert (status["role"], status["status"]) == ("restore", "success")
    for result in (snap, restore):
        assert pg_server.password not in result.stdout + result.stderr


# --- signals from the engine ------------------------------------------------------------------

STREAM = "while :; do head -c 65536 /dev/urandom; sleep 0.05; done"


def test_podman_stop_mid_job_is_a_clean_abort(
    podman: Podman,
    images: Images,
    box: Callable[[str], Box],
    redis_client: redis.Redis,
    names: list[str],
    jobs: list[Job],
) -> None:
    job = box("redis")
    name = new_name(names)
    line = job.args(
        images.base, ["--stdout-artifact", "out.bin", "--", "sh", "-c", STREAM], name=name
    )
    container = started(podman, names, jobs, job, line)
    wait_for(lambda: running(job, redis_client), timeout=60, what="a running heartbeat")
    staged = job.job_dir / ".staging"
    wait_for(lambda: staged.is_dir() and any(staged.iterdir()), timeout=30, what="bytes staged")
    began = time.monotonic()
    podman.run(["stop", "-t", "60", name])
    assert container.wait(60) == 1, container.stderr()[-3000:]
    assert time.monotonic() - began < 30  # baqup-run (PID 1) ended on SIGTERM, not SIGKILL
    status = job.status(redis_client)
    assert status["status"] == "failed"
    assert status["error"]["code"] == "ABORTED"
    assert status["error"]["category"] == "transient"
    assert status["error"]["retriable"] is True
    assert not (job.job_dir / "manifest.json").exists()


def test_podman_kill_usr1_sends_a_heartbeat_at_once(
    podman: Podman,
    images: Images,
    box: Callable[[str], Box],
    redis_client: redis.Redis,
    names: list[str],
    jobs: list[Job],
) -> None:
    job = box("redis")
    name = new_name(names)
    line = job.args(
        images.base,
        ["--stdout-artifact", "out.bin", "--", "sh", "-c", "exec sleep 300"],
        env={"BAQUP_AGENT_HEARTBEAT_INTERVAL": "600"},
        name=name,
    )
    container = started(podman, names, jobs, job, line)
    before = wait_for(lambda: running(job, redis_client), timeout=60, what="a running heartbeat")
    sent = time.monotonic()
    podman.run(["kill", "-s", "USR1", name])
    after = wait_for(
        lambda: (b := job.heartbeat(redis_client)).get("sequence", 0) > before["sequence"] and b,
        timeout=5,
        what="a heartbeat after SIGUSR1",
    )
    assert time.monotonic() - sent < 3  # at once: the next one by interval is 600 s away
    assert after["state"] == "running"
    assert container.poll() is None  # SIGUSR1 does not end the job
    podman.run(["stop", "-t", "30", name])
    assert container.wait(60) == 1


def host_processes(marker: str) -> list[int]:
    """PIDs on the host of the processes with `marker` as one argument (the podman client
    and baqup-run have it inside their `sh -c` argument: not counted)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline.split(b"\0"):
            found.append(int(entry.name))
    return found


def test_podman_kill_9_leaves_only_the_last_heartbeat(
    podman: Podman,
    images: Images,
    box: Callable[[str], Box],
    redis_client: redis.Redis,
    names: list[str],
    jobs: list[Job],
) -> None:
    job = box("redis")
    name = new_name(names)
    marker = f"baqup-orphan-{uuid.uuid4().hex}"
    sleeper = f'python3 -c "import time; time.sleep(600)" {marker}'
    line = job.args(
        images.base,
        ["--stdout-artifact", "out.bin", "--", "sh", "-c", f"{sleeper} & exec {sleeper}"],
        env={"BAQUP_AGENT_HEARTBEAT_INTERVAL": "2"},
        name=name,
    )
    container = started(podman, names, jobs, job, line)
    wait_for(lambda: running(job, redis_client), timeout=60, what="a running heartbeat")
    wait_for(lambda: len(host_processes(marker)) == 2, timeout=30, what="child and grandchild")
    podman.run(["kill", "-s", "KILL", name])
    # what the controller has: the last heartbeat, naming the job, expiring in 3 x interval
    key = f"{job.prefix}heartbeat:{job.agent_id}"
    last = job.heartbeat(redis_client)
    assert (last["job_id"], last["state"]) == (job.job_id, "running")
    assert 0 < redis_client.ttl(key) <= 6
    assert container.wait(60) == 137
    # nothing the job started survives it, nothing was committed, no status was written
    wait_for(lambda: not host_processes(marker), timeout=15, what="no process left")
    assert not (job.job_dir / "manifest.json").exists()
    assert job.status(redis_client) == {}
    wait_for(lambda: not redis_client.exists(key), timeout=15, what="the heartbeat to expire")


# --- resources --------------------------------------------------------------------------------

SHARED_PAGES = """
import mmap, os, time
m = mmap.mmap(os.open("/data/blob", os.O_RDONLY), 0, prot=mmap.PROT_READ)
def touch():
    for i in range(0, len(m), 4096):
        m[i]
for _ in range(3):
    if os.fork() == 0:
        touch(); time.sleep(120); os._exit(0)
touch(); time.sleep(120)
"""


def test_memory_limit_auto_is_the_containers_limit(
    podman: Podman,
    images: Images,
    box: Callable[[str], Box],
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """Four processes sharing one 96 MiB file mapping: 384 MiB of tree RSS (what baqup-run
    measures) for 96 MiB of page cache (what the cgroup charges), so the job passes its
    limit while the kernel's OOM killer has no reason to act."""
    job = box("file")
    data = tmp_path / "data"
    data.mkdir()
    (data / "blob").write_bytes(b"\x01" * (96 * MIB))
    result = podman.run(
        job.args(
            images.base,
            ["--", "python3", "-c", SHARED_PAGES],
            env={"BAQUP_AGENT_MEMORY_LIMIT": "auto"},
            volumes=[(data, "/data:ro")],
            extra=["--memory", "256m"],
        ),
        check=False,
    )
    status = job.status(redis_client)
    assert status["error"]["code"] == "RESOURCE_LIMIT_EXCEEDED", result.stderr[-3000:]
    assert f"the limit of {256 * MIB} bytes" in status["error"]["message"]
    assert result.returncode == 1
    assert not (job.job_dir / "manifest.json").exists()


# --- the Rust agent ---------------------------------------------------------------------------


def test_the_rust_agent_image(
    podman: Podman,
    images: Images,
    box: Callable[[str], Box],
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    rust = build_rust(podman, images)
    expected = run_baqup(
        ["labels", "--schema", str(RUST_SCHEMA), "--format", "json"], tool_env(), tool=True
    )
    labels = {k: v for k, v in podman.labels(rust).items() if k.startswith("io.baqup.")}
    assert labels == json.loads(expected.stdout)
    job = box("redis")
    source = tmp_path / "source"
    source.mkdir()
    make_source(source)
    snap = podman.run(
        job.args(
            rust, ["snapshot"], env={"BAQUP_SOURCE_PATH": "/data"}, volumes=[(source, "/data:ro")]
        ),
        check=False,
    )
    assert snap.returncode == 0, snap.stderr[-3000:]
    report = verify(job.job_dir)
    assert report["artifacts"]
    status = job.status(redis_client)
    assert (status["agent"], status["status"]) == ("agent-rust", "success")
