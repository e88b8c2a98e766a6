"""The job session: the core that baqup-run and the in-process SDK share.

Owns one job's reporting plumbing and its end: the lifecycle, the bus transport and
outbox, the heartbeat thread, the reporter, the staging dir, what the child (or the
Python agent) told us over the control channel, and the final status with its exit
code. It knows nothing about child processes or signals: the supervisor
(supervisor.py) drives it for a command, the SDK for a Python agent.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from .bus import Keys, open_transport
from .clock import utc_iso
from .contract import ROLES, AgentState, ExitCode, LogLevel
from .control import ControlMessage
from .errors import BaqupError, DataError, OutputError, SecurityViolation
from .heartbeat import Heartbeat
from .lifecycle import Lifecycle
from .logs import Logger
from .names import artifact_name, compression_of, safe_relative
from .outbox import FallbackBuffer, Outbox, ReconnectPolicy
from .reporter import Reporter
from .resources import Limit, ResourceLimitExceeded
from .secret import Redactor
from .settings import Settings
from .staging import AlreadyCommitted, Artifact, Committed, JobDirBusy, Staging
from .tracing import make_tracer

SNAPSHOT_LIKE = tuple(r for r in ROLES if r != "restore")
# The manifest's encoder keeps the structure to about this depth (it recurses); deeper
# metadata is refused with a clear error rather than written wrong.
MAX_METADATA_DEPTH = 400
# A job refused for these never had the job dir: its status key belongs to the run that
# holds (or committed) it, so nothing is reported there.
NOT_OURS = (JobDirBusy, AlreadyCommitted)


def nesting_depth(value: Any) -> int:
    """How deep objects and arrays nest in a JSON-like value (without recursing)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


