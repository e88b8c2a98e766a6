"""The reporter: turns what happens in a job into bus messages, bounded in number.

Owns progress (replaced whole, at most once a second, the last always written),
event aggregation per code (count, first and last occurrence, up to 10 sample
paths; the first occurrence sent at once, later ones at most once a second per
code), the `warnings_summary`, state-change notifications and the final status.
Every message body passes the redactor before it leaves, and every text the child
sent is redacted before it is cut to its limit (`Redactor.clip`), so a cut never
keeps the start of a secret. Memory stays bounded whatever the child sends: at most
`MAX_CODES` aggregates of bounded size.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .bus import DAY, Keys, Message
from .clock import utc_iso
from .contract import AgentState, LogLevel
from .outbox import Outbox
from .secret import Redactor

PROGRESS_INTERVAL = 1.0
EVENT_INTERVAL = 1.0
MAX_CODES = 256
MAX_SAMPLES = 10
MAX_TEXT = 1000  # characters of an event's message or a progress's current_file
MAX_PATH = 4096  # characters of one sample path
OVERFLOW_CODE = "EVENT_CODES_EXCEEDED"
PROGRESS_FIELDS = (
    "percent_complete",
    "bytes_processed",
    "files_processed",
    "current_file",
    "estimated_remaining_seconds",
)


@dataclass
class _Aggregate:
    code: str
    severity: str
    message: str
    first: float  # epoch seconds
    last: float
    count: int = 0
    samples: list[str] = field(default_factory=list)
    dirty: bool = False
    last_sent: float = 0.0


class Reporter:
    def __init__(
        self,
        *,
        keys: Keys,
        job_id: str,
        agent_id: str,
        outbox: Outbox,
        redactor: Redactor,
    ) -> None:
        self.keys = keys
        self.job_id = job_id
        self.agent_id = agent_id
        self.outbox = outbox
        self.redactor = redactor
        self._lock = threading.Lock()
        self._events: dict[str, _Aggregate] = {}
        self._progress: dict[str, Any] | None = None
        self._progress_pending = False
        self._progress_sent_at = 0.0
        self.latest_progress: dict[str, Any] = {}
        self.progress_writes = 0
        self.event_writes = 0

    def _send(
        self,
        kind: str,
        key: str,
        body: Mapping[str, Any],
        ttl: int | None = DAY,
        notify: str | None = None,
    ) -> None:
        body = self.redactor.redact_value(dict(body))
        self.outbox.put(Message(kind, key, body, ttl=ttl, notify=notify))

    def _clip(self, value: Any, limit: int = MAX_TEXT) -> Any:
        """A text of the child's, redacted, then cut to `limit`; other values as they are."""
        return self.redactor.clip(value, limit) if isinstance(value, str) else value

    def _identity(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "agent_id": self.agent_id}

    # --- state changes ---------------------------------------------------------------

    def state_changed(self, old: AgentState, new: AgentState) -> None:
        body = {
            "type": "state",
            **self._identity(),
            "timestamp": utc_iso(),
            "state": str(new),
            "previous": str(old),
        }
        self._send("notify", self.keys.notify, body, ttl=None)

    # --- progress -------------------------------------------------------------------

    def progress(self, fields: Mapping[str, Any], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        body: dict[str, Any] = {"type": "progress", **self._identity()}
        body.update({k: self._clip(fields[k]) for k in PROGRESS_FIELDS if k in fields})
        body["timestamp"] = fields.get("timestamp") or utc_iso()
        with self._lock:
            self.latest_progress = body
            self._progress = body
            self._progress_pending = True
            due = now - self._progress_sent_at >= PROGRESS_INTERVAL
        if due:
            self._flush_progress(now)

    def _flush_progress(self, now: float) -> None:
        with self._lock:
            if not self._progress_pending or self._progress is None:
                return
            body = self._progress
            self._progress_pending = False
            self._progress_sent_at = now
            self.progress_writes += 1
        self._send("progress", self.keys.progress(self.job_id), body)

    # --- events ---------------------------------------------------------------------

    def event(
        self,
        code: str,
        severity: str,
        message: str = "",
        path: str | None = None,
        now: float | None = None,
    ) -> None:
        now = time.monotonic() if now is None else now
        stamp = time.time()  # formatted only when sent
        send_now = False
        message = self._clip(message)
        path = self._clip(path, MAX_PATH) if path else None
        with self._lock:
            aggregate = self._events.get(code)
            if aggregate is None:
                if len(self._events) >= MAX_CODES:
                    message = f"more than {MAX_CODES} event codes; {code} and later counted here"
                    code, severity = OVERFLOW_CODE, "warn"
                    aggregate = self._events.get(code)
                if aggregate is None:
                    aggregate = _Aggregate(code, severity, message, stamp, stamp)
                    self._events[code] = aggregate
                    send_now = True
            aggregate.count += 1
            aggregate.last = stamp
            if message:
                aggregate.message = message
            if _rank(severity) > _rank(aggregate.severity):
                aggregate.severity = severity
            if path and len(aggregate.samples) < MAX_SAMPLES and path not in aggregate.samples:
                aggregate.samples.append(path)
            aggregate.dirty = True
            if not send_now and now - aggregate.last_sent >= EVENT_INTERVAL:
                send_now = True
            body = self._event_body(aggregate, now) if send_now else None
        if body is not None:
            self._send("event", self.keys.events(self.job_id), body)

    def _event_body(self, aggregate: _Aggregate, now: float) -> dict[str, Any]:
        aggregate.dirty = False
        aggregate.last_sent = now
        self.event_writes += 1
        return {
            "type": "event",
            **self._identity(),
            "timestamp": utc_iso(),
            "severity": aggregate.severity,
            "code": aggregate.code,
            "message": aggregate.message,
            "first_occurrence": utc_iso(aggregate.first),
            "last_occurrence": utc_iso(aggregate.last),
            "count": aggregate.count,
            "sample_paths": list(aggregate.samples),
        }

    def _flush_events(self, now: float, force: bool) -> None:
        bodies = []
        with self._lock:
            for aggregate in self._events.values():
                if aggregate.dirty and (force or now - aggregate.last_sent >= EVENT_INTERVAL):
                    bodies.append(self._event_body(aggregate, now))
        for body in bodies:
            self._send("event", self.keys.events(self.job_id), body)

    @property
    def warnings_summary(self) -> dict[str, int]:
        with self._lock:
            return {code: agg.count for code, agg in self._events.items()}

    # --- timing ---------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Send what the rate limits held back and is now due."""
        now = time.monotonic() if now is None else now
        if self._progress_pending and now - self._progress_sent_at >= PROGRESS_INTERVAL:
            self._flush_progress(now)
        self._flush_events(now, force=False)

    def flush(self) -> None:
        """Send everything held back: the last progress and every changed aggregate."""
        now = time.monotonic()
        self._flush_progress(now)
        self._flush_events(now, force=True)

    # --- the end --------------------------------------------------------------------

    def status(self, body: Mapping[str, Any]) -> None:
        self._send("status", self.keys.status(self.job_id), body, notify=self.keys.notify)


_RANK = {level.value: level.rank for level in LogLevel}


def _rank(severity: str) -> int:
    return _RANK.get(severity, LogLevel.WARN.rank)
