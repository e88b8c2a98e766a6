"""Redaction under attack (issue #11, "Leaks"; INTERFACE.md section 12, last bullet).

"Redaction works on values before they are rendered or cut: every log line stays
valid JSON, and no prefix of a secret survives a length limit."

- Spellings: what real tools write (node's encodeURIComponent, escape and
  JSON.stringify, `bash -x`, `printf %q`, Python's repr and json, lowercase percent
  escapes, HTML-safe JSON, `\\/`, any case) is masked.
- Cuts: `Redactor.clip` never keeps the start of a secret (hypothesis), nor does a
  text cut upstream; every limit of the job (protocol-error excerpt 200, unknown
  `type` 40, event message 1000, `current_file` 1000, sample path 4096, a child's
  line 64 KiB) is exercised by a real child through the real `baqup-run`, reading
  back the stderr bytes and the keys in a real redis-server.
- Values, not lines: a numeric secret never breaks a log line (every format), a bus
  message or the status file.
- `baqup-run --validate` never prints the bus password, parsable or not, long or not,
  in the userinfo or in `?password=` / `?sentinel_password=`.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shlex
import subprocess
import sys
import textwrap
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from baqup_supervisor.bus import describe_url
from baqup_supervisor.control import MAX_LINE, ProtocolViolation, parse_message
from baqup_supervisor.logs import FORMATS, Logger
from baqup_supervisor.secret import MAX_KEPT_PREFIX, REDACTED, Redactor, url_passwords
from tests.conftest import RedisServer, free_port
from tests.jobs import Job, job_dir, log_records, prefix, read_hash, read_stream, start_job

PYTHON = sys.executable
BAQUP_RUN = str(Path(sys.executable).parent / "baqup-run")

# Awkward on purpose: quotes, `<>&/`, non-ASCII and an astral character, so that every
# escaping scheme writes it differently. Each starts with letters found nowhere else in
# the output, so a surviving prefix cannot be a coincidence.
SECRET = "Zq9'it's<Key>/é&ok 🔑"
PLAIN = "Wv7-hunter-Passphrase"
NUMERIC = "4242"


# --- spellings written by real tools -----------------------------------------------------------


def node(value: str) -> dict[str, str]:
    script = (
        "const v = process.argv[1]; process.stdout.write(JSON.stringify({"
        "encodeURIComponent: encodeURIComponent(v), encodeURI: encodeURI(v),"
        " escape: escape(v), JSON: JSON.stringify(v)}))"
    )
    done = subprocess.run(
        ["node", "-e", script, value], capture_output=True, text=True, check=True, timeout=30
    )
    spelled: dict[str, str] = json.loads(done.stdout)
    return spelled


def bash_trace(value: str, locale: str = "C.UTF-8") -> str:
    """What `bash -x` prints for a command taking `value` as its argument."""
    done = subprocess.run(
        ["bash", "-xc", ': "$S"'],
        env={"S": value, "LC_ALL": locale, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return done.stderr.strip().removeprefix("+ : ")


def printf_q(value: str, locale: str = "C.UTF-8") -> str:
    done = subprocess.run(
        ["bash", "-c", 'printf "%q" "$S"'],
        env={"S": value, "LC_ALL": locale},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return done.stdout


def html_safe_json(value: str) -> str:
    """JSON as Go's encoding/json writes it: `<`, `>` and `&` as \\u003c, \\u003e, \\u0026."""
    text = json.dumps(value)[1:-1]
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


PYTHON_SPELLINGS: dict[str, Callable[[str], str]] = {
    "plain": lambda v: v,
    "upper": str.upper,
    "swapcase": str.swapcase,
    "percent-lower": lambda v: urllib.parse.quote(v, safe="").lower(),
    "percent-path": urllib.parse.quote,
    "quote_plus": urllib.parse.quote_plus,
    "json": lambda v: json.dumps(v)[1:-1],
    "json-slash": lambda v: json.dumps(v, ensure_ascii=False)[1:-1].replace("/", "\\/"),
    "json-html-safe": html_safe_json,
    "json-html-safe-upper-hex": lambda v: html_safe_json(v).upper(),
    "repr": repr,
    "bytes-repr": lambda v: repr(v.encode()),
    "shlex.quote": shlex.quote,
    "hex": lambda v: v.encode().hex(),
    "base64": lambda v: base64.b64encode(v.encode()).decode(),
}


