"""Registry client: an image's labels and schema through the OCI distribution API.

Owns what a controller needs to pre-flight a job without pulling its image (spec
section 8, INTERFACE.md section 15): registry credentials, the `GET /v2/` probe and
its challenge (Basic, or the Bearer token flow), Docker and OCI manifests, indexes
resolved to a platform, the config blob's `config.Labels`, and a cache per digest
under `$XDG_CACHE_HOME/baqup/images/`. Every manifest and blob read is checked
against its sha256 digest. Never: download a layer, speak plain HTTP unless asked
(`insecure`), forward an Authorization header to another origin, or show a
password or token in a message. The pure parsers live in `oci.py`, the HTTP rules
(retries, redirects, TLS) in `oci_http.py`.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BaqupError, ConfigError, DataError, ResourceUnavailable
from .oci import (
    ACCEPT,
    DIGEST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    Challenge,
    ImageRef,
    Platform,
    api_host,
    parse_challenge,
    parse_image,
    parse_platform,
    registry_name,
    sha256_digest,
)
from .secret import Redactor, Secret

if TYPE_CHECKING:
    from .config import Config
    from .oci_http import Response

USERNAME_ENV = "BAQUP_REGISTRY_USERNAME"
PASSWORD_ENV = "BAQUP_SECRET_REGISTRY_PASSWORD"  # noqa: S105 - a variable name
DEFAULT_PLATFORM = "linux/amd64"
SCHEMA_LABEL = "io.baqup.schema"

# A manifest or an image config is a few kilobytes; these bounds only stop a hostile
# registry from making us buffer a layer-sized answer.
MANIFEST_LIMIT = 4 * 1024 * 1024
CONFIG_LIMIT = 16 * 1024 * 1024

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
    return registry_name(host)


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
        self.host = api_host(registry)
        self.credentials = credentials
        self.redactor = Redactor()
        if credentials:
            self.redactor.add(credentials.password, credentials.basic())
        from .oci_http import Transport  # http.client and ssl: only when we go online

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

    def __exit__(self, kind: object, error: BaseException | None, trace: object) -> None:
        self.close()
        if isinstance(error, BaqupError):
            # The one place every message of this client passes: a hostile registry may
            # echo what it was sent (a password, a token) back into an error.
            error.message = self.redactor.redact(error.message)
            error.args = (error.message,)

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
        fresh = parse_challenge(response.header("www-authenticate"))
        if response.status == 401 and fresh is not None and fresh != self._challenge:
            # A registry may let /v2/ through anonymously yet challenge a repository, or
            # ask for a wider token: one more try, as the new challenge asks. The same
            # challenge again means the credentials themselves were refused.
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

        from .oci_http import origin

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
        claimed = response.header("docker-content-digest")
        if response.status != 200 or not DIGEST.fullmatch(claimed):
            return None  # the GET that follows reports the error, or does without HEAD
        return claimed

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
            hint = "" if self.credentials else f": set {USERNAME_ENV} and {PASSWORD_ENV}"
            raise ConfigError(
                f"registry {self.registry} denied access to {image} {who} "
                f"(HTTP {response.status}{codes}){hint}",
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
        if declared.get("os") != "unknown":  # buildx attestations are not images
            available.append(
                str(Platform(str(declared.get("os")), str(declared.get("architecture"))))
            )
        digest = entry.get("digest")
        if platform.matches(declared) and isinstance(digest, str) and DIGEST.fullmatch(digest):
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
    if not isinstance(config_digest, str) or not DIGEST.fullmatch(config_digest):
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
        ref.registry, credentials=credentials, insecure=insecure, timeout=timeout, retries=retries
    ) as client:
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
