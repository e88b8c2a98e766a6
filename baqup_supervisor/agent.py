"""The in-process SDK: a Python agent as a context manager, on the same core as baqup-run.

    from baqup_supervisor.agent import Agent

    with Agent() as agent:                      # INITIALIZING -> RUNNING
        path = agent.artifact_path("data.json") # a declared artifact in the work dir
        path.write_text(...)
        agent.progress(percent=100, bytes=path.stat().st_size)
    raise SystemExit(agent.exit_code)           # COMPLETING -> TERMINATED, manifest committed

`Agent` builds the configuration from the environment, then drives the very
`Session` that baqup-run drives (session.py): the lifecycle, heartbeat thread, bus
and fallback buffer, event aggregation, staging, manifest and final status. Only
what differs for in-process code lives here: SIGTERM raises `ShutdownRequested`
into the agent's code while RUNNING (and waits for the commit in COMPLETING), and
SIGUSR1 beats at once.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from .config import load_config
from .contract import AgentState, ExitCode, LogLevel
from .errors import BaqupError, JobFailed, ShutdownRequested
from .logs import Logger, logger_from_environ
from .secret import Secret
from .session import Session
from .settings import Settings
from .staging import safe_relative


class Agent:
    """A baqup job run by Python code in this process."""

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        schema: str | None = None,
        role: str | None = None,
        handle_signals: bool = True,
    ) -> None:
        self.environ = dict(os.environ if environ is None else environ)
        self.config = load_config(self.environ, schema)
        boot = logger_from_environ(self.environ, self.config.redactor)
        for warning in self.config.warnings:
            boot.warn(str(warning), variable=warning.variable)
        self.config.raise_for_problems()
        self.settings = Settings.from_config(self.config, role=role, environ=self.environ)
        self.log: Logger = logger_from_environ(
            self.environ, self.config.redactor, agent_id=self.settings.agent_id
        ).bind(component="agent")
        self.session = Session(
            self.settings, self.log.bind(component="supervisor"), self.config.redactor
        )
        self.handle_signals = handle_signals
        self.exit_code: int | None = None
        self._originals: dict[int, Any] = {}
        self._late_terms: list[int] = []

    # --- the context ---------------------------------------------------------------------

    def __enter__(self) -> Agent:
        try:
            if self.handle_signals and threading.current_thread() is threading.main_thread():
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                    self._originals[signum] = signal.signal(signum, self._on_signal)
            self.session.connect()
            self.session.prepare_staging()
            self.session.lifecycle.advance(AgentState.RUNNING)
        except BaseException as exc:
            self.exit_code = self.session.finish(self._as_error(exc))
            self._restore_signals()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        error: BaseException | None = None
        if exc is not None:
            error = self._as_error(exc)
        else:
            try:
                self.session.lifecycle.advance(AgentState.COMPLETING)
                self.session.commit()
            except BaseException as commit_error:  # noqa: BLE001 - reported as the job's end
                error = self._as_error(commit_error)
        if error is not None and not self.settings.retain_on_failure:
            self.session.staging.empty()
        self.exit_code = self.session.finish(error)
        self._restore_signals()
        # The job's end is reported; a shutdown or a BaqupError is fully handled here.
        return exc is None or isinstance(exc, (BaqupError, ShutdownRequested))

    def _as_error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, ShutdownRequested):
            name = signal.Signals(exc.signum).name
            return JobFailed(f"terminated by {name}", code="ABORTED")
        if isinstance(exc, (BaqupError, Exception)):
            if not isinstance(exc, BaqupError):
                self.log.log(LogLevel.FATAL, f"agent error: {type(exc).__name__}: {exc}")
            return exc
        return JobFailed(f"interrupted: {type(exc).__name__}", code="ABORTED")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGUSR1:
            if self.session.heartbeat is not None:
                self.session.heartbeat.beat_now()
            return
        if self.session.lifecycle.state is AgentState.RUNNING:
            raise ShutdownRequested(signum)
        self._late_terms.append(signum)  # COMPLETING: the commit finishes first

    def _restore_signals(self) -> None:
        for signum, original in self._originals.items():
            signal.signal(signum, original)
        self._originals.clear()

    # --- what the agent reports ------------------------------------------------------------

    def progress(
        self,
        percent: float | None = None,
        *,
        bytes: int | None = None,
        files: int | None = None,
        current_file: str | None = None,
        eta: float | None = None,
    ) -> None:
        fields = {
            "percent_complete": percent,
            "bytes_processed": bytes,
            "files_processed": files,
            "current_file": current_file,
            "estimated_remaining_seconds": eta,
        }
        self.session.progress({k: v for k, v in fields.items() if v is not None})
        self.session.touch()

    def intent(
        self,
        operation: str | None,
        expected_seconds: float | None = None,
        detail: str | None = None,
    ) -> None:
        """Declare a long operation (None clears it); heartbeats carry it."""
        self.session.intent(operation, expected_seconds, detail)

    def event(
        self, code: str, *, severity: str = "warn", message: str = "", path: str | None = None
    ) -> None:
        self.session.event(code, severity, message, path)

    def artifact_path(self, name: str, *, compression: str | None = None) -> Path:
        """Declare `name` an artifact and return its path in the work dir (parents made)."""
        self.session.declare_artifact(name, compression)
        path = self.settings.work_dir / safe_relative(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def component(
        self,
        name: str,
        status: str,
        *,
        artifact: str | None = None,
        error: str | Mapping[str, Any] | None = None,
    ) -> None:
        if status not in ("success", "failed"):
            raise ValueError("status must be 'success' or 'failed'")
        entry: dict[str, Any] = {"name": name, "status": status}
        if artifact is not None:
            entry["artifact"] = str(safe_relative(artifact))
        if error is not None:
            entry["error"] = dict(error) if isinstance(error, Mapping) else {"code": error}
        self.session.components.append(entry)

    def metadata(self, **fields: Any) -> None:
        """Merge into the manifest's source_metadata."""
        self.session.source_metadata.update(fields)

    # --- what the agent reads --------------------------------------------------------------

    def __getitem__(self, name: str) -> Any:
        """A configuration value, typed, defaults applied (secrets as `Secret`)."""
        return self.config.values[name]

    def secret(self, name: str) -> Secret | None:
        return self.config.secret(name)

    @property
    def job_dir(self) -> Path:
        return self.settings.job_dir

    @property
    def work_dir(self) -> Path:
        return self.settings.work_dir

    @property
    def state(self) -> AgentState:
        return self.session.lifecycle.state

    @property
    def result(self) -> ExitCode:
        if self.exit_code is None:
            raise RuntimeError("the job has not ended")
        return ExitCode(self.exit_code)


def run(body: Any, **options: Any) -> int:
    """Run `body(agent)` as one job; the exit code (64 for a bad configuration).

    `raise SystemExit(run(main))` is a complete Python agent.
    """
    try:
        agent = Agent(**options)
    except BaqupError as exc:
        from .cli import _report

        _report(exc, int(exc.exit_code))
        return int(exc.exit_code)
    try:
        with agent:
            body(agent)
    except Exception:  # noqa: BLE001, S110 - already reported as the job's failure
        pass
    assert agent.exit_code is not None
    return agent.exit_code
