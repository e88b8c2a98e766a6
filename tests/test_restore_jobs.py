"""A restore is a job of its own (INTERFACE.md section 11), with real jobs on real Redis.

A snapshot is committed, then restored by jobs with their own BAQUP_JOB_ID reading it
from BAQUP_RESTORE_FROM: the snapshot's Redis keys and every file of its job dir are
compared byte for byte before and after a restore that succeeds and ones that fail.
A restore carrying the snapshot's own job id is refused (64) before it writes a key;
a source that is missing, not a directory, without a manifest, or with a corrupt or
truncated artifact fails with a clear message and the taxonomy's code, its child never
started. The default source is the restore's own job dir (the controller staged the
snapshot there). `--validate` and `--info` know BAQUP_RESTORE_FROM.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import PYTHON, RedisServer, python_child, run_baqup
from tests.jobs import (
    job_dir,
    job_keys,
    log_records,
    prefix,
    read_hash,
    redis_env,
    restore_env,
)

DUMP = b"-- a dump\n" + bytes(range(256)) * 200

SNAPSHOT = """
import os, sys
work = os.environ["BAQUP_WORK_DIR"]
with open(os.path.join(work, "db.sql"), "wb") as out:
    out.write(b"-- a dump\\n" + bytes(range(256)) * 200)
with open(os.path.join(work, "other.txt"), "wb") as out:
    out.write(b"a second artifact\\n")
"""

# Touches STARTED, then writes what it read on stdin (and where its snapshot is) out.
RESTORE = """
import os, sys
open(os.environ["STARTED"], "w").close()
data = sys.stdin.buffer.read()
with open(os.environ["OUTPUT"], "wb") as out:
    out.write(data)
with open(os.environ["OUTPUT"] + ".from", "w") as out:
    out.write(os.environ.get("BAQUP_RESTORE_FROM", ""))