def all_spellings(value: str) -> dict[str, str]:
    spelled = {name: f(value) for name, f in PYTHON_SPELLINGS.items()}
    spelled.update({f"node {k}": v for k, v in node(value).items()})
    spelled["bash -x"] = bash_trace(value)
    spelled["bash -x C locale"] = bash_trace(value, "C")
    spelled["printf %q"] = printf_q(value)
    return spelled


def prefixes(value: str, least: int = MAX_KEPT_PREFIX + 1) -> list[str]:
    return [value[:k] for k in range(least, len(value) + 1)]


def secret_starts(value: str) -> list[str]:
    """What no sink may hold: a start of the secret of 3 characters or more (any case),
    of its hex (3 bytes) or of its base64 (3 bytes)."""
    raw = value.encode()
    return [
        *(p.lower() for p in prefixes(value, 3)),
        *prefixes(raw.hex(), 6),
        *prefixes(base64.b64encode(raw).decode(), 4),
    ]


def assert_no_secret_start(sinks: Mapping[str, str], values: Iterable[str]) -> None:
    needles = sorted({n for v in values for n in secret_starts(v)}, key=len, reverse=True)
    leaks = []
    for name, text in sinks.items():
        folded = text.lower()
        for needle in needles:
            at = folded.find(needle.lower())
            if at >= 0:
                leaks.append((name, needle, text[max(0, at - 40) : at + len(needle) + 40]))
                break
    assert not leaks, "secret starts survived:\n" + "\n".join(map(repr, leaks[:20]))


@pytest.mark.parametrize("value", [SECRET, PLAIN, "Zq9\ttab-it's"])
def test_every_spelling_a_real_tool_writes_is_masked(value: str) -> None:
    redactor = Redactor([value])
    spelled = all_spellings(value)
    if value == SECRET:  # the tools really differ: this is not one string twenty times
        assert len(set(spelled.values())) >= 15
    for name, form in spelled.items():
        out = redactor.redact(f"before {form} after")
        assert REDACTED in out, (name, form, out)
        assert out.startswith("before "), (name, out)
        assert out.endswith(" after"), (name, out)
        assert_no_secret_start({name: out}, [value])


@pytest.mark.parametrize("value", ["Zq9é-its", "Zq9é-it's"])
def test_bash_dollar_quote_and_octal_spellings_are_masked(value: str) -> None:
    # in the C locale bash writes a non-ASCII argument as $'...' with octal bytes
    forms = [printf_q(value, "C")]
    if "'" not in value:
        forms.append(bash_trace(value, "C"))
    for form in forms:
        assert form.startswith("$'Zq9\\303\\251"), form  # bash really chose ANSI-C quoting
        out = Redactor([value]).redact(f"+ : {form}")
        assert out == f"+ : $'{REDACTED}'"


def test_redacting_twice_changes_nothing_even_when_a_secret_is_inside_the_mask() -> None:
    redactor = Redactor(["DACT", PLAIN])
    once = redactor.redact(f"x {PLAIN} y dact")
    assert once == f"x {REDACTED} y {REDACTED}"
    assert redactor.redact(once) == once


# --- cuts ---------------------------------------------------------------------------------------

# A filler that shares no character with the secrets below nor with their escapes, so
# any start of a secret in a clipped text can only come from the secret.
FILLER = st.text(alphabet="GHIJLMNOPQRSTVWYghijlmnopqrstvwy _-", max_size=60)
CUT_SECRETS = ["abc", "abcdef", "4242", "a'b<c>/é&d", "ab🔑cd", "bad-cafe-42"]
CUT_SPELLINGS: dict[str, Callable[[str], str]] = {
    "plain": lambda v: v,
    "upper": str.upper,
    "percent": lambda v: urllib.parse.quote(v, safe=""),
    "percent-lower": lambda v: urllib.parse.quote(v, safe="").lower(),
    "json-ascii": lambda v: json.dumps(v)[1:-1],
    "html-safe": html_safe_json,
    "shell": lambda v: v.replace("'", "'\\''"),
    "hex": lambda v: v.encode().hex(),
}


def kept_start(out: str, spelled: str) -> str | None:
    """A start of `spelled` longer than MAX_KEPT_PREFIX that `out` holds, if any."""
    folded = out.lower()
    for start in reversed(prefixes(spelled)):
        if start.lower() in folded:
            return start
    return None


