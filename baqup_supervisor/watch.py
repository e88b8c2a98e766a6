"""`baqup watch JOB_ID`: follow one job from the bus, as an operator would.

Polls the job's progress, events, status and (once the agent id is known from any
message) its heartbeat, from Redis or a file bus. On a terminal it draws one live
line with a progress bar and prints events as they come; piped, it writes JSON
lines (`{"kind": ..., "message": ...}`). It ends when the status arrives, with the
job's exit code, or after `--timeout` seconds with 69. It only reads.

Everything on the bus came from the job, and so from its child: on a terminal, no
byte of it reaches the screen unless printable (`printable`: escape sequences, C0
and C1 controls and bidirectional overrides are removed, so a child cannot set the
title, clear the screen or write the clipboard), and no value of an unexpected
type stops the watch. Piped, every line is valid JSON whatever the values
(`jsonutil.dumps`).
"""

from __future__ import annotations

import math
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, Protocol

import orjson

from . import jsonutil
from .bus import FileTransport, Keys, RedisTransport, open_transport, read_lines
from .errors import ResourceUnavailable
from .secret import Secret

# ESC or a C1 introducer, and the whole sequence it starts: CSI (ESC [ / \x9b) up to
# its final byte; OSC, DCS, SOS, PM, APC (ESC ] P X ^ _ / \x9d \x90 \x98 \x9e \x9f)
# up to BEL or ST; any other ESC with its intermediate and final bytes.
_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]?"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[\x20-\x2f]*[\x30-\x7e]?"
)
# What is left of C0, DEL, C1, and the bidirectional controls that make text read
# differently than it is. Tab, newline and the like become a space: one message is one
# screen line, and a carriage return cannot overwrite what was shown.
_SPACING = re.compile("[\t\n\v\f\r]+")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(value: Any) -> str:
    """`value` as text that cannot act on a terminal: sequences and controls removed."""
    text = value if isinstance(value, str) else str(value)
    return _CONTROL.sub("", _SPACING.sub(" ", _SEQUENCE.sub("", text)))


