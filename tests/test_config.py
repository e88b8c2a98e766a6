"""Configuration: the environment coerced and validated against the contract and agent schemas.

Every test passes a plain dict as the environment (never os.environ) and, where an
agent schema is involved, writes it under tmp_path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from baqup_supervisor import Secret
from baqup_supervisor.config import Config, Problem, load_config
from baqup_supervisor.errors import ConfigError

JOB_ID = "123e4567-e89b-12d3-a456-426614174000"
SECRET_VALUE = "Sup3r-S3cret-Value!"


def minimal() -> dict[str, str]:
    return {
        "BAQUP_JOB_ID": JOB_ID,
        "BAQUP_STAGING_DIR": "/var/lib/baqup/staging",
        "BAQUP_BUS_URL": "redis://127.0.0.1:6379/0",
    }


def env_with(**extra: str) -> dict[str, str]:
    return {**minimal(), **extra}


def write_schema(directory: Path, schema: dict[str, Any], name: str = "agent-schema.json") -> str:
    path = directory / name
    path.write_text(json.dumps(schema), encoding="utf-8")
    return str(path)


def only_problem(config: Config) -> Problem:
    assert len(config.problems) == 1, config.problems
    return config.problems[0]


def problem_text(config: Config) -> str:
    """Everything the problems and warnings show, in every rendering."""
    parts = []
    for item in (*config.problems, *config.warnings):
        parts += [str(item), repr(item), json.dumps(item.as_dict())]
    return "\n".join(parts)


def all_text(config: Config) -> str:
    """problem_text plus the config's repr and values (secrets are Secret there)."""
    return "\n".join([problem_text(config), repr(config), str(config.values)])


# --- the contract's own variables ---------------------------------------------------------


def test_minimal_environment_is_valid_with_typed_defaults() -> None:
    config = load_config(minimal())
    assert config.valid
    assert config.problems == ()
    assert config.warnings == ()
    values = config.values
    assert values["BAQUP_JOB_ID"] == JOB_ID
    assert values["BAQUP_STAGING_DIR"] == "/var/lib/baqup/staging"
    assert values["BAQUP_BUS_URL"] == "redis://127.0.0.1:6379/0"
    expected: dict[str, Any] = {
        "BAQUP_JOB_TIMEOUT": 3600,
        "BAQUP_JOB_RETRY_MAX": 3,
        "BAQUP_JOB_RETRY_BACKOFF": "exponential",
        "BAQUP_AGENT_HEARTBEAT_INTERVAL": 10,
        "BAQUP_AGENT_LOG_LEVEL": "info",
        "BAQUP_AGENT_LOG_FORMAT": "json",
        "BAQUP_AGENT_LOG_SANITIZE": "moderate",
        "BAQUP_AGENT_PARTIAL_FAILURE_MODE": "fail",
        "BAQUP_AGENT_MEMORY_LIMIT": "auto",
        "BAQUP_AGENT_PARALLELISM": 0,
        "BAQUP_ARTIFACT_COMPRESS": True,
        "BAQUP_ARTIFACT_COMPRESS_ALGORITHM": "zstd",
        "BAQUP_ARTIFACT_COMPRESS_LEVEL": 3,
        "BAQUP_ARTIFACT_CHECKSUM_ALGORITHM": "sha256",
        "BAQUP_ARTIFACT_ENCRYPT": False,
        "BAQUP_ARTIFACT_ENCRYPT_ALGORITHM": "aes-256-gcm",
        "BAQUP_ARTIFACT_RETAIN_ON_FAILURE": True,
        "BAQUP_ARTIFACT_CLEANUP_DELAY": 3600,
        "BAQUP_BUS_KEY_PREFIX": "baqup:",
        "BAQUP_BUS_FALLBACK_DIR": "/tmp/baqup-buffer",
        "BAQUP_BUS_RECONNECT_MAX_ATTEMPTS": 10,
        "BAQUP_BUS_RECONNECT_BACKOFF": "exponential",
        "BAQUP_SOURCE_FOLLOW_SYMLINKS": "shallow",
        "BAQUP_SOURCE_MAX_FILES": 0,
        "BAQUP_SOURCE_MAX_DEPTH": 0,
    }
    for name, value in expected.items():
        assert values[name] == value, name
        assert type(values[name]) is type(value), name
    assert config.get("BAQUP_JOB_TIMEOUT") == 3600
    assert config.get("BAQUP_NOT_A_THING", "fallback") == "fallback"
    # Variables without a default and not set are absent, not None.
    assert "BAQUP_SOURCE_PATH" not in values
    assert "BAQUP_JOB_TRACE_PARENT" not in values


