"""The one exception tree of baqup-supervisor.

Every error that can end a job is a `BaqupError` carrying the exit code, the error
category and the error code it stands for, so that the CLI edge (and only the CLI
edge) can turn it into a process exit and the status's `error` object (spec section
5). Shutdown requests derive from `BaseException`, so a stray `except Exception`
cannot swallow a SIGTERM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from .contract import ErrorCategory, ExitCode


class BaqupError(Exception):
    """Root of every error baqup-supervisor raises on purpose."""

    exit_code: ClassVar[ExitCode] = ExitCode.INTERNAL_ERROR
    category: ClassVar[ErrorCategory] = ErrorCategory.INTERNAL
    default_code: ClassVar[str] = "INTERNAL_ERROR"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        suggestions: Sequence[str] = (),
        exit_code: ExitCode | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.suggestions = list(suggestions)
        if exit_code is not None:
            self.exit_code = exit_code  # type: ignore[misc]

    @property
    def retriable(self) -> bool:
        return self.category.default_retry

    def to_error(self) -> dict[str, Any]:
        """The spec section 5 error structure (attempts are added by the supervisor)."""
        error: dict[str, Any] = {
            "code": self.code,
            "category": str(self.category),
            "retriable": self.retriable,
            "message": self.message,
            "exit_code": int(self.exit_code),
        }
        if self.suggestions:
            error["suggestions"] = list(self.suggestions)
        return error


class ConfigError(BaqupError):
    """The environment or the schema is wrong; nothing was started (exit 64)."""

    exit_code = ExitCode.USAGE_CONFIG_ERROR
    category = ErrorCategory.CONFIG
    default_code = "CONFIG_INVALID"

    def __init__(self, message: str, problems: Sequence[Any] = (), **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.problems = list(problems)


class UsageError(ConfigError):
    """The command line is wrong (exit 64)."""

    default_code = "USAGE_ERROR"


class DataError(BaqupError):
    """The data is wrong or incomplete (exit 65)."""

    exit_code = ExitCode.DATA_ERROR
    category = ErrorCategory.PERMANENT
    default_code = "DATA_ERROR"


class SecurityViolation(DataError):
    """A path, link or name tried to leave its boundary (exit 65)."""

    default_code = "SECURITY_VIOLATION"


class EmptyArtifact(DataError):
    """A job produced no artifact, or a 0-byte one: never a backup (exit 65)."""

    default_code = "EMPTY_ARTIFACT"


class ResourceUnavailable(BaqupError):
    """Something the job needs is not there right now (exit 69)."""

    exit_code = ExitCode.RESOURCE_UNAVAILABLE
    category = ErrorCategory.TRANSIENT
    default_code = "RESOURCE_UNAVAILABLE"


class OutputError(BaqupError):
    """The job's output cannot be created (exit 73)."""

    exit_code = ExitCode.CANT_CREATE_OUTPUT
    category = ErrorCategory.TRANSIENT
    default_code = "CANT_CREATE_OUTPUT"


class StorageIOError(BaqupError):
    """Reading or writing failed, e.g. a full disk (exit 74)."""

    exit_code = ExitCode.IO_ERROR
    category = ErrorCategory.TRANSIENT
    default_code = "IO_ERROR"


class JobFailed(BaqupError):
    """The job itself failed: child exit, signal, timeout, stall, abort (exit 1 by default)."""

    exit_code = ExitCode.GENERAL_FAILURE
    category = ErrorCategory.PERMANENT
    default_code = "CHILD_FAILED"

    def __init__(
        self,
        message: str,
        *,
        retriable: bool = False,
        category: ErrorCategory | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        self._retriable = retriable
        if category is not None:
            self.category = category  # type: ignore[misc]
        elif self.code == "ABORTED":
            # a SIGTERM or SIGINT says nothing against the job, wherever the abort is raised:
            # running it again may well work (INTERFACE section 12)
            self.category = ErrorCategory.TRANSIENT  # type: ignore[misc]
            self._retriable = True

    @property
    def retriable(self) -> bool:
        return self._retriable


class ShutdownRequested(BaseException):
    """A signal asked the job to stop; deliberately not an `Exception`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
