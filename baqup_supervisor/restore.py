"""Reading artifacts back: verification, split parts, decryption, decompression.

Owns the read side of what capture.py writes, for `baqup decrypt` and for restores:

- `read_source` reads the committed snapshot a restore job restores (INTERFACE.md
  section 11: `BAQUP_RESTORE_FROM`, default `$BAQUP_JOB_DIR`): a directory with a valid
  manifest, read once and hashed (`restored_from` in the status); `check_own_job`
  refuses a restore carrying the snapshot's own job id; `verify_source` checks every
  artifact of it when the restore names none;
- `locate` finds exactly one artifact in a job's manifest (a NAME matching two is a
  usage error naming both), opens each of its parts once and verifies it (size and
  checksum) before a byte is used;
- `Feeder` streams those same open files, decrypted and decompressed in bounded
  steps, into a restore child's stdin. The stored bytes are hashed again as they are
  fed, and the end of the stream (the last decoded chunk, then EOF) is held back until
  every part matched the manifest: bytes changed on disk after `locate` never reach
  the child as a complete stream. On any error the child's stdin is left open (no
  EOF) until the child is gone, so it is killed mid-stream, never told "done".
- `ConcatReader` reads numbered parts as one stream, `write_decoded` writes plaintext
  to stdout or, atomically, to a file (never a partial file), for `baqup decrypt`.

It never writes into the job dir it reads.
"""

from __future__ import annotations

import hashlib
import os
import select
import stat
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson

from .checksum import ALGORITHMS, new_hasher
from .compression import CHUNK, ChunkReader, DecodedReader, Readable
from .encryption import IDENTITY_VARIABLE, KEY_VARIABLE, decrypt_stream
from .errors import DataError, UsageError
from .staging import MANIFEST, io_error

if TYPE_CHECKING:
    from .age import X25519Identity


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


def write_decoded(source: Readable, output: Path | None, algorithm: str) -> None:
    """The decompressed plaintext of `source` to `output` (atomically) or stdout."""
    decoded = DecodedReader(source, algorithm)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp") if output else None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) if tmp else 1
    except OSError as exc:
        raise io_error(exc, f"creating {tmp}") from None
    try:
        while chunk := decoded.read(CHUNK):
            _write_all(fd, chunk)
        if tmp is not None and output is not None:
            os.fsync(fd)
            os.close(fd)
            os.replace(tmp, output)
    except BaseException as exc:
        if tmp is not None:
            os.close(fd)
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):
            raise io_error(exc, f"writing {output or 'stdout'}") from None
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


ENCRYPTION_SUFFIXES = (".enc", ".age")  # baqup-stream-v1/v2, age v1


def _unsealed(filename: str) -> str:
    """A stored name without its part number and encryption suffix (`db.sql.zst`)."""
    head, dot, tail = filename.rpartition(".")
    if dot and tail.isdigit() and len(tail) == 3:
        filename = head
    for suffix in ENCRYPTION_SUFFIXES:
        if filename.endswith(suffix):
            return filename.removesuffix(suffix)
    return filename


def stored_compression(filename: str) -> str:
    """The compression of a stored artifact from its name (`db.sql.zst.age.002` is zstd)."""
    from .staging import compression_of

    return compression_of(_unsealed(filename))


def _stem(filename: str) -> str:
    """A manifest filename without part number, encryption and compression suffix."""
    name = _unsealed(filename)
    for suffix in (".zst", ".gz", ".lz4"):
        name = name.removesuffix(suffix)
    return name


@dataclass(frozen=True)
class StoredPart:
    """One stored file of an artifact, open (read-only, never by name again)."""

    filename: str
    fd: int
    size: int
    algorithm: str
    checksum: str


@dataclass(frozen=True)
class StoredArtifact:
    """An artifact of a committed job, as the manifest describes it, verified.

    Its parts stay open for the life of the process (close-on-exec), so every attempt
    of a restore reads the files that were verified, whatever happens to their names.
    """

    name: str
    paths: tuple[Path, ...]
    compression: str
    encrypted: bool
    size: int
    parts: tuple[StoredPart, ...] = ()