@settings(max_examples=300, deadline=None)
@given(
    secret=st.sampled_from(CUT_SECRETS),
    spelling=st.sampled_from(sorted(CUT_SPELLINGS)),
    before=FILLER,
    after=FILLER,
    limit=st.integers(min_value=0, max_value=140),
)
def test_no_cut_keeps_the_start_of_a_secret(
    secret: str, spelling: str, before: str, after: str, limit: int
) -> None:
    spelled = CUT_SPELLINGS[spelling](secret)
    redactor = Redactor(CUT_SECRETS)
    text = before + spelled + after
    out = redactor.clip(text, limit)
    assert len(out) <= limit
    assert kept_start(out, spelled) is None, (text, limit, out)
    # never inside a mask: every `[` left opens a whole mask
    assert out.count("[") == out.count(REDACTED), out
    if len(redactor.redact(text)) <= limit:
        assert out == redactor.redact(text)


@settings(max_examples=300, deadline=None)
@given(
    secret=st.sampled_from(CUT_SECRETS),
    spelling=st.sampled_from(sorted(CUT_SPELLINGS)),
    before=FILLER,
    cut=st.integers(min_value=1, max_value=80),
)
def test_a_text_cut_upstream_keeps_no_start_of_a_secret(
    secret: str, spelling: str, before: str, cut: int
) -> None:
    # A line over its limit arrives cut: whatever secret straddled the cut is masked.
    spelled = CUT_SPELLINGS[spelling](secret)
    arrived = (before + spelled)[: len(before) + min(cut, len(spelled) - 1)]
    out = Redactor(CUT_SECRETS).clip(arrived, len(arrived), truncated=True)
    assert kept_start(out, spelled) is None, (arrived, out)


def test_a_utf8_character_cut_in_two_upstream_belongs_to_the_fragment() -> None:
    value = "Zqé9-it"
    raw = f"line {value}".encode()
    arrived = raw[: raw.index("é".encode()) + 1].decode("utf-8", "replace")
    assert arrived.endswith("Zq\ufffd")
    assert Redactor([value]).clip(arrived, 1000, truncated=True) == f"line {REDACTED}"


def test_clip_masks_what_it_cannot_show_and_keeps_its_limit() -> None:
    redactor = Redactor([PLAIN])
    text = f"0123456789 {PLAIN} tail"
    for limit in range(len(text) + 5):
        out = redactor.clip(text, limit)
        assert len(out) <= limit
        assert "Wv7" not in out
    assert redactor.clip(text, 11 + len(REDACTED) + 3) == f"0123456789 {REDACTED}..."


# --- protocol errors: the excerpt and the unknown type --------------------------------------------


@pytest.mark.parametrize("kept", range(1, len(PLAIN)))
def test_a_protocol_error_excerpt_never_keeps_the_start_of_a_secret(kept: int) -> None:
    redactor = Redactor([PLAIN])
    raw = ("x" * (200 - kept) + PLAIN + " and more").encode()
    parsed = parse_message(raw)
    assert isinstance(parsed, ProtocolViolation)
    assert "x" * 10 not in parsed.reason  # the reason never quotes the line
    excerpt = parsed.excerpt(redactor)
    assert len(excerpt) <= 200
    assert PLAIN[:2] not in excerpt
    assert PLAIN[:2] not in parsed.describe(redactor)


@pytest.mark.parametrize("kept", range(1, len(PLAIN)))
def test_an_unknown_type_is_named_without_the_start_of_a_secret(kept: int) -> None:
    redactor = Redactor([PLAIN])
    kind = "t" * (40 - kept) + PLAIN
    parsed = parse_message(json.dumps({"type": kind}).encode())
    assert isinstance(parsed, ProtocolViolation)
    described = parsed.describe(redactor)
    assert described.startswith("unknown type '")
    assert PLAIN[:2] not in described


def test_an_unknown_type_that_is_not_a_string_is_shown_as_json() -> None:
    parsed = parse_message(json.dumps({"type": {"k": [PLAIN, 1]}}).encode())
    assert isinstance(parsed, ProtocolViolation)
    described = parsed.describe(Redactor([PLAIN]))
    assert REDACTED in described
    assert "Wv7" not in described


