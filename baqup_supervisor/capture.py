"""Streaming capture: a child's stdout becomes an artifact in one pass.

`ArtifactSink` takes raw bytes as they come, compresses them (compression.py),
encrypts them (encryption.py), splits them into parts no larger than the split size,
and hashes and writes each part, counting raw and stored bytes for progress and the
compression ratio. Nothing is ever read back. The parts become declared artifacts
with their checksums already known, so the commit does not hash them again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .checksum import Hasher, new_hasher
from .compression import Choice, compressor, worker_threads
from .encryption import FORMAT, StreamEncryptor
from .errors import SecurityViolation
from .staging import Artifact, io_error, safe_relative


@dataclass
class _Part:
    name: str
    fd: int
    hasher: Hasher
    size: int = 0


class ArtifactSink:
    def __init__(
        self,
        work_dir: Path,
        name: str,
        *,
        compression: Choice,
        checksum_algorithm: str,
        parallelism: int = 0,
        split_size: int = 0,
        encryptor: StreamEncryptor | None = None,
        key_id: str | None = None,
    ) -> None:
        relative = str(safe_relative(name))
        self.base = relative + compression.suffix + (".enc" if encryptor else "")
        if "/" in self.base:
            (work_dir / self.base).parent.mkdir(parents=True, exist_ok=True)
        self.work_dir = work_dir
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
        self._closed: list[_Part] = []
        self._open_part(self.base)

    def _open_part(self, name: str) -> None:
        path = self.work_dir / name
        if os.path.islink(path):
            raise SecurityViolation(f"artifact {name!r} is a symlink")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise io_error(exc, f"creating {name}") from None
        self._parts.append(_Part(name, fd, new_hasher(self.algorithm)))

    def _part_name(self, index: int) -> str:
        return f"{self.base}.{index:03d}"

    def _emit(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            part = self._parts[-1]
            if self.split_size and part.size >= self.split_size:
                if len(self._parts) == 1 and part.name == self.base:
                    os.rename(self.work_dir / part.name, self.work_dir / self._part_name(1))
                    part.name = self._part_name(1)
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
        """Flush, fsync and close every part; the parts as artifacts, in order."""
        tail = self._codec.flush()
        if self.encryptor is not None:
            tail = self.encryptor.update(tail) + self.encryptor.finalize()
        if tail:
            self._emit(tail)
        artifacts = []
        count = len(self._parts)
        for index, part in enumerate(self._parts, start=1):
            try:
                os.fsync(part.fd)
            except OSError as exc:
                raise io_error(exc, f"writing {part.name}") from None
            finally:
                os.close(part.fd)
            extra: dict[str, object] = {}
            if count > 1:
                extra.update(part=index, parts=count, original=self.base)
            if self.encryptor is not None:
                extra["encryption"] = {
                    "format": FORMAT,
                    "algorithm": self.encryptor.algorithm,
                    **({"key_id": self.key_id} if self.key_id else {}),
                }
            artifacts.append(
                Artifact(
                    part.name,
                    self.compression.algorithm,
                    self.encryptor is not None,
                    extra,
                    checksum=part.hasher.hexdigest(),
                    size=part.size,
                )
            )
        self._parts.clear()
        return artifacts

    def abort(self) -> None:
        """Close the parts without finishing them (they stay in the work dir)."""
        for part in self._parts:
            try:
                os.close(part.fd)
            except OSError:
                pass
        self._parts.clear()

    @property
    def ratio(self) -> float | None:
        return round(self.stored_bytes / self.raw_bytes, 4) if self.raw_bytes else None
