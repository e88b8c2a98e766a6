"""agent-fs end to end: `baqup archive` under baqup-run, then `baqup extract` back.

A source tree with unicode names, empty files, an empty directory, nested dirs, odd
modes, fixed mtimes, internal symlinks (to a file, to a directory, upwards), external
symlinks (absolute and relative), excluded files and a 200 MiB file of random bytes is
snapshotted with `baqup-run --schema docker/agent-fs/agent-schema.json snapshot`,
verified with `baqup verify`, restored into BAQUP_TARGET_PATH with `... restore`, and
compared entry by entry: type, size, content hash, mode bits, mtime (to the second)
and symlink targets; never ownership. On Redis and on the file bus.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import PYTHON, REPO, RedisServer, run_baqup
from tests.jobs import job_dir, prefix, read_hash, read_stream, redis_env, restore_env

SCHEMA = REPO / "docker" / "agent-fs" / "agent-schema.json"
VENV_BIN = Path(PYTHON).parent
BIG_SIZE = 200 * 1024 * 1024
CHUNK = 1024 * 1024
MTIME = 981173106  # 2001-02-03T04:05:06Z
EXCLUDE = "*.tmp|cache"

# relative path -> (content, mode); None content = a directory
FILES: dict[str, tuple[bytes, int]] = {
    "Ünïcødé файл 東京.txt": ("grüße, мир, 世界 🐘\n".encode(), 0o644),
    "empty.txt": (b"", 0o600),
    "script.sh": (b"#!/bin/sh\necho hi\n", 0o755),
    "readonly.cfg": (b"ro=1\n", 0o444),
    "setuid-tool": (b"\x7fELF not really\n", 0o4755),
    "a/b/c/deep.txt": (b"deep down\n" * 100, 0o640),
    "a/b/c/empty-deep": (b"", 0o644),
    "a/b/ñ dir/ü.bin": (bytes(range(256)) * 8, 0o600),
    "a/junk.tmp": (b"excluded\n", 0o644),
    "top.tmp": (b"excluded too\n", 0o644),
    "cache/blob": (b"excluded with its directory\n", 0o644),
}
DIRS: dict[str, int] = {
    "a": 0o755,
    "a/b": 0o750,
    "a/b/c": 0o700,
    "a/b/ñ dir": 0o755,
    "emptydir": 0o711,
    "cache": 0o755,
}
INTERNAL_LINKS = {
    "link-to-file": "a/b/c/deep.txt",
    "link-to-dir": "a/b",
    "a/b/c/up-link": "../../../Ünïcødé файл 東京.txt",
    "dangling-inside": "a/not-there",
}
EXCLUDED = {"a/junk.tmp", "top.tmp", "cache", "cache/blob"}


@dataclass(frozen=True)
class Source:
    root: Path
    outside: Path
    external_links: tuple[str, ...]
    expected: dict[str, tuple[Any, ...]]  # what the restored tree must be


def describe(root: Path, *, skip_big_hash: bool = False) -> dict[str, tuple[Any, ...]]:
    """Every entry under `root` (not root itself): kind and what must survive a restore."""
    found: dict[str, tuple[Any, ...]] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(directory) / name
            relative = path.relative_to(root).as_posix()
            info = path.lstat()
            mode = stat.S_IMODE(info.st_mode)
            if stat.S_ISLNK(info.st_mode):
                found[relative] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                found[relative] = ("dir", mode, int(info.st_mtime))
            elif stat.S_ISREG(info.st_mode):
                found[relative] = ("file", info.st_size, sha256(path), mode, int(info.st_mtime))
            else:
                found[relative] = ("other", mode)
    return found


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    base = tmp_path_factory.mktemp("fs-source")
    root = base / "src"
    outside = base / "elsewhere"
    outside.mkdir()
    (outside / "secret.txt").write_text("not part of the backup\n")
    root.mkdir()
    for relative in DIRS:
        (root / relative).mkdir(parents=True, exist_ok=True)
    for relative, (content, _) in FILES.items():
        (root / relative).write_bytes(content)
    with (root / "big.bin").open("wb") as handle:
        for _ in range(BIG_SIZE // CHUNK):
            handle.write(os.urandom(CHUNK))
    for relative, target in INTERNAL_LINKS.items():
        (root / relative).symlink_to(target)
    (root / "abs-outside").symlink_to(outside / "secret.txt")
    (root / "a" / "rel-outside").symlink_to("../../elsewhere/secret.txt")
    external = ("a/rel-outside", "abs-outside")
    # modes and times last, deepest first, so creating children does not move them
    for relative, (_, mode) in FILES.items():
        os.chmod(root / relative, mode)
    os.chmod(root / "big.bin", 0o640)
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_symlink():
            continue
        os.utime(path, (MTIME, MTIME + len(path.parts)))
    for relative, mode in DIRS.items():
        os.chmod(root / relative, mode)
    everything = describe(root)
    expected = {
        k: v
        for k, v in everything.items()
        if k not in EXCLUDED and k not in external and not k.startswith("cache/")
    }
    # setuid/setgid/sticky bits are stripped on extraction (spec section 7)
    kind, size, digest, mode, mtime = expected["setuid-tool"]
    assert mode == 0o4755
    expected["setuid-tool"] = (kind, size, digest, mode & 0o777, mtime)
    assert expected["link-to-dir"] == ("symlink", "a/b")
    assert expected["big.bin"][1] == BIG_SIZE
    assert set(external) <= set(everything)
    yield Source(root, outside, external, expected)
    (root / "big.bin").unlink()  # 200 MiB: do not leave it to pytest's kept temp dirs


def agent_env(base: dict[str, str], src: Source, target: Path) -> dict[str, str]:
    env = dict(base)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env.update(
        BAQUP_SOURCE_PATH=str(src.root),
        BAQUP_TARGET_PATH=str(target),
        BAQUP_SOURCE_EXCLUDE=EXCLUDE,
        BAQUP_JOB_RETRY_MAX="0",
        BAQUP_JOB_TIMEOUT="300",
    )
    return env


def file_bus(env: dict[str, str], key: str) -> list[dict[str, Any]]:
    path = Path(env["BAQUP_BUS_URL"].removeprefix("file://")) / f"{key}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_per_code(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for entry in entries:
        latest[str(entry["code"])] = entry
    return latest


@pytest.fixture
def bus_env(
    request: pytest.FixtureRequest, job_env: dict[str, str], redis_server: RedisServer
) -> dict[str, str]:
    return redis_env(job_env, redis_server) if request.param == "redis" else dict(job_env)


@pytest.mark.parametrize("bus_env", ["redis", "file"], indirect=True)
def test_round_trip(
    bus_env: dict[str, str], source: Source, redis_client: redis.Redis, tmp_path: Path
) -> None:
    target = tmp_path / "restored"
    env = agent_env(bus_env, source, target)
    jid = env["BAQUP_JOB_ID"]
    on_redis = env["BAQUP_BUS_URL"].startswith("redis://")

    snap = run_baqup(["--schema", str(SCHEMA), "snapshot"], env, timeout=150)
    assert snap.returncode == 0, snap.stderr[-3000:]
    manifest = json.loads((job_dir(env) / "manifest.json").read_text())
    (artifact,) = manifest["artifacts"]
    assert artifact["filename"] == "source.tar.zst"
    assert artifact["size_bytes"] > BIG_SIZE  # random data does not compress
    metadata = manifest["source_metadata"]
    files = [k for k, v in source.expected.items() if v[0] == "file"]
    assert metadata["type"] == "filesystem"
    assert metadata["path"] == str(source.root)
    assert metadata["files_included"] == len(files)
    assert metadata["files_excluded"] == 3  # a/junk.tmp, top.tmp, cache (with its contents)
    assert metadata["total_bytes_source"] == sum(source.expected[f][1] for f in files)
    check = run_baqup(["verify", str(job_dir(env))], env, tool=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["valid"] is True

    if on_redis:
        status = read_hash(redis_client, f"{prefix(env)}status:{jid}")
        progress = read_hash(redis_client, f"{prefix(env)}progress:{jid}")
        events = last_per_code(read_stream(redis_client, f"{prefix(env)}events:{jid}"))
    else:
        status = file_bus(env, f"{prefix(env)}status:{jid}")[-1]
        progress = file_bus(env, f"{prefix(env)}progress:{jid}")[-1]
        events = last_per_code(file_bus(env, f"{prefix(env)}events:{jid}"))
    assert status["role"] == "snapshot"
    assert status["status"] == "success"
    assert status["exit_code"] == 0
    assert progress["percent_complete"] == 100
    assert progress["files_processed"] == len(files)
    external = events["SYMLINK_EXTERNAL"]
    assert external["count"] == 2
    assert sorted(external["sample_paths"]) == sorted(source.external_links)
    assert status["warnings_summary"]  # the external links were counted as warnings

    try:
        check_restore(env, source, target, redis_client, manifest)
    finally:  # the copies of the 200 MiB file
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(job_dir(env), ignore_errors=True)


def check_restore(
    env: dict[str, str],
    source: Source,
    target: Path,
    redis_client: redis.Redis,
    manifest: dict[str, Any],
) -> None:
    renv = restore_env(env)
    jid = renv["BAQUP_JOB_ID"]
    on_redis = env["BAQUP_BUS_URL"].startswith("redis://")
    before = snapshot_state(env, redis_client if on_redis else None)
    restore = run_baqup(["--schema", str(SCHEMA), "restore"], renv, timeout=150)
    assert restore.returncode == 0, restore.stderr[-3000:]
    restored = describe(target)
    assert sorted(restored) == sorted(source.expected)
    for relative, want in source.expected.items():
        assert restored[relative] == want, relative
    # the external targets were not copied in, the excluded names are absent
    assert not any("secret" in k for k in restored)
    assert not any(k.endswith(".tmp") or k.startswith("cache") for k in restored)
    # the internal links still resolve inside the restored tree
    assert (target / "link-to-file").read_bytes() == FILES["a/b/c/deep.txt"][0]
    assert (target / "link-to-dir" / "c" / "deep.txt").is_file()
    assert (target / "a/b/c/up-link").read_text() == FILES["Ünïcødé файл 東京.txt"][0].decode()

    if on_redis:
        final = read_hash(redis_client, f"{prefix(env)}status:{jid}")
    else:
        final = file_bus(env, f"{prefix(env)}status:{jid}")[-1]
    assert final["role"] == "restore"
    assert final["status"] == "success"
    assert final["metrics"]["bytes_restored"] > BIG_SIZE
    assert final["restored_from"]["job_id"] == env["BAQUP_JOB_ID"]
    assert final["restored_from"]["path"] == str(job_dir(env))
    # the restore did not touch the committed job: its files and its keys
    assert json.loads((job_dir(env) / "manifest.json").read_text()) == manifest
    assert snapshot_state(env, redis_client if on_redis else None) == before


def snapshot_state(env: dict[str, str], client: redis.Redis | None) -> dict[str, Any]:
    """The snapshot's job dir (every file's bytes, hashed) and its keys on the bus."""
    root = job_dir(env)
    state: dict[str, Any] = {
        str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()
    }
    jid = env["BAQUP_JOB_ID"]
    if client is not None:
        for key in client.scan_iter(match=f"{prefix(env)}*{jid}*"):
            kind = client.type(key)
            state[key] = client.hgetall(key) if kind == "hash" else client.xrange(key)
    else:
        bus = Path(env["BAQUP_BUS_URL"].removeprefix("file://"))
        for path in sorted(bus.rglob(f"*{jid}*")):
            state[str(path)] = path.read_bytes()
    return state


def test_absolute_symlink_inside_the_source(job_env: dict[str, str], tmp_path: Path) -> None:
    """A symlink with an absolute target inside the source is kept (shallow policy): the
    backup it is in must still restore with the agent's own restore, and the restored link
    must not point back into the original source."""
    root = tmp_path / "src"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f.txt").write_text("inside\n")
    (root / "abs-inside").symlink_to(root / "d" / "f.txt")
    target = tmp_path / "restored"
    src = Source(root, tmp_path, (), {})
    env = agent_env(job_env, src, target)
    snap = run_baqup(["--schema", str(SCHEMA), "snapshot"], env)
    assert snap.returncode == 0, snap.stderr[-3000:]
    restore = run_baqup(["--schema", str(SCHEMA), "restore"], restore_env(env))
    assert restore.returncode == 0, (
        "a committed snapshot that its own restore refuses: " + restore.stderr[-2000:]
    )
    assert (target / "d" / "f.txt").read_text() == "inside\n"
    link = target / "abs-inside"
    if link.is_symlink():
        assert Path(os.path.realpath(link)) == (target / "d" / "f.txt").resolve()


# --- restore targets: not empty, read-only source, ownership, a full disk ---------------------


def small_tree(root: Path) -> None:
    """Files owned by other users, odd modes, fixed mtimes, a symlink, a nested dir."""
    (root / "d" / "e").mkdir(parents=True)
    (root / "same.txt").write_text("from the snapshot\n")
    (root / "d" / "e" / "deep.bin").write_bytes(bytes(range(256)) * 40)
    (root / "link").symlink_to("d/e/deep.bin")
    os.chown(root / "same.txt", 1234, 5678)
    os.chown(root / "d", 4321, 8765)
    os.lchown(root / "link", 1111, 2222)
    os.chmod(root / "same.txt", 0o604)
    os.chmod(root / "d" / "e" / "deep.bin", 0o751)
    for path in [root / "same.txt", root / "d" / "e" / "deep.bin", root / "d" / "e", root / "d"]:
        os.utime(path, (MTIME, MTIME + 7))


def owners(root: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(root).as_posix(): (p.lstat().st_uid, p.lstat().st_gid)
        for p in sorted(root.rglob("*"))
    }


def test_restore_into_a_non_empty_target_from_a_read_only_copy(
    job_env: dict[str, str], tmp_path: Path
) -> None:
    root = tmp_path / "src"
    small_tree(root)
    target = tmp_path / "target"
    src = Source(root, tmp_path, (), describe(root))
    env = agent_env(job_env, src, target)
    snap = run_baqup(["--schema", str(SCHEMA), "snapshot"], env)
    assert snap.returncode == 0, snap.stderr[-3000:]
    assert run_baqup(["verify", str(job_dir(env))], env, tool=True).returncode == 0
    copy = tmp_path / "copied" / "snap"
    shutil.copytree(job_dir(env), copy)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    subprocess.run(["mount", "--bind", str(copy), str(read_only)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(read_only)], check=True)
        before = {p.name: p.read_bytes() for p in read_only.iterdir() if p.is_file()}
        target.mkdir()
        (target / "same.txt").write_text("the live copy, replaced\n")
        (target / "keep.txt").write_text("not in the snapshot, kept\n")
        renv = restore_env(env, BAQUP_RESTORE_FROM=str(read_only))
        restore = run_baqup(["--schema", str(SCHEMA), "restore"], renv)
        assert restore.returncode == 0, restore.stderr[-3000:]
        restored = describe(target)
        assert restored.pop("keep.txt")[0] == "file"  # nothing else removed
        assert restored == src.expected  # bytes, modes, mtimes, link target
        assert (target / "keep.txt").read_text() == "not in the snapshot, kept\n"
        got = owners(target)
        del got["keep.txt"]
        assert got == owners(root)  # run as root: ownership restored too
        assert {p.name: p.read_bytes() for p in read_only.iterdir() if p.is_file()} == before
        jid = renv["BAQUP_JOB_ID"]
        status = file_bus(renv, f"{prefix(renv)}status:{jid}")[-1]
        assert status["restored_from"]["path"] == str(read_only)
        progress = file_bus(renv, f"{prefix(renv)}progress:{jid}")
        assert progress[-1]["files_processed"] == 2
        assert progress[-1]["percent_complete"] == 100
    finally:
        subprocess.run(["umount", str(read_only)], check=True)


def test_a_target_on_a_full_disk_is_exit_74(job_env: dict[str, str], tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "big.bin").write_bytes(os.urandom(3 << 20))
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], check=True)
    try:
        env = agent_env(job_env, Source(root, tmp_path, (), {}), full / "target")
        assert run_baqup(["--schema", str(SCHEMA), "snapshot"], env).returncode == 0
        manifest = (job_dir(env) / "manifest.json").read_bytes()
        renv = restore_env(env)
        restore = run_baqup(["--schema", str(SCHEMA), "restore"], renv)
        assert restore.returncode == 74, restore.stderr[-3000:]
        status = file_bus(renv, f"{prefix(renv)}status:{renv['BAQUP_JOB_ID']}")[-1]
        assert status["exit_code"] == 74
        assert "No space left on device" in restore.stderr  # the child's own message
        assert (job_dir(env) / "manifest.json").read_bytes() == manifest
        assert run_baqup(["verify", str(job_dir(env))], env, tool=True).returncode == 0
    finally:
        subprocess.run(["umount", str(full)], check=True)
