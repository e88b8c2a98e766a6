"""The command-line edge: `baqup-run` and `baqup`.

Parses arguments, dispatches, and turns errors into exit codes and messages; nothing
else happens here (STYLE habit 2). Heavy modules (jsonschema, redis) are imported
inside the commands that need them, so `--help` and `--version` stay fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import click

from . import __version__
from .contract import ROLES, ExitCode, LogLevel
from .errors import BaqupError, UsageError

if TYPE_CHECKING:
    from .config import Config


@dataclass(frozen=True)
class RunRequest:
    """What the command line asked baqup-run to do."""

    schema: str | None = None
    role: str | None = None
    stdout_artifact: str | None = None
    stdin_artifact: str | None = None
    grace: float = 10.0
    progress_from: str | None = None
    validate: bool = False
    info: bool = False
    words: tuple[str, ...] = ()
    command: tuple[str, ...] | None = None  # the words after `--`, when given


_RUN_HELP = """Supervise COMMAND as one baqup job, or run the command the schema maps ROLE to.

\b
  baqup-run [OPTIONS] -- COMMAND [ARG...]
  baqup-run [OPTIONS] ROLE
  baqup-run --validate | --info | --version

Configuration comes from BAQUP_* environment variables (see the README).
"""


@click.command(
    help=_RUN_HELP,
    context_settings={"help_option_names": ["-h", "--help"], "allow_interspersed_args": False},
)
@click.option(
    "--schema",
    metavar="PATH",
    help="The agent's agent-schema.json "
    "[default: $BAQUP_AGENT_SCHEMA, ./agent-schema.json, /etc/baqup/agent-schema.json].",
)
@click.option(
    "--role",
    type=click.Choice(ROLES),
    help="The job's role [default: ROLE, the schema's first role, else snapshot].",
)
@click.option(
    "--stdout-artifact",
    metavar="NAME",
    help="Capture the child's stdout as artifact NAME (compressed and checksummed on the fly).",
)
@click.option(
    "--stdin-artifact",
    metavar="NAME",
    help="(restore) Verify NAME against the manifest and stream it into the child's stdin.",
)
@click.option(
    "--progress-from",
    type=click.Choice(["pv", "restic-json"]),
    help="Turn the child's `pv -n` (stderr) or `restic --json` (stdout) output into progress.",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="Time between SIGTERM and SIGKILL for the child.",
)
@click.option("--validate", is_flag=True, help="Check the environment; print JSON; exit 0 or 64.")
@click.option("--info", is_flag=True, help="Print the self-description JSON.")
@click.version_option(
    __version__, "--version", prog_name="baqup-run", message="%(prog)s %(version)s"
)
@click.argument("words", nargs=-1, type=click.UNPROCESSED, metavar="[ROLE | -- COMMAND [ARG...]]")
def _run_command(**params: Any) -> RunRequest:
    params["words"] = tuple(params["words"])
    return RunRequest(**params)


def parse_run_args(argv: Sequence[str]) -> RunRequest | int:
    """The request, or an exit code when click already answered (--help, --version)."""
    args = list(argv)
    command: tuple[str, ...] | None = None
    if "--" in args:
        cut = args.index("--")
        args, command = args[:cut], tuple(args[cut + 1 :])
    try:
        result = _run_command.main(args, prog_name="baqup-run", standalone_mode=False)
    except click.ClickException as exc:
        raise UsageError(exc.format_message()) from None
    if isinstance(result, int):
        return result
    if not isinstance(result, RunRequest):
        return 0
    if command is not None:
        if result.words:
            raise UsageError(f"unexpected words before '--': {' '.join(result.words)}")
        if not command:
            raise UsageError("no command after '--'")
        return RunRequest(**{**result.__dict__, "command": command})
    return result


def _print_json(document: Any) -> None:
    from .logs import dumps

    sys.stdout.write(dumps(document).decode() + "\n")
    sys.stdout.flush()


def _validate(request: RunRequest) -> int:
    from .config import load_config

    return report_validation(load_config(os.environ, request.schema))


def report_validation(config: Config) -> int:
    """`--validate`'s answer (and `baqup preflight`'s): every warning and problem logged,
    the JSON document on stdout, exit 0 or 64."""
    from .logs import logger_from_environ

    log = logger_from_environ(os.environ, config.redactor)
    for warning in config.warnings:
        log.warn(str(warning), variable=warning.variable)
    for problem in config.problems:
        log.error(str(problem), variable=problem.variable, keyword=problem.keyword)
    _print_json({"valid": config.valid, "errors": [p.as_dict() for p in config.problems]})
    return int(ExitCode.SUCCESS if config.valid else ExitCode.USAGE_CONFIG_ERROR)


def _info(request: RunRequest) -> int:
    from .config import find_schema_path, load_agent_schema
    from .info import describe

    path, _ = find_schema_path(request.schema, os.environ)
    meta = load_agent_schema(path).get("x-baqup-agent", {}) if path else {}
    _print_json(describe(meta))
    return int(ExitCode.SUCCESS)


def _report(error: BaseException, code: int) -> None:
    """Last-resort report of an error that ended baqup-run before a job logger existed."""
    from .logs import logger_from_environ
    from .secret import Redactor

    redactor = Redactor.from_environ(os.environ)
    log = logger_from_environ(os.environ, redactor)
    problems = getattr(error, "problems", None)
    if problems:
        for problem in problems:
            log.error(str(problem), variable=problem.variable, keyword=problem.keyword)
    else:
        level = LogLevel.FATAL if code == ExitCode.INTERNAL_ERROR else LogLevel.ERROR
        log.log(level, str(error) or error.__class__.__name__, exit_code=code)


def run(argv: Sequence[str] | None = None) -> int:
    """baqup-run as a function: the exit code for this command line."""
    try:
        request = parse_run_args(sys.argv[1:] if argv is None else argv)
        if isinstance(request, int):
            return request
        if request.validate:
            return _validate(request)
        if request.info:
            return _info(request)
        from .job import run_job

        return run_job(request)
    except BaqupError as exc:
        _report(exc, int(exc.exit_code))
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.GENERAL_FAILURE)
    except Exception as exc:  # noqa: BLE001 - the edge: anything unexpected is exit 70
        _report(exc, int(ExitCode.INTERNAL_ERROR))
        return int(ExitCode.INTERNAL_ERROR)


def run_main() -> NoReturn:
    from .signals import block_job_signals

    block_job_signals()  # entry.py did it already; a caller of run_main alone gets it here
    sys.exit(run())
