"""Configuration: the environment, coerced and validated against the schemas.

Owns: finding and loading the agent's `agent-schema.json`, merging it over the
contract's own schema (shipped in `data/contract-schema.json`), coercing every
environment string by its declared type, validating with `jsonschema` (draft
2020-12, formats asserted), applying defaults, checking the encryption settings as a
whole (encryption_settings.py), and reporting every problem at once, each naming its
variable. Never: echo a `BAQUP_SECRET_*` value, exit the process, or
touch anything but the files it reads.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import SchemaError, ValidationError

from .coerce import CoercionError, coerce
from .contract import ROLES
from .errors import ConfigError
from .secret import SECRET_PREFIX, Redactor, Secret

SCHEMA_ENV = "BAQUP_AGENT_SCHEMA"
DEFAULT_SCHEMA_PATHS = (Path("agent-schema.json"), Path("/etc/baqup/agent-schema.json"))
SCHEMA_VARIABLE = SCHEMA_ENV  # the "variable" named by problems with the schema file


@dataclass(frozen=True)
class Problem:
    """One configuration problem (or warning), naming the variable it is about."""

    variable: str
    message: str
    keyword: str

    def as_dict(self) -> dict[str, str]:
        return {"variable": self.variable, "message": self.message, "keyword": self.keyword}

    def __str__(self) -> str:
        return f"{self.variable}: {self.message}"


# ---------------------------------------------------------------------------
# formats: path, uri, hostname, uuid (INTERFACE.md section 8)

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_SENTINEL_NODE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?")


def is_path(value: object) -> bool:
    return not isinstance(value, str) or (bool(value) and "\0" not in value)


def is_uri(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if any(c.isspace() for c in value):
        return False
    try:
        parts = urlsplit(value)
        if parts.scheme.lower() == "redis+sentinel":  # host:port[,host:port...]
            hosts = parts.netloc.rsplit("@", 1)[-1].split(",")
            if not all(_SENTINEL_NODE.fullmatch(h) for h in hosts):
                return False
        else:
            _ = parts.port  # raises on a non-numeric port
    except ValueError:
        return False
    return bool(_URI_SCHEME.fullmatch(parts.scheme)) and bool(parts.netloc or parts.path)


def is_hostname(value: object) -> bool:
    if not isinstance(value, str):
        return True
    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        pass
    else:
        return True
    name = value[:-1] if value.endswith(".") else value
    if not name or len(name) > 253:
        return False
    return all(_HOST_LABEL.fullmatch(label) for label in name.split("."))


def is_uuid(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if len(value) != 36:
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return all(value[i] == "-" for i in (8, 13, 18, 23))


_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def is_date_time(value: object) -> bool:
    """RFC 3339 date-time (jsonschema checks it only with an optional extra)."""
    if not isinstance(value, str):
        return True
    if not _DATE_TIME.fullmatch(value):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return False
    return True


def format_checker() -> FormatChecker:
    checker = FormatChecker()
    for name, check in (
        ("date-time", is_date_time),
        ("path", is_path),
        ("uri", is_uri),
        ("hostname", is_hostname),
        ("uuid", is_uuid),
    ):
        checker.checks(name)(check)
    return checker


_FORMAT_HELP = {
    "uuid": "a UUID such as 123e4567-e89b-12d3-a456-426614174000",
    "uri": "a URI such as redis://host:6379/0",
    "hostname": "a hostname or IP address",
    "path": "a non-empty path",
    "date-time": "an RFC 3339 date-time",
}


# ---------------------------------------------------------------------------
# schemas


@cache
def contract_schema() -> dict[str, Any]:
    """The contract's own variables (Appendix A plus INTERFACE.md additions)."""
    text = resources.files("baqup_supervisor").joinpath("data/contract-schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


_AGENT_META_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "agent": {"type": "string", "minLength": 1},
        "version": {"type": "string"},
        "roles": {"type": "array", "items": {"enum": list(ROLES)}, "uniqueItems": True},
        "commands": {
            "type": "object",
            "propertyNames": {"enum": list(ROLES)},
            "additionalProperties": {
                "oneOf": [
                    {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    {
                        "type": "object",
                        "required": ["argv"],
                        "properties": {
                            "argv": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                            "stdout_artifact": {"type": "string", "minLength": 1},
                            "stdin_artifact": {"type": "string", "minLength": 1},
                            "env": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            },
                            "progress_from": {"enum": ["pv", "restic-json"]},
                            "allow_empty_artifact": {"type": "boolean"},
                        },
                    },
                ]
            },
        },
        "capabilities": {"type": "object"},
        "requirements": {"type": "object"},
        "retriable_exit_codes": {
            "type": "array",
            "items": {"type": "integer", "minimum": 1, "maximum": 255},
        },
    },
}


