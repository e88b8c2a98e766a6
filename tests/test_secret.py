"""`Secret` never shows its value; `Redactor` masks secret values and their encodings."""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import pickle
from collections.abc import Callable
from urllib.parse import quote, quote_plus

import pytest

from baqup_supervisor import Secret
from baqup_supervisor.secret import REDACTED, Redactor

VALUE = "Sup3r-S3cret-Value!"
# Quotes, a backslash, non-ASCII and a control character: every escaping scheme differs.
AWKWARD = 'p"a\\ss-wörd-\u00e9\U0001f511-\t-end'


def assert_hidden(text: str, value: str = VALUE) -> None:
    assert value not in text
    assert REDACTED in text


# --- Secret ------------------------------------------------------------------------


def test_str_and_repr() -> None:
    secret = Secret(VALUE)
    assert str(secret) == REDACTED
    assert repr(secret) == REDACTED
    assert ascii(secret) == REDACTED


@pytest.mark.parametrize(
    "render",
    [
        lambda s: f"{s}",
        lambda s: f"{s!s}",
        lambda s: f"{s!r}",
        lambda s: f"{s!a}",
        lambda s: f"{s=}",
        lambda s: f"{s:>40}",
        lambda s: f"{s:*^50}",
        lambda s: f"{s:.30}",
        lambda s: f"{s!r:<40}",
        lambda s: format(s, "^30"),
        lambda s: str([s]),
        lambda s: str((s,)),
        lambda s: str({"k": s}),
        lambda s: repr({"k": [s, {"deep": s}]}),
        lambda s: str({s}),
        lambda s: " ".join([str(s), "tail"]),
    ],
)
def test_never_rendered(render: Callable[[Secret], str]) -> None:
    assert_hidden(render(Secret(VALUE)))


@pytest.mark.parametrize("template", ["%s", "%r", "%-40s|", "%40s", "<%.50s>"])
def test_percent_formatting(template: str) -> None:
    assert_hidden(template % (Secret(VALUE),))
    assert_hidden("%(pw)s" % {"pw": Secret(VALUE)})  # noqa: UP031


@pytest.mark.parametrize("template", ["{}", "{!r}", "{!s}", "{0:>40}", "{:*^50}", "{0!r:<30}"])
def test_str_format(template: str) -> None:
    assert_hidden(template.format(Secret(VALUE)))
    assert_hidden("{pw}".format(pw=Secret(VALUE)))  # noqa: UP032
    assert_hidden(format(Secret(VALUE)))


def test_reveal_returns_the_value() -> None:
    assert Secret(VALUE).reveal() == VALUE
    assert Secret(AWKWARD).reveal() == AWKWARD
    assert Secret(Secret(VALUE)).reveal() == VALUE  # wrapping twice keeps the value


def test_only_wraps_str() -> None:
    with pytest.raises(TypeError):
        Secret(12345)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Secret(b"bytes")  # type: ignore[arg-type]


def test_immutable_and_without_dict() -> None:
    secret = Secret(VALUE)
    with pytest.raises(AttributeError):
        secret.other = "x"
    with pytest.raises(AttributeError):
        secret._value = "changed"
    assert secret.reveal() == VALUE
    with pytest.raises(TypeError):
        vars(secret)


def test_equality_and_hash() -> None:
    assert Secret(VALUE) == Secret(VALUE)
    assert Secret(VALUE) != Secret(VALUE + "x")
    assert hash(Secret(VALUE)) == hash(Secret(VALUE))
    assert Secret(VALUE) != VALUE  # never equal to the plain string
    assert bool(Secret(VALUE))
    assert not Secret("")


def test_clear_drops_the_value() -> None:
    secret = Secret(VALUE)
    secret.clear()
    assert secret.reveal() == ""


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s pw=%(pw)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if not hasattr(record, "pw"):
            record.pw = "-"
        self.lines.append(self.format(record))


def test_logging_module_never_renders_the_value() -> None:
    secret = Secret(VALUE)
    logger = logging.getLogger("baqup-test-secret")
    logger.propagate = False
    handler = _Capture()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        logger.info(secret)
        logger.info("password is %s", secret)
        logger.info("password is %r", secret)
        logger.warning("dict %s", {"password": secret})
        logger.info("extra field", extra={"pw": secret})
        logger.debug("%(a)s and %(b)s", {"a": secret, "b": [secret]})
        try:
            raise ValueError(secret)
        except ValueError:
            logger.exception("failed with %s", secret)
    finally:
        logger.removeHandler(handler)
    assert len(handler.lines) == 7
    text = "\n".join(handler.lines)
    assert VALUE not in text
    assert text.count(REDACTED) >= 8
    assert "ValueError: [REDACTED]" in text


