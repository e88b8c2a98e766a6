"""Structured logs on stderr (spec section 6): one record per line, never raising.

Owns the record layout (`timestamp`, `level`, `job_id`, `agent_id`, `component`,
`message`, `context`), the three formats (json, text, logfmt), level filtering, path
and credential sanitising (`BAQUP_AGENT_LOG_SANITIZE`), and the last line of defence
against secrets: every value of a record (message, context keys and values) passes
through the `Redactor` before it is sanitised and rendered, whatever the mode. A
rendered line is never redacted again: that would cut through its syntax (a numeric
secret inside a longer number), and every line of every format must stay
parseable. A log call never raises and never interleaves with another.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
from collections.abc import Mapping
from typing import IO, Any

from . import jsonutil
from .clock import utc_iso
from .contract import LogLevel
from .jsontree import transform
from .secret import REDACTED, Redactor, mask_url

FORMATS = ("json", "text", "logfmt")
SANITIZE_MODES = ("strict", "moderate", "none")

# --- sanitising ------------------------------------------------------------------

# A key starts where a token starts (not at every `\b`, which made a long `a-a-a-...`
# run cubic): each token is scanned once.
_KEY_VALUE = re.compile(
    r"(?i)(?P<key>(?<![\w.-])(?!BAQUP_)[\w.-]*(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key"
    r"|private[_-]?key|credentials?)\b\s*[=:]\s*)(?P<q>[\"']?)(?P<value>[^\s\"'&,;]+)"
)
_BEARER = re.compile(r"(?i)\b(?P<kind>bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
_PRIVATE_KEY = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.DOTALL
)
_HOME = re.compile(r"(?P<root>/home/|/Users/)(?P<user>[^/\s\"']+)")
_SENSITIVE_FILE = re.compile(
    r"(?P<dir>/)(?P<name>\.ssh|\.gnupg|\.aws|\.kube|\.docker|\.pgpass|\.netrc|\.git-credentials)"
    r"(?P<rest>(?:/[^\s\"']*)?)"
)
_ABS_PATH = re.compile(r"(?<![\w:/.~-])(?P<path>/(?:[^\s\"'/:=,;()\[\]{}<>|]+/?)+)")


class Sanitizer:
    """Path and credential sanitising for one mode.

    - none: nothing (secret values are still redacted by the Redactor).
    - moderate: credentials in URLs, `password=...`-style pairs, bearer/basic tokens,
      private key blocks, user names in home directories, and the paths below
      well-known credential stores (`.ssh`, `.aws`, `.pgpass`, ...).
    - strict: all of moderate, and every absolute path keeps only its first
      component and extension, the rest replaced by a stable per-process digest.
    """

    def __init__(self, mode: str = "moderate") -> None:
        if mode not in SANITIZE_MODES:
            raise ValueError(f"unknown sanitize mode {mode!r}")
        self.mode = mode
        self._salt = os.urandom(16)

    def _path_digest(self, match: re.Match[str]) -> str:
        path = match.group("path")
        parts = [p for p in path.split("/") if p]
        if len(parts) <= 1:
            return path
        digest = hashlib.blake2s(path.encode(), key=self._salt, digest_size=4).hexdigest()
        _, dot, ext = parts[-1].rpartition(".")
        suffix = f".{ext}" if dot and 0 < len(ext) <= 8 else ""
        return f"/{parts[0]}/[path:{digest}]{suffix}"

    def __call__(self, text: str) -> str:
        if self.mode == "none" or not text:
            return text
        text = _PRIVATE_KEY.sub(REDACTED, text)
        text = mask_url(text)
        text = _KEY_VALUE.sub(lambda m: f"{m['key']}{m['q']}{REDACTED}", text)
        text = _BEARER.sub(lambda m: f"{m['kind']} {REDACTED}", text)
        text = _SENSITIVE_FILE.sub(lambda m: f"{m['dir']}{m['name']}/{REDACTED}", text)
        text = _HOME.sub(lambda m: f"{m['root']}[USER]", text)
        if self.mode == "strict":
            text = _ABS_PATH.sub(self._path_digest, text)
        return text

    def value(self, value: Any) -> Any:
        """Sanitise every string inside a JSON-like value."""
        if self.mode == "none":
            return value
        return transform(value, lambda v: self(v) if isinstance(v, str) else v, str)


# --- rendering -------------------------------------------------------------------


def dumps(value: Any) -> bytes:
    """Compact JSON that never raises: unserialisable parts degrade to strings."""
    return jsonutil.dumps(value)


_LOGFMT_BARE = re.compile(r"[^\s\"=\\]+")
_LOGFMT_KEY_UNSAFE = re.compile(r"[^\w.\-/:@]")
# Every character a reader may split lines on (str.splitlines), written as its JSON
# escape: inside a JSON string (the only place JSON lets one be) that is the same value.
_LINE_BREAKS = str.maketrans(
    {
        "\n": "\\n",
        "\r": "\\r",
        **{c: f"\\u{ord(c):04x}" for c in "\v\f\x1c\x1d\x1e\x85\u2028\u2029"},
    }
)
_RESERVED = ("timestamp", "level", "job_id", "agent_id", "component", "message")


def _logfmt_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    else:
        encoded = dumps(value).decode()
        text = json.loads(encoded) if encoded.startswith('"') else encoded
    if text and _LOGFMT_BARE.fullmatch(text):
        return text
    return dumps(text).decode()


def _logfmt_key(key: Any) -> str:
    """A key a logfmt reader splits right: no space, `=` or quote (each becomes `_`)."""
    return _LOGFMT_KEY_UNSAFE.sub("_", str(key)) or "_"


def _flatten(prefix: str, value: Any, out: list[tuple[str, Any]]) -> None:
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            name = _logfmt_key(key)
            _flatten(f"{prefix}.{name}" if prefix else name, item, out)
    else:
        out.append((prefix, value))


def render(record: Mapping[str, Any], fmt: str) -> str:
    """One record as one line (without the newline), whatever its strings hold."""
    return _render(record, fmt).translate(_LINE_BREAKS)


def _render(record: Mapping[str, Any], fmt: str) -> str:
    if fmt == "text":
        context = record.get("context") or {}
        tail = "".join(f" {k}={_logfmt_value(v)}" for k, v in _items(context))
        return (
            f"{record['timestamp']} {str(record['level']).upper():5} "
            f"[{record.get('component', '-')}] {record['message']}{tail}"
        )
    if fmt == "logfmt":
        pairs = [(k, record[k]) for k in _RESERVED if record.get(k) is not None]
        for key, value in _items(record.get("context") or {}):
            pairs.append((f"context.{key}" if key in _RESERVED else key, value))
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in pairs)
    return dumps(record).decode()


def _items(context: Mapping[str, Any]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if context:
        _flatten("", context, out)
    return out


# --- the logger ------------------------------------------------------------------


class _Sink:
    """A stream shared by every bound logger, with one write lock (structlog's way)."""

    def __init__(self, stream: IO[str] | None) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def write(self, line: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        with self.lock:
            try:
                stream.write(line + "\n")
                stream.flush()
            except (OSError, ValueError):
                pass  # stderr closed or full: a log call must never take the job down


class Logger:
    """A structured logger bound to a job, an agent and a component."""

    def __init__(
        self,
        *,
        level: LogLevel | str = LogLevel.INFO,
        fmt: str = "json",
        sanitize: str = "moderate",
        job_id: str | None = None,
        agent_id: str | None = None,
        component: str = "supervisor",
        redactor: Redactor | None = None,
        stream: IO[str] | None = None,
        _sink: _Sink | None = None,
        _sanitizer: Sanitizer | None = None,
    ) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown log format {fmt!r}")
        self.level = level if isinstance(level, LogLevel) else LogLevel.parse(level)
        self.fmt = fmt
        self.job_id = job_id
        self.agent_id = agent_id
        self.component = component
        self.redactor = redactor if redactor is not None else Redactor()
        self.sanitizer = _sanitizer if _sanitizer is not None else Sanitizer(sanitize)
        self._sink = _sink if _sink is not None else _Sink(stream)

    def bind(
        self,
        *,
        component: str | None = None,
        job_id: str | None = None,
        agent_id: str | None = None,
    ) -> Logger:
        """A logger sharing this one's stream, level, format and redaction."""
        return Logger(
            level=self.level,
            fmt=self.fmt,
            job_id=job_id or self.job_id,
            agent_id=agent_id or self.agent_id,
            component=component or self.component,
            redactor=self.redactor,
            _sink=self._sink,
            _sanitizer=self.sanitizer,
        )

    def enabled(self, level: LogLevel) -> bool:
        return level >= self.level

    def log(self, level: LogLevel, message: str, /, **context: Any) -> None:
        if level < self.level:
            return
        try:
            redact = self.redactor.redact_value
            # Redacted first, so no sanitising rule can cut a secret and keep a piece of it.
            record: dict[str, Any] = {
                "timestamp": utc_iso(),
                "level": level.value,
                "job_id": redact(self.job_id),
                "agent_id": redact(self.agent_id),
                "component": redact(self.component),
                "message": self.sanitizer(self.redactor.redact(str(message))),
                "context": self.sanitizer.value(redact(context)) if context else {},
            }
            self._sink.write(render(record, self.fmt))
        except Exception:  # noqa: BLE001 - a log call never raises
            dropped = {"level": "error", "message": "log record dropped", "component": "logs"}
            self._sink.write(dumps(dropped).decode())

    def trace(self, message: str, /, **context: Any) -> None:
        self.log(LogLevel.TRACE, message, **context)

    def debug(self, message: str, /, **context: Any) -> None:
        self.log(LogLevel.DEBUG, message, **context)

    def info(self, message: str, /, **context: Any) -> None:
        self.log(LogLevel.INFO, message, **context)

    def warn(self, message: str, /, **context: Any) -> None:
        self.log(LogLevel.WARN, message, **context)

    def error(self, message: str, /, **context: Any) -> None:
        self.log(LogLevel.ERROR, message, **context)

    def fatal(self, message: str, /, **context: Any) -> None:
        self.log(LogLevel.FATAL, message, **context)


def logger_from_environ(
    environ: Mapping[str, str],
    redactor: Redactor,
    *,
    job_id: str | None = None,
    agent_id: str | None = None,
    stream: IO[str] | None = None,
) -> Logger:
    """A logger from the raw environment, before (or without) a valid configuration.

    An invalid level, format or mode falls back to its default: the configuration
    check reports it, and the report itself must be loggable.
    """
    level_text = environ.get("BAQUP_AGENT_LOG_LEVEL", "info")
    try:
        level = LogLevel.parse(level_text)
    except ValueError:
        level = LogLevel.INFO
    fmt = environ.get("BAQUP_AGENT_LOG_FORMAT", "json").strip().lower()
    mode = environ.get("BAQUP_AGENT_LOG_SANITIZE", "moderate").strip().lower()
    return Logger(
        level=level,
        fmt=fmt if fmt in FORMATS else "json",
        sanitize=mode if mode in SANITIZE_MODES else "moderate",
        job_id=job_id if job_id is not None else environ.get("BAQUP_JOB_ID"),
        agent_id=agent_id,
        redactor=redactor,
        stream=stream,
    )
