"""The companion tool `baqup`: commands for children, operators and the controller side.

Parses and dispatches only (STYLE habit 2): `emit` for shell agents, `verify`, `decrypt`,
`extract`, `archive`, `watch` and `labels`. Each command imports what it needs when it
runs; errors become exit codes here, as in `cli.py` for baqup-run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from . import __version__
from .cli import _print_json, _report
from .contract import ExitCode
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
    try:
        result = tool.main(
            list(sys.argv[1:] if argv is None else argv), prog_name="baqup", standalone_mode=False
        )
        return result if isinstance(result, int) else 0
    except click.ClickException as exc:
        click.echo(f"baqup: {exc.format_message()}", err=True)
        return int(ExitCode.USAGE_CONFIG_ERROR)
    except click.exceptions.Abort:
        return int(ExitCode.GENERAL_FAILURE)
    except BaqupError as exc:
        _report(exc, int(exc.exit_code))
        return int(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - the edge
        _report(exc, int(ExitCode.INTERNAL_ERROR))
        return int(ExitCode.INTERNAL_ERROR)


def tool_main() -> NoReturn:
    sys.exit(tool_run())


# --- baqup emit ----------------------------------------------------------------------


@tool.group()
def emit() -> None:
    """Write a control message to $BAQUP_CONTROL_FD (for shell agents under baqup-run)."""


@emit.command("progress")
@click.option("--percent", type=click.FloatRange(0, 100), help="Percent complete.")
@click.option("--bytes", "bytes_", type=click.IntRange(min=0), help="Bytes processed.")
@click.option("--files", type=click.IntRange(min=0), help="Files processed.")
@click.option("--current-file", help="The file being processed.")
@click.option("--eta", type=click.FloatRange(min=0), help="Estimated seconds remaining.")
def emit_progress(
    percent: float | None,
    bytes_: int | None,
    files: int | None,
    current_file: str | None,
    eta: float | None,
) -> None:
    """Report progress."""
    from .emit import drop_none, write_message

    write_message(
        drop_none(
            {
                "type": "progress",
                "percent_complete": percent,
                "bytes_processed": bytes_,
                "files_processed": files,
                "current_file": current_file,
                "estimated_remaining_seconds": eta,
            }
        )
    )


@emit.command("intent")
@click.argument("operation", required=False)
@click.option(
    "--expected-seconds",
    type=click.FloatRange(min=0),
    help="How long the operation is expected to take.",
)
@click.option("--detail", help="What the operation works on.")
@click.option("--clear", is_flag=True, help="Clear the current intent.")
def emit_intent(
    operation: str | None, expected_seconds: float | None, detail: str | None, clear: bool
) -> None:
    """Declare a long operation (carried in every heartbeat), or --clear it."""
    from .emit import drop_none, write_message

    if clear == bool(operation):
        raise UsageError("give an OPERATION or --clear (not both)")
    if clear:
        write_message({"type": "intent", "operation": None})
        return
    write_message(
        {
            "type": "intent",
            "operation": operation,
            **drop_none({"expected_duration_seconds": expected_seconds, "detail": detail}),
        }
    )


@emit.command("event")
@click.argument("code")
@click.option(
    "--severity",
    type=click.Choice(["trace", "debug", "info", "warn", "error", "fatal"]),
    default="warn",
    show_default=True,
)
@click.option("--message", "-m", help="What happened.")
@click.option("--path", help="The file or resource concerned.")
def emit_event(code: str, severity: str, message: str | None, path: str | None) -> None:
    """Report an event (aggregated per CODE, e.g. PERMISSION_DENIED)."""
    from .emit import drop_none, write_message

    write_message(
        drop_none(
            {"type": "event", "code": code, "severity": severity, "message": message, "path": path}
        )
    )


@emit.command("artifact")
@click.argument("filename")
@click.option("--compression", help="zstd, gzip, lz4 or none [default: from the suffix].")
def emit_artifact(filename: str, compression: str | None) -> None:
    """Declare FILENAME (relative to $BAQUP_WORK_DIR) an artifact."""
    from .emit import drop_none, write_message

    write_message(drop_none({"type": "artifact", "filename": filename, "compression": compression}))


@emit.command("component")
@click.argument("name")
@click.option("--status", type=click.Choice(["success", "failed"]), required=True)
@click.option("--artifact", help="The component's artifact (relative to $BAQUP_WORK_DIR).")
@click.option("--error", "error_code", help="Error code of a failed component.")
@click.option("--error-message", help="Error message of a failed component.")
def emit_component(
    name: str, status: str, artifact: str | None, error_code: str | None, error_message: str | None
) -> None:
    """Report one component's result (for partial failure)."""
    from .emit import drop_none, write_message

    error = drop_none({"code": error_code, "message": error_message}) or None
    write_message(
        drop_none(
            {
                "type": "component",
                "name": name,
                "status": status,
                "artifact": artifact,
                "error": error,
            }
        )
    )


