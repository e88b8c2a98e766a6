"""age wired into real jobs (INTERFACE §14), checked against Debian's `age` binary.

- A `baqup-run --stdout-artifact` capture to several recipients, split into parts, is
  opened by `cat PARTS | age -d -i KEY | zstd -d` with either identity; the manifest
  says `{"format": "age-encryption.org/v1", "recipients": [...]}` and nothing secret.
- An `age -r` file placed as an artifact is restored by `baqup-run --stdin-artifact`
  into a real child (`BAQUP_SECRET_AGE_IDENTITY`), and opened by `baqup decrypt -i`.
- A wrong identity, a flipped bit, a truncated or a reordered part (the manifest
  rewritten to match, so only the decryption can tell): exit 65, and the child, which
  records every byte it gets, got a prefix of the plaintext that ends before the
  chunk that failed.
- Each attempt of a retried capture gets a fresh file key (a new header).
- The settings: recipients without BAQUP_ARTIFACT_ENCRYPT, beside an explicit
  aes-256-gcm or a symmetric key, a bad recipient or identity: 64 with a clear
  message that never quotes the identity; `--info` lists age.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import jobs
from tests.conftest import PYTHON, run_baqup
from tests.jobs import job_dir, log_records, start_job

AGE_CHUNK = 64 * 1024
SPLIT = "64K"


@dataclass(frozen=True)
class AgeKey:
    path: Path  # an identity file, as age-keygen writes it
    recipient: str

    @property
    def identity(self) -> str:
        return next(
            line for line in self.path.read_text().splitlines() if line.startswith("AGE-SECRET")
        )


def keygen(path: Path) -> AgeKey:
    subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    public = subprocess.run(
        ["age-keygen", "-y", str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()
    return AgeKey(path, public)


@pytest.fixture
def keys(tmp_path: Path) -> list[AgeKey]:
    return [keygen(tmp_path / f"key{i}.txt") for i in range(3)]


def sample_text(size: int) -> bytes:
    """Text that compresses like a dump: numbered lines with varying content."""
    lines = []
    total = 0
    index = 0
    while total < size:
        digest = hashlib.sha256(str(index).encode()).hexdigest()
        line = f"INSERT INTO t VALUES ({index}, '{digest[: 8 + index % 40]}');\n".encode()
        lines.append(line)
        total += len(line)
        index += 1
    return b"".join(lines)[:size]


def manifest_of(env: Mapping[str, str]) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((job_dir(env) / "manifest.json").read_bytes())
    return manifest


def age_env(env: Mapping[str, str], keys: list[AgeKey], **extra: str) -> dict[str, str]:
    out = dict(env)
    out.update(
        BAQUP_ARTIFACT_ENCRYPT="true",
        BAQUP_ARTIFACT_ENCRYPT_RECIPIENTS=",".join(k.recipient for k in keys),
    )
    out.update(extra)
    return out


def capture(env: Mapping[str, str], data: bytes, tmp_path: Path) -> list[Path]:
    """A real capture of `data` (the child is `cat`); the stored parts, in order."""
    source = tmp_path / "input.sql"
    source.write_bytes(data)
    done = run_baqup(["--stdout-artifact", "dump.sql", "--", "cat", str(source)], dict(env))
    assert done.returncode == 0, done.stderr[-3000:]
    entries = manifest_of(env)["artifacts"]
    return [job_dir(env) / e["filename"] for e in entries]


def age_decrypt(parts: list[Path], key: AgeKey) -> subprocess.CompletedProcess[bytes]:
    cat = " ".join(f"'{p}'" for p in parts)
    return subprocess.run(
        ["sh", "-c", f"cat {cat} | age -d -i '{key.path}'"],
        capture_output=True,
        timeout=60,
        check=False,
    )


def tool_decrypt(
    parts: list[Path], *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BAQUP_")}
    return subprocess.run(
        [
            PYTHON,
            "-c",
            "from baqup_supervisor.tool import tool_main; tool_main()",
            "decrypt",
            *map(str, parts),
            *args,
        ],
        env={**base, **(env or {})},
        check=False,
        capture_output=True,
        timeout=60,
    )


# --- our artifacts, opened by age -----------------------------------------------------------


def test_split_capture_to_two_recipients_opens_with_debian_age(
    job_env: dict[str, str], keys: list[AgeKey], tmp_path: Path
) -> None:
    data = sample_text(3 * 1024 * 1024)
    env = age_env(
        job_env,
        keys[:2],
        BAQUP_ARTIFACT_SPLIT_SIZE=SPLIT,
        BAQUP_ARTIFACT_COMPRESS="true",
        BAQUP_ARTIFACT_COMPRESS_ALGORITHM="zstd",
    )
    parts = capture(env, data, tmp_path)
    assert len(parts) >= 3, parts
    entries = manifest_of(env)["artifacts"]
    for index, entry in enumerate(entries, start=1):
        assert entry["filename"] == f"dump.sql.zst.age.{index:03d}"
        assert entry["encrypted"] is True
        assert entry["encryption"] == {
            "format": "age-encryption.org/v1",
            "recipients": [keys[0].recipient, keys[1].recipient],
        }
    manifest_text = (job_dir(env) / "manifest.json").read_text()
    assert "AGE-SECRET-KEY" not in manifest_text
    assert parts[0].read_bytes().startswith(b"age-encryption.org/v1\n-> X25519 ")

    for key in keys[:2]:  # either identity opens it: `cat PARTS | age -d -i KEY | zstd -d`
        opened = age_decrypt(parts, key)
        assert opened.returncode == 0, opened.stderr
        plain = subprocess.run(
            ["zstd", "-d", "-c"], input=opened.stdout, capture_output=True, check=False
        )
        assert plain.returncode == 0, plain.stderr
        assert plain.stdout == data
    refused = age_decrypt(parts, keys[2])  # not a recipient
    assert refused.returncode != 0
    assert refused.stdout == b""

    # baqup's own reader agrees: -i FILE, then the identity from the environment
    by_file = tool_decrypt(parts, "-i", str(keys[1].path), "--decompress", "auto")
    assert by_file.returncode == 0, by_file.stderr
    assert by_file.stdout == data
    by_env = tool_decrypt(
        parts,
        "--decompress",
        "zstd",
        env={"BAQUP_SECRET_AGE_IDENTITY": f"# two lines\n{keys[2].identity}\n{keys[0].identity}"},
    )
    assert by_env.returncode == 0, by_env.stderr
    assert by_env.stdout == data
    wrong = tool_decrypt(parts, "-i", str(keys[2].path))
    assert wrong.returncode == 65, wrong.stderr
    assert wrong.stdout == b""
    assert keys[2].identity.encode() not in wrong.stderr


def test_capture_logs_the_recipients_and_an_uncompressed_one_is_plain_age(
    job_env: dict[str, str], keys: list[AgeKey], tmp_path: Path
) -> None:
    data = sample_text(200_000)
    env = age_env(job_env, keys[:1], BAQUP_ARTIFACT_COMPRESS="false")
    source = tmp_path / "input.sql"
    source.write_bytes(data)
    done = run_baqup(["--stdout-artifact", "dump.sql", "--", "cat", str(source)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = [
        r["context"] for r in log_records(done.stderr) if "recipients" in r.get("context", {})
    ]
    assert logged, done.stderr[-2000:]
    assert logged[0]["recipients"] == [keys[0].recipient]
    [entry] = manifest_of(env)["artifacts"]
    assert entry["filename"] == "dump.sql.age"
    opened = age_decrypt([job_dir(env) / "dump.sql.age"], keys[0])
    assert opened.returncode == 0, opened.stderr
    assert opened.stdout == data


# --- age's files, restored by baqup-run -----------------------------------------------------

# Writes every piece of stdin to OUTPUT as it arrives (flushed), so what it got is on
# disk even when it is killed mid-stream; touches DONE once stdin reached EOF.
RECORDER = textwrap.dedent(
    """
    import os, sys
    with open(os.environ["OUTPUT"], "wb", buffering=0) as out:
        while piece := sys.stdin.buffer.read1(16384):
            out.write(piece)
    open(os.environ["DONE"], "w").close()
    """
)


def restore(env: Mapping[str, str], name: str, tmp_path: Path, **extra: str) -> tuple[int, Any]:
    restore_env = jobs.restore_env(
        env,
        OUTPUT=str(tmp_path / "restored"),
        DONE=str(tmp_path / "eof"),
        BAQUP_ARTIFACT_ENCRYPT="false",
        **extra,
    )
    restore_env.pop("BAQUP_ARTIFACT_ENCRYPT_RECIPIENTS", None)
    args = ["--role", "restore", "--stdin-artifact", name, "--grace", "2"]
    job = start_job(
        [*args, "--", PYTHON, "-c", RECORDER],
        restore_env,
        name="restore",
    )
    return job.wait(90), job


def rewrite_parts(directory: Path, contents: Mapping[str, bytes]) -> None:
    """Replace parts' bytes and make the manifest agree (an attacker who can do both):
    then only the decryption can tell."""
    manifest = json.loads((directory / "manifest.json").read_bytes())
    for entry in manifest["artifacts"]:
        if entry["filename"] in contents:
            data = contents[entry["filename"]]
            (directory / entry["filename"]).unlink()
            (directory / entry["filename"]).write_bytes(data)
            entry["size_bytes"] = len(data)
            entry["checksum"]["value"] = hashlib.new(
                entry["checksum"]["algorithm"], data
            ).hexdigest()
    path = directory / "manifest.json"
    path.unlink()
    path.write_bytes(json.dumps(manifest).encode())


def test_an_age_r_file_is_restored_into_a_real_child(
    job_env: dict[str, str], keys: list[AgeKey], tmp_path: Path
) -> None:
    data = sample_text(1_000_000)
    env = age_env(
        job_env, keys[:1], BAQUP_ARTIFACT_COMPRESS="true", BAQUP_ARTIFACT_COMPRESS_ALGORITHM="zstd"
    )
    [part] = capture(env, b"placeholder\n", tmp_path)  # a committed job: its manifest
    assert part.name == "dump.sql.zst.age"
    compressed = subprocess.run(
        ["zstd", "-3", "-c"], input=data, capture_output=True, check=True
    ).stdout
    by_age = subprocess.run(
        ["age", "-r", keys[1].recipient, "-r", keys[2].recipient],
        input=compressed,
        capture_output=True,
        check=True,
    ).stdout
    rewrite_parts(job_dir(env), {part.name: by_age})
    verified = run_baqup(["verify", str(job_dir(env))], env, tool=True)
    assert verified.returncode == 0, verified.stdout

    code, job = restore(env, "dump.sql", tmp_path, BAQUP_SECRET_AGE_IDENTITY=keys[2].identity)
    assert code == 0, job.stderr()[-3000:]
    assert (tmp_path / "restored").read_bytes() == data
    assert (tmp_path / "eof").exists()
    assert keys[2].identity not in job.stderr()

    opened = tool_decrypt([part], "-i", str(keys[1].path), "--decompress", "auto")
    assert opened.returncode == 0, opened.stderr
    assert opened.stdout == data


@pytest.mark.parametrize("fault", ["wrong-identity", "flipped-bit", "truncated", "reordered"])
def test_a_bad_age_artifact_fails_65_and_the_child_gets_only_authenticated_bytes(
    job_env: dict[str, str], keys: list[AgeKey], tmp_path: Path, fault: str
) -> None:
    # uncompressed, so plaintext offsets are age chunk offsets: chunk k is bytes
    # [k * 64 KiB, (k + 1) * 64 KiB) of the data
    data = sample_text(40 * AGE_CHUNK + 1234)
    env = age_env(
        job_env, keys[:1], BAQUP_ARTIFACT_COMPRESS="false", BAQUP_ARTIFACT_SPLIT_SIZE="512K"
    )
    parts = capture(env, data, tmp_path)
    assert len(parts) == 6, parts
    stored = b"".join(p.read_bytes() for p in parts)
    header = stored.index(b"\n", stored.index(b"\n---")) + 1 + 16  # the MAC line, the nonce
    record = AGE_CHUNK + 16
    identity = keys[0].identity
    first_bad_chunk: int
    if fault == "wrong-identity":
        identity = keys[1].identity
        first_bad_chunk = 0
    elif fault == "flipped-bit":
        offset = header + 17 * record + 100
        index, within = divmod(offset, 512 * 1024)
        damaged = bytearray(parts[index].read_bytes())
        damaged[within] ^= 0x04
        rewrite_parts(job_dir(env), {parts[index].name: bytes(damaged)})
        first_bad_chunk = 17
    elif fault == "truncated":  # the last part cut at a chunk boundary
        last = parts[-1].read_bytes()
        kept = (len(stored) - len(last) - header) % record
        cut = record - kept if kept else 0
        rewrite_parts(job_dir(env), {parts[-1].name: last[:cut]})
        first_bad_chunk = (len(stored) - len(last) + cut - header) // record
    else:  # parts 3 and 4 swapped (same size), the manifest's checksums with them
        third, fourth = parts[2].read_bytes(), parts[3].read_bytes()
        rewrite_parts(job_dir(env), {parts[2].name: fourth, parts[3].name: third})
        first_bad_chunk = (2 * 512 * 1024 - header) // record

    code, job = restore(env, "dump.sql", tmp_path, BAQUP_SECRET_AGE_IDENTITY=identity)
    assert code == 65, job.stderr()[-3000:]
    errors = json.dumps([r for r in job.logs() if r.get("level") in ("error", "fatal")])
    # the manifest agreed with the bytes: the decryption, not the checksum, caught it
    assert '"DECRYPTION_FAILED"' in errors or '"TRUNCATED"' in errors, errors
    assert "CHECKSUM_MISMATCH" not in errors
    assert identity not in job.stderr()
    got = (tmp_path / "restored").read_bytes() if (tmp_path / "restored").exists() else b""
    assert data.startswith(got)
    assert len(got) <= first_bad_chunk * AGE_CHUNK, (len(got), first_bad_chunk)
    assert not (tmp_path / "eof").exists(), "the child was told the stream ended"


# --- retries and settings -------------------------------------------------------------------

# Attempt 1 writes data, waits until the sink has written the age header, copies those
# bytes aside, and fails (69, retriable); attempt 2 writes the data and succeeds.
RETRIED = textwrap.dedent(
    """
    import os, sys, time
    seen = os.environ["SEEN"]
    sys.stdout.buffer.write(b"x" * 200000)
    sys.stdout.flush()
    if os.path.exists(seen):
        sys.exit(0)
    path = os.path.join(os.environ["BAQUP_WORK_DIR"], "dump.sql.age")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if os.path.exists(path) and os.path.getsize(path) >= 150:
            break
        time.sleep(0.01)
    with open(path, "rb") as handle, open(seen, "wb") as out:
        out.write(handle.read(150))
    sys.exit(69)
    """
)


def test_each_attempt_gets_a_fresh_file_key(
    job_env: dict[str, str], keys: list[AgeKey], tmp_path: Path
) -> None:
    env = age_env(
        job_env,
        keys[:1],
        BAQUP_ARTIFACT_COMPRESS="false",
        BAQUP_JOB_RETRY_MAX="1",
        BAQUP_JOB_RETRY_BACKOFF="constant",
        SEEN=str(tmp_path / "first-header"),
    )
    done = run_baqup(["--stdout-artifact", "dump.sql", "--", PYTHON, "-c", RETRIED], env)
    assert done.returncode == 0, done.stderr[-3000:]
    first = (tmp_path / "first-header").read_bytes()
    final = (job_dir(env) / "dump.sql.age").read_bytes()
    assert first.startswith(b"age-encryption.org/v1\n-> X25519 ")
    assert final[:150] != first  # a new ephemeral share, MAC and nonce: a new file key
    opened = age_decrypt([job_dir(env) / "dump.sql.age"], keys[0])
    assert opened.returncode == 0
    assert opened.stdout == b"x" * 200000


def validate(env: Mapping[str, str]) -> tuple[int, dict[str, Any], str]:
    done = run_baqup(["--validate"], dict(env))
    return done.returncode, json.loads(done.stdout), done.stderr


def test_recipients_without_encrypt_true_is_a_config_error(
    job_env: dict[str, str], keys: list[AgeKey], tmp_path: Path
) -> None:
    env = {**job_env, "BAQUP_ARTIFACT_ENCRYPT_RECIPIENTS": keys[0].recipient}
    code, report, _ = validate(env)
    assert code == 64
    [problem] = report["errors"]
    assert problem["variable"] == "BAQUP_ARTIFACT_ENCRYPT_RECIPIENTS"
    assert "plaintext" in problem["message"]
    assert "BAQUP_ARTIFACT_ENCRYPT=true" in problem["message"]
    source = tmp_path / "input.sql"
    source.write_bytes(b"data\n")
    done = run_baqup(["--stdout-artifact", "dump.sql", "--", "cat", str(source)], env)
    assert done.returncode == 64, done.stderr[-2000:]
    assert not (job_dir(env) / "manifest.json").exists()


@pytest.mark.parametrize(
    ("extra", "variable", "words"),
    [
        (
            {"BAQUP_ARTIFACT_ENCRYPT_ALGORITHM": "aes-256-gcm"},
            "BAQUP_ARTIFACT_ENCRYPT_ALGORITHM",
            "chacha20-poly1305 only",
        ),
        ({"BAQUP_SECRET_ENCRYPTION_KEY": "ab" * 32}, "BAQUP_ARTIFACT_ENCRYPT_RECIPIENTS", "both"),
        (
            {"BAQUP_ARTIFACT_ENCRYPT_RECIPIENTS": "age1notarecipient"},
            "BAQUP_ARTIFACT_ENCRYPT_RECIPIENTS",
            "not an age recipient",
        ),
    ],
    ids=["explicit-aes", "with-a-key", "bad-recipient"],
)
def test_recipient_settings_that_cannot_work_are_64(
    job_env: dict[str, str],
    keys: list[AgeKey],
    tmp_path: Path,
    extra: dict[str, str],
    variable: str,
    words: str,
) -> None:
    env = age_env(job_env, keys[:1], **extra)
    code, report, _ = validate(env)
    assert code == 64, report
    assert [p["variable"] for p in report["errors"]] == [variable], report
    assert words in report["errors"][0]["message"]
    source = tmp_path / "input.sql"
    source.write_bytes(b"data\n")
    done = run_baqup(["--stdout-artifact", "dump.sql", "--", "cat", str(source)], env)
    assert done.returncode == 64, done.stderr[-2000:]


def test_validate_checks_recipients_and_identity_and_never_echoes_the_identity(
    job_env: dict[str, str], keys: list[AgeKey]
) -> None:
    good = age_env(job_env, [], BAQUP_ARTIFACT_ENCRYPT_ALGORITHM="chacha20-poly1305")
    # the JSON form of a multi-value (INTERFACE §6)
    good["BAQUP_ARTIFACT_ENCRYPT_RECIPIENTS"] = json.dumps([k.recipient for k in keys[:2]])
    code, report, _ = validate(good)
    assert (code, report["errors"]) == (0, [])
    restore_env = {
        **job_env,
        "BAQUP_ARTIFACT_ENCRYPT": "true",
        "BAQUP_SECRET_AGE_IDENTITY": keys[0].identity,
    }
    assert validate(restore_env)[0] == 0  # a restore needs only the identity

    damaged = keys[0].identity[:-3] + ("QQQ" if not keys[0].identity.endswith("QQQ") else "PPP")
    bad = {**restore_env, "BAQUP_SECRET_AGE_IDENTITY": f"# mine\n{damaged}"}
    code, report, stderr = validate(bad)
    assert code == 64
    [problem] = report["errors"]
    assert problem["variable"] == "BAQUP_SECRET_AGE_IDENTITY"
    assert "line 2" in problem["message"]
    assert damaged not in json.dumps(report) + stderr
    assert damaged[15:40] not in json.dumps(report) + stderr

    nothing = {**job_env, "BAQUP_ARTIFACT_ENCRYPT": "true"}
    code, report, _ = validate(nothing)
    assert code == 64
    [problem] = report["errors"]
    for name in (
        "BAQUP_SECRET_ENCRYPTION_KEY",
        "BAQUP_ARTIFACT_ENCRYPT_RECIPIENTS",
        "BAQUP_SECRET_AGE_IDENTITY",
    ):
        assert name in problem["message"]


def test_info_lists_age_under_encryption(job_env: dict[str, str]) -> None:
    done = run_baqup(["--info"], job_env)
    assert done.returncode == 0, done.stderr
    assert "age" in json.loads(done.stdout)["capabilities"]["encryption"]


# Prints each line of its identity secret on its own stderr line, then writes a file.
PRINTS_IDENTITY = textwrap.dedent(
    """
    import os, sys
    for line in os.environ["BAQUP_SECRET_AGE_IDENTITY"].splitlines():
        print("line:", line, file=sys.stderr, flush=True)
    with open(os.path.join(os.environ["BAQUP_WORK_DIR"], "out.txt"), "w") as handle:
        handle.write("done")
    """
)


def test_each_key_line_of_an_identity_file_is_redacted_on_its_own(
    job_env: dict[str, str], keys: list[AgeKey]
) -> None:
    text = keys[0].path.read_text()  # age-keygen's: two comments, then the key line
    env = {**job_env, "BAQUP_SECRET_AGE_IDENTITY": text}
    done = run_baqup(["--", PYTHON, "-c", PRINTS_IDENTITY], env)
    assert done.returncode == 0, done.stderr[-2000:]
    child = [r["message"] for r in log_records(done.stderr) if r.get("component") == "child"]
    assert len(child) == 3, child
    assert keys[0].identity not in done.stderr
    assert child[2] == "line: [REDACTED]"
    assert keys[0].recipient in child[1]  # the public key in a comment stays readable


def test_validate_says_when_the_crypto_extra_does_not_import(
    job_env: dict[str, str], keys: list[AgeKey], tmp_path: Path
) -> None:
    shadow = tmp_path / "shadow" / "cryptography"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('a broken native wheel')\n")
    env = age_env(job_env, keys[:1], PYTHONPATH=str(shadow.parent))
    code, report, _ = validate(env)
    assert code == 64
    [problem] = report["errors"]
    assert problem["variable"] == "BAQUP_ARTIFACT_ENCRYPT"
    assert "crypto extra" in problem["message"]
    info = run_baqup(["--info"], env)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["capabilities"]["encryption"] == []


def test_decrypt_with_an_unreadable_or_bad_identity_file_is_64(
    keys: list[AgeKey], tmp_path: Path
) -> None:
    part = tmp_path / "dump.sql.age"
    part.write_bytes(
        subprocess.run(
            ["age", "-r", keys[0].recipient], input=b"x", capture_output=True, check=True
        ).stdout
    )
    missing = tool_decrypt([part], "-i", str(tmp_path / "no-such-key.txt"))
    assert missing.returncode == 64, missing.stderr
    assert b"no-such-key.txt" in missing.stderr
    bad = tmp_path / "bad.txt"
    bad.write_text("# a comment\nAGE-SECRET-KEY-1NOTAKEY\n")
    refused = tool_decrypt([part], "-i", str(bad))
    assert refused.returncode == 64, refused.stderr
    assert b"line 2" in refused.stderr
    assert b"NOTAKEY" not in refused.stderr
    assert missing.stdout == refused.stdout == b""
