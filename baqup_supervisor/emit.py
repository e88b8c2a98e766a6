"""`baqup emit`: control-channel messages for shell scripts, without hand-made JSON.

Each subcommand builds one message of INTERFACE.md section 3 and writes it as one
line to `$BAQUP_CONTROL_FD` (default 3). The `baqup` console script enters at `main`:
a shell agent may call `baqup emit progress` once per file, so this path imports
nothing beyond `os` and `sys` (no click, no orjson, whose import alone costs a
dozen milliseconds, not even the package's other modules) and costs about one
interpreter start. Every other `baqup` command is handed to tool.py.

The flags are checked here as strictly as the control channel's parser
(control.py) checks the line: a value it would refuse is a usage error (64) now,
naming the flag, rather than a PROTOCOL_ERROR event later. Anything off the
success path (errors, `--help`, the JSON values of `metadata` and `log --context`)
imports what it needs when it happens.
"""

from __future__ import annotations

import math
import os
import sys

# `typing` alone costs a few milliseconds here; the names are only for the checker.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any, NoReturn

    from .errors import BaqupError

MAX_LINE = 64 * 1024  # control.py MAX_LINE: the channel refuses longer lines
LEVELS = ("trace", "debug", "info", "warn", "error", "fatal")

# --- the line --------------------------------------------------------------------------

_ESCAPES = {code: f"\\u{code:04x}" for code in range(32)}
_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\", 8: "\\b", 9: "\\t", 10: "\\n"})
_ESCAPES.update({12: "\\f", 13: "\\r"})


def _text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # A file name that is not UTF-8 arrives from argv as lone surrogates, which
        # JSON cannot carry: shown with U+FFFD, as the supervisor's own logs do.
        try:
            value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "replace").decode("utf-8")
    return '"' + value.translate(_ESCAPES) + '"'


