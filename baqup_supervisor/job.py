"""baqup-run's main path: one command line to one supervised job, to one exit code.

Owns what happens around the RUNNING phase: reading and validating the configuration,
resolving the role and the command (`baqup-run ROLE` looks it up in the schema's
`x-baqup-agent.commands`, with its per-role options), the INITIALIZING steps in order
(bus, staging, restore source; a SIGTERM or the phase timeout between any two), the
COMPLETING commit, and handing the end to the session. The child itself is the
supervisor's (supervisor.py).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from .child import set_child_subreaper
from .cli import RunRequest
from .config import load_config
from .contract import ROLES, AgentState, ExitCode, LogLevel
from .encryption import IDENTITY_VARIABLE, KEY_VARIABLE
from .encryption_settings import identity_lines
from .errors import BaqupError, DataError, JobFailed, ShutdownRequested, UsageError
from .logs import Logger, logger_from_environ
from .names import MANIFEST
from .session import Session
from .settings import Settings
from .signals import SignalRouter
from .supervisor import Supervisor
from .tracing import keep_out as keep_out_tracing

if TYPE_CHECKING:
    from .restore import RestoreSource, StoredArtifact


def ensure_std_fds() -> None:
    """Open /dev/null on any of fds 0-2 that is closed, so pipes never land there."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _resolve(
    request: RunRequest, settings_meta: Mapping[str, Any]
) -> tuple[str | None, list[str], dict[str, Any]]:
    """(role, argv, per-role options) from the request and the schema's commands."""
    commands = settings_meta.get("commands")
    commands = commands if isinstance(commands, Mapping) else {}
    role = request.role
    if request.command is None and request.words:
        word = request.words[0]
        if len(request.words) == 1 and (word in ROLES or word in commands):
            if role is not None and role != word:
                raise UsageError(f"--role {role} contradicts the role word {word}")
            role = word
        else:
            return role, list(request.words), {}
    if request.command is not None:
        return role, list(request.command), {}
    chosen = role or next(iter(commands), None)
    if chosen is None or chosen not in commands:
        raise UsageError(
            "no command: use `baqup-run [OPTIONS] -- COMMAND [ARG...]`, or `baqup-run ROLE` "
            "with a schema whose x-baqup-agent.commands maps ROLE"
            + (f" (role {chosen!r} has no command)" if chosen else "")
        )
    spec = commands[chosen]
    options = dict(spec) if isinstance(spec, Mapping) else {"argv": list(spec)}
    return chosen, [str(a) for a in options.pop("argv")], options


def run_job(request: RunRequest) -> int:
    """baqup-run's main path: the exit code of one supervised job."""
    ensure_std_fds()
    environ = dict(os.environ)
    config = load_config(environ, request.schema)
    # an identity file's text holds comments (its public key) and key lines: each key
    # line is a secret of its own, wherever it turns up without the rest
    config.redactor.add(*identity_lines(config.secret(IDENTITY_VARIABLE)))
    boot_log = logger_from_environ(environ, config.redactor)
    for warning in config.warnings:
        boot_log.warn(str(warning), variable=warning.variable)
    if not config.valid:
        config.raise_for_problems()
    role, argv, options = _resolve(request, config.agent_meta)
    settings = Settings.from_config(config, role=role, environ=environ)
    if not settings.values.get("BAQUP_AGENT_TRACING_ENABLED"):
        keep_out_tracing()
    log = logger_from_environ(environ, config.redactor, agent_id=settings.agent_id)
    session = Session(settings, log, config.redactor)
    session.allow_empty = bool(options.get("allow_empty_artifact", False))
    supervisor = Supervisor(
        session,
        argv,
        environ,
        grace=request.grace,
        extra_env=options.get("env"),
        stdout_artifact=request.stdout_artifact
        if request.stdout_artifact is not None
        else options.get("stdout_artifact"),
        stdin_artifact=request.stdin_artifact or options.get("stdin_artifact"),
        progress_from=request.progress_from or options.get("progress_from"),
    )
    if supervisor.stdout_artifact is not None:
        supervisor.prepare_capture(config.secret(KEY_VARIABLE))
    if supervisor.stdin_artifact:
        supervisor.prepare_restore(config.secret(KEY_VARIABLE), config.secret(IDENTITY_VARIABLE))
    restore = RestoreStep(session, supervisor, environ) if settings.role == "restore" else None
    return _drive(session, supervisor, log, restore)


