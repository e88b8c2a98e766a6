"""Secrets: the `Secret` wrapper and the redactor that scrubs secret values from text.

A `Secret` never renders its value: not through str(), repr(), format(), `%`,
logging, JSON encoders or pickle. The `Redactor` is the safety net behind it: it
knows every secret value of the process and replaces it, and its common encodings,
by `[REDACTED]` in any text about to leave the process. Neither ever raises.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
import threading
from collections.abc import Iterable
from typing import Any, NoReturn
from urllib.parse import quote, quote_plus, unquote, urlsplit

REDACTED = "[REDACTED]"
SECRET_PREFIX = "BAQUP_SECRET_"  # noqa: S105 - a prefix, not a password
# Values shorter than this are not searched for in free text: masking every "1" or
# "ab" would destroy the logs without protecting anything worth the name.
MIN_REDACT_LENGTH = 3


class Secret:
    """A string that refuses to be shown. `reveal()` is the only way to the value."""

    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: str | Secret) -> None:
        if isinstance(value, Secret):
            value = value.reveal()
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        object.__setattr__(self, "_value", value)

    def reveal(self) -> str:
        return self._value

    def clear(self) -> None:
        """Drop the reference to the value (best effort: Python strings are immutable)."""
        object.__setattr__(self, "_value", "")

    def __str__(self) -> str:
        return REDACTED

    def __repr__(self) -> str:
        return REDACTED

    def __format__(self, spec: str) -> str:
        return format(REDACTED, spec)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Secret):
            return hmac.compare_digest(self._value.encode(), other._value.encode())
        return NotImplemented

    def __hash__(self) -> int:
        return hash((Secret, len(self._value)))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Secret is immutable")

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: Any) -> Secret:
        return self

    def __getstate__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")


def _b64_fragments(raw: bytes) -> Iterable[str]:
    """The base64 text a value yields at each of the three byte alignments.

    Inside a longer base64 stream the value may start at any offset modulo 3; only the
    characters that depend on the value's bits alone are stable, so those are kept.
    """
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw).decode("ascii")
        start = -(-8 * offset // 6)
        end = (8 * (offset + len(raw))) // 6
        fragment = encoded[start:end]
        if len(fragment) >= 4:
            yield fragment
            yield fragment.replace("+", "-").replace("/", "_")
    full = base64.b64encode(raw).decode("ascii")
    yield full
    yield base64.urlsafe_b64encode(raw).decode("ascii")


def encodings(value: str) -> set[str]:
    """Every spelling of `value` that the redactor masks."""
    raw = value.encode("utf-8")
    forms = {
        value,
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        quote(value, safe=""),
        quote_plus(value, safe=""),
        quote(value),
        raw.hex(),
        raw.hex().upper(),
    }
    forms.update(_b64_fragments(raw))
    return {form for form in forms if len(form) >= MIN_REDACT_LENGTH}


def url_password(url: str) -> str | None:
    """The password of a URL's userinfo, decoded, or None."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


class Redactor:
    """Replaces known secret values (and their encodings) with `[REDACTED]`.

    Thread-safe; `redact` never raises and costs one regex scan when secrets exist.
    """

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.add(*values)

    def add(self, *values: str | Secret | None) -> None:
        with self._lock:
            for value in values:
                text = value.reveal() if isinstance(value, Secret) else value
                if text and len(text) >= MIN_REDACT_LENGTH:
                    self._values.add(text)
            forms: set[str] = set()
            for text in self._values:
                forms.update(encodings(text))
            ordered = sorted(forms, key=len, reverse=True)
            self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    @property
    def active(self) -> bool:
        return self._pattern is not None

    def redact(self, text: str) -> str:
        pattern = self._pattern
        if pattern is None or not text:
            return text
        return pattern.sub(REDACTED, text)

    def redact_value(self, value: Any) -> Any:
        """Redact every string inside a JSON-like value; Secrets become `[REDACTED]`."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, Secret):
            return REDACTED
        if isinstance(value, dict):
            return {self.redact(str(k)): self.redact_value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.redact_value(v) for v in value]
        return value

    @classmethod
    def from_environ(cls, environ: dict[str, str] | Any) -> Redactor:
        """A redactor for every `BAQUP_SECRET_*` value and the bus URL's password."""
        values: list[str] = [v for k, v in environ.items() if k.startswith(SECRET_PREFIX)]
        password = url_password(environ.get("BAQUP_BUS_URL", ""))
        if password:
            values.append(password)
        return cls(values)
