"""`baqup verify JOB_DIR`: the controller's check of a committed job dir.

The job dirs are made by real `baqup-run` jobs (two artifacts; a stream split into
parts), copied per test and then damaged: a missing or unreadable manifest, one that
fails Appendix C, a missing, truncated or corrupt artifact, a missing split part, names
that leave the job dir. Valid is exit 0; anything else is exit 65 with the problem
named in the JSON report on stdout. `--no-checksums` checks sizes only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from baqup_supervisor.staging import validate_manifest
from tests.conftest import python_child, run_baqup

WRITE_TWO = r"""
import os, random
from pathlib import Path
work = Path(os.environ["BAQUP_WORK_DIR"])
rng = random.Random(5)
(work / "db.sql").write_bytes(b"".join(b"INSERT %d;\n" % rng.randrange(10**6) for _ in range(8000)))
(work / "blob.bin").write_bytes(rng.randbytes(50_000))
"""
SPLIT_INPUT_SIZE = 50_000
SPLIT_SIZE = 16 * 1024


def base_env(root: Path) -> dict[str, str]:
    job_id = str(uuid.uuid4())
    staging = root / "staging"
    staging.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAQUP_")}
    env.update(
        BAQUP_JOB_ID=job_id,
        BAQUP_STAGING_DIR=str(staging),
        BAQUP_BUS_URL=f"file://{root / 'bus'}",
        BAQUP_BUS_FALLBACK_DIR=str(root / "fallback"),
        BAQUP_AGENT_ID=f"agent-verify-{job_id[:6]}",
        BAQUP_JOB_RETRY_MAX="0",
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two committed job dirs made by real jobs: `files` and `split`."""
    out = {}
    root = tmp_path_factory.mktemp("files-job")
    env = base_env(root)
    done = run_baqup(["--", *python_child(WRITE_TWO)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    out["files"] = Path(env["BAQUP_STAGING_DIR"]) / env["BAQUP_JOB_ID"]

    root = tmp_path_factory.mktemp("split-job")
    env = base_env(root)
    source = root / "input.bin"
    source.write_bytes(os.urandom(SPLIT_INPUT_SIZE))
    env.update(BAQUP_ARTIFACT_SPLIT_SIZE="16K", BAQUP_ARTIFACT_COMPRESS="false")
    done = run_baqup(["--stdout-artifact", "stream.bin", "--", "cat", str(source)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    out["split"] = Path(env["BAQUP_STAGING_DIR"]) / env["BAQUP_JOB_ID"]
    return out


def copy_job(built: dict[str, Path], which: str, tmp_path: Path) -> Path:
    target = tmp_path / "jobs" / built[which].name
    shutil.copytree(built[which], target, symlinks=True)
    return target


@pytest.fixture
def files_job(built: dict[str, Path], tmp_path: Path) -> Path:
    return copy_job(built, "files", tmp_path)


@pytest.fixture
def split_job(built: dict[str, Path], tmp_path: Path) -> Path:
    return copy_job(built, "split", tmp_path)


def verify(job: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAQUP_")}
    done = run_baqup(["verify", *extra, str(job)], env, tool=True, timeout=30)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stdout.strip(), f"exit {done.returncode}, no report: {done.stderr[-2000:]}"
    report: dict[str, Any] = json.loads(done.stdout)
    assert report["valid"] is (done.returncode == 0)
    return done.returncode, report


def read_manifest(job: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((job / "manifest.json").read_text())
    return document


def write_manifest(job: Path, document: dict[str, Any]) -> None:
    (job / "manifest.json").write_text(json.dumps(document, indent=2))


def snapshot(job: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under the job dir: (size, mtime_ns, sha256)."""
    out = {}
    for path in sorted(job.rglob("*")):
        if path.is_file() and not path.is_symlink():
            info = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(job))] = (info.st_size, info.st_mtime_ns, digest)
    return out


def errors_text(report: dict[str, Any]) -> str:
    return "\n".join(report["errors"])


def entry_for(report: dict[str, Any], filename: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [a for a in report["artifacts"] if a["filename"] == filename]
    assert len(found) == 1, report["artifacts"]
    return found[0]


# --- valid -----------------------------------------------------------------------------------


def test_valid_job_dir(files_job: Path) -> None:
    before = snapshot(files_job)
    code, report = verify(files_job)
    assert code == 0, report
    assert report["errors"] == []
    manifest = read_manifest(files_job)
    assert validate_manifest(manifest) == []
    assert report["job_id"] == manifest["job_id"] == files_job.name
    assert report["role"] == "snapshot"
    assert sorted(a["filename"] for a in report["artifacts"]) == ["blob.bin", "db.sql"]
    for artifact in report["artifacts"]:
        assert artifact["present"] is True
        assert artifact["checksum_ok"] is True
        assert artifact["size_bytes"] == (files_job / artifact["filename"]).stat().st_size
    assert snapshot(files_job) == before  # verify only reads


def test_valid_split_job_dir(split_job: Path) -> None:
    code, report = verify(split_job)
    assert code == 0, report
    names = [a["filename"] for a in report["artifacts"]]
    assert names == [f"stream.bin.{i:03d}" for i in range(1, 5)]
    assert sum(a["size_bytes"] for a in report["artifacts"]) == SPLIT_INPUT_SIZE


# --- the manifest ----------------------------------------------------------------------------


def test_missing_manifest_is_incomplete(files_job: Path) -> None:
    (files_job / "manifest.json").unlink()
    code, report = verify(files_job)
    assert code == 65
    assert "incomplete" in errors_text(report)


def test_a_job_dir_that_does_not_exist(tmp_path: Path) -> None:
    code, report = verify(tmp_path / "no-such-job")
    assert code == 65
    assert "incomplete" in errors_text(report)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'"a string"', b"null"],
    ids=["broken", "empty", "binary", "array", "string", "null"],
)
def test_manifest_not_a_json_object(files_job: Path, content: bytes) -> None:
    (files_job / "manifest.json").write_bytes(content)
    code, report = verify(files_job)
    assert code == 65
    assert "manifest" in errors_text(report)
    assert report["artifacts"] == []


def test_truncated_manifest(files_job: Path) -> None:
    path = files_job / "manifest.json"
    text = path.read_bytes()
    path.write_bytes(text[: len(text) // 2])
    code, report = verify(files_job)
    assert code == 65
    assert "JSON" in errors_text(report)


def _drop(key: str) -> Callable[[dict[str, Any]], str]:
    def change(document: dict[str, Any]) -> str:
        del document[key]
        return key

    return change


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], str]:
    def change(document: dict[str, Any]) -> str:
        document[key] = value
        return key

    return change


def _set_artifact(key: str, value: Any) -> Callable[[dict[str, Any]], str]:
    def change(document: dict[str, Any]) -> str:
        if value is None:
            del document["artifacts"][0][key]
        else:
            document["artifacts"][0][key] = value
        return key

    return change


def _drop_checksum_value(document: dict[str, Any]) -> str:
    del document["artifacts"][0]["checksum"]["value"]
    return "value"


APPENDIX_C = {
    "missing-agent": _drop("agent"),
    "missing-job_id": _drop("job_id"),
    "missing-created_at": _drop("created_at"),
    "missing-artifacts": _drop("artifacts"),
    "bad-uuid": _set("job_id", "not-a-uuid"),
    "bad-uuid-short": _set("job_id", "1234-5678"),
    "bad-created_at": _set("created_at", "yesterday at noon"),
    "bad-created_at-date": _set("created_at", "2024-13-45T99:00:00Z"),
    "bad-version": _set("version", "2.0"),
    "bad-role": _set("role", "backup"),
    "no-artifacts": _set("artifacts", []),
    "negative-size": _set_artifact("size_bytes", -1),
    "size-as-text": _set_artifact("size_bytes", "12"),
    "missing-filename": _set_artifact("filename", None),
    "missing-checksum-value": _drop_checksum_value,
    "encrypted-not-bool": _set_artifact("encrypted", "no"),
}


@pytest.mark.parametrize("change", APPENDIX_C.values(), ids=APPENDIX_C.keys())
def test_manifest_failing_appendix_c(
    files_job: Path, change: Callable[[dict[str, Any]], str]
) -> None:
    document = read_manifest(files_job)
    field = change(document)
    assert validate_manifest(document) != []
    write_manifest(files_job, document)
    code, report = verify(files_job)
    assert code == 65
    text = errors_text(report)
    assert "manifest" in text
    assert field in text, text


# --- artifacts -------------------------------------------------------------------------------


def test_missing_artifact(files_job: Path) -> None:
    (files_job / "blob.bin").unlink()
    code, report = verify(files_job)
    assert code == 65
    assert any(e.startswith("blob.bin:") and "missing" in e for e in report["errors"])
    assert entry_for(report, "blob.bin")["present"] is False
    assert entry_for(report, "db.sql")["checksum_ok"] is True


@pytest.mark.parametrize("name", ["db.sql", "blob.bin"])
def test_truncated_artifact(files_job: Path, name: str) -> None:
    path = files_job / name
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    code, report = verify(files_job)
    assert code == 65
    assert any(e.startswith(f"{name}:") and "size" in e for e in report["errors"]), report
    assert len(report["errors"]) == 1


def test_grown_artifact(files_job: Path) -> None:
    with (files_job / "db.sql").open("ab") as handle:
        handle.write(b"x")
    code, report = verify(files_job)
    assert code == 65
    assert any(e.startswith("db.sql:") for e in report["errors"])


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_one_flipped_byte(files_job: Path, where: str) -> None:
    path = files_job / "db.sql"
    data = bytearray(path.read_bytes())
    index = {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[where]
    data[index] ^= 0x01
    path.write_bytes(bytes(data))
    code, report = verify(files_job)
    assert code == 65
    assert any(e.startswith("db.sql:") and "mismatch" in e for e in report["errors"]), report
    assert entry_for(report, "db.sql")["checksum_ok"] is False
    assert entry_for(report, "blob.bin")["checksum_ok"] is True


def test_artifact_replaced_by_a_directory(files_job: Path) -> None:
    (files_job / "blob.bin").unlink()
    (files_job / "blob.bin").mkdir()
    code, report = verify(files_job)
    assert code == 65
    assert any(e.startswith("blob.bin:") for e in report["errors"])


# --- split artifacts -------------------------------------------------------------------------


def test_missing_middle_part_removed_from_the_manifest_too(split_job: Path) -> None:
    document = read_manifest(split_job)
    assert [e["part"] for e in document["artifacts"]] == [1, 2, 3, 4]
    (split_job / "stream.bin.002").unlink()
    document["artifacts"] = [e for e in document["artifacts"] if e["part"] != 2]
    write_manifest(split_job, document)
    assert validate_manifest(document) == []
    code, report = verify(split_job)
    assert code == 65
    assert "parts" in errors_text(report)


def test_missing_last_part_removed_from_the_manifest_too(split_job: Path) -> None:
    document = read_manifest(split_job)
    (split_job / "stream.bin.004").unlink()
    document["artifacts"] = document["artifacts"][:3]
    write_manifest(split_job, document)
    code, report = verify(split_job)
    assert code == 65
    assert "parts" in errors_text(report)


def test_missing_middle_part_still_in_the_manifest(split_job: Path) -> None:
    (split_job / "stream.bin.002").unlink()
    code, report = verify(split_job)
    assert code == 65
    assert any(e.startswith("stream.bin.002:") and "missing" in e for e in report["errors"])


def test_parts_listed_out_of_order(split_job: Path) -> None:
    document = read_manifest(split_job)
    entries = document["artifacts"]
    entries[1], entries[2] = entries[2], entries[1]
    write_manifest(split_job, document)
    code, report = verify(split_job)
    assert code == 65
    assert "parts" in errors_text(report)


def test_two_parts_with_swapped_contents(split_job: Path) -> None:
    one, two = split_job / "stream.bin.001", split_job / "stream.bin.002"
    first, second = one.read_bytes(), two.read_bytes()
    one.write_bytes(second)
    two.write_bytes(first)
    code, report = verify(split_job)
    assert code == 65
    assert {e.split(":")[0] for e in report["errors"]} == {"stream.bin.001", "stream.bin.002"}


@pytest.mark.parametrize(
    ("field", "value"),
    [("part", "two"), ("part", None), ("parts", "four"), ("parts", None), ("part", [2])],
)
def test_malformed_part_fields_are_a_data_error(split_job: Path, field: str, value: Any) -> None:
    # extra fields are allowed by Appendix C, so the manifest is valid JSON and schema-valid;
    # a part number that is not a number is corrupt (65 with a report), never a crash (70)
    document = read_manifest(split_job)
    document["artifacts"][1][field] = value
    write_manifest(split_job, document)
    code, report = verify(split_job)
    assert code == 65
    assert "parts" in errors_text(report) or field in errors_text(report)


# --- names that leave the job dir ------------------------------------------------------------


def _point_outside(job: Path, name: str, outside: Path) -> dict[str, Any]:
    """Make the manifest's db.sql entry name `name`, an outside copy with a good checksum."""
    data = (job / "db.sql").read_bytes()
    outside.write_bytes(data)
    document = read_manifest(job)
    found: list[dict[str, Any]] = [e for e in document["artifacts"] if e["filename"] == "db.sql"]
    assert len(found) == 1
    found[0]["filename"] = name
    write_manifest(job, document)
    return found[0]


@pytest.mark.parametrize("form", ["dotdot", "absolute", "dotdot-inside"])
def test_names_leaving_the_job_dir(files_job: Path, tmp_path: Path, form: str) -> None:
    outside = files_job.parent / "outside.sql"
    name = {
        "dotdot": "../outside.sql",
        "absolute": str(outside),
        "dotdot-inside": "sub/../../outside.sql",
    }[form]
    _point_outside(files_job, name, outside)
    before = outside.stat()
    code, report = verify(files_job)
    assert code == 65
    entry = entry_for(report, name)
    assert entry["present"] is False
    assert "size_bytes" not in entry
    assert "checksum_ok" not in entry
    assert any(e.startswith(f"{name}:") for e in report["errors"])
    assert outside.stat().st_mtime_ns == before.st_mtime_ns


def test_a_symlink_out_of_the_job_dir(files_job: Path) -> None:
    outside = files_job.parent / "outside.sql"
    outside.write_bytes((files_job / "db.sql").read_bytes())
    (files_job / "db.sql").unlink()
    (files_job / "db.sql").symlink_to(outside)
    code, report = verify(files_job)
    assert code == 65
    entry = entry_for(report, "db.sql")
    assert entry["present"] is False
    assert "checksum_ok" not in entry
    assert any(e.startswith("db.sql:") for e in report["errors"])


# --- --no-checksums --------------------------------------------------------------------------


def test_no_checksums_skips_hashing(files_job: Path) -> None:
    path = files_job / "db.sql"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    code, report = verify(files_job, "--no-checksums")
    assert code == 0, report
    assert all("checksum_ok" not in a for a in report["artifacts"])
    assert all(a["present"] for a in report["artifacts"])
    code, report = verify(files_job)
    assert code == 65  # the same dir, hashed


def test_no_checksums_still_checks_sizes(files_job: Path) -> None:
    path = files_job / "blob.bin"
    path.write_bytes(path.read_bytes()[:-10])
    code, report = verify(files_job, "--no-checksums")
    assert code == 65
    assert any(e.startswith("blob.bin:") and "size" in e for e in report["errors"])


def test_no_checksums_still_checks_presence(files_job: Path) -> None:
    (files_job / "db.sql").unlink()
    code, report = verify(files_job, "--no-checksums")
    assert code == 65
    assert any(e.startswith("db.sql:") and "missing" in e for e in report["errors"])
