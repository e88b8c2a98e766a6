"""A job's own files (INTERFACE.md section 10): what is committed, and by whom.

Real `baqup-run` jobs whose children attack the commit: a second run with the same job
id, a re-run over a committed or a failed attempt, a child-written `manifest.json` or
`.baqup-status.json`, a work dir or job dir swapped for a symlink, planted symlinks and
hard links (as artifacts and as capture parts), a secret in a file name, metadata 300
levels deep, a non-UTF-8 name, a full disk. Each test asserts the bytes on disk (the
victim outside the job untouched, no manifest), the exit code and the error code the
status names.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import RedisServer, python_child, run_baqup
from tests.jobs import (
    Job,
    job_dir,
    log_records,
    prefix,
    read_hash,
    redis_env,
    restore_env,
    start_job,
    wait_for,
)

VICTIM = b"precious bytes outside the job\n" * 64


@pytest.fixture
def env(job_env: dict[str, str], redis_server: RedisServer, tmp_path: Path) -> dict[str, str]:
    env = redis_env(job_env, redis_server)
    env["VICTIM_DIR"] = str(tmp_path / "victim")
    return env


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A directory outside the job (same filesystem) with a file the child wants to hit."""
    directory = tmp_path / "victim"
    directory.mkdir()
    (directory / "data.bin").write_bytes(VICTIM)
    return directory


