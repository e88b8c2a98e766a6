"""Secrets: the `Secret` wrapper and the redactor that scrubs secret values from text.

A `Secret` never renders its value: not through str(), repr(), format(), `%`,
logging, JSON encoders or pickle. The `Redactor` is the safety net behind it: it
knows every secret value of the process and replaces it by `[REDACTED]` in any
value about to leave the process, whatever the spelling: any case, and every
character either as it is or escaped the way URLs (percent, `+`, JavaScript's
`escape`), JSON and JavaScript (`\\uXXXX`, `\\/`), Python and C (`\\xHH`, octal),
HTML (`&#NN;`, `&lt;`) and shells (`'\\''`, `$'...'`, `\\$`) write it; plus hex and
base64. It works on values, never on rendered text: strings inside a structure,
and a number or key equal to a secret becomes the mask, so what is rendered after
stays valid JSON. Every length limit goes through `Redactor.clip`, which redacts
first, never cuts inside a mask, and masks a trailing start of a secret that a cut
(here or upstream) left. Neither class ever raises.

Not guaranteed: a secret split across two lines or fields, a value shorter than
`MIN_REDACT_LENGTH`, and the first `MAX_KEPT_PREFIX` character of a secret at a cut.
"""

from __future__ import annotations

import base64
import functools
import hmac
import json
import math
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import unquote

from .jsontree import transform

REDACTED = "[REDACTED]"
SECRET_PREFIX = "BAQUP_SECRET_"  # noqa: S105 - a prefix, not a password
# Values shorter than this are not searched for in free text: masking every "1" or
# "ab" would destroy the logs without protecting anything worth the name.
MIN_REDACT_LENGTH = 3
# How much of a secret's start a cut may leave: a single character tells next to nothing,
# while masking every trailing character that could open a secret would blot every cut.
MAX_KEPT_PREFIX = 1
# Query parameters of the bus URL that carry a password (redis-py and Sentinel).
URL_SECRET_PARAMS = ("password", "sentinel_password")


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


# --- spellings -------------------------------------------------------------------

_NAMED_ESCAPES = {
    "\n": ("\\n",),
    "\t": ("\\t",),
    "\r": ("\\r",),
    "\b": ("\\b",),
    "\f": ("\\f",),
    "\v": ("\\v",),
    "\a": ("\\a",),
    "\0": ("\\0",),
    "\x1b": ("\\e",),
}
# Every spelling but a handful (`+` for a space, `'"'"'` for a quote) holds one of these.
_ESCAPING = frozenset("%\\&")
_HTML_NAMED = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;"}
# `bash -x` and `shlex.quote` close the single-quoted word, write the quote, reopen it.
_SHELL_QUOTES = ("'\\''", "'\"'\"'")


def _utf8(char: str) -> bytes:
    try:
        return char.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return char.encode("utf-8", "surrogatepass")


def _utf16(code: int) -> tuple[int, ...]:
    if code < 0x10000:
        return (code,)
    code -= 0x10000
    return (0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF))


@functools.lru_cache(maxsize=4096)
def spellings(char: str) -> tuple[str, ...]:
    """Every way the usual encoders write one character, longest first (matched in any case)."""
    code = ord(char)
    raw = _utf8(char)
    units = _utf16(code)
    forms = {
        char,
        "".join(f"%{b:02X}" for b in raw),  # RFC 3986, encodeURIComponent
        f"%{code:02X}" if code < 0x100 else "".join(f"%u{u:04X}" for u in units),  # escape()
        "".join(f"\\u{u:04x}" for u in units),  # JSON, JavaScript
        f"\\u{{{code:x}}}",  # ES2015
        f"\\U{code:08x}",  # Python
        "".join(f"\\x{b:02x}" for b in raw),  # bytes repr, bash $'...'
        "".join(f"\\{b:03o}" for b in raw),  # octal: C, bash $'...' in the C locale
        f"&#{code};",
        f"&#x{code:x};",
        *_NAMED_ESCAPES.get(char, ()),
    }
    if code < 0x100:
        forms.add(f"\\x{code:02x}")
    if not char.isalnum():
        forms.add("\\" + char)  # JSON `\/` and `\"`, shell `\$` and `\ `
    if char == " ":
        forms.add("+")
    if char == "'":
        forms.update(_SHELL_QUOTES)
    if char in _HTML_NAMED:
        forms.add(_HTML_NAMED[char])
    return tuple(sorted(forms, key=lambda form: (-len(form), form)))


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
    yield base64.b64encode(raw).decode("ascii")
    yield base64.urlsafe_b64encode(raw).decode("ascii")


