"""Safe tar extraction (spec section 7, "Zip Slip"): validate everything, then extract.

`extract(archive, dest)` reads the archive twice. The first pass checks every
member with the pure `check_member` and refuses the whole archive on the first
violation, before a byte lands: absolute names, `..`, names through a symlink of
the archive, symlinks or hard links that leave DEST, device nodes and FIFOs, and
pathological archives (over 99% empty files). The second pass writes each member
itself (no `extractall`), creating files with O_EXCL|O_NOFOLLOW under parents
re-checked against DEST, with setuid, setgid and sticky bits stripped. Plain, gzip,
zstd and lz4 archives are read as streams, never whole into memory.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .compression import decompressor
from .errors import DataError, SecurityViolation

MAGIC = {b"\x28\xb5\x2f\xfd": "zstd", b"\x1f\x8b": "gzip", b"\x04\x22\x4d\x18": "lz4"}
ANOMALY_MIN_MEMBERS = 1000
ANOMALY_EMPTY_RATIO = 0.99
SPECIAL_BITS = 0o7000


@dataclass
class Report:
    members: int = 0
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    bytes: int = 0
    empty_files: int = 0
    stripped_modes: int = 0


def clean_name(name: str) -> str:
    """A member name as a normalised relative POSIX path, or SecurityViolation."""
    if not name or "\0" in name:
        raise SecurityViolation(f"invalid member name {name!r}")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise SecurityViolation(f"absolute member name {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise SecurityViolation(f"member name {name!r} contains '..'")
    return "/".join(parts)


def check_member(member: tarfile.TarInfo, symlinks: set[str]) -> str:
    """Validate one member against those seen before it; its clean name.

    `symlinks` holds the clean names of the archive's symlinks so far; a member
    whose path goes through one of them is refused (it could land anywhere).
    """
    name = clean_name(member.name)
    if not name:
        return name  # the archive's "." entry
    prefix = ""
    for part in name.split("/")[:-1]:
        prefix = f"{prefix}/{part}" if prefix else part
        if prefix in symlinks:
            raise SecurityViolation(f"member {member.name!r} goes through the symlink {prefix!r}")
    if member.ischr() or member.isblk():
        raise SecurityViolation(f"member {member.name!r} is a device node")
    if member.isfifo():
        raise SecurityViolation(f"member {member.name!r} is a FIFO")
    if member.issym():
        target = member.linkname
        if not target or target.startswith("/"):
            raise SecurityViolation(f"symlink {member.name!r} points to {target!r}, outside DEST")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
        if resolved == ".." or resolved.startswith("../"):
            raise SecurityViolation(f"symlink {member.name!r} points to {target!r}, outside DEST")
        symlinks.add(name)
    elif member.islnk():
        try:
            target = clean_name(member.linkname)
        except SecurityViolation:
            raise SecurityViolation(
                f"hard link {member.name!r} points to {member.linkname!r}, outside DEST"
            ) from None
        if any(target == s or target.startswith(s + "/") for s in symlinks):
            raise SecurityViolation(f"hard link {member.name!r} goes through a symlink")
    elif not (member.isreg() or member.isdir()):
        raise SecurityViolation(f"member {member.name!r} has an unsupported type")
    return name


def detect(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(4)
    for magic, algorithm in MAGIC.items():
        if head.startswith(magic):
            return algorithm
    return "none"


class _Decoded:
    """A read-only stream of a decompressed file, for tarfile's stream mode."""

    def __init__(self, raw: IO[bytes], algorithm: str) -> None:
        self.raw = raw
        self.decoder = decompressor(algorithm)
        self.buffer = bytearray()
        self.eof = False

    def read(self, size: int = -1) -> bytes:
        while not self.eof and (size < 0 or len(self.buffer) < size):
            chunk = self.raw.read(1024 * 1024)
            if not chunk:
                self.eof = True
                self.buffer += self.decoder.flush()
                break
            self.buffer += self.decoder.decompress(chunk)
        if size < 0:
            size = len(self.buffer)
        out = bytes(self.buffer[:size])
        del self.buffer[:size]
        return out


