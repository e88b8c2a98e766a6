"""`baqup emit` (issue #14 item 4): about one interpreter start, and still exactly the line
the control channel takes.

Every test runs the installed `baqup` console script as a subprocess with a real pipe as
its control channel, and checks the bytes on the pipe, stdout, stderr and the exit code.
The line is checked against control.py's own parser (what baqup-run does with it).
The pure parser (`emit.build`) is also fuzzed in-process: whatever it accepts, the
channel must accept and read back as the same values.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baqup_supervisor.control import ControlMessage, parse_message
from baqup_supervisor.emit import build, render
from baqup_supervisor.errors import UsageError
from tests.conftest import PYTHON, run_baqup
from tests.jobs import log_records, prefix
from tests.test_examples import bus_lines, run_shell_agent

BAQUP = str(Path(PYTHON).parent / "baqup")
TOOL_MAIN = [PYTHON, "-c", "from baqup_supervisor.tool import tool_main; tool_main()"]
HEAVY = ("click", "jsonschema", "redis", "psutil", "zstandard", "blake3")


def clean_env(**extra: str) -> dict[str, str]:
    """No coverage hook (it would measure coverage, not emit) and no BAQUP_* of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BAQUP_", "COVERAGE_PROCESS"))}
    env.update(extra)
    return env


def emit(
    *args: str, env: dict[str, str] | None = None, python_flags: tuple[str, ...] = ()
) -> tuple[subprocess.CompletedProcess[bytes], bytes]:
    """Run `baqup emit ARGS` with a real pipe as its control channel; (result, pipe bytes)."""
    read_end, write_end = os.pipe()
    try:
        argv = [PYTHON, *python_flags, BAQUP] if python_flags else [BAQUP]
        result = subprocess.run(
            [*argv, "emit", *args],
            env={**(env or clean_env()), "BAQUP_CONTROL_FD": str(write_end)},
            pass_fds=(write_end,),
            capture_output=True,
            timeout=30,
            check=False,
        )
        os.close(write_end)
        write_end = -1
        with os.fdopen(read_end, "rb") as pipe:
            read_end = -1
            return result, pipe.read()
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)


# --- the line: all seven types, their flags -------------------------------------------------

LINES: list[tuple[list[str], dict[str, Any]]] = [
    (
        ["progress", "--percent", "45", "--bytes", "1024"],
        {"type": "progress", "percent_complete": 45.0, "bytes_processed": 1024},
    ),
    (
        [
            "progress",
            "--percent=12.5",
            "--bytes=7",
            "--files",
            "3",
            "--current-file",
            '/data/a "b"\\c\td',
            "--eta",
            "12",
        ],
        {
            "type": "progress",
            "percent_complete": 12.5,
            "bytes_processed": 7,
            "files_processed": 3,
            "current_file": '/data/a "b"\\c\td',
            "estimated_remaining_seconds": 12.0,
        },
    ),
    (["progress"], {"type": "progress"}),
    (
        ["intent", "vacuum", "--expected-seconds", "45", "--detail", "table users"],
        {
            "type": "intent",
            "operation": "vacuum",
            "expected_duration_seconds": 45.0,
            "detail": "table users",
        },
    ),
    (["intent", "--clear"], {"type": "intent", "operation": None}),
    (
        ["event", "PERMISSION_DENIED", "-m", "denied", "--path", "/data/x"],
        {
            "type": "event",
            "code": "PERMISSION_DENIED",
            "severity": "warn",
            "message": "denied",
            "path": "/data/x",
        },
    ),
    (
        ["event", "FILE_VANISHED", "--severity", "info", "-mgone"],
        {"type": "event", "code": "FILE_VANISHED", "severity": "info", "message": "gone"},
    ),
    (
        ["artifact", "sub/dir/file.tar", "--compression", "none"],
        {"type": "artifact", "filename": "sub/dir/file.tar", "compression": "none"},
    ),
    (["artifact", "a.bin"], {"type": "artifact", "filename": "a.bin"}),
    (
        ["component", "users_db", "--status", "success", "--artifact", "a.bin"],
        {"type": "component", "name": "users_db", "status": "success", "artifact": "a.bin"},
    ),
    (
        ["component", "legacy", "--status", "failed", "--error", "PERMISSION_DENIED"],
        {
            "type": "component",
            "name": "legacy",
            "status": "failed",
            "error": {"code": "PERMISSION_DENIED"},
        },
    ),
    (
        ["metadata", "type=filesystem", "files_included=12", 'nested={"k":[1,2.5,null]}', "a=b=c"],
        {
            "type": "metadata",
            "source_metadata": {
                "type": "filesystem",
                "files_included": 12,
                "nested": {"k": [1, 2.5, None]},
                "a": "b=c",
            },
        },
    ),
    (
        ["log", "hello", "--level", "warn", "--context", "table=users", "--context", "rows=42"],
        {
            "type": "log",
            "level": "warn",
            "message": "hello",
            "context": {"table": "users", "rows": 42},
        },
    ),
    (
        ["log", "--", "-starts with a dash"],
        {"type": "log", "level": "info", "message": "-starts with a dash", "context": {}},
    ),
]


