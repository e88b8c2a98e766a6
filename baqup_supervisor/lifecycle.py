"""The lifecycle state machine of spec section 1, shared by baqup-run and the SDK.

Owns the current state, the allowed transitions (contract.TRANSITIONS), and the
phase deadlines (INITIALIZING 30 s, COMPLETING 60 s; an intent extends the current
phase by its expected duration; RUNNING is bounded by the job timeout, which the
supervisor keeps from the job's start because it spans every attempt). Every transition is
logged once and handed to the listeners (the heartbeat and the notify channel).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .contract import PHASE_TIMEOUTS, TRANSITIONS, AgentState
from .errors import BaqupError
from .logs import Logger

Listener = Callable[[AgentState, AgentState], None]


class Lifecycle:
    def __init__(self, log: Logger) -> None:
        self.log = log
        self._state = AgentState.INITIALIZING
        self._lock = threading.Lock()
        self.listeners: list[Listener] = []
        self.entered = time.monotonic()
        self.extension = 0.0
        self.history: list[tuple[AgentState, float]] = [(self._state, time.time())]

    @property
    def state(self) -> AgentState:
        return self._state

    def advance(self, new: AgentState) -> None:
        """Move to `new`; an illegal move is a bug (INTERNAL_ERROR), never silently done."""
        with self._lock:
            old = self._state
            if new == old:
                return
            if new not in TRANSITIONS[old]:
                raise BaqupError(f"illegal state transition {old} -> {new}")
            self._state = new
            self.entered = time.monotonic()
            self.extension = 0.0
            self.history.append((new, time.time()))
        self.log.info(f"state {old} -> {new}", previous=str(old), state=str(new))
        for listener in list(self.listeners):
            try:
                listener(old, new)
            except Exception as exc:  # noqa: BLE001 - a listener never breaks the machine
                self.log.error("state listener failed", error=f"{type(exc).__name__}: {exc}")

    def extend(self, seconds: float) -> None:
        """An intent: the current phase may take this much longer."""
        with self._lock:
            self.extension = max(self.extension, seconds)

    def phase_deadline(self) -> float | None:
        """Monotonic time at which the current phase is overdue, or None."""
        timeout = PHASE_TIMEOUTS.get(self._state)
        if timeout is None:
            return None
        return self.entered + timeout + self.extension
