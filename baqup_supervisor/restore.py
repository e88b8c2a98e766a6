"""Reading artifacts back: split parts as one stream, decryption, decompression.

Owns the read side of what capture.py writes, for `baqup decrypt` and for restores:
`ConcatReader` reads numbered parts as one stream; `decoded_output` decompresses and
writes plaintext to stdout or, atomically, to a file (never a partial file on error).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from .compression import decompressor
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
