"""The contract's vocabulary: exit codes, states, levels, categories and event codes.

Every expected value here is copied from the spec (AGENT-CONTRACT-SPEC.md sections
1, 5, 6 and Appendix B), not from the code under test.
"""

from __future__ import annotations

import pytest

from baqup_supervisor import AgentState, ErrorCategory, EventCode, ExitCode, LogLevel, Severity
from baqup_supervisor.contract import TRANSITIONS

# Spec section 5, "Exit Codes": code, meaning, retriable (None: "Maybe"/"Configurable").
SPEC_EXIT_CODES: dict[str, tuple[int, bool | None]] = {
    "SUCCESS": (0, False),
    "GENERAL_FAILURE": (1, None),
    "USAGE_CONFIG_ERROR": (64, False),
    "DATA_ERROR": (65, False),
    "RESOURCE_UNAVAILABLE": (69, True),
    "INTERNAL_ERROR": (70, None),
    "CANT_CREATE_OUTPUT": (73, True),
    "IO_ERROR": (74, True),
    "COMPLETED_UNREPORTED": (75, True),
    "PARTIAL_FAILURE": (76, None),
}

# Appendix B, verbatim: code and severity.
APPENDIX_B: dict[str, str] = {
    "PERMISSION_DENIED": "warn",
    "SYMLINK_SKIPPED": "info",
    "SYMLINK_EXTERNAL": "warn",
    "FILE_CHANGED": "warn",
    "FILE_VANISHED": "warn",
    "COMPRESSION_FALLBACK": "info",
    "CHECKSUM_RETRY": "warn",
    "CONNECTION_RETRY": "info",
    "RESOURCE_LIMIT_APPROACHING": "warn",
    "RESOURCE_LIMIT_EXCEEDED": "error",
    "ANOMALY_DETECTED": "warn",
}


# --- exit codes ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), SPEC_EXIT_CODES.items())
def test_exit_code_values(name: str, expected: tuple[int, bool | None]) -> None:
    assert int(ExitCode[name]) == expected[0]


def test_exit_codes_are_exactly_the_spec_taxonomy() -> None:
    assert {code.name: int(code) for code in ExitCode} == {
        name: value for name, (value, _) in SPEC_EXIT_CODES.items()
    }
    assert sorted(int(c) for c in ExitCode) == [0, 1, 64, 65, 69, 70, 73, 74, 75, 76]


@pytest.mark.parametrize(("name", "expected"), SPEC_EXIT_CODES.items())
def test_exit_code_retriable_column(name: str, expected: tuple[int, bool | None]) -> None:
    assert ExitCode[name].retriable is expected[1]


def test_exit_code_renders_as_bare_number() -> None:
    assert str(ExitCode.SUCCESS) == "0"
    assert str(ExitCode.USAGE_CONFIG_ERROR) == "64"
    assert f"{ExitCode.PARTIAL_FAILURE}" == "76"
    assert "{}".format(ExitCode.DATA_ERROR) == "65"  # noqa: UP032
    assert isinstance(ExitCode.SUCCESS, int)
    assert ExitCode(75) is ExitCode.COMPLETED_UNREPORTED


# --- states ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "value"),
    [
        (AgentState.INITIALIZING, "initializing"),
        (AgentState.RUNNING, "running"),
        (AgentState.COMPLETING, "completing"),
        (AgentState.TERMINATED, "terminated"),
        (AgentState.FAILED, "failed"),
    ],
)
def test_agent_state_str_and_format_are_bare_value(state: AgentState, value: str) -> None:
    assert str(state) == value
    assert f"{state}" == value
    assert format(state, ">15") == f"{value:>15}"
    assert "state={}".format(state) == f"state={value}"  # noqa: UP032
    assert "%s" % state == value  # noqa: UP031
    assert state == value
    assert AgentState(value) is state


def test_agent_states_are_exactly_the_spec_states() -> None:
    assert {s.value for s in AgentState} == {
        "initializing",
        "running",
        "completing",
        "terminated",
        "failed",
    }


def test_final_states() -> None:
    assert {s for s in AgentState if s.final} == {AgentState.TERMINATED, AgentState.FAILED}


def test_transitions_match_the_spec_state_machine() -> None:
    # INITIALIZING -> RUNNING -> COMPLETING -> TERMINATED
    #      |            |           |
    #      +--> FAILED <+-----------+
    assert dict(TRANSITIONS) == {
        AgentState.INITIALIZING: frozenset({AgentState.RUNNING, AgentState.FAILED}),
        AgentState.RUNNING: frozenset({AgentState.COMPLETING, AgentState.FAILED}),
        AgentState.COMPLETING: frozenset({AgentState.TERMINATED, AgentState.FAILED}),
        AgentState.TERMINATED: frozenset(),
        AgentState.FAILED: frozenset(),
    }