def job(
    env: Mapping[str, str], code: str, *options: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return run_baqup(
        [*options, "--", *python_child(textwrap.dedent(code))], dict(env), timeout=timeout
    )


def status_of(client: redis.Redis, env: Mapping[str, str]) -> dict[str, Any]:
    return read_hash(client, f"{prefix(env)}status:{env['BAQUP_JOB_ID']}")


def failed_with(
    result: subprocess.CompletedProcess[str],
    client: redis.Redis,
    env: Mapping[str, str],
    exit_code: int,
    code: str,
) -> dict[str, Any]:
    """The job exited `exit_code`, its status in Redis names `code`; baqup-run itself
    logged no traceback (the child's own stderr is not baqup-run's: a child aborted by
    the refusal may print one, e.g. coverage's exit hook interrupted by the SIGTERM)."""
    assert result.returncode == exit_code, result.stderr[-3000:]
    own = [r for r in log_records(result.stderr) if r.get("component") != "child"]
    assert not [r for r in own if "Traceback" in json.dumps(r)], result.stderr[-3000:]
    assert all(line.startswith("{") for line in result.stderr.splitlines()), result.stderr[-3000:]
    status = status_of(client, env)
    assert status["status"] == "failed", status
    assert status["error"]["code"] == code, status["error"]
    assert status["exit_code"] == exit_code
    assert status["files"] == []
    return status


def tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under `root`: file bytes, a symlink's target, or "dir"."""
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            out[name] = "-> " + os.readlink(path)
        elif path.is_dir():
            out[name] = "dir"
        else:
            out[name] = path.read_bytes()
    return out


def manifest_of(env: Mapping[str, str]) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((job_dir(env) / "manifest.json").read_bytes())
    return document


def baqup_verify(directory: Path) -> int:
    return run_baqup(["verify", str(directory)], {**os.environ}, tool=True).returncode


def assert_victim_untouched(victim: Path) -> None:
    assert sorted(p.name for p in victim.iterdir()) == ["data.bin"]
    assert (victim / "data.bin").read_bytes() == VICTIM
    assert os.stat(victim / "data.bin").st_nlink in (1, 2)


# --- item 3: one run per job dir; earlier attempts set aside ---------------------------------

HELD = """
import os
work = os.environ["BAQUP_WORK_DIR"]
with open(os.path.join(work, "dump.sql"), "wb") as out:
    out.write(b"first half;")
    out.flush()
    with open(os.environ["GO"]) as gate:  # a FIFO: blocks until the test opens it
        gate.read()
    out.write(b"second half;")
"""

INTRUDER = """
import os
open(os.environ["MARKER"], "w").close()
with open(os.path.join(os.environ["BAQUP_WORK_DIR"], "dump.sql"), "wb") as out:
    out.write(b"the intruder's dump")
"""


def test_a_second_run_on_a_held_job_dir_exits_73_and_touches_nothing(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path, jobs: list[Job]
) -> None:
    gate = tmp_path / "go"
    os.mkfifo(gate)
    env.update(GO=str(gate), MARKER=str(tmp_path / "intruder-ran"))
    first = start_job(["--", *python_child(HELD)], env)
    jobs.append(first)
    half = job_dir(env) / ".staging" / "dump.sql"
    wait_for(lambda: half.exists() and half.read_bytes() == b"first half;", 30, what="half")
    before = tree(job_dir(env))

    second = job(env, INTRUDER)
    assert second.returncode == 73, second.stderr[-3000:]
    assert "JOB_DIR_BUSY" in second.stderr
    assert not Path(env["MARKER"]).exists(), "the second run started its child"
    assert tree(job_dir(env)) == before
    assert status_of(redis_client, env) == {}, "the second run reported over the first's job"

    with gate.open("w") as opened:
        opened.write("go")
    assert first.wait(60) == 0, first.stderr()[-3000:]
    assert (job_dir(env) / "dump.sql").read_bytes() == b"first half;second half;"
    assert status_of(redis_client, env)["status"] == "success"
    assert baqup_verify(job_dir(env)) == 0


WRITES_DUMP = """
import os, sys
work = os.environ["BAQUP_WORK_DIR"]
if os.listdir(work):
    print("work dir not empty at start: %s" % os.listdir(work), file=sys.stderr)
    sys.exit(65)
with open(os.path.join(work, "dump.sql"), "wb") as out:
    out.write(os.environ.get("DUMP", "a whole dump").encode())
sys.exit(int(os.environ.get("EXIT", "0")))
"""


def test_a_committed_job_id_is_refused_and_its_status_kept(
    env: dict[str, str], redis_client: redis.Redis
) -> None:
    assert job(env, WRITES_DUMP).returncode == 0
    manifest = (job_dir(env) / "manifest.json").read_bytes()
    status = status_of(redis_client, env)
    again = job({**env, "DUMP": "another dump"}, WRITES_DUMP)
    assert again.returncode == 73, again.stderr[-3000:]
    assert "ALREADY_COMMITTED" in again.stderr
    assert (job_dir(env) / "manifest.json").read_bytes() == manifest
    assert (job_dir(env) / "dump.sql").read_bytes() == b"a whole dump"
    assert status_of(redis_client, env) == status
    assert baqup_verify(job_dir(env)) == 0


def test_a_rerun_sets_the_failed_attempts_leftovers_aside(
    env: dict[str, str], redis_client: redis.Redis
) -> None:
    failed = job({**env, "DUMP": "half a dump", "EXIT": "1"}, WRITES_DUMP)
    assert failed.returncode == 1, failed.stderr[-3000:]
    (job_dir(env) / ".staging" / "sub").mkdir()
    (job_dir(env) / ".staging" / "sub" / "more.part").write_bytes(b"more")
    rerun = job(env, WRITES_DUMP)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [a["filename"] for a in manifest_of(env)["artifacts"]] == ["dump.sql"]
    assert (job_dir(env) / "dump.sql").read_bytes() == b"a whole dump"
    assert tree(job_dir(env) / ".attempts") == {
        "1": "dir",
        "1/dump.sql": b"half a dump",
        "1/sub": "dir",
        "1/sub/more.part": b"more",
    }
    assert status_of(redis_client, env)["status"] == "success"
    assert baqup_verify(job_dir(env)) == 0


def test_a_rerun_sets_aside_the_status_file_an_unreported_attempt_left(
    env: dict[str, str], redis_client: redis.Redis
) -> None:
    down = {
        **env,
        "BAQUP_BUS_URL": "redis://127.0.0.1:1/0",
        "BAQUP_BUS_GRACE_PERIOD": "0",
        "BAQUP_BUS_RECONNECT_MAX_ATTEMPTS": "1",
        "EXIT": "1",
    }
    assert job(down, WRITES_DUMP).returncode == 75
    stale = (job_dir(env) / ".baqup-status.json").read_bytes()
    rerun = job(env, WRITES_DUMP)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not (job_dir(env) / ".baqup-status.json").exists()
    assert (job_dir(env) / ".attempts" / "1.job-dir" / ".baqup-status.json").read_bytes() == stale
    assert (job_dir(env) / ".attempts" / "1" / "dump.sql").read_bytes() == b"a whole dump"
    assert status_of(redis_client, env)["status"] == "success"


# --- items 6 and 11: reserved names -------------------------------------------------------------

DECLARES = """
import json, os
work = os.environ["BAQUP_WORK_DIR"]
name = os.environ["NAME"]
os.makedirs(os.path.dirname(os.path.join(work, name)), exist_ok=True)
with open(os.path.join(work, name), "wb") as out:
    out.write(b'{"forged": true}')
if os.environ.get("DECLARE"):
    with os.fdopen(3, "w") as control:
        control.write(json.dumps({"type": "artifact", "filename": name}) + "\\n")
"""


@pytest.mark.parametrize("declare", ["", "1"])
@pytest.mark.parametrize("name", ["manifest.json", ".baqup-status.json", ".baqup-anything"])
def test_a_reserved_name_at_the_top_of_the_work_dir_is_refused(
    env: dict[str, str], redis_client: redis.Redis, name: str, declare: str
) -> None:
    result = job({**env, "NAME": name, "DECLARE": declare}, DECLARES)
    failed_with(result, redis_client, env, 65, "RESERVED_NAME")
    assert not (job_dir(env) / "manifest.json").exists()
    assert not (job_dir(env) / ".baqup-status.json").exists()
    # refused, not destroyed: the child's file is still where it wrote it
    assert (job_dir(env) / ".staging" / name).read_bytes() == b'{"forged": true}'


def test_a_stdout_artifact_named_manifest_is_refused_before_the_child_runs(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    env.update(BAQUP_ARTIFACT_COMPRESS="false", MARKER=str(tmp_path / "ran"))
    result = job(env, "import os; open(os.environ['MARKER'], 'w'); print('{}')",
                 "--stdout-artifact", "manifest.json")  # fmt: skip
    failed_with(result, redis_client, env, 65, "RESERVED_NAME")
    assert not Path(env["MARKER"]).exists()
    assert not (job_dir(env) / "manifest.json").exists()


NESTED_RESERVED = """
import os
work = os.environ["BAQUP_WORK_DIR"]
os.makedirs(os.path.join(work, "sub", ".attempts"))
for name in ("sub/manifest.json", "sub/.baqup-status.json", "sub/.baqup-x", "sub/.attempts/1"):
    with open(os.path.join(work, name), "w") as out:
        out.write("an ordinary file called " + name)
"""


def test_reserved_names_below_the_top_are_ordinary_files(
    env: dict[str, str], redis_client: redis.Redis
) -> None:
    result = job(env, NESTED_RESERVED)
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(a["filename"] for a in manifest_of(env)["artifacts"])
    assert names == [
        "sub/.attempts/1",
        "sub/.baqup-status.json",
        "sub/.baqup-x",
        "sub/manifest.json",
    ]
    assert (job_dir(env) / "sub" / "manifest.json").read_text().endswith("sub/manifest.json")
    assert baqup_verify(job_dir(env)) == 0


PLANTS_IN_JOB_DIR = """
import os
job = os.environ["BAQUP_JOB_DIR"]
with open(os.path.join(os.environ["BAQUP_WORK_DIR"], "dump.sql"), "w") as out:
    out.write("a dump")
with open(os.path.join(job, os.environ["NAME"]), "w") as out:
    out.write('{"status": "success", "forged": true}')
"""


@pytest.mark.parametrize("name", [".baqup-status.json", "manifest.json"])
def test_a_status_or_manifest_planted_in_the_job_dir_is_refused(
    env: dict[str, str], redis_client: redis.Redis, name: str
) -> None:
    result = job({**env, "NAME": name}, PLANTS_IN_JOB_DIR)
    failed_with(result, redis_client, env, 65, "RESERVED_NAME")
    assert not (job_dir(env) / "dump.sql").exists(), "an artifact was moved"
    if name != "manifest.json":
        assert not (job_dir(env) / "manifest.json").exists()


PLANTS_STATUS_LINK = """
import os
job = os.environ["BAQUP_JOB_DIR"]
with open(os.path.join(os.environ["BAQUP_WORK_DIR"], "dump.sql"), "w") as out:
    out.write("a dump")
target = os.path.join(os.environ["VICTIM_DIR"], "data.bin")
os.symlink(target, os.path.join(job, ".baqup-status.json"))
"""


def test_the_status_file_is_never_written_through_a_planted_symlink(
    job_env: dict[str, str], victim: Path
) -> None:
    env = dict(job_env)
    env.update(
        BAQUP_BUS_URL="redis://127.0.0.1:1/0",  # nothing listens: the status goes to the file
        BAQUP_BUS_GRACE_PERIOD="0",
        BAQUP_BUS_RECONNECT_MAX_ATTEMPTS="1",
        VICTIM_DIR=str(victim),
    )
    result = job(env, PLANTS_STATUS_LINK)
    assert result.returncode == 75, result.stderr[-3000:]
    assert_victim_untouched(victim)
    status_file = job_dir(env) / ".baqup-status.json"
    assert not status_file.is_symlink()
    status = json.loads(status_file.read_bytes())
    assert status["error"]["code"] == "RESERVED_NAME"
    assert status["status"] == "failed"


# --- item 7: a success must name a committed artifact ----------------------------------------

COMPONENTS = """
import json, os
work = os.environ["BAQUP_WORK_DIR"]
with open(os.path.join(work, "users.sql"), "w") as out:
    out.write("users")
with os.fdopen(3, "w") as control:
    for message in (
        {"type": "artifact", "filename": "users.sql"},
        {"type": "component", "name": "users", "status": "success", "artifact": "users.sql"},
        {"type": "component", "name": "orders", "status": "success", "artifact": "orders.sql"},
    ):
        control.write(json.dumps(message) + "\\n")
"""


def test_a_successful_component_without_its_artifact_is_failed(
    env: dict[str, str], redis_client: redis.Redis
) -> None:
    result = job({**env, "BAQUP_AGENT_PARTIAL_FAILURE_MODE": "warn"}, COMPONENTS)
    assert result.returncode == 0, result.stderr[-3000:]
    status = status_of(redis_client, env)
    assert status["status"] == "partial"
    assert status["summary"] == {"total": 2, "succeeded": 1, "failed": 1}
    by_name = {c["name"]: c for c in status["components"]}
    assert by_name["users"]["status"] == "success"
    assert by_name["orders"]["status"] == "failed"
    assert by_name["orders"]["error"]["code"] == "ARTIFACT_MISSING"
    assert [a["filename"] for a in manifest_of(env)["artifacts"]] == ["users.sql"]


# --- item 8: swapped dirs, planted links -------------------------------------------------------

SWAPS_WORK_DIR = """
import os, sys
work, job = os.environ["BAQUP_WORK_DIR"], os.environ["BAQUP_JOB_DIR"]
with open(os.path.join(work, "dump.sql"), "w") as out:
    out.write("a dump")
os.rename(work, os.path.join(job, "moved-away"))
os.symlink(os.environ["VICTIM_DIR"], work)
sys.exit(int(os.environ.get("EXIT", "0")))
"""

SWAPS_JOB_DIR = """
import os
work, job = os.environ["BAQUP_WORK_DIR"], os.environ["BAQUP_JOB_DIR"]
with open(os.path.join(work, "dump.sql"), "w") as out:
    out.write("a dump")
os.rename(job, job + ".moved-away")
os.symlink(os.environ["VICTIM_DIR"], job)
"""


def test_a_work_dir_swapped_for_a_symlink_is_refused(
    env: dict[str, str], redis_client: redis.Redis, victim: Path
) -> None:
    failed_with(job(env, SWAPS_WORK_DIR), redis_client, env, 65, "SECURITY_VIOLATION")
    assert_victim_untouched(victim)
    assert not (job_dir(env) / "manifest.json").exists()
    assert not (job_dir(env) / "data.bin").exists()


def test_a_job_dir_swapped_for_a_symlink_is_refused(
    env: dict[str, str], redis_client: redis.Redis, victim: Path
) -> None:
    failed_with(job(env, SWAPS_JOB_DIR), redis_client, env, 65, "SECURITY_VIOLATION")
    assert_victim_untouched(victim)
    moved = Path(str(job_dir(env)) + ".moved-away")
    assert not (moved / "manifest.json").exists()
    assert (moved / ".staging" / "dump.sql").read_bytes() == b"a dump"


@pytest.mark.parametrize("path", ["empty", "retry"])
def test_a_swapped_work_dir_is_never_emptied_nor_set_aside_through(
    env: dict[str, str], redis_client: redis.Redis, victim: Path, path: str
) -> None:
    """A failed run with RETAIN_ON_FAILURE=false (which empties the work dir) and a retried
    one (which sets it aside) delete or move no file of the directory the symlink names."""
    if path == "empty":
        env.update(EXIT="1", BAQUP_ARTIFACT_RETAIN_ON_FAILURE="false")
    else:
        env.update(EXIT="69", BAQUP_JOB_RETRY_MAX="1", BAQUP_JOB_RETRY_BACKOFF="constant")
    result = job(env, SWAPS_WORK_DIR)
    assert_victim_untouched(victim)
    if path == "empty":
        failed_with(result, redis_client, env, 1, "CHILD_FAILED")
    else:  # the retry refused to set the swapped dir aside
        failed_with(result, redis_client, env, 65, "SECURITY_VIOLATION")
    assert (job_dir(env) / "moved-away" / "dump.sql").read_bytes() == b"a dump"


PLANTS_LINKS = """
import os
work = os.environ["BAQUP_WORK_DIR"]
target = os.path.join(os.environ["VICTIM_DIR"], "data.bin")
kind = os.environ["KIND"]
if kind == "symlink":
    os.symlink(target, os.path.join(work, "dump.sql"))
elif kind == "hardlink":
    os.link(target, os.path.join(work, "dump.sql"))
elif kind == "subdir-symlink":
    os.symlink(os.environ["VICTIM_DIR"], os.path.join(work, "sub"))
elif kind == "nested-hardlink":
    os.makedirs(os.path.join(work, "a", "b"))
    os.link(target, os.path.join(work, "a", "b", "dump.sql"))
"""


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "subdir-symlink", "nested-hardlink"])
def test_a_planted_link_in_the_work_dir_is_refused_and_left_in_place(
    env: dict[str, str], redis_client: redis.Redis, victim: Path, kind: str
) -> None:
    result = job({**env, "KIND": kind}, PLANTS_LINKS)
    status = failed_with(result, redis_client, env, 65, "SECURITY_VIOLATION")
    assert_victim_untouched(victim)
    assert ("hard link" if "hardlink" in kind else "symlink") in status["error"]["message"]
    assert any(r.get("level") == "error" for r in log_records(result.stderr))
    assert sorted(p.name for p in job_dir(env).iterdir()) == [".staging"]