class RestoreStep:
    """A restore's INITIALIZING step: the committed snapshot it reads (INTERFACE.md 11).

    Built before the bus is touched, because a restore carrying the snapshot's own job
    id would report over the snapshot's keys: that is refused (64) with nothing written.
    Any other problem of the source is the restore's own failure, reported under its
    own job id once the bus is up. A restore naming no source (no BAQUP_RESTORE_FROM,
    no --stdin-artifact, no manifest in its job dir) restores from elsewhere: no step.
    """

    def __init__(self, session: Session, supervisor: Supervisor, environ: dict[str, str]):
        from .restore import RESTORE_FROM, check_own_job, read_source, source_path

        self.session = session
        self.supervisor = supervisor
        settings = session.settings
        self.path, named = source_path(settings.values, settings.job_dir)
        self.source: RestoreSource | None = None
        self.error: BaqupError | None = None
        self.wanted = named or bool(supervisor.stdin_artifact) or (self.path / MANIFEST).exists()
        if not self.wanted:
            return
        supervisor.environ[RESTORE_FROM] = str(self.path)  # the child sees its snapshot
        try:
            self.source = read_source(self.path)
        except BaqupError as exc:
            self.error = exc
            return
        check_own_job(self.source, settings.job_id)
        session.restored_from = self.source.restored_from()

    def verify(self) -> None:
        """Before the child starts: the manifest, then the artifact fed to the child (every
        part, opened once) or, with none named, every artifact of the snapshot."""
        from .restore import locate, verify_source

        if self.error is not None:
            raise self.error
        if self.source is None:
            return
        supervisor, name = self.supervisor, self.supervisor.stdin_artifact
        if not name:
            verify_source(self.source)
            self.session.log.info("restore source verified", path=str(self.path))
            return
        stored = locate(self.source.path, name, self.source.manifest)
        needs = _missing_decryption(stored, supervisor)
        if needs is not None:
            # refused before the child starts: it would act on an empty stream (create
            # a database, say) before the feeder could fail
            raise DataError(
                f"{name} is encrypted: set {needs} to restore it", code="DECRYPTION_FAILED"
            )
        supervisor.restore_source = stored
        self.session.log.info(
            "restore source verified",
            path=str(self.path),
            artifact=name,
            parts=len(stored.paths),
            bytes=stored.size,
        )


def _missing_decryption(stored: StoredArtifact, supervisor: Supervisor) -> str | None:
    """The variable a restore of this encrypted artifact lacks, or None."""
    if not stored.encrypted:
        return None
    if ".age" in PurePosixPath(stored.paths[0].name).suffixes:
        return None if supervisor.identities else IDENTITY_VARIABLE
    return None if supervisor.key is not None else KEY_VARIABLE


def _drive(
    session: Session, supervisor: Supervisor, log: Logger, restore: RestoreStep | None
) -> int:
    subreaper = set_child_subreaper()
    router = SignalRouter(
        supervisor.on_signal, on_error=lambda exc: log.error(f"signal handling: {exc}")
    )
    error: BaseException | None = None
    with router:
        try:
            log.info(
                "job starting", role=session.settings.role, subreaper=subreaper, pid=os.getpid()
            )
            session.connect()
            supervisor.announce()
            supervisor.checkpoint()
            session.prepare_staging(restore.path if restore is not None else None)
            if restore is not None:
                restore.verify()
            supervisor.checkpoint()
            session.lifecycle.advance(AgentState.RUNNING)
            supervisor.run()
            session.lifecycle.advance(AgentState.COMPLETING)
            session.commit()
            for late in supervisor.take_terms():
                log.warn(
                    f"{signal.Signals(late).name} during COMPLETING: the commit finished first"
                )
        except ShutdownRequested as exc:
            error = JobFailed(
                f"terminated by {signal.Signals(exc.signum).name} before the command started",
                code="ABORTED",
            )
        except BaqupError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - the job's end must always be reported
            log.log(LogLevel.FATAL, f"internal error: {type(exc).__name__}: {exc}")
            error = exc
        if error is not None and not session.settings.retain_on_failure:
            try:
                session.staging.empty()
            except OSError as exc:
                log.warn("could not empty the work dir", reason=exc.strerror)
        code = session.finish(error)
        supervisor.close()
    return code if code in {int(c) for c in ExitCode} else int(ExitCode.INTERNAL_ERROR)
