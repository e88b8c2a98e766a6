"""Resource limits on the child's process tree: memory (psutil) and file counts.

Owns `BAQUP_AGENT_MEMORY_LIMIT` (`auto` reads the cgroup limit, `0` is none, else a
size) measured as the summed RSS of every descendant of baqup-run (the child, its
children, and orphans re-parented to the subreaper), and the 90% warning / 100%
abort rule shared with `BAQUP_SOURCE_MAX_FILES`. The check is cheap and never
raises: a process that vanishes between two reads is skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .coerce import parse_size
from .errors import JobFailed

APPROACHING = 0.9
_UNLIMITED = 1 << 60


def cgroup_memory_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), or None when unlimited."""
    candidates = [root / "memory.max", root / "memory" / "memory.limit_in_bytes"]
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                candidates.insert(0, root / path.lstrip("/") / "memory.max")
            elif "memory" in controllers.split(","):
                candidates.insert(0, root / "memory" / path.lstrip("/") / "memory.limit_in_bytes")
    except (OSError, ValueError):
        pass
    for candidate in candidates:
        try:
            text = candidate.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return None if value >= _UNLIMITED else value
    return None


def memory_limit(setting: str) -> int | None:
    """Bytes, or None for no limit."""
    text = setting.strip().lower()
    if text == "auto":
        return cgroup_memory_limit()
    value = parse_size(text)
    return value or None


def tree_rss(pid: int | None = None) -> int:
    """Summed RSS of every descendant of `pid` (default: this process)."""
    import psutil  # only jobs with a memory limit pay for the import

    try:
        parent = psutil.Process(pid if pid is not None else os.getpid())
        children = parent.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for child in children:
        try:
            total += child.memory_info().rss
        except psutil.Error:
            continue
    return total


class ResourceLimitExceeded(JobFailed):
    default_code = "RESOURCE_LIMIT_EXCEEDED"


@dataclass
class Limit:
    """A limit with the contract's two thresholds: warn once at 90%, abort above 100%."""

    name: str
    maximum: int
    unit: str = ""
    warned: bool = False

    def check(self, value: int) -> tuple[str | None, str]:
        """('approaching' | 'exceeded' | None, message) for the current value."""
        if value > self.maximum:
            return "exceeded", (
                f"{self.name} {value}{self.unit} exceeds the limit of {self.maximum}{self.unit}"
            )
        if not self.warned and value >= APPROACHING * self.maximum:
            self.warned = True
            return "approaching", (
                f"{self.name} {value}{self.unit} is over 90% of the limit of "
                f"{self.maximum}{self.unit}"
            )
        return None, ""
