"""The supervisor: one command run as one compliant baqup job.

Owns the RUNNING phase of a command: spawning the child (child.py), the event loop
over its stdout, stderr and control pipes, signals (SIGTERM/SIGINT abort with a
grace period, a second one escalates; SIGUSR1 beats; SIGHUP/SIGQUIT/SIGUSR2 are
forwarded to the group), the job and stall timeouts, and retries of a child that
exits with a retriable code. Everything about reporting and the end of the job is
the session's (session.py), which the in-process SDK shares.
"""

from __future__ import annotations

import os
import select
import selectors
import signal
import string
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import backoff
from .adapters import ADAPTERS, Adapter
from .child import (
    Child,
    ChildChange,
    Reaper,
    Terminal,
    descendants,
    describe_exit,
    signal_descendants,
    spawn,
)
from .clock import utc_iso
from .compression import choose
from .control import ControlMessage, LineSplitter, parse_message
from .encryption import StreamEncryptor, parse_key
from .errors import (
    BaqupError,
    DataError,
    EmptyArtifact,
    JobFailed,
    SecurityViolation,
    ShutdownRequested,
    UsageError,
)
from .resources import Limit, ResourceLimitExceeded, memory_limit, tree_rss
from .secret import Secret
from .session import Session
from .signals import ABORTING, FORWARDED, SI_KERNEL, describe
from .staging import safe_relative

if TYPE_CHECKING:  # imported where used: a plain job never pays for them
    from .capture import ArtifactSink
    from .restore import Feeder, StoredArtifact

READ_SIZE = 256 * 1024
CAPTURE_READ_SIZE = 1024 * 1024
# A short turn per control read keeps the loop back at the pipe soon, so a child writing
# control lines fast is rarely blocked for long (the benchmark's max-blocked-write figure).
READ_SIZES = {"artifact": CAPTURE_READ_SIZE, "control": 16 * 1024}
MEMORY_CHECK_INTERVAL = 0.5
CAPTURE_PROGRESS_INTERVAL = 0.25  # the reporter sends at most once a second anyway
TICK = 0.25
DRAIN_AFTER_EXIT = 2.0  # pipes still open once every process of the job is gone
KILL_WAIT = 5.0  # how long processes get to vanish after SIGKILL
RETRY_BASE = 1.0


def expand(template: str, environ: Mapping[str, str]) -> str:
    return string.Template(template).safe_substitute(environ)