def test_given_values_are_coerced() -> None:
    config = load_config(
        env_with(
            BAQUP_JOB_TIMEOUT="120",
            BAQUP_ARTIFACT_COMPRESS="FALSE",
            BAQUP_ARTIFACT_COMPRESS_LEVEL="-5",
            BAQUP_SOURCE_EXCLUDE="*.log,*.tmp,node_modules",
            BAQUP_SOURCE_PORT=" 5432 ",
        )
    )
    assert config.valid, config.problems
    assert config.values["BAQUP_JOB_TIMEOUT"] == 120
    assert config.values["BAQUP_ARTIFACT_COMPRESS"] is False
    assert config.values["BAQUP_ARTIFACT_COMPRESS_LEVEL"] == -5
    assert config.values["BAQUP_SOURCE_EXCLUDE"] == ["*.log", "*.tmp", "node_modules"]
    assert config.values["BAQUP_SOURCE_PORT"] == 5432


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BAQUP_SOURCE_EXCLUDE", "file1|file,with,commas|file2"),
        ("BAQUP_SOURCE_EXCLUDE", '["file|with|pipes", "file,with,commas"]'),
    ],
)
def test_multi_value_examples_in_config(name: str, value: str) -> None:
    config = load_config(env_with(**{name: value}))
    assert config.valid
    assert "file,with,commas" in config.values[name]


def test_missing_job_id() -> None:
    env = minimal()
    del env["BAQUP_JOB_ID"]
    problem = only_problem(load_config(env))
    assert problem.variable == "BAQUP_JOB_ID"
    assert problem.keyword == "required"
    assert "required" in problem.message


@pytest.mark.parametrize("job_id", ["not-a-uuid", "1234", "123e4567e89b12d3a456426614174000", ""])
def test_job_id_not_a_uuid(job_id: str) -> None:
    problem = only_problem(load_config(env_with(BAQUP_JOB_ID=job_id)))
    assert problem.variable == "BAQUP_JOB_ID"
    assert problem.keyword == "format"
    assert "UUID" in problem.message


def test_heartbeat_interval_not_an_integer() -> None:
    problem = only_problem(load_config(env_with(BAQUP_AGENT_HEARTBEAT_INTERVAL="ten")))
    assert problem.variable == "BAQUP_AGENT_HEARTBEAT_INTERVAL"
    assert "integer" in problem.message
    assert "'ten'" in problem.message


@pytest.mark.parametrize(("value", "keyword"), [("0", "minimum"), ("601", "maximum")])
def test_heartbeat_interval_out_of_range(value: str, keyword: str) -> None:
    problem = only_problem(load_config(env_with(BAQUP_AGENT_HEARTBEAT_INTERVAL=value)))
    assert problem.variable == "BAQUP_AGENT_HEARTBEAT_INTERVAL"
    assert problem.keyword == keyword
    assert ("1" if keyword == "minimum" else "600") in problem.message


def test_compress_yes_is_not_a_boolean() -> None:
    problem = only_problem(load_config(env_with(BAQUP_ARTIFACT_COMPRESS="yes")))
    assert problem.variable == "BAQUP_ARTIFACT_COMPRESS"
    assert "boolean" in problem.message
    assert "true or false" in problem.message


