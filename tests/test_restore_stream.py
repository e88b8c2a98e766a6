"""The restore stream (`baqup-run --stdin-artifact`), with real jobs and real children.

- A NAME matching two artifacts (`db.sql` in a job holding `db.sql` and `db.sql.zst`)
  is a usage error naming both (64); the child never starts. Each exact filename
  restores its own bytes, never the two concatenated.
- The bytes fed are the verified bytes: an artifact replaced (renamed over) after
  verification is still fed from the file that was verified; one rewritten in place is
  caught as it is fed, and the child never sees the end of the stream (no last chunk,
  no EOF): it is killed and the job fails with CHECKSUM_MISMATCH (65).
- An 8 KB-ish zstd artifact of 1 GiB of zeros is restored with the supervisor's peak
  RSS under 100 MB (measured on the real process tree).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tests.conftest import PYTHON
from tests.jobs import Job, job_dir, log_records, restore_env, start_job
from tests.test_extract_guarantees import PEAK_LIMIT_KIB, GiB, MiB, run_measured

SNAPSHOT = """
import os, shutil, sys
work = os.environ["BAQUP_WORK_DIR"]
for source in sys.argv[1:]:
    shutil.copy(source, os.path.join(work, os.path.basename(source)))
"""

# Reads stdin to its end, then writes what it got; touches STARTED first. It alters the
# artifact on disk (ALTER=inplace or ALTER=rename) before reading a byte.
RESTORE = """
import os, sys
open(os.environ["STARTED"], "w").close()
target, alter = os.environ.get("TARGET", ""), os.environ.get("ALTER", "")
if alter == "inplace":
    with open(target, "r+b") as handle:
        handle.seek(-10, 2)
        last = handle.read(1)
        handle.seek(-10, 2)
        handle.write(bytes([last[0] ^ 0xFF]))
elif alter == "rename":
    size = os.path.getsize(target)
    with open(target + ".new", "wb") as handle:
        handle.write(b"X" * size)
    os.replace(target + ".new", target)
data = sys.stdin.buffer.read()
with open(os.environ["OUTPUT"], "wb") as out:
    out.write(data)
