"""Registry client: an image's labels and schema through the OCI distribution API.

Owns what a controller needs to pre-flight a job without pulling its image (spec
section 8, INTERFACE.md section 15): image references, registry credentials, the
`GET /v2/` probe and its challenge (Basic, or the Bearer token flow), Docker and OCI
manifests, indexes resolved to a platform, the config blob's `config.Labels`, and a
cache per digest under `$XDG_CACHE_HOME/baqup/images/`. Every manifest and blob read
is checked against its sha256 digest. Never: download a layer, speak plain HTTP
unless asked (`insecure`), forward an Authorization header to another origin, or
show a password or token in a message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, DataError, ResourceUnavailable, UsageError
from .oci_http import Response, Transport, origin
from .secret import Redactor, Secret

if TYPE_CHECKING:
    from .config import Config

USERNAME_ENV = "BAQUP_REGISTRY_USERNAME"
PASSWORD_ENV = "BAQUP_SECRET_REGISTRY_PASSWORD"  # noqa: S105 - a variable name
DEFAULT_PLATFORM = "linux/amd64"
SCHEMA_LABEL = "io.baqup.schema"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))

# A manifest or an image config is a few kilobytes; these bounds only stop a hostile
# registry from making us buffer a layer-sized answer.
MANIFEST_LIMIT = 4 * 1024 * 1024
CONFIG_LIMIT = 16 * 1024 * 1024

_DOCKER_HUB = "docker.io"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_CHALLENGE_PARAM = re.compile(
    r'\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?'
)


# ---------------------------------------------------------------------------
# pure parsers


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
        return "registry-1.docker.io" if self.registry == _DOCKER_HUB else self.registry

    def __str__(self) -> str:
        tail = f":{self.tag}" if self.tag else ""
        return f"{self.registry}/{self.repository}{tail}{f'@{self.digest}' if self.digest else ''}"


def parse_image(text: str) -> ImageRef:
    """Parse an image reference the way `docker pull` does; UsageError when malformed."""

    def bad(why: str) -> UsageError:
        return UsageError(f"invalid image reference {text!r}: {why}")

    name, _, digest = text.partition("@")
    if digest and not _DIGEST.fullmatch(digest):
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
        registry, repository = _DOCKER_HUB, name
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = _DOCKER_HUB
    if registry == _DOCKER_HUB and "/" not in repository:
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


# ---------------------------------------------------------------------------
# credentials


@dataclass(frozen=True)
class Credentials:
    username: str
    password: Secret
    source: str  # where they came from, for messages: never the value

    def basic(self) -> Secret:
        raw = f"{self.username}:{self.password.reveal()}".encode()
        return Secret("Basic " + base64.b64encode(raw).decode("ascii"))


def _config_key_host(key: str) -> str:
    host = key.split("://", 1)[-1].split("/", 1)[0]
    return _DOCKER_HUB if host in ("index.docker.io", "registry-1.docker.io") else host


def find_credentials(registry: str, environ: Mapping[str, str]) -> Credentials | None:
    """`$BAQUP_REGISTRY_USERNAME` + `$BAQUP_SECRET_REGISTRY_PASSWORD`, else the Docker
    config's `auths` entry for `registry` (`$DOCKER_CONFIG/config.json`, else
    `~/.docker/config.json`), else None (anonymous)."""
    username, password = environ.get(USERNAME_ENV), environ.get(PASSWORD_ENV)
    if username or password:
        if not (username and password):
            missing = PASSWORD_ENV if username else USERNAME_ENV
            raise ConfigError(f"{missing} is required when the other registry credential is set")
        return Credentials(username, Secret(password), USERNAME_ENV)
    home = environ.get("HOME") or os.path.expanduser("~")
    directory = environ.get("DOCKER_CONFIG") or os.path.join(home, ".docker")
    path = Path(directory) / "config.json"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as JSON: {exc}") from None
    auths = document.get("auths") if isinstance(document, dict) else None
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        if _config_key_host(str(key)) != registry or not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                raise ConfigError(
                    f"{path}: auths[{key!r}].auth is not base64 of USER:PASSWORD"
                ) from None
            user, sep, secret = decoded.partition(":")
            if not sep or not user:
                raise ConfigError(f"{path}: auths[{key!r}].auth is not base64 of USER:PASSWORD")
            return Credentials(user, Secret(secret), str(path))
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], Secret(entry["password"]), str(path))
    return None


# ---------------------------------------------------------------------------
# the client


class RegistryClient:
    """One registry, one repository scope at a time: probe, authenticate, read."""

    def __init__(
        self,
        registry: str,
        *,
        credentials: Credentials | None = None,
        insecure: bool = False,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.2,
    ) -> None:
        self.registry = registry
        self.host = "registry-1.docker.io" if registry == _DOCKER_HUB else registry
        self.credentials = credentials
        self.redactor = Redactor()
        if credentials:
            self.redactor.add(credentials.password, credentials.basic())
        self.transport = Transport(
            insecure=insecure,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            redactor=self.redactor,
        )
        self.base: str | None = None
        self._challenge: Challenge | None = None
        self._authorization: dict[str, Secret] = {}  # per scope

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def probe(self) -> None:
        """`GET /v2/`: which scheme answers, and which challenge (if any) it sets."""
        if self.base is not None:
            return
        scheme = self.transport.scheme_for(self.host)
        base = f"{scheme}://{self.host}"
        response = self.transport.request("GET", f"{base}/v2/", {}, limit=64 * 1024)
        if response.status == 401:
            self._challenge = parse_challenge(response.header("www-authenticate"))
            if self._challenge is None:
                raise DataError(f"registry {self.registry} answered 401 without a usable challenge")
        elif response.status != 200:
            raise self._unexpected(response, "probe the API (GET /v2/)")
        self.base = base

    def get(
        self, repository: str, path: str, *, accept: str | None, limit: int, method: str = "GET"
    ) -> Response:
        """GET (or HEAD) under /v2/<repository>/, authorized for pulling it."""
        self.probe()
        scope = f"repository:{repository}:pull"
        url = f"{self.base}/v2/{repository}/{path}"
        headers = {"Accept": accept} if accept else {}
        response = self.transport.request(
            method, url, {**headers, **self._auth_header(scope)}, limit=limit
        )
        if response.status == 401 and self._challenge is not None:
            # A token can expire or be too narrow: one fresh one, as the challenge asks.
            fresh = parse_challenge(response.header("www-authenticate"))
            if fresh is not None:
                self._challenge = fresh
            self._authorization.pop(scope, None)
            response = self.transport.request(
                method, url, {**headers, **self._auth_header(scope)}, limit=limit
            )
        return response

    def _auth_header(self, scope: str) -> dict[str, str]:
        challenge = self._challenge
        if challenge is None:
            return {}
        if scope not in self._authorization:
            if challenge.scheme == "basic":
                if self.credentials is None:
                    raise ConfigError(
                        f"registry {self.registry} requires credentials: set {USERNAME_ENV} "
                        f"and {PASSWORD_ENV}, or log in (~/.docker/config.json)"
                    )
                self._authorization[scope] = self.credentials.basic()
            else:
                self._authorization[scope] = self._token(challenge, scope)
        return {"Authorization": self._authorization[scope].reveal()}

    def _token(self, challenge: Challenge, scope: str) -> Secret:
        """The Bearer token flow: GET realm?service=...&scope=..., with Basic if we have it."""
        from urllib.parse import urlencode

        realm = challenge.params.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise DataError(f"registry {self.registry} gave a token realm that is not a URL")
        query = {"scope": scope}
        if challenge.params.get("service"):
            query["service"] = challenge.params["service"]
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        headers = {"Authorization": self.credentials.basic().reveal()} if self.credentials else {}
        response = self.transport.request("GET", url, headers, limit=1024 * 1024)
        who = f" as {self.credentials.username}" if self.credentials else " anonymously"
        if response.status in (401, 403):
            raise ConfigError(
                f"the token server of {self.registry} ({origin(realm)}) refused access to "
                f"{scope}{who} (HTTP {response.status})"
            )
        if response.status != 200:
            raise self._unexpected(response, f"get a token from {origin(realm)}")
        try:
            document = json.loads(response.body)
            token = document.get("token") or document.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise DataError(f"the token server of {self.registry} answered without a token")
        secret = Secret(f"Bearer {token}")
        self.redactor.add(token)
        return secret

    def manifest(self, image: ImageRef, reference: str) -> tuple[str, dict[str, Any]]:
        """The manifest (or index) `reference` names: its verified digest and document."""
        response = self.get(
            image.repository, f"manifests/{reference}", accept=ACCEPT, limit=MANIFEST_LIMIT
        )
        self._check(response, image, f"manifest {reference}")
        digest = sha256_digest(response.body)
        claimed = response.header("docker-content-digest")
        expected = reference if reference.startswith("sha256:") else claimed
        if expected and expected.startswith("sha256:") and expected != digest:
            raise DataError(
                f"manifest {reference} of {image}: its bytes hash to {digest}, not {expected}"
            )
        try:
            document = json.loads(response.body)
        except ValueError as exc:
            raise DataError(f"manifest {reference} of {image} is not JSON: {exc}") from None
        if not isinstance(document, dict):
            raise DataError(f"manifest {reference} of {image} is not a JSON object")
        document.setdefault("mediaType", response.header("content-type").split(";")[0].strip())
        return digest, document

    def manifest_digest(self, image: ImageRef) -> str | None:
        """What the tag points at now (HEAD), or None when the registry does not say."""
        response = self.get(
            image.repository,
            f"manifests/{image.reference}",
            accept=ACCEPT,
            limit=0,
            method="HEAD",
        )
        self._check(response, image, f"manifest {image.reference}")
        claimed = response.header("docker-content-digest")
        return claimed if _DIGEST.fullmatch(claimed) else None

    def blob(self, image: ImageRef, digest: str, size: int | None, limit: int) -> bytes:
        """A blob, checked against its digest (and size): redirects are followed."""
        if size is not None and size > limit:
            raise DataError(f"blob {digest} of {image} is {size} bytes, over the {limit} limit")
        response = self.get(image.repository, f"blobs/{digest}", accept=None, limit=limit)
        self._check(response, image, f"blob {digest}")
        actual = sha256_digest(response.body)
        if actual != digest:
            raise DataError(f"blob {digest} of {image}: its bytes hash to {actual}")
        if size is not None and len(response.body) != size:
            raise DataError(f"blob {digest} of {image} is {len(response.body)} bytes, not {size}")
        return response.body

    def _check(self, response: Response, image: ImageRef, what: str) -> None:
        if response.status == 200:
            return
        codes = response.error_codes()
        if response.status == 404:
            raise ConfigError(f"image {image} not found: no {what}{codes}", code="IMAGE_NOT_FOUND")
        if response.status in (401, 403):
            who = f"as {self.credentials.username}" if self.credentials else "anonymously"
            raise ConfigError(
                f"registry {self.registry} denied access to {image} {who} "
                f"(HTTP {response.status}{codes})",
                code="REGISTRY_DENIED",
            )
        raise self._unexpected(response, f"read {what} of {image}")

    def _unexpected(self, response: Response, what: str) -> DataError | ResourceUnavailable:
        message = f"registry {self.registry}: cannot {what}: HTTP {response.status}"
        message = self.redactor.redact(message + response.error_codes())
        if response.status == 429 or response.status >= 500:
            return ResourceUnavailable(message)
        return DataError(message)


# ---------------------------------------------------------------------------
# images


@dataclass(frozen=True)
class ImageInfo:
    """What the registry says about one image: digests and the config's labels."""

    image: str
    digest: str  # what the reference resolved to (an index's digest for a multi-arch image)
    manifest_digest: str  # the platform's image manifest
    config_digest: str
    platform: str
    labels: Mapping[str, str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "manifest_digest": self.manifest_digest,
            "config_digest": self.config_digest,
            "platform": self.platform,
            "labels": dict(self.labels),
        }


