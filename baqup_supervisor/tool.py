"""The companion tool `baqup`: commands for children, operators and the controller side.

Parses and dispatches only (STYLE habit 2): `emit` for shell agents (parsed in emit.py,
where the console script serves it without this module), `verify`, `decrypt`, `extract`,
`archive`, `watch` and `labels`. Each command imports what it needs when it runs.

Errors become exit codes here, and every failure of every command is one log record
naming its error code (`context.code`, `category`, `exit_code`). A command whose stdout
is a JSON report (`verify`, `extract`, `decrypt -o`) prints one on failure too, with the
spec's `error` object; stdout that carries data (a tar, plaintext, control lines) never
gets one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import IO, Any, NoReturn

import click

from . import __version__
from .cli import _print_json
from .contract import ExitCode, LogLevel
from .errors import BaqupError, UsageError

# --- baqup: the companion tool ------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="baqup", message="%(prog)s %(version)s")
def tool() -> None:
    """Companion tool of baqup-run: emit control messages, verify, watch, describe."""


@tool.command()
@click.option("--schema", metavar="PATH", help="The agent's agent-schema.json.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["lines", "docker", "json"]),
    default="lines",
    show_default=True,
    help="KEY=VALUE lines, docker build --label arguments, or JSON.",
)
def labels(schema: str | None, fmt: str) -> None:
    """Print the io.baqup.* image labels for the agent schema (spec section 8)."""
    import shlex

    from .config import find_schema_path, load_agent_schema
    from .info import image_labels

    path, _ = find_schema_path(schema, os.environ)
    if path is None:
        raise UsageError("no agent schema: pass --schema or set BAQUP_AGENT_SCHEMA")
    found = image_labels(load_agent_schema(path))
    if fmt == "json":
        _print_json(found)
    elif fmt == "docker":
        click.echo(" ".join(f"--label {shlex.quote(f'{k}={v}')}" for k, v in found.items()))
    else:
        for key, value in found.items():
            click.echo(f"{key}={value}")


@tool.command(name="reference", hidden=True)
def reference() -> None:
    """Print the README's configuration reference, generated from the shipped schema."""
    from .reference import config_reference

    click.echo(config_reference(), nl=False)


def tool_run(argv: Sequence[str] | None = None) -> int:
    """`baqup` as a function: the exit code for this command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["emit"]:
        from .emit import run

        return run(args[1:])
    command = next((a for a in args if not a.startswith("-")), "")
    try:
        result = tool.main(args, prog_name="baqup", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.format_message(), err=True)
        return int(ExitCode.USAGE_CONFIG_ERROR)
    except click.exceptions.Abort:
        return int(ExitCode.GENERAL_FAILURE)
    except Exception as exc:  # noqa: BLE001 - the edge
        return report_failure(exc, command=command)


def tool_main() -> NoReturn:
    sys.exit(tool_run())


def as_error(exc: BaseException) -> BaqupError:
    """Any failure as the contract's error: its code, category and exit code."""
    if isinstance(exc, BaqupError):
        return exc
    if isinstance(exc, click.ClickException):
        return UsageError(exc.format_message())
    if isinstance(exc, OSError):
        from .staging import io_error

        return io_error(exc, str(exc.filename) if exc.filename else "baqup")
    return BaqupError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def report_failure(exc: BaseException, *, command: str) -> int:
    """The one log record of a failed `baqup` command, naming its error code; the exit code."""
    from .logs import logger_from_environ
    from .secret import Redactor

    error = as_error(exc)
    log = logger_from_environ(os.environ, Redactor.from_environ(os.environ)).bind(component="baqup")
    context: dict[str, Any] = {
        "command": command,
        "code": error.code,
        "category": str(error.category),
        "exit_code": int(error.exit_code),
    }
    problems = getattr(error, "problems", None)
    if problems:
        context["problems"] = [p.as_dict() if hasattr(p, "as_dict") else str(p) for p in problems]
    level = LogLevel.FATAL if error.exit_code == ExitCode.INTERNAL_ERROR else LogLevel.ERROR
    log.log(level, error.message or type(error).__name__, **context)
    return int(error.exit_code)