DECLARES_THROUGH_LINK = """
import json, os
work = os.environ["BAQUP_WORK_DIR"]
os.symlink(os.environ["VICTIM_DIR"], os.path.join(work, "sub"))
with os.fdopen(3, "w") as control:
    control.write(json.dumps({"type": "artifact", "filename": "sub/data.bin"}) + "\\n")
"""


def test_a_declared_artifact_behind_a_symlinked_dir_is_refused(
    env: dict[str, str], redis_client: redis.Redis, victim: Path
) -> None:
    failed_with(job(env, DECLARES_THROUGH_LINK), redis_client, env, 65, "SECURITY_VIOLATION")
    assert_victim_untouched(victim)
    assert not (job_dir(env) / "sub").exists()


PLANTS_JOB_SUBDIR = """
import os
work, job = os.environ["BAQUP_WORK_DIR"], os.environ["BAQUP_JOB_DIR"]
os.makedirs(os.path.join(work, "sub"))
with open(os.path.join(work, "sub", "dump.sql"), "w") as out:
    out.write("a dump")
os.symlink(os.environ["VICTIM_DIR"], os.path.join(job, "sub"))
"""


def test_a_symlink_planted_where_the_commit_moves_to_is_never_followed(
    env: dict[str, str], redis_client: redis.Redis, victim: Path
) -> None:
    failed_with(job(env, PLANTS_JOB_SUBDIR), redis_client, env, 65, "SECURITY_VIOLATION")
    assert_victim_untouched(victim)
    assert not (job_dir(env) / "manifest.json").exists()