@pytest.mark.parametrize("kept", [2, 5, 12])
def test_the_excerpt_of_a_line_cut_upstream_masks_its_end(kept: int) -> None:
    # the splitter cut the line inside the secret, and what is left fits the excerpt
    raw = ("y" * 150 + PLAIN[:kept]).encode()
    parsed = parse_message(raw, truncated=True)
    assert isinstance(parsed, ProtocolViolation)
    excerpt = parsed.excerpt(Redactor([PLAIN]))
    assert excerpt == "y" * 150 + REDACTED


# --- values, not lines ------------------------------------------------------------------------


def test_a_numeric_secret_becomes_the_mask_only_where_it_is_the_whole_value() -> None:
    redactor = Redactor([NUMERIC])
    out = redactor.redact_value(
        {"rows": 142420, "n": 4242, 4242: "k", "nested": [4242, "x4242y", 4242.5], "ok": True}
    )
    assert out == {
        "rows": 142420,
        "n": REDACTED,
        REDACTED: "k",
        "nested": [REDACTED, f"x{REDACTED}y", 4242.5],
        "ok": True,
    }
    json.loads(json.dumps(out))


LOGFMT_PAIR = re.compile(r'(?P<key>[^\s="]+)=(?P<value>"(?:[^"\\]|\\.)*"|[^\s"=\\]*)(?:\s|$)')


def parse_logfmt(line: str) -> dict[str, Any]:
    pairs = {}
    position = 0
    for match in LOGFMT_PAIR.finditer(line):
        assert match.start() == position, (line, position)
        value = match["value"]
        pairs[match["key"]] = json.loads(value) if value.startswith('"') else value
        position = match.end()
    assert position == len(line), (line, position)
    return pairs


def parse_line(line: str, fmt: str) -> dict[str, Any]:
    """One rendered record back to its fields, or fail."""
    if fmt == "json":
        record: dict[str, Any] = json.loads(line)
        return record
    if fmt == "logfmt":
        return parse_logfmt(line)
    head = re.match(r"(?P<ts>\S+) (?P<level>[A-Z]+) +\[(?P<component>[^\]]*)\] ", line)
    assert head, line
    return {"timestamp": head["ts"], "text": line[head.end() :]}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("sanitize", ["none", "moderate", "strict"])
def test_every_log_line_in_every_format_stays_parseable(fmt: str, sanitize: str) -> None:
    stream = io.StringIO()
    log = Logger(fmt=fmt, sanitize=sanitize, redactor=Redactor([NUMERIC, SECRET]), stream=stream)
    log.info(f"rows 142420 of {SECRET}", rows=142420, n=4242, **{"4242": 1, 'odd key="x"': 2})
    log.warn("two\nlines\r\nin\u2028one\x85", path=f"/home/u/{SECRET}/x.sql", k="\u2029")
    log.error(SECRET, nested={"deep": [4242, 142420, SECRET]}, ratio=42.42)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    for line in lines:
        parse_line(line, fmt)
        assert "Zq9" not in line
    if fmt == "json":
        first = json.loads(lines[0])
        assert first["context"]["rows"] == 142420
        assert first["context"]["n"] == REDACTED
        assert first["message"].startswith("rows 1")
    if fmt == "logfmt":
        assert parse_logfmt(lines[0])["rows"] == "142420"


# --- the bus URL --------------------------------------------------------------------------------

BUS_PASSWORD = "Kx5-bus-pass-991"


@pytest.mark.parametrize(
    "url",
    [
        f"redis://u:{BUS_PASSWORD}@[host:6379/0",
        f"redis://u:{BUS_PASSWORD}@host:notaport/0",
        f"redis://u:{urllib.parse.quote(BUS_PASSWORD + '@/')}@host:6379/0",
        f"redis://host:6379/0?password={BUS_PASSWORD}",
        f"redis+sentinel://h1:26379,h2:26379/svc?sentinel_password={BUS_PASSWORD}&x=1",
        f"redis://u:{BUS_PASSWORD}@h:1/0?ssl=true&password={BUS_PASSWORD}",
    ],
)
def test_every_password_in_a_bus_url_is_found_and_masked(url: str) -> None:
    found = url_passwords(url)
    assert any(BUS_PASSWORD in p for p in found), found
    described = describe_url(url)
    assert "Kx5" not in described
    assert REDACTED in described
    assert "Kx5" not in Redactor.from_environ({"BAQUP_BUS_URL": url}).redact(url)


