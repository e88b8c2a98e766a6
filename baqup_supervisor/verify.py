"""`baqup verify`: the controller's check of a committed job dir (spec section 4).

A job dir is valid when its `manifest.json` exists, is valid against Appendix C, and
every artifact it names is a regular file inside the job dir with the recorded size
and checksum, split artifacts complete and in order. Reads only; never modifies the
job dir.

The report is JSON. Each problem has an error code (`MANIFEST_MISSING`,
`MANIFEST_INVALID`, `ARTIFACT_MISSING`, `TRUNCATED`, `SIZE_MISMATCH`,
`CHECKSUM_MISMATCH`, `CHECKSUM_UNSUPPORTED`, `PARTS_INCOMPLETE`,
`SECURITY_VIOLATION`, `IO_ERROR`): a failing artifact's entry carries its `code`,
and an invalid report carries `error` (spec section 5: `code`, `category`,
`message`, `exit_code`, of the first problem, and every problem in `problems`).
The caller exits with `error.exit_code`: 65 when incomplete or corrupt, 74 when a
file could not be read; 0 when valid.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from .checksum import ALGORITHMS, hash_file
from .errors import BaqupError, DataError, SecurityViolation, StorageIOError
from .staging import MANIFEST, safe_relative, validate_manifest


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_parts(artifacts: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every split artifact has parts 1..N, each once, in order."""
    errors = []
    groups: dict[str, list[tuple[int, int]]] = {}
    for entry in artifacts:
        if "original" in entry or "part" in entry or "parts" in entry:
            part, parts = _positive(entry.get("part")), _positive(entry.get("parts"))
            if part is None or parts is None:
                errors.append(
                    f"{entry.get('filename')}: bad part number "
                    f"{entry.get('part')!r} of {entry.get('parts')!r}"
                )
                continue
            groups.setdefault(str(entry.get("original")), []).append((part, parts))
    for original, members in groups.items():
        expected = members[0][1]
        numbers = [p for p, _ in members]
        if numbers != list(range(1, expected + 1)) or any(n != expected for _, n in members):
            errors.append(f"{original}: parts {numbers} do not make 1..{expected} in order")
    return errors


class _Problems:
    """The report's `errors` (text, as before codes existed) and the coded problems."""

    def __init__(self, report: dict[str, Any]) -> None:
        self.report = report
        self.errors: list[str] = report["errors"]
        self.coded: list[tuple[str, str]] = []

    def add(self, code: str, message: str) -> None:
        self.errors.append(message)
        self.coded.append((code, message))

    def finish(self) -> dict[str, Any]:
        self.report["valid"] = not self.coded
        if self.coded:
            code, message = self.coded[0]
            more = len(self.coded) - 1
            if more:
                message += f" (and {more} more problem{'s' if more > 1 else ''})"
            error = _error(code, message)
            self.report["error"] = {
                **error.to_error(),
                "problems": [{"code": c, "message": m} for c, m in self.coded],
            }
        return self.report


def _error(code: str, message: str) -> BaqupError:
    if code == "IO_ERROR":
        return StorageIOError(message, code=code)
    if code == "SECURITY_VIOLATION":
        return SecurityViolation(message)
    return DataError(message, code=code)


def verify_job_dir(job_dir: Path, *, check_checksums: bool = True) -> dict[str, Any]:
    report: dict[str, Any] = {
        "job_dir": str(job_dir),
        "valid": False,
        "errors": [],
        "artifacts": [],
    }
    problems = _Problems(report)
    path = job_dir / MANIFEST
    try:
        manifest = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        problems.add("MANIFEST_MISSING", "no manifest.json: the job is incomplete")
        return problems.finish()
    except IsADirectoryError:
        problems.add("MANIFEST_INVALID", "manifest.json is not a file")
        return problems.finish()
    except OSError as exc:
        problems.add("IO_ERROR", f"manifest.json is unreadable: {exc.strerror or exc}")
        return problems.finish()
    except orjson.JSONDecodeError as exc:
        problems.add("MANIFEST_INVALID", f"manifest.json is not JSON: {exc}")
        return problems.finish()
    if not isinstance(manifest, dict):
        problems.add("MANIFEST_INVALID", "manifest.json is not a JSON object")
        return problems.finish()
    invalid = validate_manifest(manifest)
    for problem in invalid:
        problems.add("MANIFEST_INVALID", f"manifest: {problem}")
    if invalid:
        return problems.finish()
    report["job_id"] = manifest["job_id"]
    report["role"] = manifest["role"]
    artifacts: list[Mapping[str, Any]] = manifest["artifacts"]
    for problem in check_parts(artifacts):
        problems.add("PARTS_INCOMPLETE", problem)
    root = os.path.realpath(job_dir)
    for entry in artifacts:
        result = check_artifact(job_dir, root, entry, check_checksums)
        report["artifacts"].append(result)
        for message in result.pop("errors"):
            problems.add(result["code"], f"{result['filename']}: {message}")
    return problems.finish()


def check_artifact(
    job_dir: Path, root: str, entry: Mapping[str, Any], check_checksums: bool
) -> dict[str, Any]:
    """One artifact's entry of the report; its `errors` (text) and, on failure, `code`."""
    name = str(entry["filename"])
    result: dict[str, Any] = {"filename": name, "present": False, "errors": []}

    def fail(code: str, message: str) -> dict[str, Any]:
        result["code"] = code
        result["errors"].append(message)
        return result

    try:
        relative = safe_relative(name)
    except SecurityViolation as exc:
        return fail(exc.code, exc.message)
    target = job_dir / relative
    real = os.path.realpath(target)
    if not real.startswith(root + os.sep) or os.path.islink(target):
        return fail("SECURITY_VIOLATION", "resolves outside the job dir or is a symlink")
    if not target.is_file():
        return fail("ARTIFACT_MISSING", "missing")
    result["present"] = True
    try:
        size = target.stat().st_size
        result["size_bytes"] = size
        if size != entry["size_bytes"]:
            code = "TRUNCATED" if size < entry["size_bytes"] else "SIZE_MISMATCH"
            return fail(code, f"size {size} != manifest {entry['size_bytes']}")
        algorithm = str(entry["checksum"]["algorithm"])
        if algorithm not in ALGORITHMS:
            return fail("CHECKSUM_UNSUPPORTED", f"unsupported checksum algorithm {algorithm!r}")
        if check_checksums:
            actual = hash_file(target, algorithm)
            result["checksum_ok"] = actual == str(entry["checksum"]["value"]).lower()
            if not result["checksum_ok"]:
                return fail("CHECKSUM_MISMATCH", f"{algorithm} mismatch: the file is corrupt")
    except OSError as exc:
        # a disk error is not corruption: the controller may try again (74, transient)
        return fail("IO_ERROR", f"unreadable: {exc.strerror or exc}")
    return result