def test_logging_to_a_stream_handler() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("baqup-test-secret-stream")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    logger.addHandler(handler)
    try:
        logger.error("connect with %s to %s", Secret(VALUE), "db")
    finally:
        logger.removeHandler(handler)
    assert_hidden(stream.getvalue())


def test_json_dumps_raises_without_leaking() -> None:
    with pytest.raises(TypeError) as info:
        json.dumps({"password": Secret(VALUE)})
    assert VALUE not in str(info.value)
    with pytest.raises(TypeError):
        json.dumps(Secret(VALUE))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_raises(protocol: int) -> None:
    with pytest.raises(TypeError) as info:
        pickle.dumps(Secret(VALUE), protocol=protocol)
    assert VALUE not in str(info.value)
    with pytest.raises(TypeError):
        pickle.dumps({"nested": [Secret(VALUE)]}, protocol=protocol)


def test_copy_and_deepcopy_keep_a_secret() -> None:
    secret = Secret(VALUE)
    shallow = copy.copy(secret)
    deep = copy.deepcopy(secret)
    assert isinstance(shallow, Secret)
    assert isinstance(deep, Secret)
    assert shallow.reveal() == VALUE
    assert deep.reveal() == VALUE
    container = copy.deepcopy({"k": [secret]})
    inner = container["k"][0]
    assert isinstance(inner, Secret)
    assert inner.reveal() == VALUE
    assert_hidden(str(container))


# --- Redactor ----------------------------------------------------------------------


def test_redacts_raw_value() -> None:
    redactor = Redactor([VALUE])
    out = redactor.redact(f"user=admin pass={VALUE} and again {VALUE}.")
    assert VALUE not in out
    assert out.count(REDACTED) == 2
    assert out.startswith("user=admin pass=")


@pytest.mark.parametrize("value", [VALUE, AWKWARD, "p@ss w/rd&x=y+z"])
def test_redacts_url_encoded(value: str) -> None:
    redactor = Redactor([value])
    for encoded in {quote(value, safe=""), quote_plus(value), quote(value)}:
        assert encoded != ""
        out = redactor.redact(f"https://example.com/login?u=me&p={encoded}&next=1")
        assert encoded not in out
        assert REDACTED in out
        assert out.startswith("https://example.com/login?u=me&p=")


@pytest.mark.parametrize("value", [VALUE, AWKWARD, 'only "quotes" here', "back\\slash\\path"])
def test_redacts_json_escaped(value: str) -> None:
    redactor = Redactor([value])
    for document in (
        json.dumps({"password": value}),
        json.dumps({"password": value}, ensure_ascii=False),
        json.dumps([{"nested": {"password": value}}]),
    ):
        out = redactor.redact(document)
        assert json.dumps(value)[1:-1] not in out
        assert json.dumps(value, ensure_ascii=False)[1:-1] not in out
        assert value not in out
        assert REDACTED in out


@pytest.mark.parametrize("value", [VALUE, AWKWARD])
def test_redacts_base64_of_value_alone(value: str) -> None:
    raw = value.encode()
    redactor = Redactor([value])
    for encoded in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()):
        out = redactor.redact(f"Authorization: Basic {encoded}")
        assert encoded not in out
        assert REDACTED in out