def validate(env: Mapping[str, str]) -> tuple[int, bytes]:
    """The installed `baqup-run --validate`: exit code and every byte it printed."""
    done = subprocess.run(
        [BAQUP_RUN, "--validate", "--", "true"],
        env=dict(env),
        capture_output=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def long_url(user_length: int, password: str = BUS_PASSWORD) -> str:
    return f"redis://{'u' * user_length}:{password}@[host:6379/0"


@pytest.mark.parametrize(
    "url",
    [
        f"redis://u:{BUS_PASSWORD}@[host:6379/0",
        f"redis://u:{BUS_PASSWORD}@host:notaport/0",
        f"redis://[host:6379/0?password={BUS_PASSWORD}",
        f"redis+sentinel://[h1:26379/svc?sentinel_password={BUS_PASSWORD}",
        # the password straddles the 80 characters a problem quotes
        *(long_url(n) for n in (60, 64, 66, 68, 70, 75)),
        long_url(40, BUS_PASSWORD * 8),
    ],
)
def test_validate_never_prints_the_bus_password(job_env: dict[str, str], url: str) -> None:
    code, printed = validate({**job_env, "BAQUP_BUS_URL": url})
    assert code == 64, printed
    text = printed.decode()
    assert "BAQUP_BUS_URL" in text  # the problem is reported...
    assert "got 'redis" in text  # ...quoting the URL, its password masked or cut off whole
    assert REDACTED in text or "..." in text
    assert_no_secret_start({"validate": text}, [BUS_PASSWORD])
    report = json.loads(text[text.index('{"valid"') :].splitlines()[0])
    assert report["valid"] is False
    for line in printed.decode().splitlines():
        json.loads(line)


# --- a real job: every spelling, every limit ----------------------------------------------------

LIMITS_CHILD = r"""
import base64, json, os, shlex, subprocess, sys, urllib.parse
secret = os.environ["BAQUP_SECRET_KEY"]
plain = os.environ["BAQUP_SECRET_PLAIN"]
ctl = os.fdopen(int(os.environ["BAQUP_CONTROL_FD"]), "w", buffering=1)

def send(**message):
    ctl.write(json.dumps(message) + "\n")

def straddle(limit, kept, value, pad="p"):
    return pad * (limit - kept) + value + " after"

for value in (secret, plain):
    for form in (value, value.upper(), urllib.parse.quote(value, safe="").lower(),
                 json.dumps(value)[1:-1], json.dumps(value).replace("<", "\\u003c"),
                 json.dumps(value, ensure_ascii=False).replace("/", "\\/"), repr(value),
                 shlex.quote(value), base64.b64encode(value.encode()).decode()):
        print("spelled", form, flush=True)
        print("spelled", form, file=sys.stderr, flush=True)
    # real tools writing to the child's stderr: node and bash -x
    subprocess.run(["node", "-e", "const v = process.argv[1]; console.error(encodeURIComponent(v),"
                    " escape(v), JSON.stringify(v))", value], check=True)
    subprocess.run(["bash", "-xc", ': "$V"'], env={"V": value, "LC_ALL": "C.UTF-8"}, check=True)
    subprocess.run(["bash", "-xc", ': "$V"'], env={"V": value, "LC_ALL": "C"}, check=True)

# a line over 64 KiB whose cut falls inside the secret (spelled plain and percent-encoded)
for kept in range(1, len(plain)):
    for form in (plain, urllib.parse.quote(plain, safe="").lower()):
        sys.stderr.write("L" * (65536 - kept) + form + " tail\n")
sys.stderr.flush()

# event messages (1000) and sample paths (4096) straddling their limits, one code each
for kept in range(1, len(plain)):
    send(type="event", severity="info", code=f"MESSAGE_CUT_{kept}",
         message=straddle(997, kept, plain))
    send(type="event", severity="info", code=f"PATH_CUT_{kept}", message="m",
         path="/" + straddle(4092, kept, plain, "d"))
# current_file (1000): the last progress is always written
send(type="progress", percent_complete=10, current_file="/" + straddle(996, 3, plain, "f"))
send(type="progress", percent_complete=20, current_file="/" + straddle(996, 5, plain, "f"),
     bytes_processed=142420, files_processed=4242)
# protocol errors: the first one and the last one reach the bus
ctl.write(straddle(200, 4, plain, "n") + "\n")
ctl.write(json.dumps({"type": straddle(40, 6, plain, "t")}) + "\n")
# a numeric secret inside numbers, in the child's log and its own structured log
print("rows=142420 of 4242", flush=True)
print("a line with\u2028separators\x85that splitlines\x1csplits on", flush=True)
send(type="log", level="info", message="counted", context={"rows": 142420, "n": 4242})
send(type="metadata", source_metadata={"rows": 142420, "n": 4242, "4242": "k"})
with open(os.path.join(os.environ["BAQUP_WORK_DIR"], "dump.sql"), "w") as out:
    out.write("-- a harmless artifact\n")
"""


def test_the_child_below_cuts_its_long_lines_where_the_splitter_does() -> None:
    assert MAX_LINE == 65536


def limits_env(job_env: Mapping[str, str], bus_url: str, fmt: str = "json") -> dict[str, str]:
    env = dict(job_env)
    env.update(
        BAQUP_BUS_URL=bus_url,
        BAQUP_SECRET_KEY=SECRET,
        BAQUP_SECRET_PLAIN=PLAIN,
        BAQUP_SECRET_ROWS=NUMERIC,
        BAQUP_AGENT_LOG_FORMAT=fmt,
        BAQUP_AGENT_LOG_LEVEL="debug",
        LC_ALL="C.UTF-8",
    )
    return env


def run_limits_job(env: Mapping[str, str], jobs: list[Job]) -> Job:
    job = start_job(["--", PYTHON, "-c", textwrap.dedent(LIMITS_CHILD)], env)
    jobs.append(job)
    return job


def redis_texts(client: redis.Redis, key_prefix: str) -> dict[str, list[str]]:
    """Every field of every key under the prefix, as stored."""
    out: dict[str, list[str]] = {}
    for key in client.scan_iter(match=f"{key_prefix}*"):
        kind = str(client.type(key))
        if kind == "hash":
            fields: dict[str, str] = client.hgetall(key)  # type: ignore[assignment]
            out[key] = [t for pair in fields.items() for t in pair]
        elif kind == "stream":
            entries: list[tuple[str, dict[str, str]]] = client.xrange(key)  # type: ignore[assignment]
            out[key] = [t for _, entry in entries for pair in entry.items() for t in pair]
    return out


def test_a_real_job_leaks_no_start_of_a_secret_at_any_limit(
    job_env: dict[str, str], redis_server: RedisServer, jobs: list[Job]
) -> None:
    env = limits_env(job_env, redis_server.url)
    job = run_limits_job(env, jobs)
    code = job.wait(90)
    stderr = job.stderr_path.read_bytes()
    assert code == 0, stderr[-3000:]
    text = stderr.decode("utf-8")
    # every line on stderr is a valid JSON record
    lines = text.splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == len(lines)
    child = [r for r in records if r.get("component") == "child"]
    truncated = [r for r in child if r.get("context", {}).get("truncated")]
    assert len(truncated) == 2 * (len(PLAIN) - 1)  # every over-long line was logged, cut
    # the cut kept the secret's first character alone (allowed) or its start got masked
    assert all(r["message"].endswith(REDACTED) or r["message"][-2] == "L" for r in truncated)
    assert sum("spelled" in r["message"] for r in child) >= 18
    counted = next(r for r in child if r["message"] == "counted")
    assert counted["context"] == {"rows": 142420, "n": REDACTED}

    p = prefix(env)
    job_id = env["BAQUP_JOB_ID"]
    with redis_server.client() as client:
        stored = redis_texts(client, p)
        events = read_stream(client, f"{p}events:{job_id}")
        progress = read_hash(client, f"{p}progress:{job_id}")
        status = read_hash(client, f"{p}status:{job_id}")
    by_code = {e["code"]: e for e in events}
    for kept in range(1, len(PLAIN)):
        message = by_code[f"MESSAGE_CUT_{kept}"]["message"]
        assert len(message) <= 1000
        assert REDACTED in message[-20:]
        [sample] = by_code[f"PATH_CUT_{kept}"]["sample_paths"]
        assert len(sample) <= 4096
        assert REDACTED in sample[-20:]
    protocol = [e for e in events if e["code"] == "PROTOCOL_ERROR"]
    assert protocol
    assert all(REDACTED in e["message"] for e in protocol)
    assert REDACTED in progress["current_file"][-20:]
    assert progress["bytes_processed"] == 142420
    assert progress["files_processed"] == REDACTED
    assert status["status"] == "success"
    manifest = json.loads((job_dir(env) / "manifest.json").read_text())
    assert manifest["source_metadata"]["rows"] == 142420
    assert manifest["source_metadata"]["n"] == REDACTED

    sinks = {"stderr": text, "stdout": job.stdout(), "manifest": str(manifest)}
    sinks.update({f"redis {k}": "\n".join(v) for k, v in stored.items()})
    assert_no_secret_start(sinks, [SECRET, PLAIN])
    for values in stored.values():
        for value in values:
            if value[:1] in "[{" and not value.startswith(REDACTED):  # a string as it is
                json.loads(value)  # a JSON field stays JSON


@pytest.mark.parametrize("fmt", ["logfmt", "text"])
def test_a_real_jobs_log_lines_parse_in_every_format(
    job_env: dict[str, str], redis_server: RedisServer, jobs: list[Job], fmt: str
) -> None:
    env = limits_env(job_env, redis_server.url, fmt)
    job = run_limits_job(env, jobs)
    code = job.wait(90)
    assert code == 0, job.stderr()[-3000:]
    text = job.stderr_path.read_bytes().decode("utf-8")
    lines = text.splitlines()
    assert len(lines) > 2 * (len(PLAIN) - 1)
    for line in lines:
        parse_line(line, fmt)
    assert not log_records(text)  # no JSON fallback line slipped in
    assert_no_secret_start({"stderr": text}, [SECRET, PLAIN])


def test_the_status_file_of_an_unreported_job_keeps_numbers_numbers(
    job_env: dict[str, str], jobs: list[Job]
) -> None:
    env = limits_env(job_env, f"redis://127.0.0.1:{free_port()}/0")
    env.update(
        BAQUP_BUS_GRACE_PERIOD="1", BAQUP_BUS_RECONNECT_MAX_ATTEMPTS="1", BAQUP_BUS_TIMEOUT="1"
    )
    job = run_limits_job(env, jobs)
    assert job.wait(90) == 75, job.stderr()[-3000:]
    status_file = job_dir(env) / ".baqup-status.json"
    status = json.loads(status_file.read_text())
    assert status["status"] == "success"
    buffered = [
        json.loads(line)
        for path in Path(env["BAQUP_BUS_FALLBACK_DIR"]).rglob("*.jsonl")
        for line in path.read_text().splitlines()
    ]
    bodies = [m["body"] for m in buffered]
    progress = [b for b in bodies if b.get("type") == "progress"]
    assert progress
    assert progress[-1]["bytes_processed"] == 142420
    assert progress[-1]["files_processed"] == REDACTED
    for line in job.stderr().splitlines():
        json.loads(line)
    assert_no_secret_start(
        {"status": status_file.read_text(), "buffer": json.dumps(bodies)}, [SECRET, PLAIN]
    )


@pytest.mark.parametrize("kept", [2, 9])
def test_baqup_under_baqup_run_redacts_its_event_message_before_cutting_it(
    job_env: dict[str, str], redis_server: RedisServer, jobs: list[Job], tmp_path: Path, kept: int
) -> None:
    # `baqup extract` refuses an absolute member and tells the supervisor with an event
    # whose message (1000 characters at most) quotes the name: cut there, the supervisor
    # could not mask what was left of the secret.
    import tarfile

    head = "absolute member name '"
    name = "/" + "a" * (997 - len(head) - 1 - kept) + PLAIN + "/x"
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        member = tarfile.TarInfo(name)
        member.size = 0
        tar.addfile(member, io.BytesIO(b""))
    env = limits_env(job_env, redis_server.url)
    baqup = str(Path(sys.executable).parent / "baqup")
    job = start_job(["--", baqup, "extract", str(archive), str(tmp_path / "dest")], env)
    jobs.append(job)
    assert job.wait(60) == 65, job.stderr()[-3000:]
    with redis_server.client() as client:
        events = read_stream(client, f"{prefix(env)}events:{env['BAQUP_JOB_ID']}")
    [violation] = [e for e in events if e["code"] == "SECURITY_VIOLATION"]
    assert violation["message"].startswith(head)
    assert REDACTED in violation["message"]
    assert_no_secret_start(
        {"event": violation["message"], "stderr": job.stderr(), "stdout": job.stdout()}, [PLAIN]
    )
