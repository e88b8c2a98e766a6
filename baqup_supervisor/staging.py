"""Staging: the job dir, its `.staging/` work dir, artifacts, and the atomic commit.

Owns spec section 4 and INTERFACE.md sections 5 and 10: creating the job and work dirs
on one filesystem and holding them (open descriptors, an exclusive lock on the job dir)
from INITIALIZING to the end; setting aside what an earlier attempt left
(`.attempts/{n}/`); deciding which files are artifacts (declared, or every regular file
in the work dir) and refusing reserved names, names that leave the work dir, symlinks
and hard links; checksumming; moving artifacts into the job dir with fsync; writing
`manifest.json` (valid against Appendix C) in `.staging/` and moving it last; writing
`.baqup-status.json`. A `manifest.json` is never visible in the job dir unless every
artifact it names is there, whole, with that checksum.

Which names a child may use is names.py's; every operation here is relative to the
directories baqup-run opened (dirfd.py): a work dir
or job dir the child swapped for a symlink, a planted symlink or hard link, is a
SecurityViolation before anything is moved, deleted or written. Never deletes anything
outside the work dir, nor anything at all unless asked to (`empty`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from . import jsonutil
from .checksum import estimate_seconds, hash_file
from .clock import utc_iso
from .dirfd import (
    Identity,
    closing_fd,
    identity,
    lstat_at,
    open_dir,
    open_parent,
    remove_contents,
    replace_atomic,
)
from .errors import (
    BaqupError,
    DataError,
    EmptyArtifact,
    OutputError,
    ResourceUnavailable,
    SecurityViolation,
    StorageIOError,
)
from .names import (
    ATTEMPTS,
    JOB_DIR_LEFTOVERS,
    MANIFEST,
    STATUS_FILE,
    WORK,
    ReservedName,
    check_encodable,
    check_reserved,
    compression_of,
    safe_relative,
)

__all__ = [  # with the names other modules have always read here
    "MANIFEST",
    "STATUS_FILE",
    "AlreadyCommitted",
    "Artifact",
    "Committed",
    "JobDirBusy",
    "ReservedName",
    "Staging",
    "compression_of",
    "io_error",
    "manifest_schema",
    "safe_relative",
    "validate_manifest",
]


class JobDirBusy(OutputError):
    """Another baqup-run holds this job dir (exit 73); this one touched nothing."""

    default_code = "JOB_DIR_BUSY"


class AlreadyCommitted(OutputError):
    """The job dir holds a committed manifest: a job id is used once (exit 73)."""

    default_code = "ALREADY_COMMITTED"


@cache
def manifest_schema() -> dict[str, Any]:
    text = resources.files("baqup_supervisor").joinpath("data/manifest-schema.json").read_text()
    loaded: dict[str, Any] = orjson.loads(text)
    return loaded


def validate_manifest(document: Mapping[str, Any]) -> list[str]:
    """Problems of a manifest against Appendix C (formats asserted); empty when valid."""
    from jsonschema import Draft202012Validator

    from .config import format_checker

    validator = Draft202012Validator(manifest_schema(), format_checker=format_checker())
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in validator.iter_errors(dict(document))
    ]


def io_error(exc: OSError, doing: str) -> BaqupError:
    """An OSError as the contract's error: ENOSPC and friends are I/O errors (74)."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{doing}: {reason}")
    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
        return ResourceUnavailable(f"{doing}: {reason}")
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return SecurityViolation(f"{doing}: {reason} (a symlink is never followed)")
    return StorageIOError(
        f"{doing}: {reason}",
        code="DISK_FULL" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "IO_ERROR",
    )


@dataclass(frozen=True)
class Artifact:
    """A file in the work dir to be committed."""

    name: str  # relative to the work dir, POSIX separators
    compression: str = "none"
    encrypted: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)
    checksum: str | None = None  # known already when it was hashed while being written
    size: int | None = None
    ident: Identity | None = None  # (device, inode) of the file baqup-run wrote, if it did


@dataclass(frozen=True)
class Committed:
    name: str
    path: Path
    size: int
    checksum: str
    algorithm: str
    compression: str
    encrypted: bool
    extra: Mapping[str, Any] = field(default_factory=dict)

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "filename": self.name,
            "size_bytes": self.size,
            "checksum": {"algorithm": self.algorithm, "value": self.checksum},
            "compression": self.compression,
            "encrypted": self.encrypted,
            **self.extra,
        }

    def status_entry(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "size_bytes": self.size,
            f"checksum_{self.algorithm}": self.checksum,
        }


