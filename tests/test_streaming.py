"""Streaming capture (`baqup-run --stdout-artifact`), end to end.

The real `baqup-run` supervises real children (`cat`, Python snippets) on the real
redis-server; what it writes is checked with the real tools: `baqup verify`,
`baqup decrypt`, `sha256sum`/`sha512sum`/`b3sum`, `zstd -d` and `gzip -d`.

- every combination of compression (zstd, gzip, lz4, none, compression off), checksum
  (sha256, sha512, blake3), split (off, 64K) and encryption (off, aes-256-gcm,
  chacha20-poly1305) round-trips byte-exact, with a manifest valid against Appendix C
  and the metrics (bytes_processed, compression_ratio) right;
- progress is reported at least every second while data flows;
- bad input (nothing written, a killed child, a failing child, a full disk, a bad split
  size, a bad or missing key) is a clear error with the right exit code, never a
  manifest; a child that closes stdout early and exits 0 is a success;
- lz4 missing falls back to zstd with a COMPRESSION_FALLBACK event;
- a retried attempt starts a fresh artifact; artifact names never leave the work dir;
- `baqup decrypt` is all or nothing (damage: exit 65 and no output file);
- partial failure (components) in the fail, warn and skip modes.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import os
import random
import subprocess
import time
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import lz4.frame
import pytest
import redis

from baqup_supervisor.staging import validate_manifest
from tests.conftest import PYTHON, RedisServer, python_child, run_baqup
from tests.jobs import (
    job_dir,
    log_records,
    prefix,
    read_hash,
    read_stream,
    redis_env,
    start_job,
)

INPUT_SIZE = 300_000
SPLIT = 64 * 1024
KEY = bytes(range(101, 133))
KEY_HEX = KEY.hex()
KEY_ID = "backup-key-2024-11"
HASH_CLI = {"sha256": "sha256sum", "sha512": "sha512sum", "blake3": "b3sum"}
SUFFIX = {"zstd": ".zst", "gzip": ".gz", "lz4": ".lz4", "none": ""}
ENC_HEADER_SIZE = 62  # baqup-stream-v2
ENC_TAG_SIZE = 16
ENC_ALGORITHM_ID = {"aes-256-gcm": 1, "chacha20-poly1305": 2}


@cache
def sample_data(size: int = INPUT_SIZE, seed: int = 7) -> bytes:
    """Compressible pseudo-random text: SQL-like lines of random words and numbers."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(4000)]
    lines = []
    total = 0
    while total < size:
        text = " ".join(rng.choices(words, k=rng.randint(2, 6)))
        line = f"INSERT INTO t VALUES ({rng.randrange(10**9)}, '{text}', {rng.random():.6f});\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def env(job_env: dict[str, str], redis_server: RedisServer) -> dict[str, str]:
    out = redis_env(job_env, redis_server)
    out["BAQUP_JOB_RETRY_MAX"] = "0"
    return out


@pytest.fixture
def input_file(tmp_path: Path) -> Path:
    path = tmp_path / "input.sql"
    path.write_bytes(sample_data())
    return path


def status_of(client: redis.Redis, env: Mapping[str, str]) -> dict[str, Any]:
    return read_hash(client, f"{prefix(env)}status:{env['BAQUP_JOB_ID']}")


def progress_of(client: redis.Redis, env: Mapping[str, str]) -> dict[str, Any]:
    return read_hash(client, f"{prefix(env)}progress:{env['BAQUP_JOB_ID']}")


def manifest_of(env: Mapping[str, str]) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((job_dir(env) / "manifest.json").read_text())
    return document


def committed_files(env: Mapping[str, str]) -> set[str]:
    """The regular files in the job dir (the work dir `.staging/` and the earlier attempts'
    `.attempts/` left out)."""
    return {p.name for p in job_dir(env).iterdir() if p.name not in (".staging", ".attempts")}


