"""The agent images and deployment examples, checked without Docker or Kubernetes.

`docker build` cannot run here, so the Dockerfiles are parsed (a small parser:
comments, line continuations, JSON and shell forms, ARG defaults in FROM) and checked
for what the images promise: baqup-run as the ENTRYPOINT, a non-root user, the
staging volume, the io.baqup.agent label, COPY sources that exist in the build
context, agent images FROM the base with their schema at /etc/baqup/agent-schema.json.
The lock file pins every runtime dependency at the version the tests run with, the
build scripts print the labels `baqup labels` gives, `--info` and `--validate` agree
with each agent schema, and the compose file and the Kubernetes Job set only known
BAQUP_* variables, in an environment `--validate` accepts.
"""

from __future__ import annotations

import fnmatch
import glob
import importlib.metadata
import itertools
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import baqup_supervisor
from tests.conftest import PYTHON, REPO, run_baqup

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 has no tomllib; pip vendors tomli
    from pip._vendor import tomli as tomllib

VENV_BIN = Path(PYTHON).parent
BASE_DOCKERFILE = REPO / "Dockerfile.base"
AGENTS = ("agent-postgres", "agent-fs")
CONTRACT_SCHEMA = REPO / "baqup_supervisor" / "data" / "contract-schema.json"
JOB_ID = "3f1c1e2a-5b7d-4c8e-9f10-2a3b4c5d6e7f"
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"


def agent_dir(agent: str) -> Path:
    return REPO / "docker" / agent


def load_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def agent_schema(agent: str) -> dict[str, Any]:
    return load_json(agent_dir(agent) / "agent-schema.json")


# --- a small Dockerfile parser ------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    text: str  # the arguments as written (continuations joined)
    line: int

    @property
    def json_args(self) -> list[str] | None:
        """The JSON (exec) form's arguments, or None for the shell form."""
        if not self.text.startswith("["):
            return None
        try:
            value = json.loads(self.text)
        except ValueError:
            return None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        return None

    @property
    def words(self) -> list[str]:
        """The arguments as words: the JSON form's list, else shell-style words."""
        found = self.json_args
        return found if found is not None else shlex.split(self.text, comments=False)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuations joined and comment lines dropped (also mid-continuation)."""
    escape = "\\"
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    lines = text.splitlines()
    for number, raw in enumerate(lines, start=1):
        match = re.match(r"#\s*escape\s*=\s*(\S)\s*$", raw)
        if match and not instructions and not pending:
            escape = match.group(1)
            continue
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith(escape):
            pending.append(stripped[: -len(escape)].rstrip())
            continue
        pending.append(stripped)
        joined = " ".join(p for p in pending if p)
        pending = []
        keyword, _, rest = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), rest.strip(), start))
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


def substitute(text: str, variables: dict[str, str]) -> str:
    """${VAR}, ${VAR:-default} and $VAR with the ARG values known at that point."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        default = match.group(2)
        value = variables.get(name, "")
        return value if value or default is None else default

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", replace, text)


@dataclass(frozen=True)
class Stage:
    base: str  # the FROM image, ARGs substituted
    instructions: list[Instruction]
    args: dict[str, str]  # ARG defaults declared before FROM

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def final_stage(path: Path) -> Stage:
    instructions = parse_dockerfile(path.read_text())
    args: dict[str, str] = {}
    stages: list[tuple[str, list[Instruction]]] = []
    for instruction in instructions:
        if instruction.keyword == "ARG" and not stages:
            name, _, default = instruction.text.partition("=")
            args[name.strip()] = default.strip().strip('"')
        elif instruction.keyword == "FROM":
            image = substitute(instruction.words[0], args)
            stages.append((image, []))
        else:
            assert stages, f"{path.name}:{instruction.line}: {instruction.keyword} before FROM"
            stages[-1][1].append(instruction)
    assert stages, f"{path.name}: no FROM"
    base, body = stages[-1]
    return Stage(base, body, args)