@pytest.mark.parametrize(("args", "expected"), LINES, ids=[" ".join(a)[:40] for a, _ in LINES])
def test_every_type_writes_the_line_the_channel_accepts(
    args: list[str], expected: dict[str, Any]
) -> None:
    result, line = emit(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""
    assert result.stderr == b""
    # one line, compact JSON, the fields in the order given
    assert line == json.dumps(expected, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    parsed = parse_message(line[:-1])
    assert isinstance(parsed, ControlMessage), parsed
    assert parsed.type == expected["type"]
    assert dict(parsed.fields) == expected


def test_the_seven_types_are_all_covered() -> None:
    assert {e["type"] for _, e in LINES} == {
        "progress",
        "intent",
        "event",
        "artifact",
        "component",
        "metadata",
        "log",
    }


def test_tool_run_serves_emit_the_same(tmp_path: Path) -> None:
    """`tool_run` (python -c ... tool_main) hands `emit` to the same code, `--` included."""
    out = tmp_path / "control"
    env = clean_env()
    with out.open("wb") as sink:
        env["BAQUP_CONTROL_FD"] = str(sink.fileno())
        result = subprocess.run(
            [*TOOL_MAIN, "emit", "log", "--", "-x"],
            env=env,
            pass_fds=(sink.fileno(),),
            capture_output=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == b'{"type":"log","level":"info","message":"-x","context":{}}\n'


def test_a_name_that_is_not_utf8_is_written_as_valid_json() -> None:
    """argv holds bytes; a file name in Latin-1 must not end the job's script (was exit 70)."""
    result, line = emit("progress", "--current-file", os.fsdecode(b"/data/caf\xe9.txt"))
    assert result.returncode == 0, result.stderr
    parsed = parse_message(line[:-1])
    assert isinstance(parsed, ControlMessage), parsed
    assert parsed.fields["current_file"] == "/data/caf\ufffd.txt"


def test_a_count_beyond_64_bits_is_written_not_a_crash() -> None:
    """orjson refused integers past 64 bits (exit 70); the channel reads them (as a float)."""
    result, line = emit("progress", "--bytes", str(2**70))
    assert result.returncode == 0, result.stderr
    assert line == b'{"type":"progress","bytes_processed":%d}\n' % 2**70
    assert isinstance(parse_message(line[:-1]), ControlMessage)


# --- errors: bad flags are 64 with a message naming them, and nothing is written --------------

BAD: list[tuple[list[str], str]] = [
    ([], "missing COMMAND"),
    (["bogus"], "no such command 'bogus'"),
    (["progress", "--percent"], "--percent needs a value"),
    (["progress", "--percent", "abc"], "--percent: expected a finite number, got 'abc'"),
    (["progress", "--percent", "150"], "--percent: expected a number from 0 to 100"),
    (["progress", "--percent", "nan"], "--percent: expected a finite number"),
    (["progress", "--eta", "inf"], "--eta: expected a finite number"),
    (["progress", "--bytes", "-1"], "--bytes: expected a whole number of 0 or more"),
    (["progress", "--files", "1.5"], "--files: expected a whole number"),
    (["progress", "extra"], "unexpected argument 'extra'"),
    (["progress", "--perc", "5"], "no such option --perc (did you mean --percent?)"),
    (["intent"], "give an OPERATION or --clear"),
    (["intent", "x", "--clear"], "give an OPERATION or --clear"),
    (["intent", "--clear=yes"], "--clear takes no value"),
    (["event"], "missing CODE"),
    (["event", "lower_case"], "UPPER_SNAKE_CASE"),
    (["event", "A" * 65], "UPPER_SNAKE_CASE"),
    (["event", "X", "--severity", "loud"], "--severity: expected one of trace, debug"),
    (["artifact", ""], "FILENAME: must not be empty"),
    (["component", "c"], "--status is required"),
    (["component", "c", "--status", "ok"], "--status: expected one of success, failed"),
    (["metadata"], "missing KEY=VALUE"),
    (["metadata", "novalue"], "expected KEY=VALUE, got 'novalue'"),
    (["log"], "missing MESSAGE"),
    (["log", "-x"], "no such option -x"),
    (["log", "m", "--context", "=1"], "expected KEY=VALUE"),
    (["log", "x" * (64 * 1024)], "the control channel takes at most 65536"),
]


@pytest.mark.parametrize(("args", "needle"), BAD, ids=[" ".join(a)[:40] for a, _ in BAD])
def test_bad_flags_exit_64_with_a_message(args: list[str], needle: str) -> None:
    result, line = emit(*args)
    stderr = result.stderr.decode()
    assert result.returncode == 64, stderr
    assert line == b"", "nothing may reach the control channel"
    assert result.stdout == b""
    records = log_records(stderr)
    assert len(records) == 1, stderr
    assert needle in records[0]["message"], records[0]
    assert records[0]["level"] == "error"
    assert records[0]["context"]["code"] == "USAGE_ERROR"
    assert records[0]["context"]["exit_code"] == 64


def test_no_control_channel_is_64_naming_the_variable() -> None:
    env = clean_env(BAQUP_CONTROL_FD="250")
    result = subprocess.run(
        [BAQUP, "emit", "progress"], env=env, capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 64
    (record,) = log_records(result.stderr.decode())
    assert "file descriptor 250 (BAQUP_CONTROL_FD) is not open" in record["message"]


def test_a_control_fd_that_is_not_a_number_is_64() -> None:
    env = clean_env(BAQUP_CONTROL_FD="three")
    result = subprocess.run(
        [BAQUP, "emit", "progress"], env=env, capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 64
    (record,) = log_records(result.stderr.decode())
    assert "BAQUP_CONTROL_FD: expected a file descriptor number, got 'three'" in record["message"]


def test_a_closed_channel_is_an_io_error_74() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: EPIPE
    try:
        result = subprocess.run(
            [BAQUP, "emit", "progress"],
            env=clean_env(BAQUP_CONTROL_FD=str(write_end)),
            pass_fds=(write_end,),
            capture_output=True,
            timeout=30,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 74, result.stderr
    (record,) = log_records(result.stderr.decode())
    assert record["context"]["code"] == "IO_ERROR"
    assert "cannot write to the control channel" in record["message"]


def test_help_is_plain_text_and_exit_0() -> None:
    result, line = emit("--help")
    assert result.returncode == 0
    assert line == b""
    text = result.stdout.decode()
    for name in ("progress", "intent", "event", "artifact", "component", "metadata", "log"):
        assert f"  {name} " in text
    assert '>&"$BAQUP_CONTROL_FD"' in text  # the raw form for hot loops
    result, _ = emit("progress", "--help")
    assert result.returncode == 0
    assert b"--percent PCT" in result.stdout
    listed = run_baqup(["--help"], clean_env(), tool=True)
    assert listed.returncode == 0
    assert "emit" in listed.stdout


# --- the parser, fuzzed: what it accepts the channel takes, value for value --------------------

texts = st.text(st.characters(codec="utf-8") | st.sampled_from('\udcff\udc80\x00\n\t"\\'))


@settings(max_examples=300, deadline=None)
@given(
    percent=st.none() | st.floats(allow_nan=True, allow_infinity=True).map(repr) | texts,
    count=st.none() | st.integers(min_value=-5, max_value=2**80).map(str) | texts,
    current=st.none() | texts,
)
def test_progress_accepted_means_the_channel_reads_the_same(
    percent: str | None, count: str | None, current: str | None
) -> None:
    argv = ["progress"]
    for flag, value in (("--percent", percent), ("--bytes", count), ("--current-file", current)):
        if value is not None:
            argv.append(f"{flag}={value}")
    try:
        message = build(argv)
    except UsageError:
        return
    assert isinstance(message, dict)
    line = render(message)
    parsed = parse_message(line[:-1])
    assert isinstance(parsed, ControlMessage), (argv, line, parsed)
    if percent is not None:
        assert parsed.fields["percent_complete"] == float(percent)
    if count is not None:
        assert parsed.fields["bytes_processed"] == int(count)
    if current is not None:
        expected = current.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        assert parsed.fields["current_file"] == expected


@settings(max_examples=300, deadline=None)
@given(code=texts, message=st.none() | texts, severity=st.none() | texts)
def test_event_refused_here_only_when_the_channel_refuses(
    code: str, message: str | None, severity: str | None
) -> None:
    extra = [f"--message={message}"] if message is not None else []
    extra += [f"--severity={severity}"] if severity is not None else []
    try:
        built = build(["event", *extra, "--", code])
    except UsageError:
        fields = {
            "type": "event",
            "code": code,
            "severity": "warn" if severity is None else severity,
        }
        assert not isinstance(parse_message(json.dumps(fields).encode()), ControlMessage)
        return
    assert isinstance(built, dict)
    assert isinstance(parse_message(render(built)[:-1]), ControlMessage)


# --- the cost -----------------------------------------------------------------------------------


def test_emit_imports_neither_click_nor_jsonschema_nor_redis() -> None:
    """`-X importtime` lists every module the real process imported."""
    for args, allowed_orjson in (
        (["progress", "--percent", "5", "--current-file", "/x"], False),
        (["intent", "dump", "--expected-seconds", "3"], False),
        (["event", "PERMISSION_DENIED", "--path", "/x"], False),
        (["artifact", "a.bin"], False),
        (["component", "c", "--status", "success"], False),
        (["metadata", "k=1"], True),  # JSON values: parsed as the channel parses them
        (["log", "m", "--context", "k=1"], True),
    ):
        result, line = emit(*args, python_flags=("-X", "importtime"))
        assert result.returncode == 0, result.stderr[-2000:]
        assert isinstance(parse_message(line[:-1]), ControlMessage)
        imported = {
            row.rsplit("|", 1)[1].strip()
            for row in result.stderr.decode().splitlines()
            if row.startswith("import time:") and "|" in row
        }
        assert "baqup_supervisor.emit" in imported  # the listing is real
        top = {name.split(".")[0] for name in imported}
        heavy = [m for m in (*HEAVY, *(() if allowed_orjson else ("orjson",))) if m in top]
        assert heavy == [], f"{args[0]} imported {heavy}"
        assert "baqup_supervisor.tool" not in imported


def _seconds(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True, timeout=30)
    return time.perf_counter() - start


def test_emit_costs_about_one_interpreter_start(tmp_path: Path) -> None:
    """Median of 5 against `python -c pass`, interleaved, in the same run (a generous margin:
    the machine is shared; the ratio measured on an idle one is in the report)."""
    env = clean_env(PYTHONPYCACHEPREFIX=str(tmp_path / "pycache"), BAQUP_CONTROL_FD="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package has its bytecode
    baseline = [PYTHON, "-c", "pass"]
    emitting = [BAQUP, "emit", "progress", "--percent", "50", "--files", "3"]
    for argv in (baseline, emitting):  # warm up: bytecode written, files in the page cache
        _seconds(argv, env)
    base, cost = [], []
    for _ in range(5):
        base.append(_seconds(baseline, env))
        cost.append(_seconds(emitting, env))
    ratio = statistics.median(cost) / statistics.median(base)
    assert ratio <= 2.5, f"baqup emit took {ratio:.2f}x python -c pass ({cost} vs {base})"


# --- the shell agent's hot loop ------------------------------------------------------------------


def test_shell_agent_raw_progress_lines_are_read_whatever_the_names(tmp_path: Path) -> None:
    """examples/shell-agent writes its per-file progress with printf: every line must be one
    the supervisor reads (no PROTOCOL_ERROR), names with a tab, quote or backslash included."""
    source = tmp_path / "data"
    source.mkdir()
    names = ["tab\there.txt", 'quote"d.txt', "back\\slash.txt"]
    for name in names:
        (source / name).write_bytes(b"x\n")
    env, _ = run_shell_agent(tmp_path, source)
    jid = env["BAQUP_JOB_ID"]
    status = bus_lines(tmp_path / "bus", f"{prefix(env)}status:{jid}")[-1]
    assert status["status"] == "success"
    assert "PROTOCOL_ERROR" not in (status.get("warnings_summary") or {}), status
    progress = bus_lines(tmp_path / "bus", f"{prefix(env)}progress:{jid}")[-1]
    assert progress["files_processed"] == len(names)
    assert progress["current_file"] in {str(source / n) for n in names}
