"""What `baqup archive` and `baqup extract` guarantee, with the real commands on real files.

- Names: every name POSIX allows (any bytes but '/' and NUL: non-UTF-8, newlines,
  backslashes, `a:b`, a leading '-', long paths) round-trips through `baqup archive`
  then `baqup extract`, byte for byte (hypothesis, real files).
- Same bytes: the archive is swapped by rename, or rewritten in place, by a concurrent
  process while it is being validated; the write pass writes what was validated, or
  refuses (65) before writing the member that differs (a member whose data changed is
  removed again).
- Memory: a bomb (up to 1 GiB of zeros in a few KB of zstd, gzip or lz4) is
  extracted, and `baqup decrypt`ed, with a peak RSS under 100 MB, measured on the real
  process (getrusage of a parent that only waits for it).
- Limits: a member name over NAME_MAX or PATH_MAX is refused (65) before anything is
  written; a full disk (a real 1 MiB tmpfs) is exit 74, never 70.
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import lz4.frame
import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from baqup_supervisor.compression import ChunkReader, DecodedReader, ZstdFrames
from baqup_supervisor.errors import DataError
from tests.jobs import wait_for

BIN = Path(sys.executable).parent
BAQUP = str(BIN / "baqup")
PEAK_LIMIT_KIB = 100 * 1000  # 100 MB
GiB = 1024**3
MiB = 1024**2

_MEASURE = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as out:
    out.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def run_measured(
    argv: list[str], tmp_path: Path, *, env: dict[str, str] | None = None, stdin: int | None = None
) -> tuple[subprocess.CompletedProcess[bytes], int]:
    """Run argv under a parent that only waits for it; the result and the peak RSS (KiB)
    of argv's process tree (Linux folds reaped descendants into ru_maxrss)."""
    report = tmp_path / f"peak-{time.monotonic_ns()}"
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(report), *argv],
        env=env,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=110,
        check=False,
    )
    return result, int(report.read_text())


def baqup(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [BAQUP, *args], input=stdin, capture_output=True, timeout=100, check=False
    )


# --- names: every POSIX name round-trips ---------------------------------------------------

NAME_BYTES = (
    st.binary(min_size=1, max_size=40)
    .map(lambda b: b.replace(b"/", b"_"))
    .map(lambda b: b.replace(b"\0", b"-"))
)
SPECIAL = st.sampled_from(
    [
        b"a:b",
        b"C:x",
        b"-rf",
        b"--",
        b"a\nb",
        b"\n",
        b"back\\slash",
        b"\\",
        b"\xff\xfe",
        b"caf\xe9",
        b" lead",
        b"trail ",
        b"*?[",
        b"x" * 255,
        b".hidden",
        b"...",
        b"\xc3\xa9t\xc3\xa9",
    ]
)
COMPONENT = st.one_of(SPECIAL, NAME_BYTES).filter(lambda b: b not in (b".", b".."))
TREE = st.lists(
    st.tuples(st.lists(COMPONENT, min_size=1, max_size=3), st.binary(max_size=300)),
    min_size=1,
    max_size=8,
)


def build(root: Path, tree: list[tuple[list[bytes], bytes]]) -> None:
    base = os.fsencode(root)
    for parts, data in tree:
        path = base
        for index, part in enumerate(parts):
            path = path + b"/" + part
            last = index == len(parts) - 1
            if os.path.lexists(path):
                if not os.path.isdir(path) or last:
                    break  # taken by an earlier file: keep the tree consistent
                continue
            if last:
                with open(path, "wb") as out:
                    out.write(data)
            else:
                os.mkdir(path)


def contents(root: Path) -> dict[bytes, bytes | None]:
    """Every path under root, as bytes, with its data (None for a directory)."""
    base = os.fsencode(root)
    found: dict[bytes, bytes | None] = {}
    for current, dirs, files in os.walk(base):
        rel = os.path.relpath(current, base)
        for name in dirs:
            found[os.path.normpath(os.path.join(rel, name))] = None
        for name in files:
            with open(os.path.join(current, name), "rb") as handle:
                found[os.path.normpath(os.path.join(rel, name))] = handle.read()
    return found


