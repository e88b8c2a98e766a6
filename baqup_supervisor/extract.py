"""Safe tar extraction (spec section 7, "Zip Slip"): validate everything, then extract.

`extract(archive, dest)` reads the archive twice from one open file (stdin is first
spooled to a private, unnamed temp file by `spooled`), so a name swapped meanwhile
changes nothing. The first pass checks every member with the pure `check_member` and
refuses the whole archive on the first violation, before a byte lands: absolute
names, `..`, names through a symlink of the archive, symlinks or hard links that leave
DEST, device nodes and FIFOs, names longer than DEST's filesystem allows (NAME_MAX,
PATH_MAX), huge extended headers, corrupt or cut tar headers, and pathological
archives (over 99% empty files). Any other name is an ordinary POSIX name (`a:b`,
backslashes, newlines, non-UTF-8 bytes). It records a digest of each member's header
and a CRC of its data; the second pass compares each member with that record before
writing it (and its data after), and stops on the first difference. It writes each
member itself (no `extractall`), creating files with O_EXCL|O_NOFOLLOW under parents
re-checked against DEST, with setuid, setgid and sticky bits stripped. Plain, gzip,
zstd and lz4 archives are decoded in bounded steps (compression.DecodedReader), never
whole into memory. An OSError (a full disk) is the contract's I/O error (74).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .compression import CHUNK, DecodedReader
from .errors import DataError, OutputError, SecurityViolation
from .staging import io_error

MAGIC = {b"\x28\xb5\x2f\xfd": "zstd", b"\x1f\x8b": "gzip", b"\x04\x22\x4d\x18": "lz4"}
PROGRESS_EVERY = 1.0  # seconds between progress messages while extracting
ANOMALY_MIN_MEMBERS = 1000
ANOMALY_EMPTY_RATIO = 0.99
SPECIAL_BITS = 0o7000
# tarfile's header errors, missing from the type stubs
_END_OF_ARCHIVE: type[Exception] = getattr(tarfile, "EOFHeaderError")  # noqa: B009
_CUT_HEADER: tuple[type[Exception], ...] = (
    getattr(tarfile, "EmptyHeaderError"),  # noqa: B009
    getattr(tarfile, "TruncatedHeaderError"),  # noqa: B009
)
DIGEST = 16  # bytes of blake2b per member header
# Member data gets a CRC, not a hash: validation never judges data, only headers (names,
# types, links, sizes), so the CRC is there to catch a concurrent change, cheaply.
CRC = 4
MAX_HEADER = 1024 * 1024  # a pax or GNU long-name header; PATH_MAX is 4096
HEADER_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


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
    if name.startswith("/"):  # `a:b` is an ordinary POSIX name, not a drive
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


def detect(handle: IO[bytes]) -> str:
    """The compression of an open archive, from its magic (the position is kept)."""
    position = handle.tell()
    head = handle.read(4)
    handle.seek(position)
    for magic, algorithm in MAGIC.items():
        if head.startswith(magic):
            return algorithm
    return "none"


class _BoundedInfo(tarfile.TarInfo):
    """tarfile reads a pax or GNU long-name header whole into memory: refuse a huge one
    before it is read (a 10 KB bomb could declare a 1 GiB header)."""

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in HEADER_TYPES and self.size > MAX_HEADER:
            raise DataError(
                f"an extended header of {self.size} bytes (over {MAX_HEADER}): refusing the "
                "archive",
                code="ANOMALY_DETECTED",
            )
        proceed = getattr(super(), "_proc_member")  # noqa: B009 - private in the stubs
        info: tarfile.TarInfo = proceed(archive)
        return info

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile, /) -> _BoundedInfo:
        """tarfile ends an archive silently at a corrupt, cut or missing header: here only
        the end-of-archive marker ends it; anything else is a DataError."""
        try:
            return super().fromtarfile(archive)
        except _END_OF_ARCHIVE:
            raise
        except tarfile.HeaderError as exc:
            raise DataError(
                f"the tar archive is corrupt or truncated at byte {archive.offset} ({exc})",
                code="TRUNCATED" if isinstance(exc, _CUT_HEADER) else "DATA_ERROR",
            ) from None


@contextmanager
def _members(handle: IO[bytes], compression: str) -> Iterator[tarfile.TarFile]:
    """The archive in `handle`, from its start, read as a stream in bounded steps."""
    handle.seek(0)
    algorithm = detect(handle) if compression == "auto" else compression
    stream = DecodedReader(handle, algorithm)
    try:
        with tarfile.open(  # type: ignore[call-overload]
            fileobj=stream, mode="r|", tarinfo=_BoundedInfo, bufsize=CHUNK
        ) as archive:
            yield archive
        while stream.read(CHUNK):  # the compressed stream must be whole and intact to its end
            pass
    except tarfile.TarError as exc:
        raise DataError(f"not a readable tar archive ({exc})") from None
    except OSError as exc:
        raise io_error(exc, "reading the archive") from None


@contextmanager
def _opened(archive: Path | IO[bytes]) -> Iterator[IO[bytes]]:
    """The archive as one open file, whatever happens to its name meanwhile."""
    if not isinstance(archive, Path):
        yield archive
        return
    try:
        handle = open(archive, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise io_error(exc, f"opening {archive}") from None
    with handle:
        yield handle


@contextmanager
def spooled(source: IO[bytes], directory: str | None = None) -> Iterator[IO[bytes]]:
    """A private copy of a stream (stdin): an unnamed temp file nobody else can open or
    swap, so both passes read the same bytes. Removed when closed, whatever happens."""
    try:
        spool = tempfile.TemporaryFile(dir=directory, prefix=".baqup-extract-")  # noqa: SIM115
        with spool:
            while chunk := source.read(1024 * 1024):
                spool.write(chunk)
            spool.flush()
            spool.seek(0)
            yield spool
    except OSError as exc:
        raise io_error(exc, "spooling the archive from stdin") from None


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


@dataclass
class Validated:
    """What the first pass saw: the report and, per member, a digest of its header and
    one of its data, for the write pass to compare against."""

    report: Report
    members: bytearray = field(default_factory=bytearray)

    def record(self, header: bytes, data: bytes) -> None:
        self.members += header + data

    def expected(self, index: int) -> tuple[bytes, bytes]:
        start = index * (DIGEST + CRC)
        if start >= len(self.members):
            return b"", b""
        return (
            bytes(self.members[start : start + DIGEST]),
            bytes(self.members[start + DIGEST : start + DIGEST + CRC]),
        )

    @property
    def count(self) -> int:
        return len(self.members) // (DIGEST + CRC)


def _header_digest(member: tarfile.TarInfo) -> bytes:
    fields = (member.name, member.type.decode("latin-1"), member.linkname, member.size)
    text = "\0".join(str(f) for f in (*fields, member.mode, int(member.mtime)))
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=DIGEST).digest()


def _data_digest(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    crc = 0
    if member.isreg():
        source = archive.extractfile(member)
        if source is not None:
            while chunk := source.read(CHUNK):
                crc = zlib.crc32(chunk, crc)
    return crc.to_bytes(CRC, "big")


def validate(
    archive: Path | IO[bytes], compression: str = "auto", dest: Path | None = None
) -> Validated:
    """The first pass: every member checked, and the archive as a whole; raises on the
    first violation, before anything is written."""
    report = Report()
    seen = Validated(report)
    index = ArchiveIndex()
    limits = NameLimits.of(dest) if dest is not None else None
    dest_real = os.path.realpath(dest) if dest is not None and dest.exists() else None
    checked: set[str] = set()
    with _opened(archive) as handle, _members(handle, compression) as tar:
        for member in tar:
            name = index.add(member)
            if limits is not None and name:
                limits.check(name, member.linkname if member.issym() else None)
            if dest_real is not None and name:
                _check_dest(dest_real, name, member.isdir(), checked)
            seen.record(_header_digest(member), _data_digest(tar, member))
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
    return seen


class NameLimits:
    """What the filesystem of DEST accepts: NAME_MAX bytes per component, PATH_MAX
    bytes for the whole path (with DEST) and for a symlink's target."""

    def __init__(self, dest_real: str, name_max: int, path_max: int) -> None:
        self.prefix = len(os.fsencode(dest_real)) + 1
        self.name_max = name_max
        self.path_max = path_max

    @classmethod
    def of(cls, dest: Path) -> NameLimits:
        real = os.path.realpath(dest)
        probe = real
        while not os.path.isdir(probe):  # DEST may not exist yet: ask its nearest ancestor
            probe = os.path.dirname(probe)
        try:
            return cls(real, os.pathconf(probe, "PC_NAME_MAX"), os.pathconf(probe, "PC_PATH_MAX"))
        except (OSError, ValueError):
            return cls(real, 255, 4096)

    def check(self, name: str, link_target: str | None) -> None:
        for part in name.split("/"):
            size = len(os.fsencode(part))
            if size > self.name_max:
                raise DataError(
                    f"member {_shown(name)}: the name {_shown(part)} is {size} bytes, over the "
                    f"{self.name_max} this filesystem allows (NAME_MAX); nothing was written",
                    code="NAME_TOO_LONG",
                )
        size = self.prefix + len(os.fsencode(name))
        if size >= self.path_max:
            raise DataError(
                f"member {_shown(name)}: its path in DEST is {size} bytes, over the "
                f"{self.path_max - 1} this system allows (PATH_MAX); nothing was written",
                code="NAME_TOO_LONG",
            )
        if link_target is not None and len(os.fsencode(link_target)) >= self.path_max:
            raise DataError(
                f"symlink {_shown(name)}: its target is over PATH_MAX; nothing was written",
                code="NAME_TOO_LONG",
            )