def copy_sources(instruction: Instruction) -> tuple[list[str], str, bool]:
    """(sources, destination, from another stage) of a COPY or ADD."""
    words = instruction.words
    flags = [w for w in words if w.startswith("--")]
    rest = [w for w in words if not w.startswith("--")]
    assert len(rest) >= 2, f"line {instruction.line}: {instruction.keyword} needs SRC... DEST"
    return rest[:-1], rest[-1], any(f.startswith("--from") for f in flags)


def label_pairs(instruction: Instruction) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for word in shlex.split(instruction.text):
        key, sep, value = word.partition("=")
        assert sep, f"line {instruction.line}: LABEL {word!r} is not KEY=VALUE"
        pairs[key] = value
    return pairs


def env_pairs(instruction: Instruction) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for word in shlex.split(instruction.text):
        key, _, value = word.partition("=")
        pairs[key] = value
    return pairs


def user_uid(user: str, stages: list[Stage]) -> int:
    """The numeric uid of a USER value (a name is looked up in the stages' useradd calls)."""
    name = user.split(":", 1)[0]
    if name.isdigit():
        return int(name)
    for stage in stages:
        for run in stage.all("RUN"):
            for command in re.split(r"&&|;", run.text):
                words = shlex.split(command)
                if words[:1] == ["useradd"] and words[-1] == name:
                    for flag, value in itertools.pairwise(words):
                        if flag in ("--uid", "-u"):
                            return int(value)
    raise AssertionError(f"USER {user}: no uid found")


def assert_copy_sources_exist(stage: Stage, dockerfile: Path) -> None:
    copies = stage.all("COPY") + stage.all("ADD")
    assert copies, f"{dockerfile.name}: nothing copied"
    for instruction in copies:
        sources, _, from_stage = copy_sources(instruction)
        if from_stage:
            continue
        for source in sources:
            assert not source.startswith(("/", "..")), f"{source}: outside the build context"
            matches = glob.glob(str(REPO / source))
            assert matches, f"{dockerfile.name}:{instruction.line}: {source} is not in the repo"
            for match in matches:
                assert Path(match).resolve().is_relative_to(REPO)


def dockerignored(path: str) -> bool:
    ignore = REPO / ".dockerignore"
    if not ignore.exists():
        return False
    patterns = [
        line.strip() for line in ignore.read_text().splitlines() if line.strip()[:1] not in "#"
    ]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, body) or path.startswith(body + "/"):
            excluded = not negated
    return excluded


# --- the base image -------------------------------------------------------------------------


def test_dockerfile_parser_handles_the_forms() -> None:
    text = (
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=img:1\n"
        "FROM ${BASE} AS build\n"
        "RUN a \\\n"
        "    # a comment inside a continuation\n"
        "    && b\n"
        'ENTRYPOINT ["x", "y z"]\n'
        "CMD run it\n"
    )
    parsed = parse_dockerfile(text)
    assert [i.keyword for i in parsed] == ["ARG", "FROM", "RUN", "ENTRYPOINT", "CMD"]
    assert parsed[2].text == "a && b"
    assert parsed[3].json_args == ["x", "y z"]
    assert parsed[4].json_args is None
    assert parsed[4].words == ["run", "it"]
    assert substitute("${BASE}", {"BASE": "img:1"}) == "img:1"
    assert substitute("${NOPE:-d}", {}) == "d"


