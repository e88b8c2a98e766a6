"""The README is the manual: its generated parts must match the code."""

from __future__ import annotations

import re
from pathlib import Path

from baqup_supervisor.contract import ExitCode
from baqup_supervisor.reference import BEGIN, END, config_reference

README = Path(__file__).resolve().parent.parent / "README.md"


def test_config_reference_matches_the_shipped_schema() -> None:
    text = README.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END) + 1
    assert text[start:end] == config_reference(), "run `baqup reference` and paste it"


def test_every_exit_code_is_documented() -> None:
    text = README.read_text()
    table = text[text.index("## Exit codes") :]
    documented = {int(n) for n in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}
    assert documented == {int(code) for code in ExitCode}


def test_ci_runs_the_readme_test_command() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    commands = re.findall(r"^exec (\S+)$", ci, re.MULTILINE)
    assert commands == ["./tests/run"]
    assert "./tests/run" in README.read_text()
    assert "./examples/quickstart" in README.read_text()