def find_schema_path(explicit: str | None, environ: Mapping[str, str]) -> tuple[Path | None, bool]:
    """The agent schema to use and whether it was asked for explicitly (then it must exist)."""
    if explicit:
        return Path(explicit), True
    if environ.get(SCHEMA_ENV):
        return Path(environ[SCHEMA_ENV]), True
    for candidate in DEFAULT_SCHEMA_PATHS:
        if candidate.is_file():
            return candidate, False
    return None, False


def load_agent_schema(path: Path) -> dict[str, Any]:
    """Read and check an agent schema; every problem raises ConfigError naming the file."""

    def fail(message: str, keyword: str = "schema") -> ConfigError:
        problem = Problem(SCHEMA_VARIABLE, f"{path}: {message}", keyword)
        return ConfigError(str(problem), [problem])

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise fail("schema file not found") from None
    except IsADirectoryError:
        raise fail("schema path is a directory, not a file") from None
    except PermissionError:
        raise fail("schema file is not readable (permission denied)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"schema file cannot be read: {exc}") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    return check_agent_schema(schema, str(path))


def check_agent_schema(schema: Any, source: str) -> dict[str, Any]:
    """Check a parsed agent schema (from a file or an image label); ConfigError naming `source`."""

    def fail(message: str, keyword: str = "schema") -> ConfigError:
        problem = Problem(SCHEMA_VARIABLE, f"{source}: {message}", keyword)
        return ConfigError(str(problem), [problem])

    if not isinstance(schema, dict):
        raise fail("not a JSON Schema: the document must be an object")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise fail(f"not a valid JSON Schema (draft 2020-12) at {where}: {exc.message}") from None
    if "properties" in schema and not isinstance(schema["properties"], dict):
        raise fail("'properties' must be an object of environment variable names")
    meta = schema.get("x-baqup-agent", {})
    meta_errors = sorted(
        Draft202012Validator(_AGENT_META_SCHEMA).iter_errors(meta), key=lambda e: list(e.path)
    )
    if meta_errors:
        first = meta_errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(root)"
        raise fail(f"invalid x-baqup-agent at {where}: {first.message}", "x-baqup-agent")
    return schema


def merge_schemas(agent: Mapping[str, Any] | None) -> dict[str, Any]:
    """The contract schema with the agent's applied on top.

    Per variable the agent's declaration refines the contract's (keys override); the
    required lists are united; both schemas' conditionals (`allOf`, `if`/`then`,
    `dependentRequired`, ...) all apply.
    """
    base = copy.deepcopy(contract_schema())
    if not agent:
        return base
    merged_props: dict[str, Any] = base["properties"]
    for name, decl in agent.get("properties", {}).items():
        if isinstance(decl, dict) and isinstance(merged_props.get(name), dict):
            merged_props[name] = {**merged_props[name], **decl}
        else:
            merged_props[name] = decl
    required = list(dict.fromkeys([*base.get("required", []), *agent.get("required", [])]))
    conditionals = [
        {k: v for k, v in agent.items() if k not in _MERGED_KEYS and not k.startswith("x-")},
    ]
    base["required"] = required
    if isinstance(agent.get("$defs"), dict):
        base["$defs"] = {**base.get("$defs", {}), **agent["$defs"]}
    base["allOf"] = [*base.get("allOf", []), *(c for c in conditionals if c)]
    if "x-baqup-agent" in agent:
        base["x-baqup-agent"] = agent["x-baqup-agent"]
    return base


_MERGED_KEYS = {
    "$schema",
    "$id",
    "$defs",
    "title",
    "description",
    "properties",
    "required",
    "type",
    "$comment",
    "examples",
    "additionalProperties",
}


# ---------------------------------------------------------------------------
# loading


@dataclass(frozen=True)
class Config:
    """The validated configuration: typed values, defaults applied, secrets wrapped."""

    values: Mapping[str, Any] = field(repr=False)
    problems: tuple[Problem, ...]
    warnings: tuple[Problem, ...]
    schema: Mapping[str, Any]
    schema_path: Path | None
    redactor: Redactor = field(repr=False, compare=False)
    agent_properties: tuple[str, ...] = ()  # the variables the agent's own schema declares
    set_names: frozenset[str] = frozenset()  # the variables the environment set (not defaults)

    @property
    def valid(self) -> bool:
        return not self.problems

    @property
    def agent_meta(self) -> Mapping[str, Any]:
        meta = self.schema.get("x-baqup-agent", {})
        return meta if isinstance(meta, Mapping) else {}

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def given(self, name: str) -> bool:
        """Whether the environment set `name` (its value may still be the default)."""
        return name in self.set_names

    def secret(self, name: str) -> Secret | None:
        value = self.values.get(name)
        return value if isinstance(value, Secret) else None

    def raise_for_problems(self) -> None:
        if self.problems:
            count = len(self.problems)
            summary = "; ".join(str(p) for p in self.problems)
            raise ConfigError(
                f"{count} configuration problem{'s' if count > 1 else ''}: {summary}",
                list(self.problems),
            )


def _variable_of(error: ValidationError) -> list[str]:
    """The variable(s) a jsonschema error is about."""
    if error.path:
        return [str(error.path[0])]
    instance = error.instance if isinstance(error.instance, dict) else {}
    expected: Any = error.validator_value
    if error.validator == "required":
        return [str(n) for n in expected if n not in instance]
    if error.validator in ("anyOf", "oneOf") and isinstance(expected, list):
        # "one of these must be set": named by the first choice (the message lists all)
        for branch in expected:
            needed = branch.get("required") if isinstance(branch, dict) else None
            if isinstance(needed, list) and needed:
                return [str(needed[0])]
    if error.validator == "dependentRequired":
        missing: list[str] = []
        for trigger, needed in expected.items():
            if trigger in instance:
                missing.extend(str(n) for n in needed if n not in instance)
        return missing
    return ["(environment)"]


MAX_SHOWN = 80  # characters of a value quoted in a problem


def _shown(text: str, secret: bool, redactor: Redactor) -> str:
    """How a value is quoted in a problem: redacted, then cut; a secret not at all."""
    if secret:
        return "a value (hidden: secret)"
    return repr(redactor.clip(text, MAX_SHOWN))


def _message(
    error: ValidationError, variable: str, value: Any, secret: bool, redactor: Redactor
) -> str:
    """An error message that names what was expected and never shows a secret."""
    keyword = str(error.validator)
    expected: Any = error.validator_value
    text = _shown(value if isinstance(value, str) else json.dumps(value), secret, redactor)
    if keyword == "required":
        return "is required but not set"
    if keyword == "dependentRequired":
        triggers = [t for t, needed in expected.items() if variable in needed]
        return f"is required when {', '.join(triggers) or 'a related variable'} is set"
    if keyword == "enum":
        return f"expected one of {', '.join(map(str, expected))}; got {text}"
    if keyword == "const":
        return f"expected {json.dumps(expected)}; got {text}"
    if keyword == "format":
        return f"expected {_FORMAT_HELP.get(str(expected), f'format {expected}')}; got {text}"
    if keyword == "pattern":
        described = _declaration(error).get("x-expected")
        if isinstance(described, str):
            return f"expected {described}; got {text}"
        return f"expected a value matching {expected}; got {text}"
    if keyword in ("minimum", "exclusiveMinimum"):
        bound = "at least" if keyword == "minimum" else "greater than"
        return f"expected a value {bound} {expected}; got {text}"
    if keyword in ("maximum", "exclusiveMaximum"):
        bound = "at most" if keyword == "maximum" else "less than"
        return f"expected a value {bound} {expected}; got {text}"
    if keyword in ("minLength", "maxLength", "minItems", "maxItems"):
        what = "characters" if keyword.endswith("Length") else "items"
        bound = "at least" if keyword.startswith("min") else "at most"
        return f"expected {bound} {expected} {what}"
    if keyword == "type":
        return f"expected type {expected}; got {text}"
    if not error.path:
        return _root_rule(keyword, expected)
    return f"invalid ({keyword})" if secret else f"invalid ({keyword}): {error.message}"


def _declaration(error: ValidationError) -> Mapping[str, Any]:
    """The schema (declaration) the failing keyword belongs to."""
    schema = error.schema
    return schema if isinstance(schema, Mapping) else {}


def _root_rule(keyword: str, expected: Any) -> str:
    """A rule about the whole environment, described without quoting any value."""
    if keyword in ("anyOf", "oneOf") and isinstance(expected, list):
        options = [
            " and ".join(branch["required"])
            for branch in expected
            if isinstance(branch, dict) and isinstance(branch.get("required"), list)
        ]
        if options and len(options) == len(expected):
            which = "one of" if keyword == "anyOf" else "exactly one of"
            return f"{which} these must be set: {'; '.join(options)}"
    return f"the environment does not satisfy the schema's {keyword} rule"


def _default_of(decl: Mapping[str, Any]) -> tuple[bool, Any]:
    if "default" not in decl:
        return False, None
    default = decl["default"]
    if isinstance(default, str) and decl.get("type") not in (None, "string"):
        try:
            return True, coerce(default, decl)
        except CoercionError:
            return True, default
    return True, copy.deepcopy(default)


def _unknown_warnings(environ: Mapping[str, str], known: Iterable[str]) -> list[Problem]:
    known_names = sorted(known)
    warnings = []
    for name in sorted(environ):
        if not name.startswith("BAQUP_") or name.startswith(SECRET_PREFIX) or name in known_names:
            continue
        close = difflib.get_close_matches(name, known_names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        warnings.append(Problem(name, f"unknown variable{hint}", "unknown"))
    return warnings


def load_config(
    environ: Mapping[str, str] | None = None,
    schema_path: str | None = None,
    *,
    agent_schema: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration; problems are collected, never raised (see `raise_for_problems`).

    A schema file that is missing (when asked for), unreadable or invalid is itself a
    problem: it is reported, and the contract's own variables are still checked so
    the operator sees everything at once. `agent_schema`, an already checked schema
    (`check_agent_schema`, e.g. read from an image label), replaces the file lookup.
    """
    env = dict(os.environ if environ is None else environ)
    redactor = Redactor.from_environ(env)
    problems: list[Problem] = []
    given = agent_schema is not None
    path, explicit = (None, False) if given else find_schema_path(schema_path, env)
    if path is not None:
        try:
            agent_schema = load_agent_schema(path)
        except ConfigError as exc:
            problems.extend(exc.problems)
        if not explicit and agent_schema is None:
            path = None
    schema = merge_schemas(agent_schema)
    properties: dict[str, Any] = schema["properties"]

    instance: dict[str, Any] = {}
    unparsable: set[str] = set()
    for name, text in env.items():
        decl = properties.get(name)
        if not isinstance(decl, Mapping):
            if name.startswith(SECRET_PREFIX):
                instance[name] = text
            continue
        secret = name.startswith(SECRET_PREFIX)
        try:
            instance[name] = coerce(text, decl)
        except CoercionError as exc:
            message = f"expected {exc.message}; got {_shown(text, secret, redactor)}"
            problems.append(Problem(name, redactor.redact(message), exc.keyword))
            instance[name] = text
            unparsable.add(name)

    validator = Draft202012Validator(schema, format_checker=format_checker())
    seen: set[tuple[str, str]] = set()
    for error in validator.iter_errors(instance):
        for variable in _variable_of(error):
            if variable in unparsable:
                continue
            key = (variable, str(error.validator))
            if key in seen:
                continue
            seen.add(key)
            secret = variable.startswith(SECRET_PREFIX)
            message = _message(error, variable, instance.get(variable), secret, redactor)
            problems.append(Problem(variable, redactor.redact(message), str(error.validator)))

    values: dict[str, Any] = {}
    for name, decl in properties.items():
        if name in instance and name not in unparsable:
            values[name] = instance[name]
        elif name not in instance and isinstance(decl, Mapping):
            has_default, default = _default_of(decl)
            if has_default:
                values[name] = default
    for name, text in env.items():
        if name.startswith(SECRET_PREFIX):
            values[name] = Secret(text)
    from .encryption_settings import VARIABLES, encryption_problems

    if not unparsable & VARIABLES:  # a value that did not parse is its own problem already
        for variable, message in encryption_problems(values, frozenset(env)):
            problems.append(Problem(variable, redactor.redact(message), "encryption"))
    return Config(
        values=values,
        problems=tuple(problems),
        warnings=tuple(_unknown_warnings(env, properties)),
        schema=schema,
        schema_path=path,
        redactor=redactor,
        agent_properties=tuple((agent_schema or {}).get("properties", {})),
        set_names=frozenset(env),
    )


__all__ = [
    "Config",
    "ConfigError",
    "Problem",
    "check_agent_schema",
    "contract_schema",
    "find_schema_path",
    "load_agent_schema",
    "load_config",
    "merge_schemas",
]
