"""Every `baqup` failure names its error code (issue #14 item 7).

The installed `baqup` console script runs as a subprocess; the tests assert on the bytes
of stdout and stderr and on the exit code:

- the log record on stderr carries `context.code`, `category` and `exit_code`, for
  every subcommand's failure path (usage errors included);
- `extract`, `verify` and `decrypt -o` print a JSON report on stdout whose `error`
  object has `code`, `category`, `message` and `exit_code` (the process's exit code);
  `decrypt` to stdout keeps stdout for the plaintext.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from baqup_supervisor.encryption import StreamEncryptor
from tests.conftest import PYTHON, python_child, run_baqup
from tests.jobs import log_records
from tests.test_extract_hostile import M, write_archive

BAQUP = str(Path(PYTHON).parent / "baqup")
KEY = bytes(range(32))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAQUP_")}
    env.update(PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def baqup(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [BAQUP, *args],
        env=env or clean_env(),
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )


def failure_record(result: subprocess.CompletedProcess[bytes], command: str) -> dict[str, Any]:
    """The one error record of a failed command; it names the code and the exit code."""
    stderr = result.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    records = [r for r in log_records(stderr) if r.get("level") in ("error", "fatal")]
    assert len(records) == 1, stderr
    record = records[0]
    assert record["component"] == "baqup"
    context = record["context"]
    assert context["command"] == command
    assert context["exit_code"] == result.returncode
    assert context["code"]
    assert context["code"] == context["code"].upper()
    return record


def stdout_report(result: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 1, result.stdout
    report: dict[str, Any] = json.loads(lines[0])
    return report


def assert_error_object(error: dict[str, Any], record: dict[str, Any], code: str) -> None:
    """The report's `error` and the log record tell the same thing."""
    assert error["code"] == code == record["context"]["code"]
    assert error["category"] == record["context"]["category"]
    assert error["exit_code"] == record["context"]["exit_code"]
    assert error["message"] == record["message"]
    assert error["retriable"] is (error["category"] == "transient")


# --- baqup extract ---------------------------------------------------------------------------


def test_extract_refusal_names_security_violation(tmp_path: Path) -> None:
    archive = write_archive(tmp_path / "a.tar", [M("ok.txt", data=b"ok"), M("../../x", data=b"x")])
    dest = tmp_path / "dest"
    result = baqup("extract", str(archive), str(dest))
    assert result.returncode == 65
    record = failure_record(result, "extract")
    report = stdout_report(result)
    assert report == {"archive": str(archive), "dest": str(dest), "error": report["error"]}
    assert_error_object(report["error"], record, "SECURITY_VIOLATION")
    assert report["error"]["category"] == "permanent"
    assert "'..'" in report["error"]["message"]
    assert not dest.exists()


def test_extract_of_a_truncated_archive_names_truncated(tmp_path: Path) -> None:
    whole = write_archive(tmp_path / "a.tar.zst", [M("big", data=os.urandom(300_000))], "zstd")
    cut = tmp_path / "cut.tar.zst"
    cut.write_bytes(whole.read_bytes()[:150_000])
    result = baqup("extract", str(cut), str(tmp_path / "dest"))
    assert result.returncode == 65
    report = stdout_report(result)
    assert_error_object(report["error"], failure_record(result, "extract"), "TRUNCATED")


def test_extract_from_stdin_reports_the_archive_as_dash(tmp_path: Path) -> None:
    archive = write_archive(tmp_path / "a.tar", [M("/etc/passwd", data=b"x")])
    result = baqup("extract", "-", str(tmp_path / "dest"), stdin=archive.read_bytes())
    assert result.returncode == 65
    report = stdout_report(result)
    assert report["archive"] == "-"
    assert_error_object(report["error"], failure_record(result, "extract"), "SECURITY_VIOLATION")


def test_extract_of_a_missing_archive_is_64_with_its_code(tmp_path: Path) -> None:
    result = baqup("extract", str(tmp_path / "nope.tar"), str(tmp_path / "dest"))
    assert result.returncode == 64
    report = stdout_report(result)
    assert_error_object(report["error"], failure_record(result, "extract"), "ARCHIVE_MISSING")
    assert report["error"]["category"] == "config"


def test_extract_success_has_no_error(tmp_path: Path) -> None:
    archive = write_archive(tmp_path / "a.tar", [M("ok.txt", data=b"ok")])
    result = baqup("extract", str(archive), str(tmp_path / "dest"))
    assert result.returncode == 0, result.stderr
    assert "error" not in stdout_report(result)
    assert log_records(result.stderr.decode()) == []


# --- baqup verify ----------------------------------------------------------------------------

