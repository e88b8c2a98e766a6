"""`baqup inspect` and `baqup preflight`: the controller's view of an image (INTERFACE §15).

Parses and dispatches only: the registry work is `registry.py`'s, the validation
`config.py`'s. Also owns the parser of Docker's `--env-file` format, which is pure.
Never: print a credential, or read the local filesystem on the container's behalf.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click

from .contract import ExitCode
from .errors import UsageError

F = TypeVar("F", bound=Callable[..., Any])


def parse_env_file(text: str, source: str, environ: Mapping[str, str]) -> dict[str, str]:
    """Docker's `--env-file`: KEY=VALUE lines taken literally (no quotes, no expansion),
    `#` comment lines and blank lines skipped, a bare KEY taken from `environ` if set."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not key or any(c.isspace() for c in key):
            raise UsageError(f"{source} line {number}: expected KEY=VALUE, got a bad variable name")
        if sep:
            values[key] = value
        elif key in environ:
            values[key] = environ[key]
    return values


def _read_env_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--env-file {path}: cannot be read: {exc}") from None
    return parse_env_file(text, str(path), os.environ)


def _registry_options(command: F) -> F:
    for option in reversed(
        [
            click.argument("image"),
            click.option(
                "--platform",
                default="linux/amd64",
                show_default=True,
                help="The platform an image index is resolved to (OS/ARCH[/VARIANT]).",
            ),
            click.option(
                "--insecure", is_flag=True, help="Allow a plain-HTTP registry (never by default)."
            ),
            click.option(
                "--timeout",
                type=click.FloatRange(min=0.1),
                default=10.0,
                show_default=True,
                help="Seconds per network operation.",
            ),
        ]
    ):
        command = option(command)
    return command


@click.command("inspect")
@_registry_options
def inspect_command(image: str, platform: str, insecure: bool, timeout: float) -> int:
    """Print IMAGE's digest, labels, schema and self-description, read from its registry
    without pulling it (credentials: BAQUP_REGISTRY_USERNAME with
    BAQUP_SECRET_REGISTRY_PASSWORD, else ~/.docker/config.json)."""
    from .cli import _print_json
    from .registry import inspect_image
    from .tool import json_report

    with json_report(image=image):
        document = inspect_image(image, platform=platform, insecure=insecure, timeout=timeout)
    _print_json(document)
    return int(ExitCode.SUCCESS)


@click.command("preflight")
@_registry_options
@click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Validate this file (Docker's KEY=VALUE format) instead of the environment.",
)
def preflight_command(
    image: str, platform: str, insecure: bool, timeout: float, env_file: Path | None
) -> int:
    """Validate the environment (or --env-file) against IMAGE's schema, as --validate does
    inside it: prints {"valid", "errors"}; exit 0 or 64 (69: registry unreachable)."""
    from .cli import report_validation
    from .registry import preflight
    from .tool import json_report

    with json_report(image=image, valid=False):
        job_environ = dict(os.environ) if env_file is None else _read_env_file(env_file)
        _, config = preflight(
            image, job_environ, platform=platform, insecure=insecure, timeout=timeout
        )
    return report_validation(config)
