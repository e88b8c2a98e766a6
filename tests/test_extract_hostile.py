"""`baqup extract` against hostile archives (spec section 7, "Zip Slip Prevention").

Every archive here is built in the test with the tarfile module (plain, and gzip, zstd
and lz4 compressed), and fed both to the real CLI (`baqup extract ARCHIVE DEST`, exit 65
with a JSON log line and no traceback) and to `extract()` (SecurityViolation or
DataError). A refusal must refuse the WHOLE archive before a byte lands: DEST does not
exist afterwards, the sentinel tree around it (a decoy `etc/passwd`, an `outside` dir
with a victim file) is byte-for-byte unchanged, and so is the real /etc/passwd. A benign
member always comes first, so "before a byte lands" is tested, not assumed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lz4.frame
import pytest
import redis
import zstandard

from baqup_supervisor.errors import DataError, SecurityViolation
from baqup_supervisor.extract import extract
from tests.conftest import RedisServer
from tests.jobs import job_dir, log_records, prefix, read_hash, read_stream, redis_env, start_job

BIN = Path(sys.executable).parent
BAQUP = str(BIN / "baqup")
COMPRESSIONS = ("none", "gzip", "zstd", "lz4")
MTIME = 1_600_000_000

# --- building archives ----------------------------------------------------------------


@dataclass(frozen=True)
class M:
    """One archive member: its header fields and, for a regular file, its data."""

    name: str
    kind: str = "file"  # file, dir, symlink, hardlink, chr, blk, fifo
    data: bytes = b""
    linkname: str = ""
    mode: int = 0o644
    mtime: int = MTIME


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def tar_bytes(members: Sequence[M]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = _TYPES[m.kind]
            info.mode = m.mode
            info.mtime = m.mtime
            info.linkname = m.linkname
            if m.kind == "chr":
                info.devmajor, info.devminor = 1, 3  # /dev/null
            elif m.kind == "blk":
                info.devmajor, info.devminor = 7, 0  # /dev/loop0
            if m.kind == "file":
                info.size = len(m.data)
                tar.addfile(info, io.BytesIO(m.data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def compress(raw: bytes, algorithm: str) -> bytes:
    """Compressed as the real tools do: with the format's integrity checksum."""
    if algorithm == "gzip":
        return gzip.compress(raw)
    if algorithm == "zstd":
        return bytes(zstandard.ZstdCompressor(write_checksum=True).compress(raw))
    if algorithm == "lz4":
        return bytes(lz4.frame.compress(raw, content_checksum=True))
    return raw


def write_archive(path: Path, members: Sequence[M], algorithm: str = "none") -> Path:
    path.write_bytes(compress(tar_bytes(members), algorithm))
    return path


# --- the sentinel world around DEST ---------------------------------------------------


