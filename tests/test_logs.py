"""Structured logs: record layout, formats, levels, sanitising, redaction, thread safety."""

from __future__ import annotations

import io
import json
import re
import threading
from typing import Any

import pytest

from baqup_supervisor import LogLevel, Secret
from baqup_supervisor.logs import Logger, logger_from_environ
from baqup_supervisor.secret import REDACTED, Redactor

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
LOGFMT_PAIR = re.compile(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)')
SECRET = "Sup3r-S3cret-Value!"
AWKWARD = 'pa"ss\\wörd-42'
FORMATS = ("json", "text", "logfmt")
MODES = ("strict", "moderate", "none")


def make(
    stream: io.StringIO, *, fmt: str = "json", sanitize: str = "moderate", **kwargs: Any
) -> Logger:
    return Logger(
        fmt=fmt,
        sanitize=sanitize,
        job_id="job-1",
        agent_id="agent-test-abc123",
        component="archiver",
        stream=stream,
        **kwargs,
    )


def lines(stream: io.StringIO) -> list[str]:
    text = stream.getvalue()
    assert text.endswith("\n") or text == ""
    return text.splitlines()


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    out = []
    for line in lines(stream):
        record = json.loads(line)
        assert isinstance(record, dict)
        out.append(record)
    return out


def parse_logfmt(line: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    position = 0
    for match in LOGFMT_PAIR.finditer(line):
        assert line[position : match.start()].strip() == "", line
        position = match.end()
        key, raw = match.groups()
        pairs[key] = json.loads(raw) if raw.startswith('"') else raw
    assert line[position:].strip() == ""
    return pairs


# --- layout ------------------------------------------------------------------------------


def test_one_json_line_per_record_with_required_fields() -> None:
    stream = io.StringIO()
    log = make(stream)
    log.info("Starting compression", file="/data/large.bin", size_bytes=1073741824)
    log.warn("second")
    found = records(stream)
    assert len(found) == 2
    first = found[0]
    assert list(first) == [
        "timestamp",
        "level",
        "job_id",
        "agent_id",
        "component",
        "message",
        "context",
    ]
    assert TIMESTAMP.match(first["timestamp"])
    assert first["level"] == "info"
    assert first["job_id"] == "job-1"
    assert first["agent_id"] == "agent-test-abc123"
    assert first["component"] == "archiver"
    assert first["message"] == "Starting compression"
    assert first["context"] == {"file": "/data/large.bin", "size_bytes": 1073741824}
    assert found[1]["level"] == "warn"
    assert found[1]["context"] == {}


def test_every_level_method() -> None:
    stream = io.StringIO()
    log = make(stream, level=LogLevel.TRACE)
    log.trace("t")
    log.debug("d")
    log.info("i")
    log.warn("w")
    log.error("e")
    log.fatal("f")
    assert [r["level"] for r in records(stream)] == [
        "trace",
        "debug",
        "info",
        "warn",
        "error",
        "fatal",
    ]


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("trace", ["trace", "debug", "info", "warn", "error", "fatal"]),
        ("info", ["info", "warn", "error", "fatal"]),
        ("warn", ["warn", "error", "fatal"]),
        ("warning", ["warn", "error", "fatal"]),
        (LogLevel.ERROR, ["error", "fatal"]),
        ("fatal", ["fatal"]),
    ],
)
def test_level_filtering(level: str | LogLevel, expected: list[str]) -> None:
    stream = io.StringIO()
    log = make(stream, level=level)
    for each in LogLevel:
        log.log(each, f"at {each}")
    assert [r["level"] for r in records(stream)] == expected
    assert log.enabled(LogLevel.FATAL)
    assert log.enabled(LogLevel.TRACE) is (expected[0] == "trace")


def test_bind_shares_stream_and_sets_component() -> None:
    stream = io.StringIO()
    log = make(stream)
    child = log.bind(component="child")
    child.info("from the child")
    log.info("from the parent")
    found = records(stream)
    assert [r["component"] for r in found] == ["child", "archiver"]
    assert found[0]["job_id"] == "job-1"