def encode(value: Any) -> str:
    """Compact JSON of str, int, float (finite), bool, None, lists and str-keyed dicts."""
    if isinstance(value, str):
        return _text(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("a non-finite number is not JSON")
        return repr(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{_text(str(k))}:{encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(encode(v) for v in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__}")


def control_fd(environ: Mapping[str, str]) -> int:
    text = environ.get("BAQUP_CONTROL_FD", "3").strip()
    if not (text.isascii() and text.isdigit()):
        raise _usage(f"BAQUP_CONTROL_FD: expected a file descriptor number, got {text!r}")
    return int(text)


def write_line(line: bytes, environ: Mapping[str, str]) -> None:
    """Write one control line, whole (a signal can cut a write(2) short)."""
    fd = control_fd(environ)
    view = memoryview(line)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        import errno

        from .errors import StorageIOError

        if exc.errno == errno.EBADF:
            raise _usage(
                f"file descriptor {fd} (BAQUP_CONTROL_FD) is not open: run this under baqup-run"
            ) from None
        raise StorageIOError(
            f"cannot write to the control channel (fd {fd}): {exc.strerror}"
        ) from None


def render(message: Mapping[str, Any]) -> bytes:
    """The message as one control line (with its newline); UsageError if the channel
    would refuse it."""
    try:
        line = (encode(dict(message)) + "\n").encode("utf-8")
    except RecursionError:
        raise _usage(f"{message.get('type')}: a value is nested too deeply") from None
    if len(line) - 1 > MAX_LINE:
        raise _usage(
            f"{message.get('type')}: the message is {len(line) - 1} bytes; "
            f"the control channel takes at most {MAX_LINE}"
        )
    return line


def write_message(message: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> None:
    """Validate and write one control message; UsageError/StorageIOError on failure.

    For callers inside the package (`baqup archive`, `baqup extract` under baqup-run):
    the message is checked by the control channel's own parser before it is written.
    """
    from .control import ControlMessage, parse_message

    line = render(message)
    parsed = parse_message(line[:-1])
    if not isinstance(parsed, ControlMessage):
        raise _usage(f"invalid {message.get('type')} message: {parsed.reason}")
    write_line(line, os.environ if environ is None else environ)


def drop_none(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _usage(message: str) -> BaqupError:
    from .errors import UsageError

    return UsageError(message)


# --- the values of the flags -------------------------------------------------------------


def _number(flag: str, text: str, *, maximum: float | None = None) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise _usage(f"{flag}: expected a finite number, got {text!r}")
    if value < 0 or (maximum is not None and value > maximum):
        bounds = f"from 0 to {maximum:g}" if maximum is not None else "of 0 or more"
        raise _usage(f"{flag}: expected a number {bounds}, got {text!r}")
    return value


def _percent(flag: str, text: str) -> float:
    return _number(flag, text, maximum=100)


def _seconds(flag: str, text: str) -> float:
    return _number(flag, text)


def _count(flag: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _usage(f"{flag}: expected a whole number of 0 or more, got {text!r}") from None
    if value < 0:
        raise _usage(f"{flag}: expected a whole number of 0 or more, got {text!r}")
    return value


def _string(flag: str, text: str) -> str:
    return text


def _choice(*allowed: str) -> Callable[[str, str], str]:
    def convert(flag: str, text: str) -> str:
        if text not in allowed:
            raise _usage(f"{flag}: expected one of {', '.join(allowed)}, got {text!r}")
        return text

    return convert


def _code(what: str, text: str) -> str:
    """An event code as control.py takes it: UPPER_SNAKE_CASE, at most 64 characters."""
    if not (
        0 < len(text) <= 64
        and text.isascii()
        and "A" <= text[0] <= "Z"
        and all(c == "_" or c.isdigit() or "A" <= c <= "Z" for c in text)
    ):
        raise _usage(
            f"{what}: expected an UPPER_SNAKE_CASE code of at most 64 characters "
            f"(e.g. PERMISSION_DENIED), got {text!r}"
        )
    return text


def _nonempty(what: str, text: str) -> str:
    if not text:
        raise _usage(f"{what}: must not be empty")
    return text


def parse_pairs(pairs: Sequence[str], what: str) -> dict[str, Any]:
    """KEY=VALUE arguments; a VALUE that parses as JSON is taken as JSON."""
    out: dict[str, Any] = {}
    loads: Callable[[str], Any] | None = None
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _usage(f"{what}: expected KEY=VALUE, got {pair!r}")
        if loads is None:
            import orjson  # the control channel's own parser decides what JSON is

            loads = orjson.loads
        try:
            out[key] = loads(value)
        except ValueError:  # orjson.JSONDecodeError is a ValueError
            out[key] = value
    return out


# --- the command line ----------------------------------------------------------------------


class Option:
    """`--name VALUE` (or `--name=VALUE`), a flag (no VALUE in its spelling), or a
    repeatable option; spelled as in the help, e.g. `--message/-m TEXT`."""

    def __init__(
        self,
        spelling: str,
        dest: str,
        help: str,
        convert: Callable[[str, str], Any] = _string,
        *,
        multiple: bool = False,
    ) -> None:
        names, _, self.metavar = spelling.partition(" ")
        self.names = tuple(names.split("/"))
        self.flag = not self.metavar
        self.dest, self.help, self.convert, self.multiple = dest, help, convert, multiple


class Command:
    """One `baqup emit` subcommand: its flags, its arguments and how they make a message."""

    def __init__(
        self,
        name: str,
        summary: str,
        arguments: str,
        options: Sequence[Option],
        build: Callable[[list[str], dict[str, Any]], dict[str, Any]],
    ) -> None:
        self.name, self.summary, self.arguments = name, summary, arguments
        self.options, self.build = options, build
        self.by_name = {n: o for o in options for n in o.names}

    def usage(self) -> str:
        args = f" {self.arguments}" if self.arguments else ""
        lines = [f"Usage: baqup emit {self.name} [OPTIONS]{args}", "", f"  {self.summary}", ""]
        lines.append("Options:")
        for option in self.options:
            spelled = ", ".join(option.names) + (f" {option.metavar}" if option.metavar else "")
            lines.append(f"  {spelled:<26} {option.help}")
        lines.append(f"  {'-h, --help':<26} Show this message and exit.")
        return "\n".join(lines) + "\n"

    def parse(self, argv: Sequence[str]) -> tuple[list[str], dict[str, Any]] | None:
        """(arguments, option values), or None when --help was asked for."""
        words: list[str] = []
        values: dict[str, Any] = {o.dest: [] if o.multiple else None for o in self.options}
        for option in self.options:
            if option.flag:
                values[option.dest] = False
        it = iter(argv)
        for word in it:
            if word == "--":
                words.extend(it)
                break
            if word in ("-h", "--help"):
                return None
            if not word.startswith("-") or word == "-":
                words.append(word)
                continue
            name, eq, inline = word.partition("=") if word.startswith("--") else (word, "", "")
            if not word.startswith("--") and len(word) > 2:
                name, eq, inline = word[:2], "=", word[2:]  # -mVALUE, as click takes it
            found = self.by_name.get(name)
            if found is None:
                near = [n for n in self.by_name if n.startswith(name)]
                hint = f" (did you mean {', '.join(near)}?)" if near else ""
                raise _usage(f"emit {self.name}: no such option {name}{hint}")
            option = found
            if option.flag:
                if eq:
                    raise _usage(f"emit {self.name}: {name} takes no value")
                values[option.dest] = True
                continue
            if not eq:
                text = next(it, None)
                if text is None:
                    raise _usage(f"emit {self.name}: {name} needs a value")
            else:
                text = inline
            value = option.convert(f"emit {self.name}: {name}", text)
            if option.multiple:
                values[option.dest].append(value)
            else:
                values[option.dest] = value
        return words, values


def _arguments(
    command: str, words: list[str], names: tuple[str, ...], *, optional: bool = False
) -> list[str]:
    if len(words) > len(names):
        raise _usage(f"emit {command}: unexpected argument {words[len(names)]!r}")
    if len(words) < len(names) and not optional:
        raise _usage(f"emit {command}: missing {names[len(words)]}")
    return words


def _progress(words: list[str], values: dict[str, Any]) -> dict[str, Any]:
    _arguments("progress", words, ())
    return {"type": "progress", **drop_none(values)}


def _intent(words: list[str], values: dict[str, Any]) -> dict[str, Any]:
    given = _arguments("intent", words, ("OPERATION",), optional=True)
    operation = given[0] if given else ""
    if values.pop("clear") == bool(operation):
        raise _usage("emit intent: give an OPERATION or --clear (not both)")
    if not operation:
        return {"type": "intent", "operation": None}
    return {"type": "intent", "operation": operation, **drop_none(values)}


def _event(words: list[str], values: dict[str, Any]) -> dict[str, Any]:
    (code,) = _arguments("event", words, ("CODE",))
    values["severity"] = values["severity"] or "warn"
    return drop_none({"type": "event", "code": _code("emit event: CODE", code), **values})


def _artifact(words: list[str], values: dict[str, Any]) -> dict[str, Any]:
    (filename,) = _arguments("artifact", words, ("FILENAME",))
    _nonempty("emit artifact: FILENAME", filename)
    return drop_none({"type": "artifact", "filename": filename, **values})


def _component(words: list[str], values: dict[str, Any]) -> dict[str, Any]:
    (name,) = _arguments("component", words, ("NAME",))
    _nonempty("emit component: NAME", name)
    if values["status"] is None:
        raise _usage("emit component: --status is required (success or failed)")
    error = drop_none({"code": values.pop("code"), "message": values.pop("error_message")})
    return drop_none({"type": "component", "name": name, **values, "error": error or None})


def _metadata(words: list[str], values: dict[str, Any]) -> dict[str, Any]:
    if not words:
        raise _usage("emit metadata: missing KEY=VALUE")
    return {"type": "metadata", "source_metadata": parse_pairs(words, "emit metadata")}


def _log(words: list[str], values: dict[str, Any]) -> dict[str, Any]:
    (message,) = _arguments("log", words, ("MESSAGE",))
    return {
        "type": "log",
        "level": values["level"] or "info",
        "message": message,
        "context": parse_pairs(values["context"], "emit log: --context"),
    }


_SEVERITY = _choice(*LEVELS)
_STATUS = _choice("success", "failed")
_COMMANDS = (
    Command("progress", "Report progress.", "", [
        Option("--percent PCT", "percent_complete", "Percent complete (0 to 100).", _percent),
        Option("--bytes N", "bytes_processed", "Bytes processed.", _count),
        Option("--files N", "files_processed", "Files processed.", _count),
        Option("--current-file PATH", "current_file", "The file being processed."),
        Option("--eta SECONDS", "estimated_remaining_seconds", "Estimated seconds left.", _seconds),
    ], _progress),
    Command("intent", "Declare a long operation (carried in every heartbeat), or --clear it.",
            "[OPERATION]", [
        Option("--expected-seconds SECONDS", "expected_duration_seconds",
               "How long the operation is expected to take.", _seconds),
        Option("--detail TEXT", "detail", "What the operation works on."),
        Option("--clear", "clear", "Clear the current intent."),
    ], _intent),
    Command("event", "Report an event (aggregated per CODE, e.g. PERMISSION_DENIED).", "CODE", [
        Option("--severity LEVEL", "severity", f"{', '.join(LEVELS)} [default: warn].", _SEVERITY),
        Option("--message/-m TEXT", "message", "What happened."),
        Option("--path PATH", "path", "The file or resource concerned."),
    ], _event),
    Command("artifact", "Declare FILENAME (relative to $BAQUP_WORK_DIR) an artifact.",
            "FILENAME", [
        Option("--compression NAME", "compression",
               "zstd, gzip, lz4 or none [default: from the suffix]."),
    ], _artifact),
    Command("component", "Report one component's result (for partial failure).", "NAME", [
        Option("--status STATUS", "status", "success or failed (required).", _STATUS),
        Option("--artifact FILENAME", "artifact", "The component's artifact (in the work dir)."),
        Option("--error CODE", "code", "Error code of a failed component."),
        Option("--error-message TEXT", "error_message", "Error message of a failed component."),
    ], _component),
    Command("metadata",
            "Merge KEY=VALUE pairs into the manifest's source_metadata (JSON values allowed).",
            "KEY=VALUE...", [], _metadata),
    Command("log", "Log MESSAGE as a structured record of the job.", "MESSAGE", [
        Option("--level LEVEL", "level", f"{', '.join(LEVELS)} [default: info].", _SEVERITY),
        Option("--context KEY=VALUE", "context", "A context field (repeatable; JSON allowed).",
               multiple=True),
    ], _log),
)  # fmt: skip
COMMANDS = {c.name: c for c in _COMMANDS}


def usage() -> str:
    lines = [
        "Usage: baqup emit COMMAND [OPTIONS] [ARGS]...",
        "",
        "  Write a control message to $BAQUP_CONTROL_FD (for shell agents under baqup-run).",
        "  In a hot loop, write the line yourself instead:",
        '    printf \'{"type":"progress","files_processed":%d}\\n\' "$n" >&"$BAQUP_CONTROL_FD"',
        "",
        "Commands:",
    ]
    lines.extend(f"  {c.name:<10} {c.summary}" for c in COMMANDS.values())
    return "\n".join(lines) + "\n"


def build(argv: Sequence[str]) -> dict[str, Any] | str:
    """The message `baqup emit ARGV...` writes, or the help text it prints instead."""
    if not argv or argv[0] in ("-h", "--help"):
        if not argv:
            raise _usage("emit: missing COMMAND (one of " + ", ".join(COMMANDS) + ")")
        return usage()
    command = COMMANDS.get(argv[0])
    if command is None:
        raise _usage(f"emit: no such command {argv[0]!r} (one of {', '.join(COMMANDS)})")
    parsed = command.parse(argv[1:])
    if parsed is None:
        return command.usage()
    return command.build(*parsed)


def run(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """`baqup emit ARGV...` as a function: its exit code; failures reported by tool.py."""
    env = os.environ if environ is None else environ
    try:
        message = build(argv)
        if isinstance(message, str):
            sys.stdout.write(message)
            return 0
        write_line(render(message), env)
        return 0
    except Exception as exc:  # noqa: BLE001 - the edge of `baqup emit`
        from .tool import report_failure

        return report_failure(exc, command="emit")


def main() -> NoReturn:
    """The `baqup` console script."""
    argv = sys.argv[1:]
    if argv[:1] == ["emit"]:
        sys.exit(run(argv[1:]))
    from .tool import tool_main

    tool_main()
