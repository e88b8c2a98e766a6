"""The control channel (INTERFACE.md section 3): bounded line splitting and message parsing.

Pure code fed by untrusted bytes (STYLE habit 4): `LineSplitter` turns a byte stream
into lines with a hard cap on memory, and `parse_message` turns one line into a
validated `ControlMessage` or a `ProtocolViolation`. Nothing here raises on bad
input, does I/O, or keeps more than one line in memory. A violation keeps the line
as it came: its excerpt is cut only after the redactor has seen it (a cut first
could keep the start of a secret).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from . import jsonutil
from .contract import LogLevel
from .secret import Redactor

_BIG_INT = re.compile(rb"\d{20}")
MAX_LINE = 64 * 1024
MAX_EXCERPT = 200  # characters of the offending line in a PROTOCOL_ERROR event
MAX_TYPE_SHOWN = 40  # characters of an unknown `type` named in the reason
TYPES = ("progress", "intent", "event", "artifact", "component", "metadata", "log")
SEVERITIES = tuple(level.value for level in LogLevel)
_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


class LineSplitter:
    """Split a byte stream into lines of at most `limit` bytes, in bounded memory.

    A line longer than the limit yields its first `limit` bytes once, flagged
    `truncated`, and the rest of it up to the next newline is discarded as it comes.
    """

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> Iterator[tuple[bytes, bool]]:
        """Yield `(line, truncated)` for every complete line in `data` plus what came before."""
        start = 0
        size = len(data)
        while start < size:
            newline = data.find(b"\n", start)
            end = size if newline < 0 else newline
            if self._discarding:
                if newline < 0:
                    return
                self._discarding = False
                start = newline + 1
                continue
            room = self.limit - len(self._buffer)
            if end - start > room:
                self._buffer += data[start : start + room]
                yield bytes(self._buffer), True
                self._buffer.clear()
                if newline < 0:
                    self._discarding = True
                    return
                start = newline + 1
                continue
            self._buffer += data[start:end]
            if newline < 0:
                return
            yield bytes(self._buffer), False
            self._buffer.clear()
            start = newline + 1

    def flush(self) -> Iterator[tuple[bytes, bool]]:
        """At EOF: the unterminated last line, if any."""
        if self._buffer and not self._discarding:
            yield bytes(self._buffer), False
        self._buffer.clear()
        self._discarding = False

    @property
    def pending(self) -> int:
        return len(self._buffer)


@dataclass(frozen=True)
class ControlMessage:
    type: str
    fields: Mapping[str, Any]


@dataclass(frozen=True)
class ProtocolViolation:
    """Why a line is not a message; the line itself is only ever shown redacted."""

    reason: str  # the supervisor's words only, never text from the line
    line: bytes = b""
    truncated: bool = False  # the line was cut upstream (over MAX_LINE)
    unknown_type: str | None = None  # the `type` that is not one, as the child sent it

    def excerpt(self, redactor: Redactor, limit: int = MAX_EXCERPT) -> str:
        """At most `limit` characters of the line, redacted before the cut."""
        return excerpt(self.line, redactor, limit, truncated=self.truncated)

    def describe(self, redactor: Redactor) -> str:
        """The PROTOCOL_ERROR message: the reason and the excerpt, secrets redacted."""
        reason = self.reason
        if self.unknown_type is not None:
            reason = f"{reason} {redactor.clip(self.unknown_type, MAX_TYPE_SHOWN)!r}"
        return f"{reason}: {self.excerpt(redactor)}"


def excerpt(
    line: bytes, redactor: Redactor, limit: int = MAX_EXCERPT, truncated: bool = False
) -> str:
    """At most `limit` characters of `line`, redacted first, never the start of a secret.

    Only as much of the line is decoded as a secret starting within the limit can
    reach; what that leaves out counts as cut upstream.
    """
    window = 4 * (limit + redactor.reach)
    text = line[:window].decode("utf-8", "replace")
    return redactor.clip(text, limit, truncated=truncated or len(line) > window, marker="")


def _number(value: Any, *, integer: bool = False, minimum: float = 0) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if integer and not isinstance(value, int) and not float(value).is_integer():
        return False
    return value >= minimum and value == value  # noqa: PLR0124 - NaN check


def _optional_str(fields: Mapping[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is not None and not isinstance(value, str):
        return f"'{name}' must be a string"
    return None


def _check(kind: str, fields: Mapping[str, Any]) -> str | None:
    """Why a message of a known type is invalid, or None."""
    if kind == "progress":
        percent = fields.get("percent_complete")
        if percent is not None and not (_number(percent) and percent <= 100):
            return "'percent_complete' must be a number from 0 to 100"
        for name in ("bytes_processed", "files_processed", "estimated_remaining_seconds"):
            value = fields.get(name)
            whole = name != "estimated_remaining_seconds"
            if value is not None and not _number(value, integer=whole):
                return f"'{name}' must be a non-negative number"
        return _optional_str(fields, "current_file")
    if kind == "intent":
        if "operation" not in fields:
            return "'operation' is required (null clears the intent)"
        operation = fields["operation"]
        if operation is not None and not (isinstance(operation, str) and operation):
            return "'operation' must be a non-empty string or null"
        duration = fields.get("expected_duration_seconds")
        if duration is not None and not _number(duration):
            return "'expected_duration_seconds' must be a non-negative number"
        return _optional_str(fields, "detail")
    if kind == "event":
        code = fields.get("code")
        if not (isinstance(code, str) and _CODE.fullmatch(code)):
            return "'code' must be an UPPER_SNAKE_CASE string of at most 64 characters"
        severity = fields.get("severity", "warn")
        if severity not in SEVERITIES:
            return f"'severity' must be one of {', '.join(SEVERITIES)}"
        return _optional_str(fields, "message") or _optional_str(fields, "path")
    if kind == "artifact":
        filename = fields.get("filename")
        if not (isinstance(filename, str) and filename):
            return "'filename' must be a non-empty string"
        return _optional_str(fields, "compression")
    if kind == "component":
        if not (isinstance(fields.get("name"), str) and fields["name"]):
            return "'name' must be a non-empty string"
        if fields.get("status") not in ("success", "failed"):
            return "'status' must be 'success' or 'failed'"
        error = fields.get("error")
        if error is not None and not isinstance(error, (str, dict)):
            return "'error' must be a string or an object"
        return _optional_str(fields, "artifact")
    if kind == "metadata":
        if not isinstance(fields.get("source_metadata"), dict):
            return "'source_metadata' must be an object"
        return None
    if kind == "log":
        level = fields.get("level", "info")
        if level not in (*SEVERITIES, "warning"):
            return f"'level' must be one of {', '.join(SEVERITIES)}"
        if not isinstance(fields.get("message"), str):
            return "'message' must be a string"
        context = fields.get("context")
        if context is not None and not isinstance(context, dict):
            return "'context' must be an object"
        return None
    return None


def parse_message(line: bytes, truncated: bool = False) -> ControlMessage | ProtocolViolation:
    """One control line to a message, or the reason it is not one."""
    if truncated or len(line) > MAX_LINE:
        return ProtocolViolation(f"line longer than {MAX_LINE} bytes", line, truncated=True)
    stripped = line.strip()
    if not stripped:
        return ProtocolViolation("empty line")
    try:
        document = orjson.loads(stripped)
        if _BIG_INT.search(stripped):  # orjson reads integers past 64 bits as floats
            try:
                document = json.loads(stripped)
            except (RecursionError, ValueError):
                pass  # deeper than the standard parser goes: orjson's reading stands
    except orjson.JSONDecodeError:
        return ProtocolViolation("not JSON", line)
    if not isinstance(document, dict):
        return ProtocolViolation("not a JSON object", line)
    kind = document.get("type")
    if kind not in TYPES:
        return ProtocolViolation("unknown type", line, unknown_type=_shown_type(kind))
    problem = _check(kind, document)
    if problem:
        return ProtocolViolation(f"invalid {kind}: {problem}", line)
    return ControlMessage(kind, document)


def _shown_type(kind: Any) -> str:
    """The unknown `type` as text: a string as it is, anything else as its JSON."""
    if isinstance(kind, str):
        return kind
    return jsonutil.dumps(kind).decode("utf-8", "replace")