def cli_digests(algorithm: str, paths: list[Path]) -> dict[str, str]:
    """name -> digest, computed by the real sha256sum / sha512sum / b3sum."""
    done = subprocess.run(
        [HASH_CLI[algorithm], *map(str, paths)], capture_output=True, text=True, check=True
    )
    out = {}
    for line in done.stdout.splitlines():
        digest, _, name = line.partition("  ")
        out[Path(name).name] = digest
    assert len(out) == len(paths), done.stdout
    return out


def cli_decompress(algorithm: str, data: bytes) -> bytes:
    """Decompress with the real tools (lz4 through python-lz4's frame decoder)."""
    if algorithm == "none":
        return data
    if algorithm == "lz4":
        out: bytes = lz4.frame.decompress(data)
        return out
    tool = {"zstd": ["zstd", "-d", "-c", "-q"], "gzip": ["gzip", "-d", "-c"]}[algorithm]
    done = subprocess.run(tool, input=data, capture_output=True, check=True)
    return done.stdout


def no_manifest(env: Mapping[str, str]) -> None:
    """No manifest and nothing committed: the job dir holds at most its work dir."""
    directory = job_dir(env)
    assert not (directory / "manifest.json").exists()
    if directory.exists():
        assert committed_files(env) == set(), sorted(directory.iterdir())


def error_records(stderr: str) -> list[dict[str, Any]]:
    return [r for r in log_records(stderr) if r.get("level") in ("error", "fatal")]


# --- every algorithm combination -----------------------------------------------------------

COMPRESSIONS = [
    # (id, env overrides, the algorithm the manifest must name)
    ("zstd", {"BAQUP_ARTIFACT_COMPRESS_ALGORITHM": "zstd"}, "zstd"),
    ("gzip", {"BAQUP_ARTIFACT_COMPRESS_ALGORITHM": "gzip"}, "gzip"),
    ("lz4", {"BAQUP_ARTIFACT_COMPRESS_ALGORITHM": "lz4"}, "lz4"),
    ("none", {"BAQUP_ARTIFACT_COMPRESS_ALGORITHM": "none"}, "none"),
    (
        "off",
        {"BAQUP_ARTIFACT_COMPRESS": "false", "BAQUP_ARTIFACT_COMPRESS_ALGORITHM": "zstd"},
        "none",
    ),
]