@dataclass
class _Checked:
    """An artifact the commit checked: where it is, and which file it was (device and
    inode), so that each later step acts on that same file or refuses."""

    artifact: Artifact
    name: str
    parts: tuple[str, ...]  # the directories from the work dir down
    leaf: str
    ident: Identity
    size: int


class Staging:
    """One job's job dir and work dir, held by descriptor from `prepare` to `close`."""

    def __init__(self, job_dir: Path, work_dir: Path) -> None:
        self.job_dir = job_dir
        self.work_dir = work_dir
        self._job_fd: int | None = None
        self._work_fd: int | None = None
        self._ids: dict[str, Identity] = {}
        self._held: set[str] = set()  # reserved files a restore found in its job dir

    @property
    def work_fd(self) -> int:
        """The work dir's descriptor (capture writes through it)."""
        if self._work_fd is None:
            raise OutputError("the work dir is used before INITIALIZING prepared it")
        return self._work_fd

    def _fds(self) -> tuple[int, int]:
        if self._job_fd is None or self._work_fd is None:
            raise OutputError("the job dir is used before INITIALIZING prepared it")
        return self._job_fd, self._work_fd

    # --- INITIALIZING --------------------------------------------------------------

    def prepare(self, *, restore: bool = False, source: Path | None = None) -> None:
        """Create, open and lock the job dir; create its work dir on the same filesystem;
        set aside what an earlier attempt left.

        A snapshot-like job needs a job dir without a manifest. So does a restore reading
        its snapshot elsewhere (`source`, only ever read, so a read-only mount works): its
        own job dir is a fresh one. Only a restore whose snapshot the controller staged
        into its own job dir (`source` is the job dir, or None) holds a manifest there,
        and then nothing at the job dir's top is moved.
        """
        try:
            in_place = self._open(restore, source)
            self.set_aside(include_job_dir=not in_place)
        except OSError as exc:
            raise io_error(exc, f"preparing the job dir {self.job_dir}") from None

    def _reads_own_dir(self, job_fd: int, source: Path | None) -> bool:
        if source is None:
            return True
        try:
            return identity(os.stat(source)) == identity(os.fstat(job_fd))
        except OSError:
            return False  # the restore source's own check names the problem

    def _open(self, restore: bool, source: Path | None = None) -> bool:
        """Whether this is a restore reading the snapshot in its own job dir."""
        staging_dir = self.job_dir.parent
        try:
            # The staging dir is the operator's (a mount, usually): it must exist, and
            # its path may hold symlinks. It is never created, so a mistyped
            # BAQUP_STAGING_DIR fails the job instead of becoming where the backup lands.
            parent = os.open(staging_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise OutputError(
                f"BAQUP_STAGING_DIR {staging_dir} does not exist: baqup-run creates the job "
                "dir inside it, never the staging dir itself",
                code="STAGING_DIR_MISSING",
            ) from None
        except OSError as exc:
            raise OutputError(
                f"cannot open the staging dir {staging_dir}: {exc.strerror or exc}"
            ) from None
        with closing_fd(parent):
            job_fd = open_dir(
                self.job_dir.name, parent, what=f"the job dir {self.job_dir}", create=True
            )
        try:
            fcntl.flock(job_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(job_fd)
            raise JobDirBusy(
                f"the job dir {self.job_dir} is held by another baqup-run with the same "
                "BAQUP_JOB_ID; this one touched nothing"
            ) from None
        self._job_fd = job_fd
        restore = restore and self._reads_own_dir(job_fd, source)
        for name in (MANIFEST, STATUS_FILE):
            if lstat_at(name, job_fd) is None:
                continue
            if not restore and name == MANIFEST:
                raise AlreadyCommitted(
                    f"{self.job_dir} already holds a committed {MANIFEST}; a job id is used once"
                )
            if restore:
                self._held.add(name)
        self._work_fd = open_dir(WORK, job_fd, what=f"the work dir {self.work_dir}", create=True)
        job_st, work_st = os.fstat(job_fd), os.fstat(self._work_fd)
        self._ids = {"job": identity(job_st), "work": identity(work_st)}
        if job_st.st_dev != work_st.st_dev:
            raise OutputError(
                f"{self.work_dir} is not on the same filesystem as "
                f"{self.job_dir}: the atomic commit needs one filesystem"
            )
        if not os.access(WORK, os.W_OK | os.X_OK, dir_fd=job_fd):
            raise OutputError(f"the work dir {self.work_dir} is not writable")
        return restore

    def verify(self) -> None:
        """The job dir's path and its `.staging` still name the dirs baqup-run created."""
        job_fd, _ = self._fds()
        job: os.stat_result | None
        work: os.stat_result | None
        try:
            job = os.lstat(self.job_dir)
            work = lstat_at(WORK, job_fd)
        except FileNotFoundError:
            job = work = None
        except OSError as exc:
            raise io_error(exc, f"checking the job dir {self.job_dir}") from None
        if job is None or identity(job) != self._ids["job"]:
            raise SecurityViolation(
                f"the job dir {self.job_dir} was replaced (by a symlink or another dir) while "
                "the job ran; nothing is moved, deleted or written through it"
            )
        if work is None or identity(work) != self._ids["work"]:
            raise SecurityViolation(
                f"the work dir {self.work_dir} was replaced (by a symlink or another dir) while "
                "the job ran; nothing is moved, deleted or written through it"
            )

    def set_aside(self, *, include_job_dir: bool = False) -> str | None:
        """Move what an earlier attempt left in the work dir to `.attempts/{n}/` (and, with
        `include_job_dir`, what it left at the job dir's top to `.attempts/{n}.job-dir/`),
        kept for the controller, never deleted. The attempt dir's name, or None.

        Renames move the entries themselves: a symlink among them is moved, never followed.
        """
        job_fd, work_fd = self._fds()
        self.verify()
        try:
            in_work = sorted(os.listdir(work_fd))
            at_top = (
                sorted(n for n in os.listdir(job_fd) if n not in (WORK, ATTEMPTS))
                if include_job_dir
                else []
            )
            if not in_work and not at_top:
                return None
            with closing_fd(
                open_dir(ATTEMPTS, job_fd, what="the job's .attempts", create=True)
            ) as attempts:
                number = self._new_attempt(attempts)
                moves = [(number, work_fd, in_work), (number + JOB_DIR_LEFTOVERS, job_fd, at_top)]
                for into, source, names in moves:
                    if not names:
                        continue
                    where = f"the attempt dir {ATTEMPTS}/{into}"
                    with closing_fd(open_dir(into, attempts, what=where, create=True)) as target:
                        for name in names:
                            os.rename(name, name, src_dir_fd=source, dst_dir_fd=target)
                        os.fsync(target)
                os.fsync(attempts)
            os.fsync(work_fd)
            os.fsync(job_fd)
        except OSError as exc:
            raise io_error(
                exc, f"setting aside an earlier attempt's files in {self.job_dir}"
            ) from None
        return f"{ATTEMPTS}/{number}"

    @staticmethod
    def _new_attempt(attempts_fd: int) -> str:
        used = [int(n) for n in os.listdir(attempts_fd) if n.isdigit()]
        number = max(used, default=0) + 1
        while True:
            try:
                os.mkdir(str(number), dir_fd=attempts_fd)
            except FileExistsError:
                number += 1
                continue
            return str(number)

    def empty(self) -> bool:
        """Remove everything inside the work dir (BAQUP_ARTIFACT_RETAIN_ON_FAILURE=false).

        Never raises and never follows a symlink: descends by descriptor from the work
        dir baqup-run created, and removes nothing when that dir was swapped.
        """
        if self._work_fd is None:
            return False
        try:
            self.verify()
            remove_contents(self._work_fd)
        except (OSError, BaqupError):
            return False
        return True

    def close(self) -> None:
        """Release the descriptors (and with the job dir's, the lock)."""
        for fd in (self._work_fd, self._job_fd):
            if fd is not None:
                with suppress(OSError):
                    os.close(fd)
        self._work_fd = self._job_fd = None

    # --- choosing artifacts --------------------------------------------------------

    def discover(self) -> Iterator[Artifact]:
        """Every regular file under the work dir, sorted: a symlink, a special file or a
        reserved name at the top is an error, never silently left out."""
        _, work_fd = self._fds()
        self.verify()
        found: list[str] = []
        try:
            self._check_top(work_fd)
            # Pending directories are kept as names, not descriptors: a wide tree must not
            # hold one descriptor per directory still to visit.
            pending: list[tuple[str, ...]] = [()]
            while pending:
                parts = pending.pop()
                prefix = "".join(f"{p}/" for p in parts)
                with closing_fd(open_parent(work_fd, parts, what="a directory")) as fd:
                    for name in os.listdir(fd):
                        relative = prefix + name
                        st = lstat_at(name, fd)
                        if st is None:
                            continue
                        if stat.S_ISDIR(st.st_mode):
                            pending.append((*parts, name))
                            continue
                        self._check_file(relative, st)
                        check_encodable(relative)
                        found.append(relative)
        except OSError as exc:
            raise io_error(exc, "listing the work dir") from None
        for name in sorted(found):
            yield Artifact(name, compression_of(name))

    @staticmethod
    def _check_top(work_fd: int) -> None:
        for name in os.listdir(work_fd):
            check_reserved(name)

    def _check_job_top(self, job_fd: int) -> None:
        for name in (MANIFEST, STATUS_FILE):
            if name not in self._held and lstat_at(name, job_fd) is not None:
                raise ReservedName(
                    f"{self.job_dir / name} appeared while the job ran: only baqup-run writes "
                    f"{name}; nothing is committed"
                )
        if MANIFEST in self._held:
            # Not AlreadyCommitted: this run does hold the job dir, and reports its end.
            raise OutputError(
                f"{self.job_dir} holds the manifest of the snapshot being restored: a restore "
                "never commits artifacts over it",
                code="ALREADY_COMMITTED",
            )

    @staticmethod
    def _check_file(name: str, st: os.stat_result) -> None:
        if stat.S_ISLNK(st.st_mode):
            raise SecurityViolation(f"artifact {name!r} is a symlink; artifacts are regular files")
        if not stat.S_ISREG(st.st_mode):
            raise SecurityViolation(f"artifact {name!r} is not a regular file")
        if st.st_nlink > 1:
            raise SecurityViolation(
                f"artifact {name!r} has {st.st_nlink} hard links: it may be a file outside the "
                "job; artifacts are files the job wrote"
            )

    def _check_artifact(self, artifact: Artifact, work_fd: int) -> _Checked:
        relative = safe_relative(artifact.name)
        check_reserved(relative)
        name = str(relative)
        parts, leaf = relative.parts[:-1], relative.parts[-1]
        with closing_fd(open_parent(work_fd, parts, what=f"artifact {name!r}")) as parent:
            st = lstat_at(leaf, parent)
            if st is None:
                raise EmptyArtifact(f"declared artifact {name!r} was not written")
            self._check_file(name, st)
        if artifact.ident is not None and identity(st) != artifact.ident:
            raise SecurityViolation(
                f"artifact {name!r} is not the file baqup-run wrote: it was replaced after "
                "it was written"
            )
        return _Checked(artifact, name, parts, leaf, identity(st), st.st_size)

    @contextmanager
    def _opened(self, item: _Checked, work_fd: int) -> Iterator[tuple[int, int]]:
        """(directory, file) descriptors on the checked file, or SecurityViolation when
        the name no longer leads to it. Held one artifact at a time: a job of thousands of
        files never needs thousands of descriptors."""
        with closing_fd(open_parent(work_fd, item.parts, what=f"artifact {item.name!r}")) as parent:
            fd = os.open(item.leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            with closing_fd(fd):
                st = os.fstat(fd)
                if identity(st) != item.ident or st.st_nlink > 1:
                    raise SecurityViolation(
                        f"artifact {item.name!r} was replaced while being committed"
                    )
                yield parent, fd

    # --- COMPLETING ----------------------------------------------------------------

    def commit(
        self,
        artifacts: Sequence[Artifact],
        *,
        algorithm: str,
        manifest_fields: Mapping[str, Any],
        allow_empty: bool = False,
        threads: int = 0,
        on_long_checksum: Callable[[float, int], None] | None = None,
        checkpoint: Callable[[], None] | None = None,
    ) -> list[Committed]:
        """Checksum, move, then write and move the manifest. Raises on any failure.

        Everything is checked before anything moves: the dirs are the ones baqup-run
        created, no reserved name was written, every artifact is a regular file with one
        link, reached without following a symlink, hashed through its own descriptor, and
        still the same file when it is moved.
        """
        if not artifacts:
            raise EmptyArtifact(
                "the job produced no artifact: a job that writes nothing is never a backup"
            )
        job_fd, work_fd = self._fds()
        try:
            self.verify()
            self._check_top(work_fd)
            self._check_job_top(job_fd)
            checked = [self._check_artifact(a, work_fd) for a in artifacts]
            self._check_sizes(checked, allow_empty)
            total = sum(c.size for c in checked if c.artifact.checksum is None)
            expected = estimate_seconds(algorithm, total)
            if on_long_checksum is not None and expected > 10:
                on_long_checksum(expected, total)
            committed = [
                self._checksummed(c, work_fd, algorithm, threads, checkpoint) for c in checked
            ]
            manifest = {
                "version": "1.0",
                **manifest_fields,
                "created_at": utc_iso(),
                "artifacts": [c.manifest_entry() for c in committed],
            }
            problems = validate_manifest(manifest)
            if problems:
                raise BaqupError(f"refusing to write an invalid manifest: {problems[0]}")
            document = jsonutil.dumps(manifest, indent=True)
            for item in checked:
                if checkpoint:
                    checkpoint()
                self._move(item, work_fd, job_fd)
            self._check_job_top(job_fd)
            replace_atomic(MANIFEST, document, job_fd, tmp_fd=work_fd)
        except OSError as exc:
            raise io_error(exc, "committing the artifacts") from None
        return committed

    @staticmethod
    def _check_sizes(checked: Sequence[_Checked], allow_empty: bool) -> None:
        for item in checked:
            if item.size == 0 and not allow_empty:
                raise EmptyArtifact(
                    f"artifact {item.name!r} is empty (0 bytes): a failed dump "
                    "must never look like a backup"
                )
            expected = item.artifact.size
            if expected is not None and expected != item.size:
                raise DataError(
                    f"artifact {item.name!r} changed size after it was written "
                    f"({expected} -> {item.size} bytes)"
                )

    def _checksummed(
        self,
        item: _Checked,
        work_fd: int,
        algorithm: str,
        threads: int,
        checkpoint: Callable[[], None] | None,
    ) -> Committed:
        if checkpoint:
            checkpoint()
        artifact = item.artifact
        with self._opened(item, work_fd) as (_, fd):
            # The descriptor's own /proc link: the file opened, whatever its name is now.
            checksum = artifact.checksum or hash_file(
                f"/proc/self/fd/{fd}", algorithm, threads=threads
            )
            os.fsync(fd)
        return Committed(
            item.name,
            self.job_dir / item.name,
            item.size,
            checksum,
            algorithm,
            artifact.compression,
            artifact.encrypted,
            artifact.extra,
        )

    def _move(self, item: _Checked, work_fd: int, job_fd: int) -> None:
        """One artifact from its work-dir directory to the same name in the job dir."""
        with (
            self._opened(item, work_fd) as (source, _),
            closing_fd(
                open_parent(
                    job_fd, item.parts, what=f"the job dir's path for {item.name!r}", create=True
                )
            ) as target,
        ):
            if lstat_at(item.leaf, target) is not None:
                raise SecurityViolation(
                    f"{item.name!r} already exists in the job dir: something other than the "
                    "commit wrote it; nothing is replaced"
                )
            os.rename(item.leaf, item.leaf, src_dir_fd=source, dst_dir_fd=target)
            os.fsync(target)

    def write_status_file(self, status: Mapping[str, Any]) -> Path:
        """`.baqup-status.json` in the job dir, atomically, through the job dir's
        descriptor (a fresh O_EXCL temp file, renamed over whatever is there)."""
        path = self.job_dir / STATUS_FILE
        try:
            if self._job_fd is not None:
                replace_atomic(STATUS_FILE, jsonutil.dumps(dict(status), indent=True), self._job_fd)
            else:
                staging_dir = os.open(
                    self.job_dir.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
                )
                with closing_fd(staging_dir):
                    job_fd = open_dir(self.job_dir.name, staging_dir, what="the job dir")
                with closing_fd(job_fd):
                    replace_atomic(STATUS_FILE, jsonutil.dumps(dict(status), indent=True), job_fd)
        except OSError as exc:
            raise io_error(exc, f"writing {path}") from None
        return path
