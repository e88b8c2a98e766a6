"""OCI vocabulary, pure: media types, image references, platforms, auth challenges.

Owns the parsing of what a user or a registry writes (`ghcr.io/baqup/agent-fs:1.2`,
`linux/arm64/v8`, `Bearer realm="...",scope="..."`), with Docker's defaults. No I/O:
these take untrusted text, so they stay testable on their own (STYLE habit 4).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))

DOCKER_HUB = "docker.io"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_CHALLENGE_PARAM = re.compile(
    r'\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?'
)


# ---------------------------------------------------------------------------
# pure parsers


def registry_name(host: str) -> str:
    """Docker Hub's several host names as one (`docker.io`): for credentials and messages."""
    return DOCKER_HUB if host in ("index.docker.io", "registry-1.docker.io") else host


def api_host(registry: str) -> str:
    """Where a registry's API answers: Docker Hub's is not at `docker.io`."""
    return "registry-1.docker.io" if registry == DOCKER_HUB else registry


@dataclass(frozen=True)
class ImageRef:
    """`registry/repository[:tag][@digest]`, with Docker's defaults applied."""

    registry: str  # host[:port] as written (docker.io for Docker Hub)
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def api_host(self) -> str:
        return api_host(self.registry)

    def __str__(self) -> str:
        tail = f":{self.tag}" if self.tag else ""
        return f"{self.registry}/{self.repository}{tail}{f'@{self.digest}' if self.digest else ''}"


def parse_image(text: str) -> ImageRef:
    """Parse an image reference the way `docker pull` does; UsageError when malformed."""

    def bad(why: str) -> UsageError:
        return UsageError(f"invalid image reference {text!r}: {why}")

    name, _, digest = text.partition("@")
    if digest and not DIGEST.fullmatch(digest):
        raise bad("the digest must be sha256: and 64 lowercase hex digits")
    slash = name.rfind("/")
    tag: str | None = None
    if ":" in name[slash + 1 :]:
        name, tag = name.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise bad(f"the tag {tag!r} is not a valid tag")
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
    else:
        registry, repository = DOCKER_HUB, name
    registry = registry_name(registry)
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if not _REPOSITORY.fullmatch(repository):
        raise bad("the repository must be lowercase components separated by '/'")
    if tag is None and not digest:
        tag = "latest"
    return ImageRef(registry, repository, tag, digest or None)


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def matches(self, declared: Mapping[str, Any]) -> bool:
        if declared.get("os") != self.os or declared.get("architecture") != self.architecture:
            return False
        return self.variant is None or declared.get("variant") == self.variant


def parse_platform(text: str) -> Platform:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(re.fullmatch(r"[a-z0-9_.-]+", p) for p in parts):
        raise UsageError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


@dataclass(frozen=True)
class Challenge:
    """A `WWW-Authenticate` challenge: the scheme (lowercase) and its parameters."""

    scheme: str
    params: Mapping[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """`Bearer realm="...",service="...",scope="..."` or `Basic realm="..."`; None if neither."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    for match in _CHALLENGE_PARAM.finditer(rest):
        value = match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[match.group(1).lower()] = value
    if scheme.lower() not in ("basic", "bearer"):
        return None
    return Challenge(scheme.lower(), params)


def sha256_digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"