class Session:
    """One job's state and reporting, from the first heartbeat to the final status."""

    def __init__(self, settings: Settings, log: Logger, redactor: Redactor) -> None:
        self.settings = settings
        self.log = log
        self.redactor = redactor
        self.started_at = utc_iso()
        self.started = time.monotonic()
        self.lifecycle = Lifecycle(log)
        self.lifecycle.listeners.append(self._trace_phases)
        self.staging = Staging(settings.job_dir, settings.work_dir)
        self.keys = Keys(settings.key_prefix)
        self.declared: list[Artifact] = []
        self.components: list[dict[str, Any]] = []
        self.source_metadata: dict[str, Any] = {}
        self.restored_from: dict[str, str] | None = None  # a restore's snapshot, once read
        self.committed: list[Committed] = []
        self.attempts: list[dict[str, Any]] = []
        self.metrics: dict[str, Any] = {}
        self.child_progress: dict[str, Any] = {}
        self.measured_progress: dict[str, Any] = {}
        max_files = int(settings.values.get("BAQUP_SOURCE_MAX_FILES") or 0)
        self.files_limit = Limit("files processed", max_files) if max_files else None
        self.allow_empty = False
        self.last_activity = time.monotonic()
        self.intent_until = 0.0
        self.tracer = make_tracer(
            settings.values,
            service=settings.agent,
            job_id=settings.job_id,
            agent_id=settings.agent_id,
            log=log,
        )
        self.tracer.start("agent.init", role=settings.role)
        self.transport: Any = None
        self.outbox: Outbox | None = None
        self.heartbeat: Heartbeat | None = None
        self.reporter: Reporter | None = None

    # --- INITIALIZING ----------------------------------------------------------------

    def identity(self) -> dict[str, str]:
        return {
            "job_id": self.settings.job_id,
            "agent_id": self.settings.agent_id,
            "agent": self.settings.agent,
        }

    def connect(self) -> None:
        """Open the bus (a failure to reach it is not fatal: the outbox buffers)."""
        s = self.settings
        self.transport = open_transport(
            s.bus_url, timeout=s.bus_timeout, client_name=f"baqup-{s.agent_id}"
        )
        redact = self.redactor.redact_value
        buffer = FallbackBuffer(s.fallback_dir / s.job_id / "buffer.jsonl")
        self.outbox = Outbox(
            self.transport,
            buffer,
            self.log.bind(component="bus"),
            ReconnectPolicy(s.reconnect_backoff, s.reconnect_max_attempts),
            on_retry=self._connection_retry,
        )
        self.reporter = Reporter(
            keys=self.keys,
            job_id=s.job_id,
            agent_id=s.agent_id,
            outbox=self.outbox,
            redactor=self.redactor,
        )
        connected = True
        try:
            self.transport.ping()
        except Exception as exc:  # noqa: BLE001 - any failure to reach the bus is survivable
            connected = False
            self.log.warn(
                "bus unreachable at start; buffering messages",
                bus=getattr(self.transport, "description", "?"),
                reason=str(exc),
            )
        self.outbox.start(connected)
        self.heartbeat = Heartbeat(
            key=self.keys.heartbeat(s.agent_id),
            interval=s.heartbeat_interval,
            transport=self.transport,
            outbox=self.outbox,
            log=self.log.bind(component="heartbeat"),
            identity={**self.identity(), "role": s.role},
            state=lambda: str(self.lifecycle.state),
            redact=redact,
        )
        self.lifecycle.listeners.append(self._on_state)
        self.heartbeat.start()

    def _trace_phases(self, old: AgentState, new: AgentState) -> None:
        """Spans follow the lifecycle: init, snapshot (and connect_source), write, report."""
        tracer = self.tracer
        if new is AgentState.RUNNING:
            tracer.end("agent.init")
            tracer.start("agent.snapshot")
            tracer.start("agent.connect_source")
        elif new is AgentState.COMPLETING:
            tracer.end("agent.connect_source")
            tracer.end("agent.snapshot")
            tracer.start("agent.write_artifact")
        elif new.final:
            for name in (
                "agent.init",
                "agent.connect_source",
                "agent.snapshot",
                "agent.compress",
                "agent.write_artifact",
            ):
                tracer.end(name)
            tracer.start("agent.report_status", status=str(new))

    def _on_state(self, old: AgentState, new: AgentState) -> None:
        if self.reporter is not None:
            self.reporter.state_changed(old, new)
        if self.heartbeat is not None and not new.final:
            self.heartbeat.beat_now()

    def _connection_retry(self, attempt: int, transport: str) -> None:
        self.event(
            "CONNECTION_RETRY", "info", f"reconnecting to the bus ({transport}), attempt {attempt}"
        )

    def prepare_staging(self, restore_from: Path | None = None) -> None:
        self.staging.prepare(restore=self.settings.role == "restore", source=restore_from)

    def defaults_as_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The agent schema's defaults for variables the environment leaves unset, as text."""
        properties = self.settings.agent_properties
        out = {}
        for name, value in self.settings.values.items():
            if name in environ or name not in properties or name.startswith("BAQUP_SECRET_"):
                continue
            if isinstance(value, bool):
                out[name] = "true" if value else "false"
            elif isinstance(value, (list, dict)):
                out[name] = orjson.dumps(value).decode()
            elif value is not None:
                out[name] = str(value)
        return out

    # --- control messages --------------------------------------------------------------

    def progress(self, fields: Mapping[str, Any], *, measured: bool = False) -> None:
        """A progress message: the child's latest, replaced whole, with what baqup-run
        measures itself (streamed bytes) on top."""
        assert self.reporter is not None
        if measured:
            self.measured_progress.update(fields)
        else:
            ignored = ("type", "timestamp", "job_id", "agent_id")
            self.child_progress = {k: v for k, v in fields.items() if k not in ignored}
        self.reporter.progress({**self.child_progress, **self.measured_progress})
        files = fields.get("files_processed")
        if self.files_limit is not None and isinstance(files, int):
            verdict, message = self.files_limit.check(files)
            if verdict == "approaching":
                self.event("RESOURCE_LIMIT_APPROACHING", "warn", message)
            elif verdict == "exceeded":
                self.event("RESOURCE_LIMIT_EXCEEDED", "error", message)
                raise ResourceLimitExceeded(f"{message} (BAQUP_SOURCE_MAX_FILES)")

    def touch(self) -> None:
        """The child (or agent) showed a sign of work: output, a control message."""
        self.last_activity = time.monotonic()
        self.tracer.end("agent.connect_source")

    def handle(self, message: ControlMessage) -> None:
        """Apply one control message (INTERFACE.md section 3)."""
        assert self.reporter is not None
        assert self.heartbeat is not None
        fields = message.fields
        kind = message.type
        if kind == "progress":
            self.progress(fields)
        elif kind == "intent":
            self.intent(
                fields.get("operation"),
                fields.get("expected_duration_seconds"),
                fields.get("detail"),
            )
        elif kind == "event":
            self.reporter.event(
                fields["code"],
                fields.get("severity", "warn"),
                fields.get("message") or "",
                fields.get("path"),
            )
        elif kind == "artifact":
            self.declare_artifact(fields["filename"], fields.get("compression"))
        elif kind == "component":
            keep = ("name", "status", "artifact", "error")
            entry = {k: fields[k] for k in keep if fields.get(k) is not None}
            # a component reported again is the same component: its last report counts
            self.components = [c for c in self.components if c.get("name") != entry["name"]]
            self.components.append(entry)
        elif kind == "metadata":
            self.source_metadata.update(fields["source_metadata"])
        elif kind == "log":
            level = LogLevel.parse(fields.get("level", "info"))
            context = dict(fields.get("context") or {})
            self.log.bind(component="child").log(level, fields["message"], **context)

    def intent(
        self, operation: str | None, expected: float | None = None, detail: str | None = None
    ) -> None:
        assert self.heartbeat is not None
        if operation is None:
            self.heartbeat.set_intent(None)
            self.intent_until = 0.0
            return
        intent: dict[str, Any] = {"operation": operation}
        if expected is not None:
            intent["expected_duration_seconds"] = expected
            self.intent_until = time.monotonic() + float(expected)
            self.lifecycle.extend(float(expected))
        if detail is not None:
            intent["detail"] = detail
        self.heartbeat.set_intent(intent)

    def declare_artifact(self, filename: str, compression: str | None = None) -> None:
        name = self.checked_name(filename)
        if any(a.name == name for a in self.declared):
            return
        self.declared.append(Artifact(name, compression or compression_of(name)))

    def checked_name(self, name: str) -> str:
        """An artifact name the manifest may hold: inside the work dir, not reserved,
        UTF-8, and free of any secret value (refused without being printed)."""
        if self.redactor.redact(name) != name:
            raise SecurityViolation(
                "an artifact name contains the value of a secret; it is not committed and "
                "not shown (the manifest must never hold a secret)"
            )
        return artifact_name(name)

    def event(self, code: str, severity: str, message: str = "", path: str | None = None) -> None:
        if self.reporter is not None:
            self.reporter.event(code, severity, message, path)

    # --- COMPLETING ---------------------------------------------------------------------

    @property
    def failed_components(self) -> list[dict[str, Any]]:
        return [c for c in self.components if c.get("status") == "failed"]

    def artifacts_to_commit(self) -> list[Artifact]:
        """The declared artifacts; with none declared, a snapshot-like job's every file in
        the work dir (a restore's work dir holds no undeclared artifact), minus those of
        failed components."""
        if self.declared:
            chosen = list(self.declared)
        elif self.settings.role in SNAPSHOT_LIKE:
            chosen = list(self.staging.discover())
        else:
            chosen = []
        for artifact in chosen:
            self.checked_name(artifact.name)
        excluded = {
            str(safe_relative(str(c["artifact"])))
            for c in self.failed_components
            if c.get("artifact")
        }
        return [a for a in chosen if not _names(a) & excluded]

    def _missing_components(self, artifacts: list[Artifact]) -> None:
        """A component reported `success` whose artifact will not be in the manifest
        failed: `ARTIFACT_MISSING` (a success must name a committed file)."""
        names = set().union(*(_names(a) for a in artifacts))
        for component in self.components:
            wanted = component.get("artifact")
            if component.get("status") != "success" or not wanted:
                continue
            if str(safe_relative(str(wanted))) in names:
                continue
            component["status"] = "failed"
            component["error"] = {
                "code": "ARTIFACT_MISSING",
                "message": f"component {component.get('name')!r} reported success, but its "
                f"artifact {wanted!r} is not among the committed artifacts",
            }
            self.event("ARTIFACT_MISSING", "error", component["error"]["message"], str(wanted))

    def commit(self) -> None:
        """Checksum, move and write the manifest (raises on any failure)."""
        s = self.settings
        artifacts = self.artifacts_to_commit()
        if not artifacts and s.role not in SNAPSHOT_LIKE:
            self.log.info("no artifact declared for this role; no manifest written", role=s.role)
            return
        self._missing_components(artifacts)
        manifest_fields: dict[str, Any] = {
            "job_id": s.job_id,
            "agent": s.agent,
            "agent_version": s.agent_version,
            "role": s.role,
        }
        if self.source_metadata:
            depth = nesting_depth(self.source_metadata)
            if depth > MAX_METADATA_DEPTH:
                raise DataError(
                    f"source_metadata nests {depth} levels deep; the manifest holds at most "
                    f"{MAX_METADATA_DEPTH}",
                    code="METADATA_TOO_DEEP",
                )
            manifest_fields["source_metadata"] = self.redactor.redact_value(self.source_metadata)
        deadline_state = self.lifecycle

        def checkpoint() -> None:
            deadline = deadline_state.phase_deadline()
            if deadline is not None and time.monotonic() > deadline:
                raise OutputError(
                    "COMPLETING took longer than its phase timeout", code="PHASE_TIMEOUT"
                )

        def long_checksum(seconds: float, size: int) -> None:
            self.intent("checksum", round(seconds * 2, 1), f"{size} bytes, {s.checksum_algorithm}")

        self.committed = self.staging.commit(
            artifacts,
            algorithm=s.checksum_algorithm,
            manifest_fields=manifest_fields,
            allow_empty=self.allow_empty,
            threads=s.parallelism,
            on_long_checksum=long_checksum,
            checkpoint=checkpoint,
        )
        self.log.info(
            "manifest committed",
            artifacts=len(self.committed),
            manifest=str(s.job_dir / "manifest.json"),
        )

    # --- the end -------------------------------------------------------------------------

    def outcome(self, error: BaseException | None) -> tuple[str, ExitCode]:
        """The status word and exit code for how the job ended."""
        if error is not None:
            code = error.exit_code if isinstance(error, BaqupError) else ExitCode.INTERNAL_ERROR
            return "failed", code
        if self.failed_components:
            mode = self.settings.partial_failure_mode
            if mode == "warn":
                self.log.warn("some components failed", failed=len(self.failed_components))
            return "partial", ExitCode.PARTIAL_FAILURE if mode == "fail" else ExitCode.SUCCESS
        return "success", ExitCode.SUCCESS

    def error_object(self, error: BaseException) -> dict[str, Any]:
        if isinstance(error, BaqupError):
            body = error.to_error()
        else:
            body = {
                "code": "INTERNAL_ERROR",
                "category": "internal",
                "retriable": False,
                "message": f"{type(error).__name__}: {error}",
                "exit_code": int(ExitCode.INTERNAL_ERROR),
            }
        if self.attempts:
            body["attempts"] = list(self.attempts)
        body.setdefault("root_cause", {"code": body["code"], "message": body["message"]})
        return body

    def status_document(
        self, status: str, code: ExitCode, error: BaseException | None
    ) -> dict[str, Any]:
        s = self.settings
        progress = self.reporter.latest_progress if self.reporter is not None else {}
        stored = sum(c.size for c in self.committed)
        metrics: dict[str, Any] = {
            "duration_seconds": round(time.monotonic() - self.started, 3),
            "bytes_processed": int(progress.get("bytes_processed") or stored),
            "files_processed": int(progress.get("files_processed") or 0),
            **self.metrics,
        }
        document: dict[str, Any] = {
            "type": "status",
            **self.identity(),
            "agent_version": s.agent_version,
            "role": s.role,
            "status": status,
            "started_at": self.started_at,
            "completed_at": utc_iso(),
            "files": [c.status_entry() for c in self.committed],
            "metrics": metrics,
            "warnings_summary": self.reporter.warnings_summary if self.reporter else {},
            "error": self.error_object(error) if error is not None else None,
            "exit_code": int(code),
        }
        if self.restored_from is not None:
            document["restored_from"] = dict(self.restored_from)
        if len(self.attempts) > 1:
            document["attempts"] = list(self.attempts)
        if self.committed:
            document["manifest"] = str(s.job_dir / "manifest.json")
        if self.components:
            failed = len(self.failed_components)
            document["summary"] = {
                "total": len(self.components),
                "succeeded": len(self.components) - failed,
                "failed": failed,
            }
            document["components"] = list(self.components)
        return document

    def finish(self, error: BaseException | None) -> int:
        """Report the end of the job and decide the exit code. Never raises."""
        try:
            return self._end(error)
        finally:
            self.staging.close()  # the job dir's lock is held to the very end

    def _end(self, error: BaseException | None) -> int:
        status, code = self.outcome(error)
        final = AgentState.TERMINATED if status != "failed" else AgentState.FAILED
        try:
            if self.lifecycle.state is AgentState.RUNNING and final is AgentState.TERMINATED:
                self.lifecycle.advance(AgentState.COMPLETING)
            self.lifecycle.advance(final)
        except BaqupError:
            self.lifecycle.advance(AgentState.FAILED)
        document = self.status_document(status, code, error)
        if error is not None:
            self.log.error(
                f"job failed: {document['error']['message']}",
                code=document["error"]["code"],
                exit_code=int(code),
            )
        else:
            self.log.info(f"job {status}", exit_code=int(code), files=len(self.committed))
        if self.outbox is None or self.reporter is None:
            self.tracer.shutdown()
            return int(code)
        self.reporter.flush()
        if self.heartbeat is not None:
            self.heartbeat.set_intent(None, beat=False)  # the job is over: nothing in progress
            self.heartbeat.stop(final=True)
        ours = not isinstance(error, NOT_OURS)
        if ours:
            self.reporter.status(document)
        else:
            self.log.warn(
                "this run never held the job dir: its status and files are another run's, "
                "nothing is reported over them",
                job_dir=str(self.settings.job_dir),
            )
        delivered = self.outbox.drain(self.settings.bus_grace_period)
        self.outbox.close()
        self.tracer.end("agent.report_status")
        self.tracer.shutdown()
        if delivered or not ours:
            return int(code)
        return self._unreported(document, code)

    def _unreported(self, document: Mapping[str, Any], code: ExitCode) -> int:
        """The bus stayed down past the grace period: the status goes to a file (exit 75)."""
        try:
            path = self.staging.write_status_file(self.redactor.redact_value(dict(document)))
        except BaqupError as exc:
            self.log.fatal(
                "the final status could not be reported nor written",
                reason=exc.message,
                original_exit_code=int(code),
            )
            return int(ExitCode.CANT_CREATE_OUTPUT)
        self.log.error(
            "bus unreachable after the grace period; final status written to a file",
            path=str(path),
            original_exit_code=int(code),
        )
        return int(ExitCode.COMPLETED_UNREPORTED)


def _names(artifact: Artifact) -> set[str]:
    """The names a component may use for an artifact: its own, or for a split part the
    name the parts were split from."""
    original = artifact.extra.get("original")
    return {artifact.name, str(original)} if original else {artifact.name}