def test_base_image() -> None:
    stage = final_stage(BASE_DOCKERFILE)
    assert stage.base.startswith("python:3."), stage.base
    major_minor = tuple(int(x) for x in re.findall(r"python:(\d+)\.(\d+)", stage.base)[0])
    required = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(x) for x in re.findall(r">=\s*(\d+)\.(\d+)", required)[0])
    assert major_minor >= minimum

    entrypoint = stage.last("ENTRYPOINT")
    assert entrypoint is not None
    assert entrypoint.json_args == ["baqup-run"]  # exec form: baqup-run is PID 1, gets signals

    user = stage.last("USER")
    assert user is not None
    assert stage.instructions.index(user) > max(
        stage.instructions.index(i) for i in stage.all("RUN")
    )
    uid = user_uid(user.words[0], [stage])
    assert uid >= 1000
    gid = user.words[0].partition(":")[2]
    assert gid == "" or int(gid) != 0

    volumes = [v for i in stage.all("VOLUME") for v in i.words]
    assert "/staging" in volumes
    env = {k: v for i in stage.all("ENV") for k, v in env_pairs(i).items()}
    assert env.get("BAQUP_STAGING_DIR") == "/staging"
    workdir = stage.last("WORKDIR")
    assert workdir is not None
    assert workdir.words == ["/staging"]

    labels = {k: v for i in stage.all("LABEL") for k, v in label_pairs(i).items()}
    assert labels.get("io.baqup.agent") == "true"

    assert_copy_sources_exist(stage, BASE_DOCKERFILE)
    # the package is installed from what was copied: its pyproject's readme and license too
    copied: dict[str, list[str]] = {}
    for instruction in stage.all("COPY"):
        sources, dest, _ = copy_sources(instruction)
        copied.setdefault(dest.rstrip("/"), []).extend(sources)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (package_dir,) = [d for d, s in copied.items() if "pyproject.toml" in s]
    needed = {project["readme"], project["license"]["file"]}
    assert needed <= set(copied[package_dir])
    assert copied.get(f"{package_dir}/baqup_supervisor") == ["baqup_supervisor"]
    for source in [s for sources in copied.values() for s in sources]:
        assert not dockerignored(source), f"{source} is excluded by .dockerignore"
    lock_copies = [d for d, s in copied.items() if "docker/requirements.lock" in s]
    assert lock_copies, "the lock file is not copied into the image"
    install = " ".join(i.text for i in stage.all("RUN"))
    assert "-r /tmp/requirements.lock" in install


@pytest.mark.parametrize("agent", AGENTS)
def test_agent_image(agent: str) -> None:
    dockerfile = agent_dir(agent) / "Dockerfile"
    stage = final_stage(dockerfile)
    base_stage = final_stage(BASE_DOCKERFILE)
    # FROM the base, through ARG BASE whose default is the base image's tag
    assert "BASE" in stage.args
    first_from = next(i for i in parse_dockerfile(dockerfile.read_text()) if i.keyword == "FROM")
    assert first_from.words[0] in ("${BASE}", "$BASE")
    version = baqup_supervisor.__version__  # pyproject's version is dynamic, from here
    assert stage.base == f"ghcr.io/baqup/agent-base:{version}"
    assert f"-t {stage.base} " in BASE_DOCKERFILE.read_text()  # the tag the base is built as

    # the effective user at the end: the agent's last USER, else the base image's
    user = stage.last("USER") or base_stage.last("USER")
    assert user is not None
    assert user_uid(user.words[0], [base_stage, stage]) >= 1000
    runs = [stage.instructions.index(i) for i in stage.all("RUN")]
    if runs and stage.last("USER") is not None:
        assert stage.instructions.index(user) > max(runs), "root must be dropped after RUN"

    schema_copies = [
        i
        for i in stage.all("COPY")
        if copy_sources(i)[1] == "/etc/baqup/agent-schema.json"
        and copy_sources(i)[0] == [f"docker/{agent}/agent-schema.json"]
    ]
    assert len(schema_copies) == 1
    assert_copy_sources_exist(stage, dockerfile)
    # the tools the schema requires are installed by the image (or are baqup itself)
    tools = agent_schema(agent)["x-baqup-agent"].get("requirements", {}).get("tools", [])
    installs = " ".join(i.text for i in stage.all("RUN"))
    if any(t.startswith("pg_") or t == "psql" for t in tools):
        assert "postgresql-client" in installs