@contextmanager
def open_archive(path: Path, compression: str = "auto") -> Iterator[tarfile.TarFile]:
    algorithm = detect(path) if compression == "auto" else compression
    with open(path, "rb") as raw:
        stream = _Decoded(raw, algorithm)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as archive:  # type: ignore[call-overload]
                yield archive
        except tarfile.TarError as exc:
            raise DataError(f"{path}: not a readable tar archive ({exc})") from None


def _inside(dest_real: str, path: str) -> bool:
    real = os.path.realpath(path)
    return real == dest_real or real.startswith(dest_real + os.sep)


def validate(path: Path, compression: str = "auto") -> Report:
    """The first pass: every member checked; raises on the first violation."""
    report = Report()
    symlinks: set[str] = set()
    with open_archive(path, compression) as archive:
        for member in archive:
            check_member(member, symlinks)
            report.members += 1
            if member.isreg():
                report.files += 1
                report.bytes += member.size
                report.empty_files += member.size == 0
    if (
        report.files >= ANOMALY_MIN_MEMBERS
        and report.empty_files >= ANOMALY_EMPTY_RATIO * report.files
    ):
        raise DataError(
            f"{report.empty_files} of {report.files} files are empty: refusing a pathological "
            "archive",
            code="ANOMALY_DETECTED",
        )
    return report


def extract(archive_path: Path, dest: Path, *, compression: str = "auto") -> Report:
    """Validate the whole archive, then extract it into `dest` (created if needed)."""
    checked = validate(archive_path, compression)
    dest.mkdir(parents=True, exist_ok=True)
    dest_real = os.path.realpath(dest)
    report = Report(members=checked.members, empty_files=checked.empty_files)
    symlinks: set[str] = set()
    directories: list[tuple[str, int, float]] = []
    with open_archive(archive_path, compression) as archive:
        for member in archive:
            name = check_member(member, symlinks)
            if not name:
                continue
            target = os.path.join(dest_real, name)
            parent = os.path.dirname(target)
            os.makedirs(parent, exist_ok=True)
            if not _inside(dest_real, parent):
                raise SecurityViolation(f"member {member.name!r} would land outside DEST")
            mode = member.mode & 0o7777
            if mode & SPECIAL_BITS:
                report.stripped_modes += 1
            mode &= ~SPECIAL_BITS
            if member.isdir():
                if os.path.islink(target):
                    raise SecurityViolation(f"directory {member.name!r} is a symlink in DEST")
                os.makedirs(target, exist_ok=True)
                os.chmod(target, mode | 0o700)
                directories.append((target, mode, member.mtime))
                report.directories += 1
                continue
            if member.issym():
                _replace(target)
                os.symlink(member.linkname, target)
                report.symlinks += 1
            elif member.islnk():
                source = os.path.join(dest_real, clean_name(member.linkname))
                if not _inside(dest_real, source):
                    raise SecurityViolation(f"hard link {member.name!r} leaves DEST")
                _replace(target)
                os.link(source, target, follow_symlinks=False)
                report.hardlinks += 1
            else:
                _write_file(archive, member, target, mode)
                report.files += 1
                report.bytes += member.size
            if not member.issym():
                os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)
    for target, mode, mtime in reversed(directories):  # after their contents are written
        os.chmod(target, mode)
        os.utime(target, (mtime, mtime), follow_symlinks=False)
    return report


def _replace(target: str) -> None:
    if os.path.lexists(target) and not os.path.isdir(target):
        os.unlink(target)


def _write_file(archive: tarfile.TarFile, member: tarfile.TarInfo, target: str, mode: int) -> None:
    _replace(target)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        source = archive.extractfile(member)
        if source is not None:
            while chunk := source.read(1024 * 1024):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