def test_every_state_reachable_from_initializing_and_no_cycles() -> None:
    reached = {AgentState.INITIALIZING}
    frontier = [AgentState.INITIALIZING]
    steps = 0
    while frontier:
        state = frontier.pop()
        for nxt in TRANSITIONS[state]:
            assert nxt is not AgentState.INITIALIZING  # no way back
            if nxt not in reached:
                reached.add(nxt)
                frontier.append(nxt)
        steps += 1
        assert steps < 20
    assert reached == set(AgentState)


# --- log levels ------------------------------------------------------------------


def test_log_levels_are_the_spec_levels_in_order() -> None:
    expected = ["trace", "debug", "info", "warn", "error", "fatal"]
    assert [str(level) for level in LogLevel] == expected
    shuffled = [LogLevel.ERROR, LogLevel.TRACE, LogLevel.FATAL, LogLevel.INFO, LogLevel.WARN]
    shuffled.append(LogLevel.DEBUG)
    assert [level.value for level in sorted(shuffled)] == expected


def test_log_level_comparisons() -> None:
    assert LogLevel.DEBUG < LogLevel.WARN
    assert LogLevel.TRACE <= LogLevel.TRACE
    assert LogLevel.FATAL > LogLevel.ERROR
    assert LogLevel.INFO >= LogLevel.INFO
    assert not LogLevel.ERROR < LogLevel.INFO
    assert max(LogLevel.INFO, LogLevel.WARN, LogLevel.DEBUG) is LogLevel.WARN
    # Rank order, not alphabetical order ("warn" > "error" as strings).
    assert LogLevel.WARN < LogLevel.ERROR


@pytest.mark.parametrize(
    ("text", "level"),
    [
        ("trace", LogLevel.TRACE),
        ("debug", LogLevel.DEBUG),
        ("info", LogLevel.INFO),
        ("warn", LogLevel.WARN),
        ("error", LogLevel.ERROR),
        ("fatal", LogLevel.FATAL),
        ("INFO", LogLevel.INFO),
        ("  Debug  ", LogLevel.DEBUG),
        ("warning", LogLevel.WARN),
        ("WARNING", LogLevel.WARN),
        ("critical", LogLevel.FATAL),
    ],
)
def test_log_level_parse(text: str, level: LogLevel) -> None:
    assert LogLevel.parse(text) is level


@pytest.mark.parametrize("text", ["", "verbose", "notice", "3", "warnings"])
def test_log_level_parse_rejects_unknown(text: str) -> None:
    with pytest.raises(ValueError):
        LogLevel.parse(text)


def test_log_level_str_is_bare_value() -> None:
    assert str(LogLevel.WARN) == "warn"
    assert f"{LogLevel.FATAL:<6}|" == "fatal |"


# --- error categories --------------------------------------------------------------


@pytest.mark.parametrize(
    ("category", "retry"),
    [
        (ErrorCategory.CONFIG, False),
        (ErrorCategory.TRANSIENT, True),
        (ErrorCategory.PERMANENT, False),
        (ErrorCategory.INTERNAL, False),
    ],
)
def test_error_category_default_retry(category: ErrorCategory, retry: bool) -> None:
    assert category.default_retry is retry


def test_partial_category_is_not_retried_by_default() -> None:
    # The spec says "Configurable": nothing retries a partial failure unless configured.
    assert ErrorCategory.PARTIAL.default_retry is not True


def test_error_categories_are_the_spec_words() -> None:
    assert {str(c) for c in ErrorCategory} == {
        "config",
        "transient",
        "permanent",
        "partial",
        "internal",
    }


# --- event codes -------------------------------------------------------------------


@pytest.mark.parametrize(("code", "severity"), APPENDIX_B.items())
def test_appendix_b_event_code_present_with_severity(code: str, severity: str) -> None:
    event = EventCode(code)
    assert event.name == code
    assert str(event) == code
    assert event.default_severity is Severity(severity)
    assert str(event.default_severity) == severity


def test_all_appendix_b_codes_are_event_codes() -> None:
    assert set(APPENDIX_B) <= {e.value for e in EventCode}


def test_severities_are_log_level_words() -> None:
    assert [str(s) for s in Severity] == [str(level) for level in LogLevel]