def test_enum_value_outside_its_list() -> None:
    problem = only_problem(load_config(env_with(BAQUP_ARTIFACT_CHECKSUM_ALGORITHM="md5")))
    assert problem.variable == "BAQUP_ARTIFACT_CHECKSUM_ALGORITHM"
    assert problem.keyword == "enum"
    for allowed in ("sha256", "sha512", "blake3"):
        assert allowed in problem.message
    assert "md5" in problem.message


def test_malformed_json_array() -> None:
    problem = only_problem(load_config(env_with(BAQUP_SOURCE_EXCLUDE='["a", "b"')))
    assert problem.variable == "BAQUP_SOURCE_EXCLUDE"
    assert "malformed" in problem.message
    assert "JSON" in problem.message


def test_every_problem_at_once() -> None:
    env = env_with(
        BAQUP_AGENT_HEARTBEAT_INTERVAL="ten",
        BAQUP_ARTIFACT_COMPRESS="yes",
        BAQUP_AGENT_LOG_LEVEL="loud",
        BAQUP_SOURCE_EXCLUDE="[oops",
        BAQUP_STAGING_DIR="",
    )
    del env["BAQUP_JOB_ID"]
    config = load_config(env)
    assert not config.valid
    variables = sorted(p.variable for p in config.problems)
    assert variables == sorted(
        [
            "BAQUP_JOB_ID",
            "BAQUP_AGENT_HEARTBEAT_INTERVAL",
            "BAQUP_ARTIFACT_COMPRESS",
            "BAQUP_AGENT_LOG_LEVEL",
            "BAQUP_SOURCE_EXCLUDE",
            "BAQUP_STAGING_DIR",
        ]
    )
    with pytest.raises(ConfigError, match="6 configuration problems") as info:
        config.raise_for_problems()
    assert info.value.problems == list(config.problems)
    assert info.value.exit_code == 64


def test_invalid_job_id_together_with_others() -> None:
    config = load_config(
        env_with(BAQUP_JOB_ID="abc", BAQUP_JOB_TIMEOUT="-1", BAQUP_BUS_URL="not a uri")
    )
    assert {(p.variable, p.keyword) for p in config.problems} == {
        ("BAQUP_JOB_ID", "format"),
        ("BAQUP_JOB_TIMEOUT", "minimum"),
        ("BAQUP_BUS_URL", "format"),
        ("BAQUP_BUS_URL", "pattern"),
    }


def test_valid_config_raises_nothing() -> None:
    load_config(minimal()).raise_for_problems()


def test_conditional_encryption_key_required() -> None:
    problem = only_problem(load_config(env_with(BAQUP_ARTIFACT_ENCRYPT="true")))
    assert problem.variable == "BAQUP_SECRET_ENCRYPTION_KEY"
    ok = load_config(env_with(BAQUP_ARTIFACT_ENCRYPT="true", BAQUP_SECRET_ENCRYPTION_KEY="6b" * 32))
    assert ok.valid


# --- the agent schema file ------------------------------------------------------------


def _schema_problem(config: Config) -> Problem:
    schema_problems = [p for p in config.problems if p.variable == "BAQUP_AGENT_SCHEMA"]
    assert len(schema_problems) == 1, config.problems
    problem = schema_problems[0]
    assert problem.keyword == "schema"
    return problem


def test_schema_missing_explicit_path(tmp_path: Path) -> None:
    config = load_config(minimal(), str(tmp_path / "nope.json"))
    problem = _schema_problem(config)
    assert "not found" in problem.message
    assert "nope.json" in problem.message
    assert len(config.problems) == 1


def test_schema_missing_via_environment(tmp_path: Path) -> None:
    config = load_config(env_with(BAQUP_AGENT_SCHEMA=str(tmp_path / "gone.json")))
    assert "not found" in _schema_problem(config).message


def test_schema_unreadable_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "agent-schema.json"
    path.write_bytes(b'\xff\xfe{"type": "object"}\x80')
    problem = _schema_problem(load_config(minimal(), str(path)))
    assert "read" in problem.message


