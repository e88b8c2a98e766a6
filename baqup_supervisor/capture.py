"""Streaming capture: a child's stdout becomes an artifact in one pass.

`ArtifactSink` takes raw bytes as they come, compresses them (compression.py),
encrypts them (encryption.py's `new_encryptor`: baqup-stream-v2 `.enc` or age `.age`),
splits them into parts no larger than the split size, and hashes and writes each
part, counting raw and stored bytes for progress and the compression ratio. Nothing
is ever read back. The parts become declared artifacts with their checksums already
known, so the commit does not hash them again.

Every part (the first too) is created fresh (`O_CREAT | O_EXCL | O_NOFOLLOW`) through a
descriptor on the work dir baqup-run opened: a name already there, a planted symlink or
hard link, is an error, never a file written through.
"""

from __future__ import annotations

import errno
import os
from contextlib import suppress
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from .checksum import Hasher, new_hasher
from .compression import Choice, compressor, worker_threads
from .dirfd import create_exclusive, lstat_at, open_parent
from .encryption import StreamEncryptor
from .errors import SecurityViolation
from .names import artifact_name, safe_relative
from .staging import Artifact, io_error

if TYPE_CHECKING:
    from .age import AgeEncryptor


@dataclass
class _Part:
    name: str  # relative to the work dir
    leaf: str  # in the sink's directory
    fd: int
    hasher: Hasher
    size: int = 0


class ArtifactSink:
    def __init__(
        self,
        work_dir_fd: int,
        name: str,
        *,
        compression: Choice,
        checksum_algorithm: str,
        parallelism: int = 0,
        split_size: int = 0,
        encryptor: StreamEncryptor | AgeEncryptor | None = None,
        key_id: str | None = None,
    ) -> None:
        relative = str(safe_relative(name))
        # `.enc` (baqup-stream-v2) or `.age` after the compression suffix: db.sql.zst.age
        suffix = encryptor.suffix if encryptor is not None else ""
        self.base = artifact_name(relative + compression.suffix + suffix)
        parents = PurePosixPath(self.base).parts[:-1]
        try:
            self._dir_fd = open_parent(
                work_dir_fd, parents, what=f"artifact {self.base!r}", create=True
            )
        except OSError as exc:
            raise io_error(exc, f"creating the directory of {self.base}") from None
        self._prefix = self.base[: len(self.base) - len(PurePosixPath(self.base).name)]
        self.compression = compression
        self.algorithm = checksum_algorithm
        self.split_size = split_size
        self.encryptor = encryptor
        self.key_id = key_id
        self._codec = compressor(
            compression.algorithm, compression.level, worker_threads(parallelism)
        )
        self.raw_bytes = 0
        self.stored_bytes = 0
        self._parts: list[_Part] = []
        try:
            self._open_part(self.base)
        except BaseException:
            self._close_dir()
            raise

    @property
    def encryption(self) -> dict[str, object]:
        """The manifest's `encryption` object: the encryptor's own (format, algorithm or
        recipients), with the key id only beside a symmetric key (it names that key)."""
        assert self.encryptor is not None
        described = dict(self.encryptor.manifest)
        if self.key_id and isinstance(self.encryptor, StreamEncryptor):
            described["key_id"] = self.key_id
        return described

    def _leaf(self, name: str) -> str:
        return name[len(self._prefix) :]

    def _taken(self, name: str) -> SecurityViolation:
        return SecurityViolation(
            f"{name!r} already exists in the work dir: a captured part is always a new file, "
            "never written through an existing one (a planted file, symlink or hard link)"
        )

    def _open_part(self, name: str) -> None:
        leaf = self._leaf(name)
        try:
            fd = create_exclusive(leaf, self._dir_fd, 0o640)
        except FileExistsError:
            raise self._taken(name) from None
        except OSError as exc:
            raise io_error(exc, f"creating {name}") from None
        self._parts.append(_Part(name, leaf, fd, new_hasher(self.algorithm)))

    def _first_becomes_part_one(self, part: _Part) -> None:
        """The unsplit name becomes `.001` once a second part is needed: linked to the
        new name (which fails if anything is there), then the old name removed."""
        first = self._part_name(1)
        leaf = self._leaf(first)
        try:
            try:
                os.link(part.leaf, leaf, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                    raise
                # no hard links on this filesystem: check, then rename (a name planted in
                # between is replaced, never written through; the commit checks the inode)
                if lstat_at(leaf, self._dir_fd) is not None:
                    raise FileExistsError(errno.EEXIST, "exists") from None
                os.rename(part.leaf, leaf, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
            else:
                os.unlink(part.leaf, dir_fd=self._dir_fd)
        except FileExistsError:
            raise self._taken(first) from None
        except OSError as exc:
            raise io_error(exc, f"renaming {part.name} to {first}") from None
        part.name, part.leaf = first, leaf

    def _part_name(self, index: int) -> str:
        return f"{self.base}.{index:03d}"

    def _emit(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            part = self._parts[-1]
            if self.split_size and part.size >= self.split_size:
                if len(self._parts) == 1 and part.name == self.base:
                    self._first_becomes_part_one(part)
                self._open_part(self._part_name(len(self._parts) + 1))
                continue
            room = self.split_size - part.size if self.split_size else len(view)
            piece = view[:room]
            try:
                written = 0
                while written < len(piece):
                    written += os.write(part.fd, piece[written:])
            except OSError as exc:
                raise io_error(exc, f"writing {part.name}") from None
            part.hasher.update(piece)
            part.size += len(piece)
            self.stored_bytes += len(piece)
            view = view[room:]

    def write(self, raw: bytes) -> None:
        self.raw_bytes += len(raw)
        out = self._codec.compress(raw)
        if self.encryptor is not None:
            out = self.encryptor.update(out)
        if out:
            self._emit(out)

    def close(self) -> list[Artifact]:
        """Flush, fsync and close every part; the parts as artifacts, in order.

        On an error (a full disk) every part still open is closed before it is raised.
        """
        try:
            tail = self._codec.flush()
            if self.encryptor is not None:
                tail = self.encryptor.update(tail) + self.encryptor.finalize()
            if tail:
                self._emit(tail)
        except BaseException:
            self.abort()
            raise
        artifacts = []
        count = len(self._parts)
        index = 0
        while self._parts:
            part = self._parts.pop(0)
            index += 1
            try:
                os.fsync(part.fd)
                written = os.fstat(part.fd)
            except OSError as exc:
                self.abort()
                raise io_error(exc, f"writing {part.name}") from None
            finally:
                os.close(part.fd)
            extra: dict[str, object] = {}
            if count > 1:
                extra.update(part=index, parts=count, original=self.base)
            if self.encryptor is not None:
                extra["encryption"] = self.encryption
            artifacts.append(
                Artifact(
                    part.name,
                    self.compression.algorithm,
                    self.encryptor is not None,
                    extra,
                    checksum=part.hasher.hexdigest(),
                    size=part.size,
                    ident=(written.st_dev, written.st_ino),
                )
            )
        self._close_dir()
        return artifacts

    def abort(self) -> None:
        """Close the parts without finishing them (they stay in the work dir)."""
        for part in self._parts:
            with suppress(OSError):
                os.close(part.fd)
        self._parts.clear()
        self._close_dir()

    def _close_dir(self) -> None:
        if self._dir_fd >= 0:
            with suppress(OSError):
                os.close(self._dir_fd)
            self._dir_fd = -1

    @property
    def ratio(self) -> float | None:
        return round(self.stored_bytes / self.raw_bytes, 4) if self.raw_bytes else None
