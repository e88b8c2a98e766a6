"""The bus: key layout, message encoding, and the transports (Redis and file).

Owns INTERFACE.md section 4: which key each message goes to, its structure and TTL,
and how a message's fields are encoded (strings as they are, everything else as
compact JSON through `jsonutil.dumps`, which never refuses valid data). A transport
sends one message in one round trip; it never retries, buffers or sleeps: that is
the outbox's job (outbox.py). A send or ping returns only when the server took the
message; every failure of any kind raises one of two exceptions:

- `BusUnavailable`: the bus cannot be used (refused or lost connection, timeout, a
  reply that is not Redis protocol, or a server-side condition that concerns every
  write: LOADING, READONLY, OOM, MISCONF, TRYAGAIN, cluster down...). Nothing about
  the message itself is wrong: it is retried, in order, once the bus is back.
- `MessageRefused` (a `BusUnavailable`): the server answered this message with an
  error of its own (WRONGTYPE, NOPERM, a command-specific ERR). Retrying it may not
  help; the outbox decides how often (outbox.py).

A password in the bus URL is never put in a message, a log record or an exception
text.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import orjson

from . import jsonutil
from .errors import ConfigError
from .secret import Redactor, Secret, mask_url, url_passwords

DAY = 24 * 3600
KINDS = ("heartbeat", "progress", "event", "status", "notify")
MAX_DESCRIPTION = 300  # characters of a bus URL in a log record or an error


class BusUnavailable(Exception):
    """The bus cannot be used right now (the message was not sent)."""


class MessageRefused(BusUnavailable):
    """The server answered this message with an error (the message was not sent)."""


# Error replies that say something about the server, not about the message: every
# write would get them until the server recovers (replica promoted, dataset loaded,
# memory freed, disk fixed, cluster healed).
SERVER_CONDITIONS = (
    "LOADING",
    "BUSY",
    "READONLY",
    "OOM",
    "MISCONF",
    "TRYAGAIN",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "NOREPLICAS",
    "MOVED",
    "ASK",
)


@dataclass(frozen=True)
class Keys:
    """The key layout of INTERFACE.md section 4 under one prefix."""

    prefix: str

    def heartbeat(self, agent_id: str) -> str:
        return f"{self.prefix}heartbeat:{agent_id}"

    def progress(self, job_id: str) -> str:
        return f"{self.prefix}progress:{job_id}"

    def status(self, job_id: str) -> str:
        return f"{self.prefix}status:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}events:{job_id}"

    @property
    def notify(self) -> str:
        return f"{self.prefix}notify"


@dataclass(frozen=True)
class Message:
    """One message for the bus: what it is, where it goes, for how long."""

    kind: str
    key: str
    body: Mapping[str, Any]
    ttl: int | None = None
    notify: str | None = None  # also publish the whole body on this channel

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "key": self.key,
            "ttl": self.ttl,
            "notify": self.notify,
            "body": dict(self.body),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Message:
        return cls(
            str(data["kind"]),
            str(data["key"]),
            dict(data["body"]),
            data.get("ttl"),
            data.get("notify"),
        )


def encode_fields(body: Mapping[str, Any]) -> dict[str, str]:
    """Hash/stream fields: strings as they are, any other value as compact JSON."""
    return {
        str(k): v if isinstance(v, str) else jsonutil.dumps(v).decode() for k, v in body.items()
    }


def encode_document(body: Mapping[str, Any]) -> bytes:
    return jsonutil.dumps(dict(body))


def encode(message: Message) -> tuple[dict[str, str], bytes]:
    """A message's hash or stream fields and its JSON document, as far as it needs them.

    Encoding happens before the server is involved, so a message that cannot be
    encoded is refused as such (`MessageRefused`), never mistaken for a bus outage.
    """
    try:
        fields = encode_fields(message.body) if message.kind != "notify" else {}
        document = (
            encode_document(message.body) if message.kind == "notify" or message.notify else b""
        )
    except Exception as exc:  # noqa: BLE001 - jsonutil should not raise; if it does...
        raise MessageRefused(f"the message cannot be encoded: {type(exc).__name__}") from None
    return fields, document


class Transport(Protocol):
    name: str

    def ping(self) -> None: ...

    def send(self, message: Message) -> None: ...

    def close(self) -> None: ...


def describe_url(url: str) -> str:
    """The URL with every password masked (userinfo, `?password=`, `?sentinel_password=`).

    Read as written, so an unparsable URL is described as safely as a good one; a
    long URL is cut only after its passwords are masked, never inside a mask.
    """
    return Redactor(url_passwords(url)).clip(mask_url(url), MAX_DESCRIPTION)


class RedisTransport:
    """redis://, rediss://, unix:// and redis+sentinel:// through redis-py."""

    name = "redis"

    def __init__(self, url: Secret, *, timeout: float, client_name: str | None = None) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._redis = redis
        self._sentinel: Any = None
        text = url.reveal()
        # redis-py retries a failed call 10 times by default: one call could then take
        # eleven timeouts, and retrying is the outbox's job, with its own backoff.
        self._no_retry = Retry(NoBackoff(), 0)
        try:
            if text.startswith("redis+sentinel://"):
                self.client = self._sentinel_client(text, timeout)
            else:
                self.client = redis.Redis.from_url(
                    text,
                    socket_timeout=timeout,
                    socket_connect_timeout=timeout,
                    client_name=client_name,
                    health_check_interval=0,
                    retry=self._no_retry,
                )
        except (ValueError, TypeError, redis.RedisError) as exc:
            raise ConfigError(
                f"BAQUP_BUS_URL: cannot use {describe_url(text)}: {type(exc).__name__}"
            ) from None
        self.description = describe_url(text)

    def _sentinel_client(self, text: str, timeout: float) -> Any:
        """`redis+sentinel://[:password@]host:port[,host:port]/service_name[/db]`."""
        from redis.sentinel import Sentinel

        parts = urlsplit(text)
        hostlist = parts.netloc.rsplit("@", 1)[-1]
        password = unquote(parts.password) if parts.password else None
        username = unquote(parts.username) if parts.username else None
        nodes: list[tuple[str, int]] = []
        for item in hostlist.split(","):
            host, _, port = item.rpartition(":")
            nodes.append((host.strip("[]") or "127.0.0.1", int(port or 26379)))
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("redis+sentinel:// needs a service name: /service_name")
        service, db = path[0], int(path[1]) if len(path) > 1 else 0
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        sentinel_password = query.get("sentinel_password")
        sentinel_kwargs = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        if sentinel_password:
            sentinel_kwargs["password"] = sentinel_password  # type: ignore[assignment]
        self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
            nodes,
            sentinel_kwargs=sentinel_kwargs,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            password=password,
            username=username,
            db=db,
        )
        return self._sentinel.master_for(service, socket_timeout=timeout, retry=self._no_retry)

    def ping(self) -> None:
        try:
            answer = self.client.ping()
        except Exception as exc:  # noqa: BLE001 - whatever a hostile server causes
            raise self._failure(exc) from None
        if answer is not True:  # redis-py maps any reply but PONG to False
            self._reset()
            raise BusUnavailable("PING was not answered with PONG: not a Redis server")

    def send(self, message: Message) -> None:
        fields, document = encode(message)
        try:
            self._send(message, fields, document)
        except Exception as exc:  # noqa: BLE001 - the caller must know it was not sent
            raise self._failure(exc) from None

    def _failure(self, exc: Exception) -> BusUnavailable:
        """What a failed call means for the outbox, as one of the bus's two exceptions.

        Only a Redis error reply about the message itself is `MessageRefused`; anything
        else (lost connection, timeout, a reply that is not Redis protocol, redis-py
        choking on one, a server-wide condition) is `BusUnavailable`. Either way the
        connections are dropped, so a late or garbled reply left on a socket can never
        be read later as the answer to another message.
        """
        self._reset()
        reason = f"{type(exc).__name__}: {_safe(exc)}"
        if isinstance(exc, self._redis.ResponseError):
            code = _error_code(exc)
            if code and code not in SERVER_CONDITIONS:
                return MessageRefused(reason)
        return BusUnavailable(reason)

    def _reset(self) -> None:
        # The failed call has given its connection back to the pool by now; one in use
        # by another thread (the heartbeat's, the outbox's) is left to finish its call.
        try:
            self.client.connection_pool.disconnect(inuse_connections=False)
        except Exception:  # noqa: BLE001, S110 - closing a broken socket may fail too
            pass

    def _send(self, message: Message, fields: dict[str, str], document: bytes) -> None:
        # A heartbeat always carries the same fields, so HSET alone replaces it whole: two
        # commands in one round trip, no transaction (the fleet's most frequent write).
        # Progress and status fields vary: DEL + HSET + EXPIRE in one MULTI.
        pipe = self.client.pipeline(transaction=message.kind != "heartbeat")
        if message.kind == "heartbeat":
            pipe.hset(message.key, mapping=fields)
            if message.ttl:
                pipe.expire(message.key, message.ttl)
        elif message.kind == "event":
            pipe.xadd(message.key, fields)
            if message.ttl:
                pipe.expire(message.key, message.ttl)
        elif message.kind == "notify":
            pipe.publish(message.key, document)
        else:  # progress, status: a hash replaced whole
            pipe.delete(message.key)
            pipe.hset(message.key, mapping=fields)
            if message.ttl:
                pipe.expire(message.key, message.ttl)
        if message.notify:
            pipe.publish(message.notify, document)
        try:
            pipe.execute()
        finally:
            pipe.reset()

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001, S110 - nothing left to report on at the end
            pass