def _shown(name: str) -> str:
    return repr(name if len(name) <= 80 else f"{name[:60]}...{name[-15:]}")


def extract(
    archive: Path | IO[bytes],
    dest: Path,
    *,
    compression: str = "auto",
    emit: Callable[[dict[str, Any]], None] | None = None,
) -> Report:
    """Validate the whole archive, then extract the same bytes into `dest` (created if
    needed): one open file for both passes, and the write pass compares each member with
    what validation saw before writing it. Progress (at most once a second) to `emit`.

    Modes and mtimes are always restored; ownership (uid and gid) when run as root."""
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"DEST {dest} exists and is not a directory")
    with _opened(archive) as handle:
        seen = validate(handle, compression, dest)
        try:
            dest.mkdir(parents=True, exist_ok=True)
            return _write(handle, compression, dest, seen, emit)
        except OSError as exc:
            raise io_error(exc, f"extracting into {dest}") from None


def _changed(what: str) -> DataError:
    return DataError(
        f"the archive changed while it was extracted ({what}); nothing more was written",
        code="ARCHIVE_CHANGED",
    )


class _Progress:
    """Extraction progress for baqup-run: the total is known from the validation pass."""

    def __init__(self, emit: Callable[[dict[str, Any]], None] | None, total: int) -> None:
        self.emit = emit
        self.total = total
        self.started = self.last = time.monotonic()

    def update(self, report: Report, name: str, *, final: bool = False) -> None:
        now = time.monotonic()
        if self.emit is None or (not final and now - self.last < PROGRESS_EVERY):
            return
        self.last = now
        message: dict[str, Any] = {
            "type": "progress",
            "files_processed": report.files,
            "bytes_processed": report.bytes,
            "current_file": name,
        }
        if final:
            message["percent_complete"] = 100
        elif report.bytes and self.total:
            rate = report.bytes / max(now - self.started, 1e-3)
            message["estimated_remaining_seconds"] = round(
                max(self.total - report.bytes, 0) / rate, 1
            )
        self.emit(message)