@pytest.mark.parametrize("encryption", [None, "aes-256-gcm", "chacha20-poly1305"])
@pytest.mark.parametrize("split", [0, SPLIT], ids=["whole", "split64K"])
@pytest.mark.parametrize("checksum", ["sha256", "sha512", "blake3"])
@pytest.mark.parametrize(
    ("compress_env", "algorithm"),
    [(c[1], c[2]) for c in COMPRESSIONS],
    ids=[c[0] for c in COMPRESSIONS],
)
def test_round_trip(
    env: dict[str, str],
    redis_client: redis.Redis,
    input_file: Path,
    tmp_path: Path,
    compress_env: dict[str, str],
    algorithm: str,
    checksum: str,
    split: int,
    encryption: str | None,
) -> None:
    data = sample_data()
    env.update(compress_env)
    env["BAQUP_ARTIFACT_CHECKSUM_ALGORITHM"] = checksum
    env["BAQUP_ARTIFACT_SPLIT_SIZE"] = "64K" if split else "0"
    if encryption:
        env.update(
            BAQUP_ARTIFACT_ENCRYPT="true",
            BAQUP_ARTIFACT_ENCRYPT_ALGORITHM=encryption,
            BAQUP_ARTIFACT_ENCRYPT_KEY_ID=KEY_ID,
            BAQUP_SECRET_ENCRYPTION_KEY=KEY_HEX,
        )
    done = run_baqup(["--stdout-artifact", "dump.sql", "--", "cat", str(input_file)], env)
    assert done.returncode == 0, done.stderr[-3000:]

    # the manifest: valid against Appendix C, entries right
    manifest = manifest_of(env)
    assert validate_manifest(manifest) == []
    base = "dump.sql" + SUFFIX[algorithm] + (".enc" if encryption else "")
    entries = manifest["artifacts"]
    if split:
        names = [f"{base}.{i:03d}" for i in range(1, len(entries) + 1)]
        assert len(entries) >= 2, entries
    else:
        names = [base]
    assert [e["filename"] for e in entries] == names
    for index, entry in enumerate(entries, start=1):
        assert entry["compression"] == algorithm
        assert entry["encrypted"] is bool(encryption)
        assert entry["checksum"]["algorithm"] == checksum
        if split:
            assert entry["part"] == index
            assert entry["parts"] == len(entries)
            assert entry["original"] == base
            assert 0 < entry["size_bytes"] <= SPLIT
        else:
            assert not {"part", "parts", "original"} & entry.keys()
        if encryption:
            assert entry["encryption"] == {
                "format": "baqup-stream-v2",
                "algorithm": encryption,
                "key_id": KEY_ID,
            }
        else:
            assert "encryption" not in entry
    assert committed_files(env) == {*names, "manifest.json"}
    assert list((job_dir(env) / ".staging").iterdir()) == []

    # sizes and checksums, by the real tools
    paths = [job_dir(env) / n for n in names]
    sizes = [p.stat().st_size for p in paths]
    assert sizes == [e["size_bytes"] for e in entries]
    if split:
        assert len(entries) == math.ceil(sum(sizes) / SPLIT)
    digests = cli_digests(checksum, paths)
    assert [digests[n] for n in names] == [e["checksum"]["value"] for e in entries]

    verified = run_baqup(["verify", str(job_dir(env))], env, tool=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr[-2000:]
    assert json.loads(verified.stdout)["valid"] is True

    # the bytes, back
    stored = b"".join(p.read_bytes() for p in paths)
    if encryption:
        assert stored[:8] == b"BAQUPENC"
        assert stored[9] == ENC_ALGORITHM_ID[encryption]
        assert KEY not in stored
        output = tmp_path / "restored.sql"
        decrypt_env = {**env, "BAQUP_SECRET_ENCRYPTION_KEY": KEY_HEX}
        decrypted = run_baqup(
            ["decrypt", *map(str, paths), "--decompress", "auto", "-o", str(output)],
            decrypt_env,
            tool=True,
        )
        assert decrypted.returncode == 0, decrypted.stderr[-2000:]
        assert output.read_bytes() == data
    else:
        assert cli_decompress(algorithm, stored) == data
    if algorithm != "none":
        assert len(stored) < len(data) * 0.7
    elif encryption:
        assert len(stored) == len(data) + ENC_HEADER_SIZE + ENC_TAG_SIZE
    else:
        assert stored == data

    # the status
    status = status_of(redis_client, env)
    assert status["status"] == "success"
    assert status["exit_code"] == 0
    metrics = status["metrics"]
    assert metrics["bytes_processed"] == len(data)
    assert metrics["compression_ratio"] == pytest.approx(len(stored) / len(data), abs=1e-4)
    if algorithm != "none":
        assert metrics["compression_ratio"] < 1
    assert [f["path"] for f in status["files"]] == [str(p) for p in paths]
    assert [f[f"checksum_{checksum}"] for f in status["files"]] == [
        e["checksum"]["value"] for e in entries
    ]
    assert progress_of(redis_client, env)["bytes_processed"] == len(data)


# --- progress while data flows ------------------------------------------------------------

SLOW_WRITER = r"""
import sys, time
from pathlib import Path
out = sys.stdout.buffer
for i in range(30):
    out.write(bytes([97 + i % 26]) * 4096)
    out.flush()
    time.sleep(0.1)
Path(sys.argv[1]).write_text("done")
"""


def test_progress_at_least_every_second(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    marker = tmp_path / "writer.done"
    job = start_job(
        ["--stdout-artifact", "slow.bin", "--", *python_child(SLOW_WRITER), str(marker)], env
    )
    seen: list[tuple[float, int]] = []
    try:
        while not marker.exists():
            value = progress_of(redis_client, env).get("bytes_processed")
            if isinstance(value, int) and (not seen or value != seen[-1][1]):
                seen.append((time.monotonic(), value))
            assert job.poll() is None, job.stderr()[-3000:]
            time.sleep(0.02)
        assert job.wait(30) == 0, job.stderr()[-3000:]
    finally:
        job.stop()
    values = [v for _, v in seen]
    assert len(values) >= 2, seen
    assert values == sorted(values), seen
    assert len(set(values)) == len(values), seen
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(seen)]
    assert max(gaps) < 1.75, seen
    total = 30 * 4096
    assert progress_of(redis_client, env)["bytes_processed"] == total
    assert status_of(redis_client, env)["metrics"]["bytes_processed"] == total


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {"BAQUP_ARTIFACT_COMPRESS_ALGORITHM": "none"},
        {"BAQUP_ARTIFACT_COMPRESS_ALGORITHM": "zstd"},
        {"BAQUP_ARTIFACT_COMPRESS_ALGORITHM": "gzip"},
        {
            "BAQUP_ARTIFACT_COMPRESS_ALGORITHM": "none",
            "BAQUP_ARTIFACT_ENCRYPT": "true",
            "BAQUP_SECRET_ENCRYPTION_KEY": KEY_HEX,
        },
    ],
    ids=["none", "zstd", "gzip", "encrypted"],
)
def test_child_writing_nothing_is_empty_artifact(
    env: dict[str, str], redis_client: redis.Redis, settings: dict[str, str]
) -> None:
    # a compressed or encrypted stream of nothing still has a header: the check is on
    # what the child wrote (0 bytes), never on the stored size
    env.update(settings)
    done = run_baqup(["--stdout-artifact", "db.sql", "--", "true"], env)
    assert done.returncode == 65, done.stderr[-3000:]
    no_manifest(env)
    status = status_of(redis_client, env)
    assert status["status"] == "failed"
    assert status["error"]["code"] == "EMPTY_ARTIFACT"
    assert any("empty" in r["message"] for r in error_records(done.stderr))