def round_trip(tmp: Path, tree: list[tuple[list[bytes], bytes]]) -> None:
    source, archive, dest = tmp / "src", tmp / "a.tar", tmp / "dest"
    source.mkdir()
    build(source, tree)
    made = baqup("archive", str(source), "-o", str(archive))
    assert made.returncode == 0, made.stderr.decode(errors="replace")
    done = baqup("extract", str(archive), str(dest))
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert contents(dest) == contents(source)


DEEP = [([b"d" * 200] * 15 + [b"leaf"], b"deep")]  # 3000+ bytes of path, under PATH_MAX


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=TREE)
@example(tree=[([b"a:b"], b"colon")])
@example(tree=[([b"\xff\xfe", b"-x\n\\"], b"bytes"), ([b"C:", b"y"], b"")])
@example(tree=DEEP)
def test_every_posix_name_round_trips_through_archive_and_extract(
    tmp_path_factory: pytest.TempPathFactory, tree: list[tuple[list[bytes], bytes]]
) -> None:
    round_trip(tmp_path_factory.mktemp("names"), tree)


# --- limits: names too long, a full disk ---------------------------------------------------


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "limit"),
    [("d/" + "x" * 300 + "/f", "NAME_MAX"), ("/".join(["y" * 250] * 20), "PATH_MAX")],
    ids=["component-over-NAME_MAX", "path-over-PATH_MAX"],
)
def test_a_name_too_long_is_refused_before_anything_is_written(
    tmp_path: Path, name: str, limit: str
) -> None:
    archive = tmp_path / "long.tar"
    archive.write_bytes(tar_of([("first/ok.txt", b"ok"), (name, b"data")]))
    dest = tmp_path / "dest"
    result = baqup("extract", str(archive), str(dest))
    stderr = result.stderr.decode()
    assert result.returncode == 65, stderr
    assert limit in stderr, stderr
    assert "nothing was written" in stderr, stderr
    assert not dest.exists(), "directories were created before the refusal"


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs, unmounted at the end."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_extract_onto_a_full_disk_is_exit_74(tmp_path: Path, full_disk: Path) -> None:
    archive = tmp_path / "big.tar"
    archive.write_bytes(tar_of([("a.txt", b"a"), ("big.bin", os.urandom(3 * MiB))]))
    result = baqup("extract", str(archive), str(full_disk / "dest"))
    stderr = result.stderr.decode()
    assert result.returncode == 74, stderr
    assert "No space left" in stderr, stderr
    assert "Traceback" not in stderr, stderr


def test_archive_and_decrypt_onto_a_full_disk_are_exit_74(tmp_path: Path, full_disk: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "big.bin").write_bytes(os.urandom(3 * MiB))
    made = baqup("archive", str(source), "-o", str(full_disk / "a.tar"))
    assert made.returncode == 74, made.stderr.decode()
    assert os.listdir(full_disk) == [], "a partial archive was left behind"
    key = os.urandom(32)
    encrypted = tmp_path / "x.enc"
    encrypted.write_bytes(encrypt(os.urandom(3 * MiB), key))
    result = subprocess.run(
        [BAQUP, "decrypt", str(encrypted), "-o", str(full_disk / "x")],
        env={**os.environ, "BAQUP_SECRET_ENCRYPTION_KEY": key.hex()},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 74, result.stderr.decode()
    assert os.listdir(full_disk) == [], "a partial plaintext was left behind"


def encrypt(data: bytes, key: bytes) -> bytes:
    from baqup_supervisor.encryption import StreamEncryptor

    encryptor = StreamEncryptor(key, "aes-256-gcm")
    return encryptor.update(data) + encryptor.finalize()


# --- the same bytes: an archive changed during validation ----------------------------------

BIG = 160 * MiB  # long enough to validate that the swap lands inside the validation


def archive_fd(pid: int, archive: Path) -> int | None:
    """The descriptor under which process `pid` has `archive` open, if it has."""
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == str(archive):
                    return int(fd)
            except OSError:
                continue
    except OSError:
        return None
    return None


def position(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as info:
        return int(info.readline().split()[1])


def big_archive(path: Path, second: str) -> None:
    """A tar whose first member is BIG zeros, streamed to disk (never in memory)."""
    with open(path, "wb") as out, tarfile.open(fileobj=out, mode="w|") as tar:
        info = tarfile.TarInfo("big.bin")
        info.size = BIG
        tar.addfile(info, ZeroReader(BIG))
        info = tarfile.TarInfo(second)
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))


class ZeroReader:
    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        self.left -= size
        return bytes(size)