def test_schema_path_is_a_directory(tmp_path: Path) -> None:
    problem = _schema_problem(load_config(minimal(), str(tmp_path)))
    assert "directory" in problem.message


@pytest.mark.parametrize("text", ["not json", "{", '{"a": }', ""])
def test_schema_not_json(tmp_path: Path, text: str) -> None:
    path = tmp_path / "agent-schema.json"
    path.write_text(text, encoding="utf-8")
    problem = _schema_problem(load_config(minimal(), str(path)))
    assert "JSON" in problem.message


@pytest.mark.parametrize(
    "schema",
    [
        {"type": 12},
        {"properties": {"BAQUP_X": {"type": "integr"}}},
        {"required": "BAQUP_X"},
        {"properties": {"BAQUP_X": {"minimum": "ten"}}},
    ],
)
def test_schema_not_a_valid_json_schema(tmp_path: Path, schema: dict[str, Any]) -> None:
    problem = _schema_problem(load_config(minimal(), write_schema(tmp_path, schema)))
    assert "JSON Schema" in problem.message


@pytest.mark.parametrize("document", [[1, 2], "a string", 12])
def test_schema_not_an_object(tmp_path: Path, document: object) -> None:
    path = tmp_path / "agent-schema.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    assert "object" in _schema_problem(load_config(minimal(), str(path))).message


def test_schema_problem_does_not_hide_other_problems(tmp_path: Path) -> None:
    config = load_config(
        env_with(BAQUP_AGENT_HEARTBEAT_INTERVAL="ten"), str(tmp_path / "missing.json")
    )
    assert {p.variable for p in config.problems} == {
        "BAQUP_AGENT_SCHEMA",
        "BAQUP_AGENT_HEARTBEAT_INTERVAL",
    }


def test_x_baqup_agent_with_unknown_role_is_rejected(tmp_path: Path) -> None:
    schema = {"x-baqup-agent": {"agent": "agent-x", "roles": ["snapshot", "backup"]}}
    config = load_config(minimal(), write_schema(tmp_path, schema))
    problem = only_problem(config)
    assert problem.variable == "BAQUP_AGENT_SCHEMA"
    assert "backup" in problem.message
    assert "x-baqup-agent" in problem.message


def test_x_baqup_agent_command_for_unknown_role_is_rejected(tmp_path: Path) -> None:
    schema = {"x-baqup-agent": {"commands": {"backup": ["tar", "c", "."]}}}
    problem = only_problem(load_config(minimal(), write_schema(tmp_path, schema)))
    assert problem.variable == "BAQUP_AGENT_SCHEMA"


# --- agent variables -------------------------------------------------------------------


AGENT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "BAQUP_X_COUNT": {"type": "integer", "minimum": 1, "maximum": 10, "default": 5},
        "BAQUP_X_RATIO": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5},
        "BAQUP_X_FLAG": {"type": "boolean", "default": False},
        "BAQUP_X_LEVEL": {"type": "string", "enum": ["low", "high"], "default": "low"},
        "BAQUP_X_NAME": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"},
        "BAQUP_X_DIR": {"type": "string", "format": "path"},
        "BAQUP_X_URL": {"type": "string", "format": "uri"},
        "BAQUP_X_HOST": {"type": "string", "format": "hostname"},
        "BAQUP_X_ID": {"type": "string", "format": "uuid"},
        "BAQUP_X_MODE": {"type": "string", "enum": ["local", "remote"], "default": "local"},
        "BAQUP_X_TABLES": {"type": "array", "items": {"type": "string"}},
        "BAQUP_X_USER": {"type": "string"},
        "BAQUP_X_PASSWORD_FILE": {"type": "string"},
    },
    "if": {"properties": {"BAQUP_X_MODE": {"const": "remote"}}, "required": ["BAQUP_X_MODE"]},
    "then": {"required": ["BAQUP_X_HOST"]},
    "dependentRequired": {"BAQUP_X_USER": ["BAQUP_X_PASSWORD_FILE"]},
    "x-baqup-agent": {"agent": "agent-x", "version": "2.0.0", "roles": ["snapshot"]},
}


