"""The outbox: every bus message leaves through here, in order, and none is lost.

Owns the sender thread, the fallback buffer and reconnection (spec section 3 "Bus
Unavailability", INTERFACE.md sections 4 and 10). `put` never blocks and never
raises. While the bus is reachable, messages are sent in order. A message counts as
delivered only when the transport's send returned; a send that fails in any way
(`BusUnavailable`, `MessageRefused`, or anything else a transport lets out) is "not
delivered": that message and every later one are appended to
`$BAQUP_BUS_FALLBACK_DIR/{job_id}/buffer.jsonl` and fsynced; reconnection follows
the configured backoff, each attempt reported as a `CONNECTION_RETRY` event; on
reconnect (a PING answered PONG) the buffer is replayed in order before anything
new, then removed.

What is retried, and what is not:
- A bus that cannot be used (connection, timeout, garbled reply, a server-wide
  condition such as OOM or READONLY) is retried without limit, in order, until the
  end of the grace period: nothing is skipped, so a controller never sees a later
  message without the earlier ones.
- A message the server refuses as such (`MessageRefused`: WRONGTYPE, NOPERM, a
  command error, a message that cannot be encoded) is retried like the above (the
  retries are not reported as `CONNECTION_RETRY`: the bus answers), but after
  `REFUSE_LIMIT` refusals in a row, with no message delivered in between, it is set
  aside: appended to `rejected.jsonl` beside the buffer and logged, so the messages
  after it still flow instead of waiting behind it forever. Once a key had a
  message set aside, the next refusal of a message to that key sets it aside at
  once (a key of the wrong type or denied by an ACL costs one round of retries, not
  one per message); a delivery to the key lifts that.
- A message set aside, or dropped from memory when neither the buffer file nor the
  bus would take it, makes the job "not delivered": `drain` returns False and the
  job ends 75 with `.baqup-status.json` (session.py), even if the status itself
  reached the bus.

`drain` is the end of the job: it waits for the buffer to empty, retrying until the
grace period runs out.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import backoff, jsonutil
from .bus import BusUnavailable, Message, MessageRefused, Transport, append_line, read_lines
from .logs import Logger


@dataclass(frozen=True)
class ReconnectPolicy:
    policy: str = "exponential"
    max_attempts: int = 10
    base: float = 0.5
    cap: float = 30.0


class FallbackBuffer:
    """An append-only, fsynced JSON-lines file of messages not yet delivered."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0

    def append(self, message: Message) -> None:
        append_line(self.path, jsonutil.dumps(message.to_json()) + b"\n")
        self.count += 1

    def messages(self) -> list[Message]:
        out = []
        for item in read_lines(self.path):
            try:
                out.append(Message.from_json(item))
            except (KeyError, TypeError, ValueError):
                continue
        return out

    def rewrite(self, remaining: list[Message]) -> None:
        """Keep only `remaining` (after a partial replay), atomically."""
        if not remaining:
            self.remove()
            return
        tmp = self.path.with_suffix(".tmp")
        data = b"".join(jsonutil.dumps(m.to_json()) + b"\n" for m in remaining)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self.count = len(remaining)

    def remove(self) -> None:
        try:
            self.path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass
        self.count = 0
        try:
            self.path.parent.rmdir()
        except OSError:
            pass


_STOP = object()
MEMORY_LIMIT = 10_000  # undelivered messages held in memory when the disk buffer fails
REFUSE_LIMIT = 3  # refusals of one message in a row before it is set aside