def _fold(text: str) -> str:
    """Lower case, character for character (a lower form of another length stays as it is)."""
    lower = text.lower()
    if len(lower) == len(text):
        return lower
    return "".join(c if len(c.lower()) != 1 else c.lower() for c in text)


@dataclass(frozen=True)
class _Spelled:
    """One secret as the redactor searches for it."""

    pattern: str  # every character in any of its spellings, in any case
    plain: str  # the spellings without an escape character (`%`, `\\`, `&`)
    steps: tuple[tuple[str, ...], ...]  # the spellings of each character, folded
    hex: str  # the UTF-8 bytes in hex (compared folded)
    base64: tuple[str, ...]  # compared as they are
    reach: int  # the longest text a spelling of the whole secret can take

    @classmethod
    def of(cls, value: str) -> _Spelled:
        per_char = [spellings(c) for c in value]
        pattern = "".join(f"(?:{'|'.join(map(re.escape, forms))})" for forms in per_char)
        plain = "".join(
            _alternation([f for f in forms if not _ESCAPING.intersection(f)]) for forms in per_char
        )
        raw = _utf8_text(value)
        return cls(
            pattern=pattern,
            plain=plain,
            steps=tuple(tuple(_fold(f) for f in forms) for forms in per_char),
            hex=raw.hex(),
            base64=tuple(sorted(set(_b64_fragments(raw)), key=len, reverse=True)),
            reach=max(
                sum(len(forms[0]) for forms in per_char), 2 * len(raw), 4 * len(raw) // 3 + 4
            ),
        )

    def literals(self) -> Iterable[str]:
        yield self.hex
        yield from self.base64

    def opens(self, folded: str, start: int) -> bool:
        """Whether `folded[start:]` is a start (proper or whole) of a spelling of the secret."""
        end = len(folded)
        pending = [(start, 0)]
        seen: set[tuple[int, int]] = set()
        while pending:
            position, index = pending.pop()
            if (position, index) in seen:
                continue
            seen.add((position, index))
            rest = end - position
            for form in self.steps[index]:
                if len(form) > rest:
                    if form.startswith(folded[position:]):
                        return True
                elif folded.startswith(form, position):
                    if len(form) == rest:
                        return True
                    if index + 1 < len(self.steps):
                        pending.append((position + len(form), index + 1))
        return False


def _alternation(forms: list[str]) -> str:
    """A regex matching any of `forms`; a bare literal for one (sre then scans faster)."""
    if len(forms) == 1:
        return re.escape(forms[0])
    return f"(?:{'|'.join(map(re.escape, forms))})"


def _utf8_text(value: str) -> bytes:
    return b"".join(_utf8(c) for c in value)


def _literal_start(form: str, text: str, least: int) -> int | None:
    """Where the longest end of `text` that is a proper start of `form` begins (>= `least` long)."""
    if len(text) < least or len(form) <= least:
        return None
    tail = text[-least:]
    best = 0
    found = form.find(tail)
    while found >= 0:
        size = found + least
        if size < len(form) and text.endswith(form[:size]):
            best = size
        found = form.find(tail, found + 1)
    return len(text) - best if best else None


# --- URLs ------------------------------------------------------------------------