def _select(index: Mapping[str, Any], platform: Platform, image: ImageRef) -> str:
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise DataError(f"index of {image} has no manifests list")
    available = []
    for entry in entries:
        declared = entry.get("platform") if isinstance(entry, dict) else None
        if not isinstance(declared, dict):
            continue
        available.append(str(Platform(str(declared.get("os")), str(declared.get("architecture")))))
        digest = entry.get("digest")
        if platform.matches(declared) and isinstance(digest, str) and _DIGEST.fullmatch(digest):
            return digest
    raise ConfigError(
        f"image {image} has no manifest for platform {platform} "
        f"(available: {', '.join(available) or 'none'})",
        code="PLATFORM_NOT_FOUND",
    )


def fetch_image(client: RegistryClient, image: ImageRef, platform: Platform) -> ImageInfo:
    """Manifest (index resolved to `platform`), then the config blob: never a layer."""
    digest, document = client.manifest(image, image.reference)
    manifest_digest, manifest = digest, document
    if document.get("mediaType") in INDEX_TYPES or "manifests" in document:
        manifest_digest = _select(document, platform, image)
        _, manifest = client.manifest(image, manifest_digest)
    kind = manifest.get("mediaType")
    config = manifest.get("config")
    if kind not in MANIFEST_TYPES or not isinstance(config, dict):
        raise DataError(f"image {image}: unsupported manifest type {kind!r}")
    config_digest, size = config.get("digest"), config.get("size")
    if not isinstance(config_digest, str) or not _DIGEST.fullmatch(config_digest):
        raise DataError(f"image {image}: the config descriptor has no sha256 digest")
    body = client.blob(image, config_digest, size if isinstance(size, int) else None, CONFIG_LIMIT)
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise DataError(f"image {image}: the config blob is not JSON: {exc}") from None
    inner = document.get("config") if isinstance(document, dict) else None
    labels = inner.get("Labels") if isinstance(inner, dict) else None
    labels = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}
    return ImageInfo(str(image), digest, manifest_digest, config_digest, str(platform), labels)


