"""Staging: the job dir, its `.staging/` work dir, artifacts, and the atomic commit.

Owns spec section 4 and INTERFACE.md section 5: creating the job and work dirs on
one filesystem; deciding which files are artifacts (declared, or every regular file
in the work dir) and refusing names that leave the work dir; checksumming;
moving artifacts into the job dir with fsync; writing `manifest.json` (valid against
Appendix C) in `.staging/` and moving it last. A `manifest.json` is never visible in
the job dir unless every artifact it names is there, whole, with that checksum.
Never deletes anything outside the work dir.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import orjson

from . import jsonutil
from .checksum import estimate_seconds, hash_file
from .clock import utc_iso
from .errors import (
    BaqupError,
    DataError,
    EmptyArtifact,
    OutputError,
    SecurityViolation,
    StorageIOError,
)

MANIFEST = "manifest.json"
STATUS_FILE = ".baqup-status.json"
COMPRESSION_BY_SUFFIX = {".zst": "zstd", ".zstd": "zstd", ".gz": "gzip", ".lz4": "lz4"}


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


def safe_relative(name: str) -> PurePosixPath:
    """A child-supplied artifact name as a clean relative path, or SecurityViolation."""
    if not name or "\0" in name:
        raise SecurityViolation(f"invalid artifact name {name!r}")
    path = PurePosixPath(name)
    if path.is_absolute():
        raise SecurityViolation(
            f"artifact name {name!r} is absolute; names are relative to the work dir"
        )
    if any(part == ".." for part in path.parts):
        raise SecurityViolation(f"artifact name {name!r} contains '..'")
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts:
        raise SecurityViolation(f"invalid artifact name {name!r}")
    return PurePosixPath(*parts)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, tmp_dir: Path | None = None) -> None:
    """Temp file (in `tmp_dir` or beside `path`), write, fsync, rename, fsync the dir."""
    tmp = (tmp_dir or path.parent) / f".{path.name}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def io_error(exc: OSError, doing: str) -> BaqupError:
    """An OSError as the contract's error: ENOSPC and friends are I/O errors (74)."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{doing}: {reason}")
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


class Staging:
    def __init__(self, job_dir: Path, work_dir: Path) -> None:
        self.job_dir = job_dir
        self.work_dir = work_dir

    # --- INITIALIZING --------------------------------------------------------------

    def prepare(self, *, restore: bool = False) -> None:
        """Create the job and work dirs; both on one filesystem, or exit 73.

        A snapshot-like job needs a fresh job dir; a restore reads the committed one.
        """
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(
                f"cannot create the work dir {self.work_dir}: {exc.strerror or exc}"
            ) from None
        if not restore and (self.job_dir / MANIFEST).exists():
            raise OutputError(
                f"{self.job_dir} already holds a committed {MANIFEST}; a job id is used once"
            )
        if self.job_dir.stat().st_dev != self.work_dir.stat().st_dev:
            raise OutputError(
                f"{self.work_dir} is not on the same filesystem as "
                f"{self.job_dir}: the atomic commit needs one filesystem"
            )
        if not os.access(self.work_dir, os.W_OK | os.X_OK):
            raise OutputError(f"the work dir {self.work_dir} is not writable")

    def empty(self) -> None:
        """Remove everything inside the work dir (not the dir itself)."""
        for entry in os.scandir(self.work_dir):
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass

    # --- choosing artifacts --------------------------------------------------------

    def resolve(self, name: str) -> tuple[str, Path]:
        """A child-named artifact as (clean name, path), refusing anything outside."""
        relative = safe_relative(name)
        candidate = self.work_dir / relative
        root = os.path.realpath(self.work_dir)
        real = os.path.realpath(candidate)
        if real != root and not real.startswith(root + os.sep):
            raise SecurityViolation(f"artifact {name!r} resolves outside the work dir")
        if os.path.islink(candidate):
            raise SecurityViolation(f"artifact {name!r} is a symlink; artifacts are regular files")
        try:
            mode = os.lstat(candidate).st_mode
        except FileNotFoundError:
            raise EmptyArtifact(f"declared artifact {name!r} was not written") from None
        if not stat.S_ISREG(mode):
            raise SecurityViolation(f"artifact {name!r} is not a regular file")
        return str(relative), candidate

    def discover(self) -> Iterator[Artifact]:
        """Every regular file under the work dir (symlinks and specials skipped), sorted."""
        stack = [self.work_dir]
        found: list[str] = []
        while stack:
            directory = stack.pop()
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_symlink():
                        continue
                    if entry.is_dir():
                        stack.append(Path(entry.path))
                    elif entry.is_file() and not entry.name.startswith(".baqup-"):
                        found.append(os.path.relpath(entry.path, self.work_dir))
        for name in sorted(found):
            if name == MANIFEST:
                continue
            yield Artifact(name, compression_of(name))

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
        """Checksum, move, then write and move the manifest. Raises on any failure."""
        if not artifacts:
            raise EmptyArtifact(
                "the job produced no artifact: a job that writes nothing is never a backup"
            )
        resolved = []
        for artifact in artifacts:
            name, path = self.resolve(artifact.name)
            size = path.stat().st_size
            if size == 0 and not allow_empty:
                raise EmptyArtifact(
                    f"artifact {name!r} is empty (0 bytes): a failed dump "
                    "must never look like a backup"
                )
            resolved.append((artifact, name, path, size))
        for artifact, name, _, size in resolved:
            if artifact.size is not None and artifact.size != size:
                raise DataError(
                    f"artifact {name!r} changed size after it was written "
                    f"({artifact.size} -> {size} bytes)"
                )
        total = sum(size for a, *_, size in resolved if a.checksum is None)
        expected = estimate_seconds(algorithm, total)
        if on_long_checksum is not None and expected > 10:
            on_long_checksum(expected, total)
        committed: list[Committed] = []
        try:
            for artifact, name, path, size in resolved:
                if checkpoint:
                    checkpoint()
                checksum = artifact.checksum or hash_file(path, algorithm, threads=threads)
                committed.append(
                    Committed(
                        name,
                        self.job_dir / name,
                        size,
                        checksum,
                        algorithm,
                        artifact.compression,
                        artifact.encrypted,
                        artifact.extra,
                    )
                )
            for _, name, path, _ in resolved:
                if checkpoint:
                    checkpoint()
                fsync_file(path)
                target = self.job_dir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
                fsync_dir(target.parent)
            manifest = {
                "version": "1.0",
                **manifest_fields,
                "created_at": utc_iso(),
                "artifacts": [c.manifest_entry() for c in committed],
            }
            problems = validate_manifest(manifest)
            if problems:
                raise BaqupError(f"refusing to write an invalid manifest: {problems[0]}")
            staged = self.work_dir / MANIFEST
            write_atomic(staged, orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
            os.replace(staged, self.job_dir / MANIFEST)
            fsync_dir(self.job_dir)
        except OSError as exc:
            raise io_error(exc, "committing the artifacts") from None
        return committed

    def write_status_file(self, status: Mapping[str, Any]) -> Path:
        path = self.job_dir / STATUS_FILE
        try:
            write_atomic(path, jsonutil.dumps(dict(status), indent=True))
        except OSError as exc:
            raise io_error(exc, f"writing {path}") from None
        return path


def compression_of(name: str) -> str:
    return COMPRESSION_BY_SUFFIX.get(PurePosixPath(name).suffix.lower(), "none")