@pytest.fixture
def agent_schema(tmp_path: Path) -> str:
    return write_schema(tmp_path, AGENT_SCHEMA)


def test_agent_defaults_and_types(agent_schema: str) -> None:
    config = load_config(minimal(), agent_schema)
    assert config.valid, config.problems
    assert config.values["BAQUP_X_COUNT"] == 5
    assert config.values["BAQUP_X_RATIO"] == 0.5
    assert config.values["BAQUP_X_FLAG"] is False
    assert config.values["BAQUP_X_LEVEL"] == "low"
    assert config.schema_path == Path(agent_schema)
    assert config.agent_meta["agent"] == "agent-x"
    # The contract's variables are still applied.
    assert config.values["BAQUP_JOB_TIMEOUT"] == 3600


def test_agent_values_coerced(agent_schema: str) -> None:
    config = load_config(
        env_with(
            BAQUP_X_COUNT="7",
            BAQUP_X_RATIO="0.25",
            BAQUP_X_FLAG="True",
            BAQUP_X_LEVEL="high",
            BAQUP_X_NAME="db_main",
            BAQUP_X_DIR="/srv/data",
            BAQUP_X_URL="https://example.com/path?q=1",
            BAQUP_X_HOST="db.example.com",
            BAQUP_X_ID="00000000-0000-4000-8000-000000000000",
            BAQUP_X_TABLES="users|orders",
        ),
        agent_schema,
    )
    assert config.valid, config.problems
    values = config.values
    assert values["BAQUP_X_COUNT"] == 7
    assert type(values["BAQUP_X_COUNT"]) is int
    assert values["BAQUP_X_RATIO"] == pytest.approx(0.25)
    assert values["BAQUP_X_FLAG"] is True
    assert values["BAQUP_X_LEVEL"] == "high"
    assert values["BAQUP_X_NAME"] == "db_main"
    assert values["BAQUP_X_DIR"] == "/srv/data"
    assert values["BAQUP_X_HOST"] == "db.example.com"
    assert values["BAQUP_X_TABLES"] == ["users", "orders"]


@pytest.mark.parametrize("host", ["db", "db.example.com", "10.0.0.1", "::1", "[::1]", "a-b.c"])
def test_agent_hostname_accepts(agent_schema: str, host: str) -> None:
    assert load_config(env_with(BAQUP_X_HOST=host), agent_schema).valid


@pytest.mark.parametrize(
    ("name", "value", "keyword", "hint"),
    [
        ("BAQUP_X_COUNT", "many", "type", "integer"),
        ("BAQUP_X_COUNT", "1.5", "type", "integer"),
        ("BAQUP_X_COUNT", "0", "minimum", "1"),
        ("BAQUP_X_COUNT", "11", "maximum", "10"),
        ("BAQUP_X_RATIO", "half", "type", "number"),
        ("BAQUP_X_RATIO", "1.5", "maximum", "1"),
        ("BAQUP_X_FLAG", "on", "type", "boolean"),
        ("BAQUP_X_LEVEL", "medium", "enum", "low, high"),
        ("BAQUP_X_NAME", "Bad-Name", "pattern", "^[a-z][a-z0-9_]*$"),
        ("BAQUP_X_DIR", "", "format", "path"),
        ("BAQUP_X_URL", "not a uri", "format", "URI"),
        ("BAQUP_X_URL", "http://host:port/", "format", "URI"),
        ("BAQUP_X_HOST", "bad_host!", "format", "hostname"),
        ("BAQUP_X_HOST", "-leading.example.com", "format", "hostname"),
        ("BAQUP_X_ID", "1234", "format", "UUID"),
        ("BAQUP_X_TABLES", "[1, [2]]", "type", "JSON array"),
    ],
)
def test_agent_bad_values(
    agent_schema: str, name: str, value: str, keyword: str, hint: str
) -> None:
    problem = only_problem(load_config(env_with(**{name: value}), agent_schema))
    assert problem.variable == name
    assert problem.keyword == keyword
    assert hint in problem.message


