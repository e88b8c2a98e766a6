"""The Walker and `baqup archive` on hostile source trees (spec section 7, Appendix B).

Symlink loops must end for every policy; symlinks leaving the source are reported
(`SYMLINK_EXTERNAL`) and never followed; `skip` and `fail` do what the spec says;
unreadable directories are reported (`PERMISSION_DENIED`, walked as the `nobody` user
since the tests run as root) and the walk goes on; a tree 1,000 levels deep (deeper than
PATH_MAX allows to name) is walked, and `BAQUP_SOURCE_MAX_DEPTH` stops it; the file limit
warns once at 90% and aborts above 100%; a tree of empty files is an anomaly; excludes
keep things out; and the walk streams (its memory does not grow with the tree).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import tracemalloc
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis

from baqup_supervisor.errors import DataError, SecurityViolation
from baqup_supervisor.resources import ResourceLimitExceeded
from baqup_supervisor.walker import POLICIES, Entry, Walker
from tests.conftest import RedisServer
from tests.jobs import job_dir, log_records, prefix, read_hash, read_stream, redis_env, start_job

BIN = Path(sys.executable).parent
BAQUP = str(BIN / "baqup")
Event = tuple[str, str, str, str | None]

# --- helpers --------------------------------------------------------------------------------


class Recorder:
    """An event sink that keeps every event."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, code: str, severity: str, message: str, path: str | None) -> None:
        self.events.append((code, severity, message, path))

    def paths(self, code: str) -> set[str | None]:
        return {e[3] for e in self.events if e[0] == code}

    def codes(self) -> list[str]:
        return [e[0] for e in self.events]


def walk(root: Path, *, limit: int = 5000, **options: Any) -> tuple[list[Entry], Recorder]:
    """Every entry (failing the test past `limit`: a walk that does not end), and the events."""
    recorder = Recorder()
    entries: list[Entry] = []
    for entry in Walker(root, on_event=recorder, **options):
        entries.append(entry)
        assert len(entries) <= limit, f"the walk does not end: {[e.relative for e in entries[-5:]]}"
    return entries, recorder


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAQUP_")}
    env.update(PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def baqup_archive(
    src: Path, out: Path, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BAQUP, "archive", str(src), "-o", str(out), *args],
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else cli_env(),
        timeout=120,
        check=False,
    )