# --- item 9: capture parts are always new files -----------------------------------------------

PLANTS_PART = """
import os, sys
work = os.environ["BAQUP_WORK_DIR"]
os.link(os.path.join(os.environ["VICTIM_DIR"], "data.bin"), os.path.join(work, os.environ["PART"]))
sys.stdout.buffer.write(b"x" * 4096)
"""


@pytest.mark.parametrize("part", ["out.bin.002", "out.bin.001"])
def test_a_hard_link_planted_as_a_split_part_is_never_written_through(
    env: dict[str, str], redis_client: redis.Redis, victim: Path, part: str
) -> None:
    env.update(BAQUP_ARTIFACT_SPLIT_SIZE="1K", BAQUP_ARTIFACT_COMPRESS="false", PART=part)
    result = job(env, PLANTS_PART, "--stdout-artifact", "out.bin")
    failed_with(result, redis_client, env, 65, "SECURITY_VIOLATION")
    assert_victim_untouched(victim)
    assert not (job_dir(env) / "manifest.json").exists()


REPLACES_CAPTURE = """
import os, sys
path = os.path.join(os.environ["BAQUP_WORK_DIR"], "out.bin")
os.unlink(path)  # baqup-run made it before the child started; swap in a forgery
with open(path, "wb") as out:
    out.write(b"F" * 4096)
sys.stdout.buffer.write(b"x" * 4096)
"""


