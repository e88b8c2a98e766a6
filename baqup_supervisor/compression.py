"""Compression codecs for artifacts: zstd, gzip, lz4 (optional extra) and none.

Streaming objects with `compress(data) -> bytes` and `flush() -> bytes` (and the
matching decompressors), the suffix each adds, and the fallback rule: an algorithm
that is not installed falls back to zstd, then gzip, with the reason reported so
the caller can emit `COMPRESSION_FALLBACK`. zstd runs multithreaded when the
parallelism setting allows (its workers release the GIL).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any, Protocol

ZSTD_JOB_SIZE = 4 * 1024 * 1024
SUFFIX = {"zstd": ".zst", "gzip": ".gz", "lz4": ".lz4", "none": ""}
ALGORITHMS = tuple(SUFFIX)


class Codec(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self) -> bytes: ...


class Decoder(Protocol):
    def decompress(self, data: bytes, /) -> bytes: ...

    def flush(self) -> bytes: ...

    @property
    def finished(self) -> bool:
        """Whether the stream so far ends where a compressed stream may end."""
        ...


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

    def decompress(self, data: bytes, /) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""

    @property
    def finished(self) -> bool:
        return True


class _GzipDecoder:
    """Decodes concatenated gzip members (as `gzip -d` does); zlib streams too."""

    def __init__(self) -> None:
        self._obj = zlib.decompressobj(47)  # gzip or zlib header, auto-detected
        self._seen = False

    def decompress(self, data: bytes, /) -> bytes:
        if not data:
            return b""
        self._seen = True
        out = [self._obj.decompress(data)]
        while self._obj.eof and self._obj.unused_data:
            rest = self._obj.unused_data
            self._obj = zlib.decompressobj(47)
            out.append(self._obj.decompress(rest))
        return b"".join(out)

    def flush(self) -> bytes:
        return self._obj.flush()

    @property
    def finished(self) -> bool:
        return self._obj.eof or not self._seen


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


class _Lz4Decoder:
    def __init__(self) -> None:
        import lz4.frame

        self._ctx = lz4.frame.LZ4FrameDecompressor()
        self._seen = False

    @property
    def finished(self) -> bool:
        return bool(self._ctx.eof) or not self._seen

    def decompress(self, data: bytes, /) -> bytes:
        if not data:
            return b""
        if self._ctx.eof:  # a new frame after a finished one
            import lz4.frame

            self._ctx = lz4.frame.LZ4FrameDecompressor()
        self._seen = True
        import lz4.frame

        out = [self._ctx.decompress(data)]
        while self._ctx.eof and self._ctx.unused_data:
            rest = self._ctx.unused_data
            self._ctx = lz4.frame.LZ4FrameDecompressor()
            out.append(self._ctx.decompress(rest))
        return b"".join(out)

    def flush(self) -> bytes:
        return b""


class _ZstdDecoder:
    """Decodes concatenated zstd frames (as `zstd -d` does)."""

    def __init__(self) -> None:
        import zstandard

        self._zstd = zstandard
        self._obj: Any = zstandard.ZstdDecompressor().decompressobj()
        self._seen = False

    def decompress(self, data: bytes, /) -> bytes:
        if not data:
            return b""
        if self._obj.eof:  # a new frame after a finished one
            self._obj = self._zstd.ZstdDecompressor().decompressobj()
        self._seen = True
        out = [self._obj.decompress(data)]
        while self._obj.eof and self._obj.unused_data:
            rest = self._obj.unused_data
            self._obj = self._zstd.ZstdDecompressor().decompressobj()
            out.append(self._obj.decompress(rest))
        return b"".join(out)

    def flush(self) -> bytes:
        return b""

    @property
    def finished(self) -> bool:
        return bool(self._obj.eof) or not self._seen


def compressor(algorithm: str, level: int, threads: int = 1) -> Codec:
    if algorithm == "zstd":
        import zstandard

        workers = threads if threads > 1 else 0
        # 4 MiB jobs instead of zstd's default (8 MiB at level 3): the same speed and ratio,
        # half the buffers held per worker, so memory stays flat on large artifacts
        params = zstandard.ZstdCompressionParameters.from_level(
            level, threads=workers, job_size=ZSTD_JOB_SIZE if workers else 0
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


def decompressor(algorithm: str) -> Decoder:
    if algorithm == "zstd":
        return _ZstdDecoder()
    if algorithm == "gzip":
        return _GzipDecoder()
    if algorithm == "lz4":
        return _Lz4Decoder()
    if algorithm == "none":
        return _Identity()
    raise ValueError(f"unknown compression {algorithm!r}")