"""


def finish(job: Job, expected: int, timeout: float = 90) -> None:
    code = job.wait(timeout)
    assert code == expected, f"exit {code}, expected {expected}; stderr:\n{job.stderr()[-4000:]}"


def snapshot(env: Mapping[str, str], files: list[Path]) -> Path:
    """A committed snapshot whose artifacts are `files`, copied in by the child."""
    job = start_job(["--", PYTHON, "-c", SNAPSHOT, *map(str, files)], env, name="snapshot")
    finish(job, 0)
    directory = job_dir(env)
    assert (directory / "manifest.json").exists()
    return directory


def restore(env: Mapping[str, str], name: str, **extra: str) -> Job:
    code = textwrap.dedent(RESTORE)
    args = ["--role", "restore", "--stdin-artifact", name, "--grace", "2"]
    return start_job([*args, "--", PYTHON, "-c", code], restore_env(env, **extra), name="restore")


def manifest(directory: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((directory / "manifest.json").read_text())
    return document


@pytest.fixture
def two_artifacts(tmp_path: Path, job_env: dict[str, str]) -> tuple[dict[str, str], bytes, bytes]:
    """A job holding `db.sql` and `db.sql.zst`, with different contents."""
    plain, packed = b"plain dump\n" * 1000, b"compressed dump\n" * 1000
    files = tmp_path / "files"
    files.mkdir()
    (files / "db.sql").write_bytes(plain)
    (files / "db.sql.zst").write_bytes(zstandard.ZstdCompressor().compress(packed))
    directory = snapshot(job_env, [files / "db.sql", files / "db.sql.zst"])
    names = sorted(e["filename"] for e in manifest(directory)["artifacts"])
    assert names == ["db.sql", "db.sql.zst"]
    env = {
        **job_env,
        "STARTED": str(tmp_path / "started"),
        "OUTPUT": str(tmp_path / "output"),
    }
    return env, plain, packed


def test_a_name_matching_two_artifacts_is_a_usage_error_naming_both(
    two_artifacts: tuple[dict[str, str], bytes, bytes],
) -> None:
    env, _, _ = two_artifacts
    job = restore(env, "db.sql")
    finish(job, 64)
    errors = [r["message"] for r in log_records(job.stderr()) if r.get("level") == "error"]
    assert any("'db.sql'" in m and "'db.sql.zst'" in m for m in errors), errors
    assert not Path(env["STARTED"]).exists(), "the child was started"


def test_the_exact_filename_restores_that_artifact_alone(
    two_artifacts: tuple[dict[str, str], bytes, bytes],
) -> None:
    env, _, packed = two_artifacts
    finish(restore(env, "db.sql.zst"), 0)
    assert Path(env["OUTPUT"]).read_bytes() == packed


CAT = "import shutil, sys; shutil.copyfileobj(open(sys.argv[1], 'rb'), sys.stdout.buffer)"


@pytest.fixture
def big_artifact(tmp_path: Path, job_env: dict[str, str]) -> tuple[dict[str, str], Path, bytes]:
    """A committed 8 MiB artifact in two parts (well over what the pipe and the feeder
    hold): the child alters the last part, which an unfixed feeder opened only later."""
    data = os.urandom(8 * MiB)
    source = tmp_path / "data.bin"
    source.write_bytes(data)
    env = {**job_env, "BAQUP_ARTIFACT_COMPRESS": "false", "BAQUP_ARTIFACT_SPLIT_SIZE": "4M"}
    job = start_job(["--stdout-artifact", "data.bin", "--", PYTHON, "-c", CAT, str(source)], env)
    finish(job, 0)
    parts = sorted(e["filename"] for e in manifest(job_dir(env))["artifacts"])
    assert len(parts) == 2, parts
    last = job_dir(env) / parts[-1]
    env.update(STARTED=str(tmp_path / "started"), OUTPUT=str(tmp_path / "output"), TARGET=str(last))
    return env, last, data


def test_an_artifact_replaced_after_verification_is_fed_from_the_verified_file(
    big_artifact: tuple[dict[str, str], Path, bytes],
) -> None:
    env, target, data = big_artifact
    finish(restore(env, "data.bin", ALTER="rename"), 0)
    assert set(target.read_bytes()) == {ord("X")}, "the child did not replace the file"
    assert Path(env["OUTPUT"]).read_bytes() == data


def test_an_artifact_changed_in_place_never_completes_the_stream(
    big_artifact: tuple[dict[str, str], Path, bytes],
) -> None:
    env, _, _ = big_artifact
    job = restore(env, "data.bin", ALTER="inplace")
    finish(job, 65)
    assert Path(env["STARTED"]).exists(), "the child never started"
    assert not Path(env["OUTPUT"]).exists(), "the child read the stream to its end"
    records = log_records(job.stderr())
    assert any(r.get("context", {}).get("code") == "CHECKSUM_MISMATCH" for r in records), [
        r["message"] for r in records
    ]


def test_a_changed_compressed_artifact_is_a_checksum_mismatch_not_a_codec_error(
    tmp_path: Path, job_env: dict[str, str]
) -> None:
    source = tmp_path / "db.sql.zst"
    source.write_bytes(zstandard.ZstdCompressor().compress(os.urandom(4 * MiB)))
    directory = snapshot(job_env, [source])
    env = {
        **job_env,
        "STARTED": str(tmp_path / "started"),
        "OUTPUT": str(tmp_path / "output"),
        "TARGET": str(directory / "db.sql.zst"),
    }
    job = restore(env, "db.sql.zst", ALTER="inplace")
    finish(job, 65)
    assert not Path(env["OUTPUT"]).exists()
    assert "CHECKSUM_MISMATCH" in job.stderr(), job.stderr()[-3000:]


COUNT = """
import os, sys
total = 0
while chunk := sys.stdin.buffer.read(1 << 20):
    if chunk.strip(b"\\0"):
        sys.exit(3)
    total += len(chunk)
open(os.environ["OUTPUT"], "w").write(str(total))
"""


def test_a_zstd_bomb_is_restored_in_bounded_memory(tmp_path: Path, job_env: dict[str, str]) -> None:
    bomb = tmp_path / "db.sql.zst"
    writer = zstandard.ZstdCompressor(level=3).compressobj()
    with open(bomb, "wb") as out:
        for _ in range(GiB // MiB):
            out.write(writer.compress(bytes(MiB)))
        out.write(writer.flush())
    assert bomb.stat().st_size < 100_000
    directory = snapshot(job_env, [bomb])
    entry = manifest(directory)["artifacts"][0]
    assert entry["compression"] == "zstd"
    env = restore_env(job_env, OUTPUT=str(tmp_path / "count"))
    argv = [sys.executable, "-m", "baqup_supervisor", "--role", "restore"]
    argv += ["--stdin-artifact", "db.sql", "--", PYTHON, "-c", COUNT]
    result, peak = run_measured(argv, tmp_path, env=env)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert int(Path(env["OUTPUT"]).read_text()) == GiB
    assert peak < PEAK_LIMIT_KIB, f"peak RSS {peak} KiB restoring a {bomb.stat().st_size} B bomb"
    shutil.rmtree(directory)