def test_if_then_requires_host(agent_schema: str) -> None:
    problem = only_problem(load_config(env_with(BAQUP_X_MODE="remote"), agent_schema))
    assert problem.variable == "BAQUP_X_HOST"
    assert problem.keyword == "required"
    assert load_config(env_with(BAQUP_X_MODE="local"), agent_schema).valid
    assert load_config(
        env_with(BAQUP_X_MODE="remote", BAQUP_X_HOST="db.internal"), agent_schema
    ).valid


def test_dependent_required(agent_schema: str) -> None:
    problem = only_problem(load_config(env_with(BAQUP_X_USER="backup"), agent_schema))
    assert problem.variable == "BAQUP_X_PASSWORD_FILE"
    assert problem.keyword == "dependentRequired"
    assert "BAQUP_X_USER" in problem.message
    assert load_config(
        env_with(BAQUP_X_USER="backup", BAQUP_X_PASSWORD_FILE="/run/pw"), agent_schema
    ).valid


def test_agent_required_adds_to_the_contract(tmp_path: Path) -> None:
    schema = {
        "properties": {"BAQUP_SOURCE_PATH": {"type": "string", "format": "path"}},
        "required": ["BAQUP_SOURCE_PATH"],
    }
    path = write_schema(tmp_path, schema)
    problem = only_problem(load_config(minimal(), path))
    assert problem.variable == "BAQUP_SOURCE_PATH"
    assert problem.keyword == "required"
    env = minimal()
    del env["BAQUP_STAGING_DIR"]
    config = load_config(env, path)
    assert {p.variable for p in config.problems} == {"BAQUP_SOURCE_PATH", "BAQUP_STAGING_DIR"}
    assert load_config(env_with(BAQUP_SOURCE_PATH="/data"), path).valid


def test_agent_refines_a_contract_variable(tmp_path: Path) -> None:
    schema = {
        "properties": {
            "BAQUP_ARTIFACT_COMPRESS_ALGORITHM": {"enum": ["zstd", "gzip"], "default": "gzip"},
            "BAQUP_JOB_TIMEOUT": {"default": 60, "maximum": 600},
        }
    }
    path = write_schema(tmp_path, schema)
    config = load_config(minimal(), path)
    assert config.valid
    assert config.values["BAQUP_ARTIFACT_COMPRESS_ALGORITHM"] == "gzip"
    assert config.values["BAQUP_JOB_TIMEOUT"] == 60
    # The narrowed enum rejects a value the contract allows, and lists only what is left.
    problem = only_problem(load_config(env_with(BAQUP_ARTIFACT_COMPRESS_ALGORITHM="lz4"), path))
    assert problem.variable == "BAQUP_ARTIFACT_COMPRESS_ALGORITHM"
    assert problem.keyword == "enum"
    assert "zstd, gzip" in problem.message
    assert "none" not in problem.message.split(";")[0]
    # The contract's type is kept: the refinement adds constraints, it does not drop them.
    problem = only_problem(load_config(env_with(BAQUP_JOB_TIMEOUT="soon"), path))
    assert "integer" in problem.message
    problem = only_problem(load_config(env_with(BAQUP_JOB_TIMEOUT="900"), path))
    assert problem.keyword == "maximum"


# --- secrets -----------------------------------------------------------------------------


def test_secrets_become_secret_instances() -> None:
    config = load_config(
        env_with(BAQUP_SECRET_DB_PASSWORD=SECRET_VALUE, BAQUP_SECRET_ANYTHING="tok-12345")
    )
    assert config.valid
    password = config.values["BAQUP_SECRET_DB_PASSWORD"]
    assert isinstance(password, Secret)
    assert password.reveal() == SECRET_VALUE
    assert config.secret("BAQUP_SECRET_ANYTHING") == Secret("tok-12345")
    assert config.secret("BAQUP_JOB_ID") is None
    assert SECRET_VALUE not in all_text(config)
    assert "tok-12345" not in all_text(config)