def _error_code(exc: Exception) -> str:
    """The code of a Redis error reply (`WRONGTYPE`, `OOM`...), "" when it is not one.

    redis-py strips the codes it knows into `status_code`, keeps unknown ones in the
    text, and a pipeline prefixes the text with "Command # n (...) caused error: ".
    Its own complaints about a garbled reply carry no code at all.
    """
    known = getattr(exc, "status_code", None)
    if isinstance(known, str) and known:
        return known.upper()
    text = str(exc).rpartition("caused error: ")[2]
    word = text.split(" ", 1)[0]
    return word if word.isupper() and word.isalpha() else ""


def _safe(exc: BaseException) -> str:
    """An exception's text, URL passwords masked first, then cut to 300 characters."""
    text = str(exc)
    return Redactor(url_passwords(text)).clip(mask_url(text), 300)


class FileTransport:
    """`file:///DIR`: every message appended as one JSON line to `DIR/{key}.jsonl`.

    Each line is written with one `write` on an O_APPEND descriptor and fsynced, so a
    crash leaves at worst a torn last line, which readers ignore (`read_lines`).
    """

    name = "file"

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"BAQUP_BUS_URL: file:// URLs take a local path: {url}")
        self.directory = Path(unquote(parts.path))
        self.description = url
        self._lock = threading.Lock()

    def path_for(self, key: str) -> Path:
        return self.directory / (key.replace("/", "_") + ".jsonl")

    def ping(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if not os.access(self.directory, os.W_OK):
                raise BusUnavailable(f"{self.directory} is not writable")
        except OSError as exc:
            raise BusUnavailable(f"{self.directory}: {exc.strerror}") from None

    def send(self, message: Message) -> None:
        try:
            line = encode_document(message.body) + b"\n"
        except Exception as exc:  # noqa: BLE001 - as in `encode`
            raise MessageRefused(f"the message cannot be encoded: {type(exc).__name__}") from None
        targets = [message.key] + ([message.notify] if message.notify else [])
        try:
            with self._lock:
                for key in targets:
                    append_line(self.path_for(key), line)
        except OSError as exc:
            raise BusUnavailable(f"{self.directory}: {exc.strerror or exc}") from None
        except Exception as exc:  # noqa: BLE001 - the caller must know it was not sent
            raise BusUnavailable(f"{self.directory}: {type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        pass


def append_line(path: Path, line: bytes) -> None:
    """Append one line durably: O_APPEND, one write, fsync."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        view = memoryview(line)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a file-bus or buffer file; a torn or corrupt line is skipped."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def open_transport(url: Secret, *, timeout: float, client_name: str | None = None) -> Transport:
    text = url.reveal()
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme == "file":
        return FileTransport(text)
    if scheme in ("redis", "rediss", "unix", "redis+sentinel"):
        return RedisTransport(url, timeout=timeout, client_name=client_name)
    raise ConfigError(
        f"BAQUP_BUS_URL: unsupported scheme {scheme or '(none)'!r}; expected redis://, rediss://,"
        " unix://, redis+sentinel:// or file:///DIR"
    )