@contextmanager
def json_report(**fields: Any) -> Iterator[None]:
    """A command whose stdout is a JSON report still prints one when it fails: these
    fields and the `error` object (spec section 5), then the failure goes to the edge."""
    try:
        yield
    except Exception as exc:
        error = as_error(exc)
        _print_json({**fields, "error": error.to_error()})
        if error is exc:
            raise
        raise error from exc


# --- baqup emit ----------------------------------------------------------------------


@tool.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def emit(args: tuple[str, ...]) -> int:
    """Write a control message to $BAQUP_CONTROL_FD (for shell agents under baqup-run)."""
    from .emit import run

    # Only `baqup --help` and callers of `tool_run` get here; the console script
    # serves `baqup emit` in emit.py without importing click at all.
    return run(args)


# --- baqup verify, decrypt --------------------------------------------------------------


@tool.command()
@click.argument("job_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--no-checksums", is_flag=True, help="Check presence and sizes only.")
def verify(job_dir: Path, no_checksums: bool) -> int:
    """Check a committed job dir: manifest, every artifact, sizes and checksums.

    Prints a JSON report; exits 0 when valid, 65 when incomplete or corrupt, 74 when a
    file could not be read. An invalid report's `error` names the first problem's code
    (CHECKSUM_MISMATCH, TRUNCATED, ARTIFACT_MISSING, MANIFEST_MISSING, ...).
    """
    from .verify import verify_job_dir

    with json_report(job_dir=str(job_dir), valid=False):
        report = verify_job_dir(job_dir, check_checksums=not no_checksums)
    _print_json(report)
    if report["valid"]:
        return int(ExitCode.SUCCESS)
    error = report["error"]
    return _log_report_error(error, command="verify")


def _log_report_error(error: dict[str, Any], *, command: str) -> int:
    """The log record of a failure already described by a report's `error` object."""
    from .logs import logger_from_environ
    from .secret import Redactor

    log = logger_from_environ(os.environ, Redactor.from_environ(os.environ)).bind(component="baqup")
    log.error(
        str(error["message"]),
        command=command,
        code=error["code"],
        category=error["category"],
        exit_code=error["exit_code"],
    )
    return int(error["exit_code"])


@tool.command()
@click.argument("parts", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the plaintext here (atomically) instead of stdout.",
)
@click.option(
    "--key-env",
    default="BAQUP_SECRET_ENCRYPTION_KEY",
    show_default=True,
    help="The environment variable holding the key (hex or base64).",
)
@click.option(
    "-i",
    "--identity",
    "identity_files",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="An age identity file (as age-keygen writes it) for an age artifact; repeatable. "
    "Else the identities in $BAQUP_SECRET_AGE_IDENTITY.",
)
@click.option(
    "--decompress",
    type=click.Choice(["auto", "zstd", "gzip", "lz4", "none"]),
    default="none",
    show_default=True,
    help="Also decompress (auto: from the file name before .enc or .age).",
)
def decrypt(
    parts: tuple[Path, ...],
    output: Path | None,
    key_env: str,
    identity_files: tuple[Path, ...],
    decompress: str,
) -> int:
    """Decrypt an encrypted artifact (its PARTS in order); fail loudly on any tampering.

    Opens baqup-stream-v1 and v2 (the key from --key-env) and age files (identities
    from -i FILE or BAQUP_SECRET_AGE_IDENTITY), told apart by their first bytes.
    A failure is logged with its code (DECRYPTION_FAILED, TRUNCATED, ...); with
    --output, stdout (not the plaintext's channel then) also gets a JSON report of it.
    """
    from .age import parse_identities, read_identity_file
    from .compression import ChunkReader
    from .encryption import IDENTITY_VARIABLE, decrypt_stream, parse_key
    from .restore import ConcatReader, write_decoded
    from .secret import Secret

    reported = (
        json_report(parts=[str(p) for p in parts], output=str(output))
        if output is not None
        else nullcontext()
    )
    with reported:
        key_text = os.environ.get(key_env, "")
        identity_text = os.environ.get(IDENTITY_VARIABLE, "")
        identities = [i for path in identity_files for i in read_identity_file(path)]
        if not identities and identity_text.strip():
            identities = parse_identities(Secret(identity_text), IDENTITY_VARIABLE)
        # with only identities given, no key is needed; the stream says which it wants
        key = parse_key(Secret(key_text), key_env) if key_text.strip() or not identities else None
        algorithm = decompress
        if algorithm == "auto":
            from .restore import stored_compression

            algorithm = stored_compression(parts[0].name)
        with ConcatReader(parts) as reader:
            write_decoded(ChunkReader(decrypt_stream(reader, key, identities)), output, algorithm)
    return int(ExitCode.SUCCESS)


