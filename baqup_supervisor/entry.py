"""The entry point of `baqup-run` (the console script and `python -m baqup_supervisor`).

Its one job is to block the job's signals before anything else is imported (INTERFACE.md
13): from the moment this module runs, a SIGTERM or a controller's SIGUSR1 is held by the
kernel until the router takes it, never fatal. What runs before it is the interpreter's own
start and the package's `__init__`, which therefore imports nothing. Must never import
anything but `signals` (standard library only) before blocking.
"""

from __future__ import annotations

from .signals import block_job_signals

block_job_signals()


def main() -> None:
    from .cli import run_main

    run_main()
