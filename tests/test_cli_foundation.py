"""The command line, run for real: --version, --help, --validate, --info, usage errors, labels.

Every test runs `baqup-run` (or `baqup`) as a subprocess with the `job_env`
environment; none needs a bus.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

from baqup_supervisor import __version__
from tests.conftest import run_baqup

SECRET = "Sup3r-S3cret-Value!"
SECRET_BUS_URL = f"redis://user:{quote(SECRET, safe='')}@127.0.0.1:1/0"

AGENT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "BAQUP_SOURCE_PATH": {"type": "string", "format": "path"},
        "BAQUP_PG_DATABASE": {"type": "string", "default": "postgres"},
    },
    "x-baqup-agent": {
        "agent": "agent-pg",
        "version": "1.2.0",
        "roles": ["snapshot", "restore"],
        "commands": {
            "snapshot": {"argv": ["pg_dump", "-Fc"], "stdout_artifact": "db.dump"},
            "restore": ["pg_restore", "-d", "postgres"],
        },
        "capabilities": {"incremental": True, "formats": ["custom", "plain"]},
        "requirements": {"min_memory": "64M", "recommended_memory": "256M"},
        "build": {"commit": "a7f3b9c", "date": "2024-01-10T14:30:00Z"},
    },
}


def write_schema(directory: Path, schema: dict[str, Any]) -> str:
    path = directory / "agent-schema.json"
    path.write_text(json.dumps(schema, indent=2), encoding="utf-8")
    return str(path)


def stderr_records(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """Every stderr line, each of which must be one JSON log record."""
    out = []
    for line in result.stderr.splitlines():
        record = json.loads(line)
        assert isinstance(record, dict), line
        out.append(record)
    return out


def secret_forms(value: str) -> list[str]:
    raw = value.encode()
    return [
        value,
        quote(value, safe=""),
        quote_plus(value),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
        json.dumps(value)[1:-1],
        raw.hex(),
    ]


def assert_no_secret(result: subprocess.CompletedProcess[str]) -> None:
    for form in secret_forms(SECRET):
        assert form not in result.stdout, form
        assert form not in result.stderr, form


# --- version and help -----------------------------------------------------------------


def test_version(job_env: dict[str, str]) -> None:
    result = run_baqup(["--version"], job_env)
    assert result.returncode == 0
    assert re.fullmatch(r"baqup-run \d+\.\d+\.\d+\S*\n", result.stdout)
    assert result.stdout == f"baqup-run {__version__}\n"


def test_tool_version(job_env: dict[str, str]) -> None:
    result = run_baqup(["--version"], job_env, tool=True)
    assert result.returncode == 0
    assert result.stdout == f"baqup {__version__}\n"


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(job_env: dict[str, str], flag: str) -> None:
    result = run_baqup([flag], job_env)
    assert result.returncode == 0
    for option in ("--validate", "--info", "--schema", "--role", "--version"):
        assert option in result.stdout


# --- --validate ------------------------------------------------------------------------


def test_validate_valid(job_env: dict[str, str], tmp_path: Path) -> None:
    result = run_baqup(["--validate"], job_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"valid": True, "errors": []}
    assert stderr_records(result) == []


def _bad(job_env: dict[str, str], **changes: str | None) -> dict[str, str]:
    env = dict(job_env)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


BAD_INPUTS: list[tuple[str, dict[str, str | None], str]] = [
    ("missing-job-id", {"BAQUP_JOB_ID": None}, "BAQUP_JOB_ID"),
    ("job-id-not-uuid", {"BAQUP_JOB_ID": "job-42"}, "BAQUP_JOB_ID"),
    ("heartbeat-ten", {"BAQUP_AGENT_HEARTBEAT_INTERVAL": "ten"}, "BAQUP_AGENT_HEARTBEAT_INTERVAL"),
    ("compress-yes", {"BAQUP_ARTIFACT_COMPRESS": "yes"}, "BAQUP_ARTIFACT_COMPRESS"),
    ("enum", {"BAQUP_SOURCE_FOLLOW_SYMLINKS": "always"}, "BAQUP_SOURCE_FOLLOW_SYMLINKS"),
    ("malformed-json", {"BAQUP_SOURCE_EXCLUDE": '["a", "b"'}, "BAQUP_SOURCE_EXCLUDE"),
]


@pytest.mark.parametrize(
    ("case", "changes", "variable"), BAD_INPUTS, ids=[case for case, _, _ in BAD_INPUTS]
)
def test_validate_bad_input(
    job_env: dict[str, str],
    tmp_path: Path,
    case: str,
    changes: dict[str, str | None],
    variable: str,
) -> None:
    result = run_baqup(["--validate"], _bad(job_env, **changes), cwd=tmp_path)
    assert result.returncode == 64, (case, result.stdout, result.stderr)
    document = json.loads(result.stdout)
    assert document["valid"] is False
    assert len(document["errors"]) == 1
    error = document["errors"][0]
    assert set(error) == {"variable", "message", "keyword"}
    assert error["variable"] == variable
    assert error["message"]
    errors_logged = [r for r in stderr_records(result) if r["level"] == "error"]
    assert len(errors_logged) == 1
    assert variable in errors_logged[0]["message"]
    assert errors_logged[0]["context"]["variable"] == variable


def test_validate_lists_every_problem_at_once(job_env: dict[str, str], tmp_path: Path) -> None:
    changes: dict[str, str | None] = {}
    for _, each, _ in BAD_INPUTS[1:]:
        changes.update(each)
    result = run_baqup(["--validate"], _bad(job_env, **changes), cwd=tmp_path)
    assert result.returncode == 64
    document = json.loads(result.stdout)
    expected = {variable for _, _, variable in BAD_INPUTS[1:]}
    assert {e["variable"] for e in document["errors"]} == expected
    assert len(document["errors"]) == len(expected)
    logged = [r for r in stderr_records(result) if r["level"] == "error"]
    assert {r["context"]["variable"] for r in logged} == expected
    assert len(logged) == len(expected)


def test_validate_unknown_variable_is_a_warning(job_env: dict[str, str], tmp_path: Path) -> None:
    result = run_baqup(["--validate"], {**job_env, "BAQUP_JOB_TIMOUT": "60"}, cwd=tmp_path)
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"valid": True, "errors": []}
    (warning,) = stderr_records(result)
    assert warning["level"] == "warn"
    assert "BAQUP_JOB_TIMEOUT" in warning["message"]


def test_validate_with_agent_schema(job_env: dict[str, str], tmp_path: Path) -> None:
    schema = write_schema(tmp_path, {**AGENT_SCHEMA, "required": ["BAQUP_SOURCE_PATH"]})
    result = run_baqup(["--validate", "--schema", schema], job_env, cwd=tmp_path)
    assert result.returncode == 64
    (error,) = json.loads(result.stdout)["errors"]
    assert error["variable"] == "BAQUP_SOURCE_PATH"
    env = {**job_env, "BAQUP_SOURCE_PATH": "/data", "BAQUP_AGENT_SCHEMA": schema}
    result = run_baqup(["--validate"], env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    assert json.loads(result.stdout)["valid"] is True


def test_validate_missing_schema(job_env: dict[str, str], tmp_path: Path) -> None:
    result = run_baqup(["--validate", "--schema", str(tmp_path / "nope.json")], job_env)
    assert result.returncode == 64
    (error,) = json.loads(result.stdout)["errors"]
    assert error["variable"] == "BAQUP_AGENT_SCHEMA"
    assert error["keyword"] == "schema"


# --- secrets never shown ---------------------------------------------------------------------


@pytest.fixture
def secret_env(job_env: dict[str, str]) -> dict[str, str]:
    return {**job_env, "BAQUP_SECRET_DB_PASSWORD": SECRET, "BAQUP_BUS_URL": SECRET_BUS_URL}


def test_secret_forms_are_distinct() -> None:
    forms = secret_forms(SECRET)
    assert "Sup3r-S3cret-Value%21" in forms
    assert len(set(forms)) >= 4


def test_no_secret_in_validate_valid(secret_env: dict[str, str], tmp_path: Path) -> None:
    result = run_baqup(["--validate"], secret_env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    assert json.loads(result.stdout) == {"valid": True, "errors": []}
    assert_no_secret(result)


def test_no_secret_in_validate_when_the_secret_fails_a_pattern(
    secret_env: dict[str, str], tmp_path: Path
) -> None:
    schema = write_schema(
        tmp_path,
        {
            "properties": {
                "BAQUP_SECRET_DB_PASSWORD": {
                    "type": "string",
                    "pattern": "^[a-z]+$",
                    "minLength": 40,
                },
                "BAQUP_SECRET_API_PIN": {"type": "integer"},
            }
        },
    )
    env = {
        **secret_env,
        "BAQUP_SECRET_API_PIN": SECRET,
        "BAQUP_AGENT_HEARTBEAT_INTERVAL": "ten",
        "BAQUP_JOB_ID": "not-a-uuid",
    }
    result = run_baqup(["--validate", "--schema", schema], env, cwd=tmp_path)
    assert result.returncode == 64
    errors = json.loads(result.stdout)["errors"]
    assert {(e["variable"], e["keyword"]) for e in errors} >= {
        ("BAQUP_SECRET_DB_PASSWORD", "pattern"),
        ("BAQUP_SECRET_DB_PASSWORD", "minLength"),
        ("BAQUP_SECRET_API_PIN", "type"),
        ("BAQUP_AGENT_HEARTBEAT_INTERVAL", "type"),
        ("BAQUP_JOB_ID", "format"),
    }
    assert len(stderr_records(result)) == len(errors)
    assert_no_secret(result)


def test_no_secret_in_validate_when_an_ordinary_variable_holds_it(
    secret_env: dict[str, str], tmp_path: Path
) -> None:
    # The same string pasted into non-secret variables: a format check and a type check.
    env = {**secret_env, "BAQUP_SOURCE_HOST": SECRET, "BAQUP_JOB_TIMEOUT": SECRET}
    result = run_baqup(["--validate"], env, cwd=tmp_path)
    assert result.returncode == 64
    errors = json.loads(result.stdout)["errors"]
    assert {e["variable"] for e in errors} == {"BAQUP_SOURCE_HOST", "BAQUP_JOB_TIMEOUT"}
    assert_no_secret(result)


def test_no_secret_in_validate_with_a_bad_bus_url(job_env: dict[str, str], tmp_path: Path) -> None:
    env = {
        **job_env,
        "BAQUP_SECRET_DB_PASSWORD": SECRET,
        "BAQUP_BUS_URL": f"redis://user:{quote(SECRET, safe='')}@127.0.0.1:port/0",
    }
    result = run_baqup(["--validate"], env, cwd=tmp_path)
    assert result.returncode == 64
    (error,) = json.loads(result.stdout)["errors"]
    assert error["variable"] == "BAQUP_BUS_URL"
    assert_no_secret(result)


def test_no_secret_in_info(secret_env: dict[str, str], tmp_path: Path) -> None:
    schema = write_schema(tmp_path, AGENT_SCHEMA)
    result = run_baqup(["--info", "--schema", schema], secret_env, cwd=tmp_path)
    assert result.returncode == 0
    assert json.loads(result.stdout)["agent"] == "agent-pg"
    assert_no_secret(result)


def test_no_secret_in_labels(secret_env: dict[str, str], tmp_path: Path) -> None:
    schema = write_schema(tmp_path, AGENT_SCHEMA)
    for fmt in ("lines", "docker", "json"):
        result = run_baqup(["labels", "--schema", schema, "--format", fmt], secret_env, tool=True)
        assert result.returncode == 0, result.stderr
        assert "io.baqup.schema" in result.stdout
        assert_no_secret(result)


def test_no_secret_in_usage_errors(secret_env: dict[str, str], tmp_path: Path) -> None:
    result = run_baqup(["--bogus"], secret_env, cwd=tmp_path)
    assert result.returncode == 64
    assert_no_secret(result)
    result = run_baqup(["--info", "--schema", str(tmp_path / "x.json")], secret_env)
    assert result.returncode == 64
    assert_no_secret(result)


# --- --info ---------------------------------------------------------------------------------


def test_info_with_agent_schema(job_env: dict[str, str], tmp_path: Path) -> None:
    schema = write_schema(tmp_path, AGENT_SCHEMA)
    result = run_baqup(["--info", "--schema", schema], job_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["agent"] == "agent-pg"
    assert info["version"] == "1.2.0"
    assert info["roles"] == ["snapshot", "restore"]
    assert info["requirements"] == {"min_memory": "64M", "recommended_memory": "256M"}
    assert info["build"] == {"commit": "a7f3b9c", "date": "2024-01-10T14:30:00Z"}
    capabilities = info["capabilities"]
    # The agent's own capabilities...
    assert capabilities["incremental"] is True
    assert capabilities["formats"] == ["custom", "plain"]
    # ...merged with what baqup-run supports.
    assert {"sha256", "sha512", "blake3"} <= set(capabilities["checksums"])
    assert {"zstd", "gzip"} <= set(capabilities["compression"])


def test_info_schema_from_environment(job_env: dict[str, str], tmp_path: Path) -> None:
    schema = write_schema(tmp_path, AGENT_SCHEMA)
    result = run_baqup(["--info"], {**job_env, "BAQUP_AGENT_SCHEMA": schema}, cwd=tmp_path)
    assert result.returncode == 0
    assert json.loads(result.stdout)["agent"] == "agent-pg"


def test_info_without_schema(job_env: dict[str, str], tmp_path: Path) -> None:
    result = run_baqup(["--info"], job_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["roles"] == ["snapshot"]
    assert "sha256" in info["capabilities"]["checksums"]


def test_info_missing_explicit_schema(job_env: dict[str, str], tmp_path: Path) -> None:
    result = run_baqup(["--info", "--schema", str(tmp_path / "nope.json")], job_env)
    assert result.returncode == 64
    assert result.stdout == ""
    records = stderr_records(result)
    assert len(records) == 1
    assert "BAQUP_AGENT_SCHEMA" in records[0]["message"]
    assert "not found" in records[0]["message"]


def test_info_invalid_schema(job_env: dict[str, str], tmp_path: Path) -> None:
    schema = write_schema(tmp_path, {"x-baqup-agent": {"roles": ["backup"]}})
    result = run_baqup(["--info", "--schema", schema], job_env)
    assert result.returncode == 64
    assert result.stdout == ""


# --- usage errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["--bogus"], ["--role", "backup", "--validate"], ["--grace", "soon", "--validate"], ["--"]],
)
def test_usage_errors_exit_64(job_env: dict[str, str], args: list[str]) -> None:
    result = run_baqup(args, job_env)
    assert result.returncode == 64, (result.stdout, result.stderr)
    assert result.stdout == ""
    records = stderr_records(result)
    assert len(records) == 1
    assert records[0]["level"] == "error"


def test_unknown_option_named_in_the_error(job_env: dict[str, str]) -> None:
    result = run_baqup(["--bogus"], job_env)
    assert result.returncode == 64
    assert "--bogus" in result.stderr


def test_tool_usage_error_exits_64(job_env: dict[str, str]) -> None:
    assert run_baqup(["--bogus"], job_env, tool=True).returncode == 64
    assert run_baqup(["labels", "--format", "yaml"], job_env, tool=True).returncode == 64
    assert run_baqup(["no-such-command"], job_env, tool=True).returncode == 64


# --- baqup labels -------------------------------------------------------------------------------


def test_labels_lines(job_env: dict[str, str], tmp_path: Path) -> None:
    schema = write_schema(tmp_path, AGENT_SCHEMA)
    result = run_baqup(["labels", "--schema", schema], job_env, tool=True)
    assert result.returncode == 0, result.stderr
    found = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert found["io.baqup.agent"] == "true"
    assert found["io.baqup.type"] == "pg"
    assert found["io.baqup.version"] == "1.2.0"
    assert found["io.baqup.roles"] == "snapshot,restore"
    compact = found["io.baqup.schema"]
    assert json.loads(compact) == AGENT_SCHEMA
    assert "\n" not in compact
    assert ": " not in compact
    assert ", " not in compact
    assert set(found) == {
        "io.baqup.agent",
        "io.baqup.type",
        "io.baqup.version",
        "io.baqup.roles",
        "io.baqup.schema",
    }


def test_labels_docker(job_env: dict[str, str], tmp_path: Path) -> None:
    schema = write_schema(tmp_path, AGENT_SCHEMA)
    result = run_baqup(["labels", "--schema", schema, "--format", "docker"], job_env, tool=True)
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout)
    assert len(words) == 10
    assert words[0::2] == ["--label"] * 5
    found = dict(word.split("=", 1) for word in words[1::2])
    assert found["io.baqup.agent"] == "true"
    assert found["io.baqup.roles"] == "snapshot,restore"
    assert json.loads(found["io.baqup.schema"]) == AGENT_SCHEMA


def test_labels_json(job_env: dict[str, str], tmp_path: Path) -> None:
    schema = write_schema(tmp_path, AGENT_SCHEMA)
    result = run_baqup(["labels", "--schema", schema, "--format", "json"], job_env, tool=True)
    assert result.returncode == 0
    found = json.loads(result.stdout)
    assert json.loads(found["io.baqup.schema"]) == AGENT_SCHEMA


def test_labels_without_schema(job_env: dict[str, str], tmp_path: Path) -> None:
    result = run_baqup(["labels"], job_env, tool=True, cwd=tmp_path)
    assert result.returncode == 64
    assert result.stdout == ""


def test_labels_missing_schema(job_env: dict[str, str], tmp_path: Path) -> None:
    result = run_baqup(["labels", "--schema", str(tmp_path / "nope.json")], job_env, tool=True)
    assert result.returncode == 64


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_neither_redis_nor_jsonschema(
    job_env: dict[str, str], flag: str
) -> None:
    code = (
        "import sys\n"
        f"sys.argv = ['baqup-run', '{flag}']\n"
        "from baqup_supervisor.cli import run\n"
        "code = run()\n"
        "heavy = sorted(m for m in ('redis', 'jsonschema', 'psutil', 'zstandard', 'blake3')\n"
        "               if m in sys.modules)\n"
        "print('HEAVY', heavy, 'EXIT', code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=job_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "HEAVY [] EXIT 0" in result.stdout, result.stdout + result.stderr
