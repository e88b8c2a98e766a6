"""`baqup verify`: the controller's check of a committed job dir (spec section 4).

A job dir is valid when its `manifest.json` exists, is valid against Appendix C, and
every artifact it names is a regular file inside the job dir with the recorded size
and checksum, split artifacts complete and in order. The report is JSON; the caller
exits 0 when valid and 65 otherwise. Reads only; never modifies the job dir.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from .checksum import ALGORITHMS, hash_file
from .errors import SecurityViolation
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


def verify_job_dir(job_dir: Path, *, check_checksums: bool = True) -> dict[str, Any]:
    report: dict[str, Any] = {
        "job_dir": str(job_dir),
        "valid": False,
        "errors": [],
        "artifacts": [],
    }
    errors: list[str] = report["errors"]
    path = job_dir / MANIFEST
    try:
        manifest = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        errors.append("no manifest.json: the job is incomplete")
        return report
    except (OSError, orjson.JSONDecodeError) as exc:
        errors.append(f"manifest.json is unreadable or not JSON: {exc}")
        return report
    if not isinstance(manifest, dict):
        errors.append("manifest.json is not a JSON object")
        return report
    problems = validate_manifest(manifest)
    errors.extend(f"manifest: {p}" for p in problems)
    if problems:
        return report
    report["job_id"] = manifest["job_id"]
    report["role"] = manifest["role"]
    artifacts: list[Mapping[str, Any]] = manifest["artifacts"]
    errors.extend(check_parts(artifacts))
    root = os.path.realpath(job_dir)
    for entry in artifacts:
        result = check_artifact(job_dir, root, entry, check_checksums)
        report["artifacts"].append(result)
        errors.extend(f"{result['filename']}: {e}" for e in result.pop("errors"))
    report["valid"] = not errors
    return report


def check_artifact(
    job_dir: Path, root: str, entry: Mapping[str, Any], check_checksums: bool
) -> dict[str, Any]:
    name = str(entry["filename"])
    result: dict[str, Any] = {"filename": name, "present": False, "errors": []}
    try:
        relative = safe_relative(name)
    except SecurityViolation as exc:
        result["errors"].append(exc.message)
        return result
    target = job_dir / relative
    real = os.path.realpath(target)
    if not real.startswith(root + os.sep) or os.path.islink(target):
        result["errors"].append("resolves outside the job dir or is a symlink")
        return result
    if not target.is_file():
        result["errors"].append("missing")
        return result
    result["present"] = True
    size = target.stat().st_size
    result["size_bytes"] = size
    if size != entry["size_bytes"]:
        result["errors"].append(f"size {size} != manifest {entry['size_bytes']}")
        return result
    algorithm = str(entry["checksum"]["algorithm"])
    if algorithm not in ALGORITHMS:
        result["errors"].append(f"unsupported checksum algorithm {algorithm!r}")
        return result
    if check_checksums:
        actual = hash_file(target, algorithm)
        result["checksum_ok"] = actual == str(entry["checksum"]["value"]).lower()
        if not result["checksum_ok"]:
            result["errors"].append(f"{algorithm} mismatch: the file is corrupt")
    return result