class Outbox:
    """Ordered, lossless delivery of bus messages from one sender thread."""

    def __init__(
        self,
        transport: Transport,
        buffer: FallbackBuffer,
        log: Logger,
        policy: ReconnectPolicy,
        on_retry: Callable[[int, str], None] | None = None,
    ) -> None:
        self.transport = transport
        self.buffer = buffer
        self.log = log
        self.policy = policy
        self.on_retry = on_retry
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._pending = 0
        self.connected = False
        self.gave_up = False
        self.buffer_failed: str | None = None  # why the fallback buffer could not be written
        self._memory: deque[Message] = deque()  # what could not be buffered on disk
        self.rejected_path = buffer.path.with_name("rejected.jsonl")
        self.rejected = 0  # messages refused REFUSE_LIMIT times and set aside
        self._refusals = 0  # refusals since the last delivery: all of the head message
        self._refused_keys: set[str] = set()  # keys whose last message was set aside
        self._after_refusal = False  # the bus answers: retrying is no CONNECTION_RETRY
        self.lost = 0
        self.sent = 0
        self._attempt = 0
        self._next_attempt = 0.0
        self._grace_deadline: float | None = None
        self._thread = threading.Thread(target=self._run, name="baqup-outbox", daemon=True)

    # --- the caller's side ---------------------------------------------------------

    def start(self, connected: bool) -> None:
        self.connected = connected
        if not connected:
            self._schedule_retry()
        self._thread.start()

    def put(self, message: Message) -> None:
        with self._idle:
            self._pending += 1
        self._queue.put(message)

    @property
    def undelivered(self) -> int:
        """Messages not (yet) on the bus, including those given up on."""
        return self._pending + self.buffer.count + len(self._memory) + self.rejected + self.lost

    def drain(self, grace: float) -> bool:
        """Wait until everything is delivered; keep reconnecting for `grace` seconds.

        True when the bus has every message; False when some are still only in the
        fallback buffer (or not even there) after the grace period, or were set aside
        or dropped on the way.
        """
        deadline = time.monotonic() + grace
        self._grace_deadline = deadline
        if not self.connected:
            self.gave_up = False  # the grace period is a fresh round of attempts
            self._attempt = 0
            self._next_attempt = 0.0
        self._queue.put(None)  # wake the thread
        with self._idle:
            # `connected` too: a replay empties the buffer a moment before it is set.
            while self._pending or self.buffer.count or self._memory or not self.connected:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._idle.wait(min(remaining, 0.2))
            delivered = (
                not self._pending and not self.buffer.count and not self._memory and self.connected
            )
        if self.rejected or self.lost:
            self.log.error(
                "some messages never reached the bus; the job is reported as not delivered",
                set_aside=self.rejected,
                dropped=self.lost,
                rejected=str(self.rejected_path) if self.rejected else None,
            )
            return False
        return delivered

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=5)
        self.transport.close()

    # --- the sender thread ---------------------------------------------------------

    def _schedule_retry(self) -> None:
        self._attempt += 1
        if self._attempt > self.policy.max_attempts and self._grace_deadline is None:
            if not self.gave_up:
                self.gave_up = True
                self.log.error(
                    "bus unreachable after all reconnection attempts; buffering until the end "
                    "of the job",
                    attempts=self.policy.max_attempts,
                )
            self._next_attempt = float("inf")
            return
        wait = backoff.delay(
            self.policy.policy, self._attempt, base=self.policy.base, cap=self.policy.cap
        )
        if self._grace_deadline is not None:
            wait = min(wait, 2.0)
        self._next_attempt = time.monotonic() + wait

    def _send(self, message: Message) -> None:
        """One send; returns only when the bus took the message, else raises
        `BusUnavailable` (whatever the transport let out: nothing counts as sent)."""
        try:
            self.transport.send(message)
        except BusUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - a transport's bug is still "not sent"
            raise MessageRefused(f"{type(exc).__name__}: {exc}") from None
        self._refusals = 0
        self._refused_keys.discard(message.key)
        self.sent += 1

    def _deliver(self, message: Message) -> None:
        """Send or buffer one message; never raises."""
        if self.connected:
            try:
                self._send(message)
                return
            except BusUnavailable as exc:
                refused = isinstance(exc, MessageRefused)
                if refused and self._hopeless(message, exc):
                    return
                self.connected = False
                self._after_refusal = refused
                if not refused:
                    self.log.warn(
                        "bus unreachable; buffering messages",
                        reason=str(exc),
                        buffer=str(self.buffer.path),
                    )
                self._attempt = 0
                self._schedule_retry()
        self._buffer(message)

    def _hopeless(self, message: Message, exc: BusUnavailable) -> bool:
        """Count one more refusal of the head message; True once it is set aside.

        Set aside at the REFUSE_LIMIT-th refusal in a row, or at the first when the
        last message to the same key was set aside too (a key of the wrong type, a key
        the ACL denies): one slow round of retries per key, not per message.
        """
        self._refusals += 1
        if self._refusals < REFUSE_LIMIT and message.key not in self._refused_keys:
            self.log.warn(
                "bus refused a message; buffering it and what follows, to retry",
                kind=message.kind,
                key=message.key,
                refusal=self._refusals,
                reason=str(exc),
            )
            return False
        self._refusals = 0
        self._refused_keys.add(message.key)
        self._set_aside(message, str(exc))
        return True

    def _set_aside(self, message: Message, reason: str) -> None:
        self.rejected += 1
        self.log.error(
            "bus refused a message; set aside so the messages after it are delivered "
            "(the job will be reported as not delivered)",
            kind=message.kind,
            key=message.key,
            reason=reason,
            rejected=str(self.rejected_path),
        )
        try:
            append_line(self.rejected_path, jsonutil.dumps(message.to_json()) + b"\n")
        except Exception as error:  # noqa: BLE001 - logged above; the count makes it 75
            self.log.error("set-aside message could not be written", reason=str(error))

    def _buffer(self, message: Message) -> None:
        """To the fallback file; once that fails, to memory (so order is kept)."""
        if self.buffer_failed is None:
            try:
                self.buffer.append(message)
                return
            except OSError as exc:
                self.buffer_failed = exc.strerror or str(exc)
                self.log.error(
                    "fallback buffer cannot be written; holding messages in memory",
                    buffer=str(self.buffer.path),
                    reason=self.buffer_failed,
                )
            except Exception as exc:  # noqa: BLE001 - unencodable: the bus would refuse it too
                self._set_aside(message, f"cannot be encoded: {type(exc).__name__}")
                return
        self._remember(message)

    def _remember(self, message: Message) -> None:
        if message.kind == "heartbeat":  # a newer heartbeat supersedes the older ones
            stale = [m for m in self._memory if m.kind == "heartbeat" and m.key == message.key]
            for old in stale:
                self._memory.remove(old)
        self._memory.append(message)
        if len(self._memory) > MEMORY_LIMIT:
            victim = next((m for m in self._memory if m.kind != "status"), self._memory[0])
            self._memory.remove(victim)
            self.lost += 1
            if self.lost == 1:
                self.log.error(
                    "too many undelivered messages held in memory; dropping the oldest",
                    limit=MEMORY_LIMIT,
                )

    def _try_reconnect(self) -> None:
        if self.connected or time.monotonic() < self._next_attempt:
            return
        attempt = self._attempt
        if self.on_retry is not None and not self._after_refusal:
            try:
                self.on_retry(attempt, self.transport.name)
            except Exception as exc:  # noqa: BLE001 - reporting the retry must not stop it
                self.log.error("CONNECTION_RETRY not reported", error=f"{type(exc).__name__}")
        try:
            self.transport.ping()
            self._replay()
        except Exception as exc:  # noqa: BLE001 - any failure is "not yet": retry later
            self._after_refusal = isinstance(exc, MessageRefused)
            self.log.debug("bus reconnection failed", attempt=attempt, reason=str(exc))
            self._schedule_retry()
            return
        self.connected = True
        self._attempt = 0
        self.log.info("bus reconnected; buffer replayed", attempt=attempt)

    def _replay(self) -> None:
        self._replay_file()
        while self._memory:
            message = self._memory[0]
            try:
                self._send(message)
            except MessageRefused as exc:  # BusUnavailable keeps the rest, in order
                if not self._hopeless(message, exc):
                    raise
            self._memory.popleft()
        self.buffer_failed = None  # everything is out: the file may be tried again

    def _replay_file(self) -> None:
        messages = self.buffer.messages()
        if not messages:
            self.buffer.remove()
            return
        latest_heartbeat: dict[str, int] = {}
        for index, message in enumerate(messages):
            if message.kind == "heartbeat":
                latest_heartbeat[message.key] = index
        for index, message in enumerate(messages):
            if message.kind == "heartbeat" and latest_heartbeat[message.key] != index:
                continue  # superseded by a newer heartbeat: stale
            try:
                self._send(message)
            except BusUnavailable as exc:
                if isinstance(exc, MessageRefused) and self._hopeless(message, exc):
                    continue
                self._keep(messages[index:])
                raise
        self.buffer.remove()

    def _keep(self, remaining: list[Message]) -> None:
        """What a replay could not send goes back to the buffer, ahead of anything new."""
        try:
            self.buffer.rewrite(remaining)
        except OSError as exc:  # keep the rest, in order, ahead of what memory holds
            self._memory.extendleft(reversed(remaining))
            self.buffer.count = 0
            # New messages go to memory after them (a new file would be replayed first),
            # and the old file must not be replayed on top of memory.
            self.buffer_failed = exc.strerror or str(exc)
            try:
                self.buffer.path.unlink()
            except OSError:
                pass

    def _run(self) -> None:
        while True:
            timeout = None
            if not self.connected and self._next_attempt != float("inf"):
                timeout = max(0.0, min(self._next_attempt - time.monotonic(), 1.0))
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            try:
                if item is _STOP:
                    return
                if not self.connected:
                    self._try_reconnect()
            except Exception as exc:  # noqa: BLE001 - the thread must never die
                self.log.error("outbox error", error=f"{type(exc).__name__}: {exc}")
                if not self.connected:
                    self._schedule_retry()  # never spin on a persistent failure
            if isinstance(item, Message):
                try:
                    self._deliver(item)
                except Exception as exc:  # noqa: BLE001 - never counted as delivered
                    self.lost += 1
                    self.log.error(
                        "message lost", kind=item.kind, error=f"{type(exc).__name__}: {exc}"
                    )
                finally:
                    with self._idle:
                        self._pending -= 1
            with self._idle:
                self._idle.notify_all()