KILLED_MID_STREAM = r"""
import os, signal, sys
sys.stdout.buffer.write(os.urandom(200_000))
sys.stdout.buffer.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_child_killed_mid_stream(env: dict[str, str], redis_client: redis.Redis) -> None:
    done = run_baqup(["--stdout-artifact", "db.sql", "--", *python_child(KILLED_MID_STREAM)], env)
    assert done.returncode == 1, done.stderr[-3000:]
    no_manifest(env)
    status = status_of(redis_client, env)
    assert status["status"] == "failed"
    assert status["error"]["code"] == "CHILD_KILLED"
    assert "SIGKILL" in status["error"]["message"]


FAILING_AFTER_WRITING = r"""
import os, sys
for _ in range(16):
    sys.stdout.buffer.write(os.urandom(65536))
sys.stdout.buffer.flush()
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize(("child_code", "expected"), [(3, 1), (65, 65)])
def test_child_failing_after_writing_a_lot(
    env: dict[str, str], redis_client: redis.Redis, child_code: int, expected: int
) -> None:
    done = run_baqup(
        [
            "--stdout-artifact",
            "db.sql",
            "--",
            *python_child(FAILING_AFTER_WRITING),
            str(child_code),
        ],
        env,
    )
    assert done.returncode == expected, done.stderr[-3000:]
    no_manifest(env)
    status = status_of(redis_client, env)
    assert status["status"] == "failed"
    assert status["error"]["code"] == "CHILD_FAILED"
    assert f"code {child_code}" in status["error"]["message"]
    # baqup-run's own records carry no traceback (a child killed by the abort may print
    # one: coverage's exit hook under SIGTERM)
    own = [r for r in log_records(done.stderr) if r.get("component") != "child"]
    assert not [r for r in own if "Traceback" in json.dumps(r)], done.stderr[-3000:]


CLOSES_STDOUT_EARLY = r"""
import os, sys, time
from pathlib import Path
sys.stdout.buffer.write(Path(sys.argv[1]).read_bytes())
sys.stdout.buffer.flush()
os.close(1)
time.sleep(1.0)
Path(sys.argv[2]).write_text("still ran")
"""


