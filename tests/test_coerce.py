"""The pure configuration parsers: booleans, integers, numbers, sizes, multi-values."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baqup_supervisor.coerce import (
    CoercionError,
    coerce,
    parse_bool,
    parse_int,
    parse_multi_value,
    parse_number,
    parse_size,
    shown,
)

# --- booleans ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("True", True),
        ("tRuE", True),
        (" true ", True),
        ("false", False),
        ("FALSE", False),
        ("False", False),
        ("fAlSe", False),
    ],
)
def test_bool_accepts_true_false_any_case(text: str, expected: bool) -> None:
    assert parse_bool(text) is expected
    assert coerce(text, {"type": "boolean"}) is expected


@pytest.mark.parametrize(
    "text", ["yes", "no", "1", "0", "on", "off", "y", "t", "", "truee", "true false"]
)
def test_bool_rejects_other_spellings(text: str) -> None:
    with pytest.raises(CoercionError) as info:
        parse_bool(text)
    assert info.value.keyword == "type"
    assert "boolean" in info.value.message
    with pytest.raises(CoercionError):
        coerce(text, {"type": "boolean"})


# --- integers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("42", 42),
        ("+42", 42),
        ("-42", -42),
        ("  42  ", 42),
        ("\t-7\n", -7),
        ("007", 7),
        ("3600", 3600),
        ("123456789012345678901234567890", 123456789012345678901234567890),
    ],
)
def test_int_base_10(text: str, expected: int) -> None:
    assert parse_int(text) == expected
    value = coerce(text, {"type": "integer"})
    assert value == expected
    assert type(value) is int


@pytest.mark.parametrize(
    "text",
    ["ten", "1.5", "0x10", "1_000", "", " ", "1e3", "--1", "+", "1 000", "١٢", "12a", "0b1"],
)
def test_int_rejects(text: str) -> None:
    with pytest.raises(CoercionError) as info:
        parse_int(text)
    assert "integer" in info.value.message
    assert info.value.keyword == "type"


# --- numbers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3.14", 3.14),
        ("3", 3.0),
        ("-2", -2.0),
        ("+2.5", 2.5),
        (".5", 0.5),
        ("5.", 5.0),
        ("1e3", 1000.0),
        ("1.5E-2", 0.015),
        (" 0.25 ", 0.25),
    ],
)
def test_number(text: str, expected: float) -> None:
    assert parse_number(text) == pytest.approx(expected)
    assert coerce(text, {"type": "number"}) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text", ["three", "3,14", "nan", "inf", "-Infinity", "0x1p3", "", ".", "1e", "1_0.5", "٣"]
)
def test_number_rejects(text: str) -> None:
    with pytest.raises(CoercionError) as info:
        parse_number(text)
    assert "number" in info.value.message


# --- sizes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("512", 512),
        ("512K", 512 * 1024),
        ("512k", 512 * 1024),
        ("2G", 2 * 1024**3),
        ("2g", 2 * 1024**3),
        ("1.5G", 3 * 1024**3 // 2),
        ("2GiB", 2 * 1024**3),
        ("2gib", 2 * 1024**3),
        ("10M", 10 * 1024**2),
        ("10MB", 10 * 1024**2),
        ("1T", 1024**4),
        (" 64M ", 64 * 1024**2),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["12Q", "", "G", "-1", "1.5.5G", "12 QB", "auto", "1,5G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(CoercionError):
        parse_size(text)


# --- multi-value (INTERFACE.md section 6; the spec's examples verbatim) ---------------


def test_spec_example_comma() -> None:
    assert parse_multi_value("*.log,*.tmp,node_modules") == ["*.log", "*.tmp", "node_modules"]


def test_spec_example_pipe_with_commas_inside() -> None:
    assert parse_multi_value("file1|file,with,commas|file2") == [
        "file1",
        "file,with,commas",
        "file2",
    ]


def test_spec_example_json() -> None:
    assert parse_multi_value('["file|with|pipes", "file,with,commas"]') == [
        "file|with|pipes",
        "file,with,commas",
    ]


def test_pipe_without_comma() -> None:
    assert parse_multi_value("a|b|c") == ["a", "b", "c"]


def test_single_value() -> None:
    assert parse_multi_value("only") == ["only"]


@pytest.mark.parametrize("text", ["", "   ", "\t"])
def test_empty_is_empty_list(text: str) -> None:
    assert parse_multi_value(text) == []


def test_items_are_stripped_and_empty_items_dropped() -> None:
    assert parse_multi_value(" a , b ,, c ,") == ["a", "b", "c"]
    assert parse_multi_value("a||b") == ["a", "b"]


def test_json_array_with_leading_space_and_scalars() -> None:
    assert parse_multi_value('  ["x", 1, 2.5, true, false]') == ["x", "1", "2.5", "true", "false"]
    assert parse_multi_value("[]") == []
    assert parse_multi_value('["", " keep spaces "]') == ["", " keep spaces "]


@pytest.mark.parametrize("text", ['["a", "b"', "[a, b]", "[", '["a",]', "['single']"])
def test_malformed_json_array(text: str) -> None:
    with pytest.raises(CoercionError) as info:
        parse_multi_value(text)
    assert "malformed" in info.value.message
    assert "JSON" in info.value.message


def test_json_object_is_not_json_mode() -> None:
    # Only a leading `[` selects JSON; an object is an ordinary comma-separated value.
    assert parse_multi_value('{"a":1,"b":2}') == ['{"a":1', '"b":2}']


@pytest.mark.parametrize("text", ['[["a"], "b"]', '[{"a": 1}]', "[[]]", '["a", null]'])
def test_json_array_of_non_scalars_rejected(text: str) -> None:
    with pytest.raises(CoercionError) as info:
        parse_multi_value(text)
    assert "JSON array" in info.value.message


def _items(forbidden: str) -> st.SearchStrategy[str]:
    """Non-empty items without `forbidden` characters or surrounding whitespace."""
    return st.text(
        alphabet=st.characters(exclude_characters=forbidden, exclude_categories=["Cs"]),
        min_size=1,
    ).filter(lambda s: s == s.strip() and s != "")


_ITEM = _items("|,")
_PIPE_ITEM = _items("|")


@settings(database=None, max_examples=200)
@given(st.lists(_ITEM, min_size=1, max_size=8))
def test_comma_join_round_trips(items: list[str]) -> None:
    if items[0].startswith("["):
        items = ["x" + items[0], *items[1:]]
    assert parse_multi_value(",".join(items)) == items


@settings(database=None, max_examples=200)
@given(st.lists(_PIPE_ITEM, min_size=1, max_size=8))
def test_pipe_join_round_trips(items: list[str]) -> None:
    if items[0].startswith("["):
        items = ["x" + items[0], *items[1:]]
    items = [*items, "with,comma"]
    assert parse_multi_value("|".join(items)) == items


@settings(database=None, max_examples=200)
@given(st.lists(st.text(), max_size=8))
def test_json_dumped_list_round_trips(items: list[str]) -> None:
    assert parse_multi_value(json.dumps(items)) == items
    assert parse_multi_value(json.dumps(items, ensure_ascii=False)) == items


@settings(database=None, max_examples=300)
@given(st.text())
def test_multi_value_never_raises_anything_but_coercion_error(text: str) -> None:
    try:
        result = parse_multi_value(text)
    except CoercionError:
        return
    assert isinstance(result, list)
    assert all(isinstance(item, str) for item in result)


# --- coerce by declaration --------------------------------------------------------------


def test_array_with_integer_items() -> None:
    decl = {"type": "array", "items": {"type": "integer"}}
    assert coerce("1,2, 3", decl) == [1, 2, 3]
    assert coerce("[4, 5]", decl) == [4, 5]
    assert coerce("7|8", decl) == [7, 8]
    with pytest.raises(CoercionError) as info:
        coerce("1,two,3", decl)
    assert "item 1" in info.value.message
    assert "integer" in info.value.message


def test_array_with_boolean_and_number_items() -> None:
    assert coerce("true,FALSE", {"type": "array", "items": {"type": "boolean"}}) == [True, False]
    assert coerce("[true, false]", {"type": "array", "items": {"type": "boolean"}}) == [
        True,
        False,
    ]
    assert coerce("0.5|2", {"type": "array", "items": {"type": "number"}}) == [0.5, 2.0]
    with pytest.raises(CoercionError):
        coerce("yes", {"type": "array", "items": {"type": "boolean"}})


def test_array_without_items_is_strings() -> None:
    assert coerce("a,b", {"type": "array"}) == ["a", "b"]


def test_string_is_kept_verbatim() -> None:
    assert coerce("  spaced value  ", {"type": "string"}) == "  spaced value  "
    assert coerce("42", {"type": "string"}) == "42"
    assert coerce("42", {}) == "42"  # no type: a string


def test_union_types() -> None:
    decl: dict[str, Any] = {"type": ["integer", "boolean"]}
    assert coerce("5", decl) == 5
    assert coerce("true", decl) is True
    with pytest.raises(CoercionError) as info:
        coerce("maybe", decl)
    assert "integer" in info.value.message
    assert "boolean" in info.value.message


def test_enum_of_booleans_is_boolean() -> None:
    assert coerce("TRUE", {"enum": [True, False]}) is True


def test_null_type() -> None:
    assert coerce("null", {"type": ["null", "integer"]}) is None
    assert coerce("3", {"type": ["null", "integer"]}) == 3


# --- shown ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["hunter2", "Sup3r-S3cret-Value!", "", "x" * 200])
def test_shown_never_includes_a_secret(value: str) -> None:
    text = shown(value, True)
    assert "hidden" in text
    if value:
        assert value not in text
    assert text == shown("something else entirely", True)


def test_shown_quotes_ordinary_values_and_truncates() -> None:
    assert shown("ten", False) == "'ten'"
    long = "a" * 200
    text = shown(long, False)
    assert len(text) < 90
    assert text.endswith("...'")
