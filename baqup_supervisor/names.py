"""The names of a job's own files, and what a child may call an artifact.

Pure functions, no I/O: a child-supplied name becomes a clean path relative to the work
dir or an error. Names that leave the work dir are a SecurityViolation; names baqup-run
keeps for itself at the top of the job dir (where the work dir's top lands) are a
ReservedName; names the manifest could not hold as they are (undecodable bytes) are a
DataError. Deeper in the tree the reserved names are ordinary files.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath

from .errors import DataError, SecurityViolation

MANIFEST = "manifest.json"
STATUS_FILE = ".baqup-status.json"
WORK = ".staging"
ATTEMPTS = ".attempts"
JOB_DIR_LEFTOVERS = ".job-dir"  # `.attempts/{n}.job-dir/`: what it left at the job dir's top
# Names with a meaning at the top of the job dir, where the work dir's top lands; and
# the `.baqup-` prefix, kept for baqup-run's own files (temp files, the status).
RESERVED = frozenset({MANIFEST, STATUS_FILE, WORK, ATTEMPTS})
RESERVED_PREFIX = ".baqup-"
COMPRESSION_BY_SUFFIX = {".zst": "zstd", ".zstd": "zstd", ".gz": "gzip", ".lz4": "lz4"}


class ReservedName(DataError):
    """A file at the top of the work dir has a name baqup-run keeps for itself (exit 65)."""

    default_code = "RESERVED_NAME"


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


def is_reserved(top: str) -> bool:
    return top in RESERVED or top.startswith(RESERVED_PREFIX)


def check_reserved(relative: PurePosixPath | str) -> None:
    """ReservedName when the first component is one of baqup-run's own names; deeper in
    the tree the same names are ordinary files."""
    top = PurePosixPath(relative).parts[0]
    if is_reserved(top):
        raise ReservedName(
            f"{top!r} at the top of the work dir is a name baqup-run reserves "
            f"({', '.join(sorted(RESERVED))}, {RESERVED_PREFIX}*): the child may not write it; "
            "put the file in a subdirectory or give it another name"
        )


def check_encodable(relative: str) -> None:
    """A name the manifest can hold as it is: not undecodable bytes (surrogate escapes)."""
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(relative)
        raise DataError(
            f"artifact name {raw!r} is not valid UTF-8: the manifest could not name the file "
            "it holds; rename it",
            code="INVALID_ARTIFACT_NAME",
        ) from None


def artifact_name(name: str) -> str:
    """A child-named artifact as a clean relative name the commit may take, or the error."""
    relative = safe_relative(name)
    check_reserved(relative)
    check_encodable(str(relative))
    return str(relative)


def compression_of(name: str) -> str:
    return COMPRESSION_BY_SUFFIX.get(PurePosixPath(name).suffix.lower(), "none")