def test_a_captured_artifact_replaced_by_the_child_is_refused(
    env: dict[str, str], redis_client: redis.Redis
) -> None:
    env["BAQUP_ARTIFACT_COMPRESS"] = "false"
    result = job(env, REPLACES_CAPTURE, "--stdout-artifact", "out.bin")
    status = failed_with(result, redis_client, env, 65, "SECURITY_VIOLATION")
    assert "replaced after it was written" in status["error"]["message"]
    assert not (job_dir(env) / "manifest.json").exists()
    assert not (job_dir(env) / "out.bin").exists()


PLANTS_AND_FAILS = """
import os, sys
work = os.environ["BAQUP_WORK_DIR"]
os.makedirs(os.path.join(work, "sub"))
os.symlink(os.environ["VICTIM_DIR"], os.path.join(work, "to-dir"))
os.symlink(os.path.join(os.environ["VICTIM_DIR"], "data.bin"), os.path.join(work, "sub", "to-file"))
with open(os.path.join(work, "sub", "partial.bin"), "w") as out:
    out.write("half")
sys.exit(1)
"""


def test_retain_on_failure_false_removes_planted_links_not_their_targets(
    env: dict[str, str], redis_client: redis.Redis, victim: Path
) -> None:
    env["BAQUP_ARTIFACT_RETAIN_ON_FAILURE"] = "false"
    failed_with(job(env, PLANTS_AND_FAILS), redis_client, env, 1, "CHILD_FAILED")
    assert_victim_untouched(victim)
    assert list((job_dir(env) / ".staging").iterdir()) == []


