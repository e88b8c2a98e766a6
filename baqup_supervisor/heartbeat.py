"""The heartbeat: a thread of its own, so a busy or blocked job never misses a beat.

Owns `{p}heartbeat:{agent_id}` (a hash with a TTL of 3 x interval): written every
interval, at once on `beat_now()` (SIGUSR1, an intent change, a state change), and
carrying the current state and intent. The fast path sends directly on the
transport; when that send fails in any way (the bus down, a refusal, a garbled
reply) the beat goes to the outbox, which buffers, retries and accounts for it like
any other message (outbox.py); its replay keeps only the newest heartbeat. Never
raises into its caller: not at start, before the child runs, nor from its thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from .bus import Message, Transport
from .clock import utc_iso
from .logs import Logger
from .outbox import Outbox


class Heartbeat:
    def __init__(
        self,
        *,
        key: str,
        interval: float,
        transport: Transport,
        outbox: Outbox,
        log: Logger,
        identity: Mapping[str, Any],
        state: Callable[[], str],
        redact: Callable[[Any], Any],
    ) -> None:
        self.key = key
        self.interval = interval
        self.ttl = max(1, round(3 * interval))
        self.transport = transport
        self.outbox = outbox
        self.log = log
        self.identity = dict(identity)
        self._state = state
        self._redact = redact
        self._intent: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.sequence = 0
        self._thread = threading.Thread(target=self._run, name="baqup-heartbeat", daemon=True)

    @property
    def intent(self) -> dict[str, Any] | None:
        with self._lock:
            return dict(self._intent) if self._intent else None

    def set_intent(self, intent: Mapping[str, Any] | None, *, beat: bool = True) -> None:
        """Carry `intent` in every heartbeat until cleared (None), and beat at once."""
        with self._lock:
            self._intent = dict(intent) if intent else None
        if beat:
            self.beat_now()

    def start(self) -> None:
        self.send()  # the first heartbeat, synchronously, before the child starts
        self._thread.start()

    def beat_now(self) -> None:
        self._wake.set()

    def stop(self, final: bool = True) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=max(5.0, self.interval))
        if final:
            self.send()

    def message(self) -> Message:
        with self._lock:
            self.sequence += 1
            body: dict[str, Any] = {
                "type": "heartbeat",
                **self.identity,
                "timestamp": utc_iso(),
                "state": self._state(),
                "intent": dict(self._intent) if self._intent else None,
                "sequence": self.sequence,
            }
        return Message("heartbeat", self.key, self._redact(body), ttl=self.ttl)

    def send(self) -> None:
        """Beat once: on the bus, or handed to the outbox. Never raises."""
        try:
            message = self.message()
        except Exception as exc:  # noqa: BLE001 - the next beat is built afresh
            self.log.error("heartbeat not built", error=f"{type(exc).__name__}: {exc}")
            return
        if self.outbox.connected:
            try:
                self.transport.send(message)
                return
            except Exception as exc:  # noqa: BLE001 - any failure means "not sent"
                self.log.debug("heartbeat not sent; handed to the outbox", reason=str(exc))
        self.outbox.put(message)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.send()
            except Exception as exc:  # noqa: BLE001 - the beat goes on
                self.log.error("heartbeat failed", error=f"{type(exc).__name__}: {exc}")
