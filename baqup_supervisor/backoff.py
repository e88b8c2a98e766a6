"""Backoff schedules for bus reconnection and job retries. Pure functions.

`delay(policy, attempt)` is the wait before attempt `attempt` (1-based) of a retry:
linear `base * n`, exponential `base * 2**(n-1)`, fibonacci `base * fib(n)`,
constant `base`; capped at `cap`, then jittered by +/- `jitter` (a fraction).
"""

from __future__ import annotations

import random

POLICIES = ("linear", "exponential", "fibonacci", "constant")


def _fib(n: int) -> int:
    a, b = 1, 1
    for _ in range(n - 1):
        a, b = b, a + b
    return a


def raw_delay(policy: str, attempt: int, base: float) -> float:
    n = max(1, attempt)
    if policy == "linear":
        return base * n
    if policy == "exponential":
        return base * 2.0 ** min(n - 1, 32)
    if policy == "fibonacci":
        return base * _fib(min(n, 64))
    if policy == "constant":
        return base
    raise ValueError(f"unknown backoff policy {policy!r}")


def delay(
    policy: str,
    attempt: int,
    *,
    base: float = 1.0,
    cap: float = 60.0,
    jitter: float = 0.2,
    rng: random.Random | None = None,
) -> float:
    value = min(raw_delay(policy, attempt, base), cap)
    if jitter:
        spread = value * jitter
        value += (rng or random).uniform(-spread, spread)
    return max(0.0, value)