# --- item 15: a secret in a file name --------------------------------------------------------

SECRET = "tok-Zq81-very-secret"

SECRET_NAME = """
import json, os
work = os.environ["BAQUP_WORK_DIR"]
name = "dump-" + os.environ["BAQUP_SECRET_TOKEN"] + ".sql"
with open(os.path.join(work, name), "w") as out:
    out.write("a dump")
if os.environ.get("DECLARE"):
    with os.fdopen(3, "w") as control:
        control.write(json.dumps({"type": "artifact", "filename": name}) + "\\n")
"""


@pytest.mark.parametrize("declare", ["", "1"])
def test_an_artifact_named_with_a_secret_is_refused_without_naming_it(
    env: dict[str, str], redis_client: redis.Redis, declare: str
) -> None:
    env.update(BAQUP_SECRET_TOKEN=SECRET, DECLARE=declare)
    status = failed_with(job(env, SECRET_NAME), redis_client, env, 65, "SECURITY_VIOLATION")
    assert "secret" in status["error"]["message"]
    assert "[REDACTED]" not in status["error"]["message"]
    assert not (job_dir(env) / "manifest.json").exists()
    assert sorted(p.name for p in job_dir(env).iterdir()) == [".staging"]


# --- item 20: valid but unusual input ---------------------------------------------------------