def _write(
    handle: IO[bytes],
    compression: str,
    dest: Path,
    seen: Validated,
    emit: Callable[[dict[str, Any]], None] | None = None,
) -> Report:
    dest_real = os.path.realpath(dest)
    owner = os.geteuid() == 0  # only root can give a file away; anyone else keeps it
    progress = _Progress(emit, seen.report.bytes)
    report = Report(members=seen.report.members, empty_files=seen.report.empty_files)
    symlinks: set[str] = set()
    directories: list[tuple[str, int, float]] = []
    count = 0
    with _members(handle, compression) as archive:
        for member in archive:
            header, data = seen.expected(count)
            count += 1
            if _header_digest(member) != header:
                raise _changed(f"member {count} is not the one validated: {member.name!r}")
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
                if owner:
                    os.chown(target, member.uid, member.gid, follow_symlinks=False)
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
                if _write_file(archive, member, target, mode, owner) != data:
                    os.unlink(target)
                    raise _changed(f"the data of {member.name!r} is not the data validated")
                report.files += 1
                report.bytes += member.size
            if owner and not member.isreg():
                os.chown(target, member.uid, member.gid, follow_symlinks=False)
            if not member.issym():
                os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)
            progress.update(report, name)
    if count != seen.count:
        raise _changed(f"{count} members, {seen.count} validated")
    for target, mode, mtime in reversed(directories):  # after their contents are written
        os.chmod(target, mode)
        os.utime(target, (mtime, mtime), follow_symlinks=False)
    progress.update(report, "", final=True)
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


def _write_file(
    archive: tarfile.TarFile, member: tarfile.TarInfo, target: str, mode: int, owner: bool
) -> bytes:
    """Write a regular member (given to its owner first when `owner`, so the mode set
    after is the one kept); the CRC of the data written."""
    _replace(target)
    crc = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        source = archive.extractfile(member)
        if source is not None:
            while chunk := source.read(CHUNK):
                crc = zlib.crc32(chunk, crc)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        if owner:
            os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return crc.to_bytes(CRC, "big")
