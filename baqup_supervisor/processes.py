"""The job's processes seen from the supervisor: signals, stops, and how they end.

Owns INTERFACE.md 13 on the supervisor's side and the end of RUNNING of section 10: what
each signal taken by the router does (a beat, an abort, a forward to the child's group),
reporting a stopped or continued child, the terminal's foreground while it is stopped, and
ending everything the job started: SIGTERM then SIGCONT, SIGKILL after `--grace`, to the
child's group and every descendant wherever its group or session. RUNNING ends only when no
process the job started is alive and the pipes reached end of file: what the command left
running gets `--grace` to finish, else the job fails (`DESCENDANTS_KILLED`).

A mixin of `Supervisor` (supervisor.py), which runs the loop that calls it; the signal
callbacks run on the router thread and only touch what is locked or atomic.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from .child import Child, ChildChange, Reaper, Terminal, descendants, signal_descendants
from .errors import BaqupError, JobFailed
from .signals import ABORTING, FORWARDED, SI_KERNEL, describe

if TYPE_CHECKING:
    from .logs import Logger
    from .session import Session

DRAIN_AFTER_EXIT = 2.0  # pipes still open once every process of the job is gone
KILL_WAIT = 5.0  # how long processes get to vanish after SIGKILL


class ProcessControl:
    session: Session
    log: Logger
    grace: float

    def init_processes(self) -> None:
        self.child: Child | None = None
        self.reaper = Reaper(reap_all=True)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._terms: deque[int] = deque()
        self._lock = threading.Lock()
        self.abort_error: BaqupError | None = None
        self.terminal: Terminal | None = None
        self.terminal_checked = False
        self.new_attempt()

    def new_attempt(self) -> None:
        """Before each run of the child: nothing of the last one carries over."""
        self.abort_error = None
        self.kill_at: float | None = None  # when SIGKILL follows the SIGTERM
        self.killed_at: float | None = None
        self.exited_at: float | None = None  # when the main child exited
        self.settle_until: float | None = None  # when what it left running must have ended
        self.quiet_since: float | None = None  # since when no process of the job is alive
        self.child_stopped = False
        self.terminal_reclaimed = False  # baqup-run holds the foreground while it is stopped
        self.interrupted = False  # the child died of the SIGINT of a Ctrl-C on its terminal
        if not self.terminal_checked:
            self.terminal_checked = True
            self.terminal = Terminal.foreground()

    # --- signals (called on the router thread) ---------------------------------------------

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

    # --- ending ----------------------------------------------------------------------------

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

    # --- after the loop reaped -------------------------------------------------------------

    def _on_change(self, change: ChildChange) -> None:
        """The command stopped (Ctrl-Z, a forwarded SIGTSTP, a terminal read) or went on."""
        self.child_stopped = change.stopped
        child, terminal = self.child, self.terminal
        if change.stopped:
            if terminal is not None and child is not None:
                # The keyboard must reach baqup-run (Ctrl-C aborts), not a stopped group.
                self.terminal_reclaimed = terminal.take_back(child.pgid)
            name = describe(change.signum)
            self.session.event(
                "CHILD_STOPPED",
                "warn",
                f"the command was stopped by {name}; the job goes on (heartbeats, timeouts) "
                "until it is continued (SIGCONT to baqup-run) or aborted",
            )
            self.log.info("child stopped", signal=name)
            return
        if self.terminal_reclaimed and self.abort_error is None:
            self.terminal_reclaimed = False
            if terminal is not None and child is not None:
                terminal.give(child.pgid)
        self.session.event("CHILD_CONTINUED", "info", "the command continued")
        self.log.info("child continued")

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
