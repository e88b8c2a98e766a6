"""Compression codecs for artifacts: zstd, gzip, lz4 (optional extra) and none.

Streaming compressors with `compress(data) -> bytes` and `flush() -> bytes`, the
suffix each adds, and the fallback rule: an algorithm that is not installed falls
back to zstd, then gzip, with the reason reported so the caller can emit
`COMPRESSION_FALLBACK`. zstd runs multithreaded when the parallelism setting allows
(its workers release the GIL).

The one way to decompress (`baqup extract`, restores, `baqup decrypt`) is
`DecodedReader`: `read(size)` never returns more than `size` bytes and never holds
more than one bounded step of output, whatever the compression ratio, so a 10 KB
bomb of zeros costs what 10 KB of text does. zstd windows are capped at
`ZSTD_WINDOW_LOG_MAX` on both sides (see there). Truncated, corrupt and over-window
streams are `DataError`s (65), never a silent short read.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from typing import IO, Protocol, cast

from .errors import DataError

ZSTD_JOB_SIZE = 4 * 1024 * 1024
# zstd's own decoder limit is a 128 MiB window (windowLog 27), which alone breaks the
# 100 MB bound on restore. Every level up to 20 uses at most 32 MiB (level 3: 2 MiB,
# level 19: 8 MiB); levels 21 and 22 are capped to it when we compress, so every
# artifact we write decodes within the cap, and a frame asking for more is refused.
ZSTD_WINDOW_LOG_MAX = 25
CHUNK = 1024 * 1024  # the most one DecodedReader.read returns
INPUT_CHUNK = 128 * 1024  # compressed bytes read per step
SUFFIX = {"zstd": ".zst", "gzip": ".gz", "lz4": ".lz4", "none": ""}
ALGORITHMS = tuple(SUFFIX)


class Codec(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self) -> bytes: ...


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def available(algorithm: str) -> bool:
    if algorithm == "lz4":
        return find_spec("lz4") is not None
    if algorithm == "zstd":
        return find_spec("zstandard") is not None
    return algorithm in ("gzip", "none")


def worker_threads(parallelism: int) -> int:
    """zstd workers: BAQUP_AGENT_PARALLELISM, or every CPU this process may use (0)."""
    if parallelism > 0:
        return parallelism
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Choice:
    algorithm: str
    level: int
    fallback_from: str | None = None
    reason: str | None = None

    @property
    def suffix(self) -> str:
        return SUFFIX[self.algorithm]


def choose(enabled: bool, algorithm: str, level: int) -> Choice:
    """The algorithm actually used, with the fallback reason when it differs."""
    if not enabled or algorithm == "none":
        return Choice("none", 0)
    if available(algorithm):
        return Choice(algorithm, level)
    for candidate in ("zstd", "gzip"):
        if candidate != algorithm and available(candidate):
            fallback_level = level if candidate == "zstd" else min(max(level, 1), 9)
            reason = f"{algorithm} is not installed (pip install 'baqup-supervisor[{algorithm}]')"
            return Choice(candidate, fallback_level, algorithm, reason)
    return Choice("none", 0, algorithm, f"{algorithm} is not installed")


class _Identity:
    def compress(self, data: bytes, /) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


class _Lz4Encoder:
    def __init__(self, level: int) -> None:
        import lz4.frame

        self._ctx = lz4.frame.LZ4FrameCompressor(compression_level=max(0, level))
        self._started = False

    def compress(self, data: bytes, /) -> bytes:
        head = b""
        if not self._started:
            head = self._ctx.begin()
            self._started = True
        body: bytes = self._ctx.compress(data)
        return head + body

    def flush(self) -> bytes:
        head: bytes = b"" if self._started else self._ctx.begin()
        self._started = True
        tail: bytes = self._ctx.flush()
        return head + tail


def compressor(algorithm: str, level: int, threads: int = 1) -> Codec:
    if algorithm == "zstd":
        import zstandard

        workers = threads if threads > 1 else 0
        # 4 MiB jobs instead of zstd's default (8 MiB at level 3): the same speed and ratio,
        # half the buffers held per worker, so memory stays flat on large artifacts
        window_log = zstandard.ZstdCompressionParameters.from_level(level).window_log
        params = zstandard.ZstdCompressionParameters.from_level(
            level,
            threads=workers,
            job_size=ZSTD_JOB_SIZE if workers else 0,
            window_log=min(window_log, ZSTD_WINDOW_LOG_MAX),
        )
        codec: Codec = zstandard.ZstdCompressor(compression_params=params).compressobj()
        return codec
    if algorithm == "gzip":
        return zlib.compressobj(min(max(level, 1), 9), zlib.DEFLATED, 31)
    if algorithm == "lz4":
        return _Lz4Encoder(level)
    if algorithm == "none":
        return _Identity()
    raise ValueError(f"unknown compression {algorithm!r}")


# --- decompression, in bounded steps -----------------------------------------------------


class ChunkReader:
    """`read(size)` over an iterator of byte chunks (a decrypted stream, say)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._pending = memoryview(b"")

    def read(self, size: int = -1, /) -> bytes:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._pending = memoryview(chunk)
        if size < 0:
            size = len(self._pending)
        out, self._pending = self._pending[:size], self._pending[size:]
        return bytes(out)