def _value_only_chars(prefix_len: int, raw: bytes, stream: str) -> str:
    """The base64 characters of `stream` computed from `raw`'s bits only."""
    start = -(-8 * prefix_len // 6)  # ceil
    end = (8 * (prefix_len + len(raw))) // 6
    return stream[start:end]


@pytest.mark.parametrize("prefix", [b"", b"x", b"xx", b"xyz", b"wxyz", b"vwxyz"])
@pytest.mark.parametrize("value", [VALUE, AWKWARD])
def test_redacts_value_embedded_in_base64_stream(prefix: bytes, value: str) -> None:
    raw = value.encode()
    stream = base64.b64encode(prefix + raw + b"yy").decode()
    core = _value_only_chars(len(prefix), raw, stream)
    assert len(core) >= 8
    out = Redactor([value]).redact(f"blob={stream};")
    assert REDACTED in out
    assert core not in out
    # Nothing long enough to decode back to the value survives either.
    leftover = out.replace(REDACTED, " ")
    for piece in leftover.split():
        for shift in range(4):
            chunk = piece[shift:]
            chunk = chunk[: len(chunk) - len(chunk) % 4]
            try:
                decoded = base64.b64decode(chunk)
            except ValueError:
                continue
            assert raw not in decoded


def test_redacts_hex() -> None:
    redactor = Redactor([VALUE])
    encoded = VALUE.encode().hex()
    out = redactor.redact(f"dump: 00ff{encoded}ff00")
    assert encoded not in out
    assert REDACTED in out


def test_redact_value_walks_json_like_structures() -> None:
    redactor = Redactor([VALUE])
    value = {
        "a": VALUE,
        "b": [f"x{VALUE}y", 3, None, True],
        "c": {"d": Secret("other-secret-text")},
        VALUE: "key",
        "t": (VALUE,),
    }
    out = redactor.redact_value(value)
    text = json.dumps(out)
    assert VALUE not in text
    assert "other-secret-text" not in text
    assert out["b"][1:] == [3, None, True]
    assert out["c"]["d"] == REDACTED


def test_no_secrets_leaves_text_alone() -> None:
    redactor = Redactor()
    assert not redactor.active
    assert redactor.redact("nothing to see") == "nothing to see"


def test_add_after_construction() -> None:
    redactor = Redactor()
    redactor.add(Secret(VALUE), None, "")
    assert redactor.active
    assert_hidden(redactor.redact(f"x {VALUE} y"))


def test_overlapping_secrets_longest_first() -> None:
    redactor = Redactor(["abcdef", "abcdefghij"])
    out = redactor.redact("abcdefghij")
    assert out == REDACTED


@pytest.mark.parametrize("short", ["a", "ab"])
def test_short_values_are_not_masked(short: str) -> None:
    # Documented limit: values under 3 characters are not searched for in free text.
    redactor = Redactor([short])
    assert not redactor.active
    assert redactor.redact(f"cab {short} table") == f"cab {short} table"


def test_three_character_values_are_masked() -> None:
    redactor = Redactor(["xyz"])
    assert redactor.redact("a xyz b") == f"a {REDACTED} b"


def test_from_environ_picks_up_every_secret() -> None:
    environ = {
        "BAQUP_SECRET_DB_PASSWORD": "db-password-1",
        "BAQUP_SECRET_API_TOKEN": "tok-ABCDEF-2",
        "BAQUP_SECRET_X": "third-secret-3",
        "BAQUP_JOB_ID": "123e4567-e89b-12d3-a456-426614174000",
        "HOME": "/home/visible",
        "BAQUP_BUS_URL": "redis://user:bus-pass-4@127.0.0.1:6379/0",
    }
    redactor = Redactor.from_environ(environ)
    text = " ".join(environ.values())
    out = redactor.redact(text)
    for secret in ("db-password-1", "tok-ABCDEF-2", "third-secret-3", "bus-pass-4"):
        assert secret not in out
    assert environ["BAQUP_JOB_ID"] in out
    assert "/home/visible" in out
    assert "redis://user:" in out
    assert out.count(REDACTED) == 4


def test_from_environ_url_encoded_bus_password() -> None:
    redactor = Redactor.from_environ({"BAQUP_BUS_URL": "redis://admin:p%40ss@redis:6379/0"})
    assert redactor.active
    decoded = redactor.redact("password is p@ss.")
    assert "p@ss" not in decoded
    assert REDACTED in decoded
    encoded = redactor.redact("redis://admin:p%40ss@redis:6379/0")
    assert "p%40ss" not in encoded
    assert REDACTED in encoded
    assert "admin" in encoded


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "redis://user@host:6379/0", "file:///tmp/bus", "not a url"],
)
def test_from_environ_without_password(url: str) -> None:
    assert not Redactor.from_environ({"BAQUP_BUS_URL": url}).active


def test_from_environ_accepts_any_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv("BAQUP_SECRET_FROM_OS", "os-environ-secret")
    redactor = Redactor.from_environ(os.environ)
    assert "os-environ-secret" not in redactor.redact("x os-environ-secret y")