WRITE_TWO = r"""
import os
from pathlib import Path
work = Path(os.environ["BAQUP_WORK_DIR"])
(work / "db.sql").write_bytes(b"INSERT 1;\n" * 5000)
(work / "blob.bin").write_bytes(bytes(range(256)) * 200)
"""


@pytest.fixture(scope="module")
def committed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A job dir committed by a real baqup-run job (two artifacts, sha256)."""
    root = tmp_path_factory.mktemp("job")
    (root / "staging").mkdir()
    env = clean_env(
        BAQUP_JOB_ID=str(uuid.uuid4()),
        BAQUP_STAGING_DIR=str(root / "staging"),
        BAQUP_BUS_URL=f"file://{root / 'bus'}",
        BAQUP_BUS_FALLBACK_DIR=str(root / "fallback"),
        BAQUP_AGENT_ID="agent-reports-1",
        BAQUP_ARTIFACT_COMPRESS="false",
        BAQUP_JOB_RETRY_MAX="0",
    )
    done = run_baqup(["--", *python_child(WRITE_TWO)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "staging" / env["BAQUP_JOB_ID"]


@pytest.fixture
def job(committed: Path, tmp_path: Path) -> Path:
    copy = tmp_path / committed.name
    shutil.copytree(committed, copy, symlinks=True)
    return copy


def verify(job: Path) -> tuple[subprocess.CompletedProcess[bytes], dict[str, Any]]:
    result = baqup("verify", str(job))
    report = stdout_report(result)
    assert report["valid"] is (result.returncode == 0)
    return result, report


def test_a_valid_job_dir_has_no_error(job: Path) -> None:
    result, report = verify(job)
    assert result.returncode == 0, report
    assert "error" not in report
    assert all("code" not in a for a in report["artifacts"])
    assert log_records(result.stderr.decode()) == []


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _grow(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"more")


def _symlink_out(job: Path) -> None:
    outside = job.parent / "outside.sql"
    (job / "db.sql").rename(outside)
    (job / "db.sql").symlink_to(outside)


CHANGES: dict[str, tuple[Callable[[Path], object], str, str | None]] = {
    "corrupt": (lambda j: _flip(j / "db.sql"), "CHECKSUM_MISMATCH", "db.sql"),
    "truncated": (lambda j: (j / "blob.bin").write_bytes(b"short"), "TRUNCATED", "blob.bin"),
    "grown": (lambda j: _grow(j / "blob.bin"), "SIZE_MISMATCH", "blob.bin"),
    "missing": (lambda j: (j / "db.sql").unlink(), "ARTIFACT_MISSING", "db.sql"),
    "symlink": (_symlink_out, "SECURITY_VIOLATION", "db.sql"),
    "no-manifest": (lambda j: (j / "manifest.json").unlink(), "MANIFEST_MISSING", None),
    "not-json": (lambda j: (j / "manifest.json").write_bytes(b"{x"), "MANIFEST_INVALID", None),
    "array": (lambda j: (j / "manifest.json").write_bytes(b"[]"), "MANIFEST_INVALID", None),
}


@pytest.mark.parametrize("case", CHANGES)
def test_an_invalid_job_dir_names_its_code(job: Path, case: str) -> None:
    change, code, artifact = CHANGES[case]
    change(job)
    result, report = verify(job)
    assert result.returncode == 65
    record = failure_record(result, "verify")
    assert_error_object(report["error"], record, code)
    assert report["error"]["category"] == "permanent"
    assert report["error"]["problems"] == [{"code": code, "message": report["errors"][0]}]
    if artifact is not None:
        (entry,) = [a for a in report["artifacts"] if a["filename"] == artifact]
        assert entry["code"] == code
        assert report["error"]["message"].startswith(f"{artifact}: ")


def test_several_problems_are_all_listed_the_first_is_the_error(job: Path) -> None:
    _flip(job / "blob.bin")
    (job / "db.sql").unlink()
    result, report = verify(job)
    assert result.returncode == 65
    codes = [p["code"] for p in report["error"]["problems"]]
    assert sorted(codes) == ["ARTIFACT_MISSING", "CHECKSUM_MISMATCH"]
    assert report["error"]["code"] == codes[0]
    assert report["error"]["message"].endswith("(and 1 more problem)")
    assert_error_object(report["error"], failure_record(result, "verify"), codes[0])


# --- baqup decrypt ---------------------------------------------------------------------------


@pytest.fixture
def encrypted(tmp_path: Path) -> Path:
    encryptor = StreamEncryptor(KEY, "chacha20-poly1305")
    path = tmp_path / "db.sql.enc"
    path.write_bytes(encryptor.update(b"SELECT 1;\n" * 10_000) + encryptor.finalize())
    return path


def key_env() -> dict[str, str]:
    return clean_env(BAQUP_SECRET_ENCRYPTION_KEY=KEY.hex())


def test_decrypt_of_a_tampered_file_names_its_code_in_the_report(
    encrypted: Path, tmp_path: Path
) -> None:
    _flip(encrypted)
    output = tmp_path / "plain.sql"
    result = baqup("decrypt", str(encrypted), "-o", str(output), env=key_env())
    assert result.returncode == 65
    report = stdout_report(result)
    assert report["parts"] == [str(encrypted)]
    assert report["output"] == str(output)
    assert_error_object(report["error"], failure_record(result, "decrypt"), "DECRYPTION_FAILED")
    assert not output.exists()


def test_decrypt_of_a_truncated_file_is_65_with_a_code(encrypted: Path, tmp_path: Path) -> None:
    encrypted.write_bytes(encrypted.read_bytes()[:-100])
    result = baqup("decrypt", str(encrypted), "-o", str(tmp_path / "out"), env=key_env())
    assert result.returncode == 65
    record = failure_record(result, "decrypt")
    assert record["context"]["code"] in ("DECRYPTION_FAILED", "TRUNCATED")
    assert_error_object(stdout_report(result)["error"], record, record["context"]["code"])


def test_decrypt_to_stdout_keeps_stdout_for_the_plaintext(encrypted: Path) -> None:
    _flip(encrypted)
    result = baqup("decrypt", str(encrypted), env=key_env())
    assert result.returncode == 65
    assert b'"error"' not in result.stdout
    assert failure_record(result, "decrypt")["context"]["code"] == "DECRYPTION_FAILED"


def test_decrypt_without_a_key_is_64_naming_the_variable(encrypted: Path, tmp_path: Path) -> None:
    result = baqup("decrypt", str(encrypted), "-o", str(tmp_path / "out"))
    assert result.returncode == 64
    report = stdout_report(result)
    record = failure_record(result, "decrypt")
    assert_error_object(report["error"], record, "CONFIG_INVALID")
    assert "BAQUP_SECRET_ENCRYPTION_KEY" in record["message"]


def test_decrypt_success_prints_nothing_but_the_plaintext(encrypted: Path) -> None:
    result = baqup("decrypt", str(encrypted), env=key_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"SELECT 1;\n" * 10_000
    assert result.stderr == b""


# --- every other failure path ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "command", "code", "exit_code"),
    [
        (["verify"], "verify", "USAGE_ERROR", 64),
        (["extract", "only-one"], "extract", "USAGE_ERROR", 64),
        (["decrypt"], "decrypt", "USAGE_ERROR", 64),
        (["archive", "/nonexistent-source-dir"], "archive", "USAGE_ERROR", 64),
        (["watch"], "watch", "USAGE_ERROR", 64),
        (["labels"], "labels", "USAGE_ERROR", 64),
        (["labels", "--schema", "/nonexistent.json"], "labels", "CONFIG_INVALID", 64),
        (["verify", "--no-such-flag", "x"], "verify", "USAGE_ERROR", 64),
        (["no-such-command"], "no-such-command", "USAGE_ERROR", 64),
        (["emit", "bogus"], "emit", "USAGE_ERROR", 64),
    ],
)
def test_every_subcommand_failure_is_logged_with_its_code(
    args: list[str], command: str, code: str, exit_code: int, tmp_path: Path
) -> None:
    result = baqup(*args, env=clean_env())
    assert result.returncode == exit_code, result.stderr
    record = failure_record(result, command)
    assert record["context"]["code"] == code
    assert record["context"]["category"] == "config"


def test_archive_refusing_a_symlink_names_its_code(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "link").symlink_to("/etc")
    output = tmp_path / "out.tar"
    result = baqup("archive", str(source), "--symlinks", "fail", "-o", str(output))
    assert result.returncode == 65
    record = failure_record(result, "archive")
    assert record["context"]["code"] == "SYMLINK_REFUSED"
    assert record["context"]["category"] == "permanent"
    assert not output.exists()


def test_watch_with_the_bus_down_is_69_not_70() -> None:
    with_socket = socket.socket()
    with_socket.bind(("127.0.0.1", 0))  # a port nobody listens on (bound, never listening)
    port = with_socket.getsockname()[1]
    try:
        env = clean_env(BAQUP_BUS_URL=f"redis://127.0.0.1:{port}/0")
        result = baqup("watch", "some-job", "--timeout", "2", env=env)
    finally:
        with_socket.close()
    assert result.returncode == 69, result.stderr
    record = failure_record(result, "watch")
    assert record["context"]["code"] == "BUS_UNREACHABLE"
    assert record["context"]["category"] == "transient"