def cache_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CACHE_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".cache"
    )
    return Path(base) / "baqup" / "images"


def _cache_file(directory: Path, digest: str, platform: str) -> Path:
    return directory / f"{digest.replace(':', '-')}.{platform.replace('/', '-')}.json"


def _cache_read(path: Path, image: str) -> ImageInfo | None:
    """A cached entry, or None: a missing or damaged cache is only a miss."""
    try:
        entry = json.loads(path.read_bytes())
        return ImageInfo(
            image,
            str(entry["digest"]),
            str(entry["manifest_digest"]),
            str(entry["config_digest"]),
            str(entry["platform"]),
            {str(k): str(v) for k, v in dict(entry["labels"]).items()},
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cache_write(path: Path, info: ImageInfo) -> None:
    """Atomic and best effort: a cache that cannot be written costs a fetch, not a failure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            handle.write(json.dumps(info.as_dict()).encode())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def resolve_image(
    image: str | ImageRef,
    *,
    platform: str = DEFAULT_PLATFORM,
    insecure: bool = False,
    environ: Mapping[str, str] | None = None,
    cache: Path | None = None,
    timeout: float = 10.0,
    retries: int = 3,
) -> ImageInfo:
    """The image's digests and labels: a tag is re-resolved each time, a digest read once.

    `environ` supplies the credentials and the cache location (default: os.environ).
    """
    env = os.environ if environ is None else environ
    ref = parse_image(image) if isinstance(image, str) else image
    wanted = parse_platform(platform)
    directory = cache_dir(env) if cache is None else cache
    if ref.digest:
        cached = _cache_read(_cache_file(directory, ref.digest, str(wanted)), str(ref))
        if cached is not None:
            return cached
    credentials = find_credentials(ref.registry, env)
    with RegistryClient(
        ref.api_host, credentials=credentials, insecure=insecure, timeout=timeout, retries=retries
    ) as client:
        client.registry = ref.registry
        if not ref.digest:
            current = client.manifest_digest(ref)
            if current is not None:
                cached = _cache_read(_cache_file(directory, current, str(wanted)), str(ref))
                if cached is not None:
                    return cached
        info = fetch_image(client, ref, wanted)
    _cache_write(_cache_file(directory, info.digest, str(wanted)), info)
    return info


def image_schema(info: ImageInfo) -> dict[str, Any]:
    """The `io.baqup.schema` label, parsed and checked as an agent schema (else exit 65)."""
    from .config import check_agent_schema

    text = info.labels.get(SCHEMA_LABEL)
    if text is None:
        raise DataError(f"image {info.image} has no {SCHEMA_LABEL} label: not a baqup agent")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"image {info.image}: label {SCHEMA_LABEL} is not valid JSON: {exc.msg} at "
            f"line {exc.lineno} column {exc.colno}"
        ) from None
    try:
        return check_agent_schema(schema, f"image {info.image} label {SCHEMA_LABEL}")
    except ConfigError as exc:
        raise DataError(exc.message, code="SCHEMA_INVALID") from None


def image_description(info: ImageInfo, schema: Mapping[str, Any]) -> dict[str, Any]:
    """What the image's `--info` would say of the agent, from its labels and schema."""
    from .info import agent_name, agent_version, roles

    meta = schema.get("x-baqup-agent")
    meta = meta if isinstance(meta, Mapping) else {}
    declared_roles = info.labels.get("io.baqup.roles")
    described: dict[str, Any] = {
        "agent": agent_name(meta),
        "type": info.labels.get("io.baqup.type"),
        "version": info.labels.get("io.baqup.version") or agent_version(meta),
        "roles": declared_roles.split(",") if declared_roles else roles(meta),
        "capabilities": dict(meta.get("capabilities") or {}),
        "requirements": dict(meta.get("requirements") or {}),
    }
    return described


def inspect_image(image: str | ImageRef, **options: Any) -> dict[str, Any]:
    """The `baqup inspect` document: image, digest, labels, schema, info."""
    info = resolve_image(image, **options)
    schema = image_schema(info)
    return {
        "image": info.image,
        "digest": info.digest,
        "labels": dict(info.labels),
        "schema": schema,
        "info": image_description(info, schema),
    }


def preflight(
    image: str | ImageRef,
    job_environ: Mapping[str, str],
    **options: Any,
) -> tuple[ImageInfo, Config]:
    """Validate a job's environment against the image's schema, as `--validate` would
    inside it, minus the checks of a filesystem that is not the container's.

    `options` are `resolve_image`'s (credentials come from its `environ`, never from
    `job_environ`). The Config's `problems` are the answer; nothing is raised for them.
    """
    from .config import load_config

    info = resolve_image(image, **options)
    return info, load_config(job_environ, agent_schema=image_schema(info))


__all__ = [
    "DEFAULT_PLATFORM",
    "Credentials",
    "ImageInfo",
    "ImageRef",
    "Platform",
    "RegistryClient",
    "find_credentials",
    "image_schema",
    "inspect_image",
    "parse_challenge",
    "parse_image",
    "parse_platform",
    "preflight",
    "resolve_image",
]