class DecodedReader:
    """The decompressed stream of `source`: `read(size)` returns at most `size` bytes
    (`CHUNK` when size is negative), b"" only at the end of a complete stream.

    Concatenated frames or members decode as one stream, as `zstd -d` and `gzip -d` do.
    """

    def __init__(self, source: Readable, algorithm: str) -> None:
        self.algorithm = algorithm
        self._engine: Readable
        if algorithm == "zstd":
            self._engine = _ZstdEngine(source)
        elif algorithm == "gzip":
            self._engine = _ZlibEngine(source)
        elif algorithm == "lz4":
            self._engine = _Lz4Engine(source)
        elif algorithm == "none":
            self._engine = source
        else:
            raise ValueError(f"unknown compression {algorithm!r}")

    def read(self, size: int = -1, /) -> bytes:
        if size < 0 or size > CHUNK:
            size = CHUNK
        if size == 0:
            return b""
        try:
            return self._engine.read(size)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - any codec error is corrupt data
            raise DataError(
                f"the {self.algorithm} stream is corrupt ({type(exc).__name__}: {exc})"
            ) from None


def _truncated(algorithm: str) -> DataError:
    return DataError(f"the {algorithm} stream is truncated", code="TRUNCATED")


class _ZlibEngine:
    """gzip members (or a zlib stream), each inflated with zlib's `max_length`."""

    def __init__(self, source: Readable) -> None:
        self._source = source
        self._obj = zlib.decompressobj(47)  # gzip or zlib header, auto-detected
        self._input = b""
        self._source_done = False
        self._member_started = False

    def _more(self) -> None:
        if not self._input and not self._source_done:
            self._input = self._source.read(INPUT_CHUNK)
            self._source_done = not self._input

    def read(self, size: int = -1, /) -> bytes:
        while True:
            self._more()
            if self._obj.eof:
                if not self._input:
                    return b""
                self._obj = zlib.decompressobj(47)  # the next member
                self._member_started = False
            self._member_started = self._member_started or bool(self._input)
            out = self._obj.decompress(self._input, size)
            self._input = self._obj.unused_data if self._obj.eof else self._obj.unconsumed_tail
            if out:
                return out
            if self._source_done and not self._input and not self._obj.eof:
                if self._member_started:
                    raise _truncated("gzip")
                return b""  # an empty stream


class _Lz4Engine:
    """lz4 frames, each decoded with python-lz4's `max_length`."""

    def __init__(self, source: Readable) -> None:
        import lz4.frame

        self._new = lz4.frame.LZ4FrameDecompressor
        self._source = source
        self._ctx = self._new()
        self._started = False  # a byte of the current frame was given

    def read(self, size: int = -1, /) -> bytes:
        while True:
            if self._ctx.eof:  # a finished frame: maybe another follows
                rest: bytes = self._ctx.unused_data or self._source.read(INPUT_CHUNK)
                if not rest:
                    return b""
                self._ctx = self._new()
                data = rest
            elif self._ctx.needs_input:
                data = self._source.read(INPUT_CHUNK)
                if not data:
                    if self._started:
                        raise _truncated("lz4")
                    return b""
            else:
                data = b""  # output is waiting
            self._started = self._started or bool(data)
            out: bytes = self._ctx.decompress(data, max_length=size)
            if self._ctx.eof:
                self._started = False
            if out:
                return out


class _ZstdEngine:
    """zstandard's stream reader (bounded output per read), across frames, with the
    window capped; `ZstdFrames` watches the same bytes for truncation."""

    def __init__(self, source: Readable) -> None:
        import zstandard

        self._frames = ZstdFrames()
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << ZSTD_WINDOW_LOG_MAX)
        self._reader = dctx.stream_reader(
            cast("IO[bytes]", _Watched(source, self._frames)),
            read_size=INPUT_CHUNK,
            read_across_frames=True,
            closefd=False,
        )

    def read(self, size: int = -1, /) -> bytes:
        out: bytes = self._reader.read(size)
        if not out:
            self._frames.finish()
        return out


