"""One JSON encoder for everything that leaves the process: bus, buffer, manifest, logs.

orjson is fast but refuses some valid input: integers beyond 64 bits (a progress
number like `1e20` read as an int), nesting deeper than 254 levels, non-str keys,
strings with lone surrogates (a non-UTF-8 file name decoded with surrogateescape).
`dumps` never raises on such input: it falls back to the standard library encoder,
which keeps the structure, and spells what cannot be JSON as text. Unknown objects
become their str(); a Secret its mask, never its value.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

from .secret import REDACTED, Secret


def _fallback(obj: Any) -> Any:
    """`default=`: anything unknown becomes its str(); a Secret its mask."""
    if isinstance(obj, Secret):
        return REDACTED
    if isinstance(obj, (set, frozenset)):
        return sorted(map(str, obj))
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    return str(obj)


def _plain(value: Any) -> Any:
    """A copy the standard encoder writes as valid, UTF-8-encodable JSON."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {_plain(k if isinstance(k, str) else str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dumps(value: Any, *, indent: bool = False) -> bytes:
    """Compact (or 2-space indented) JSON as UTF-8 bytes; never raises on data."""
    option = orjson.OPT_NON_STR_KEYS | (orjson.OPT_INDENT_2 if indent else 0)
    try:
        return orjson.dumps(value, default=_fallback, option=option)
    except (TypeError, orjson.JSONEncodeError):
        pass
    try:
        text = json.dumps(
            _plain(value),
            default=_fallback,
            separators=(",", ": ") if indent else (",", ":"),
            indent=2 if indent else None,
            ensure_ascii=False,
        )
    except (RecursionError, ValueError, TypeError):
        return orjson.dumps(REDACTED if isinstance(value, Secret) else str(value)[:1000])
    return text.encode("utf-8")
