"""Time: the one place timestamps are made, so tests can reason about them.

Wall-clock stamps are UTC RFC 3339 with microseconds and a `Z` (spec section 6);
durations always use the monotonic clock.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone


def utc_iso(epoch: float | None = None) -> str:
    """`2024-01-15T03:02:15.123456Z` for now, or for an epoch timestamp."""
    moment = (
        datetime.now(timezone.utc) if epoch is None else datetime.fromtimestamp(epoch, timezone.utc)
    )
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def monotonic() -> float:
    return time.monotonic()