@emit.command("metadata")
@click.argument("pairs", nargs=-1, required=True, metavar="KEY=VALUE...")
def emit_metadata(pairs: tuple[str, ...]) -> None:
    """Merge KEY=VALUE pairs into the manifest's source_metadata (JSON values allowed)."""
    from .emit import parse_pairs, write_message

    write_message({"type": "metadata", "source_metadata": parse_pairs(pairs, "metadata")})


@emit.command("log")
@click.argument("message")
@click.option(
    "--level",
    type=click.Choice(["trace", "debug", "info", "warn", "error", "fatal"]),
    default="info",
    show_default=True,
)
@click.option(
    "--context", "pairs", multiple=True, metavar="KEY=VALUE", help="Context fields (repeatable)."
)
def emit_log(message: str, level: str, pairs: tuple[str, ...]) -> None:
    """Log MESSAGE as a structured record of the job."""
    from .emit import parse_pairs, write_message

    write_message(
        {
            "type": "log",
            "level": level,
            "message": message,
            "context": parse_pairs(pairs, "--context"),
        }
    )


# --- baqup verify, decrypt --------------------------------------------------------------


@tool.command()
@click.argument("job_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--no-checksums", is_flag=True, help="Check presence and sizes only.")
def verify(job_dir: Path, no_checksums: bool) -> int:
    """Check a committed job dir: manifest, every artifact, sizes and checksums.

    Prints a JSON report; exits 0 when valid, 65 when incomplete or corrupt.
    """
    from .verify import verify_job_dir

    report = verify_job_dir(job_dir, check_checksums=not no_checksums)
    _print_json(report)
    return int(ExitCode.SUCCESS if report["valid"] else ExitCode.DATA_ERROR)


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
    "--decompress",
    type=click.Choice(["auto", "zstd", "gzip", "lz4", "none"]),
    default="none",
    show_default=True,
    help="Also decompress (auto: from the file name before .enc).",
)
def decrypt(parts: tuple[Path, ...], output: Path | None, key_env: str, decompress: str) -> int:
    """Decrypt an encrypted artifact (its PARTS in order); fail loudly on any tampering."""
    from .encryption import decrypt_stream, parse_key
    from .restore import ConcatReader, decoded_output
    from .secret import Secret

    key = parse_key(Secret(os.environ.get(key_env, "")), key_env)
    algorithm = decompress
    if algorithm == "auto":
        from .restore import stored_compression

        algorithm = stored_compression(parts[0].name)
    with ConcatReader(parts) as reader, decoded_output(output, algorithm) as sink:
        for chunk in decrypt_stream(reader, key):
            sink(chunk)
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
    from .secret import Secret
    from .watch import open_source, watch

    source = open_source(Secret(bus_url), prefix, job_id, timeout=5.0)
    tty = sys.stdout.isatty() and not as_json
    return watch(source, out=sys.stdout, tty=tty, interval=interval, timeout=timeout)


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
    refusal (reported as a SECURITY_VIOLATION event when run under baqup-run). ARCHIVE
    `-` reads stdin, spooled first to a temp file ($BAQUP_WORK_DIR under baqup-run),
    since every member is validated before anything is written.
    """
    import tempfile

    if str(archive) == "-":
        spool_dir = os.environ.get("BAQUP_WORK_DIR") or None
        with tempfile.NamedTemporaryFile(dir=spool_dir, prefix=".baqup-extract-") as spool:
            while chunk := sys.stdin.buffer.read(1024 * 1024):
                spool.write(chunk)
            spool.flush()
            return _extract(Path(spool.name), dest, compression, shown_as="-")
    if not archive.is_file():
        raise UsageError(f"archive not found: {archive}")
    return _extract(archive, dest, compression, shown_as=str(archive))


def _extract(archive: Path, dest: Path, compression: str, *, shown_as: str) -> int:
    from dataclasses import asdict

    from .errors import SecurityViolation
    from .extract import extract

    try:
        report = extract(archive, dest, compression=compression)
    except BaqupError as exc:
        _emit_event_if_supervised(
            "SECURITY_VIOLATION" if isinstance(exc, SecurityViolation) else exc.code,
            exc.message,
            shown_as,
        )
        raise
    _print_json({"archive": shown_as, "dest": str(dest), **asdict(report)})
    return int(ExitCode.SUCCESS)


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
    except BaqupError:
        pass
