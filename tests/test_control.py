"""The control channel's pure parts: `LineSplitter` and `parse_message` (INTERFACE.md section 3).

No processes, no bus: bytes in, lines and messages out. The splitter must keep its
memory bounded whatever the child writes; the parser must turn any line into either
a valid `ControlMessage` or a `ProtocolViolation` carrying at most 200 characters of
the offending line, and never raise.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baqup_supervisor.control import (
    MAX_LINE,
    ControlMessage,
    LineSplitter,
    ProtocolViolation,
    parse_message,
)
from baqup_supervisor.secret import Redactor

MiB = 1024 * 1024
PLAIN = Redactor()  # no secrets: the excerpt is the line's start as it came


def feed_all(splitter: LineSplitter, chunks: Iterable[bytes]) -> list[tuple[bytes, bool]]:
    out: list[tuple[bytes, bool]] = []
    for chunk in chunks:
        out.extend(splitter.feed(chunk))
    out.extend(splitter.flush())
    return out


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def line(document: Any) -> bytes:
    return json.dumps(document).encode()


def violation(raw: bytes, truncated: bool = False) -> ProtocolViolation:
    parsed = parse_message(raw, truncated)
    assert isinstance(parsed, ProtocolViolation), (raw[:200], parsed)
    assert isinstance(parsed.excerpt(PLAIN), str)
    assert len(parsed.excerpt(PLAIN)) <= 200
    assert parsed.reason
    return parsed


def message(raw: bytes) -> ControlMessage:
    parsed = parse_message(raw)
    assert isinstance(parsed, ControlMessage), (raw[:200], parsed)
    return parsed


# --- LineSplitter ----------------------------------------------------------------------


def test_lines_split_across_chunk_boundaries() -> None:
    data = b"alpha\nbeta gamma\n\ndelta\nepsilon"
    for size in (1, 2, 3, 5, 7, len(data)):
        got = feed_all(LineSplitter(), chunked(data, size))
        assert got == [
            (b"alpha", False),
            (b"beta gamma", False),
            (b"", False),
            (b"delta", False),
            (b"epsilon", False),
        ], size


def test_a_line_is_yielded_only_once_its_newline_arrives() -> None:
    splitter = LineSplitter()
    assert list(splitter.feed(b'{"type": "lo')) == []
    assert splitter.pending == len(b'{"type": "lo')
    assert list(splitter.feed(b'g", "message": "hi"}')) == []
    assert list(splitter.feed(b"\n")) == [(b'{"type": "log", "message": "hi"}', False)]
    assert splitter.pending == 0
    assert list(splitter.flush()) == []


def test_flush_yields_the_unterminated_last_line() -> None:
    splitter = LineSplitter()
    assert list(splitter.feed(b"one\ntwo")) == [(b"one", False)]
    assert list(splitter.flush()) == [(b"two", False)]
    assert splitter.pending == 0
    assert list(splitter.flush()) == []


def test_ten_mib_line_without_newline_stays_bounded_and_yields_one_excerpt() -> None:
    splitter = LineSplitter()
    chunk = b"x" * (256 * 1024)
    yielded: list[tuple[bytes, bool]] = []
    peak = 0
    for _ in range(10 * MiB // len(chunk)):
        yielded.extend(splitter.feed(chunk))
        peak = max(peak, splitter.pending)
        assert splitter.pending <= MAX_LINE
    assert peak <= MAX_LINE
    # One truncated excerpt of exactly the limit, nothing else, and no tail at EOF.
    assert yielded == [(b"x" * MAX_LINE, True)]
    assert list(splitter.flush()) == []
    assert splitter.pending == 0


def test_the_rest_of_a_long_line_is_discarded_up_to_its_newline() -> None:
    splitter = LineSplitter(limit=10)
    got = feed_all(splitter, [b"0123456789ABCDEF", b"GHIJ", b"KL\nshort\n", b"tail"])
    assert got == [(b"0123456789", True), (b"short", False), (b"tail", False)]


def test_a_line_of_exactly_the_limit_is_not_truncated() -> None:
    got = feed_all(LineSplitter(limit=8), [b"12345678", b"\nabc\n"])
    assert got == [(b"12345678", False), (b"abc", False)]


def test_long_line_within_one_chunk_followed_by_more_lines() -> None:
    data = b"y" * (MAX_LINE + 5000) + b'\n{"type":"log","message":"after"}\n'
    got = feed_all(LineSplitter(), [data])
    assert got[0] == (b"y" * MAX_LINE, True)
    assert got[1] == (b'{"type":"log","message":"after"}', False)
    assert len(got) == 2
    assert isinstance(parse_message(*got[0]), ProtocolViolation)
    assert message(got[1][0]).fields["message"] == "after"


def test_invalid_utf8_passes_through_as_bytes_and_never_raises() -> None:
    data = b"ok\n\xff\xfe\xc3\x28 broken\n\x80\n"
    got = feed_all(LineSplitter(), chunked(data, 3))
    assert got == [(b"ok", False), (b"\xff\xfe\xc3\x28 broken", False), (b"\x80", False)]
    for raw, truncated in got[1:]:
        parsed = violation(raw, truncated)
        parsed.excerpt(PLAIN).encode("utf-8")  # a clean str, replacement characters allowed


def test_crlf_lines_split_on_lf_and_still_parse() -> None:
    data = b'{"type":"log","message":"one"}\r\n{"type":"progress","percent_complete":5}\r\n'
    got = feed_all(LineSplitter(), chunked(data, 4))
    assert len(got) == 2
    assert [raw.rstrip(b"\r") for raw, _ in got] == [
        b'{"type":"log","message":"one"}',
        b'{"type":"progress","percent_complete":5}',
    ]
    assert all(not truncated for _, truncated in got)
    assert message(got[0][0]).fields["message"] == "one"
    assert message(got[1][0]).fields["percent_complete"] == 5


def expected_lines(data: bytes, limit: int) -> list[tuple[bytes, bool]]:
    """The model: bytes.split on LF; an over-long line becomes its first `limit` bytes."""
    parts = data.split(b"\n")
    last = parts.pop()
    out = [(p[:limit], True) if len(p) > limit else (p, False) for p in parts]
    if last:
        out.append((last[:limit], True) if len(last) > limit else (last, False))
    return out


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(
        st.one_of(
            st.binary(min_size=0, max_size=40),
            st.just(b"\n"),
            st.just(b"\r\n"),
            st.just(b"\n\n"),
        ),
        max_size=40,
    ).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30),
    limit=st.integers(min_value=1, max_value=64),
)
def test_random_chunking_gives_the_lines_of_bytes_split(
    data: bytes, cuts: list[int], limit: int
) -> None:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in itertools.pairwise(points)]
    splitter = LineSplitter(limit=limit)
    got: list[tuple[bytes, bool]] = []
    for chunk in chunks:
        got.extend(splitter.feed(chunk))
        assert splitter.pending <= limit
    got.extend(splitter.flush())
    assert got == expected_lines(data, limit)
    # Lines under the limit come out exactly as bytes.split gives them.
    short = [p for p in data.split(b"\n")[:-1] if len(p) <= limit]
    assert [raw for raw, truncated in got if not truncated][: len(short)] == short


@settings(max_examples=100, deadline=None)
@given(lines=st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")), max_size=30))
def test_random_chunking_with_the_real_limit(lines: list[bytes]) -> None:
    data = b"".join(x + b"\n" for x in lines)
    got = feed_all(LineSplitter(), chunked(data, 7))
    assert got == [(x, False) for x in lines]


# --- parse_message: valid messages of each type -----------------------------------------

VALID: list[dict[str, Any]] = [
    {"type": "progress"},
    {
        "type": "progress",
        "percent_complete": 45,
        "bytes_processed": 2147483648,
        "files_processed": 1250,
        "current_file": "/data/uploads/image.png",
        "estimated_remaining_seconds": 180,
    },
    {"type": "progress", "percent_complete": 99.5, "estimated_remaining_seconds": 0.5},
    {"type": "progress", "percent_complete": 0, "bytes_processed": 0, "files_processed": 0},
    {"type": "progress", "percent_complete": 100, "bytes_processed": 10.0},
    {"type": "intent", "operation": "vacuum", "expected_duration_seconds": 600, "detail": "db"},
    {"type": "intent", "operation": "checksum"},
    {"type": "intent", "operation": None},
    {"type": "event", "code": "PERMISSION_DENIED"},
    {
        "type": "event",
        "severity": "error",
        "code": "FILE_VANISHED",
        "message": "gone",
        "path": "/data/x",
    },
    {"type": "event", "code": "A" + "B" * 63, "severity": "info"},
    {"type": "artifact", "filename": "db.sql.zst"},
    {"type": "artifact", "filename": "sub/dir/file.tar", "compression": "none"},
    {"type": "component", "name": "users_db", "status": "success", "artifact": "users.sql"},
    {"type": "component", "name": "legacy", "status": "failed", "error": {"code": "X"}},
    {"type": "component", "name": "legacy", "status": "failed", "error": "boom"},
    {"type": "metadata", "source_metadata": {}},
    {"type": "metadata", "source_metadata": {"type": "filesystem", "files_included": 3}},
    {"type": "log", "message": "hello"},
    {"type": "log", "level": "warning", "message": "old spelling"},
    {"type": "log", "level": "debug", "message": "", "context": {"k": [1, 2]}},
]


@pytest.mark.parametrize("document", VALID, ids=lambda d: str(d["type"]))
def test_valid_messages_parse(document: dict[str, Any]) -> None:
    parsed = message(line(document))
    assert parsed.type == document["type"]
    for key, value in document.items():
        assert parsed.fields[key] == value


def test_all_seven_types_are_known() -> None:
    kinds = {d["type"] for d in VALID}
    assert kinds == {"progress", "intent", "event", "artifact", "component", "metadata", "log"}


def test_surrounding_whitespace_is_accepted() -> None:
    assert message(b'  {"type":"log","message":"x"}  \r').fields["message"] == "x"


# --- parse_message: each invalid field -----------------------------------------------------

INVALID: list[tuple[str, dict[str, Any]]] = [
    ("percent negative", {"type": "progress", "percent_complete": -1}),
    ("percent over 100", {"type": "progress", "percent_complete": 100.5}),
    ("percent string", {"type": "progress", "percent_complete": "50"}),
    ("percent bool", {"type": "progress", "percent_complete": True}),
    ("percent null-like list", {"type": "progress", "percent_complete": [50]}),
    ("bytes negative", {"type": "progress", "bytes_processed": -1}),
    ("bytes fractional", {"type": "progress", "bytes_processed": 1.5}),
    ("bytes string", {"type": "progress", "bytes_processed": "1024"}),
    ("files negative", {"type": "progress", "files_processed": -3}),
    ("files fractional", {"type": "progress", "files_processed": 2.25}),
    ("files bool", {"type": "progress", "files_processed": False}),
    ("eta negative", {"type": "progress", "estimated_remaining_seconds": -0.1}),
    ("eta string", {"type": "progress", "estimated_remaining_seconds": "soon"}),
    ("current_file number", {"type": "progress", "current_file": 7}),
    ("intent without operation", {"type": "intent"}),
    ("intent empty operation", {"type": "intent", "operation": ""}),
    ("intent numeric operation", {"type": "intent", "operation": 5}),
    (
        "intent negative duration",
        {"type": "intent", "operation": "x", "expected_duration_seconds": -1},
    ),
    (
        "intent string duration",
        {"type": "intent", "operation": "x", "expected_duration_seconds": "60"},
    ),
    ("intent detail number", {"type": "intent", "operation": "x", "detail": 1}),
    ("event without code", {"type": "event", "message": "m"}),
    ("event lowercase code", {"type": "event", "code": "permission_denied"}),
    ("event code with dash", {"type": "event", "code": "PERMISSION-DENIED"}),
    ("event code too long", {"type": "event", "code": "A" * 65}),
    ("event code number", {"type": "event", "code": 13}),
    ("event empty code", {"type": "event", "code": ""}),
    ("event bad severity", {"type": "event", "code": "X", "severity": "loud"}),
    ("event message number", {"type": "event", "code": "X", "message": 1}),
    ("event path list", {"type": "event", "code": "X", "path": ["/a"]}),
    ("artifact without filename", {"type": "artifact"}),
    ("artifact empty filename", {"type": "artifact", "filename": ""}),
    ("artifact filename number", {"type": "artifact", "filename": 3}),
    ("artifact compression number", {"type": "artifact", "filename": "a", "compression": 1}),
    ("component without name", {"type": "component", "status": "success"}),
    ("component empty name", {"type": "component", "name": "", "status": "success"}),
    ("component without status", {"type": "component", "name": "c"}),
    ("component bad status", {"type": "component", "name": "c", "status": "ok"}),
    (
        "component error list",
        {"type": "component", "name": "c", "status": "failed", "error": ["x"]},
    ),
    (
        "component error number",
        {"type": "component", "name": "c", "status": "failed", "error": 2},
    ),
    (
        "component artifact number",
        {"type": "component", "name": "c", "status": "success", "artifact": 1},
    ),
    ("metadata missing", {"type": "metadata"}),
    ("metadata list", {"type": "metadata", "source_metadata": [1]}),
    ("metadata string", {"type": "metadata", "source_metadata": "x"}),
    ("metadata null", {"type": "metadata", "source_metadata": None}),
    ("log without message", {"type": "log"}),
    ("log message number", {"type": "log", "message": 5}),
    ("log bad level", {"type": "log", "level": "loud", "message": "m"}),
    ("log context list", {"type": "log", "message": "m", "context": ["a"]}),
    ("log context string", {"type": "log", "message": "m", "context": "a=b"}),
]


@pytest.mark.parametrize(("name", "document"), INVALID, ids=[n for n, _ in INVALID])
def test_invalid_fields_are_protocol_violations(name: str, document: dict[str, Any]) -> None:
    raw = line(document)
    parsed = violation(raw)
    assert document["type"] in parsed.reason, (name, parsed.reason)
    assert parsed.excerpt(PLAIN) == raw.decode()[:200]


def test_every_type_has_an_invalid_case() -> None:
    kinds = {d["type"] for _, d in INVALID}
    assert kinds == {"progress", "intent", "event", "artifact", "component", "metadata", "log"}


# --- parse_message: lines that are not messages -------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"not json at all",
        b"{",
        b'{"type": "log", "message": "x"',
        b"{'type': 'log'}",
        b"NaN",
        b"\xff\xfe\xfd",
        b'{"type": "log", "message": "\xff"}',
    ],
)
def test_not_json(raw: bytes) -> None:
    parsed = violation(raw)
    assert "JSON" in parsed.reason


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"progress"', b"42", b"null", b"true", b"[]"])
def test_not_an_object(raw: bytes) -> None:
    parsed = violation(raw)
    assert "object" in parsed.reason
    assert parsed.excerpt(PLAIN) == raw.decode()


@pytest.mark.parametrize(
    "document",
    [{"type": "bogus"}, {}, {"type": 5}, {"type": None}, {"type": "Progress"}, {"kind": "log"}],
)
def test_unknown_type(document: dict[str, Any]) -> None:
    parsed = violation(line(document))
    assert "type" in parsed.reason


@pytest.mark.parametrize("raw", [b"", b"   ", b"\r"])
def test_empty_lines_are_violations(raw: bytes) -> None:
    violation(raw)


def test_over_64_kib_valid_json_is_a_violation_with_a_short_excerpt() -> None:
    raw = line({"type": "log", "message": "m" * (MAX_LINE + 10)})
    assert len(raw) > MAX_LINE
    parsed = violation(raw)
    assert str(MAX_LINE) in parsed.reason or "long" in parsed.reason
    assert parsed.excerpt(PLAIN) == raw.decode()[:200]


def test_a_truncated_line_is_a_violation_even_if_it_parses() -> None:
    parsed = violation(b'{"type":"log","message":"x"}', truncated=True)
    assert len(parsed.excerpt(PLAIN)) <= 200


def test_exactly_64_kib_is_accepted() -> None:
    skeleton = line({"type": "log", "message": ""})
    raw = line({"type": "log", "message": "m" * (MAX_LINE - len(skeleton))})
    assert len(raw) == MAX_LINE
    assert message(raw).fields["message"].startswith("mmm")


@pytest.mark.parametrize(
    "raw",
    [
        b"x" * 10_000,
        "é".encode() * 5_000,
        "💾".encode() * 5_000,
        b"[" + b"1," * 5000 + b"1]",
        b"\xff" * 5000,
        line({"type": "nope", "pad": "p" * 5000}),
        line({"type": "progress", "percent_complete": 500, "pad": "p" * 5000}),
    ],
    ids=["ascii", "two-byte", "four-byte", "array", "invalid-utf8", "unknown", "invalid"],
)
def test_excerpt_is_at_most_200_characters(raw: bytes) -> None:
    parsed = violation(raw)
    assert 0 < len(parsed.excerpt(PLAIN)) <= 200


def test_parse_never_raises_on_random_bytes() -> None:
    import random

    rng = random.Random(1234)
    for _ in range(2000):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
        parsed = parse_message(raw)
        assert isinstance(parsed, (ControlMessage, ProtocolViolation))
        if isinstance(parsed, ProtocolViolation):
            assert len(parsed.excerpt(PLAIN)) <= 200