def tar_members(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


def touch(path: Path, data: bytes = b"") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# --- symlink loops -----------------------------------------------------------------------------


def loop_tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    touch(root / "file.txt", b"data")
    os.symlink(".", root / "self")  # a -> .
    touch(root / "b-parent" / "inside.txt", b"x")
    os.symlink("../b-parent", root / "b-parent" / "b")  # b -> ../b-parent (its own dir)
    touch(root / "d1" / "one.txt", b"1")
    touch(root / "d2" / "two.txt", b"2")
    os.symlink("../d2", root / "d1" / "to_d2")  # d1 -> d2 -> d1 ...
    os.symlink("../d1", root / "d2" / "to_d1")
    os.symlink("m2", root / "m1")  # m1 -> m2 -> m1: ELOOP
    os.symlink("m1", root / "m2")
    os.symlink("..", root / "up")  # the parent of the source: outside
    return root


LOOP_LINKS = {"self", "b-parent/b", "d1/to_d2", "d2/to_d1", "m1", "m2", "up"}


@pytest.mark.parametrize("policy", ["follow", "shallow", "skip"])
def test_symlink_loops_terminate(tmp_path: Path, policy: str) -> None:
    root = loop_tree(tmp_path)
    entries, recorder = walk(root, policy=policy, limit=200)
    relatives = [e.relative for e in entries]
    assert len(relatives) == len(set(relatives)), "an entry was walked twice"
    files = {e.relative for e in entries if e.kind == "file"}
    assert {"file.txt", "b-parent/inside.txt", "d1/one.txt", "d2/two.txt"} <= files
    assert "up" in recorder.paths("SYMLINK_EXTERNAL") or policy == "skip"
    assert not any(r.startswith("up/") for r in relatives)
    if policy == "skip":
        assert recorder.paths("SYMLINK_SKIPPED") == LOOP_LINKS
        assert not [e for e in entries if e.kind == "symlink"]
    if policy == "follow":
        # each loop is cut where it comes back to a directory on the current path
        assert {"self", "b-parent/b", "m1", "m2"} <= recorder.paths("SYMLINK_SKIPPED")
        assert "d1/to_d2/two.txt" in files
        assert "d2/to_d1/one.txt" in files
        assert "d1/to_d2/to_d1/one.txt" not in files
        assert not [e for e in entries if e.kind == "symlink"]
    if policy == "shallow":
        kept = {e.relative: e.link_target for e in entries if e.kind == "symlink"}
        assert kept["self"] == "."
        assert kept["b-parent/b"] == "../b-parent"
        assert kept["d1/to_d2"] == "../d2"
        assert kept["d2/to_d1"] == "../d1"
        assert not any(r.startswith(("self/", "d1/to_d2/", "b-parent/b/")) for r in relatives)


def test_symlink_loops_fail_policy_raises(tmp_path: Path) -> None:
    root = loop_tree(tmp_path)
    with pytest.raises(SecurityViolation) as caught:
        walk(root, policy="fail", limit=200)
    assert caught.value.exit_code == 65


@pytest.mark.parametrize("policy", POLICIES)
def test_baqup_archive_on_loops_ends(tmp_path: Path, policy: str) -> None:
    root = loop_tree(tmp_path)
    out = tmp_path / "loops.tar"
    result = baqup_archive(root, out, "--symlinks", policy)
    if policy == "fail":
        assert result.returncode == 65, result.stderr
        assert "Traceback" not in result.stderr
        assert log_records(result.stderr), result.stderr
        assert not out.exists()
        return
    assert result.returncode == 0, result.stderr
    names = tar_members(out)
    assert len(names) < 60
    assert not any(n == "up" or n.startswith("up/") for n in names)


# --- symlinks leaving the source ------------------------------------------------------------------


def external_tree(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    touch(outside / "secret.txt", b"outside the boundary")
    root = tmp_path / "src"
    touch(root / "sub" / "f.txt", b"inside")
    os.symlink("/etc", root / "ext_abs")
    os.symlink("../outside", root / "ext_rel")
    os.symlink("/etc/passwd", root / "ext_file")
    os.symlink("../../outside/secret.txt", root / "sub" / "ext_deep")
    os.symlink(str(tmp_path / "src-evil"), root / "ext_prefix")  # shares the root's prefix
    touch(tmp_path / "src-evil" / "evil.txt", b"not in src")
    os.symlink("sub", root / "internal")
    os.symlink("sub/f.txt", root / "internal_file")
    return root


EXTERNAL = {"ext_abs", "ext_rel", "ext_file", "sub/ext_deep", "ext_prefix"}


@pytest.mark.parametrize("policy", ["shallow", "follow"])
def test_symlinks_out_of_the_boundary_are_reported_and_never_followed(
    tmp_path: Path, policy: str
) -> None:
    root = external_tree(tmp_path)
    entries, recorder = walk(root, policy=policy)
    relatives = {e.relative for e in entries}
    # under follow, `internal -> sub` shows sub's external link a second time
    again = {"internal/ext_deep"} if policy == "follow" else set()
    assert recorder.paths("SYMLINK_EXTERNAL") == EXTERNAL | again
    assert all(sev == "warn" for code, sev, _, _ in recorder.events if code == "SYMLINK_EXTERNAL")
    for name in EXTERNAL | again:
        assert name not in relatives
        assert not any(r.startswith(name + "/") for r in relatives)
    by_name = {e.relative: e for e in entries}
    if policy == "shallow":
        assert by_name["internal"].kind == "symlink"
        assert by_name["internal"].link_target == "sub"
        assert by_name["internal_file"].kind == "symlink"
        assert "internal/f.txt" not in relatives
    else:
        assert by_name["internal"].kind == "dir"
        assert by_name["internal/f.txt"].kind == "file"
        assert by_name["internal_file"].kind == "file"


@pytest.mark.parametrize("policy", ["shallow", "follow"])
def test_baqup_archive_never_stores_what_is_outside(tmp_path: Path, policy: str) -> None:
    root = external_tree(tmp_path)
    out = tmp_path / "ext.tar"
    result = baqup_archive(root, out, "--symlinks", policy)
    assert result.returncode == 0, result.stderr
    members = tar_members(out)
    assert not any(
        n.split("/")[0] in {"ext_abs", "ext_rel", "ext_file", "ext_prefix"} for n in members
    )
    assert "sub/ext_deep" not in members
    with tarfile.open(out) as tar:
        for member in tar.getmembers():
            handle = tar.extractfile(member)
            if handle is not None:
                data = handle.read()
                assert data not in (b"outside the boundary", b"not in src")
                assert data != Path("/etc/passwd").read_bytes()
    if policy == "shallow":
        assert members["internal"].issym()
        assert members["internal"].linkname == "sub"
    else:
        assert members["internal/f.txt"].isreg()


def test_skip_policy_leaves_every_symlink_out(tmp_path: Path) -> None:
    root = external_tree(tmp_path)
    entries, recorder = walk(root, policy="skip")
    assert recorder.paths("SYMLINK_SKIPPED") == EXTERNAL | {"internal", "internal_file"}
    assert all(sev == "info" for code, sev, _, _ in recorder.events if code == "SYMLINK_SKIPPED")
    assert "SYMLINK_EXTERNAL" not in recorder.codes()
    assert {e.relative for e in entries} == {"sub", "sub/f.txt"}


def test_fail_policy_raises_on_the_first_symlink(tmp_path: Path) -> None:
    root = tmp_path / "src"
    touch(root / "a.txt", b"a")
    os.symlink("a.txt", root / "z-internal")
    with pytest.raises(SecurityViolation) as caught:
        walk(root, policy="fail")
    assert caught.value.exit_code == 65
    assert "z-internal" in caught.value.message


# --- under baqup-run ----------------------------------------------------------------------------


def archive_job_argv(src: Path) -> list[str]:
    script = 'exec "$0" archive "$1" -o "$BAQUP_WORK_DIR/src.tar"'
    return ["--", "sh", "-c", script, BAQUP, str(src)]


def test_fail_policy_under_baqup_run_exits_65_without_a_manifest(
    tmp_path: Path,
    job_env: dict[str, str],
    redis_server: RedisServer,
    redis_client: redis.Redis,
) -> None:
    root = external_tree(tmp_path)
    env = redis_env(job_env, redis_server)
    env["BAQUP_SOURCE_FOLLOW_SYMLINKS"] = "fail"
    job = start_job(archive_job_argv(root), env)
    assert job.wait(60) == 65, job.stderr()[-3000:]
    status = read_hash(redis_client, f"{prefix(env)}status:{env['BAQUP_JOB_ID']}")
    assert status["status"] == "failed"
    assert status["exit_code"] == 65
    assert not (job_dir(env) / "manifest.json").exists()
    assert not (job_dir(env) / "src.tar").exists()


def test_shallow_policy_under_baqup_run_reports_external_links_on_redis(
    tmp_path: Path,
    job_env: dict[str, str],
    redis_server: RedisServer,
    redis_client: redis.Redis,
) -> None:
    root = external_tree(tmp_path)
    env = redis_env(job_env, redis_server)
    job = start_job(archive_job_argv(root), env)
    assert job.wait(60) == 0, job.stderr()[-3000:]
    events = read_stream(redis_client, f"{prefix(env)}events:{env['BAQUP_JOB_ID']}")
    external = [e for e in events if e.get("code") == "SYMLINK_EXTERNAL"]
    assert external, events
    assert set(external[-1]["sample_paths"]) == EXTERNAL
    assert external[-1]["count"] == len(EXTERNAL)
    members = tar_members(job_dir(env) / "src.tar")
    assert "sub/f.txt" in members
    assert "ext_abs" not in members


# --- unreadable directories, walked as nobody -----------------------------------------------------

NOBODY_WALK = r"""
import json, os, sys
from baqup_supervisor.walker import Walker
uid, gid, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
events = []
walker = Walker(root, on_event=lambda c, s, m, p: events.append([c, s, m, p]))
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
entries = [[e.relative, e.kind] for e in walker]
print(json.dumps({"uid": os.getuid(), "entries": entries, "events": events}))
"""


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A directory the `nobody` user can reach (the pytest tmp dir is root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="baqup-walk-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_unreadable_directories_are_reported_and_the_walk_goes_on(public_tmp: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    root = public_tmp / "src"
    touch(root / "a_ok" / "one.txt", b"1")
    touch(root / "locked" / "inner.txt", b"hidden")
    touch(root / "listable" / "hidden.txt", b"hidden")
    touch(root / "z_ok" / "deeper" / "two.txt", b"2")
    touch(root / "top.txt", b"t")
    for current, dirs, files in os.walk(public_tmp):
        for name in dirs:
            os.chmod(os.path.join(current, name), 0o755)
        for name in files:
            os.chmod(os.path.join(current, name), 0o644)
    (root / "locked").chmod(0o000)
    (root / "listable").chmod(0o644)  # names readable, entries not reachable (no x)
    result = subprocess.run(
        [sys.executable, "-c", NOBODY_WALK, str(nobody.pw_uid), str(nobody.pw_gid), str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["uid"] == nobody.pw_uid
    found = {rel for rel, kind in report["entries"] if kind == "file"}
    assert found == {"a_ok/one.txt", "z_ok/deeper/two.txt", "top.txt"}
    denied = {p for code, sev, _, p in report["events"] if code == "PERMISSION_DENIED"}
    assert denied == {"locked", "listable/hidden.txt"}
    assert all(sev == "warn" for code, sev, _, _ in report["events"] if code == "PERMISSION_DENIED")


# --- depth ----------------------------------------------------------------------------------------

DEPTH = 1000
LEVEL = "deep"  # 1,000 x "deep/" is 5,000 characters: more than PATH_MAX (4,096)


def make_deep(base: Path, levels: int, *, link_to: str | None = None) -> None:
    """base/deep/deep/.../deep/bottom.txt (and a symlink `ext -> link_to` beside it), made
    relative to directory fds: the full path is longer than PATH_MAX, so no path-based
    call could make or reach the bottom."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(LEVEL, dir_fd=fd)
            child = os.open(LEVEL, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        bottom = os.open("bottom.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(bottom, b"at the bottom")
        os.close(bottom)
        if link_to is not None:
            os.symlink(link_to, "ext", dir_fd=fd)
    finally:
        os.close(fd)


def remove_deep(base: Path) -> None:
    """Undo make_deep without recursion (shutil.rmtree recurses once per level): each level's
    child is moved up beside it, then the emptied level is removed."""
    top = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        name: str | None = LEVEL if os.path.lexists(base / LEVEL) else None
        index = 0
        while name is not None:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top)
            following: str | None = None
            try:
                for child in os.listdir(fd):
                    if child == LEVEL:
                        index += 1
                        following = f"flat-{index}"
                        os.rename(LEVEL, following, src_dir_fd=fd, dst_dir_fd=top)
                    else:
                        os.unlink(child, dir_fd=fd)
            finally:
                os.close(fd)
            os.rmdir(name, dir_fd=top)
            name = following
    finally:
        os.close(top)


@pytest.fixture
def deep_tree(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "deep"
    root.mkdir()
    make_deep(root, DEPTH)
    yield root
    remove_deep(root)
    assert os.listdir(root) == []


def test_a_tree_1000_levels_deep_is_walked_whole(deep_tree: Path) -> None:
    assert len(str(deep_tree)) + (len(LEVEL) + 1) * DEPTH > os.pathconf("/", "PC_PATH_MAX")
    entries, recorder = walk(deep_tree)
    assert recorder.events == []
    assert len(entries) == DEPTH + 1
    assert entries[-1].kind == "file"
    assert entries[-1].depth == DEPTH + 1
    assert entries[-1].relative == f"{LEVEL}/" * DEPTH + "bottom.txt"
    assert max(e.depth for e in entries) == DEPTH + 1


def test_max_depth_10_stops_at_depth_10_with_a_warning(deep_tree: Path) -> None:
    entries, recorder = walk(deep_tree, max_depth=10)
    assert max(e.depth for e in entries) == 10
    assert len(entries) == 10
    assert all(e.kind == "dir" for e in entries)
    assert recorder.events == [
        (
            "RESOURCE_LIMIT_EXCEEDED",
            "warn",
            recorder.events[0][2],
            "/".join([LEVEL] * 10),
        )
    ]
    assert "BAQUP_SOURCE_MAX_DEPTH=10" in recorder.events[0][2]


def test_baqup_archive_honours_baqup_source_max_depth(deep_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "deep.tar"
    result = baqup_archive(deep_tree, out, env=cli_env(BAQUP_SOURCE_MAX_DEPTH="10"))
    assert result.returncode == 0, result.stderr
    depths = [name.count("/") + 1 for name in tar_members(out)]
    assert max(depths) == 10
    assert len(depths) == 10


@pytest.mark.parametrize("policy", ["shallow", "follow"])
def test_an_external_symlink_deeper_than_path_max_is_never_followed(
    tmp_path: Path, policy: str
) -> None:
    """The boundary check must not depend on naming the link by its full path: at the
    bottom of a tree deeper than PATH_MAX, `ext -> /etc` is still outside."""
    root = tmp_path / "deep"
    root.mkdir()
    make_deep(root, DEPTH, link_to="/etc")
    recorder = Recorder()
    entries: list[Entry] = []
    try:
        for entry in Walker(root, policy=policy, on_event=recorder):
            entries.append(entry)
            if len(entries) > DEPTH + 10:  # into /etc: enough seen
                break
    finally:
        remove_deep(root)
    link = f"{LEVEL}/" * DEPTH + "ext"
    leaked = [
        (e.relative[-40:], e.kind, e.link_target)
        for e in entries
        if e.relative == link or e.relative.startswith(link + "/")
    ]
    assert not leaked, f"the external link was kept or followed: {leaked[:5]}"
    assert recorder.paths("SYMLINK_EXTERNAL") == {link}
    assert len(entries) == DEPTH + 1


DEEP_WALK_WITH_1024_FDS = r"""
import json, resource, sys
from baqup_supervisor.walker import Walker
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
events = []
count, error = 0, None
try:
    for entry in Walker(sys.argv[1], on_event=lambda c, s, m, p: events.append([c, m])):
        count += 1
except Exception as exc:
    error = f"{type(exc).__name__}: {exc}"
print(json.dumps({"count": count, "error": error, "events": events}))
"""


def test_a_deep_tree_under_a_1024_descriptor_limit_is_never_cut_silently(deep_tree: Path) -> None:
    """1024 open files is the soft limit of many containers. The walk holds descriptors
    per level: it must walk the whole tree, or fail loudly; never stop half-way with a
    warning that blames permissions."""
    result = subprocess.run(
        [sys.executable, "-c", DEEP_WALK_WITH_1024_FDS, str(deep_tree)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    if report["error"] is None:
        assert report["count"] == DEPTH + 1, (
            f"walked {report['count']} of {DEPTH + 1} entries; events: {report['events']}"
        )
    assert not any(code == "PERMISSION_DENIED" for code, _ in report["events"]), report


# --- the file limit and anomalies -----------------------------------------------------------------


def files_tree(root: Path, count: int, *, empty: int = 0) -> None:
    """`count` files in 4 directories; the first `empty` of them are empty."""
    for i in range(count):
        touch(root / f"dir{i % 4}" / f"f{i:05d}", b"" if i < empty else b"x")


def test_max_files_at_the_limit_warns_once_and_passes(tmp_path: Path) -> None:
    files_tree(tmp_path / "src", 100)
    entries, recorder = walk(tmp_path / "src", max_files=100)
    assert sum(e.kind == "file" for e in entries) == 100
    assert recorder.codes() == ["RESOURCE_LIMIT_APPROACHING"]
    assert recorder.events[0][1] == "warn"


def test_max_files_over_the_limit_warns_then_aborts(tmp_path: Path) -> None:
    files_tree(tmp_path / "src", 100)
    recorder = Recorder()
    seen: list[Entry] = []
    with pytest.raises(ResourceLimitExceeded) as caught:
        seen.extend(Walker(tmp_path / "src", max_files=95, on_event=recorder))
    assert sum(e.kind == "file" for e in seen) == 95
    assert recorder.codes() == ["RESOURCE_LIMIT_APPROACHING", "RESOURCE_LIMIT_EXCEEDED"]
    assert recorder.events[1][1] == "error"
    assert caught.value.code == "RESOURCE_LIMIT_EXCEEDED"
    assert "BAQUP_SOURCE_MAX_FILES" in caught.value.message


def test_baqup_archive_over_max_files_fails_and_leaves_no_output(tmp_path: Path) -> None:
    files_tree(tmp_path / "src", 50)
    out = tmp_path / "o.tar"
    result = baqup_archive(tmp_path / "src", out, env=cli_env(BAQUP_SOURCE_MAX_FILES="40"))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".o.tar")] == []


@pytest.mark.parametrize(
    ("count", "empty", "pathological"),
    [(1000, 991, True), (1000, 1000, True), (1000, 985, False), (999, 999, False)],
    ids=["99.1%-empty", "all-empty", "98.5%-empty", "below-1000-files"],
)
def test_a_tree_of_empty_files_is_an_anomaly(
    tmp_path: Path, count: int, empty: int, pathological: bool
) -> None:
    files_tree(tmp_path / "src", count, empty=empty)
    recorder = Recorder()
    walker = Walker(tmp_path / "src", on_event=recorder)
    if not pathological:
        assert sum(e.kind == "file" for e in walker) == count
        assert "ANOMALY_DETECTED" not in recorder.codes()
        return
    with pytest.raises(DataError) as caught:
        count_files(walker, [0])
    assert caught.value.code == "ANOMALY_DETECTED"
    assert caught.value.exit_code == 65
    assert recorder.codes() == ["ANOMALY_DETECTED"]
    assert walker.stats.files == count


def test_baqup_archive_refuses_a_pathological_tree_with_65(tmp_path: Path) -> None:
    files_tree(tmp_path / "src", 1000, empty=1000)
    out = tmp_path / "o.tar"
    result = baqup_archive(tmp_path / "src", out)
    assert result.returncode == 65, result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_special_files_are_left_out_and_reported(tmp_path: Path) -> None:
    root = tmp_path / "src"
    touch(root / "plain.txt", b"p")
    os.mkfifo(root / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock"))
        os.mknod(root / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        entries, recorder = walk(root)
    assert {e.relative for e in entries} == {"plain.txt"}
    assert recorder.paths("ANOMALY_DETECTED") == {"fifo", "sock", "null"}


# --- excludes -------------------------------------------------------------------------------------


def exclude_tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for rel in ("keep.txt", "a.log", "sub/deep/b.log", "cache/big.bin", "sub/cache/x", "sub/k.md"):
        touch(root / rel, b"data")
    os.symlink("/etc", root / "ext")
    return root


def test_excludes_keep_files_directories_and_links_out(tmp_path: Path) -> None:
    root = exclude_tree(tmp_path)
    recorder = Recorder()
    walker = Walker(root, exclude=["*.log", "cache", "ext", "sub/k.md"], on_event=recorder)
    relatives = {e.relative for e in walker}
    assert relatives == {"keep.txt", "sub", "sub/deep"}
    assert recorder.events == []  # the excluded external link is not even looked at
    assert walker.stats.excluded == 6


def test_baqup_archive_reads_baqup_source_exclude(tmp_path: Path) -> None:
    root = exclude_tree(tmp_path)
    out = tmp_path / "x.tar"
    result = baqup_archive(root, out, env=cli_env(BAQUP_SOURCE_EXCLUDE="*.log|cache|ext"))
    assert result.returncode == 0, result.stderr
    assert set(tar_members(out)) == {"keep.txt", "sub", "sub/deep", "sub/k.md"}


def test_hostile_file_names_survive_archive_and_extract(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    names = [b"new\nline", b"bad\xff\xfebytes", b"-rf --no-preserve-root", b"\xe2\x80\xaereversed"]
    for name in names:
        with open(os.path.join(bytes(root), name), "wb") as handle:
            handle.write(name)
    out = tmp_path / "names.tar"
    assert baqup_archive(root, out).returncode == 0
    dest = tmp_path / "dest"
    result = subprocess.run(
        [BAQUP, "extract", str(out), str(dest)], capture_output=True, env=cli_env(), check=False
    )
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(bytes(dest))) == sorted(names)
    for name in names:
        with open(os.path.join(bytes(dest), name), "rb") as handle:
            assert handle.read() == name


# --- streaming ------------------------------------------------------------------------------------

MANY = 100_000


def count_files(walker: Walker, counter: list[int]) -> None:
    """Count the files of a walk without keeping any entry."""
    for entry in walker:
        counter[0] += entry.kind == "file"


def test_walking_100000_files_streams(tmp_path: Path) -> None:
    """The walk keeps one open directory per level and one entry at a time, never a list:
    walking 100,000 files must peak at well under 2 MB of Python allocations, while merely
    holding their relative paths in a list takes several MB (measured below), and a list
    of the entries themselves tens of MB. The files are empty, so the walk ends with the
    anomaly, after streaming every one of them."""
    root = tmp_path / "many"
    root.mkdir()
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for d in range(100):
            os.mkdir(f"d{d:03d}", dir_fd=root_fd)
            dir_fd = os.open(f"d{d:03d}", os.O_RDONLY | os.O_DIRECTORY, dir_fd=root_fd)
            try:
                for i in range(MANY // 100):
                    os.mknod(f"file-{i:05d}.dat", 0o644 | stat.S_IFREG, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        os.close(root_fd)

    walker = Walker(root)
    counter = [0]
    tracemalloc.start()
    try:
        with pytest.raises(DataError):
            count_files(walker, counter)
        _, walk_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        paths = [f"d{d:03d}/file-{i:05d}.dat" for d in range(100) for i in range(MANY // 100)]
        _, list_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert counter[0] == MANY
    assert walker.stats.files == MANY
    assert len(paths) == MANY
    assert list_peak > 5_000_000, f"the reference list took only {list_peak} bytes"
    assert walk_peak < 2_000_000, f"the walk peaked at {walk_peak} bytes: it is not streaming"
    assert walk_peak * 5 < list_peak


def test_running_out_of_descriptors_fails_loudly(deep_tree: Path) -> None:
    """With the hard limit at 1024 too, the walk cannot go deep enough: it must say so."""
    code = DEEP_WALK_WITH_1024_FDS.replace(
        "(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1])", "(1024, 1024)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(deep_tree)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["error"] is not None
    assert report["error"].startswith("ResourceUnavailable: too many open files at depth")
    assert not any(code == "PERMISSION_DENIED" for code, _ in report["events"]), report
