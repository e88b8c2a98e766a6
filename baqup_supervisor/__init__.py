"""baqup-supervisor: make any backup command a compliant baqup agent.

The contract types are importable from here with the seeds' Python API
(`from baqup_supervisor import ExitCode, AgentState, LogLevel, Secret`). This module
stays light: it imports nothing beyond the standard library, so `baqup-run --help`
is fast.
"""

from __future__ import annotations

from .contract import AgentState, ErrorCategory, EventCode, ExitCode, LogLevel, Severity
from .errors import BaqupError
from .secret import Secret

__version__ = "0.1.0"
CONTRACT_VERSION = "1.0"

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
