"""The vocabulary of the baqup Agent Contract: exit codes, states, levels, categories, events.

This module owns the names and values the contract fixes (spec sections 1, 5, 6 and
Appendix B) and nothing else: no I/O, no imports beyond the standard library, so that
`--help` and `--version` stay fast and the SDK can import it anywhere.
"""

from __future__ import annotations

import enum
from typing import Any


class ExitCode(enum.IntEnum):
    """Process exit codes (spec section 5); the only codes baqup-run ever exits with."""

    SUCCESS = 0
    GENERAL_FAILURE = 1
    USAGE_CONFIG_ERROR = 64
    DATA_ERROR = 65
    RESOURCE_UNAVAILABLE = 69
    INTERNAL_ERROR = 70
    CANT_CREATE_OUTPUT = 73
    IO_ERROR = 74
    COMPLETED_UNREPORTED = 75
    PARTIAL_FAILURE = 76

    # Python 3.10 prints `ExitCode.SUCCESS`; the seeds' API prints the number.
    def __str__(self) -> str:
        return str(self.value)

    @property
    def retriable(self) -> bool | None:
        """The spec's "Retriable" column: True, False, or None for "maybe"/"configurable"."""
        return _RETRIABLE[self]


_RETRIABLE: dict[ExitCode, bool | None] = {
    ExitCode.SUCCESS: False,
    ExitCode.GENERAL_FAILURE: None,
    ExitCode.USAGE_CONFIG_ERROR: False,
    ExitCode.DATA_ERROR: False,
    ExitCode.RESOURCE_UNAVAILABLE: True,
    ExitCode.INTERNAL_ERROR: None,
    ExitCode.CANT_CREATE_OUTPUT: True,
    ExitCode.IO_ERROR: True,
    ExitCode.COMPLETED_UNREPORTED: True,
    ExitCode.PARTIAL_FAILURE: None,
}


class _StrEnum(str, enum.Enum):
    """A str enum whose str() and format() are the bare value on every Python >= 3.10."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class AgentState(_StrEnum):
    """Lifecycle states (spec section 1)."""

    INITIALIZING = "initializing"
    RUNNING = "running"
    COMPLETING = "completing"
    TERMINATED = "terminated"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (AgentState.TERMINATED, AgentState.FAILED)


# Allowed transitions of the state machine drawn in spec section 1.
TRANSITIONS: dict[AgentState, frozenset[AgentState]] = {
    AgentState.INITIALIZING: frozenset({AgentState.RUNNING, AgentState.FAILED}),
    AgentState.RUNNING: frozenset({AgentState.COMPLETING, AgentState.FAILED}),
    AgentState.COMPLETING: frozenset({AgentState.TERMINATED, AgentState.FAILED}),
    AgentState.TERMINATED: frozenset(),
    AgentState.FAILED: frozenset(),
}

# The manifest's role enum (Appendix C); baqup-run's `--role` takes these words.
ROLES: tuple[str, ...] = ("snapshot", "restore", "migrate", "sync")

# Phase timeouts of spec section 1, in seconds (RUNNING is bounded by BAQUP_JOB_TIMEOUT).
PHASE_TIMEOUTS: dict[AgentState, float] = {
    AgentState.INITIALIZING: 30.0,
    AgentState.COMPLETING: 60.0,
}


@enum.unique
class LogLevel(_StrEnum):
    """Log levels (spec section 6), ordered: `LogLevel.DEBUG < LogLevel.WARN`."""

    TRACE = "trace"
    DEBUG = "debug"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"
    FATAL = "fatal"

    @property
    def rank(self) -> int:
        return _LEVEL_RANK[self.value]

    def __lt__(self, other: Any) -> bool:
        if not isinstance(other, LogLevel):
            return NotImplemented
        return self.rank < other.rank

    def __le__(self, other: Any) -> bool:
        if not isinstance(other, LogLevel):
            return NotImplemented
        return self.rank <= other.rank

    def __gt__(self, other: Any) -> bool:
        if not isinstance(other, LogLevel):
            return NotImplemented
        return self.rank > other.rank

    def __ge__(self, other: Any) -> bool:
        if not isinstance(other, LogLevel):
            return NotImplemented
        return self.rank >= other.rank

    def __hash__(self) -> int:
        return hash(self.value)

    @classmethod
    def parse(cls, text: str) -> LogLevel:
        """Accept the contract's names plus the common aliases `warning` and `critical`."""
        key = text.strip().lower()
        return cls(_LEVEL_ALIASES.get(key, key))


