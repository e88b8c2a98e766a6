"""The seed SDK README's Python usage runs unchanged against baqup_supervisor.

Each ```python block of `seeds/baqup-agent-python-README.md` is run in a fresh
interpreter with `baqup_agent` replaced by `baqup_supervisor`; every printed line
must match the `# comment` at the end of its `print(...)` call. CI runs in a clone
with `../shared` beside the repository; where it is absent, the verbatim copy below
is used instead.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SEED_README = (
    Path(__file__).resolve().parents[2] / "shared" / "seeds" / "baqup-agent-python-README.md"
)

# Verbatim copy of the README's "Usage (Preview API)" block.
FALLBACK_BLOCK = """\
from baqup_agent import ExitCode, AgentState, LogLevel

# Exit codes are already available
print(ExitCode.SUCCESS)           # 0
print(ExitCode.USAGE_CONFIG_ERROR) # 64

# Agent states
print(AgentState.RUNNING)         # 'running'

# Secret wrapper (available now)
from baqup_agent import Secret
password = Secret("my-secret-password")
print(password)          # [REDACTED]
print(password.reveal()) # my-secret-password
"""

_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_PRINT = re.compile(r"^\s*print\(.*\)\s*#\s*(?P<expected>.*?)\s*$")


def python_blocks(text: str) -> list[str]:
    return [match.group(1) for match in _BLOCK.finditer(text)]


def readme_blocks() -> list[str]:
    if SEED_README.is_file():
        return python_blocks(SEED_README.read_text(encoding="utf-8"))
    return [FALLBACK_BLOCK]


def expected_lines(block: str) -> list[str]:
    """The `# comment` of every print line; a quoted comment is printed without quotes."""
    out = []
    for line in block.splitlines():
        match = _PRINT.match(line)
        if match:
            expected = match.group("expected")
            if len(expected) >= 2 and expected[0] == expected[-1] and expected[0] in "'\"":
                expected = expected[1:-1]
            out.append(expected)
    return out


def test_parsers_on_the_fallback() -> None:
    assert python_blocks(f"intro\n```python\n{FALLBACK_BLOCK}```\nmore\n") == [FALLBACK_BLOCK]
    assert expected_lines(FALLBACK_BLOCK) == [
        "0",
        "64",
        "running",
        "[REDACTED]",
        "my-secret-password",
    ]


def test_fallback_is_verbatim() -> None:
    # Where the seed is present, the copy must still be the README's (only) usage block.
    if SEED_README.is_file():
        assert FALLBACK_BLOCK in readme_blocks()
    else:
        assert readme_blocks() == [FALLBACK_BLOCK]


def run_and_check(block: str) -> None:
    assert "baqup_agent" in block
    code = block.replace("baqup_agent", "baqup_supervisor")
    expected = expected_lines(block)
    assert expected, "the block prints nothing to check"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines() == expected


@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_readme_block_runs_as_documented(index: int) -> None:
    run_and_check(readme_blocks()[index])


def test_fallback_block_runs_as_documented(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # As in a clone without ../shared: the verbatim copy is what runs.
    monkeypatch.setattr(sys.modules[__name__], "SEED_README", tmp_path / "absent.md")
    blocks = readme_blocks()
    assert blocks == [FALLBACK_BLOCK]
    run_and_check(blocks[0])