def test_child_closing_stdout_early_then_exiting_zero(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    data = sample_data(100_000, seed=3)
    source = tmp_path / "part.sql"
    source.write_bytes(data)
    marker = tmp_path / "after-close"
    done = run_baqup(
        [
            "--stdout-artifact",
            "db.sql",
            "--",
            *python_child(CLOSES_STDOUT_EARLY),
            str(source),
            str(marker),
        ],
        env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = manifest_of(env)
    assert validate_manifest(manifest) == []
    assert [e["filename"] for e in manifest["artifacts"]] == ["db.sql.zst"]
    stored = (job_dir(env) / "db.sql.zst").read_bytes()
    assert cli_decompress("zstd", stored) == data
    # the commit waited for the child, which kept running after closing stdout
    manifest_path = job_dir(env) / "manifest.json"
    assert manifest_path.stat().st_mtime_ns >= marker.stat().st_mtime_ns
    status = status_of(redis_client, env)
    assert status["status"] == "success"
    assert status["metrics"]["bytes_processed"] == len(data)


INCOMPRESSIBLE = r"""
import os, sys
for _ in range(128):
    sys.stdout.buffer.write(os.urandom(65536))
sys.stdout.buffer.flush()
"""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted at the end."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_disk_full_while_capturing(
    env: dict[str, str], redis_client: redis.Redis, small_disk: Path
) -> None:
    env.update(
        BAQUP_STAGING_DIR=str(small_disk),
        BAQUP_ARTIFACT_COMPRESS_ALGORITHM="none",
    )
    started = time.monotonic()
    done = run_baqup(
        ["--grace", "2", "--stdout-artifact", "big.bin", "--", *python_child(INCOMPRESSIBLE)],
        env,
    )
    assert done.returncode == 74, done.stderr[-3000:]
    assert time.monotonic() - started < 20
    no_manifest(env)
    # baqup-run's own records carry no traceback (a child killed by the abort may print
    # one: coverage's exit hook under SIGTERM)
    own = [r for r in log_records(done.stderr) if r.get("component") != "child"]
    assert not [r for r in own if "Traceback" in json.dumps(r)], done.stderr[-3000:]
    status = status_of(redis_client, env)
    assert status["status"] == "failed"
    assert status["error"]["code"] in ("DISK_FULL", "IO_ERROR")
    assert status["error"]["retriable"] is True
    assert any(
        r.get("context", {}).get("code") in ("DISK_FULL", "IO_ERROR")
        for r in error_records(done.stderr)
    ), done.stderr[-3000:]


def test_bad_split_size_names_the_variable(env: dict[str, str], input_file: Path) -> None:
    env["BAQUP_ARTIFACT_SPLIT_SIZE"] = "12Q"
    done = run_baqup(["--stdout-artifact", "db.sql", "--", "cat", str(input_file)], env)
    assert done.returncode == 64, done.stderr[-3000:]
    assert any("BAQUP_ARTIFACT_SPLIT_SIZE" in r["message"] for r in error_records(done.stderr)), (
        done.stderr
    )
    no_manifest(env)


BAD_KEYS = {
    "short-hex": bytes(range(31)).hex(),
    "long-hex": bytes(range(33)).hex(),
    "not-encoded": "correct horse battery staple!!",
    "base64-16-bytes": base64.b64encode(b"sixteen byte key").decode(),
}


@pytest.mark.parametrize("key", [*BAD_KEYS.values(), None], ids=[*BAD_KEYS, "missing"])
def test_bad_or_missing_key_is_a_config_error(
    env: dict[str, str], input_file: Path, key: str | None
) -> None:
    env.update(BAQUP_ARTIFACT_ENCRYPT="true")
    if key is not None:
        env["BAQUP_SECRET_ENCRYPTION_KEY"] = key
    done = run_baqup(["--stdout-artifact", "db.sql", "--", "cat", str(input_file)], env)
    assert done.returncode == 64, done.stderr[-3000:]
    errors = error_records(done.stderr)
    assert any("BAQUP_SECRET_ENCRYPTION_KEY" in r["message"] for r in errors), done.stderr
    if key is not None:
        assert key not in done.stderr
        assert key not in done.stdout
        assert key[:12] not in done.stderr
    no_manifest(env)


HIDE_LZ4 = (
    "import sys\n"
    "sys.modules['lz4'] = None\n"
    "from baqup_supervisor.cli import run\n"
    "sys.exit(run(sys.argv[1:]))\n"
)


def test_lz4_missing_falls_back_to_zstd(
    env: dict[str, str], redis_client: redis.Redis, input_file: Path
) -> None:
    env["BAQUP_ARTIFACT_COMPRESS_ALGORITHM"] = "lz4"
    done = subprocess.run(
        [
            PYTHON,
            "-c",
            HIDE_LZ4,
            "--stdout-artifact",
            "db.sql",
            "--",
            "cat",
            str(input_file),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    events = read_stream(redis_client, f"{prefix(env)}events:{env['BAQUP_JOB_ID']}")
    fallback = [e for e in events if e.get("code") == "COMPRESSION_FALLBACK"]
    assert len(fallback) == 1, events
    assert fallback[0]["severity"] == "info"
    assert "lz4" in fallback[0]["message"]
    assert "zstd" in fallback[0]["message"]
    manifest = manifest_of(env)
    assert validate_manifest(manifest) == []
    [entry] = manifest["artifacts"]
    assert entry["filename"] == "db.sql.zst"
    assert entry["compression"] == "zstd"
    assert cli_decompress("zstd", (job_dir(env) / "db.sql.zst").read_bytes()) == sample_data()
    status = status_of(redis_client, env)
    assert status["warnings_summary"].get("COMPRESSION_FALLBACK") == 1


RETRIED = r"""
import sys
from pathlib import Path
marker = Path(sys.argv[1])
if not marker.exists():
    marker.write_text("first attempt")
    sys.stdout.write("FIRST ATTEMPT, HALF WRITTEN\n" * 5000)
    sys.stdout.flush()
    sys.exit(74)
sys.stdout.buffer.write(Path(sys.argv[2]).read_bytes())
"""


def test_a_retried_attempt_starts_a_fresh_artifact(
    env: dict[str, str], redis_client: redis.Redis, input_file: Path, tmp_path: Path
) -> None:
    env.update(BAQUP_JOB_RETRY_MAX="1", BAQUP_JOB_RETRY_BACKOFF="constant")
    env["BAQUP_ARTIFACT_SPLIT_SIZE"] = "64K"
    done = run_baqup(
        [
            "--stdout-artifact",
            "db.sql",
            "--",
            *python_child(RETRIED),
            str(tmp_path / "attempted"),
            str(input_file),
        ],
        env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "attempted").exists()
    manifest = manifest_of(env)
    assert validate_manifest(manifest) == []
    names = [e["filename"] for e in manifest["artifacts"]]
    stored = b"".join((job_dir(env) / n).read_bytes() for n in names)
    assert cli_decompress("zstd", stored) == sample_data()
    assert committed_files(env) == {*names, "manifest.json"}
    # the first attempt's half-written capture is kept aside, never committed
    assert sorted(p.name for p in (job_dir(env) / ".attempts" / "1").iterdir()) == ["db.sql.zst"]
    metrics = status_of(redis_client, env)["metrics"]
    assert metrics["bytes_processed"] == len(sample_data())
    assert metrics["compression_ratio"] == pytest.approx(len(stored) / len(sample_data()), abs=1e-4)


@pytest.mark.parametrize("name", ["../escape.sql", "/tmp/escape.sql", "sub/../../escape.sql"])
def test_artifact_names_leaving_the_work_dir_are_refused(
    env: dict[str, str], input_file: Path, name: str
) -> None:
    done = run_baqup(["--stdout-artifact", name, "--", "cat", str(input_file)], env)
    assert done.returncode == 65, done.stderr[-3000:]
    assert any(name in r["message"] for r in error_records(done.stderr)), done.stderr
    no_manifest(env)
    staging = Path(env["BAQUP_STAGING_DIR"])
    assert not list(staging.rglob("escape*"))
    assert not Path("/tmp/escape.sql.zst").exists()


def test_artifact_name_in_a_subdirectory(env: dict[str, str], input_file: Path) -> None:
    done = run_baqup(["--stdout-artifact", "dumps/db.sql", "--", "cat", str(input_file)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = manifest_of(env)
    assert validate_manifest(manifest) == []
    assert [e["filename"] for e in manifest["artifacts"]] == ["dumps/db.sql.zst"]
    stored = (job_dir(env) / "dumps" / "db.sql.zst").read_bytes()
    assert cli_decompress("zstd", stored) == sample_data()


# --- baqup decrypt: all or nothing ----------------------------------------------------------


def run_decrypt(parts: list[Path], key: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
    """The real `baqup decrypt`, its stdout as bytes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAQUP_")}
    env["BAQUP_SECRET_ENCRYPTION_KEY"] = key
    return subprocess.run(
        [
            PYTHON,
            "-c",
            "from baqup_supervisor.tool import tool_main; tool_main()",
            "decrypt",
            *map(str, parts),
            *extra,
        ],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def encrypted_parts(env: dict[str, str], input_file: Path) -> list[Path]:
    """A committed gzip + aes-256-gcm artifact in 64K parts."""
    env.update(
        BAQUP_ARTIFACT_SPLIT_SIZE="64K",
        BAQUP_ARTIFACT_ENCRYPT="true",
        BAQUP_SECRET_ENCRYPTION_KEY=KEY_HEX,
        BAQUP_ARTIFACT_COMPRESS_ALGORITHM="gzip",
    )
    done = run_baqup(["--stdout-artifact", "db.sql", "--", "cat", str(input_file)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    names = [e["filename"] for e in manifest_of(env)["artifacts"]]
    assert len(names) >= 2, names
    return [job_dir(env) / n for n in names]


def test_decrypt_to_stdout(encrypted_parts: list[Path]) -> None:
    done = run_decrypt(encrypted_parts, KEY_HEX, "--decompress", "auto")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == sample_data()
    raw = run_decrypt(encrypted_parts, KEY_HEX)  # --decompress none: the gzip stream
    assert raw.returncode == 0, raw.stderr[-2000:]
    assert cli_decompress("gzip", raw.stdout) == sample_data()


def test_decrypt_with_a_base64_key(encrypted_parts: list[Path]) -> None:
    key = base64.urlsafe_b64encode(KEY).decode().rstrip("=")
    done = run_decrypt(encrypted_parts, key, "--decompress", "gzip")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == sample_data()


@pytest.mark.parametrize(
    "damage", ["wrong-key", "flipped-byte", "middle-part-left-out", "reordered", "first-only"]
)
def test_decrypt_refuses_damage_and_leaves_no_output(
    encrypted_parts: list[Path], tmp_path: Path, damage: str
) -> None:
    parts = list(encrypted_parts)
    key = KEY_HEX
    if damage == "wrong-key":
        key = bytes(reversed(KEY)).hex()
    elif damage == "flipped-byte":
        data = bytearray(parts[1].read_bytes())
        data[len(data) // 2] ^= 0x04
        parts[1].write_bytes(bytes(data))
    elif damage == "middle-part-left-out":
        parts = [*parts[:1], *parts[2:]] if len(parts) > 2 else parts[:1]
    elif damage == "reordered":
        parts[0], parts[1] = parts[1], parts[0]
    else:
        parts = parts[:1]
    out_dir = tmp_path / "restore"
    out_dir.mkdir()
    output = out_dir / "db.sql"
    done = run_decrypt(parts, key, "--decompress", "auto", "-o", str(output))
    assert done.returncode == 65, done.stderr[-2000:]
    assert list(out_dir.iterdir()) == []
    stderr = done.stderr.decode()
    assert "Traceback" not in stderr
    assert any(r.get("context", {}).get("exit_code") == 65 for r in log_records(stderr))
    assert key not in stderr


def test_decrypt_auto_under_a_directory_named_like_enc(
    encrypted_parts: list[Path], tmp_path: Path
) -> None:
    # `--decompress auto` reads the compression from the artifact's name, not from the
    # directories above it (a mount such as /backups.encrypted/ is common)
    directory = tmp_path / "backups.encrypted"
    directory.mkdir()
    copies = []
    for part in encrypted_parts:
        copy = directory / part.name
        copy.write_bytes(part.read_bytes())
        copies.append(copy)
    output = tmp_path / "db.sql"
    done = run_decrypt(copies, KEY_HEX, "--decompress", "auto", "-o", str(output))
    assert done.returncode == 0, done.stderr[-2000:]
    assert output.read_bytes() == sample_data()


# --- partial failure ----------------------------------------------------------------------

COMPONENTS = r"""
import json, os, sys
from pathlib import Path
work = Path(os.environ["BAQUP_WORK_DIR"])
fd = int(os.environ["BAQUP_CONTROL_FD"])
prefix = sys.argv[1] if len(sys.argv) > 1 else ""  # how the child spells the artifacts
for name, status in (("users", "success"), ("orders", "success"), ("legacy", "failed")):
    (work / f"{name}.sql").write_text(f"-- dump of {name}\n" * 200)
    artifact = f"{prefix}{name}.sql"
    message = {"type": "component", "name": name, "status": status, "artifact": artifact}
    if status == "failed":
        message["error"] = {"code": "PERMISSION_DENIED", "message": "no access to legacy"}
    os.write(fd, (json.dumps(message) + "\n").encode())
"""


@pytest.mark.parametrize(("mode", "expected"), [("fail", 76), ("warn", 0), ("skip", 0)])
def test_partial_failure(
    env: dict[str, str], redis_client: redis.Redis, mode: str, expected: int
) -> None:
    env["BAQUP_AGENT_PARTIAL_FAILURE_MODE"] = mode
    done = run_baqup(["--", *python_child(COMPONENTS)], env)
    assert done.returncode == expected, done.stderr[-3000:]

    status = status_of(redis_client, env)
    assert status["status"] == "partial"
    assert status["exit_code"] == expected
    assert status["summary"] == {"total": 3, "succeeded": 2, "failed": 1}
    by_name = {c["name"]: c for c in status["components"]}
    assert set(by_name) == {"users", "orders", "legacy"}
    assert by_name["users"]["status"] == "success"
    assert by_name["users"]["artifact"] == "users.sql"
    assert by_name["orders"]["status"] == "success"
    assert by_name["legacy"]["status"] == "failed"
    assert by_name["legacy"]["error"]["code"] == "PERMISSION_DENIED"

    manifest = manifest_of(env)
    assert validate_manifest(manifest) == []
    assert sorted(e["filename"] for e in manifest["artifacts"]) == ["orders.sql", "users.sql"]
    assert "legacy.sql" not in {Path(f["path"]).name for f in status["files"]}
    verified = run_baqup(["verify", str(job_dir(env))], env, tool=True)
    assert verified.returncode == 0, verified.stdout

    warnings = [
        r
        for r in log_records(done.stderr)
        if r.get("level") == "warn" and "component" in r.get("message", "")
    ]
    if mode == "warn":
        assert warnings, done.stderr[-3000:]
    else:
        assert warnings == [], warnings


def test_partial_failure_excludes_the_failed_artifact_however_it_is_spelled(
    env: dict[str, str], redis_client: redis.Redis
) -> None:
    # `./legacy.sql` names the same file as `legacy.sql`: it must stay out of the manifest
    done = run_baqup(["--", *python_child(COMPONENTS), "./"], env)
    assert done.returncode == 76, done.stderr[-3000:]
    assert status_of(redis_client, env)["summary"] == {"total": 3, "succeeded": 2, "failed": 1}
    manifest = manifest_of(env)
    assert sorted(e["filename"] for e in manifest["artifacts"]) == ["orders.sql", "users.sql"]