# scheme://user:password@ as written, parsable or not (a bracket left open, a bad port):
# the password runs to the last `@` of the authority, as urlsplit reads it. A scheme
# starts where a run of scheme characters starts: else a long run costs quadratic time.
_SCHEME = r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://"
_URL_USERINFO = re.compile(
    rf"(?P<head>{_SCHEME}[^\s:@/?#]*:)(?P<password>[^\s/?#]*)"
    r"@(?=[^\s@/?#]*(?:[/?#\s]|$))"
)
# The same with an unencoded `/` in the password (which no parser reads as one); bounded,
# so that a long run without `@` is not scanned again from every scheme in it.
_URL_USERINFO_LOOSE = re.compile(rf"{_SCHEME}[^\s:@/?#]*:(?P<password>[^\s@]{{0,256}})@")
_URL_PARAM = re.compile(
    rf"(?P<head>[?&;](?:{'|'.join(URL_SECRET_PARAMS)})=)(?P<password>[^&#;\s]*)", re.IGNORECASE
)


def url_passwords(url: str) -> list[str]:
    """Every password a URL carries (userinfo, `?password=`, `?sentinel_password=`).

    Read from the text as written, so a URL that does not parse still gives its
    password up; each both as written and percent-decoded.
    """
    found = [
        match["password"]
        for pattern in (_URL_USERINFO, _URL_USERINFO_LOOSE, _URL_PARAM)
        for match in pattern.finditer(url)
    ]
    values: list[str] = []
    for text in found:
        for value in (text, unquote(text), unquote(text.replace("+", " "))):
            if value and value not in values:
                values.append(value)
    return values


def mask_url(text: str) -> str:
    """`text` with the password of every URL in it (userinfo and query) masked."""
    text = _URL_USERINFO.sub(lambda m: f"{m['head']}{REDACTED}@", text)
    return _URL_PARAM.sub(lambda m: f"{m['head']}{REDACTED}", text)


# --- the redactor ----------------------------------------------------------------

_MASK = re.escape(REDACTED)