def test_an_archive_swapped_during_validation_is_not_what_gets_written(tmp_path: Path) -> None:
    archive, evil, dest = tmp_path / "a.tar", tmp_path / "evil.tar", tmp_path / "dest"
    big_archive(archive, "good.txt")
    evil.write_bytes(tar_of([("big.bin", b"small"), ("evil.txt", b"evil!")]))
    process = subprocess.Popen(
        [BAQUP, "extract", str(archive), str(dest)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: archive_fd(process.pid, archive), timeout=30, interval=0.001)
        os.replace(evil, archive)
        assert not dest.exists(), "the race was missed: the write pass had started"
        _, stderr = process.communicate(timeout=100)
    finally:
        process.kill() if process.poll() is None else None
    assert process.returncode == 0, stderr.decode()
    assert (dest / "good.txt").read_bytes() == b"hello"
    assert (dest / "big.bin").stat().st_size == BIG
    assert not (dest / "evil.txt").exists()


def test_an_archive_rewritten_in_place_during_validation_is_refused_before_the_change(
    tmp_path: Path,
) -> None:
    archive, dest = tmp_path / "a.tar", tmp_path / "dest"
    big_archive(archive, "good.txt")
    renamed = tarfile.TarInfo("evil.bin")
    renamed.size = BIG
    header = renamed.tobuf(tarfile.USTAR_FORMAT)
    process = subprocess.Popen(
        [BAQUP, "extract", str(archive), str(dest)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        found = wait_for(lambda: archive_fd(process.pid, archive), timeout=30, interval=0.001)
        assert found is not None
        fd = found
        wait_for(lambda: position(process.pid, fd) > MiB, timeout=30, interval=0.001)
        with open(archive, "r+b") as handle:  # the first header, after validation read it
            handle.write(header)
        assert not dest.exists(), "the race was missed: the write pass had started"
        _, stderr = process.communicate(timeout=100)
    finally:
        process.kill() if process.poll() is None else None
    assert process.returncode == 65, stderr.decode()
    assert b"changed while it was extracted" in stderr, stderr.decode()
    assert not (dest / "evil.bin").exists()
    assert os.listdir(dest) == [], "a member was written after the archive changed"


def test_member_data_rewritten_in_place_during_validation_is_not_left_in_dest(
    tmp_path: Path,
) -> None:
    archive, dest = tmp_path / "a.tar", tmp_path / "dest"
    big_archive(archive, "good.txt")
    process = subprocess.Popen(
        [BAQUP, "extract", str(archive), str(dest)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        found = wait_for(lambda: archive_fd(process.pid, archive), timeout=30, interval=0.001)
        assert found is not None
        fd = found
        wait_for(lambda: position(process.pid, fd) > 2 * MiB, timeout=30, interval=0.001)
        with open(archive, "r+b") as handle:  # data validation has already read
            handle.seek(tarfile.BLOCKSIZE + MiB)
            handle.write(b"changed")
        assert not dest.exists(), "the race was missed: the write pass had started"
        _, stderr = process.communicate(timeout=100)
    finally:
        process.kill() if process.poll() is None else None
    assert process.returncode == 65, stderr.decode()
    assert b"is not the data validated" in stderr, stderr.decode()
    assert os.listdir(dest) == [], "the changed data was left in DEST"


# --- memory: bombs -------------------------------------------------------------------------


def zeros_tar_stream(size: int) -> Iterator[bytes]:
    info = tarfile.TarInfo("zeros.bin")
    info.size = size
    yield info.tobuf(tarfile.PAX_FORMAT)
    chunk = bytes(MiB)
    for _ in range(size // MiB):
        yield chunk
    yield bytes(2 * tarfile.BLOCKSIZE)  # the end-of-archive marker


def compressed(chunks: Iterator[bytes], algorithm: str) -> bytes:
    """zstd as one frame; gzip and lz4 as one member (frame) per chunk, concatenated
    (the same chunk compressed once), which decodes as one stream, quickly built."""
    if algorithm == "zstd":
        out = io.BytesIO()
        zobj = zstandard.ZstdCompressor(level=3).compressobj()
        for chunk in chunks:
            out.write(zobj.compress(chunk))
        out.write(zobj.flush())
        return out.getvalue()
    one = {"gzip": gzip.compress, "lz4": lz4.frame.compress}[algorithm]
    cache: dict[bytes, bytes] = {}
    return b"".join(cache.setdefault(chunk, one(chunk)) for chunk in chunks)


@pytest.mark.parametrize(
    ("algorithm", "size"), [("zstd", 512 * MiB), ("gzip", 200 * MiB), ("lz4", 200 * MiB)]
)
def test_a_decompression_bomb_is_extracted_in_bounded_memory(
    tmp_path: Path, algorithm: str, size: int
) -> None:
    bomb = tmp_path / f"bomb.tar.{algorithm}"
    bomb.write_bytes(compressed(zeros_tar_stream(size), algorithm))
    assert bomb.stat().st_size < size // 200, "not a bomb"
    dest = tmp_path / "dest"
    result, peak = run_measured([BAQUP, "extract", str(bomb), str(dest)], tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert (dest / "zeros.bin").stat().st_size == size
    assert peak < PEAK_LIMIT_KIB, f"peak RSS {peak} KiB for a {bomb.stat().st_size} byte bomb"


def test_a_zstd_bomb_is_decrypted_and_decompressed_in_bounded_memory(tmp_path: Path) -> None:
    key = os.urandom(32)
    bomb = compressed(iter([bytes(MiB)] * 1024), "zstd")
    encrypted = tmp_path / "db.sql.zst.enc"
    encrypted.write_bytes(encrypt(bomb, key))
    env = {**os.environ, "BAQUP_SECRET_ENCRYPTION_KEY": key.hex()}
    count = tmp_path / "count"
    command = f"set -o pipefail; {BAQUP} decrypt {encrypted} --decompress auto | wc -c > {count}"
    result, peak = run_measured(["bash", "-c", command], tmp_path, env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert int(count.read_text()) == GiB
    assert peak < PEAK_LIMIT_KIB, f"peak RSS {peak} KiB"


def test_a_zstd_frame_asking_for_a_huge_window_is_refused_with_a_clear_message(
    tmp_path: Path,
) -> None:
    params = zstandard.ZstdCompressionParameters.from_level(19, window_log=27)
    raw = tar_of([("f", os.urandom(64 * 1024) * 2)])
    archive = tmp_path / "wide.tar.zst"
    writer = zstandard.ZstdCompressor(compression_params=params).compressobj()
    archive.write_bytes(writer.compress(raw) + writer.flush())
    result = baqup("extract", str(archive), str(tmp_path / "dest"))
    assert result.returncode == 65, result.stderr.decode()
    assert b"MiB window" in result.stderr


# --- zstd truncation: the frame parser that the decoder lacks ------------------------------


@settings(max_examples=60, deadline=None)
@given(
    frames=st.lists(
        st.tuples(st.binary(max_size=3000), st.booleans(), st.booleans()), min_size=1, max_size=4
    ),
    skippable=st.booleans(),
    data=st.data(),
)
def test_zstd_frames_know_a_stream_cut_at_a_frame_boundary_from_a_truncated_one(
    frames: list[tuple[bytes, bool, bool]], skippable: bool, data: st.DataObject
) -> None:
    """zstandard's stream reader ends silently on a cut stream: ZstdFrames must tell."""
    pieces = [
        (zstandard.ZstdCompressor(write_checksum=check, write_content_size=size).compress(raw), raw)
        for raw, check, size in frames
    ]
    if skippable:
        pieces.insert(1, (bytes.fromhex("502a4d18") + (3).to_bytes(4, "little") + b"abc", b""))
    stream = b"".join(stored for stored, _ in pieces)
    ends, offset = [0], 0
    for stored, _ in pieces:
        offset += len(stored)
        ends.append(offset)
    cut = data.draw(st.integers(0, len(stream)))
    split = data.draw(st.integers(0, cut))
    parser = ZstdFrames()
    parser.feed(stream[:split])
    parser.feed(stream[split:cut])
    assert parser.at_boundary == (cut in ends)
    reader = DecodedReader(ChunkReader([stream[:split], stream[split:cut]]), "zstd")
    if cut in ends:
        expected = b"".join(
            raw for (_, raw), end in zip(pieces, ends[1:], strict=True) if end <= cut
        )
        assert b"".join(iter(lambda: reader.read(4096), b"")) == expected
    else:
        with pytest.raises(DataError, match=r"truncated|corrupt"):
            drain(reader)


def drain(reader: DecodedReader) -> None:
    while reader.read(4096):
        pass
