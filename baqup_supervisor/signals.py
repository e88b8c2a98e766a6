"""Signal routing: the job's signals blocked in every thread and taken on one (tini's way).

baqup-run blocks every signal it handles as its very first act (`block_job_signals`, called
by the console-script entry before any other import and before any thread exists), so every
thread inherits the mask: no signal can kill baqup-run, stop it, or interrupt the main thread
at a bad moment, and an inherited mask or `SIG_IGN` does not matter. A signal that arrives
before the router runs stays pending in the kernel and is taken once it does. The router
thread takes them with `sigwaitinfo` and hands each `siginfo` to one callback, so a SIGUSR1 is
answered even while the main thread is deep in a checksum, and the siginfo tells a
kernel-generated SIGTTOU (baqup-run's own group touching the terminal) from a user's `kill`.

Never unblocks: a signal pending at that moment would be delivered with its default action
(death for most). The synchronous faults (SIGSEGV, SIGBUS, ...) are never blocked: blocking
them hides bugs. SIGPIPE stays ignored, as Python sets it: a write to a closed pipe is an error,
not a death. The child gets none of this (child.py: empty mask, default dispositions).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import TracebackType

SiginfoCallback = Callable[[signal.struct_siginfo], None]

SYNCHRONOUS = frozenset(
    {
        signal.SIGSEGV,
        signal.SIGBUS,
        signal.SIGFPE,
        signal.SIGILL,
        signal.SIGTRAP,
        signal.SIGSYS,
        signal.SIGABRT,
    }
)
# Everything catchable but the synchronous faults and SIGPIPE, real-time signals included.
JOB_SIGNALS = (
    frozenset(signal.valid_signals())
    - SYNCHRONOUS
    - {
        signal.SIGKILL,
        signal.SIGSTOP,
        signal.SIGPIPE,
    }
)
ABORTING = frozenset({signal.SIGTERM, signal.SIGINT})
STOPPING = frozenset({signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
# Forwarded to the child's group: everything the router takes that is not baqup-run's own.
FORWARDED = JOB_SIGNALS - ABORTING - {signal.SIGUSR1, signal.SIGCHLD}
SI_KERNEL = 0x80  # siginfo.si_code of a signal the kernel itself raised (Linux)


def block_job_signals() -> None:
    """Block the job's signals in the calling thread (and every thread it starts later),
    replacing whatever mask baqup-run inherited. Idempotent."""
    signal.pthread_sigmask(signal.SIG_SETMASK, JOB_SIGNALS)
    # An inherited SIG_IGN of SIGCHLD makes the kernel reap children itself: their exit
    # status would be lost. (Other inherited SIG_IGN do not matter: a blocked signal is
    # queued whatever its disposition.)
    if signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def describe(signum: int) -> str:
    """SIGTERM, SIGRTMIN+3: a signal's name for messages."""
    if signal.SIGRTMIN <= signum <= signal.SIGRTMAX:
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class SignalRouter:
    """Takes the job's signals on a thread of its own and calls `callback` with each siginfo.

    A context manager: entering blocks the signals here too (for callers that did not come
    through the entry point) and starts the thread; leaving stops it. It never unblocks.
    """

    def __init__(
        self, callback: SiginfoCallback, on_error: Callable[[BaseException], None]
    ) -> None:
        self._callback = callback
        self._on_error = on_error
        self._closing = False
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SignalRouter:
        block_job_signals()
        thread = threading.Thread(target=self._run, name="baqup-signals", daemon=True)
        self._thread = thread
        thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        thread = self._thread
        if thread is None or thread.ident is None:
            return
        self._closing = True
        # A signal aimed at the router thread alone wakes it to see `_closing`; still blocked,
        # it can do no harm (a thread's own pending signals vanish with it).
        signal.pthread_kill(thread.ident, signal.SIGCHLD)
        thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            info = signal.sigwaitinfo(JOB_SIGNALS)
            if self._closing:
                return
            try:
                self._callback(info)
            except Exception as exc:  # noqa: BLE001 - routing must survive a callback
                self._on_error(exc)
