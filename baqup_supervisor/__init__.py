"""baqup-supervisor: make any backup command a compliant baqup agent.

The contract types are importable from here with the seeds' Python API
(`from baqup_supervisor import ExitCode, AgentState, LogLevel, Secret`). This module
imports nothing when the package is imported: every console script and `baqup emit`
(called once per file by shell agents) pays for this file first, so the names are
loaded on first access (PEP 562).
"""

from __future__ import annotations

TYPE_CHECKING = False  # not `typing`'s: that import alone costs milliseconds here
if TYPE_CHECKING:
    from typing import Any

    from .contract import AgentState, ErrorCategory, EventCode, ExitCode, LogLevel, Severity
    from .errors import BaqupError
    from .secret import Secret

__version__ = "0.1.0"
CONTRACT_VERSION = "1.0"

_LAZY = {
    "AgentState": "contract",
    "ErrorCategory": "contract",
    "EventCode": "contract",
    "ExitCode": "contract",
    "LogLevel": "contract",
    "Severity": "contract",
    "BaqupError": "errors",
    "Secret": "secret",
}

__all__ = [
    "CONTRACT_VERSION",
    "AgentState",
    "BaqupError",
    "ErrorCategory",
    "EventCode",
    "ExitCode",
    "LogLevel",
    "Secret",
    "Severity",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