def test_declared_secret_is_still_a_secret(tmp_path: Path) -> None:
    schema = {"properties": {"BAQUP_SECRET_PIN": {"type": "integer"}}}
    config = load_config(env_with(BAQUP_SECRET_PIN="483920"), write_schema(tmp_path, schema))
    assert config.valid
    pin = config.values["BAQUP_SECRET_PIN"]
    assert isinstance(pin, Secret)
    assert pin.reveal() == "483920"


SECRET_CHECKS: list[tuple[str, dict[str, Any], str]] = [
    ("pattern", {"type": "string", "pattern": "^[a-z]+$"}, "pattern"),
    ("minLength", {"type": "string", "minLength": 64}, "minLength"),
    ("maxLength", {"type": "string", "maxLength": 4}, "maxLength"),
    ("enum", {"type": "string", "enum": ["alpha", "beta"]}, "enum"),
    ("const", {"type": "string", "const": "alpha"}, "const"),
    ("integer", {"type": "integer"}, "type"),
    ("integer-json-array", {"type": "array", "items": {"type": "integer"}}, "type"),
    ("boolean", {"type": "boolean"}, "type"),
    ("number", {"type": "number"}, "type"),
    ("format-uuid", {"type": "string", "format": "uuid"}, "format"),
    ("format-hostname", {"type": "string", "format": "hostname"}, "format"),
    ("not", {"type": "string", "not": {"pattern": "e"}}, "not"),
]


@pytest.mark.parametrize(
    ("case", "decl", "keyword"), SECRET_CHECKS, ids=[c[0] for c in SECRET_CHECKS]
)
@pytest.mark.parametrize("value", [SECRET_VALUE, 'it\'s a "quoted" s3cret \\ value'])
def test_secret_never_in_a_problem(
    tmp_path: Path, case: str, decl: dict[str, Any], keyword: str, value: str
) -> None:
    schema = {"properties": {"BAQUP_SECRET_DB_PASSWORD": decl}}
    env = env_with(BAQUP_SECRET_DB_PASSWORD=value)
    config = load_config(env, write_schema(tmp_path, schema))
    problem = only_problem(config)
    assert problem.variable == "BAQUP_SECRET_DB_PASSWORD"
    assert problem.keyword == keyword
    text = all_text(config)
    assert value not in text
    assert json.dumps(value)[1:-1] not in text
    assert repr(value)[1:-1] not in text
    # Even the pieces are absent (an error must not quote part of it either).
    for piece in ("Sup3r", "S3cret-Value", "quoted"):
        if piece in value:
            assert piece not in text


def test_secret_value_in_an_ordinary_variable_is_redacted() -> None:
    # The bus password and the secret are the same string an operator pasted elsewhere.
    env = env_with(
        BAQUP_SECRET_DB_PASSWORD=SECRET_VALUE,
        BAQUP_SOURCE_HOST=SECRET_VALUE,
        BAQUP_JOB_TIMEOUT=SECRET_VALUE,
        BAQUP_ARTIFACT_COMPRESS=SECRET_VALUE,
        BAQUP_AGENT_LOG_LEVEL=SECRET_VALUE,
    )
    config = load_config(env)
    assert {p.variable for p in config.problems} == {
        "BAQUP_SOURCE_HOST",
        "BAQUP_JOB_TIMEOUT",
        "BAQUP_ARTIFACT_COMPRESS",
        "BAQUP_AGENT_LOG_LEVEL",
    }
    for problem in config.problems:
        assert SECRET_VALUE not in problem.message, problem


def test_bus_url_password_never_in_a_problem() -> None:
    url = "redis://user:Pa55-w0rd-Xy@host:notaport/0"
    config = load_config(env_with(BAQUP_BUS_URL=url))
    problem = only_problem(config)
    assert problem.variable == "BAQUP_BUS_URL"
    assert "Pa55-w0rd-Xy" not in problem_text(config)
    assert "redis://user:" in problem.message


