"""Real registry machinery for tests/test_registry.py: nothing here is a fake registry.

- `start_registry`: Debian's `docker-registry` (CNCF distribution 2.8) on a free
  127.0.0.1 port, configured by a file written here (storage in a temp dir; no auth,
  htpasswd, or token auth), access log captured, stopped by its PID.
- `TokenServer`: a bearer-token issuer the registry trusts (RS256 JWTs whose `x5c`
  header carries a certificate made here with `cryptography`).
- `push_image` / `push_index`: images pushed through the registry's own upload API
  (POST /v2/<name>/blobs/uploads/, PUT ?digest=, PUT manifests/<tag>), a fake layer
  included, so a test can prove the client never asks for it.
- `Server`: a small HTTP server of the test, in front of the registry (forwarding,
  except where its `rule` answers instead) or on its own; it records every request.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.conftest import free_port, stop_pid

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
SERVICE = "baqup-test-registry"
ISSUER = "baqup-test-issuer"


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


# ---------------------------------------------------------------------------
# the registry process


@dataclass
class Registry:
    port: int
    process: subprocess.Popen[bytes]
    directory: Path
    log: Path
    scheme: str = "http"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def access_log(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        stop_pid(self.process)


def start_registry(
    directory: Path, auth: Mapping[str, Any] | None = None, tls: tuple[Path, Path] | None = None
) -> Registry:
    """docker-registry on loopback with `auth` (the config's `auth` section) or none,
    over TLS with `tls` (certificate, key), else plain HTTP."""
    binary = shutil.which("docker-registry")
    if binary is None:
        raise RuntimeError("docker-registry is not installed: run ./tests/run (it installs it)")
    directory.mkdir(parents=True, exist_ok=True)
    last = ""
    for _ in range(5):
        port = free_port()
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(directory / "data")}},
            "http": {"addr": f"127.0.0.1:{port}", "secret": uuid.uuid4().hex},
        }
        if auth:
            config["auth"] = dict(auth)
        if tls:
            config["http"]["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
        path = directory / "config.yml"  # JSON is YAML: no YAML writer needed
        path.write_text(json.dumps(config))
        log = directory / f"registry-{port}.log"
        with open(log, "wb") as sink:
            process = subprocess.Popen(
                [binary, "serve", str(path)], stdout=sink, stderr=subprocess.STDOUT
            )
        registry = Registry(port, process, directory, log, "https" if tls else "http")
        context = ssl.create_default_context(cafile=str(tls[0])) if tls else None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"{registry.url}/v2/", timeout=1, context=context):
                    return registry
            except urllib.error.HTTPError:
                return registry  # 401: up, and asking for credentials
            except OSError:
                time.sleep(0.02)
        last = log.read_text(errors="replace")
        stop_pid(process)
    raise RuntimeError(f"docker-registry did not start: {last[-800:]}")


def htpasswd_auth(directory: Path, users: Mapping[str, str]) -> dict[str, Any]:
    """An `auth.htpasswd` section for `users`, hashed with bcrypt by `htpasswd -B`."""
    path = directory / "htpasswd"
    lines = []
    for user, password in users.items():
        done = subprocess.run(
            ["htpasswd", "-nbB", user, password], capture_output=True, text=True, check=True
        )
        lines.append(done.stdout.strip())
    path.write_text("\n".join(lines) + "\n")
    return {"htpasswd": {"realm": "baqup-test", "path": str(path)}}


def tls_files(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own trust anchor) and its key."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.pem", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# ---------------------------------------------------------------------------
# the test's HTTP servers


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: Mapping[str, str]  # lowercase names


Reply = tuple[int, Mapping[str, str], bytes]
Rule = Callable[[Seen], Reply | None]


@dataclass
class Server:
    """An HTTP server on 127.0.0.1: `rule` answers, or the request goes to `upstream`."""

    rule: Rule = field(default=lambda seen: None)
    upstream: str | None = None
    seen: list[Seen] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def host(self) -> str:
        return self.url.removeprefix("http://")

    def start(self) -> Server:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                seen = Seen(
                    self.command, self.path, {k.lower(): v for k, v in self.headers.items()}
                )
                owner.seen.append(seen)
                reply = owner.rule(seen)
                if reply is None and owner.upstream is not None:
                    reply = _forward(owner.upstream, seen, body)
                status, headers, payload = reply or (404, {}, b"")
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_HEAD = do_POST = do_PUT = _any  # noqa: N815 - http.server's names

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]


def _forward(upstream: str, seen: Seen, body: bytes) -> Reply:
    headers = {k: v for k, v in seen.headers.items() if k not in ("host", "connection")}
    request = urllib.request.Request(
        upstream + seen.path, data=body or None, method=seen.method, headers=headers
    )
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=10) as answer:
            return answer.status, dict(answer.headers.items()), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# ---------------------------------------------------------------------------
# the token server


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    """Issues bearer tokens the registry accepts: pull on `public/*` to anyone, pull on
    anything to `users` (a wrong password is refused, 401)."""

    directory: Path
    users: Mapping[str, str] = field(default_factory=dict)
    server: Server = field(init=False)
    issued: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.bundle = self.directory / "token-root.pem"
        self.bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.server = Server(rule=self._answer).start()

    @property
    def realm(self) -> str:
        return f"{self.server.url}/token"

    def auth_config(self) -> dict[str, Any]:
        return {
            "token": {
                "realm": self.realm,
                "service": SERVICE,
                "issuer": ISSUER,
                "rootcertbundle": str(self.bundle),
            }
        }

    def token(self, access: list[dict[str, Any]], subject: str = "") -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 30,
            "iat": now - 30,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        encoded = [_b64url(json.dumps(part).encode()) for part in (header, claims)]
        signing_input = ".".join(encoded)
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        token = f"{signing_input}.{_b64url(signature)}"
        self.issued.append(token)
        return token

    def push_token(self, repository: str) -> str:
        return self.token(
            [{"type": "repository", "name": repository, "actions": ["pull", "push"]}], "pusher"
        )

    def _answer(self, seen: Seen) -> Reply:
        from urllib.parse import parse_qs, urlsplit

        query = parse_qs(urlsplit(seen.path).query)
        user = ""
        authorization = seen.headers.get("authorization", "")
        if authorization.startswith("Basic "):
            user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
            if self.users.get(user) != password:
                return 401, {"WWW-Authenticate": 'Basic realm="token"'}, b"{}"
        if query.get("service") != [SERVICE]:
            return 400, {}, b'{"error": "unknown service"}'
        access = []
        for scope in query.get("scope", []):
            kind, name, _ = scope.split(":")
            if user or name.startswith("public/"):
                access.append({"type": kind, "name": name, "actions": ["pull"]})
        token = self.token(access, user)
        return 200, {"Content-Type": "application/json"}, json.dumps({"token": token}).encode()

    def stop(self) -> None:
        self.server.stop()


# ---------------------------------------------------------------------------
# pushing images through the upload API


def _call(
    method: str,
    url: str,
    body: bytes | None,
    headers: Mapping[str, str],
    context: ssl.SSLContext | None = None,
) -> tuple[int, Mapping[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            return answer.status, dict(answer.headers.items()), answer.read()
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{method} {url}: HTTP {exc.code}: {exc.read()[:300]!r}") from None


def upload_blob(
    base: str,
    repository: str,
    data: bytes,
    auth: Mapping[str, str],
    context: ssl.SSLContext | None = None,
) -> str:
    digest = digest_of(data)
    _, headers, _ = _call("POST", f"{base}/v2/{repository}/blobs/uploads/", b"", auth, context)
    location = urllib.parse.urljoin(base, headers["Location"])
    joiner = "&" if "?" in location else "?"
    _call(
        "PUT",
        f"{location}{joiner}digest={digest}",
        data,
        {**auth, "Content-Type": "application/octet-stream"},
        context,
    )
    return digest


def put_manifest(
    base: str,
    repository: str,
    reference: str,
    document: Mapping[str, Any],
    auth: Mapping[str, str],
    context: ssl.SSLContext | None = None,
) -> str:
    body = json.dumps(document).encode()
    media = str(document["mediaType"])
    _call(
        "PUT",
        f"{base}/v2/{repository}/manifests/{reference}",
        body,
        {**auth, "Content-Type": media},
        context,
    )
    return digest_of(body)


@dataclass(frozen=True)
class Pushed:
    digest: str  # the manifest's
    size: int
    config: str
    layer: str


def push_image(
    base: str,
    repository: str,
    tag: str | None,
    labels: Mapping[str, str],
    *,
    auth: Mapping[str, str] | None = None,
    architecture: str = "amd64",
    media: str = OCI_MANIFEST,
    context: ssl.SSLContext | None = None,
) -> Pushed:
    """A config blob with `labels`, a fake layer nobody may fetch, and their manifest."""
    headers = dict(auth or {})
    config = {
        "architecture": architecture,
        "os": "linux",
        "config": {"Labels": dict(labels), "Cmd": ["baqup-run", "--info"]},
        "rootfs": {"type": "layers", "diff_ids": []},
    }
    config_bytes = json.dumps(config).encode()
    layer_bytes = os.urandom(256)
    config_digest = upload_blob(base, repository, config_bytes, headers, context)
    layer_digest = upload_blob(base, repository, layer_bytes, headers, context)
    config_media = DOCKER_CONFIG if media == DOCKER_MANIFEST else OCI_CONFIG
    manifest = {
        "schemaVersion": 2,
        "mediaType": media,
        "config": {"mediaType": config_media, "digest": config_digest, "size": len(config_bytes)},
        "layers": [{"mediaType": LAYER, "digest": layer_digest, "size": len(layer_bytes)}],
    }
    body = json.dumps(manifest).encode()
    digest = put_manifest(base, repository, tag or digest_of(body), manifest, headers, context)
    return Pushed(digest, len(body), config_digest, layer_digest)


def push_index(
    base: str,
    repository: str,
    tag: str,
    per_platform: Mapping[str, Mapping[str, str]],
    *,
    auth: Mapping[str, str] | None = None,
) -> tuple[str, dict[str, Pushed]]:
    """An image index: one image per architecture ("amd64": labels, ...)."""
    pushed = {
        arch: push_image(base, repository, None, labels, auth=auth, architecture=arch)
        for arch, labels in per_platform.items()
    }
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": image.digest,
                "size": image.size,
                "platform": {"os": "linux", "architecture": arch},
            }
            for arch, image in pushed.items()
        ],
    }
    return put_manifest(base, repository, tag, index, dict(auth or {})), pushed


def blob_requests(log: str, digest: str) -> list[str]:
    """Access-log lines that read (GET or HEAD) the blob `digest`."""
    return [
        line
        for line in log.splitlines()
        if f"/blobs/{digest}" in line and ('"GET ' in line or '"HEAD ' in line)
    ]