# --- the lock file ----------------------------------------------------------------------------


def lock_pins() -> dict[str, str]:
    from tests.test_supply_chain import lock_pins as hashed_lock_pins  # the lock has hashes now

    return hashed_lock_pins()


def test_lock_pins_every_runtime_dependency_at_the_tested_version() -> None:
    pins = lock_pins()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(d) for d in project["dependencies"]]
    assert {canonicalize_name(r.name) for r in declared} >= {
        "redis",
        "click",
        "psutil",
        "orjson",
        "jsonschema",
        "blake3",
        "zstandard",
    }
    for requirement in declared:
        pinned = canonicalize_name(requirement.name)
        assert pinned in pins, f"{requirement.name} is not pinned in docker/requirements.lock"
        assert requirement.specifier.contains(pins[pinned], prereleases=True), (
            f"{pinned}=={pins[pinned]} does not satisfy pyproject's {requirement}"
        )
    # the extras the image ships (comment of the lock): crypto and lz4
    for extra in ("crypto", "lz4"):
        for spec in project["optional-dependencies"][extra]:
            assert canonicalize_name(Requirement(spec).name) in pins
    for name, version in pins.items():
        assert importlib.metadata.version(name) == version, f"{name}: venv vs lock"


def test_lock_is_closed_under_dependencies() -> None:
    """The image installs the lock with --no-deps: every dependency must be in it."""
    pins = lock_pins()
    stage = final_stage(BASE_DOCKERFILE)
    version = re.findall(r"python:(\d+\.\d+)", stage.base)[0]
    environment = {
        "python_version": version,
        "python_full_version": f"{version}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "platform_machine": "x86_64",
        "extra": "",
    }
    missing = []
    for name in pins:
        for spec in importlib.metadata.requires(name) or []:
            requirement = Requirement(spec)
            marker: Marker | None = requirement.marker
            if marker is not None and not marker.evaluate(environment):
                continue
            dependency = canonicalize_name(requirement.name)
            if dependency not in pins:
                missing.append(f"{name} -> {spec}")
            elif not requirement.specifier.contains(pins[dependency], prereleases=True):
                missing.append(f"{name} -> {spec} (pinned {pins[dependency]})")
    assert missing == []


# --- build scripts, labels, --info -------------------------------------------------------------


