"""`baqup emit`: control-channel messages for shell scripts, without hand-made JSON.

Each subcommand builds one message of INTERFACE.md section 3 and writes it as one
line, with one write(2), to `$BAQUP_CONTROL_FD` (default 3). The message is checked
with the same parser baqup-run uses, so a script learns of a mistake at once.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from typing import Any

import orjson

from .control import ControlMessage, parse_message
from .errors import StorageIOError, UsageError


def control_fd(environ: Mapping[str, str]) -> int:
    text = environ.get("BAQUP_CONTROL_FD", "3").strip()
    if not text.isdigit():
        raise UsageError(f"BAQUP_CONTROL_FD: expected a file descriptor number, got {text!r}")
    return int(text)


def drop_none(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def write_message(message: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> None:
    """Validate and write one control message; UsageError/StorageIOError on failure."""
    env = os.environ if environ is None else environ
    line = orjson.dumps(dict(message))
    parsed = parse_message(line)
    if not isinstance(parsed, ControlMessage):
        raise UsageError(f"invalid {message.get('type')} message: {parsed.reason}")
    fd = control_fd(env)
    try:
        os.write(fd, line + b"\n")
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise UsageError(
                f"file descriptor {fd} (BAQUP_CONTROL_FD) is not open: run this under baqup-run"
            ) from None
        raise StorageIOError(f"cannot write to the control channel: {exc.strerror}") from None


def parse_pairs(pairs: tuple[str, ...], what: str) -> dict[str, Any]:
    """KEY=VALUE arguments; a VALUE that parses as JSON is taken as JSON."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{what}: expected KEY=VALUE, got {pair!r}")
        try:
            out[key] = orjson.loads(value)
        except orjson.JSONDecodeError:
            out[key] = value
    return out
