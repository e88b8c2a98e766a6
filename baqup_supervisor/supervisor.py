"""The supervisor: one command run as one compliant baqup job.

Owns the RUNNING phase of a command: spawning the child (child.py), the event loop
over its stdout, stderr and control pipes, the job and stall timeouts, and retries of
a child that exits with a retriable code. What signals do and how the job's processes
end (grace, SIGKILL, descendants, a stopped child, the terminal) is processes.py's,
a mixin of `Supervisor`. Everything about reporting and the end of the job is
the session's (session.py), which the in-process SDK shares.
"""

from __future__ import annotations

import os
import select
import selectors
import signal
import string
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import backoff
from .adapters import ADAPTERS, Adapter
from .child import describe_exit, spawn
from .clock import utc_iso
from .compression import choose
from .control import ControlMessage, LineSplitter, parse_message
from .encryption import IDENTITY_VARIABLE, new_encryptor, parse_key
from .errors import (
    BaqupError,
    DataError,
    EmptyArtifact,
    JobFailed,
    SecurityViolation,
    ShutdownRequested,
    UsageError,
)
from .processes import ProcessControl
from .resources import Limit, ResourceLimitExceeded, memory_limit, tree_rss
from .secret import Secret
from .session import Session
from .signals import describe
from .staging import safe_relative

if TYPE_CHECKING:  # imported where used: a plain job never pays for them
    from .age import AgeEncryptor, X25519Identity
    from .capture import ArtifactSink
    from .encryption import StreamEncryptor
    from .restore import Feeder, StoredArtifact

READ_SIZE = 256 * 1024
CAPTURE_READ_SIZE = 1024 * 1024
# A short turn per control read keeps the loop back at the pipe soon, so a child writing
# control lines fast is rarely blocked for long (the benchmark's max-blocked-write figure).
READ_SIZES = {"artifact": CAPTURE_READ_SIZE, "control": 16 * 1024}
MEMORY_CHECK_INTERVAL = 0.5
CAPTURE_PROGRESS_INTERVAL = 0.25  # the reporter sends at most once a second anyway
TICK = 0.25
RETRY_BASE = 1.0


def expand(template: str, environ: Mapping[str, str]) -> str:
    return string.Template(template).safe_substitute(environ)


