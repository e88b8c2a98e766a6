"""What the agent base image installs, and from where (docker/lock.sh, Dockerfile.base).

The runtime lock holds exactly the runtime dependencies with the crypto and lz4
extras and their transitive set (resolved here from the installed metadata, with the
markers of the image's Python on Linux), each pinned at a version every dependent
accepts and the tests run with, each with sha256 hashes; the build lock pins the
build system the same way. Dockerfile.base installs both with --require-hashes, FROM
an image pinned by digest with its tag beside it (the default of its PYTHON_BASE build
argument), and the package version is written once (baqup_supervisor.__version__).
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import baqup_supervisor
from tests.conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 has no tomllib; pip vendors tomli
    from pip._vendor import tomli as tomllib

RUNTIME_LOCK = REPO / "docker" / "requirements.lock"
BUILD_LOCK = REPO / "docker" / "build-requirements.lock"
DOCKERFILE = REPO / "Dockerfile.base"
EXTRAS = ("crypto", "lz4")
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def lock_entries(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (pinned version, hashes) of a pip-compile lock; asserts its shape."""
    entries: dict[str, tuple[str, list[str]]] = {}
    logical: list[str] = []
    for raw in [*path.read_text().splitlines(), ""]:
        line = raw.split("#", 1)[0].strip()
        if line.endswith("\\"):
            logical.append(line[:-1].strip())
            continue
        logical.append(line)
        words = " ".join(logical).split()
        logical = []
        if not words:
            continue
        requirement, *options = words
        name, sep, version = requirement.partition("==")
        assert sep, f"{path.name}: {requirement!r} is not pinned with =="
        assert not set("<>=!~;[") & set(version), f"{path.name}: {requirement!r}"
        hashes = [o for o in options if HASH.fullmatch(o)]
        assert hashes == options, f"{path.name}: {name}: unexpected {options}"
        assert hashes, f"{path.name}: {name} has no hash"
        entries[canonicalize_name(name)] = (version, hashes)
    return entries


def lock_pins(path: Path = RUNTIME_LOCK) -> dict[str, str]:
    return {name: version for name, (version, _) in lock_entries(path).items()}


def pinned_base() -> str:
    """The image Dockerfile.base is FROM: the default of its PYTHON_BASE build argument (the
    container tests override it with a local stand-in), which the one FROM line uses."""
    lines = DOCKERFILE.read_text().splitlines()
    (line,) = [ln for ln in lines if ln.startswith("FROM ")]
    assert line == "FROM ${PYTHON_BASE}", line
    (default,) = [
        ln.removeprefix("ARG PYTHON_BASE=") for ln in lines if ln.startswith("ARG PYTHON_BASE=")
    ]
    assert lines.index(f"ARG PYTHON_BASE={default}") < lines.index(line)
    return default


def image_environment(extra: str = "") -> dict[str, str]:
    """PEP 508 marker values of the image: its Python (from the pinned base), Linux x86-64."""
    (version,) = re.findall(r"^python:(\d+\.\d+)", pinned_base())
    return {
        "python_version": version,
        "python_full_version": f"{version}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "platform_machine": "x86_64",
        "extra": extra,
    }


def runtime_closure() -> dict[str, list[Requirement]]:
    """Every distribution the image needs -> the requirements that ask for it."""
    wanted: dict[str, list[Requirement]] = {}
    pending: list[tuple[str, set[str]]] = [("baqup-supervisor", set(EXTRAS))]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, extras = pending.pop()
        if (name, frozenset(extras)) in seen:
            continue
        seen.add((name, frozenset(extras)))
        for spec in importlib.metadata.requires(name) or []:
            requirement = Requirement(spec)
            marker = requirement.marker
            if marker is not None and not any(
                marker.evaluate(image_environment(extra)) for extra in {"", *extras}
            ):
                continue
            dependency = canonicalize_name(requirement.name)
            wanted.setdefault(dependency, []).append(requirement)
            pending.append((dependency, set(requirement.extras)))
    return wanted


