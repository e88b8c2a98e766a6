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
import stat
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
        _resolve_link(name, member.linkname, symlinks)
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


def _resolve_link(name: str, target: str, symlinks: set[str]) -> str:
    """A symlink's target, resolved lexically from its directory; SecurityViolation if it
    leaves DEST or passes through another symlink of the archive (a chain can land
    anywhere: `x -> .` then `y -> x/..`)."""
    if not target or target.startswith("/") or "\0" in target:
        raise SecurityViolation(f"symlink {name!r} points to {target!r}, outside DEST")
    stack = name.split("/")[:-1]
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                raise SecurityViolation(f"symlink {name!r} points to {target!r}, outside DEST")
            stack.pop()
            continue
        stack.append(part)
        if "/".join(stack) in symlinks:
            raise SecurityViolation(
                f"symlink {name!r} points through the symlink {'/'.join(stack)!r}"
            )
    return "/".join(stack)


class ArchiveIndex:
    """What the validation pass learns about the archive as a whole.

    Refuses what a member-by-member check cannot see: a name used for two kinds of
    member (a file and a directory, a symlink and a file...), a member under a name
    that is not a directory, a hard link to anything but an earlier regular file,
    and a symlink whose target goes through a symlink declared later.
    """

    def __init__(self) -> None:
        self.kinds: dict[str, str] = {}
        self.implied_dirs: set[str] = set()  # every parent path of every member
        self.links: list[tuple[str, str]] = []
        self.symlinks: set[str] = set()

    def add(self, member: tarfile.TarInfo) -> str:
        name = check_member(member, self.symlinks)
        if not name:
            return name
        kind = (
            "dir"
            if member.isdir()
            else "symlink"
            if member.issym()
            else "hardlink"
            if member.islnk()
            else "file"
        )
        previous = self.kinds.get(name)
        if previous is not None and not (previous == kind and kind in ("file", "dir")):
            raise SecurityViolation(f"member {name!r} appears as a {previous} and a {kind}")
        for parent in _parents(name):
            parent_kind = self.kinds.get(parent)
            if parent_kind not in (None, "dir"):
                raise SecurityViolation(f"member {name!r} lies under the {parent_kind} {parent!r}")
            self.implied_dirs.add(parent)
        if kind == "hardlink":
            target = clean_name(member.linkname)
            if self.kinds.get(target) != "file":
                raise SecurityViolation(
                    f"hard link {name!r} points to {member.linkname!r}, "
                    "which is not an earlier regular file of the archive"
                )
        if kind != "dir" and name in self.implied_dirs:
            raise SecurityViolation(f"member {name!r} would replace a directory of the archive")
        if kind == "symlink":
            self.links.append((name, member.linkname))
        self.kinds[name] = kind
        return name

    def finish(self) -> None:
        for name, target in self.links:
            _resolve_link(name, target, self.symlinks - {name})


def _parents(name: str) -> Iterator[str]:
    parts = name.split("/")
    for index in range(1, len(parts)):
        yield "/".join(parts[:index])


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
            try:
                self.buffer += self.decoder.decompress(chunk) if chunk else self.decoder.flush()
            except Exception as exc:  # noqa: BLE001 - any codec error is corrupt data
                raise DataError(
                    f"the compressed archive is corrupt ({type(exc).__name__}: {exc})"
                ) from None
            if not chunk:
                self.eof = True
                if not self.decoder.finished:
                    raise DataError("the compressed archive is truncated", code="TRUNCATED")
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


def _check_dest(dest_real: str, name: str, is_dir: bool, checked: set[str]) -> None:
    """What is already in DEST must not redirect a member: no symlink on its way."""
    parts = name.split("/")
    path = dest_real
    for index, part in enumerate(parts):
        path = os.path.join(path, part)
        last = index == len(parts) - 1
        if not last and path in checked:
            continue
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return  # nothing there yet, nor below
        if stat.S_ISLNK(info.st_mode) and (not last or is_dir):
            raise SecurityViolation(
                f"member {name!r} would go through the symlink "
                f"{os.path.relpath(path, dest_real)!r} already in DEST"
            )
        if last and not is_dir and stat.S_ISDIR(info.st_mode):
            raise SecurityViolation(f"member {name!r} would replace a directory in DEST")
        if not last:
            if not stat.S_ISDIR(info.st_mode):
                raise SecurityViolation(f"member {name!r} lies under a non-directory in DEST")
            checked.add(path)


def validate(path: Path, compression: str = "auto", dest: Path | None = None) -> Report:
    """The first pass: every member checked, and the archive as a whole; raises on the
    first violation, before anything is written."""
    report = Report()
    index = ArchiveIndex()
    dest_real = os.path.realpath(dest) if dest is not None and dest.exists() else None
    checked: set[str] = set()
    with open_archive(path, compression) as archive:
        for member in archive:
            name = index.add(member)
            if dest_real is not None and name:
                _check_dest(dest_real, name, member.isdir(), checked)
            report.members += 1
            if member.isreg():
                report.files += 1
                report.bytes += member.size
                report.empty_files += member.size == 0
    index.finish()
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
    checked = validate(archive_path, compression, dest)
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
            _make_parents(dest_real, name)
            mode = member.mode & 0o7777
            if mode & SPECIAL_BITS:
                report.stripped_modes += 1
            mode &= ~SPECIAL_BITS
            if member.isdir():
                _replace(target)
                if not os.path.isdir(target):
                    os.mkdir(target, 0o700)
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


def _make_parents(dest_real: str, name: str) -> None:
    """Create a member's parent directories one by one, never through a symlink."""
    path = dest_real
    for part in name.split("/")[:-1]:
        path = os.path.join(path, part)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            os.mkdir(path, 0o700)
            continue
        if not stat.S_ISDIR(info.st_mode):  # a symlink or a file: validation let none through
            raise SecurityViolation(f"member {name!r} would go through {part!r}, not a directory")


def _replace(target: str) -> None:
    """Remove what a member replaces: a file or a symlink itself (never what it points to)."""
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
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
