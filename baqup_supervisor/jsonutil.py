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

from .jsontree import TOO_DEEP as UNENCODABLE
from .jsontree import transform
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


def _scalar(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _key(key: Any) -> Any:
    return _scalar(key if isinstance(key, str) else str(key))


def _plain(value: Any) -> Any:
    """A copy the standard encoder writes as valid UTF-8 JSON, built without recursion."""
    return transform(value, _scalar, _key)


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
        # deeper than the interpreter can walk (about 1000 levels): nothing of it can be
        # spelled safely (even its repr recurses), so it is named, not written
        return orjson.dumps(UNENCODABLE)
    return text.encode("utf-8")