class Redactor:
    """Replaces known secret values, in any spelling, with `[REDACTED]`.

    Thread-safe; never raises; one regex scan per string when secrets exist. Masks
    already in a text are kept as they are, so redacting twice changes nothing.
    """

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, _Spelled] = {}
        self._pattern: re.Pattern[str] | None = None
        self._plain: re.Pattern[str] | None = None
        self._reach = 0
        self.add(*values)

    def add(self, *values: str | Secret | None) -> None:
        with self._lock:
            # copied, then swapped in whole: a reader in another thread never sees it change
            known = dict(self._values)
            for value in values:
                text = value.reveal() if isinstance(value, Secret) else value
                if text and len(text) >= MIN_REDACT_LENGTH and text not in known:
                    known[text] = _Spelled.of(text)
            if not known:
                return
            # Longest first: where two secrets overlap, the longer one is masked whole.
            ordered = sorted(known.items(), key=lambda item: len(item[0]), reverse=True)
            literals = sorted({f for _, s in ordered for f in s.base64}, key=len, reverse=True)
            hexes = sorted({s.hex for _, s in ordered}, key=len, reverse=True)
            tail = [*map(re.escape, hexes)]
            if literals:
                tail.append(f"(?-i:{'|'.join(map(re.escape, literals))})")

            def compiled(spelled: list[str]) -> re.Pattern[str]:
                return re.compile(f"(?P<mask>{_MASK})|{'|'.join([*spelled, *tail])}", re.I)

            self._pattern = compiled([s.pattern for _, s in ordered])
            # Most text holds no escape character at all: a far simpler pattern does.
            self._plain = compiled([s.plain for _, s in ordered])
            self._reach = max(s.reach for s in known.values())
            self._values = known

    @property
    def active(self) -> bool:
        return self._pattern is not None

    @property
    def reach(self) -> int:
        """The longest text one secret can take in any of its spellings."""
        return self._reach

    def redact(self, text: str) -> str:
        pattern = self._pattern
        if pattern is None or not text:
            return text
        if "%" not in text and "\\" not in text and "&" not in text:
            pattern = self._plain or pattern
        return pattern.sub(_replacement, text)

    def is_secret(self, text: str) -> bool:
        """Whether `text` is, whole, a spelling of a secret."""
        return bool(text) and self.redact(text) == REDACTED and text != REDACTED

    def redact_value(self, value: Any) -> Any:
        """A copy of a JSON-like value with every secret masked, safe to render.

        Strings are redacted; a number, boolean or key that *is* a secret becomes the
        mask (a string); Secrets become the mask. Nothing is ever redacted after
        rendering, so a rendered document stays valid.
        """
        return transform(value, self._leaf, self._key)

    def _leaf(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, Secret):
            return REDACTED
        if (
            self._pattern is not None
            and isinstance(value, (int, float))
            and _scalar_is(self, value)
        ):
            return REDACTED
        return value

    def _key(self, key: Any) -> Any:
        if isinstance(key, str):
            return self.redact(key)
        if isinstance(key, Secret):
            return REDACTED
        if self._pattern is not None and isinstance(key, (int, float)) and _scalar_is(self, key):
            return REDACTED
        return key

    # --- length limits -------------------------------------------------------------

    def clip(self, text: str, limit: int, *, truncated: bool = False, marker: str = "...") -> str:
        """`text` redacted, then cut to at most `limit` characters (`marker` ending a cut).

        The cut never falls inside a mask, and a trailing start of a secret (or of one
        of its spellings) longer than `MAX_KEPT_PREFIX` it would leave is masked.
        `truncated` says the text was already cut upstream (a line over its limit):
        its end gets the same treatment even when it fits.
        """
        out = self.redact(text)
        if len(out) <= limit:
            return self._fit(out, max(limit, len(out))) if truncated else out
        room = max(0, limit - len(marker))
        return self._fit(out, room) + (marker if len(marker) <= limit else "")

    def _fit(self, text: str, room: int) -> str:
        """The longest start of `text` within `room` that ends in no piece of a mask or a
        secret; what was cut off for being one is shown as one whole mask, room allowing."""
        show = room >= len(REDACTED)
        cut = min(room, len(text))
        masked = False
        while True:
            cut = min(cut, room - len(REDACTED) if masked and show else room)
            safe = _outside_masks(text, cut)
            if safe == cut:
                start = self._secret_start(text[:cut])
                if start is None:
                    return text[:cut] + (REDACTED if masked and show else "")
                safe = start
            cut = safe
            masked = True

    def _secret_start(self, text: str) -> int | None:
        """Where the longest end of `text` that opens a secret's spelling begins, if any."""
        known = self._values
        if not known:
            return None
        least = MAX_KEPT_PREFIX + 1
        # A character cut in two upstream decodes to U+FFFD: it belongs to the fragment.
        core = text.rstrip("\ufffd")
        end = len(core)
        if end < least:
            return None
        folded = _fold(core)
        earliest: int | None = None
        for spelled in known.values():
            window = max(0, end - spelled.reach)
            if earliest is not None:
                window = min(window, earliest)
            firsts = {form[0] for form in spelled.steps[0]}
            for start in range(window, end - least + 1):
                if earliest is not None and start >= earliest:
                    break
                if folded[start] in firsts and spelled.opens(folded, start):
                    earliest = start
                    break
            for form, haystack in ((spelled.hex, folded), *((f, core) for f in spelled.base64)):
                found = _literal_start(form, haystack, least)
                if found is not None and (earliest is None or found < earliest):
                    earliest = found
        return earliest

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | Any) -> Redactor:
        """A redactor for every `BAQUP_SECRET_*` value and every password in the bus URL."""
        values: list[str] = [v for k, v in environ.items() if k.startswith(SECRET_PREFIX)]
        values.extend(url_passwords(environ.get("BAQUP_BUS_URL", "") or ""))
        return cls(values)


def _replacement(match: re.Match[str]) -> str:
    return match.group("mask") or REDACTED


def _scalar_is(redactor: Redactor, value: int | float) -> bool:
    """Whether a number's JSON spelling (or its plain str) is a secret."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    texts = {str(value)}
    try:
        texts.add(json.dumps(value))
    except (TypeError, ValueError):
        pass
    return any(redactor.is_secret(text) for text in texts)


def _outside_masks(text: str, cut: int) -> int:
    """`cut`, moved back to the start of a mask it would fall inside."""
    if cut <= 0:
        return 0
    start = text.rfind(REDACTED, max(0, cut - len(REDACTED) + 1), cut + len(REDACTED) - 1)
    if 0 <= start < cut < start + len(REDACTED):
        return start
    return cut