METADATA = """
import json, os, sys
depth = int(os.environ["DEPTH"])
with open(os.path.join(os.environ["BAQUP_WORK_DIR"], "dump.sql"), "w") as out:
    out.write("a dump")
nested = {"leaf": 1}
for _ in range(depth - 1):
    nested = {"n": nested}
line = '{"type": "metadata", "source_metadata": {"deep": %s, "huge": %s}}' % (
    json.dumps(nested), "1" + "0" * 30)
with os.fdopen(3, "w") as control:
    control.write(line + "\\n")
"""


def test_metadata_300_deep_with_huge_numbers_is_committed(
    env: dict[str, str], redis_client: redis.Redis
) -> None:
    result = job({**env, "DEPTH": "300"}, METADATA)
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = manifest_of(env)["source_metadata"]
    depth, node = 1, metadata["deep"]
    while "n" in node:
        node, depth = node["n"], depth + 1
    assert (depth, node) == (300, {"leaf": 1})
    assert float(metadata["huge"]) == 1e30
    assert baqup_verify(job_dir(env)) == 0


SDK_METADATA = """
import os
from baqup_supervisor.agent import run

def body(agent):
    with open(agent.artifact_path("dump.sql"), "w") as out:
        out.write("a dump")
    nested = {"leaf": 1}
    for _ in range(299):
        nested = {"n": nested}
    agent.metadata(deep=nested, huge=10**30, negative=-(10**40), name="caf\\udce9")

raise SystemExit(run(body, handle_signals=False))
"""