class _Watched:
    def __init__(self, source: Readable, frames: ZstdFrames) -> None:
        self._source = source
        self._frames = frames

    def read(self, size: int = -1, /) -> bytes:
        data = self._source.read(size)
        self._frames.feed(data)
        return data


ZSTD_MAGIC = 0xFD2FB528
BLOCK_MAX = 128 * 1024


class ZstdFrames:
    """Where a zstd stream stands in its frame structure (RFC 8878), fed its bytes.

    A pure parser: it never decodes, it reads frame and block headers and skips
    payloads, so it can tell a stream cut at a frame boundary from a truncated one
    (the decoder cannot), and refuse a window over the cap with a clear message
    before the decoder allocates it.
    """

    def __init__(self, window_log_max: int = ZSTD_WINDOW_LOG_MAX) -> None:
        self.window_max = 1 << window_log_max
        self._state = "magic"
        self._need = 4
        self._buffer = bytearray()
        self._skip = 0
        self._checksum = False
        self.frames = 0

    @property
    def at_boundary(self) -> bool:
        return self._state == "magic" and not self._buffer and not self._skip

    def finish(self) -> None:
        if not self.at_boundary:
            raise _truncated("zstd")

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        position = 0
        while position < len(view):
            if self._skip:
                step = min(self._skip, len(view) - position)
                self._skip -= step
                position += step
                if not self._skip and self._state == "skip-frame":
                    self._expect("magic", 4)
                continue
            step = min(self._need - len(self._buffer), len(view) - position)
            self._buffer += view[position : position + step]
            position += step
            if len(self._buffer) == self._need:
                field = bytes(self._buffer)
                self._buffer.clear()
                self._advance(field)

    def _expect(self, state: str, need: int) -> None:
        self._state = state
        self._need = need
        if need == 0:
            self._advance(b"")

    def _advance(self, field: bytes) -> None:
        state = self._state
        if state == "magic":
            (magic,) = struct.unpack("<I", field)
            if magic == ZSTD_MAGIC:
                self.frames += 1
                self._expect("descriptor", 1)
            elif magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame
                self._expect("skip-size", 4)
            else:
                raise DataError(f"not a zstd frame (magic {field.hex()})")
        elif state == "skip-size":
            (self._skip,) = struct.unpack("<I", field)
            self._state = "skip-frame"
            if not self._skip:
                self._expect("magic", 4)
        elif state == "descriptor":
            self._descriptor = descriptor = field[0]
            if descriptor & 0x08:
                raise DataError("zstd frame header has its reserved bit set")
            single = bool(descriptor & 0x20)
            self._checksum = bool(descriptor & 0x04)
            fcs_size = (1 if single else 0, 2, 4, 8)[descriptor >> 6]
            dict_size = (0, 1, 2, 4)[descriptor & 0x03]
            self._expect("header", (0 if single else 1) + dict_size + fcs_size)
        elif state == "header":
            self._check_window(field)
            self._expect("block", 3)
        elif state == "block":
            header = int.from_bytes(field, "little")
            last, kind, size = header & 1, (header >> 1) & 3, header >> 3
            if kind == 3:
                raise DataError("zstd block of the reserved type: the stream is corrupt")
            if size > BLOCK_MAX:
                raise DataError(f"zstd block of {size} bytes (over {BLOCK_MAX}): corrupt")
            self._skip = 1 if kind == 1 else size
            if last:
                self._expect("checksum", 4) if self._checksum else self._expect("magic", 4)
            else:
                self._expect("block", 3)
        elif state == "checksum":
            self._expect("magic", 4)

    def _check_window(self, header: bytes) -> None:
        descriptor = self._descriptor
        single = bool(descriptor & 0x20)
        if single:  # the window is the content size
            fcs = header[len(header) - (1, 2, 4, 8)[descriptor >> 6] :]
            window = int.from_bytes(fcs, "little") + (256 if len(fcs) == 2 else 0)
        else:
            exponent, mantissa = header[0] >> 3, header[0] & 7
            base = 1 << (10 + exponent)
            window = base + (base // 8) * mantissa
        if window > self.window_max:
            raise DataError(
                f"zstd frame needs a {window >> 20} MiB window, over the "
                f"{self.window_max >> 20} MiB this decoder allows (memory stays bounded); "
                "recompress it without --long or --ultra levels",
                code="WINDOW_TOO_LARGE",
            )