class Supervisor(ProcessControl):
    """Runs `argv` as the job's child inside a `Session`."""

    def __init__(
        self,
        session: Session,
        argv: Sequence[str],
        environ: Mapping[str, str],
        *,
        grace: float,
        extra_env: Mapping[str, str] | None = None,
        stdout_artifact: str | None = None,
        stdin_artifact: str | None = None,
        progress_from: str | None = None,
    ) -> None:
        self.session = session
        self.settings = session.settings
        self.log = session.log
        self.argv = list(argv)
        self.environ = dict(environ)
        self.extra_env = dict(extra_env or {})
        self.grace = grace
        self.init_processes()
        self.protocol_errors = 0
        self.child_log = self.log.bind(component="child")
        self.stdout_artifact = stdout_artifact
        self.adapter: Adapter | None = None
        self.adapter_stream = ""
        if progress_from:
            self.adapter, self.adapter_stream = ADAPTERS[progress_from]
        limit = memory_limit(self.settings.memory_limit)
        self.memory = Limit("child memory", limit, " bytes") if limit else None
        self._memory_checked = 0.0
        self.stdin_artifact = stdin_artifact
        self.restore_source: StoredArtifact | None = None
        self.feeder: Feeder | None = None
        self.sink: ArtifactSink | None = None
        self.capture_failed = False
        self._capture_progress_at = 0.0
        self.compression = choose(False, "none", 0)
        self.key: bytes | None = None
        self.identities: list[X25519Identity] = []

    def announce(self) -> None:
        """Events known before the child starts (the bus is up, or buffering, by now)."""
        choice = self.compression
        if choice.fallback_from:
            self.session.event(
                "COMPRESSION_FALLBACK", "info", f"{choice.reason}; using {choice.algorithm}"
            )

    def prepare_capture(self, key_secret: Secret | None) -> None:
        """Settle compression and encryption for `--stdout-artifact` before anything runs."""
        s = self.settings
        if not self.stdout_artifact:
            raise UsageError("--stdout-artifact needs a name")
        safe_relative(self.stdout_artifact)
        self.compression = choose(s.compress, s.compress_algorithm, s.compress_level)
        if s.encrypt:
            has_key = key_secret is not None and bool(key_secret.reveal().strip())
            self.key = parse_key(key_secret) if has_key else None
            # built once now so a bad combination is a config error before the child runs;
            # every attempt gets its own (fresh salt or file key) in `new_sink`
            self._encryptor()
            if s.encrypt_recipients:
                self.log.info(
                    "artifacts encrypted to age recipients",
                    recipients=list(s.encrypt_recipients),
                )

    def prepare_restore(self, key_secret: Secret | None, identity: Secret | None) -> None:
        """The key and the age identities a restore may need, parsed before anything runs."""
        if key_secret is not None and key_secret.reveal().strip():
            self.key = parse_key(key_secret)
        if identity is not None and identity.reveal().strip():
            from .age import parse_identities

            self.identities = parse_identities(identity, IDENTITY_VARIABLE)

    def _encryptor(self) -> StreamEncryptor | AgeEncryptor | None:
        s = self.settings
        if not s.encrypt:
            return None
        # a symmetric key takes the algorithm with its default (an agent's schema may
        # change that); recipients only what was set, so that none implies chacha20
        recipients = s.encrypt_recipients
        algorithm = s.encrypt_algorithm_given if recipients else s.encrypt_algorithm
        return new_encryptor(self.key, algorithm, recipients)

    def checkpoint(self) -> None:
        """Between INITIALIZING steps: a SIGTERM/SIGINT ends the job; so does the phase timeout."""
        terms = self.take_terms()
        if terms:
            raise ShutdownRequested(terms[0])
        lifecycle = self.session.lifecycle
        deadline = lifecycle.phase_deadline()
        if deadline is not None and time.monotonic() > deadline:
            raise JobFailed(
                f"{lifecycle.state} took longer than its phase timeout",
                code="PHASE_TIMEOUT",
                retriable=True,
            )

    # --- the child's environment ------------------------------------------------------------

    def child_environ(self) -> dict[str, str]:
        """The environment as it came in, schema defaults filled in, plus the job's paths."""
        s = self.settings
        env = {**self.session.defaults_as_env(self.environ), **self.environ}
        for name, template in self.extra_env.items():
            env[name] = expand(template, self.environ)
        env.update(
            BAQUP_CONTROL_FD=str(s.control_fd),
            BAQUP_JOB_DIR=str(s.job_dir),
            BAQUP_WORK_DIR=str(s.work_dir),
            BAQUP_AGENT_ID=s.agent_id,
        )
        return env

    # --- RUNNING ----------------------------------------------------------------------------

    def _on_line(self, stream: str, line: bytes, truncated: bool) -> None:
        session = self.session
        if stream == "control":
            parsed = parse_message(line, truncated)
            if isinstance(parsed, ControlMessage):
                try:
                    session.handle(parsed)
                except BaqupError as exc:
                    if isinstance(exc, SecurityViolation):
                        session.event("SECURITY_VIOLATION", "error", exc.message)
                    self.abort(exc)
                return
            self.protocol_errors += 1
            session.event("PROTOCOL_ERROR", "warn", parsed.describe(session.redactor))
            return
        if self.adapter is not None and stream == self.adapter_stream:
            fields = self.adapter(line)
            if fields is not None:
                self.session.progress(fields)
                return
        text = line.decode("utf-8", "replace")
        if truncated:  # cut upstream: a trailing start of a secret is masked too
            text = session.redactor.clip(text, len(text), truncated=True)
            self.child_log.info(text, stream=stream, truncated=True)
        else:
            self.child_log.info(text, stream=stream)

    def run_child(self) -> int:
        """Run the child once, to its end; the raw exit code (negative: killed by signal)."""
        s = self.settings
        self.new_attempt()
        self.sink = self.new_sink()
        self.child = child = spawn(
            self.argv,
            self.child_environ(),
            control_fd=s.control_fd,
            pipe_stdin=self.restore_source is not None,
            terminal=self.terminal is not None,
        )
        self.log.info("child started", pid=child.pid, command=self.argv[0])
        if self.restore_source is not None:
            assert child.stdin_fd is not None
            child.fds.remove(child.stdin_fd)  # the feeder owns and closes it
            from .restore import Feeder

            self.feeder = Feeder(self.restore_source, child.stdin_fd, self.key, self.identities)
            self.feeder.start()
        selector = selectors.DefaultSelector()
        splitters: dict[int, tuple[str, LineSplitter]] = {}
        for fd, name in (
            (child.control_fd, "control"),
            (child.stdout_fd, "artifact" if self.sink else "stdout"),
            (child.stderr_fd, "stderr"),
        ):
            if fd is not None:
                selector.register(fd, selectors.EVENT_READ)
                splitters[fd] = (name, LineSplitter())
        selector.register(self._wake_r, selectors.EVENT_READ)
        self.session.last_activity = time.monotonic()  # the stall clock starts with the child
        try:
            while True:
                now = time.monotonic()
                for key, _ in selector.select(self._timeout(now)):
                    if key.fd == self._wake_r:
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                        continue
                    self._read(selector, key.fd, splitters)
                for change in self.reaper.reap(child):
                    self._on_change(change)
                if self.child_stopped:
                    self.session.last_activity = now  # a stopped command is paused, not stalled
                for signum in self.take_terms():
                    self.abort(JobFailed(f"terminated by {describe(signum)}", code="ABORTED"))
                now = time.monotonic()
                self._check_timers(now)
                self._check_feeder()
                assert self.session.reporter is not None
                self.session.reporter.tick(now)
                if child.exited:
                    capture_open = child.stdout_fd in selector.get_map() and self.sink is not None
                    open_pipes = any(fd in selector.get_map() for fd in splitters)
                    if self._may_end(child, now, open_pipes, capture_open):
                        break
        finally:
            for name, splitter in splitters.values():
                for line, truncated in splitter.flush():
                    self._on_line(name, line, truncated)
            selector.close()
            child.close()
            if self.terminal is not None:
                self.terminal.take_back(child.pgid)
        code = child.exit_code
        assert code is not None
        return code

    def _read(
        self,
        selector: selectors.BaseSelector,
        fd: int,
        splitters: dict[int, tuple[str, LineSplitter]],
    ) -> None:
        name, splitter = splitters[fd]
        try:
            data = os.read(fd, READ_SIZES.get(name, READ_SIZE))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            selector.unregister(fd)
            for line, truncated in splitter.flush():
                self._on_line(name, line, truncated)
            return
        self.session.touch()
        if name == "artifact":
            self._capture(data)
            return
        for line, truncated in splitter.feed(data):
            self._on_line(name, line, truncated)

    # --- streaming capture of stdout --------------------------------------------------------

    def new_sink(self) -> ArtifactSink | None:
        if not self.stdout_artifact:
            return None
        s = self.settings
        from .capture import ArtifactSink

        return ArtifactSink(
            self.session.staging.work_fd,
            self.stdout_artifact,
            compression=self.compression,
            checksum_algorithm=s.checksum_algorithm,
            parallelism=s.parallelism,
            split_size=s.split_size,
            key_id=s.encrypt_key_id,
            encryptor=self._encryptor(),
        )

    def _capture(self, data: bytes) -> None:
        sink = self.sink
        if sink is None or self.capture_failed:
            return  # keep draining the pipe so the child is not blocked before it is ended
        self.session.tracer.start("agent.compress", algorithm=self.compression.algorithm)
        try:
            sink.write(data)
        except BaqupError as exc:
            self.capture_failed = True
            sink.abort()
            self.abort(exc)
            return
        now = time.monotonic()
        if now - self._capture_progress_at >= CAPTURE_PROGRESS_INTERVAL:
            self._capture_progress_at = now
            self.session.progress({"bytes_processed": sink.raw_bytes}, measured=True)

    def finish_capture(self, success: bool) -> None:
        """Close the captured artifact: its parts become declared artifacts, or are dropped."""
        sink, self.sink = self.sink, None
        if sink is None:
            return
        self.session.tracer.end("agent.compress")
        if not success or self.capture_failed:
            sink.abort()
            return
        if sink.raw_bytes == 0 and not self.session.allow_empty:
            # an empty stream still has a frame header (and a tag when encrypted)
            sink.abort()
            self.abort_error = EmptyArtifact(
                f"the command wrote nothing to stdout: {self.stdout_artifact!r} would be an "
                "empty backup"
            )
            return
        self.session.declared.extend(sink.close())
        self.session.progress({"bytes_processed": sink.raw_bytes}, measured=True)
        self.session.metrics.update(
            bytes_captured=sink.raw_bytes,
            bytes_stored=sink.stored_bytes,
            compression=self.compression.algorithm,
        )
        if sink.ratio is not None:
            self.session.metrics["compression_ratio"] = sink.ratio

    # --- restore: the artifact into stdin ------------------------------------------------

    def _check_feeder(self) -> None:
        feeder = self.feeder
        if feeder is None:
            return
        if feeder.bytes:
            self.session.progress({"bytes_processed": feeder.bytes}, measured=True)
        if feeder.error is not None and self.abort_error is None:
            error = feeder.error
            self.abort(
                error
                if isinstance(error, BaqupError)
                else DataError(f"restore stream failed: {error}")
            )

    def _end_feeder(self, code: int) -> None:
        feeder, self.feeder = self.feeder, None
        if feeder is None:
            return
        feeder.done.wait(timeout=5)
        self._check_feeder_error(feeder)
        if feeder.broken_pipe and code == 0:
            self.log.warn(
                "the command exited before reading the whole artifact", fed_bytes=feeder.bytes
            )
        self.session.metrics["bytes_restored"] = feeder.bytes

    def _check_feeder_error(self, feeder: Feeder) -> None:
        if feeder.error is not None and self.abort_error is None:
            error = feeder.error
            self.abort_error = (
                error
                if isinstance(error, BaqupError)
                else DataError(f"restore stream failed: {error}")
            )

    def _timeout(self, now: float) -> float:
        deadlines = [now + TICK]
        if self.kill_at is not None:
            deadlines.append(self.kill_at)
        if self.settle_until is not None:
            deadlines.append(self.settle_until)
        return max(0.0, min(deadlines) - now)

    def _check_timers(self, now: float) -> None:
        s = self.settings
        session = self.session
        if self.kill_at is not None and now >= self.kill_at:
            self.kill_now(f"still running {self.grace:g} s after SIGTERM")
        if self.abort_error is not None:
            return
        self._check_memory(now)
        if s.job_timeout and now - session.started > s.job_timeout:
            self.abort(
                JobFailed(
                    f"the job exceeded BAQUP_JOB_TIMEOUT ({s.job_timeout:g} s)", code="JOB_TIMEOUT"
                )
            )
        elif s.stall_timeout:
            allowed = max(session.last_activity + s.stall_timeout, session.intent_until)
            if now > allowed:
                self.abort(
                    JobFailed(
                        f"no output and no control message for {s.stall_timeout:g} s "
                        "(BAQUP_AGENT_STALL_TIMEOUT)",
                        code="STALLED",
                    )
                )

    def _check_memory(self, now: float) -> None:
        if self.memory is None or now - self._memory_checked < MEMORY_CHECK_INTERVAL:
            return
        self._memory_checked = now
        verdict, message = self.memory.check(tree_rss())
        if verdict == "approaching":
            self.session.event("RESOURCE_LIMIT_APPROACHING", "warn", message)
        elif verdict == "exceeded":
            self.session.event("RESOURCE_LIMIT_EXCEEDED", "error", message)
            self.abort(ResourceLimitExceeded(message))

    # --- attempts ----------------------------------------------------------------------------

    def run(self) -> None:
        """All attempts of the child; raises the error that ends the job, if any."""
        s = self.settings
        attempt = 0
        while True:
            attempt += 1
            started = time.monotonic()
            stamp = time.time()
            code = self.run_child()
            self.finish_capture(code == 0 and self.abort_error is None)
            self._end_feeder(code)
            if self.abort_error is not None:
                self._record(attempt, stamp, started, self.abort_error.code)
                raise self.abort_error
            if code == 0:
                if attempt > 1:
                    self._record(attempt, stamp, started, None)
                return
            if code == -signal.SIGINT and self.interrupted:
                self._record(attempt, stamp, started, "ABORTED")
                raise JobFailed("interrupted from the terminal (Ctrl-C)", code="ABORTED")
            exit_code, error_code, message = describe_exit(code)
            self._record(attempt, stamp, started, f"exit {code}" if code > 0 else error_code)
            retriable = code in s.retriable_exit_codes
            failure = JobFailed(message, code=error_code, exit_code=exit_code, retriable=retriable)
            if not retriable or attempt > s.retry_max:
                raise failure
            wait = backoff.delay(s.retry_backoff, attempt, base=RETRY_BASE, cap=60.0, jitter=0.1)
            if s.job_timeout and time.monotonic() + wait - self.session.started > s.job_timeout:
                raise failure
            self.session.event(
                "JOB_RETRY",
                "warn",
                f"{message}; retrying in {wait:.1f} s (attempt {attempt + 1} of {s.retry_max + 1})",
            )
            self.log.warn("retrying the command", attempt=attempt + 1, wait_seconds=wait)
            self._sleep(wait)
            self.session.staging.set_aside()
            self.session.declared.clear()
            self.session.components.clear()

    def _sleep(self, seconds: float) -> None:
        """Wait, but a SIGTERM ends the wait (and the job)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.reaper.reap(None)
            terms = self.take_terms()
            if terms:
                raise JobFailed("terminated by signal while waiting to retry", code="ABORTED")
            select.select([self._wake_r], [], [], min(left, TICK))
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass

    def _record(self, attempt: int, stamp: float, started: float, error: str | None) -> None:
        entry: dict[str, Any] = {
            "attempt": attempt,
            "timestamp": utc_iso(stamp),
            "duration_ms": int((time.monotonic() - started) * 1000),
        }
        if error is not None:
            entry["error"] = error
        self.session.attempts.append(entry)

    def close(self) -> None:
        if self.terminal is not None:
            self.terminal.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