# --- the runtime lock --------------------------------------------------------------------------


def test_the_runtime_lock_is_exactly_the_runtime_closure() -> None:
    closure = runtime_closure()
    pins = lock_pins()
    assert sorted(pins) == sorted(closure)
    # the extras really are in: their packages, not only the base dependencies
    assert {"cryptography", "lz4", "cffi"} <= set(pins)
    assert not {"pytest", "mypy", "ruff", "hypothesis", "opentelemetry-sdk"} & set(pins)
    for name, requirements in closure.items():
        for requirement in requirements:
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"{name}=={pins[name]} does not satisfy {requirement}"
            )


def test_the_runtime_lock_is_what_the_tests_run_with() -> None:
    for name, version in lock_pins().items():
        assert importlib.metadata.version(name) == version, f"{name}: venv vs lock"


def test_every_locked_package_has_hashes() -> None:
    for path in (RUNTIME_LOCK, BUILD_LOCK):
        entries = lock_entries(path)
        assert entries
        for name, (_, hashes) in entries.items():
            assert len(set(hashes)) == len(hashes), f"{path.name}: {name} repeats a hash"
        text = path.read_text()
        assert "://" not in text  # no index URL: pip's configuration says where from


def test_the_lock_parser_refuses_what_require_hashes_would(tmp_path: Path) -> None:
    bad = tmp_path / "bad.lock"
    for text in ("attrs==1.0\n", "attrs>=1.0 \\\n    --hash=sha256:" + "a" * 64 + "\n"):
        bad.write_text(text)
        try:
            lock_entries(bad)
        except AssertionError:
            continue
        raise AssertionError(f"accepted {text!r}")


# --- the build lock ----------------------------------------------------------------------------


def test_the_build_lock_pins_the_build_system() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = lock_pins(BUILD_LOCK)
    for spec in pyproject["build-system"]["requires"]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} of build-system.requires is not in {BUILD_LOCK.name}"
        assert requirement.specifier.contains(pins[name])
    assert not set(pins) & set(lock_pins())  # the build system never reaches the runtime


# --- Dockerfile.base --------------------------------------------------------------------------


def test_the_base_image_is_pinned_by_digest_with_its_tag() -> None:
    text = DOCKERFILE.read_text()
    base = pinned_base()
    match = re.fullmatch(r"(python:[\w.-]+)@sha256:([0-9a-f]{64})", base)
    assert match, base
    tag = match.group(1)
    assert tag == "python:3.12-slim-bookworm"
    comments = [ln for ln in text.splitlines() if ln.startswith("#")]
    assert any(tag in c for c in comments), "the tag the digest stands for is not said"


def test_every_download_is_checked_against_a_hash() -> None:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    runs = [ln for ln in text.splitlines() if ln.startswith("RUN ")]
    installs = [c.strip() for run in runs for c in run[4:].split("&&") if " install " in c]
    assert installs
    for command in installs:
        if "pip" not in command:
            continue
        assert "--no-deps" in command, command
        if "--require-hashes" in command:
            assert re.search(r"-r /tmp/(build-)?requirements\.lock\b", command), command
        else:  # only the wheel built in the image from the build context
            assert re.search(r"install --no-deps /tmp/wheel/\S+\.whl$", command), command
    assert "--no-build-isolation" in text  # else pip fetches setuptools unhashed
    locks = re.findall(r"COPY ([^\n]*requirements\.lock[^\n]*)", text)
    assert locks == ["docker/requirements.lock docker/build-requirements.lock /tmp/"]


# --- the version, written once -------------------------------------------------------------------


def test_the_version_is_written_once() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    dynamic = pyproject["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "baqup_supervisor.__version__"}
    Version(baqup_supervisor.__version__)  # a valid version
    assert importlib.metadata.version("baqup-supervisor") == baqup_supervisor.__version__
    init = (REPO / "baqup_supervisor" / "__init__.py").read_text()
    # a literal, so setuptools reads it without importing the package
    assert re.search(r'^__version__ = "[^"]+"$', init, re.MULTILINE)