def test_secret_never_in_a_root_level_problem(tmp_path: Path) -> None:
    # "One of BAQUP_SOURCE_PATH or BAQUP_SOURCE_HOST" is a common agent rule.
    schema = {
        "anyOf": [{"required": ["BAQUP_SOURCE_PATH"]}, {"required": ["BAQUP_SOURCE_HOST"]}],
    }
    value = 'it\'s "quoted" tok'
    env = env_with(BAQUP_SECRET_TOKEN=value, BAQUP_SECRET_DB_PASSWORD=SECRET_VALUE)
    config = load_config(env, write_schema(tmp_path, schema))
    assert len(config.problems) == 1
    text = problem_text(config)
    assert SECRET_VALUE not in text
    assert "quoted" not in text


# --- unknown variables ------------------------------------------------------------------


def test_unknown_variable_is_a_warning_with_the_nearest_name() -> None:
    config = load_config(env_with(BAQUP_JOB_TIMOUT="60"))
    assert config.valid
    assert len(config.warnings) == 1
    warning = config.warnings[0]
    assert warning.variable == "BAQUP_JOB_TIMOUT"
    assert "did you mean BAQUP_JOB_TIMEOUT" in warning.message
    # The misspelled variable does not set the real one.
    assert config.values["BAQUP_JOB_TIMEOUT"] == 3600


def test_unknown_variable_without_a_near_name() -> None:
    config = load_config(env_with(BAQUP_ZZZZZZZZZZZZZZZZZZ="1"))
    assert config.valid
    assert [w.variable for w in config.warnings] == ["BAQUP_ZZZZZZZZZZZZZZZZZZ"]
    assert "did you mean" not in config.warnings[0].message


def test_secret_and_foreign_variables_are_not_unknown() -> None:
    config = load_config(
        env_with(BAQUP_SECRET_ANYTHING="xyz-123", HOME="/root", PATH="/usr/bin", baqup_x="1")
    )
    assert config.warnings == ()
    assert config.valid


def test_agent_declared_variable_is_not_unknown(agent_schema: str) -> None:
    config = load_config(env_with(BAQUP_X_COUNT="3"), agent_schema)
    assert config.warnings == ()
    config = load_config(env_with(BAQUP_X_COUNT="3"))
    assert [w.variable for w in config.warnings] == ["BAQUP_X_COUNT"]


# --- schema discovery -----------------------------------------------------------------


def _named_schema(directory: Path, name: str) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    return write_schema(directory, {"x-baqup-agent": {"agent": name, "roles": ["snapshot"]}})


def test_discovery_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    explicit = _named_schema(tmp_path / "explicit", "agent-explicit")
    from_env = _named_schema(tmp_path / "env", "agent-env")
    _named_schema(tmp_path, "agent-cwd")

    config = load_config(env_with(BAQUP_AGENT_SCHEMA=from_env), explicit)
    assert config.agent_meta["agent"] == "agent-explicit"
    assert config.schema_path == Path(explicit)

    config = load_config(env_with(BAQUP_AGENT_SCHEMA=from_env))
    assert config.agent_meta["agent"] == "agent-env"
    assert config.schema_path == Path(from_env)

    config = load_config(minimal())
    assert config.agent_meta["agent"] == "agent-cwd"
    assert config.schema_path is not None
    assert config.schema_path.resolve() == (tmp_path / "agent-schema.json").resolve()
    assert config.valid


def test_no_schema_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(minimal())
    assert config.valid
    assert config.schema_path is None
    assert dict(config.agent_meta) == {}


def test_invalid_schema_in_cwd_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "agent-schema.json").write_text("{broken", encoding="utf-8")
    problem = only_problem(load_config(minimal()))
    assert problem.variable == "BAQUP_AGENT_SCHEMA"
    assert problem.keyword == "schema"
