"""Signal routing: handlers installed by a context manager, dispatched on a thread.

The C-level handler writes each signal's number to a wakeup pipe the moment it
arrives (`signal.set_wakeup_fd`), and a dedicated thread reads that pipe and calls
the routed callback. So a SIGUSR1 is answered even while the main thread is deep in
a checksum, and the main thread never runs job logic inside a signal handler.
Leaving the context restores the original handlers and wakeup fd (trio's way).
"""

from __future__ import annotations

import os
import select
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType, TracebackType

Callback = Callable[[int], None]

# The signals a job routes: ending (TERM, INT), beating (USR1), forwarding (HUP, QUIT, USR2)
# and reaping (CHLD).
JOB_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCHLD,
)


EARLY: list[int] = []  # job signals that arrived before the router was in place


def _remember(signum: int, frame: FrameType | None) -> None:
    EARLY.append(signum)


def catch_early() -> None:
    """From the first line of baqup-run: a SIGTERM (or a controller's SIGUSR1, whose
    default action is to kill) during start-up is remembered, not fatal; the router
    replays it once the job can act on it."""
    for signum in JOB_SIGNALS:
        if signum != signal.SIGCHLD:
            signal.signal(signum, _remember)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """A Python-level handler must exist for the wakeup fd to be written; it does nothing."""


class SignalRouter:
    def __init__(self, signals: Iterable[int], on_error: Callable[[BaseException], None]) -> None:
        self.signals = tuple(signals)
        self.callbacks: dict[int, Callback] = {}
        self._on_error = on_error
        self._originals: dict[int, object] = {}
        self._old_wakeup = -1
        self._read = self._write = -1
        self._thread: threading.Thread | None = None
        self._stop_read = self._stop_write = -1

    def route(self, signum: int, callback: Callback) -> None:
        self.callbacks[signum] = callback

    def __enter__(self) -> SignalRouter:
        self._read, self._write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop_read, self._stop_write = os.pipe2(os.O_CLOEXEC)
        for signum in self.signals:
            self._originals[signum] = signal.signal(signum, _ignore)
        self._old_wakeup = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._run, name="baqup-signals", daemon=True)
        self._thread.start()
        early, EARLY[:] = list(EARLY), []
        for signum in early:
            callback = self.callbacks.get(signum)
            if callback is not None:
                callback(signum)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        for signum, original in self._originals.items():
            signal.signal(signum, original)  # type: ignore[arg-type]
        os.write(self._stop_write, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        for fd in (self._read, self._write, self._stop_read, self._stop_write):
            os.close(fd)

    def _run(self) -> None:
        while True:
            ready, _, _ = select.select([self._read, self._stop_read], [], [])
            if self._stop_read in ready:
                return
            try:
                data = os.read(self._read, 256)
            except BlockingIOError:
                continue
            for signum in data:
                callback = self.callbacks.get(signum)
                if callback is None:
                    continue
                try:
                    callback(signum)
                except Exception as exc:  # noqa: BLE001 - routing must survive a callback
                    self._on_error(exc)
