"""The shared encoder: valid data never makes it raise, and what it writes is JSON."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from baqup_supervisor.jsontree import MAX_DEPTH
from baqup_supervisor.jsontree import TOO_DEEP as UNENCODABLE
from baqup_supervisor.jsonutil import dumps
from baqup_supervisor.secret import REDACTED, Secret


def nested(depth: int, leaf: Any) -> dict[str, Any]:
    root: dict[str, Any] = {}
    node = root
    for _ in range(depth - 1):
        node["a"] = {}
        node = node["a"]
    node["leaf"] = leaf
    return root


def depth_of(value: Any) -> int:
    depth = 0
    while isinstance(value, dict) and "a" in value:
        value, depth = value["a"], depth + 1
    return depth + 1


@pytest.mark.parametrize("depth", [10, 254, 255, 300, MAX_DEPTH - 1])
def test_deep_structures_within_the_limit_are_written_whole(depth: int) -> None:
    document = nested(depth, 10**20)
    decoded = json.loads(dumps(document))
    assert depth_of(decoded) == depth
    node = decoded
    while "a" in node:
        node = node["a"]
    assert node["leaf"] == 10**20


@pytest.mark.parametrize("depth", [MAX_DEPTH + 5, 1500, 5000])
def test_deeper_structures_are_cut_and_named_not_raised(depth: int) -> None:
    out = dumps(nested(depth, 1))
    decoded = json.loads(out)
    assert UNENCODABLE.encode() in out
    assert depth_of(decoded) <= MAX_DEPTH + 1


def test_what_orjson_refuses_is_still_valid_json() -> None:
    out = dumps({"big": -(2**80), "nan": float("nan"), "inf": float("-inf"), 3: "x\udcff"})
    assert orjson.loads(out) == {"big": -(2**80), "nan": "nan", "inf": "-inf", "3": "x\ufffd"}


def test_a_secret_is_its_mask_and_indent_is_kept() -> None:
    out = dumps({"pw": Secret("hunter22"), "deep": nested(300, 1)}, indent=True)
    assert b"hunter22" not in out
    assert json.loads(out)["pw"] == REDACTED
    assert out.startswith(b"{\n  ")


@pytest.mark.parametrize("depth", [300, 1000, 5000])
def test_redaction_and_sanitising_walk_any_depth(depth: int) -> None:
    from baqup_supervisor.logs import Sanitizer
    from baqup_supervisor.secret import Redactor

    document = nested(depth, "token hunter22 here")
    redacted = Redactor(["hunter22"]).redact_value(document)
    sanitized = Sanitizer("moderate").value(redacted)
    out = dumps(sanitized)
    assert b"hunter22" not in out
    assert json.loads(out)
    if depth < MAX_DEPTH:
        assert b"token [REDACTED] here" in out


def test_a_real_job_with_a_component_error_nested_1000_deep_ends_in_the_taxonomy(
    tmp_path: Any,
) -> None:
    import subprocess
    import sys
    import uuid

    error = "{}"
    for _ in range(1000):
        error = '{"e":' + error + "}"
    line = '{"type":"component","name":"db","status":"failed","error":' + error + "}"
    env = {
        "PATH": "/usr/bin:/bin",
        "BAQUP_JOB_ID": str(uuid.uuid4()),
        "BAQUP_STAGING_DIR": str(tmp_path),
        "BAQUP_BUS_URL": f"file://{tmp_path}/bus",
        "BAQUP_BUS_FALLBACK_DIR": str(tmp_path / "buffer"),
    }
    script = f"echo '{line}' >&$BAQUP_CONTROL_FD; echo data > $BAQUP_WORK_DIR/db.sql"
    result = subprocess.run(
        [sys.executable, "-m", "baqup_supervisor", "--", "sh", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 76, result.stderr[-2000:]
    for text in result.stderr.splitlines():
        json.loads(text)
    status = json.loads(
        (tmp_path / "bus" / "baqup:status:{}.jsonl".format(env["BAQUP_JOB_ID"])).read_text()
    )
    assert status["status"] == "partial"
