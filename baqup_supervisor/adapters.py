"""Progress adapters: progress messages from the output of tools users already run.

Pure parsers (STYLE habit 4): one line of a tool's output in, progress fields (or
None) out. `pv -n` prints a whole percentage per line on stderr; restic's `--json`
prints `status` objects on stdout. `--progress-from NAME` picks the adapter and the
stream it reads; matched lines become progress, the others are logged as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

Adapter = Callable[[bytes], dict[str, Any] | None]


def pv(line: bytes) -> dict[str, Any] | None:
    """`pv -n`: `45` per line (a percentage), or `-b` style byte counts with `pv -n -b`."""
    text = line.strip()
    if not text or not text.isdigit():
        return None
    value = int(text)
    return {"percent_complete": value} if value <= 100 else {"bytes_processed": value}


def restic_json(line: bytes) -> dict[str, Any] | None:
    """restic `--json` status lines (backup and restore)."""
    if not line.startswith(b"{"):
        return None
    try:
        message = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict) or message.get("message_type") != "status":
        return None
    fields: dict[str, Any] = {}
    percent = message.get("percent_done")
    if isinstance(percent, (int, float)):
        fields["percent_complete"] = round(min(max(float(percent), 0.0), 1.0) * 100, 2)
    for source, target in (
        ("bytes_done", "bytes_processed"),
        ("bytes_restored", "bytes_processed"),
        ("files_done", "files_processed"),
        ("files_restored", "files_processed"),
        ("seconds_remaining", "estimated_remaining_seconds"),
    ):
        value = message.get(source)
        if isinstance(value, int) and value >= 0 and target not in fields:
            fields[target] = value
    current = message.get("current_files")
    if isinstance(current, list) and current and isinstance(current[0], str):
        fields["current_file"] = current[0]
    return fields or None


# adapter name -> (parser, the child's stream it reads)
ADAPTERS: dict[str, tuple[Adapter, str]] = {
    "pv": (pv, "stderr"),
    "restic-json": (restic_json, "stdout"),
}