@dataclass
class World:
    """tmp/world/{etc/passwd, outside/victim, jail/}; DEST is jail/dest (not created)."""

    root: Path
    dest: Path
    outside: Path


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every path under root (root included) with its type, mode, mtime and content."""
    out: dict[str, tuple[Any, ...]] = {}
    for current, dirs, files in os.walk(root, followlinks=False):
        for name in [".", *dirs, *files]:
            path = os.path.join(current, name) if name != "." else current
            info = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(info.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                out[rel] = ("file", info.st_mode, info.st_mtime_ns, info.st_nlink, digest)
            else:
                out[rel] = ("other", info.st_mode, info.st_mtime_ns, info.st_nlink)
    return out


def system_file_state(path: str) -> tuple[int, int, int, str]:
    info = os.stat(path)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return info.st_ino, info.st_mtime_ns, info.st_nlink, digest


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    root = tmp_path / "world"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("decoy:x:0:0::/:/bin/sh\n")
    (root / "outside").mkdir()
    (root / "outside" / "victim").write_text("untouched\n")
    (root / "jail").mkdir()
    before = snapshot(root)
    system = {p: system_file_state(p) for p in ("/etc/passwd", "/etc/shadow") if os.path.exists(p)}
    yield World(root, root / "jail" / "dest", root / "outside")
    assert {p: system_file_state(p) for p in system} == system, "a system file changed"
    after = snapshot(root)
    # Only DEST (and jail, the directory holding it) may change.
    changed = {
        k
        for k in set(before) | set(after)
        if before.get(k) != after.get(k) and k != "jail" and not k.startswith("jail/dest")
    }
    assert not changed, f"paths outside DEST changed: {sorted(changed)}"


def assert_untouched(w: World) -> None:
    assert not w.dest.is_symlink()
    assert not w.dest.exists(), (
        f"DEST was created: {sorted(os.listdir(w.dest)) if w.dest.is_dir() else w.dest}"
    )
    assert sorted(os.listdir(w.root / "jail")) == []
    assert (w.outside / "victim").read_text() == "untouched\n"
    assert sorted(os.listdir(w.outside)) == ["victim"]
    assert sorted(os.listdir(w.root)) == ["etc", "jail", "outside"]
    assert sorted(os.listdir(w.root / "etc")) == ["passwd"]
    assert (w.root / "etc" / "passwd").read_text() == "decoy:x:0:0::/:/bin/sh\n"


# --- running the CLI -----------------------------------------------------------------


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAQUP_")}
    env.update(PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def baqup_extract(
    archive: str | Path,
    dest: Path,
    *,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [BAQUP, "extract", str(archive), str(dest)],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        env=dict(env) if env is not None else cli_env(),
        timeout=60,
        check=False,
    )


def assert_refused_by_cli(result: subprocess.CompletedProcess[bytes], needle: str = "") -> None:
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 65, f"exit {result.returncode}; stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    # a refusal's report is its error alone (issue #14 item 7), never a success report
    report = json.loads(result.stdout)
    assert set(report) == {"archive", "dest", "error"}, report
    assert report["error"]["exit_code"] == 65
    errors = [r for r in log_records(stderr) if r.get("level") == "error"]
    assert errors, f"no JSON error record on stderr:\n{stderr}"
    assert errors[-1]["context"].get("exit_code") == 65
    assert needle in errors[-1]["message"], errors[-1]


# --- the hostile archives ---------------------------------------------------------------

OK = M("ok.txt", data=b"benign first member\n")


def hostile_cases(w: World) -> dict[str, list[M]]:
    passwd = Path("/etc/passwd").read_bytes()  # identical content: harmless even on a regression
    through_root = "s" + str(w.outside / "victim")  # s -> /, then s/.../world/outside/victim
    return {
        "dotdot": [OK, M("../../etc/passwd", data=b"pwned\n")],
        "absolute": [OK, M("/etc/passwd", data=passwd, mode=0o644)],
        "symlink-to-root-then-file": [
            OK,
            M("s", "symlink", linkname="/"),
            M(through_root, data=b"pwned\n"),
        ],
        "symlink-up-then-file": [
            OK,
            M("a", "symlink", linkname="../.."),
            M("a/x", data=b"pwned\n"),
        ],
        "hardlink-to-etc-shadow": [OK, M("h", "hardlink", linkname="/etc/shadow")],
        "hardlink-to-dotdot-outside": [OK, M("h", "hardlink", linkname="../../outside/victim")],
        "hardlink-to-dotdot-dir": [OK, M("h", "hardlink", linkname="../../outside")],
        "char-device": [OK, M("null", "chr", mode=0o666)],
        "block-device": [OK, M("loop0", "blk", mode=0o660)],
        "fifo": [OK, M("pipe", "fifo")],
        "symlink-chain-leaves-dest": [
            OK,
            M("x", "symlink", linkname="."),
            M("y", "symlink", linkname="x/.."),
        ],
        "dot-a-dotdot-b": [OK, M("./a/../b", data=b"normalised?\n")],
    }


CASES = (
    "dotdot",
    "absolute",
    "symlink-to-root-then-file",
    "symlink-up-then-file",
    "hardlink-to-etc-shadow",
    "hardlink-to-dotdot-outside",
    "hardlink-to-dotdot-dir",
    "char-device",
    "block-device",
    "fifo",
    "symlink-chain-leaves-dest",
    "dot-a-dotdot-b",
)


@pytest.mark.parametrize("algorithm", COMPRESSIONS)
@pytest.mark.parametrize("case", CASES)
def test_extract_function_refuses_the_whole_archive(
    world: World, tmp_path: Path, case: str, algorithm: str
) -> None:
    archive = write_archive(tmp_path / f"{case}.tar", hostile_cases(world)[case], algorithm)
    with pytest.raises(SecurityViolation) as caught:
        extract(archive, world.dest)
    assert caught.value.exit_code == 65
    assert caught.value.code == "SECURITY_VIOLATION"
    assert_untouched(world)


@pytest.mark.parametrize("algorithm", COMPRESSIONS)
@pytest.mark.parametrize("case", CASES)
def test_extract_cli_refuses_with_65_and_a_json_log_line(
    world: World, tmp_path: Path, case: str, algorithm: str
) -> None:
    archive = write_archive(tmp_path / f"{case}.tar", hostile_cases(world)[case], algorithm)
    result = baqup_extract(archive, world.dest)
    assert_refused_by_cli(result)
    assert_untouched(world)


def test_dotdot_anywhere_in_a_name_is_refused_as_documented(world: World, tmp_path: Path) -> None:
    """README: names that contain `..` are refused, even `./a/../b` that stays inside."""
    archive = write_archive(tmp_path / "a.tar", [OK, M("./a/../b", data=b"x")])
    result = baqup_extract(archive, world.dest)
    assert_refused_by_cli(result, "'..'")
    assert_untouched(world)


def test_dot_segments_and_empty_segments_are_normalised(world: World, tmp_path: Path) -> None:
    archive = write_archive(
        tmp_path / "a.tar", [M("./a/./b", data=b"one"), M("c//d/", "dir", mode=0o755)]
    )
    report = extract(archive, world.dest)
    assert (world.dest / "a" / "b").read_bytes() == b"one"
    assert (world.dest / "c" / "d").is_dir()
    assert report.files == 1
    assert sorted(os.listdir(world.dest)) == ["a", "c"]


def test_a_pre_existing_symlink_in_dest_is_never_followed(world: World, tmp_path: Path) -> None:
    """DEST already holds `l -> ../../outside`: `l/newdir/f` must not create anything there."""
    world.dest.mkdir()
    os.symlink("../../outside", world.dest / "l")
    archive = write_archive(tmp_path / "a.tar", [M("l/newdir/f", data=b"pwned\n")])
    with pytest.raises(SecurityViolation):
        extract(archive, world.dest)
    assert sorted(os.listdir(world.outside)) == ["victim"], "a directory landed outside DEST"
    assert sorted(os.listdir(world.dest)) == ["l"]
    os.unlink(world.dest / "l")
    world.dest.rmdir()


def test_a_hard_link_to_a_member_not_in_the_archive_is_refused_first(
    world: World, tmp_path: Path
) -> None:
    """A link to nothing cannot be extracted: refuse it in the validation pass, not midway."""
    archive = write_archive(tmp_path / "a.tar", [OK, M("h", "hardlink", linkname="missing")])
    with pytest.raises(DataError):
        extract(archive, world.dest)
    assert_untouched(world)
    result = baqup_extract(archive, world.dest)
    assert_refused_by_cli(result)
    assert_untouched(world)


@pytest.mark.parametrize(
    "members",
    [
        [OK, M("a", data=b"file"), M("a/b", data=b"under a file")],
        [OK, M("d", "dir", mode=0o755), M("d", data=b"file over a dir")],
        [OK, M("d", "dir", mode=0o755), M("h", "hardlink", linkname="d")],
    ],
    ids=["file-then-child", "dir-then-file", "hardlink-to-dir"],
)
def test_members_that_cannot_coexist_never_leave_a_partial_extraction(
    world: World, tmp_path: Path, members: list[M]
) -> None:
    """Either a clean extraction or a refusal (exit 65) with nothing written; never exit 70
    with half an archive on disk."""
    archive = write_archive(tmp_path / "a.tar", members)
    result = baqup_extract(archive, world.dest)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode in (0, 65), f"exit {result.returncode}: {stderr}"
    assert "Traceback" not in stderr
    if result.returncode == 65:
        assert_untouched(world)
    else:
        shutil.rmtree(world.dest)


# --- pathological archives ----------------------------------------------------------------


def empty_files_tar(count: int) -> bytes:
    """A ustar archive of `count` empty files, headers written by hand (fast)."""
    template = bytearray(tarfile.TarInfo("d/000000").tobuf(tarfile.USTAR_FORMAT))
    template[148:156] = b" " * 8
    base = sum(template) - sum(b"d/000000")
    out = bytearray()
    for i in range(count):
        name = b"d/%06d" % i
        header = bytearray(template)
        header[0:8] = name
        header[148:156] = b"%06o\0 " % (base + sum(name))
        out += header
    out += bytes(1024)
    return bytes(out)


def test_the_hand_made_headers_are_valid_tar() -> None:
    with tarfile.open(fileobj=io.BytesIO(empty_files_tar(3))) as tar:
        members = tar.getmembers()
    assert [(m.name, m.size, m.isreg()) for m in members] == [
        ("d/000000", 0, True),
        ("d/000001", 0, True),
        ("d/000002", 0, True),
    ]


def test_100000_empty_files_are_refused_as_an_anomaly(world: World, tmp_path: Path) -> None:
    raw = empty_files_tar(100_000)
    archive = tmp_path / "empty.tar.zst"
    archive.write_bytes(zstandard.ZstdCompressor(level=1).compress(raw))
    with pytest.raises(DataError) as caught:
        extract(archive, world.dest)
    assert caught.value.code == "ANOMALY_DETECTED"
    assert caught.value.exit_code == 65
    assert_untouched(world)
    result = baqup_extract(archive, world.dest)
    assert_refused_by_cli(result, "empty")
    assert_untouched(world)


# --- corrupt and truncated compressed archives ----------------------------------------------


def random_tar(count: int = 24, size: int = 40_000) -> tuple[bytes, list[int]]:
    """A tar of random (incompressible) files and the offsets where each member ends."""
    rng = random.Random(7)
    buf = io.BytesIO()
    ends = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(count):
            data = rng.randbytes(size)
            info = tarfile.TarInfo(f"f{i:02d}.bin")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            ends.append(buf.tell())
    return buf.getvalue(), ends


def cut_at_flush(raw: bytes, offset: int, algorithm: str) -> bytes:
    """The compressed stream of raw[:offset], flushed but never finished: a truncated file
    whose decompressed prefix ends exactly on a member boundary."""
    head = raw[:offset]
    if algorithm == "gzip":
        codec = zlib.compressobj(6, zlib.DEFLATED, 31)
        return codec.compress(head) + codec.flush(zlib.Z_FULL_FLUSH)
    if algorithm == "zstd":
        zobj = zstandard.ZstdCompressor(write_checksum=True).compressobj()
        return bytes(zobj.compress(head) + zobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
    frame = lz4.frame.LZ4FrameCompressor(content_checksum=True, auto_flush=True)
    return bytes(frame.begin() + frame.compress(head))


def damaged(kind: str, algorithm: str) -> bytes:
    raw, ends = random_tar()
    whole = compress(raw, algorithm)
    if kind == "cut-in-the-middle":
        return whole[: len(whole) // 2 + 1234]
    if kind == "cut-at-a-flush-point":
        return cut_at_flush(raw, ends[len(ends) // 2], algorithm)
    flipped = bytearray(whole)
    flipped[len(flipped) // 2] ^= 0x10  # one bit, in the middle of the stored data
    return bytes(flipped)


DAMAGE = ("cut-in-the-middle", "cut-at-a-flush-point", "one-bit-flipped")


@pytest.mark.parametrize("kind", DAMAGE)
@pytest.mark.parametrize("algorithm", ["gzip", "zstd", "lz4"])
def test_corrupt_or_truncated_compressed_archive_exits_65(
    world: World, tmp_path: Path, algorithm: str, kind: str
) -> None:
    archive = tmp_path / f"bad.tar.{algorithm}"
    archive.write_bytes(damaged(kind, algorithm))
    result = baqup_extract(archive, world.dest)
    assert_refused_by_cli(result)
    assert_untouched(world)


@pytest.mark.parametrize("kind", DAMAGE)
@pytest.mark.parametrize("algorithm", ["gzip", "zstd", "lz4"])
def test_corrupt_or_truncated_compressed_archive_is_a_data_error(
    world: World, tmp_path: Path, algorithm: str, kind: str
) -> None:
    archive = tmp_path / f"bad.tar.{algorithm}"
    archive.write_bytes(damaged(kind, algorithm))
    with pytest.raises(DataError):
        extract(archive, world.dest)
    assert_untouched(world)


@pytest.mark.parametrize("algorithm", ["gzip", "zstd", "lz4"])
def test_the_undamaged_random_archive_extracts(
    world: World, tmp_path: Path, algorithm: str
) -> None:
    """The control for the damage tests: the same archive, whole, is fine."""
    raw, _ = random_tar()
    archive = tmp_path / f"good.tar.{algorithm}"
    archive.write_bytes(compress(raw, algorithm))
    report = extract(archive, world.dest)
    assert report.files == 24
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        originals = {m.name: m.size for m in tar.getmembers()}
    assert {p.name: p.stat().st_size for p in world.dest.iterdir()} == originals


# --- valid archives: special bits stripped, exact round trips ------------------------------


def test_setuid_setgid_and_sticky_bits_are_stripped(world: World, tmp_path: Path) -> None:
    archive = write_archive(
        tmp_path / "suid.tar",
        [
            M("bin", "dir", mode=0o3775),
            M("bin/tool", data=b"#!/bin/sh\n", mode=0o6755),
            M("bin/plain", data=b"x", mode=0o640),
        ],
    )
    result = baqup_extract(archive, world.dest)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["stripped_modes"] == 2
    assert stat.S_IMODE(os.lstat(world.dest / "bin" / "tool").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(world.dest / "bin").st_mode) == 0o775
    assert stat.S_IMODE(os.lstat(world.dest / "bin" / "plain").st_mode) == 0o640


def make_source(src: Path) -> None:
    """A tree with every kind the extractor supports, odd modes and fixed mtimes."""
    rng = random.Random(3)
    (src / "docs" / "deep" / "er").mkdir(parents=True)
    (src / "bin").mkdir()
    (src / "docs" / "readme.txt").write_text("hello\n")
    (src / "docs" / "deep" / "er" / "blob.bin").write_bytes(rng.randbytes(300_000))
    (src / "docs" / "empty").write_bytes(b"")
    (src / "bin" / "run").write_bytes(b"#!/bin/sh\necho hi\n")
    (src / "bin" / "suid").write_bytes(b"#!/bin/sh\n")
    (src / "private").write_bytes(b"secret-ish")
    os.link(src / "docs" / "readme.txt", src / "docs" / "readme.hardlink")
    os.symlink("docs/readme.txt", src / "link-to-readme")
    os.symlink("../bin", src / "docs" / "link-to-bin")
    os.symlink("dangling-but-inside", src / "dangling")
    modes = {
        "bin/run": 0o755,
        "bin/suid": 0o4755,
        "private": 0o600,
        "docs/readme.txt": 0o640,
        "docs/empty": 0o444,
        "docs/deep/er/blob.bin": 0o644,
        "docs": 0o750,
        "docs/deep": 0o2755,
        "docs/deep/er": 0o700,
        "bin": 0o755,
    }
    for rel, mode in modes.items():
        os.chmod(src / rel, mode)
    stamp = MTIME
    for current, dirs, files in os.walk(src, topdown=False):
        for name in [*files, *dirs]:
            stamp += 3600
            os.utime(os.path.join(current, name), (stamp, stamp), follow_symlinks=False)


def tree_state(root: Path, *, with_inodes: bool) -> dict[str, tuple[Any, ...]]:
    """What an exact round trip keeps: kind, mode without special bits, mtime, content,
    symlink targets and (optionally) which files share an inode."""
    out: dict[str, tuple[Any, ...]] = {}
    inodes: dict[int, str] = {}
    for current, dirs, files in os.walk(root):
        for name in sorted([*dirs, *files]):
            path = os.path.join(current, name)
            rel = os.path.relpath(path, root)
            info = os.lstat(path)
            mode = stat.S_IMODE(info.st_mode) & 0o777
            if stat.S_ISLNK(info.st_mode):
                out[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                out[rel] = ("dir", mode, int(info.st_mtime))
            else:
                first = inodes.setdefault(info.st_ino, rel) if with_inodes else rel
                content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                out[rel] = ("file", mode, int(info.st_mtime), content, first == rel or first)
    return out


def test_a_valid_archive_round_trips_exactly(world: World, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_source(src)
    archive = tmp_path / "src.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(src, arcname=".")
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
    assert any(m.islnk() for m in members), "the fixture must contain a hard link"
    report = extract(archive, world.dest)
    assert report.hardlinks == 1
    assert report.symlinks == 3
    assert report.stripped_modes == 2
    assert tree_state(world.dest, with_inodes=True) == tree_state(src, with_inodes=True)
    assert os.path.samefile(world.dest / "docs" / "readme.txt", world.dest / "docs/readme.hardlink")
    assert stat.S_IMODE(os.lstat(world.dest / "bin" / "suid").st_mode) == 0o755


def test_baqup_archive_then_zstd_then_baqup_extract_round_trips(
    world: World, tmp_path: Path
) -> None:
    """The product's own pair, through the real zstd binary, from the command line."""
    src = tmp_path / "src"
    src.mkdir()
    make_source(src)
    archive = tmp_path / "src.tar"
    made = subprocess.run(
        [BAQUP, "archive", str(src), "-o", str(archive)],
        capture_output=True,
        env=cli_env(),
        timeout=60,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    subprocess.run(["zstd", "-q", "-19", str(archive)], check=True, timeout=60)
    result = baqup_extract(tmp_path / "src.tar.zst", world.dest)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["dest"] == str(world.dest)
    assert tree_state(world.dest, with_inodes=False) == tree_state(src, with_inodes=False)


# --- stdin ------------------------------------------------------------------------------------


def test_a_valid_archive_is_read_from_stdin(world: World, tmp_path: Path) -> None:
    data = compress(tar_bytes([OK, M("d", "dir", mode=0o755), M("d/f", data=b"x" * 5000)]), "lz4")
    result = baqup_extract("-", world.dest, stdin=data)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["archive"] == "-"
    assert (world.dest / "d" / "f").read_bytes() == b"x" * 5000
    assert (world.dest / "ok.txt").read_bytes() == OK.data


@pytest.mark.parametrize("case", ["dotdot", "symlink-up-then-file", "char-device"])
def test_a_hostile_archive_on_stdin_is_refused_and_its_spool_removed(
    world: World, tmp_path: Path, case: str
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    data = compress(tar_bytes(hostile_cases(world)[case]), "gzip")
    result = baqup_extract("-", world.dest, stdin=data, env=cli_env(TMPDIR=str(spool)))
    assert_refused_by_cli(result)
    assert_untouched(world)
    assert os.listdir(spool) == [], "the stdin spool file was left behind"


# --- under baqup-run: the event reaches Redis -------------------------------------------------


def test_under_baqup_run_a_hostile_archive_is_a_security_violation_event_and_exit_65(
    world: World,
    tmp_path: Path,
    job_env: dict[str, str],
    redis_server: RedisServer,
    redis_client: redis.Redis,
) -> None:
    archive = write_archive(tmp_path / "evil.tar", hostile_cases(world)["symlink-up-then-file"])
    env = redis_env(job_env, redis_server)
    job = start_job(["--", BAQUP, "extract", str(archive), str(world.dest)], env)
    code = job.wait(60)
    assert code == 65, job.stderr()[-3000:]
    p, job_id = prefix(env), env["BAQUP_JOB_ID"]
    events = read_stream(redis_client, f"{p}events:{job_id}")
    violations = [e for e in events if e.get("code") == "SECURITY_VIOLATION"]
    assert violations, f"no SECURITY_VIOLATION event in {events}"
    assert violations[0]["severity"] == "error"
    assert str(archive) in violations[0]["sample_paths"]
    status = read_hash(redis_client, f"{p}status:{job_id}")
    assert status["status"] == "failed"
    assert status["exit_code"] == 65
    assert status["warnings_summary"].get("SECURITY_VIOLATION") == 1
    assert not (job_dir(env) / "manifest.json").exists()
    assert_untouched(world)
