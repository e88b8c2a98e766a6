"""Compression codecs (compression.py), pure, checked against the real decoders.

Streaming `compressor`/`DecodedReader` round trips for zstd, gzip, lz4 and none with the
data fed in random-sized pieces (hypothesis); concatenated zstd frames decode as one
stream (as `zstd -d` does); the streams we write are read by the real `zstd -d`,
`gzip -d` and python-lz4's frame decoder; `choose` picks what it is asked for.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator

import lz4.frame
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baqup_supervisor.compression import (
    ALGORITHMS,
    SUFFIX,
    ChunkReader,
    DecodedReader,
    choose,
    compressor,
)

CODECS = ["zstd", "gzip", "lz4", "none"]


def pieces(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    """`data` cut at the given sizes (cycled), every byte exactly once; empty pieces kept."""
    offset = 0
    index = 0
    while offset < len(data):
        size = sizes[index % len(sizes)] if sizes else len(data)
        index += 1
        yield data[offset : offset + size]
        offset += size
        if index > 10 * len(data) + 10:  # only zero sizes: take the rest
            yield data[offset:]
            return


def compress(
    algorithm: str, data: bytes, sizes: list[int], level: int = 3, threads: int = 1
) -> bytes:
    codec = compressor(algorithm, level, threads)
    out = [codec.compress(piece) for piece in pieces(data, sizes)]
    out.append(codec.flush())
    return b"".join(out)


def decompress(algorithm: str, stream: bytes, sizes: list[int]) -> bytes:
    """`stream` fed in pieces of `sizes`, read back in reads of the same sizes (at least 1)."""
    reader = DecodedReader(ChunkReader(pieces(stream, sizes)), algorithm)
    out = []
    for index in range(10 * len(stream) + 10_000_000):
        chunk = reader.read(max(1, sizes[index % len(sizes)]))
        if not chunk:
            break
        out.append(chunk)
    return b"".join(out)


def real_decompress(algorithm: str, stream: bytes) -> bytes:
    """The real decoders: `zstd -d`, `gzip -d`, python-lz4's frame decoder."""
    if algorithm == "lz4":
        out: bytes = lz4.frame.decompress(stream)
        return out
    if algorithm == "none":
        return stream
    tool = {"zstd": ["zstd", "-d", "-c", "-q"], "gzip": ["gzip", "-d", "-c"]}[algorithm]
    return subprocess.run(tool, input=stream, capture_output=True, check=True).stdout


def text(size: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"0123", b"\n", b"INSERT INTO t"]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" "
    return bytes(out[:size])


binary_or_text = st.one_of(
    st.binary(max_size=20_000),
    st.integers(0, 200_000).map(text),
    st.builds(lambda a, b: a * b, st.binary(min_size=1, max_size=50), st.integers(1, 2000)),
)
piece_sizes = st.lists(st.integers(0, 5000), min_size=1, max_size=10)


# --- round trips ----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    algorithm=st.sampled_from(CODECS),
    data=binary_or_text,
    in_sizes=piece_sizes,
    out_sizes=piece_sizes,
    threads=st.sampled_from([1, 2]),
)
def test_streaming_round_trip(
    algorithm: str, data: bytes, in_sizes: list[int], out_sizes: list[int], threads: int
) -> None:
    stream = compress(algorithm, data, in_sizes, threads=threads)
    assert decompress(algorithm, stream, out_sizes) == data
    if algorithm == "none":
        assert stream == data


@pytest.mark.parametrize("algorithm", CODECS)
@pytest.mark.parametrize("size", [0, 1, 65_536, 1_000_003], ids=lambda n: f"{n}B")
def test_real_decoders_read_our_streams(algorithm: str, size: int) -> None:
    data = text(size, seed=size)
    stream = compress(algorithm, data, [4096, 1, 70_000])
    assert real_decompress(algorithm, stream) == data
    if algorithm != "none" and size > 60_000:
        assert len(stream) < size / 2


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    algorithm=st.sampled_from(["zstd", "gzip", "lz4"]),
    data=binary_or_text,
    in_sizes=piece_sizes,
    threads=st.sampled_from([1, 3]),
)
def test_real_decoders_read_any_stream(
    algorithm: str, data: bytes, in_sizes: list[int], threads: int
) -> None:
    stream = compress(algorithm, data, in_sizes, threads=threads)
    assert real_decompress(algorithm, stream) == data


@pytest.mark.parametrize("algorithm", ["zstd", "gzip", "lz4"])
@pytest.mark.parametrize("level", [1, 3, 9])
def test_levels(algorithm: str, level: int) -> None:
    data = text(200_000, seed=level)
    stream = compress(algorithm, data, [8192], level=level)
    assert decompress(algorithm, stream, [1000]) == data
    assert real_decompress(algorithm, stream) == data


def test_incompressible_data_round_trips() -> None:
    data = os.urandom(300_000)
    for algorithm in CODECS:
        stream = compress(algorithm, data, [65_536])
        assert decompress(algorithm, stream, [4096]) == data
        assert real_decompress(algorithm, stream) == data


# --- concatenated zstd frames -------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(binary_or_text, min_size=1, max_size=4),
    out_sizes=piece_sizes,
)
def test_concatenated_zstd_frames_decode_as_one_stream(
    frames: list[bytes], out_sizes: list[int]
) -> None:
    stream = b"".join(compress("zstd", frame, [10_000]) for frame in frames)
    assert decompress("zstd", stream, out_sizes) == b"".join(frames)


@pytest.mark.parametrize("cut", ["at-boundary", "one-before", "one-after", "bytewise"])
def test_concatenated_zstd_frames_split_around_the_boundary(cut: str) -> None:
    first, second, third = text(50_000, 1), b"", text(30_000, 2)
    frames = [compress("zstd", f, [7777]) for f in (first, second, third)]
    stream = b"".join(frames)
    boundary = len(frames[0])
    sizes = {
        "at-boundary": [boundary, len(frames[1]), len(stream)],
        "one-before": [boundary - 1, 2, len(stream)],
        "one-after": [boundary + 1, len(stream)],
        "bytewise": [1],
    }[cut]
    expected = first + second + third
    assert decompress("zstd", stream, sizes) == expected
    assert real_decompress("zstd", stream) == expected  # the same as zstd -d


# --- choose --------------------------------------------------------------------------------


def test_choose_what_is_asked_when_installed() -> None:
    for algorithm in ("zstd", "gzip", "lz4"):
        choice = choose(True, algorithm, 5)
        assert (choice.algorithm, choice.level, choice.fallback_from) == (algorithm, 5, None)
        assert choice.suffix == SUFFIX[algorithm]
    assert choose(True, "none", 5).algorithm == "none"
    off = choose(False, "zstd", 5)
    assert (off.algorithm, off.suffix, off.fallback_from) == ("none", "", None)


def test_suffixes_and_unknown_algorithms() -> None:
    assert SUFFIX == {"zstd": ".zst", "gzip": ".gz", "lz4": ".lz4", "none": ""}
    assert set(ALGORITHMS) == set(CODECS)
    with pytest.raises(ValueError, match="unknown compression"):
        compressor("brotli", 3)
    with pytest.raises(ValueError, match="unknown compression"):
        DecodedReader(ChunkReader([]), "brotli")