"""


def files_of(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture
def snapshot(job_env: dict[str, str], redis_server: RedisServer, tmp_path: Path) -> dict[str, str]:
    """A committed snapshot on Redis: `db.sql` and `other.txt`."""
    env = redis_env(job_env, redis_server)
    env["STARTED"] = str(tmp_path / "started")
    env["OUTPUT"] = str(tmp_path / "output")
    result = run_baqup(["--", *python_child(SNAPSHOT)], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (job_dir(env) / "manifest.json").exists()
    return env


def restore(env: dict[str, str], *args: str) -> Any:
    argv = ["--role", "restore", *args, "--", PYTHON, "-c", RESTORE]
    return run_baqup(argv, env)


def error_messages(stderr: str) -> list[str]:
    return [str(r["message"]) for r in log_records(stderr) if r.get("level") in ("error", "fatal")]


def test_a_restore_is_a_job_of_its_own_and_leaves_the_snapshot_untouched(
    snapshot: dict[str, str], redis_client: redis.Redis
) -> None:
    keys, files = job_keys(redis_client, snapshot), files_of(job_dir(snapshot))
    assert any(k.endswith(f"status:{snapshot['BAQUP_JOB_ID']}") for k in keys)
    manifest = (job_dir(snapshot) / "manifest.json").read_bytes()

    # one that fails (its command exits 1 after reading everything) ...
    failing = restore_env(snapshot)
    failed = run_baqup(
        ["--role", "restore", "--stdin-artifact", "db.sql", "--", PYTHON, "-c", "exit(1)"],
        failing,
    )
    assert failed.returncode == 1, failed.stderr[-3000:]
    status = read_hash(redis_client, f"{prefix(failing)}status:{failing['BAQUP_JOB_ID']}")
    assert status["status"] == "failed"
    assert job_keys(redis_client, snapshot) == keys
    assert files_of(job_dir(snapshot)) == files

    # ... and one that succeeds
    own = restore_env(snapshot)
    done = restore(own, "--stdin-artifact", "db.sql")
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(own["OUTPUT"]).read_bytes() == DUMP
    assert Path(own["OUTPUT"] + ".from").read_text() == str(job_dir(snapshot))
    status = read_hash(redis_client, f"{prefix(own)}status:{own['BAQUP_JOB_ID']}")
    assert (status["role"], status["status"], status["job_id"]) == (
        "restore",
        "success",
        own["BAQUP_JOB_ID"],
    )
    assert status["restored_from"] == {
        "job_id": snapshot["BAQUP_JOB_ID"],
        "path": str(job_dir(snapshot)),
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
    }
    assert job_keys(redis_client, snapshot) == keys
    assert files_of(job_dir(snapshot)) == files
    # its own job dir holds nothing of the snapshot
    assert job_dir(own).is_dir()
    assert not (job_dir(own) / "manifest.json").exists()


def test_the_snapshots_own_job_id_is_refused_before_a_key_is_written(
    snapshot: dict[str, str], redis_client: redis.Redis
) -> None:
    keys, files = job_keys(redis_client, snapshot), files_of(job_dir(snapshot))
    same = {**snapshot, "BAQUP_RESTORE_FROM": str(job_dir(snapshot))}
    for env in (snapshot, same):  # the old way (the default source), and named
        refused = restore(env, "--stdin-artifact", "db.sql")
        assert refused.returncode == 64, refused.stderr[-3000:]
        messages = error_messages(refused.stderr)
        assert any("a restore is a job of its own" in m for m in messages), messages
        assert not Path(snapshot["STARTED"]).exists(), "the child was started"
        assert job_keys(redis_client, snapshot) == keys
        assert files_of(job_dir(snapshot)) == files


def test_the_default_source_is_the_restores_own_job_dir(
    snapshot: dict[str, str], redis_client: redis.Redis
) -> None:
    """The controller staged the snapshot's files into the restore's own job dir."""
    own = {**snapshot, "BAQUP_JOB_ID": str(uuid.uuid4())}
    shutil.copytree(job_dir(snapshot), job_dir(own))
    staged = files_of(job_dir(own))
    done = restore(own, "--stdin-artifact", "db.sql")
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(own["OUTPUT"]).read_bytes() == DUMP
    status = read_hash(redis_client, f"{prefix(own)}status:{own['BAQUP_JOB_ID']}")
    assert status["restored_from"]["path"] == str(job_dir(own))
    assert status["restored_from"]["job_id"] == snapshot["BAQUP_JOB_ID"]
    after = files_of(job_dir(own))
    assert {k: v for k, v in after.items() if k != ".baqup-status.json"} == {
        k: v for k, v in staged.items() if k != ".baqup-status.json"
    }


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _copy(snapshot: Path, tmp: Path, change: Callable[[Path], object]) -> Path:
    copy = tmp / "copy"
    shutil.copytree(snapshot, copy)
    change(copy)
    return copy


BAD_SOURCES: dict[str, tuple[Callable[[Path, Path], Path], int, str, str]] = {
    "missing": (lambda s, t: t / "nowhere", 64, "RESTORE_SOURCE_MISSING", "does not exist"),
    "a file": (
        lambda s, t: s / "manifest.json",
        64,
        "RESTORE_SOURCE_INVALID",
        "is not a directory",
    ),
    "not a job dir": (
        lambda s, t: _copy(s, t, lambda c: (c / "manifest.json").unlink()),
        65,
        "MANIFEST_MISSING",
        "is not a committed snapshot",
    ),
    "invalid manifest": (
        lambda s, t: _copy(s, t, lambda c: (c / "manifest.json").write_text('{"a": 1}')),
        65,
        "MANIFEST_INVALID",
        "is not a valid manifest",
    ),
    "corrupt artifact": (
        lambda s, t: _copy(s, t, lambda c: _flip(c / "db.sql")),
        65,
        "CHECKSUM_MISMATCH",
        "failed verification",
    ),
    "truncated artifact": (
        lambda s, t: _copy(s, t, lambda c: _truncate(c / "db.sql")),
        65,
        "TRUNCATED",
        "failed verification",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
@pytest.mark.parametrize("named", [True, False], ids=["stdin-artifact", "whole-snapshot"])
def test_a_bad_source_fails_the_restore_with_a_clear_message(
    case: str,
    named: bool,
    snapshot: dict[str, str],
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    make, code, error_code, words = BAD_SOURCES[case]
    keys, files = job_keys(redis_client, snapshot), files_of(job_dir(snapshot))
    source = make(job_dir(snapshot), tmp_path)
    env = restore_env(snapshot, BAQUP_RESTORE_FROM=str(source))
    result = restore(env, *(["--stdin-artifact", "db.sql"] if named else []))
    assert result.returncode == code, result.stderr[-3000:]
    messages = error_messages(result.stderr)
    assert any(words in m and str(source) in m for m in messages), messages
    assert not Path(snapshot["STARTED"]).exists(), "the child was started"
    status = read_hash(redis_client, f"{prefix(env)}status:{env['BAQUP_JOB_ID']}")
    assert (status["status"], status["exit_code"]) == ("failed", code)
    assert status["error"]["code"] == error_code
    assert job_keys(redis_client, snapshot) == keys
    assert files_of(job_dir(snapshot)) == files


TWO = """
import gzip, os
work = os.environ["BAQUP_WORK_DIR"]
open(os.path.join(work, "db.sql"), "wb").write(b"plain")
open(os.path.join(work, "db.sql.gz"), "wb").write(gzip.compress(b"packed"))
"""


def test_a_name_matching_two_artifacts_names_both(
    job_env: dict[str, str], redis_server: RedisServer, tmp_path: Path
) -> None:
    env = redis_env(job_env, redis_server)
    assert run_baqup(["--", *python_child(TWO)], env).returncode == 0
    own = restore_env(env, STARTED=str(tmp_path / "started"), OUTPUT=str(tmp_path / "out"))
    result = restore(own, "--stdin-artifact", "db.sql")
    assert result.returncode == 64, result.stderr[-3000:]
    messages = error_messages(result.stderr)
    assert any("'db.sql'" in m and "'db.sql.gz'" in m for m in messages), messages
    assert not (tmp_path / "started").exists(), "the child was started"


def test_validate_and_info_know_the_variable(job_env: dict[str, str]) -> None:
    empty = run_baqup(["--validate"], {**job_env, "BAQUP_RESTORE_FROM": ""})
    assert empty.returncode == 64
    report = json.loads(empty.stdout)
    assert [e["variable"] for e in report["errors"]] == ["BAQUP_RESTORE_FROM"]
    fine = run_baqup(["--validate"], {**job_env, "BAQUP_RESTORE_FROM": "/srv/snapshots/x"})
    assert fine.returncode == 0, fine.stdout + fine.stderr
    assert "BAQUP_RESTORE_FROM" not in fine.stderr  # no "unknown variable" warning
    schema = Path(__file__).parent.parent / "docker" / "agent-fs" / "agent-schema.json"
    info = json.loads(run_baqup(["--info", "--schema", str(schema)], job_env).stdout)
    assert info["restore"] == {"source": "BAQUP_RESTORE_FROM", "default": "$BAQUP_JOB_DIR"}