def tool_env() -> dict[str, str]:
    return {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


@pytest.mark.parametrize("agent", AGENTS)
def test_build_script_labels(agent: str) -> None:
    schema_path = agent_dir(agent) / "agent-schema.json"
    result = subprocess.run(
        [str(agent_dir(agent) / "build.sh")],
        cwd=REPO,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith("docker build")]
    words = shlex.split(line)
    assert words[:2] == ["docker", "build"]
    assert words[words.index("-f") + 1] == f"docker/{agent}/Dockerfile"
    version = load_json(schema_path)["x-baqup-agent"]["version"]
    assert words[words.index("-t") + 1] == f"ghcr.io/baqup/{agent}:{version}"
    assert words[-1] == "."
    printed: dict[str, str] = {}
    for flag, value in itertools.pairwise(words):
        if flag == "--label":
            key, _, text = value.partition("=")
            printed[key] = text
    labels = run_baqup(
        ["labels", "--schema", str(schema_path), "--format", "json"], tool_env(), tool=True
    )
    assert labels.returncode == 0, labels.stderr
    expected = json.loads(labels.stdout)
    assert printed.keys() == expected.keys()
    assert printed["io.baqup.agent"] == "true"
    assert printed["io.baqup.type"] == agent.removeprefix("agent-")
    assert printed["io.baqup.roles"] == ",".join(load_json(schema_path)["x-baqup-agent"]["roles"])
    assert json.loads(expected["io.baqup.schema"]) == load_json(schema_path)
    try:
        printed_schema = json.loads(printed["io.baqup.schema"])
    except ValueError as exc:
        raise AssertionError(
            f"build.sh printed an io.baqup.schema label that is not JSON ({exc})"
        ) from None
    assert printed_schema == load_json(schema_path)
    assert printed == expected


@pytest.mark.parametrize("agent", AGENTS)
def test_info_matches_the_schema(agent: str) -> None:
    schema_path = agent_dir(agent) / "agent-schema.json"
    meta = load_json(schema_path)["x-baqup-agent"]
    result = run_baqup(["--info", "--schema", str(schema_path)], tool_env())
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["agent"] == meta["agent"] == agent
    assert info["version"] == meta["version"]
    assert info["roles"] == meta["roles"]
    assert info["requirements"] == meta["requirements"]
    for key, value in meta["capabilities"].items():
        assert info["capabilities"][key] == value, key
    # merged with what baqup-run itself supports
    assert info["capabilities"]["checksums"] == ["sha256", "sha512", "blake3"]
    assert "zstd" in info["capabilities"]["compression"]
    assert "file" in info["capabilities"]["bus"]
    assert info["commands"] == {role: spec["argv"] for role, spec in meta["commands"].items()}
    assert set(info["commands"]) == set(meta["roles"])


# --- schemas and --validate -----------------------------------------------------------------------

ALL_SCHEMAS = [
    *(agent_dir(a) / "agent-schema.json" for a in AGENTS),
    REPO / "examples" / "agent-schema.json",
    REPO / "examples" / "python-agent" / "agent-schema.json",
]


@pytest.mark.parametrize("path", ALL_SCHEMAS, ids=lambda p: str(p.relative_to(REPO)))
def test_schema_is_draft_2020_12(path: Path) -> None:
    schema = load_json(path)
    assert schema["$schema"] == DRAFT_2020_12
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["type"] == "object"
    for name, declaration in schema["properties"].items():
        assert name.startswith("BAQUP_"), name
        assert "type" in declaration, name
    assert set(schema.get("required", [])) <= set(schema["properties"])


def complete_env(agent: str, tmp_path: Path) -> dict[str, str]:
    env = tool_env()
    env.update(
        BAQUP_JOB_ID=JOB_ID,
        BAQUP_STAGING_DIR=str(tmp_path / "staging"),
        BAQUP_BUS_URL=f"file://{tmp_path / 'bus'}",
    )
    if agent == "agent-postgres":
        env.update(BAQUP_SOURCE_HOST="db.example.org", BAQUP_SOURCE_DATABASE="app")
    else:
        env.update(BAQUP_SOURCE_PATH=str(tmp_path))
    return env


@pytest.mark.parametrize("agent", AGENTS)
def test_validate(agent: str, tmp_path: Path) -> None:
    schema_path = agent_dir(agent) / "agent-schema.json"
    env = complete_env(agent, tmp_path)
    ok = run_baqup(["--validate", "--schema", str(schema_path)], env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout) == {"valid": True, "errors": []}
    required = load_json(schema_path)["required"]
    contract_required = load_json(CONTRACT_SCHEMA)["required"]
    for name in [*required, *contract_required]:
        partial = {k: v for k, v in env.items() if k != name}
        bad = run_baqup(["--validate", "--schema", str(schema_path)], partial)
        assert bad.returncode == 64, name
        report = json.loads(bad.stdout)
        assert report["valid"] is False
        assert [e["variable"] for e in report["errors"]] == [name]
        assert report["errors"][0]["keyword"] == "required"


# --- a small YAML reader (block and flow collections, plain and quoted scalars) -----------------


class YamlError(ValueError):
    pass


def _strip_comment(line: str) -> str:
    quote: str | None = None
    for index, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1] in " \t"):
            return line[:index].rstrip()
    return line.rstrip()