def test_sdk_metadata_with_integers_beyond_64_bits_is_committed_exactly(
    env: dict[str, str], redis_client: redis.Redis
) -> None:
    result = subprocess.run(
        python_child(textwrap.dedent(SDK_METADATA)), env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    raw = (job_dir(env) / "manifest.json").read_bytes()
    assert b'"huge": 1000000000000000000000000000000' in raw
    metadata = manifest_of(env)["source_metadata"]
    assert metadata["huge"] == 10**30
    assert metadata["negative"] == -(10**40)
    assert baqup_verify(job_dir(env)) == 0


def test_metadata_nested_beyond_the_limit_is_a_clear_data_error(
    env: dict[str, str], redis_client: redis.Redis
) -> None:
    result = job({**env, "DEPTH": "600"}, METADATA)
    status = failed_with(result, redis_client, env, 65, "METADATA_TOO_DEEP")
    assert "600" in status["error"]["message"] or "levels" in status["error"]["message"]
    assert not (job_dir(env) / "manifest.json").exists()


NON_UTF8 = """
import os
work = os.fsencode(os.environ["BAQUP_WORK_DIR"])
with open(os.path.join(work, b"caf\\xe9.sql"), "wb") as out:
    out.write(b"a dump")
"""


def test_a_non_utf8_artifact_name_is_a_clear_data_error(
    env: dict[str, str], redis_client: redis.Redis
) -> None:
    status = failed_with(job(env, NON_UTF8), redis_client, env, 65, "INVALID_ARTIFACT_NAME")
    assert "UTF-8" in status["error"]["message"]
    assert not (job_dir(env) / "manifest.json").exists()


# --- a full disk under the staging dir --------------------------------------------------------


@pytest.fixture
def tiny_staging(job_env: dict[str, str]) -> Iterator[Path]:
    """The job's staging dir on a real 1 MiB tmpfs."""
    staging = Path(job_env["BAQUP_STAGING_DIR"])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(staging)], check=True)
    try:
        yield staging
    finally:
        subprocess.run(["umount", "-l", str(staging)], check=True)


FILLS_DISK = """
import os
path = os.path.join(os.environ["BAQUP_WORK_DIR"], "fill.bin")
with open(path, "wb", buffering=0) as out:
    try:
        while True:
            out.write(b"x" * 4096)
    except OSError:
        pass
"""


def test_a_full_disk_at_the_commit_is_exit_74(
    env: dict[str, str], redis_client: redis.Redis, tiny_staging: Path
) -> None:
    failed_with(job(env, FILLS_DISK), redis_client, env, 74, "DISK_FULL")
    assert not (job_dir(env) / "manifest.json").exists()


def test_a_full_disk_while_capturing_is_exit_74(
    env: dict[str, str], redis_client: redis.Redis, tiny_staging: Path
) -> None:
    env["BAQUP_ARTIFACT_COMPRESS"] = "false"
    code = "import sys; sys.stdout.buffer.write(b'y' * (3 << 20))"
    result = job(env, code, "--stdout-artifact", "big.bin")
    failed_with(result, redis_client, env, 74, "DISK_FULL")
    assert not (job_dir(env) / "manifest.json").exists()


def test_a_restore_reads_a_committed_job_dir_and_commits_nothing_undeclared(
    env: dict[str, str], redis_client: redis.Redis
) -> None:
    assert job(env, WRITES_DUMP).returncode == 0
    manifest = (job_dir(env) / "manifest.json").read_bytes()
    code = "import os; open(os.path.join(os.environ['BAQUP_WORK_DIR'], 'scratch'), 'w').write('x')"
    own = restore_env(env)
    restored = job(own, code, "--role", "restore")
    assert restored.returncode == 0, restored.stderr[-3000:]
    assert (job_dir(env) / "manifest.json").read_bytes() == manifest
    assert not (job_dir(own) / "scratch").exists()
    assert not (job_dir(own) / "manifest.json").exists()
    status = status_of(redis_client, own)
    assert (status["role"], status["status"], status["files"]) == ("restore", "success", [])


WIDE_TREE = """
import os
work = os.environ["BAQUP_WORK_DIR"]
for i in range(600):
    os.makedirs(os.path.join(work, "d%03d" % i))
    with open(os.path.join(work, "d%03d" % i, "f"), "w") as out:
        out.write(str(i))
"""


def test_a_wide_tree_commits_under_a_low_descriptor_limit(
    env: dict[str, str], redis_client: redis.Redis
) -> None:
    """The walk holds descriptors per depth, never per directory still to visit."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    result = subprocess.run(
        [sys.executable, "-m", "baqup_supervisor", "--", *python_child(WIDE_TREE)],
        env=env, capture_output=True, text=True, timeout=90, check=False, preexec_fn=limit,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(manifest_of(env)["artifacts"]) == 600
    assert (job_dir(env) / "d599" / "f").read_text() == "599"
