"""baqup-supervisor: make any backup command a compliant baqup agent.

The contract types are importable from here with the seeds' Python API
(`from baqup_supervisor import ExitCode, AgentState, LogLevel, Secret`). This module
imports nothing when it is imported: `baqup-run` blocks its signals only once the package
is loaded (entry.py), so every millisecond spent here is a window in which a signal is
fatal. The names are loaded on first use (PEP 562).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy honours the name)
if TYPE_CHECKING:
    from .contract import AgentState, ErrorCategory, EventCode, ExitCode, LogLevel, Severity
    from .errors import BaqupError
    from .secret import Secret

__version__ = "0.1.0"
CONTRACT_VERSION = "1.0"

_HOMES = {
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


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