def _scalar(text: str) -> Any:
    text = text.strip()
    if not text:
        return None
    if text[0] == '"':
        if not text.endswith('"') or len(text) < 2:
            raise YamlError(f"unterminated string {text!r}")
        return json.loads(text)
    if text[0] == "'":
        if not text.endswith("'") or len(text) < 2:
            raise YamlError(f"unterminated string {text!r}")
        return text[1:-1].replace("''", "'")
    if text[0] in "&*!|>%@`":
        raise YamlError(f"unsupported YAML construct {text!r}")
    if text in ("null", "Null", "NULL", "~"):
        return None
    if text in ("true", "True", "TRUE"):
        return True
    if text in ("false", "False", "FALSE"):
        return False
    if re.fullmatch(r"[-+]?[0-9]+", text):
        return int(text)
    if re.fullmatch(r"[-+]?([0-9]*\.[0-9]+|[0-9]+\.[0-9]*)([eE][-+]?[0-9]+)?", text):
        return float(text)
    return text


class _Flow:
    """A flow collection: [a, b], {k: v}, nested."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def parse(self) -> Any:
        value = self.value("")
        self.skip()
        if self.pos != len(self.text):
            raise YamlError(f"trailing text in flow collection {self.text!r}")
        return value

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def value(self, stops: str) -> Any:
        self.skip()
        char = self.text[self.pos : self.pos + 1]
        if char == "[":
            return self.sequence()
        if char == "{":
            return self.mapping()
        if char in "\"'":
            end = self.pos + 1
            while end < len(self.text):
                if self.text[end] == char and (char == "'" or self.text[end - 1] != "\\"):
                    break
                end += 1
            token = self.text[self.pos : end + 1]
            self.pos = end + 1
            return _scalar(token)
        end = self.pos
        while end < len(self.text) and self.text[end] not in stops:
            if self.text[end] == ":" and ":" in stops and self.text[end + 1 : end + 2] in " ,}":
                break
            end += 1
        token = self.text[self.pos : end]
        self.pos = end
        return _scalar(token)

    def expect(self, char: str) -> None:
        self.skip()
        if self.text[self.pos : self.pos + 1] != char:
            raise YamlError(f"expected {char!r} at {self.pos} in {self.text!r}")
        self.pos += 1

    def sequence(self) -> list[Any]:
        self.expect("[")
        items: list[Any] = []
        self.skip()
        if self.text[self.pos : self.pos + 1] == "]":
            self.pos += 1
            return items
        while True:
            items.append(self.value(",]"))
            self.skip()
            if self.text[self.pos : self.pos + 1] == "]":
                self.pos += 1
                return items
            self.expect(",")

    def mapping(self) -> dict[str, Any]:
        self.expect("{")
        items: dict[str, Any] = {}
        self.skip()
        if self.text[self.pos : self.pos + 1] == "}":
            self.pos += 1
            return items
        while True:
            key = self.value(":,}")
            self.expect(":")
            items[str(key)] = self.value(",}")
            self.skip()
            if self.text[self.pos : self.pos + 1] == "}":
                self.pos += 1
                return items
            self.expect(",")


def _inline(text: str) -> Any:
    text = text.strip()
    if text[:1] in "[{":
        return _Flow(text).parse()
    return _scalar(text)


def _split_key(content: str) -> tuple[str, str] | None:
    """`key: value` -> (key, value), or None when `content` is not a mapping entry."""
    quote: str | None = None
    depth = 0
    for index, char in enumerate(content):
        if quote:
            if char == quote:
                quote = None
            continue
        if char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == ":" and depth == 0 and content[index + 1 : index + 2] in ("", " "):
            key = content[:index].strip()
            return str(_scalar(key)) if key[:1] in "\"'" else key, content[index + 1 :].strip()
    return None


def parse_yaml(text: str) -> Any:
    lines: list[tuple[int, str]] = []
    for raw in text.splitlines():
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise YamlError("tabs in indentation")
        content = _strip_comment(raw)
        if content.strip() in ("---", "..."):
            raise YamlError("multi-document YAML is not supported here")
        if content.strip():
            lines.append((len(content) - len(content.lstrip()), content.strip()))
    if not lines:
        return None
    value, index = _block(lines, 0, lines[0][0])
    if index != len(lines):
        raise YamlError(f"unexpected indentation at {lines[index][1]!r}")
    return value


def _block(lines: list[tuple[int, str]], index: int, indent: int) -> tuple[Any, int]:
    if lines[index][1] == "-" or lines[index][1].startswith("- "):
        return _sequence(lines, index, indent)
    return _mapping(lines, index, indent)


def _sequence(lines: list[tuple[int, str]], index: int, indent: int) -> tuple[list[Any], int]:
    items: list[Any] = []
    while index < len(lines) and lines[index][0] == indent:
        content = lines[index][1]
        if not (content == "-" or content.startswith("- ")):
            break
        rest = content[1:].strip()
        if not rest:
            child_indent = lines[index + 1][0]
            if child_indent <= indent:
                items.append(None)
                index += 1
                continue
            value, index = _block(lines, index + 1, child_indent)
            items.append(value)
            continue
        if rest[:1] not in "[{\"'" and _split_key(rest) is not None:
            inner = indent + len(content) - len(rest)
            patched = [*lines[:index], (inner, rest), *lines[index + 1 :]]
            value, index = _mapping(patched, index, inner)
            items.append(value)
            continue
        items.append(_inline(rest))
        index += 1
    return items, index


def _mapping(lines: list[tuple[int, str]], index: int, indent: int) -> tuple[dict[str, Any], int]:
    result: dict[str, Any] = {}
    while index < len(lines) and lines[index][0] == indent:
        content = lines[index][1]
        if content.startswith("- "):
            break
        split = _split_key(content)
        if split is None:
            raise YamlError(f"expected `key: value`, got {content!r}")
        key, rest = split
        if key in result:
            raise YamlError(f"duplicate key {key!r}")
        index += 1
        if rest:
            result[key] = _inline(rest)
            continue
        if index < len(lines) and lines[index][0] > indent:
            result[key], index = _block(lines, index, lines[index][0])
        elif index < len(lines) and lines[index][0] == indent and lines[index][1][:2] == "- ":
            result[key], index = _sequence(lines, index, indent)
        else:
            result[key] = None
    return result, index


def test_yaml_reader() -> None:
    doc = parse_yaml(
        "a: 1  # c\n"
        "b:\n"
        "  - x\n"
        "  - {k: v, n: {m: [1, '2']}}\n"
        "  - name: n\n"
        '    value: "q#r"\n'
        "c:\n"
        "- 'it''s'\n"
        "d: {}\n"
        'e: ["", no]\n'
        "f:\n"
    )
    assert doc == {
        "a": 1,
        "b": ["x", {"k": "v", "n": {"m": [1, "2"]}}, {"name": "n", "value": "q#r"}],
        "c": ["it's"],
        "d": {},
        "e": ["", "no"],
        "f": None,
    }
    with pytest.raises(YamlError):
        parse_yaml("a: 1\n  b: 2\n")


# --- the compose file and the Kubernetes Job ---------------------------------------------------


def known_variables(agent: str) -> set[str]:
    """The contract's variables, those its rules require by name, and the agent's."""
    contract = load_json(CONTRACT_SCHEMA)
    names = set(contract["properties"])
    for rule in contract.get("allOf", []):
        then = rule.get("then", {})
        names.update(then.get("required", []))
        for choice in then.get("anyOf", []):  # "one of these must be set"
            names.update(choice.get("required", []))
    names.update(agent_schema(agent)["properties"])
    return names


def validate_env(agent: str, variables: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    env = tool_env()
    env.update(variables)
    result = run_baqup(["--validate", "--schema", str(agent_dir(agent) / "agent-schema.json")], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unknown variable" not in result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_compose_example(tmp_path: Path) -> None:
    compose = parse_yaml((REPO / "examples" / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    backup = services["backup"]
    schema = agent_schema("agent-postgres")
    meta = schema["x-baqup-agent"]
    assert backup["image"] == f"ghcr.io/baqup/agent-postgres:{meta['version']}"
    assert backup["command"] == ["snapshot"]
    assert "snapshot" in meta["roles"]
    environment: dict[str, Any] = backup["environment"]
    assert all(isinstance(v, str) for v in environment.values()), environment
    baqup = {k: v for k, v in environment.items() if k.startswith("BAQUP_")}
    assert set(baqup) <= known_variables("agent-postgres"), set(baqup) - known_variables(
        "agent-postgres"
    )
    assert set(schema["required"]) <= set(baqup)
    # the names it refers to exist in the file
    assert urlsplit(baqup["BAQUP_BUS_URL"]).hostname in services
    assert baqup["BAQUP_SOURCE_HOST"] in services
    assert set(backup["depends_on"]) == {"redis", baqup["BAQUP_SOURCE_HOST"]}
    db = services[baqup["BAQUP_SOURCE_HOST"]]["environment"]
    assert db["POSTGRES_DB"] == baqup["BAQUP_SOURCE_DATABASE"]
    assert db["POSTGRES_PASSWORD"] == baqup["BAQUP_SECRET_DB_PASSWORD"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in backup["volumes"]}
    assert baqup["BAQUP_STAGING_DIR"] in mounts
    assert mounts[baqup["BAQUP_STAGING_DIR"]] in compose["volumes"]
    assert baqup["BAQUP_BUS_FALLBACK_DIR"].startswith(baqup["BAQUP_STAGING_DIR"] + "/")
    assert backup["read_only"] is True
    assert validate_env("agent-postgres", baqup, tmp_path)["valid"] is True


def test_kubernetes_job_example(tmp_path: Path) -> None:
    job = parse_yaml((REPO / "examples" / "kubernetes" / "backup-job.yaml").read_text())
    assert job["apiVersion"] == "batch/v1"
    assert job["kind"] == "Job"
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    meta = agent_schema("agent-fs")["x-baqup-agent"]
    assert container["image"] == f"ghcr.io/baqup/agent-fs:{meta['version']}"
    assert container["args"] == ["snapshot"]
    base_user = final_stage(BASE_DOCKERFILE).last("USER")
    assert base_user is not None
    uid, _, gid = base_user.words[0].partition(":")
    assert pod["securityContext"]["runAsUser"] == int(uid)
    assert pod["securityContext"]["runAsGroup"] == int(gid)
    assert pod["securityContext"]["runAsNonRoot"] is True
    variables: dict[str, str] = {}
    for entry in container["env"]:
        name = entry["name"]
        if "value" in entry:
            assert isinstance(entry["value"], str), name
            variables[name] = entry["value"]
        else:
            assert set(entry["valueFrom"]) == {"secretKeyRef"}, name
            assert name.startswith("BAQUP_SECRET_"), f"{name} comes from a Secret but is no secret"
            variables[name] = "ab" * 32  # what the Secret would hold: a 32-byte hex key
    names = set(variables)
    assert names <= known_variables("agent-fs"), names - known_variables("agent-fs")
    assert set(agent_schema("agent-fs")["required"]) <= names
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert variables["BAQUP_STAGING_DIR"] in mounts
    assert variables["BAQUP_SOURCE_PATH"] in mounts
    assert mounts[variables["BAQUP_SOURCE_PATH"]].get("readOnly") is True
    assert variables["BAQUP_BUS_FALLBACK_DIR"].startswith(variables["BAQUP_STAGING_DIR"] + "/")
    volume_names = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= volume_names
    assert validate_env("agent-fs", variables, tmp_path)["valid"] is True