class Supervisor:
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
        self.child: Child | None = None
        self.reaper = Reaper(reap_all=True)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._terms: deque[int] = deque()
        self._lock = threading.Lock()
        self.abort_error: BaqupError | None = None
        self.kill_at: float | None = None
        self.exited_at: float | None = None  # when the main child exited
        self.settle_until: float | None = None  # when descendants it left must have finished
        self.quiet_since: float | None = None  # since when no process of the job is alive
        self.killed_at: float | None = None
        self.child_stopped = False
        self.terminal: Terminal | None = None
        self.terminal_checked = False
        self.terminal_reclaimed = False  # baqup-run took the foreground while the child is stopped
        self.interrupted = False  # the child died of the SIGINT of a Ctrl-C on its terminal
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
            self.key = parse_key(key_secret)

    # --- signals (called on the signal thread) --------------------------------------------

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass

    def on_signal(self, info: signal.struct_siginfo) -> None:
        """One signal taken by the router (signals.py); the table is INTERFACE.md 13."""
        signum = info.si_signo
        if signum == signal.SIGUSR1:
            if self.session.heartbeat is not None:
                self.session.heartbeat.beat_now()
            return
        if signum in ABORTING:
            with self._lock:
                self._terms.append(signum)
        elif signum in FORWARDED:
            self._forward(signum, info.si_code)
        self._poke()  # SIGCHLD too: the loop reaps

    def _forward(self, signum: int, si_code: int) -> None:
        if signum in (signal.SIGTTIN, signal.SIGTTOU) and si_code == SI_KERNEL:
            # The terminal stopping a member of baqup-run's own group (a background read, or
            # a write with TOSTOP): it concerns that group, not the job's.
            return
        child = self.child
        if child is None or not child.signal_group(signum):
            self.log.info(f"{describe(signum)} received; no child to forward it to")
            return
        self.log.info(f"forwarded {describe(signum)} to the child's group")

    def take_terms(self) -> list[int]:
        with self._lock:
            terms = list(self._terms)
            self._terms.clear()
        return terms

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

    def abort(self, error: BaqupError) -> None:
        """End everything the job started: SIGTERM (then SIGCONT, so a stopped process can act
        on it) now, SIGKILL after the grace period; a second abort escalates at once."""
        if self.abort_error is None:
            self.abort_error = error
            self.log.warn(
                f"aborting the job: {error.message}", code=error.code, grace_seconds=self.grace
            )
        child = self.child
        if child is None or (child.exited and not self._anything_alive(child)):
            return
        if self.kill_at is None:
            self._terminate(child)
        else:
            self.kill_now("a second termination request")

    def _terminate(self, child: Child) -> None:
        child.signal_all(signal.SIGTERM)
        child.signal_all(signal.SIGCONT)
        self.kill_at = time.monotonic() + self.grace

    def kill_now(self, why: str) -> None:
        child = self.child
        if child is not None:
            group = child.signal_group(signal.SIGKILL)
            reached = signal_descendants(signal.SIGKILL)
            if group or reached:
                self.log.warn(f"SIGKILL sent to every process of the job: {why}", pids=reached[:20])
        self.kill_at = float("inf")
        self.killed_at = time.monotonic()

    def _anything_alive(self, child: Child) -> bool:
        """Whether any process the job started is alive: a child of baqup-run (every orphan
        is re-parented here) or a member of the child's group (when not a subreaper)."""
        return (not child.exited) or self.reaper.has_children or child.group_alive()

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
            session.event("PROTOCOL_ERROR", "warn", f"{parsed.reason}: {parsed.excerpt}")
            return
        if self.adapter is not None and stream == self.adapter_stream:
            fields = self.adapter(line)
            if fields is not None:
                self.session.progress(fields)
                return
        text = line.decode("utf-8", "replace")
        if truncated:
            self.child_log.info(text, stream=stream, truncated=True)
        else:
            self.child_log.info(text, stream=stream)

    def run_child(self) -> int:
        """Run the child once, to its end; the raw exit code (negative: killed by signal)."""
        s = self.settings
        self.abort_error = None
        self.kill_at = None
        self.sink = self.new_sink()
        if not self.terminal_checked:
            self.terminal_checked = True
            self.terminal = Terminal.foreground()
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

            self.feeder = Feeder(self.restore_source, child.stdin_fd, self.key)
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
        self.exited_at = self.settle_until = self.quiet_since = self.killed_at = None
        self.child_stopped = self.terminal_reclaimed = self.interrupted = False
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

    def _on_change(self, change: ChildChange) -> None:
        """The command stopped (Ctrl-Z, a forwarded SIGTSTP, a terminal read) or went on."""
        self.child_stopped = change.stopped
        if change.stopped:
            name = describe(change.signum)
            self.session.event(
                "CHILD_STOPPED",
                "warn",
                f"the command was stopped by {name}; the job goes on (heartbeats, timeouts) "
                "until it is continued (SIGCONT to baqup-run) or aborted",
            )
            self.log.info("child stopped", signal=name)
            child = self.child
            if self.terminal is not None and child is not None:
                # The keyboard must reach baqup-run (Ctrl-C aborts), not a stopped group.
                self.terminal_reclaimed = self.terminal.take_back(child.pgid)
        else:
            self.session.event("CHILD_CONTINUED", "info", "the command continued")
            self.log.info("child continued")
            child = self.child
            if self.terminal_reclaimed and self.abort_error is None and child is not None:
                self.terminal_reclaimed = False
                assert self.terminal is not None
                self.terminal.give(child.pgid)

    def _may_end(self, child: Child, now: float, open_pipes: bool, capture_open: bool) -> bool:
        """After the main child exited: True once nothing the job started can still write
        (INTERFACE.md 10): no descendant alive and every pipe at end of file."""
        if self.exited_at is None:
            self.exited_at = now
            self.log.info("child exited", exit_code=child.exit_code, pid=child.pid)
            self.interrupted = (
                child.exit_code == -signal.SIGINT
                and self.terminal is not None
                and self.terminal.holder() == child.pgid
            )
            self._after_exit(child, now)
        if self._anything_alive(child):
            self.quiet_since = None
            if self.settle_until is not None and now >= self.settle_until:
                self.settle_until = None
                self._descendants_outlived()
            elif self.killed_at is not None:
                signal_descendants(signal.SIGKILL)  # any forked since the last pass
                if now - self.killed_at > KILL_WAIT:
                    self.log.error(
                        "processes of the job survive SIGKILL (uninterruptible I/O?); "
                        "giving up waiting for them",
                        pids=descendants()[:20],
                    )
                    return True
            return False
        if not open_pipes:
            return True
        if self.quiet_since is None:
            self.quiet_since = now
        if now - self.quiet_since <= DRAIN_AFTER_EXIT:
            return False
        # Every process the job started is gone, yet a pipe is still open: a process outside
        # the job holds its write end (passed over a socket). The log pipes are let go; a
        # captured stream may still be written to, so it is never committed.
        self.log.warn("a pipe of the child is still open after every process of the job exited")
        if capture_open and self.abort_error is None:
            self.abort_error = JobFailed(
                "the captured stdout is still open although every process of the job exited: "
                "a process outside the job holds it, the artifact may be incomplete",
                code="OUTPUT_STILL_OPEN",
            )
        return True

    def _after_exit(self, child: Child, now: float) -> None:
        """The main child is gone. What it left running gets --grace seconds to finish when
        the command succeeded; when it failed there is nothing to wait for."""
        if not self._anything_alive(child):
            return
        pids = descendants()
        if child.exit_code == 0 and self.abort_error is None and self.kill_at is None:
            self.log.warn(
                f"the command exited but {len(pids)} process(es) it started still run; "
                f"waiting up to {self.grace:g} s for them to finish",
                pids=pids[:20],
            )
            self.settle_until = now + self.grace
        elif self.kill_at is None:
            self.log.warn(
                "the command failed; ending the processes it left running", pids=pids[:20]
            )
            self._terminate(child)

    def _descendants_outlived(self) -> None:
        pids = descendants()
        self.abort(
            JobFailed(
                f"{len(pids)} process(es) the command started still ran {self.grace:g} s after "
                "it exited (a script that forgets `wait`?); they were killed and nothing was "
                "committed",
                code="DESCENDANTS_KILLED",
            )
        )

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
            s.work_dir,
            self.stdout_artifact,
            compression=self.compression,
            checksum_algorithm=s.checksum_algorithm,
            parallelism=s.parallelism,
            split_size=s.split_size,
            key_id=s.encrypt_key_id,
            encryptor=StreamEncryptor(self.key, s.encrypt_algorithm) if self.key else None,
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

    def verify_restore_source(self) -> None:
        """Before the child starts: the artifact, every part, verified against the manifest."""
        if not self.stdin_artifact:
            return
        from .restore import locate

        self.restore_source = locate(self.settings.job_dir, self.stdin_artifact)
        self.log.info(
            "restore source verified",
            artifact=self.stdin_artifact,
            parts=len(self.restore_source.paths),
            bytes=self.restore_source.size,
        )

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
            self.session.staging.empty()
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
