"""Reading artifacts back: verification, split parts, decryption, decompression.

Owns the read side of what capture.py writes, for `baqup decrypt` and for restores:
`locate` finds an artifact in a job's manifest and verifies every part before a
byte is used; `ConcatReader` reads numbered parts as one stream; `Feeder` streams
it, decrypted and decompressed, into a restore child's stdin; `decoded_output`
writes plaintext to stdout or, atomically, to a file (never a partial file).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import orjson

from .compression import decompressor
from .encryption import decrypt_stream
from .errors import DataError
from .staging import io_error


class ConcatReader:
    """The concatenation of files, read in order, as one binary stream."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self._index = 0
        self._current: BinaryIO | None = None

    def __enter__(self) -> ConcatReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None

    def read(self, size: int = -1) -> bytes:
        out = bytearray()
        while size < 0 or len(out) < size:
            if self._current is None:
                if self._index >= len(self.paths):
                    break
                try:
                    self._current = open(self.paths[self._index], "rb")  # noqa: SIM115
                except OSError as exc:
                    raise io_error(exc, f"reading {self.paths[self._index]}") from None
                self._index += 1
            data = self._current.read(-1 if size < 0 else size - len(out))
            if not data:
                self.close()
                continue
            out += data
        return bytes(out)


@contextmanager
def decoded_output(output: Path | None, algorithm: str) -> Iterator[Callable[[bytes], None]]:
    """A writer of decompressed plaintext to `output` (atomic) or stdout."""
    decoder = decompressor(algorithm)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp") if output else None
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) if tmp else sys.stdout.fileno()

    def write(chunk: bytes) -> None:
        try:
            data = decoder.decompress(chunk)
        except Exception as exc:  # noqa: BLE001 - any codec error is a data error
            raise DataError(f"decompression ({algorithm}) failed: {exc}") from None
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    try:
        yield write
        write(b"")
        if tmp is not None and output is not None:
            os.fsync(fd)
            os.close(fd)
            os.replace(tmp, output)
    except BaseException:
        if tmp is not None:
            os.close(fd)
            tmp.unlink(missing_ok=True)
        raise


def stored_compression(filename: str) -> str:
    """The compression of a stored artifact from its name (`db.sql.zst.enc.002` is zstd)."""
    from .staging import compression_of

    head, dot, tail = filename.rpartition(".")
    if dot and tail.isdigit() and len(tail) == 3:
        filename = head
    return compression_of(filename.removesuffix(".enc"))


def _stem(filename: str) -> str:
    """A manifest filename without part number, `.enc` and compression suffix."""
    name = filename
    head, dot, tail = name.rpartition(".")
    if dot and tail.isdigit() and len(tail) == 3:
        name = head
    name = name.removesuffix(".enc")
    for suffix in (".zst", ".gz", ".lz4"):
        name = name.removesuffix(suffix)
    return name


@dataclass(frozen=True)
class StoredArtifact:
    """An artifact of a committed job, as the manifest describes it, verified."""

    name: str
    paths: tuple[Path, ...]
    compression: str
    encrypted: bool
    size: int


def locate(job_dir: Path, name: str) -> StoredArtifact:
    """NAME's parts in the job's manifest, each verified (size and checksum); else DataError.

    NAME may be the manifest's filename (`db.sql.zst`), the name of a split
    artifact before its part numbers, or the name before compression (`db.sql`).
    """
    from .verify import verify_job_dir

    report = verify_job_dir(job_dir, check_checksums=False)
    manifest_path = job_dir / "manifest.json"
    if not manifest_path.exists():
        raise DataError(
            f"no manifest.json in {job_dir}: nothing verified to restore", code="MANIFEST_MISSING"
        )
    manifest = orjson.loads(manifest_path.read_bytes())
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artifacts"), list):
        raise DataError(f"{manifest_path} is not a valid manifest: {report['errors'][:1]}")
    entries = [
        e
        for e in manifest["artifacts"]
        if isinstance(e, dict)
        and name in (e.get("filename"), e.get("original"), _stem(str(e.get("filename", ""))))
    ]
    if not entries:
        raise DataError(f"artifact {name!r} is not in the job's manifest", code="ARTIFACT_MISSING")
    entries.sort(key=lambda e: int(e.get("part", 0)))
    from .verify import check_artifact, check_parts

    problems = check_parts(entries)
    if entries[0].get("parts") and len(entries) != int(entries[0]["parts"]):
        problems.append(f"{name}: {len(entries)} of {entries[0]['parts']} parts in the manifest")
    root = os.path.realpath(job_dir)
    for entry in entries:
        result = check_artifact(job_dir, root, entry, check_checksums=True)
        problems.extend(f"{entry['filename']}: {e}" for e in result["errors"])
    if problems:
        raise DataError(
            f"artifact {name!r} failed verification: {'; '.join(problems)}",
            code="CHECKSUM_MISMATCH",
        )
    return StoredArtifact(
        name=name,
        paths=tuple(job_dir / str(e["filename"]) for e in entries),
        compression=str(entries[0].get("compression") or "none"),
        encrypted=bool(entries[0].get("encrypted")),
        size=sum(int(e["size_bytes"]) for e in entries),
    )


class Feeder:
    """Streams a verified artifact, decrypted and decompressed, into a child's stdin.

    Runs on its own thread (writing to a pipe blocks); counts plaintext bytes for
    progress; records the first error instead of raising.
    """

    def __init__(self, artifact: StoredArtifact, fd: int, key: bytes | None) -> None:
        self.artifact = artifact
        self.fd = fd
        self.key = key
        self.bytes = 0
        self.error: BaseException | None = None
        self.broken_pipe = False
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="baqup-feeder", daemon=True)

    def start(self) -> None:
        os.set_blocking(self.fd, True)
        self._thread.start()

    def _chunks(self, reader: ConcatReader) -> Iterator[bytes]:
        if self.artifact.encrypted:
            if self.key is None:
                raise DataError(
                    f"{self.artifact.name} is encrypted: set the key (BAQUP_SECRET_ENCRYPTION_KEY)",
                    code="DECRYPTION_FAILED",
                )
            yield from decrypt_stream(reader, self.key)
            return
        while chunk := reader.read(1024 * 1024):
            yield chunk

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.bytes += len(data)

    def _run(self) -> None:
        decoder = decompressor(self.artifact.compression)
        try:
            with ConcatReader(self.artifact.paths) as reader:
                for chunk in self._chunks(reader):
                    self._write(decoder.decompress(chunk))
                self._write(decoder.flush())
        except BrokenPipeError:
            self.broken_pipe = True
        except BaseException as exc:  # noqa: BLE001 - reported by the supervisor
            self.error = exc
        finally:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.done.set()
