"""examples/rust-agent: a compiled agent, made compliant by baqup-run, on the host.

The binary is built once per session with cargo (`--offline --locked --release`,
standard library only) into a target dir under the pytest tmp dir, then run the way
the controller runs it: `baqup-run -- agent-rust` and `baqup-run snapshot` through the
example's schema, against the session's real redis-server, on a real source tree.
What is checked: the committed archive (`baqup verify` 0, GNU tar extracts it to the
same files, modes, times and symlinks), what reached Redis (progress, intent in the
heartbeat, events, status), the manifest's source metadata, a clean stop on SIGTERM
(ABORTED, exit 1, no manifest, no partial archive), a full disk (74) and bad
configuration (64, 65). The image is checked statically, like the others in
tests/test_agents_static.py; building it is the container suite's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis

from tests.conftest import REPO, RedisServer, run_baqup
from tests.jobs import (
    job_dir,
    log_records,
    prefix,
    read_hash,
    read_stream,
    redis_env,
    start_job,
    wait_for,
)
from tests.test_agents_static import (
    BASE_DOCKERFILE,
    Stage,
    assert_copy_sources_exist,
    copy_sources,
    dockerignored,
    final_stage,
    parse_dockerfile,
    substitute,
    tool_env,
)

AGENT_DIR = REPO / "examples" / "rust-agent"
SCHEMA = AGENT_DIR / "agent-schema.json"
DOCKERFILE = AGENT_DIR / "Dockerfile"
MTIME = 1_000_000_000  # a fixed time, to see it survive the archive


def find_cargo() -> str:
    found = shutil.which("cargo")
    if found is None and (Path.home() / ".cargo" / "bin" / "cargo").exists():
        found = str(Path.home() / ".cargo" / "bin" / "cargo")
    if found is None:
        raise RuntimeError("cargo is not installed: run ./tests/run (it installs Debian's cargo)")
    return found


def cargo(args: list[str], target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            find_cargo(),
            *args,
            "--offline",
            "--locked",
            "--manifest-path",
            str(AGENT_DIR / "Cargo.toml"),
            "--target-dir",
            str(target),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )


@pytest.fixture(scope="session")
def cargo_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cargo-target")


@pytest.fixture(scope="session")
def agent_binary(cargo_target: Path) -> Path:
    result = cargo(["build", "--release"], cargo_target)
    assert result.returncode == 0, result.stderr[-3000:]
    binary = cargo_target / "release" / "agent-rust"
    assert os.access(binary, os.X_OK)
    return binary


@pytest.fixture
def rust_env(
    job_env: dict[str, str], redis_server: RedisServer, agent_binary: Path, tmp_path: Path
) -> dict[str, str]:
    env = redis_env(job_env, redis_server)
    env["PATH"] = f"{agent_binary.parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["BAQUP_SOURCE_PATH"] = str(tmp_path / "data")
    env["BAQUP_AGENT_HEARTBEAT_INTERVAL"] = "30"  # only intent changes explain new beats
    return env


def source_tree(root: Path, outside: Path) -> dict[str, Any]:
    """A source with what a tar writer gets wrong; returns what must be archived."""
    files: dict[str, bytes] = {
        "a.txt": b"alpha\n",
        "empty": b"",
        "sub dir/b.bin": bytes(range(256)) * 40,
        "sub dir/deeper/ü n i.txt": "ünïcødé\n".encode(),
        "long/" + "n" * 120 + "/" + "m" * 90 + ".txt": b"a path past ustar's 100 bytes\n",
        os.fsdecode(b"caf\xe9-latin1.txt"): b"a name that is not UTF-8\n",
        "big.bin": os.urandom(300_000),
    }
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.utime(path, (MTIME, MTIME))
    (root / "a.txt").chmod(0o600)
    (root / "empty-dir").mkdir()
    outside.write_text("not in the source\n")
    (root / "link-in").symlink_to("a.txt")
    (root / "sub dir" / "abs-link").symlink_to(root / "sub dir" / "deeper" / "ü n i.txt")
    (root / "dangling").symlink_to("sub dir/not-yet")
    (root / "escape").symlink_to(outside)
    (root / "dangling-out").symlink_to("../../nowhere")
    os.mkfifo(root / "pipe")
    return {
        "files": files,
        "symlinks": {
            "link-in": "a.txt",
            "sub dir/abs-link": "deeper/ü n i.txt",  # absolute inside: stored relative
            "dangling": "sub dir/not-yet",
        },
        "skipped": {
            "SYMLINK_EXTERNAL": ["escape"],
            "SYMLINK_SKIPPED": ["dangling-out"],
            "ANOMALY_DETECTED": ["pipe"],
        },
    }


def verify(path: Path) -> dict[str, Any]:
    result = run_baqup(["verify", str(path)], tool_env(), tool=True)
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["valid"] is True
    return report


def extracted_tree(archive: Path, dest: Path) -> None:
    """Extract with GNU tar, an independent reader of the pax format."""
    dest.mkdir()
    result = subprocess.run(
        ["tar", "-C", str(dest), "-xf", str(archive)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("form", ["command", "role"])
def test_archive_under_baqup_run(
    form: str, rust_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    source = Path(rust_env["BAQUP_SOURCE_PATH"])
    expected = source_tree(source, tmp_path / "outside.txt")
    args = ["--schema", str(SCHEMA), *(["--", "agent-rust"] if form == "command" else ["snapshot"])]
    result = run_baqup(args, rust_env)
    assert result.returncode == 0, result.stderr[-3000:]
    jdir = job_dir(rust_env)
    report = verify(jdir)
    assert report["role"] == "snapshot"
    manifest = json.loads((jdir / "manifest.json").read_text())
    assert manifest["agent"] == "agent-rust"
    assert [a["filename"] for a in manifest["artifacts"]] == ["source.tar"]
    files: dict[str, bytes] = expected["files"]
    total = sum(len(v) for v in files.values())
    directories = {"sub dir", "sub dir/deeper", "long", "long/" + "n" * 120, "empty-dir"}
    assert manifest["source_metadata"] == {
        "type": "tar",
        "path": str(source),
        "files_included": len(files),
        "bytes_included": total,
        "directories": len(directories),
        "symlinks": len(expected["symlinks"]),
        "entries_skipped": 3,
    }

    # the bytes: GNU tar extracts the same files, modes, times, directories and symlinks
    out = tmp_path / "extracted"
    extracted_tree(jdir / "source.tar", out)
    for relative, content in files.items():
        path = out / relative
        assert path.read_bytes() == content, relative
        assert int(path.stat().st_mtime) == MTIME, relative
    assert stat.S_IMODE((out / "a.txt").stat().st_mode) == 0o600
    for directory in directories:
        assert (out / directory).is_dir(), directory
    for link, target in expected["symlinks"].items():
        assert os.readlink(out / link) == target, link
    assert (out / "link-in").read_bytes() == files["a.txt"]
    assert (out / "sub dir" / "abs-link").read_bytes() == files["sub dir/deeper/ü n i.txt"]
    for left_out in ("escape", "dangling-out", "pipe"):
        assert not os.path.lexists(out / left_out), left_out
    found = {str(p.relative_to(out)) for p in out.rglob("*")}
    assert found == set(files) | set(expected["symlinks"]) | directories

    # what reached Redis
    p, jid = prefix(rust_env), rust_env["BAQUP_JOB_ID"]
    progress = read_hash(redis_client, f"{p}progress:{jid}")
    assert progress["percent_complete"] == 100
    assert progress["files_processed"] == len(files)
    assert progress["bytes_processed"] == total
    events = {e["code"]: e for e in read_stream(redis_client, f"{p}events:{jid}")}
    for code, paths in expected["skipped"].items():
        assert events[code]["sample_paths"] == paths, code
    assert events["SYMLINK_EXTERNAL"]["severity"] == "warn"
    assert events["SYMLINK_SKIPPED"]["severity"] == "info"
    assert set(events) == set(expected["skipped"])
    status = read_hash(redis_client, f"{p}status:{jid}")
    assert status["status"] == "success"
    assert status["agent"] == "agent-rust"
    assert status["metrics"]["files_processed"] == len(files)
    assert status["files"][0]["path"] == str(jdir / "source.tar")
    beat = read_hash(redis_client, f"{p}heartbeat:{rust_env['BAQUP_AGENT_ID']}")
    assert beat["intent"] is None  # cleared before the end
    logged = [r for r in log_records(result.stderr) if r.get("message") == "archive written"]
    assert len(logged) == 1
    assert logged[0]["component"] == "child"
    assert logged[0]["context"] == {"files": len(files), "bytes": total, "skipped": 3}


def test_the_archive_is_the_same_for_the_same_tree(
    rust_env: dict[str, str], tmp_path: Path
) -> None:
    """Names are sorted and nothing varies but the tree: two runs give the same bytes."""
    source = Path(rust_env["BAQUP_SOURCE_PATH"])
    source_tree(source, tmp_path / "outside.txt")
    digests = []
    for _ in range(2):
        env = dict(rust_env, BAQUP_JOB_ID=str(uuid.uuid4()))
        result = run_baqup(["--schema", str(SCHEMA), "snapshot"], env)
        assert result.returncode == 0, result.stderr[-3000:]
        manifest = json.loads((job_dir(env) / "manifest.json").read_text())
        digests.append(manifest["artifacts"][0]["checksum"]["value"])
    assert digests[0] == digests[1]


def test_the_staging_dir_is_never_archived(
    rust_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A source above the staging dir (`/` in a container): the archive reads neither
    itself nor other jobs' artifacts."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_bytes(b"kept\n")
    other_job = Path(rust_env["BAQUP_STAGING_DIR"]) / "other-job"
    other_job.mkdir()
    (other_job / "old.tar").write_bytes(b"x" * 1000)
    env = dict(rust_env, BAQUP_SOURCE_PATH=str(tmp_path))
    result = run_baqup(["--schema", str(SCHEMA), "snapshot"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    jdir = job_dir(env)
    verify(jdir)
    with tarfile.open(jdir / "source.tar") as tar:
        names = tar.getnames()
    assert "data/keep.txt" in names
    assert [n for n in names if n.split("/")[0] == "staging"] == []
    (event,) = read_stream(redis_client, f"{prefix(env)}events:{env['BAQUP_JOB_ID']}")
    assert event["code"] == "STAGING_EXCLUDED"
    assert event["sample_paths"] == ["staging"]


def slow_source(root: Path, size: int) -> Path:
    root.mkdir()
    path = root / "large.bin"
    with path.open("wb") as out:
        out.write(os.urandom(size))
    return path


def test_sigterm_mid_job_is_a_clean_abort(
    rust_env: dict[str, str], redis_client: redis.Redis, jobs: list[Any]
) -> None:
    source = Path(rust_env["BAQUP_SOURCE_PATH"])
    slow_source(source, 8 << 20)
    env = dict(rust_env, BAQUP_SOURCE_RATE_LIMIT="1M")  # 8 s of work
    grace = 5.0
    job = start_job(["--schema", str(SCHEMA), "--grace", str(grace), "snapshot"], env)
    jobs.append(job)
    p, jid = prefix(env), env["BAQUP_JOB_ID"]

    def intent() -> Any:
        beat = read_hash(redis_client, f"{p}heartbeat:{env['BAQUP_AGENT_ID']}")
        return beat.get("intent")

    seen = wait_for(intent, 15, what="the intent in the heartbeat")
    assert seen == {"operation": "archive", "expected_duration_seconds": 8, "detail": str(source)}
    wait_for(
        lambda: read_hash(redis_client, f"{p}progress:{jid}").get("bytes_processed", 0) > 0,
        15,
        what="progress in Redis",
    )
    progress = read_hash(redis_client, f"{p}progress:{jid}")
    assert 0 < progress["percent_complete"] < 100
    assert progress["current_file"] == "large.bin"
    job.signal(signal.SIGTERM)
    stopped = time.monotonic()
    code = job.wait(grace + 20)
    assert code == 1, job.stderr()[-3000:]
    assert time.monotonic() - stopped < grace  # it stopped itself: no SIGKILL was needed
    records = job.logs()
    assert not [r for r in records if "SIGKILL" in str(r.get("message"))]
    child = [r for r in records if r.get("component") == "child"]
    assert any("stopped by SIGTERM" in str(r.get("message")) for r in child)
    jdir = job_dir(env)
    assert not (jdir / "manifest.json").exists()
    assert not list(jdir.rglob("source.tar")), "the partial archive was left behind"
    status = read_hash(redis_client, f"{p}status:{jid}")
    assert status["status"] == "failed"
    assert status["exit_code"] == 1
    assert status["error"]["code"] == "ABORTED"


def test_a_file_that_shrinks_while_read(
    rust_env: dict[str, str], redis_client: redis.Redis, jobs: list[Any]
) -> None:
    """The header announced its size: the rest is zeros, and a FILE_CHANGED event says so."""
    source = Path(rust_env["BAQUP_SOURCE_PATH"])
    path = slow_source(source, 4 << 20)
    original = path.read_bytes()
    env = dict(rust_env, BAQUP_SOURCE_RATE_LIMIT="1M")
    job = start_job(["--schema", str(SCHEMA), "snapshot"], env)
    jobs.append(job)
    p, jid = prefix(env), env["BAQUP_JOB_ID"]
    wait_for(
        lambda: read_hash(redis_client, f"{p}progress:{jid}").get("bytes_processed", 0) > 0,
        15,
        what="progress in Redis",
    )
    kept = 3 << 20  # the reader is about 1 MiB in after a second: well before this
    with path.open("r+b") as handle:
        handle.truncate(kept)
    assert job.wait(30) == 0, job.stderr()[-3000:]
    jdir = job_dir(env)
    verify(jdir)
    out = jdir.parent / "extracted"
    extracted_tree(jdir / "source.tar", out)
    assert (out / "large.bin").read_bytes() == original[:kept] + bytes(len(original) - kept)
    (event,) = read_stream(redis_client, f"{p}events:{jid}")
    assert event["code"] == "FILE_CHANGED"
    assert event["sample_paths"] == ["large.bin"]
    assert "1048576 missing bytes" in event["message"]


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_an_io_error(
    rust_env: dict[str, str], redis_client: redis.Redis, tiny_disk: Path
) -> None:
    source = Path(rust_env["BAQUP_SOURCE_PATH"])
    slow_source(source, 2 << 20)
    env = dict(rust_env, BAQUP_STAGING_DIR=str(tiny_disk), BAQUP_JOB_RETRY_MAX="0")
    result = run_baqup(["--schema", str(SCHEMA), "snapshot"], env)
    assert result.returncode == 74, result.stderr[-3000:]
    child = [r for r in log_records(result.stderr) if r.get("component") == "child"]
    assert any("No space left on device" in str(r.get("message")) for r in child)
    jdir = job_dir(env)
    assert not (jdir / "manifest.json").exists()
    assert not list(jdir.rglob("source.tar")), "the partial archive was left behind"
    status = read_hash(redis_client, f"{prefix(env)}status:{env['BAQUP_JOB_ID']}")
    assert status["status"] == "failed"
    assert status["exit_code"] == 74


def test_a_missing_source_is_a_data_error(
    rust_env: dict[str, str], redis_client: redis.Redis
) -> None:
    result = run_baqup(["--schema", str(SCHEMA), "snapshot"], rust_env)  # data/ never made
    assert result.returncode == 65, result.stderr[-3000:]
    assert f"agent-rust: source {rust_env['BAQUP_SOURCE_PATH']} does not exist" in result.stderr
    status = read_hash(redis_client, f"{prefix(rust_env)}status:{rust_env['BAQUP_JOB_ID']}")
    assert status["exit_code"] == 65


@pytest.mark.parametrize(
    ("variables", "code", "named"),
    [
        ({"BAQUP_SOURCE_PATH": ""}, 64, "BAQUP_SOURCE_PATH is not set"),
        ({"BAQUP_WORK_DIR": ""}, 64, "run this agent under baqup-run"),
        ({"BAQUP_SOURCE_RATE_LIMIT": "1.5M"}, 64, "BAQUP_SOURCE_RATE_LIMIT=1.5M"),
        ({"BAQUP_SOURCE_FOLLOW_SYMLINKS": "follow"}, 64, "BAQUP_SOURCE_FOLLOW_SYMLINKS=follow"),
        ({"BAQUP_CONTROL_FD": "three"}, 64, "BAQUP_CONTROL_FD=three"),
        ({"BAQUP_CONTROL_FD": "9"}, 64, "BAQUP_CONTROL_FD=9: descriptor not open"),
        ({"BAQUP_SOURCE_PATH": "/nonexistent/source"}, 65, "/nonexistent/source does not exist"),
    ],
)
def test_bad_configuration_run_directly(
    variables: dict[str, str], code: int, named: str, agent_binary: Path, tmp_path: Path
) -> None:
    """Without baqup-run in front (its --validate would catch most of these first)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "work").mkdir()
    env = tool_env()
    env.update(BAQUP_SOURCE_PATH=str(tmp_path / "data"), BAQUP_WORK_DIR=str(tmp_path / "work"))
    env.update(variables)
    env = {k: v for k, v in env.items() if v}
    read_end, write_end = os.pipe()
    try:
        result = subprocess.run(
            [str(agent_binary)],
            env={**env, "BAQUP_CONTROL_FD": env.get("BAQUP_CONTROL_FD", str(write_end))},
            pass_fds=(write_end,),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        os.close(read_end)
        os.close(write_end)
    assert result.returncode == code, result.stderr
    assert named in result.stderr
    assert result.stderr.startswith("agent-rust: ")
    assert list((tmp_path / "work").iterdir()) == []


def test_rust_unit_tests(cargo_target: Path) -> None:
    result = cargo(["test"], cargo_target)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " 0 failed" in result.stdout


# --- the image, checked statically --------------------------------------------------------------


def stages(path: Path) -> list[tuple[str, str | None, Stage]]:
    """(image, stage name, stage) for every FROM, in order."""
    instructions = parse_dockerfile(path.read_text())
    args: dict[str, str] = {}
    found: list[tuple[str, str | None, list[Any]]] = []
    for instruction in instructions:
        if instruction.keyword == "ARG" and not found:
            name, _, default = instruction.text.partition("=")
            args[name.strip()] = default.strip()
        elif instruction.keyword == "FROM":
            words = instruction.words
            stage_name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            found.append((substitute(words[0], args), stage_name, []))
        else:
            found[-1][2].append(instruction)
    return [(image, name, Stage(image, body, args)) for image, name, body in found]


def debian_release(image: str) -> str:
    for release in ("bookworm", "trixie", "bullseye"):
        if release in image:
            return release
    raise AssertionError(f"{image}: no Debian release named in the tag")


def test_dockerfile_is_multi_stage_from_the_base() -> None:
    (build_image, build_name, build), (final_image, _, final) = stages(DOCKERFILE)
    base = final_stage(BASE_DOCKERFILE)
    # the final stage is the base image, tagged as Dockerfile.base says it is built
    assert final_image == final_stage(DOCKERFILE).base
    tag = re.search(r"-t (\S+) ", BASE_DOCKERFILE.read_text())
    assert tag is not None
    assert final_image == tag.group(1)
    first_from = next(i for i in parse_dockerfile(DOCKERFILE.read_text()) if i.keyword == "FROM")
    assert first_from.words[0].startswith(("debian:", "rust:"))
    # the build stage links against the same glibc as the base image runs
    assert debian_release(build_image) == debian_release(base.base)
    assert build_name is not None
    runs = " ".join(i.text for i in build.all("RUN"))
    if build_image.startswith("debian:"):
        assert re.search(r"apt-get install .*\bcargo\b", runs), runs
    build_words = next(i.words for i in build.all("RUN") if "cargo build" in i.text)
    assert {"--release", "--locked", "--offline"} <= set(build_words)
    # every file the build needs is copied: the manifest, the lock file, all of src/
    copied = [s for i in build.all("COPY") for s in copy_sources(i)[0]]
    assert {"examples/rust-agent/Cargo.toml", "examples/rust-agent/Cargo.lock"} <= set(copied)
    assert "examples/rust-agent/src" in copied
    for source in copied:
        assert not dockerignored(source), source
    assert_copy_sources_exist(build, DOCKERFILE)

    # the final stage: the binary where the schema's command finds it, and the schema
    meta = json.loads(SCHEMA.read_text())["x-baqup-agent"]
    command = meta["commands"]["snapshot"]["argv"][0]
    binaries = [
        copy_sources(i) for i in final.all("COPY") if copy_sources(i)[2] and build_name in i.text
    ]
    assert binaries == [(["/src/target/release/agent-rust"], f"/usr/local/bin/{command}", True)]
    schema_copies = [i for i in final.all("COPY") if not copy_sources(i)[2]]
    assert [copy_sources(i)[:2] for i in schema_copies] == [
        (["examples/rust-agent/agent-schema.json"], "/etc/baqup/agent-schema.json")
    ]
    assert_copy_sources_exist(final, DOCKERFILE)
    # baqup-run stays the ENTRYPOINT and the user stays the base image's (non-root)
    assert final.last("ENTRYPOINT") is None
    assert final.last("USER") is None
    assert final.all("RUN") == []
    version = meta["version"]
    assert f"ghcr.io/baqup/agent-rust:{version}" in DOCKERFILE.read_text()


def test_schema_and_cargo_agree() -> None:
    schema = json.loads(SCHEMA.read_text())
    meta = schema["x-baqup-agent"]
    cargo_toml = (AGENT_DIR / "Cargo.toml").read_text()
    assert f'version = "{meta["version"]}"' in cargo_toml
    assert 'name = "agent-rust"' in cargo_toml
    dependencies = cargo_toml.split("[dependencies]", 1)[1].split("[", 1)[0]
    assert dependencies.strip() == "", "no crates: there is no registry to fetch them from"
    lock = (AGENT_DIR / "Cargo.lock").read_text()
    assert lock.count("[[package]]") == 1
    result = run_baqup(["--info", "--schema", str(SCHEMA)], tool_env())
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["agent"] == "agent-rust"
    assert info["commands"] == {"snapshot": ["agent-rust"]}
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert all(name.startswith("BAQUP_") for name in schema["properties"])


@pytest.mark.parametrize(
    ("name", "value"),
    [("BAQUP_SOURCE_RATE_LIMIT", "1.5M"), ("BAQUP_SOURCE_FOLLOW_SYMLINKS", "follow")],
)
def test_validate_refuses_what_the_agent_refuses(name: str, value: str, tmp_path: Path) -> None:
    """baqup-run --validate catches, from the schema, what the binary would refuse (64)."""
    env = tool_env()
    env.update(
        BAQUP_JOB_ID=str(uuid.uuid4()),
        BAQUP_STAGING_DIR=str(tmp_path),
        BAQUP_BUS_URL=f"file://{tmp_path / 'bus'}",
        BAQUP_SOURCE_PATH=str(tmp_path),
    )
    ok = run_baqup(["--validate", "--schema", str(SCHEMA)], env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = run_baqup(["--validate", "--schema", str(SCHEMA)], {**env, name: value})
    assert bad.returncode == 64, bad.stdout + bad.stderr
    assert [e["variable"] for e in json.loads(bad.stdout)["errors"]] == [name]


def test_readme_runs_as_written(cargo_target: Path, agent_binary: Path, tmp_path: Path) -> None:
    """The README's shell blocks, run as they are (/tmp moved into the test's tmp dir,
    the build's target dir the session's, so cargo finds it up to date)."""
    text = (AGENT_DIR / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.DOTALL)
    assert len(blocks) == 2
    script = "\n".join(blocks)
    assert "baqup-run --schema examples/rust-agent/agent-schema.json -- " in script
    assert "baqup-run --schema examples/rust-agent/agent-schema.json snapshot" in script
    assert 'baqup verify "$BAQUP_STAGING_DIR/$BAQUP_JOB_ID"' in script
    script = script.replace("/tmp/agent-rust", str(cargo_target)).replace("/tmp/", f"{tmp_path}/")
    env = tool_env()
    env["PATH"] = f"{env['PATH']}:{Path(find_cargo()).parent}"
    result = subprocess.run(
        ["bash", "-euc", script + 'echo "job=$BAQUP_JOB_ID"\n'],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    reports = [json.loads(ln) for ln in result.stdout.splitlines() if ln.startswith('{"job_dir"')]
    assert [r["valid"] for r in reports] == [True]
    (last_job,) = re.findall(r"^job=(\S+)$", result.stdout, re.MULTILINE)
    staging = tmp_path / "staging"
    jobs = sorted(p.name for p in staging.iterdir())
    assert len(jobs) == 2
    assert last_job in jobs
    for name in jobs:
        assert (staging / name / "manifest.json").exists(), name
        assert (staging / name / "source.tar").stat().st_size > 0