def test_text_format() -> None:
    stream = io.StringIO()
    make(stream, fmt="text").warn("disk nearly full", free_bytes=1024, mount="/data")
    (line,) = lines(stream)
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z WARN ", line)
    assert "[archiver]" in line
    assert "disk nearly full" in line
    assert "free_bytes=1024" in line
    assert "mount=/data" in line


def test_logfmt_format_parses_back() -> None:
    stream = io.StringIO()
    make(stream, fmt="logfmt").info(
        "hello world", count=3, name="x y", nested={"a": "b"}, flag=True, empty=""
    )
    (line,) = lines(stream)
    pairs = parse_logfmt(line)
    assert TIMESTAMP.match(pairs["timestamp"])
    assert pairs["level"] == "info"
    assert pairs["job_id"] == "job-1"
    assert pairs["agent_id"] == "agent-test-abc123"
    assert pairs["component"] == "archiver"
    assert pairs["message"] == "hello world"
    assert pairs["count"] == "3"
    assert pairs["name"] == "x y"
    assert pairs["nested.a"] == "b"
    assert pairs["flag"] == "true"
    assert pairs["empty"] == ""


@pytest.mark.parametrize("fmt", ["text", "logfmt"])
def test_record_without_context_ends_with_the_message(fmt: str) -> None:
    stream = io.StringIO()
    make(stream, fmt=fmt).info("no context here")
    (line,) = lines(stream)
    assert line.endswith(("no context here", '"no context here"'))
    assert "={}" not in line


def test_logfmt_context_cannot_overwrite_reserved_keys() -> None:
    stream = io.StringIO()
    log = make(stream, fmt="logfmt")
    log.info("real message", job_id="fake-job")
    pairs = parse_logfmt(lines(stream)[0])
    assert pairs["job_id"] == "job-1"
    assert pairs["context.job_id"] == "fake-job"


def test_logfmt_renders_non_string_values_once() -> None:
    stream = io.StringIO()
    make(stream, fmt="logfmt").info("m", token=Secret(SECRET), items=["a b", 2])
    pairs = parse_logfmt(lines(stream)[0])
    assert pairs["token"] == REDACTED
    assert json.loads(pairs["items"]) == ["a b", 2]


def test_unknown_format_rejected() -> None:
    with pytest.raises(ValueError):
        Logger(fmt="xml", stream=io.StringIO())


# --- never raises ------------------------------------------------------------------------


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str for you")

    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


@pytest.mark.parametrize("fmt", FORMATS)
def test_unserialisable_context_never_raises(fmt: str) -> None:
    stream = io.StringIO()
    log = make(stream, fmt=fmt)
    log.info(
        "odd values",
        obj=object(),
        a_set={3, 1, 2},
        frozen=frozenset({"x"}),
        raw=b"\xff\x00bytes",
        secret=Secret(SECRET),
        non_str_keys={1: "one", (2, 3): "tuple"},
        tup=(1, 2),
    )
    log.info("unprintable", bad=Unprintable())
    log.info("after")
    out = lines(stream)
    assert len(out) == 3
    assert SECRET not in stream.getvalue()
    assert "after" in out[2]
    if fmt == "json":
        first = json.loads(out[0])
        assert first["message"] == "odd values"
        context = first["context"]
        assert context["secret"] == REDACTED
        assert sorted(context["a_set"]) == ["1", "2", "3"]
        assert "bytes" in context["raw"]
        assert context["obj"].startswith("<object object")
        assert context["tup"] == [1, 2]
        json.loads(out[1])


def test_oversized_integer_keeps_the_record_structure() -> None:
    stream = io.StringIO()
    make(stream).info("big number", value=2**70)
    (record,) = records(stream)
    assert record["message"] == "big number"
    assert record["job_id"] == "job-1"
    assert str(2**70) in json.dumps(record["context"])


def test_circular_context_never_raises() -> None:
    stream = io.StringIO()
    loop: list[Any] = []
    loop.append(loop)
    make(stream).info("loop", value=loop)
    assert len(lines(stream)) == 1
    json.loads(lines(stream)[0])