def decode_fields(fields: Mapping[str, str]) -> dict[str, Any]:
    """A hash or stream entry back to a message: JSON where it parses, else the string."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        try:
            out[key] = orjson.loads(value) if value[:1] in '[{"0123456789-tfn' else value
        except orjson.JSONDecodeError:
            out[key] = value
    return out


class _Source(Protocol):
    def heartbeat(self, agent_id: str) -> dict[str, Any] | None: ...

    def progress(self) -> dict[str, Any] | None: ...

    def events(self) -> list[dict[str, Any]]: ...

    def status(self) -> dict[str, Any] | None: ...


class RedisSource:
    def __init__(self, client: Any, keys: Keys, job_id: str) -> None:
        self.client = client
        self.keys = keys
        self.job_id = job_id
        self.last_event = "0-0"

    def _hash(self, key: str) -> dict[str, Any] | None:
        raw = self.client.hgetall(key)
        if not raw:
            return None
        return decode_fields({_text(k): _text(v) for k, v in raw.items()})

    def heartbeat(self, agent_id: str) -> dict[str, Any] | None:
        return self._hash(self.keys.heartbeat(agent_id))

    def progress(self) -> dict[str, Any] | None:
        return self._hash(self.keys.progress(self.job_id))

    def status(self) -> dict[str, Any] | None:
        return self._hash(self.keys.status(self.job_id))

    def events(self) -> list[dict[str, Any]]:
        entries = self.client.xrange(self.keys.events(self.job_id), min=f"({self.last_event}")
        out = []
        for entry_id, fields in entries:
            self.last_event = _text(entry_id)
            out.append(decode_fields({_text(k): _text(v) for k, v in fields.items()}))
        return out


class FileSource:
    def __init__(self, transport: FileTransport, keys: Keys, job_id: str) -> None:
        self.transport = transport
        self.keys = keys
        self.job_id = job_id
        self.seen_events = 0

    def _last(self, key: str) -> dict[str, Any] | None:
        lines = read_lines(self.transport.path_for(key))
        return lines[-1] if lines else None

    def heartbeat(self, agent_id: str) -> dict[str, Any] | None:
        return self._last(self.keys.heartbeat(agent_id))

    def progress(self) -> dict[str, Any] | None:
        return self._last(self.keys.progress(self.job_id))

    def status(self) -> dict[str, Any] | None:
        return self._last(self.keys.status(self.job_id))

    def events(self) -> list[dict[str, Any]]:
        lines = read_lines(self.transport.path_for(self.keys.events(self.job_id)))
        new = lines[self.seen_events :]
        self.seen_events = len(lines)
        return new


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def open_source(url: Secret, prefix: str, job_id: str, timeout: float) -> _Source:
    transport = open_transport(url, timeout=timeout)
    keys = Keys(prefix)
    if isinstance(transport, FileTransport):
        return FileSource(transport, keys, job_id)
    assert isinstance(transport, RedisTransport)
    return RedisSource(transport.client, keys, job_id)


def _number(value: Any) -> float | None:
    """A finite number from a bus value (a job may report anything), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def bar(percent: float | None, width: int = 24) -> str:
    if percent is None:
        return "[" + "?" * width + "]"
    filled = round(max(0.0, min(100.0, percent)) / 100 * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _human(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"  # pragma: no cover


def live_line(heartbeat: Mapping[str, Any] | None, progress: Mapping[str, Any] | None) -> str:
    """The one live line: state, bar, percent, bytes, files, intent (printable text)."""
    heartbeat = heartbeat or {}
    progress = progress or {}
    state = printable(heartbeat.get("state", "?"))
    percent = _number(progress.get("percent_complete"))
    parts = [f"{state:<12}", bar(percent)]
    if percent is not None:
        parts.append(f"{percent:5.1f}%")
    processed = _number(progress.get("bytes_processed"))
    if processed is not None:
        parts.append(_human(processed))
    if progress.get("files_processed") is not None:
        parts.append(f"{printable(progress['files_processed'])} files")
    intent = heartbeat.get("intent")
    if isinstance(intent, Mapping) and intent.get("operation"):
        parts.append(f"({printable(intent['operation'])})")
    return " ".join(parts)


def event_line(event: Mapping[str, Any]) -> str:
    severity = printable(event.get("severity", "?"))
    return (
        f"{severity:>5} {printable(event.get('code'))} x{printable(event.get('count', 1))}: "
        f"{printable(event.get('message', ''))}"
    )


def status_line(status: Mapping[str, Any]) -> str:
    error = status.get("error")
    detail = ""
    if isinstance(error, Mapping):
        detail = f": {error.get('code')} {error.get('message')}"
    elif error:
        detail = f": {error}"
    return printable(f"{status.get('status')} (exit {status.get('exit_code')}){detail}")


def watch(
    source: _Source,
    *,
    out: IO[str],
    tty: bool,
    interval: float = 0.5,
    timeout: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Follow the job until its status arrives; the job's exit code (69 on timeout)."""
    deadline = None if timeout is None else clock() + timeout
    agent_id: str | None = None
    last_heartbeat: dict[str, Any] | None = None
    last_progress: dict[str, Any] | None = None
    shown_line = ""

    def emit(kind: str, message: Mapping[str, Any]) -> None:
        out.write(jsonutil.dumps({"kind": kind, "message": message}).decode() + "\n")
        out.flush()

    unreadable = failing = False
    while True:
        try:
            progress = source.progress()
            events = source.events()
            status = source.status()
            for message in [progress, *events, status]:
                if message and message.get("agent_id") and agent_id is None:
                    agent_id = str(message["agent_id"])
            heartbeat = source.heartbeat(agent_id) if agent_id else None
        except Exception as exc:  # noqa: BLE001 - a bus down or garbled: keep watching
            if not unreadable:
                sys.stderr.write(
                    f"baqup watch: cannot read the bus ({type(exc).__name__}); retrying\n"
                )
            unreadable = failing = True
            progress, events, status, heartbeat = None, [], None, None
        else:
            failing = False
        if tty:
            for event in events:
                out.write(f"\r\033[K{event_line(event)}\n")
            line = live_line(heartbeat or last_heartbeat, progress or last_progress)
            width = shutil.get_terminal_size((100, 20)).columns - 1
            if line != shown_line:
                out.write("\r\033[K" + line[:width])
                shown_line = line
            out.flush()
        else:
            if heartbeat and heartbeat != last_heartbeat:
                emit("heartbeat", heartbeat)
            if progress and progress != last_progress:
                emit("progress", progress)
            for event in events:
                emit("event", event)
        last_heartbeat = heartbeat or last_heartbeat
        last_progress = progress or last_progress
        if status:
            if tty:
                out.write(f"\r\033[K{status_line(status)}\n")
                out.flush()
            else:
                emit("status", status)
            code = status.get("exit_code")
            return int(code) if isinstance(code, int) else 0
        if deadline is not None and clock() >= deadline:
            if tty:
                out.write("\n")
            if failing:
                raise ResourceUnavailable(
                    "no status before the timeout: the bus could not be read",
                    code="BUS_UNREACHABLE",
                )
            raise ResourceUnavailable("no status before the timeout", code="WATCH_TIMEOUT")
        time.sleep(interval)