def _artifacts(manifest: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The manifest's entries grouped by artifact: the parts of a split one together."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for entry in manifest["artifacts"]:
        if isinstance(entry, dict):
            key = str(entry.get("original") or entry.get("filename"))
            groups.setdefault(key, []).append(entry)
    return groups


def _matches(entry: dict[str, Any], name: str) -> bool:
    filename = str(entry.get("filename", ""))
    return name in (filename, entry.get("original"), _stem(filename))


@dataclass(frozen=True)
class RestoreSource:
    """The committed snapshot a restore reads (INTERFACE.md section 11), never written.

    `manifest` holds the bytes that were read and hashed once: every later decision
    (which artifact, which checksum) is taken from them, not from a second read.
    """

    path: Path
    job_id: str
    manifest_sha256: str
    manifest: bytes = field(repr=False)

    def restored_from(self) -> dict[str, str]:
        """The status document's `restored_from`."""
        return {
            "job_id": self.job_id,
            "path": str(self.path),
            "manifest_sha256": self.manifest_sha256,
        }


RESTORE_FROM = "BAQUP_RESTORE_FROM"


def source_path(values: Mapping[str, Any], job_dir: Path) -> tuple[Path, bool]:
    """(the snapshot's job dir, whether BAQUP_RESTORE_FROM named it) for a restore."""
    named = values.get(RESTORE_FROM)
    if named:
        return Path(os.path.abspath(str(named))), True
    return job_dir, False


def read_source(path: Path) -> RestoreSource:
    """The snapshot at `path`: a directory holding a manifest valid against Appendix C.

    A path that is missing or not a directory is the operator's mistake (64); a
    directory without a valid manifest is no committed snapshot (65). Only reads.
    """
    from .staging import validate_manifest

    where = f"{RESTORE_FROM} {path}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(
            f"{where} does not exist: point it at the committed snapshot's job dir "
            "(the directory holding its manifest.json)",
            code="RESTORE_SOURCE_MISSING",
        ) from None
    except OSError as exc:
        raise io_error(exc, f"reading {where}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(
            f"{where} is not a directory: a restore reads a snapshot's job dir "
            "(the directory holding its manifest.json)",
            code="RESTORE_SOURCE_INVALID",
        )
    manifest_path = path / MANIFEST
    try:
        fd = os.open(manifest_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DataError(
            f"{where} holds no {MANIFEST}: it is not a committed snapshot (a job that "
            "failed or is still running commits none); nothing to restore",
            code="MANIFEST_MISSING",
        ) from None
    except OSError as exc:
        raise io_error(exc, f"opening {manifest_path}") from None
    with os.fdopen(fd, "rb") as handle:
        try:
            data = handle.read()
        except OSError as exc:
            raise io_error(exc, f"reading {manifest_path}") from None
    try:
        manifest = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DataError(f"{manifest_path} is not JSON: {exc}", code="MANIFEST_INVALID") from None
    problems = validate_manifest(manifest) if isinstance(manifest, dict) else ["not an object"]
    if problems:
        raise DataError(
            f"{manifest_path} is not a valid manifest: {'; '.join(problems[:3])}",
            code="MANIFEST_INVALID",
        )
    return RestoreSource(path, str(manifest["job_id"]), hashlib.sha256(data).hexdigest(), data)


def check_own_job(source: RestoreSource, job_id: str) -> None:
    """A restore with the snapshot's own job id would report over the snapshot's keys."""
    if source.job_id == job_id:
        raise UsageError(
            f"BAQUP_JOB_ID {job_id} is the job id of the snapshot in {source.path}: a restore "
            f"is a job of its own; give it a new BAQUP_JOB_ID (and {RESTORE_FROM}={source.path})",
            code="RESTORE_SAME_JOB",
        )


def verify_source(source: RestoreSource) -> None:
    """Every artifact of the snapshot, every part, checked against its manifest."""
    from .verify import _error, verify_job_dir

    report = verify_job_dir(source.path, check_checksums=True)
    if not report["valid"]:
        first = report["error"]
        raise _error(
            str(first["code"]),
            f"the snapshot in {source.path} failed verification: {first['message']}",
        )


def locate(job_dir: Path, name: str, manifest_bytes: bytes | None = None) -> StoredArtifact:
    """NAME's parts in the job's manifest, each opened once and verified (size and
    checksum); a UsageError if NAME matches two artifacts, else a DataError.

    NAME may be the manifest's filename (`db.sql.zst`), the name of a split
    artifact before its part numbers, or the name before compression (`db.sql`).
    `manifest_bytes` are the manifest as `read_source` read it (else read here).
    """
    from .verify import check_artifact, check_parts

    manifest_path = job_dir / MANIFEST
    if manifest_bytes is None:
        manifest_bytes = read_source(job_dir).manifest
    manifest = orjson.loads(manifest_bytes)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artifacts"), list):
        raise DataError(f"{manifest_path} is not a valid manifest", code="MANIFEST_INVALID")
    groups = _artifacts(manifest)
    found = [key for key, entries in groups.items() if any(_matches(e, name) for e in entries)]
    if not found:
        raise DataError(
            f"artifact {name!r} is not in the manifest of {job_dir}", code="ARTIFACT_MISSING"
        )
    if len(found) > 1:
        raise UsageError(
            f"--stdin-artifact {name!r} matches {len(found)} artifacts of the manifest: "
            f"{' and '.join(map(repr, found))}; name one by its manifest filename",
            code="ARTIFACT_AMBIGUOUS",
        )
    entries = sorted(groups[found[0]], key=lambda e: int(e.get("part", 0)))
    problems = check_parts(entries)
    if entries[0].get("parts") and len(entries) != int(entries[0]["parts"]):
        problems.append(f"{name}: {len(entries)} of {entries[0]['parts']} parts in the manifest")
    root = os.path.realpath(job_dir)
    code = "PARTS_INCOMPLETE" if problems else None
    for entry in entries:
        result = check_artifact(job_dir, root, entry, check_checksums=False)
        problems.extend(f"{entry['filename']}: {e}" for e in result["errors"])
        code = code or result.get("code")
    if problems:
        raise DataError(
            f"artifact {name!r} in {job_dir} failed verification: {'; '.join(problems)}",
            code=str(code or "CHECKSUM_MISMATCH"),
        )
    parts: list[StoredPart] = []
    try:
        for entry in entries:
            parts.append(_open_verified(job_dir, entry))
    except DataError as exc:
        for part in parts:
            os.close(part.fd)
        raise DataError(
            f"artifact {name!r} in {job_dir} failed verification: {exc.message}", code=exc.code
        ) from None
    return StoredArtifact(
        name=name,
        paths=tuple(job_dir / p.filename for p in parts),
        compression=str(entries[0].get("compression") or "none"),
        encrypted=bool(entries[0].get("encrypted")),
        size=sum(p.size for p in parts),
        parts=tuple(parts),
    )


def _open_verified(job_dir: Path, entry: dict[str, Any]) -> StoredPart:
    filename = str(entry["filename"])
    algorithm = str(entry["checksum"]["algorithm"])
    if algorithm not in ALGORITHMS:
        raise DataError(f"{filename}: unsupported checksum algorithm {algorithm!r}")
    try:
        fd = os.open(job_dir / filename, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise io_error(exc, f"opening {filename}") from None
    part = StoredPart(
        filename, fd, int(entry["size_bytes"]), algorithm, str(entry["checksum"]["value"]).lower()
    )
    try:
        VerifiedParts((part,)).finish()
    except BaseException:
        os.close(fd)
        raise
    return part


def _mismatch(part: StoredPart, what: str) -> DataError:
    return DataError(
        f"{part.filename}: {what}: the stored bytes are not the ones the manifest records",
        code="CHECKSUM_MISMATCH",
    )


class VerifiedParts:
    """The stored bytes of an artifact, read in order from its open parts, exactly each
    part's recorded size, each hashed as it is read: a part whose bytes do not match the
    manifest raises (CHECKSUM_MISMATCH) as soon as its last byte is read."""

    def __init__(self, parts: Sequence[StoredPart]) -> None:
        self._parts = list(parts)
        self._index = 0
        self._offset = 0
        self._hasher = new_hasher(parts[0].algorithm) if parts else None

    def read(self, size: int = -1, /) -> bytes:
        if size == 0:
            return b""
        while self._index < len(self._parts):
            part = self._parts[self._index]
            want = min(CHUNK if size < 0 else size, part.size - self._offset)
            if want <= 0:
                self._end_part(part)
                continue
            try:
                data = os.pread(part.fd, want, self._offset)
            except OSError as exc:
                raise io_error(exc, f"reading {part.filename}") from None
            if not data:
                raise _mismatch(part, f"shorter than its {part.size} bytes")
            assert self._hasher is not None
            self._hasher.update(data)
            self._offset += len(data)
            return data
        return b""

    def _end_part(self, part: StoredPart) -> None:
        assert self._hasher is not None
        if self._hasher.hexdigest() != part.checksum:
            raise _mismatch(part, f"{part.algorithm} mismatch")
        self._index += 1
        self._offset = 0
        if self._index < len(self._parts):
            self._hasher = new_hasher(self._parts[self._index].algorithm)

    def finish(self) -> None:
        """Every part read to its end and matched (what the decoder left is read too)."""
        while self.read(CHUNK):
            pass


class Feeder:
    """Streams a verified artifact, decrypted and decompressed, into a child's stdin.

    Runs on its own thread (writing to a pipe blocks); counts plaintext bytes for
    progress; records the first error instead of raising (the supervisor then kills the
    child: its stdin is closed only once it is gone, so an error never looks like EOF).
    """

    def __init__(
        self,
        artifact: StoredArtifact,
        fd: int,
        key: bytes | None,
        identities: Sequence[X25519Identity] = (),
    ) -> None:
        self.artifact = artifact
        self.fd = fd
        self.key = key
        self.identities = tuple(identities)
        self.bytes = 0
        self.error: BaseException | None = None
        self.broken_pipe = False
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="baqup-feeder", daemon=True)

    def start(self) -> None:
        os.set_blocking(self.fd, True)
        self._thread.start()

    def _stored(self, parts: VerifiedParts) -> Readable:
        if not self.artifact.encrypted:
            return parts
        if self.key is None and not self.identities:
            raise DataError(
                f"{self.artifact.name} is encrypted: set the key ({KEY_VARIABLE}) or, for "
                f"an age artifact, the identity ({IDENTITY_VARIABLE})",
                code="DECRYPTION_FAILED",
            )
        # the stream's first bytes say which it is (v1, v2 or age); a missing key or
        # identity for that one is a DataError there
        return ChunkReader(decrypt_stream(parts, self.key, self.identities))

    def _write(self, data: bytes) -> None:
        _write_all(self.fd, data)
        self.bytes += len(data)

    def _feed(self) -> None:
        parts = VerifiedParts(self.artifact.parts)
        decoded = DecodedReader(self._stored(parts), self.artifact.compression)
        held = b""
        try:
            while chunk := decoded.read(CHUNK):
                if held:
                    self._write(held)
                held = chunk
        except DataError as exc:
            if exc.code != "CHECKSUM_MISMATCH":
                parts.finish()  # stored bytes changed since `locate`: that is the cause
            raise
        parts.finish()  # raises unless every part matched: `held` and EOF never go out
        if held:
            self._write(held)

    def _run(self) -> None:
        try:
            self._feed()
        except BrokenPipeError:
            self.broken_pipe = True
        except BaseException as exc:  # noqa: BLE001 - reported by the supervisor
            self.error = exc
            _wait_for_reader_gone(self.fd)
        finally:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.done.set()


def _wait_for_reader_gone(fd: int) -> None:
    """Block until the pipe's read end is closed (the child and its group are gone)."""
    poller = select.poll()
    poller.register(fd, select.POLLERR | select.POLLHUP)
    while True:
        try:
            if poller.poll():
                return
        except OSError:
            return