def test_context_keys_named_like_parameters_never_raise() -> None:
    # A child's `log` message may carry any context keys, "message" and "level" included.
    stream = io.StringIO()
    log = make(stream)
    context: dict[str, Any] = {"message": "from context", "level": "bogus", "x": 1}
    log.info("the message", **context)
    log.log(LogLevel.WARN, "via log", **context)
    found = records(stream)
    assert [r["message"] for r in found] == ["the message", "via log"]
    assert found[0]["context"]["level"] == "bogus"


def test_closed_stream_never_raises() -> None:
    stream = io.StringIO()
    log = make(stream)
    stream.close()
    log.error("into the void")


# --- secrets and sanitising ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("secret", [SECRET, AWKWARD])
def test_secret_values_redacted_everywhere(fmt: str, mode: str, secret: str) -> None:
    stream = io.StringIO()
    log = make(stream, fmt=fmt, sanitize=mode, redactor=Redactor([secret]))
    log.info(f"connecting with {secret}", plain=secret, nested={"deep": [secret]})
    log.error("wrapped", value=Secret(secret), **{f"key-{secret}": "v"})
    out = stream.getvalue()
    assert len(lines(stream)) == 2
    assert secret not in out
    assert json.dumps(secret)[1:-1] not in out
    assert json.dumps(secret, ensure_ascii=False)[1:-1] not in out
    assert out.count(REDACTED) >= 4


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["moderate", "strict"])
def test_url_password_masked_by_sanitizer(fmt: str, mode: str) -> None:
    stream = io.StringIO()
    log = make(stream, fmt=fmt, sanitize=mode)
    log.info("bus at redis://admin:hunter2pw@redis.local:6379/0", url="postgres://u:pgpw99@db/x")
    out = stream.getvalue()
    assert "hunter2pw" not in out
    assert "pgpw99" not in out
    assert "redis://admin:" in out
    assert REDACTED in out


def test_url_password_kept_in_none_mode_without_a_redactor() -> None:
    # `none` really is "development only": the sanitizer does nothing...
    stream = io.StringIO()
    make(stream, sanitize="none").info("bus at redis://admin:hunter2pw@redis.local:6379/0")
    assert "hunter2pw" in stream.getvalue()


@pytest.mark.parametrize("fmt", FORMATS)
def test_bus_password_masked_in_none_mode_by_environ_redactor(fmt: str) -> None:
    # ...but the bus URL's password is a known secret, masked in every mode.
    environ = {"BAQUP_BUS_URL": "redis://admin:p%40ssw0rd@redis.local:6379/0"}
    stream = io.StringIO()
    log = make(stream, fmt=fmt, sanitize="none", redactor=Redactor.from_environ(environ))
    log.info(f"bus at {environ['BAQUP_BUS_URL']}", decoded="p@ssw0rd")
    out = stream.getvalue()
    assert "p%40ssw0rd" not in out
    assert "p@ssw0rd" not in out
    assert REDACTED in out


@pytest.mark.parametrize("fmt", FORMATS)
def test_strict_mode_hides_user_identifiable_paths(fmt: str) -> None:
    stream = io.StringIO()
    log = make(stream, fmt=fmt, sanitize="strict")
    log.info("copying /data/uploads/alice/image.png", file="/data/uploads/alice/image.png")
    out = stream.getvalue()
    assert "uploads" not in out
    assert "alice" not in out
    assert out.count("/data/") >= 2
    assert out.count(".png") >= 2


def test_strict_mode_is_stable_within_a_logger() -> None:
    stream = io.StringIO()
    log = make(stream, sanitize="strict")
    log.info("/data/uploads/alice/image.png")
    log.info("/data/uploads/alice/image.png")
    log.info("/data/uploads/bob/image.png")
    messages = [r["message"] for r in records(stream)]
    assert messages[0] == messages[1]
    assert messages[0] != messages[2]


@pytest.mark.parametrize("fmt", FORMATS)
def test_moderate_mode(fmt: str) -> None:
    stream = io.StringIO()
    log = make(stream, fmt=fmt, sanitize="moderate")
    log.info("ordinary", path="/data/uploads/image.png")
    log.info("home", path="/home/alice/documents/report.pdf")
    log.info("key", path="/root/.ssh/id_rsa")
    out = lines(stream)
    assert "/data/uploads/image.png" in out[0]
    assert "alice" not in out[1]
    assert "/home/" in out[1]
    assert "report.pdf" in out[1]
    assert "id_rsa" not in out[2]
    assert "/root/.ssh/" in out[2]


