"""Checksums of artifacts: sha256 and sha512 through hashlib, blake3 through blake3.

Files are streamed in large chunks (never read whole into memory); blake3 uses its
memory-mapped, multithreaded path. `Hasher` is the streaming form used while an
artifact is being written (streaming capture hashes in the same pass).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

ALGORITHMS = ("sha256", "sha512", "blake3")
CHUNK = 1024 * 1024
# A conservative single-core rate used to decide whether a checksum deserves an intent.
ESTIMATED_RATE = {"sha256": 400e6, "sha512": 600e6, "blake3": 1000e6}


class Hasher(Protocol):
    def update(self, data: Any, /) -> None: ...

    def hexdigest(self) -> str: ...


def new_hasher(algorithm: str, threads: int = 0) -> Hasher:
    if algorithm in ("sha256", "sha512"):
        return hashlib.new(algorithm)
    if algorithm == "blake3":
        import blake3

        max_threads = threads if threads > 0 else blake3.blake3.AUTO
        hasher: Hasher = blake3.blake3(max_threads=max_threads)  # type: ignore[assignment]
        return hasher
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


def estimate_seconds(algorithm: str, size: int) -> float:
    return size / ESTIMATED_RATE.get(algorithm, 400e6)


def hash_file(
    path: Path | str,
    algorithm: str,
    *,
    threads: int = 0,
    progress: Callable[[int], None] | None = None,
) -> str:
    """The hex digest of a file, streamed; `progress(bytes_so_far)` after each chunk."""
    if algorithm == "blake3" and progress is None:
        import blake3

        hasher = blake3.blake3(max_threads=threads if threads > 0 else blake3.blake3.AUTO)
        if os.path.getsize(path) > 0:
            hasher.update_mmap(os.fspath(path))
        return str(hasher.hexdigest())
    digest = new_hasher(algorithm, threads)
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    done = 0
    with open(path, "rb", buffering=0) as handle:
        while True:
            count = handle.readinto(view)
            if not count:
                break
            digest.update(view[:count])
            done += count
            if progress is not None:
                progress(done)
    return digest.hexdigest()
