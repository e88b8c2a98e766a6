"""HTTP for the registry client: kept-alive connections, retries, redirects, TLS policy.

Owns the rules a registry request follows whatever it asks for: a timeout on every
socket operation; 429 and 5xx answers and dropped connections retried with
exponential backoff (`Retry-After` honoured, capped); redirects followed (to blob
storage, typically) without the Authorization header once they leave the origin;
plain HTTP only when the caller allowed it; an answer never buffered past its limit.
Never: show a credential in a message, or retry forever.
"""

from __future__ import annotations

import functools
import http.client
import json
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from .backoff import delay
from .errors import ConfigError, DataError, ResourceUnavailable
from .secret import Redactor

MAX_REDIRECTS = 5
MAX_RETRY_AFTER = 10.0  # seconds: a registry asking for longer is treated as down
_REDIRECTS = (301, 302, 303, 307, 308)


def origin(url: str) -> str:
    """scheme://host:port, the unit the Authorization header may not leave."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{parts.hostname}:{port}"


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]  # lowercase names
    body: bytes
    url: str

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")

    def error_codes(self) -> str:
        """The registry's own error codes (`{"errors": [{"code": ...}]}`), for messages."""
        try:
            errors = json.loads(self.body).get("errors")
            codes = [str(e["code"]) for e in errors if isinstance(e, dict) and "code" in e]
        except (ValueError, AttributeError, TypeError):
            return ""
        return f" ({', '.join(codes)[:200]})" if codes else ""


@functools.cache
def _verified_context() -> ssl.SSLContext:
    # Loading the system's CA store costs tens of milliseconds: once per process.
    return ssl.create_default_context()


def _speaks_tls(url: str, timeout: float) -> bool:
    """Whether the server completes a TLS handshake. Asked only when plain HTTP is
    allowed, to choose the scheme, so the certificate is not checked here: the
    connection then used for https is a verified one."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, parts.port or 443), timeout) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=host):
                return True
        except ssl.SSLError:
            return False


class _Retry(Exception):
    """An attempt that may succeed later: the failure to report if none does."""


class Transport:
    """Connections per origin and the request loop around them. Not thread-safe."""

    def __init__(
        self,
        *,
        insecure: bool,
        timeout: float,
        retries: int,
        backoff: float,
        redactor: Redactor,
    ) -> None:
        self.insecure = insecure
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.redactor = redactor
        self._connections: dict[str, http.client.HTTPConnection] = {}
        self._plain: set[str] = set()  # hosts found to speak plain HTTP (insecure only)

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()

    def scheme_for(self, host: str) -> str:
        """https, unless plain HTTP is allowed and the host refuses TLS (probed once)."""
        if host in self._plain:
            return "http"
        if self.insecure:
            try:
                if not _speaks_tls(f"https://{host}/", self.timeout):
                    self._plain.add(host)
                    return "http"
            except OSError:
                pass  # unreachable: the request loop reports it, after its retries
            return "https"
        try:
            self._connect(f"https://{host}/")
        except ssl.SSLCertVerificationError as exc:
            raise ResourceUnavailable(
                f"registry {host}: its TLS certificate is not trusted: {exc.verify_message}"
            ) from None
        except ssl.SSLError as exc:
            raise ConfigError(
                f"registry {host} does not speak TLS ({exc.reason or exc}): refusing plain "
                "HTTP; pass --insecure (insecure=True) to allow a plain-HTTP registry",
                code="REGISTRY_INSECURE",
            ) from None
        except OSError:
            # Unreachable: the request loop reports it (after its retries) with the URL.
            pass
        return "https"

    def _connect(self, url: str) -> http.client.HTTPConnection:
        key = origin(url)
        connection = self._connections.get(key)
        if connection is not None:
            return connection
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(
                host, parts.port, timeout=self.timeout, context=_verified_context()
            )
        else:
            connection = http.client.HTTPConnection(host, parts.port, timeout=self.timeout)
        connection.connect()
        self._connections[key] = connection
        return connection

    def _drop(self, url: str) -> None:
        connection = self._connections.pop(origin(url), None)
        if connection is not None:
            connection.close()

    def request(self, method: str, url: str, headers: Mapping[str, str], *, limit: int) -> Response:
        """One request, its retries and redirects; the final answer, whatever its status."""
        current = dict(headers)
        for _ in range(MAX_REDIRECTS + 1):
            if urlsplit(url).scheme != "https" and not self.insecure:
                raise ConfigError(
                    f"refusing plain HTTP to {origin(url)}: pass --insecure (insecure=True) "
                    "to allow it",
                    code="REGISTRY_INSECURE",
                )
            response = self._retrying(method, url, current, limit)
            location = response.header("location")
            if response.status not in _REDIRECTS or not location:
                return response
            target = urljoin(url, location)
            if origin(target) != origin(url):
                # Blob storage gets a signed URL; the registry's credential stays home.
                current = {k: v for k, v in current.items() if k.lower() != "authorization"}
            if response.status == 303:
                method = "GET"
            url = target
        raise DataError(f"more than {MAX_REDIRECTS} redirects from {origin(url)}")

    def _retrying(self, method: str, url: str, headers: Mapping[str, str], limit: int) -> Response:
        failure = ""
        for attempt in range(1, self.retries + 2):
            wait = delay("exponential", attempt, base=self.backoff, cap=MAX_RETRY_AFTER)
            try:
                response = self._attempt(method, url, headers, limit)
            except _Retry as exc:
                failure = str(exc)
            else:
                if response.status != 429 and response.status < 500:
                    return response
                failure = f"HTTP {response.status}{response.error_codes()}"
                after = response.header("retry-after")
                if after.isdigit():
                    if float(after) > MAX_RETRY_AFTER:
                        break
                    wait = float(after)
            if attempt <= self.retries:
                time.sleep(wait)
        where = self.redactor.redact(f"{method} {origin(url)}{urlsplit(url).path}")
        raise ResourceUnavailable(
            f"registry unavailable: {where}: {failure} (after {self.retries + 1} attempts)",
            code="REGISTRY_UNAVAILABLE",
        )

    def _attempt(self, method: str, url: str, headers: Mapping[str, str], limit: int) -> Response:
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        reused = origin(url) in self._connections
        for _ in range(2):
            try:
                connection = self._connect(url)
                connection.request(method, target, headers={**headers, "User-Agent": "baqup"})
                answer = connection.getresponse()
                body = answer.read(limit + 1)  # HEAD: b"", and the answer closes
                if len(body) > limit:
                    self._drop(url)
                    raise DataError(f"{origin(url)}{parts.path}: answer over {limit} bytes")
                if answer.will_close or not answer.isclosed():
                    self._drop(url)
                found = {name.lower(): value for name, value in answer.getheaders()}
                return Response(answer.status, found, body, url)
            except ssl.SSLError as exc:
                self._drop(url)
                raise ResourceUnavailable(f"TLS with {origin(url)} failed: {exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop(url)
                if reused and isinstance(
                    exc, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
                ):
                    reused = False  # a kept-alive connection the server had closed
                    continue
                reason = "timed out" if isinstance(exc, socket.timeout) else str(exc)
                raise _Retry(reason or exc.__class__.__name__) from None
        raise _Retry("connection closed")