def test_moderate_mode_masks_password_pairs_and_tokens() -> None:
    stream = io.StringIO()
    log = make(stream, sanitize="moderate")
    log.info("login password=tops3cret99 and Authorization: Bearer abcdefghijklmnop123")
    out = stream.getvalue()
    assert "tops3cret99" not in out
    assert "abcdefghijklmnop123" not in out


def test_none_mode_keeps_paths() -> None:
    stream = io.StringIO()
    make(stream, sanitize="none").info("/home/alice/x and /root/.ssh/id_rsa")
    out = stream.getvalue()
    assert "/home/alice/x" in out
    assert "/root/.ssh/id_rsa" in out


def test_unknown_sanitize_mode_rejected() -> None:
    with pytest.raises(ValueError):
        Logger(sanitize="paranoid", stream=io.StringIO())


# --- concurrency ------------------------------------------------------------------------


def test_concurrent_logging_never_interleaves() -> None:
    stream = io.StringIO()
    log = make(stream)
    threads_n, per_thread = 8, 500
    barrier = threading.Barrier(threads_n)

    def work(index: int) -> None:
        bound = log.bind(component=f"worker-{index}")
        barrier.wait()
        for n in range(per_thread):
            bound.info(f"record {index}-{n}", index=index, n=n, pad="x" * (n % 97))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()
    found = records(stream)
    assert len(found) == threads_n * per_thread
    seen = {(r["context"]["index"], r["context"]["n"]) for r in found}
    assert len(seen) == threads_n * per_thread
    for record in found:
        assert record["component"] == f"worker-{record['context']['index']}"
        assert record["message"] == f"record {record['context']['index']}-{record['context']['n']}"


# --- logger_from_environ -------------------------------------------------------------------


def test_logger_from_environ_uses_the_environment() -> None:
    stream = io.StringIO()
    environ = {
        "BAQUP_AGENT_LOG_LEVEL": "debug",
        "BAQUP_AGENT_LOG_FORMAT": "logfmt",
        "BAQUP_AGENT_LOG_SANITIZE": "strict",
        "BAQUP_JOB_ID": "job-from-env",
    }
    log = logger_from_environ(environ, Redactor(), agent_id="agent-z", stream=stream)
    log.debug("seen /data/uploads/alice/a.png", step=1)
    log.trace("not seen")
    (line,) = lines(stream)
    pairs = parse_logfmt(line)
    assert pairs["level"] == "debug"
    assert pairs["job_id"] == "job-from-env"
    assert pairs["agent_id"] == "agent-z"
    assert "alice" not in pairs["message"]


def test_logger_from_environ_falls_back_on_invalid_values() -> None:
    stream = io.StringIO()
    environ = {
        "BAQUP_AGENT_LOG_LEVEL": "loud",
        "BAQUP_AGENT_LOG_FORMAT": "xml",
        "BAQUP_AGENT_LOG_SANITIZE": "paranoid",
    }
    log = logger_from_environ(environ, Redactor(), stream=stream)
    log.debug("hidden")
    log.info("at /home/alice/file.txt")
    (record,) = records(stream)  # json, the default format
    assert record["level"] == "info"
    assert "alice" not in record["message"]  # moderate, the default mode
    assert record["job_id"] is None


def test_logger_from_environ_defaults() -> None:
    stream = io.StringIO()
    log = logger_from_environ({}, Redactor(), stream=stream)
    assert log.level is LogLevel.INFO
    assert log.fmt == "json"
    assert log.sanitizer.mode == "moderate"


def test_logger_from_environ_redacts_with_the_given_redactor() -> None:
    environ = {"BAQUP_SECRET_TOKEN": "tok-abcdef-123", "BAQUP_AGENT_LOG_SANITIZE": "none"}
    stream = io.StringIO()
    log = logger_from_environ(environ, Redactor.from_environ(environ), stream=stream)
    log.info("token tok-abcdef-123")
    assert "tok-abcdef-123" not in stream.getvalue()
    assert REDACTED in stream.getvalue()