@tool.command("watch")
@click.argument("job_id")
@click.option(
    "--bus",
    "bus_url",
    envvar="BAQUP_BUS_URL",
    required=True,
    help="The bus URL [default: $BAQUP_BUS_URL].",
)
@click.option(
    "--prefix",
    envvar="BAQUP_BUS_KEY_PREFIX",
    default="baqup:",
    show_default=True,
    help="The key prefix [default: $BAQUP_BUS_KEY_PREFIX].",
)
@click.option("--timeout", type=click.FloatRange(min=0), help="Give up after SECONDS (exit 69).")
@click.option("--interval", type=click.FloatRange(min=0.05), default=0.5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON lines even on a terminal.")
def watch_command(
    job_id: str, bus_url: str, prefix: str, timeout: float | None, interval: float, as_json: bool
) -> int:
    """Follow JOB_ID's heartbeat, progress, events and status until it ends.

    Exits with the job's exit code once its status arrives.
    """
    import redis

    from .errors import ResourceUnavailable
    from .secret import Secret
    from .watch import open_source, watch

    try:
        source = open_source(Secret(bus_url), prefix, job_id, timeout=5.0)
        tty = sys.stdout.isatty() and not as_json
        return watch(source, out=sys.stdout, tty=tty, interval=interval, timeout=timeout)
    except redis.RedisError as exc:
        # the bus being down is the controller's transient condition (69), not a bug (70)
        raise ResourceUnavailable(
            f"the bus is unreachable: {exc}", code="BUS_UNREACHABLE"
        ) from None


@tool.command("extract")
@click.argument("archive", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--compression",
    type=click.Choice(["auto", "zstd", "gzip", "lz4", "none"]),
    default="auto",
    show_default=True,
)
def extract_command(archive: Path, dest: Path, compression: str) -> int:
    """Extract a tar ARCHIVE into DEST, refusing the whole archive on any unsafe member.

    Refused: absolute names, '..', paths through a symlink, links leaving DEST, device
    nodes, FIFOs, pathological archives. setuid/setgid bits are stripped. Exit 65 on a
    refusal, whose code (SECURITY_VIOLATION, TRUNCATED, ANOMALY_DETECTED, ...) is in
    the log record, in the JSON report's `error` on stdout and, under baqup-run, in an
    event. ARCHIVE `-` reads stdin, spooled first to a private unnamed temp file
    ($BAQUP_WORK_DIR under baqup-run), since every member is validated before anything
    is written.
    """
    shown_as = str(archive)
    with json_report(archive=shown_as, dest=str(dest)), _event_on_failure(shown_as):
        if shown_as == "-":
            from .extract import spooled

            spool_dir = os.environ.get("BAQUP_WORK_DIR") or None
            with spooled(sys.stdin.buffer, spool_dir) as spool:
                report = _extract(spool, dest, compression)
        else:
            if not archive.is_file():
                raise UsageError(f"archive not found: {archive}", code="ARCHIVE_MISSING")
            report = _extract(archive, dest, compression)
    _print_json({"archive": shown_as, "dest": str(dest), **report})
    return int(ExitCode.SUCCESS)


def _extract(archive: Path | IO[bytes], dest: Path, compression: str) -> dict[str, Any]:
    from dataclasses import asdict

    from .extract import extract

    emit = _supervised_emit if "BAQUP_CONTROL_FD" in os.environ else None
    return asdict(extract(archive, dest, compression=compression, emit=emit))


@contextmanager
def _event_on_failure(path: str) -> Iterator[None]:
    """Under baqup-run, a failure is also an event of the job (best effort)."""
    try:
        yield
    except Exception as exc:
        error = as_error(exc)
        _emit_event_if_supervised(error.code, error.message, path)
        raise


def _emit_event_if_supervised(code: str, message: str, path: str) -> None:
    """Under baqup-run, tell the supervisor too (best effort, never fails the command)."""
    if "BAQUP_CONTROL_FD" in os.environ:
        from .secret import Redactor

        _supervised_emit(
            {
                "type": "event",
                "code": code,
                "severity": "error",
                # redacted before the cut: the supervisor cannot mask a secret's start it
                # receives already cut
                "message": Redactor.from_environ(os.environ).clip(message, 1000),
                "path": path,
            }
        )


@tool.command("archive")
@click.argument("source", type=click.Path(file_okay=False, exists=True))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the tar here instead of stdout.",
)
@click.option(
    "--symlinks",
    envvar="BAQUP_SOURCE_FOLLOW_SYMLINKS",
    default="shallow",
    type=click.Choice(["follow", "skip", "fail", "shallow"]),
    show_default=True,
    help="Symlink policy [default: $BAQUP_SOURCE_FOLLOW_SYMLINKS].",
)
@click.option(
    "--exclude",
    "excludes",
    multiple=True,
    metavar="PATTERN",
    help="Exclude a pattern (repeatable) [default: $BAQUP_SOURCE_EXCLUDE].",
)
@click.option(
    "--max-files",
    envvar="BAQUP_SOURCE_MAX_FILES",
    type=click.IntRange(min=0),
    default=0,
    help="Abort past this many files [default: $BAQUP_SOURCE_MAX_FILES].",
)
@click.option(
    "--max-depth",
    envvar="BAQUP_SOURCE_MAX_DEPTH",
    type=click.IntRange(min=0),
    default=0,
    help="Do not enter deeper directories [default: $BAQUP_SOURCE_MAX_DEPTH].",
)
def archive_command(
    source: str,
    output: Path | None,
    symlinks: str,
    excludes: tuple[str, ...],
    max_files: int,
    max_depth: int,
) -> int:
    """Write a tar of SOURCE, walked under the contract's boundary and symlink rules."""
    from .archive import write_archive
    from .coerce import CoercionError, parse_multi_value

    patterns = list(excludes)
    if not patterns and os.environ.get("BAQUP_SOURCE_EXCLUDE"):
        try:
            patterns = parse_multi_value(os.environ["BAQUP_SOURCE_EXCLUDE"])
        except CoercionError as exc:
            raise UsageError(f"BAQUP_SOURCE_EXCLUDE: expected {exc.message}") from None
    supervised = "BAQUP_CONTROL_FD" in os.environ
    emit = _supervised_emit if supervised else None
    if output is None:
        write_archive(
            source,
            sys.stdout.buffer,
            policy=symlinks,
            exclude=patterns,
            max_files=max_files,
            max_depth=max_depth,
            emit=emit,
        )
        sys.stdout.buffer.flush()
        return int(ExitCode.SUCCESS)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            stats = write_archive(
                source,
                handle,
                policy=symlinks,
                exclude=patterns,
                max_files=max_files,
                max_depth=max_depth,
                emit=emit,
            )
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    click.echo(f"{output}: {stats['files']} files, {stats['bytes']} bytes", err=True)
    return int(ExitCode.SUCCESS)


def _supervised_emit(message: dict[str, Any]) -> None:
    """Best effort: a control message to baqup-run; never fails the command."""
    from .emit import write_message

    try:
        write_message(message)
    except (BaqupError, TypeError, ValueError):
        pass


# --- baqup inspect, preflight (preflight.py) -------------------------------------------

from .preflight import inspect_command, preflight_command  # noqa: E402 - registered last

tool.add_command(inspect_command)
tool.add_command(preflight_command)