_LEVEL_RANK = {"trace": 0, "debug": 1, "info": 2, "warn": 3, "error": 4, "fatal": 5}
_LEVEL_ALIASES = {"warning": "warn", "critical": "fatal"}


class ErrorCategory(_StrEnum):
    """Error categories (spec section 5) with their default retry policy."""

    CONFIG = "config"
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    PARTIAL = "partial"
    INTERNAL = "internal"

    @property
    def default_retry(self) -> bool:
        return self is ErrorCategory.TRANSIENT


# Event severities are the log levels' words (spec Appendix B uses info, warn, error).
Severity = LogLevel


class EventCode(_StrEnum):
    """Event codes: Appendix B, then the codes baqup-run adds for its own errors."""

    PERMISSION_DENIED = "PERMISSION_DENIED"
    SYMLINK_SKIPPED = "SYMLINK_SKIPPED"
    SYMLINK_EXTERNAL = "SYMLINK_EXTERNAL"
    FILE_CHANGED = "FILE_CHANGED"
    FILE_VANISHED = "FILE_VANISHED"
    COMPRESSION_FALLBACK = "COMPRESSION_FALLBACK"
    CHECKSUM_RETRY = "CHECKSUM_RETRY"
    CONNECTION_RETRY = "CONNECTION_RETRY"
    RESOURCE_LIMIT_APPROACHING = "RESOURCE_LIMIT_APPROACHING"
    RESOURCE_LIMIT_EXCEEDED = "RESOURCE_LIMIT_EXCEEDED"
    ANOMALY_DETECTED = "ANOMALY_DETECTED"
    # Not in Appendix B; used by baqup-run for its own errors and warnings.
    PROTOCOL_ERROR = "PROTOCOL_ERROR"
    CONFIG_INVALID = "CONFIG_INVALID"
    ABORTED = "ABORTED"
    JOB_TIMEOUT = "JOB_TIMEOUT"
    STALLED = "STALLED"
    CHILD_FAILED = "CHILD_FAILED"
    CHILD_KILLED = "CHILD_KILLED"
    COMMAND_NOT_FOUND = "COMMAND_NOT_FOUND"
    EMPTY_ARTIFACT = "EMPTY_ARTIFACT"
    SECURITY_VIOLATION = "SECURITY_VIOLATION"
    OUTPUT_FAILED = "OUTPUT_FAILED"
    JOB_RETRY = "JOB_RETRY"
    INTERNAL_ERROR = "INTERNAL_ERROR"

    @property
    def default_severity(self) -> Severity:
        return _EVENT_SEVERITY.get(self.value, Severity.ERROR)


_EVENT_SEVERITY: dict[str, Severity] = {
    "PERMISSION_DENIED": Severity.WARN,
    "SYMLINK_SKIPPED": Severity.INFO,
    "SYMLINK_EXTERNAL": Severity.WARN,
    "FILE_CHANGED": Severity.WARN,
    "FILE_VANISHED": Severity.WARN,
    "COMPRESSION_FALLBACK": Severity.INFO,
    "CHECKSUM_RETRY": Severity.WARN,
    "CONNECTION_RETRY": Severity.INFO,
    "RESOURCE_LIMIT_APPROACHING": Severity.WARN,
    "RESOURCE_LIMIT_EXCEEDED": Severity.ERROR,
    "ANOMALY_DETECTED": Severity.WARN,
    "PROTOCOL_ERROR": Severity.WARN,
    "JOB_RETRY": Severity.WARN,
}
