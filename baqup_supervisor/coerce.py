"""Pure parsers for configuration text: env strings to typed values, sizes, multi-values.

Everything here is a function of its arguments (no I/O, no environment), so it can be
tested and fuzzed on its own (STYLE habit 4). Errors are `CoercionError`s carrying
the JSON Schema keyword they stand for and a message that never quotes the value
when the caller says it is secret.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


class CoercionError(ValueError):
    """A string that does not fit its declared type."""

    def __init__(self, message: str, keyword: str = "type") -> None:
        super().__init__(message)
        self.message = message
        self.keyword = keyword


def shown(text: str, secret: bool) -> str:
    """How a value is quoted in an error: never at all when it is a secret."""
    if secret:
        return "a value (hidden: secret)"
    if len(text) > 80:
        text = text[:77] + "..."
    return repr(text)


def parse_multi_value(text: str) -> list[str]:
    """INTERFACE.md section 6: `[` starts JSON; any `|` splits on `|`; else split on `,`.

    Empty items from `,` or `|` splitting are dropped ("a,,b" is ["a", "b"]); surrounding
    whitespace of each item is stripped. A JSON array must hold only scalars.
    """
    stripped = text.strip()
    if not stripped:
        return []
    if stripped.startswith("["):
        try:
            parsed = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise CoercionError(
                f"a JSON array (the value starts with '['), but it is malformed: {exc.msg} "
                f"at character {exc.pos}"
            ) from None
        if not isinstance(parsed, list):
            raise CoercionError("a JSON array")
        items: list[str] = []
        for item in parsed:
            if isinstance(item, (dict, list)):
                raise CoercionError("a JSON array of strings, numbers or booleans")
            if isinstance(item, bool):
                items.append("true" if item else "false")
            elif item is None:
                raise CoercionError("a JSON array without null items")
            else:
                items.append(str(item))
        return items
    separator = "|" if "|" in stripped else ","
    return [part.strip() for part in stripped.split(separator) if part.strip()]


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    raise CoercionError("a boolean (true or false)")


def parse_int(text: str) -> int:
    stripped = text.strip()
    if not _INTEGER.fullmatch(stripped):
        raise CoercionError("an integer (base 10 digits)")
    return int(stripped)


def parse_number(text: str) -> float:
    stripped = text.strip()
    if not _NUMBER.fullmatch(stripped):
        raise CoercionError("a number (such as 3 or 3.14)")
    return float(stripped)


def parse_size(text: str) -> int:
    """`0`, `512`, `512K`, `1.5G`, `2GiB`... in bytes; K, M, G, T are powers of 1024."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise CoercionError("a size such as 0, 512M or 2G (K, M, G, T)", keyword="pattern")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[unit.upper()])


def _declared_types(decl: Mapping[str, Any]) -> list[str]:
    declared = decl.get("type")
    if isinstance(declared, str):
        return [declared]
    if isinstance(declared, list):
        return [t for t in declared if isinstance(t, str)]
    if "enum" in decl and all(isinstance(e, bool) for e in decl["enum"]):
        return ["boolean"]
    return ["string"]


def _coerce_scalar(text: str, kind: str) -> Any:
    if kind == "boolean":
        return parse_bool(text)
    if kind == "integer":
        return parse_int(text)
    if kind == "number":
        return parse_number(text)
    if kind == "null":
        if text.strip().lower() in ("", "null"):
            return None
        raise CoercionError("null")
    return text


def coerce(text: str, decl: Mapping[str, Any]) -> Any:
    """Turn one environment string into the value its schema declaration asks for.

    Raises CoercionError whose message is the expectation ("an integer ..."); the
    caller adds the variable name and, if not secret, the offending value.
    """
    kinds = _declared_types(decl)
    if "array" in kinds:
        items = parse_multi_value(text)
        item_decl = decl.get("items")
        if isinstance(item_decl, Mapping):
            out = []
            for index, item in enumerate(items):
                try:
                    out.append(coerce(item, item_decl))
                except CoercionError as exc:
                    raise CoercionError(f"item {index} to be {exc.message}", exc.keyword) from None
            return out
        return items
    if "string" in kinds:
        return text
    errors: list[str] = []
    for kind in kinds:
        try:
            return _coerce_scalar(text, kind)
        except CoercionError as exc:
            errors.append(exc.message)
    raise CoercionError(" or ".join(errors) if errors else "a value of the declared type")
