"""The deployment examples give baqup-run the time its own shutdown needs.

On SIGTERM baqup-run gives the child `--grace` seconds, then reports; with the bus down
it keeps trying for `BAQUP_BUS_GRACE_PERIOD` before it writes `.baqup-status.json` and
exits 75. A platform that kills the container sooner loses the job's status. So the
time a stop needs is derived here from the defaults the code and the contract schema
declare (and whatever the example overrides), a real baqup-run is timed against that
bound with the bus down, and the Kubernetes Job's `terminationGracePeriodSeconds` and
the compose service's `stop_grace_period` are checked to cover it. The same files'
hardening is checked too: seccomp, resource requests, a TTL for the finished Job, and
a backup that waits for a healthy database.
"""

from __future__ import annotations

import functools
import json
import re
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from baqup_supervisor.bus import DAY
from baqup_supervisor.cli import RunRequest
from baqup_supervisor.processes import DRAIN_AFTER_EXIT
from tests.conftest import REPO, free_port, python_child, run_baqup
from tests.jobs import job_dir, start_job, wait_for
from tests.test_agents_static import CONTRACT_SCHEMA, agent_schema, load_json, parse_yaml

KUBERNETES_JOB = REPO / "examples" / "kubernetes" / "backup-job.yaml"
COMPOSE_FILE = REPO / "examples" / "compose" / "docker-compose.yml"
# Writing .baqup-status.json (an fsynced file on the staging volume) and exiting.
FINAL_WRITE = 5.0


def contract_default(name: str) -> float:
    return float(load_json(CONTRACT_SCHEMA)["properties"][name]["default"])


def grace_option(args: Sequence[str]) -> float:
    """baqup-run's `--grace` in the container's arguments, else its default."""
    for index, word in enumerate(args):
        if word == "--":
            break
        if word == "--grace":
            return float(args[index + 1])
        if word.startswith("--grace="):
            return float(word.partition("=")[2])
    return default_grace()


@functools.cache
def default_grace() -> float:
    """`--grace`'s default as baqup-run states it in --help (click's, which is what runs)."""
    result = run_baqup(["--help"], {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    assert result.returncode == 0, result.stderr
    match = re.search(r"--grace SECONDS.*?\[default: ([0-9.]+)", result.stdout, re.DOTALL)
    assert match, result.stdout
    assert float(match.group(1)) == RunRequest().grace  # the dataclass agrees with the option
    return float(match.group(1))


def stop_seconds(env: Mapping[str, str], args: Sequence[str]) -> float:
    """The longest a baqup-run stop takes, from SIGTERM to its exit with the status written.

    The child's grace, the supervisor's wait for its pipes after it exits, one bus call
    in flight at each end (the connection being made, the sender thread closing), the
    bus grace period, and the final write.
    """

    def setting(name: str) -> float:
        return float(env[name]) if name in env else contract_default(name)

    bus_timeout = setting("BAQUP_BUS_TIMEOUT")
    return (
        grace_option(args)
        + DRAIN_AFTER_EXIT
        + 2 * bus_timeout
        + setting("BAQUP_BUS_GRACE_PERIOD")
        + FINAL_WRITE
    )


def go_duration(text: str) -> float:
    """A compose duration ("90s", "1m30s", "1.5m") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", text)
    assert parts, f"{text!r} is not a duration"
    assert "".join(n + u for n, u in parts) == text, f"{text!r} is not a duration"
    return sum(float(n) * units[u] for n, u in parts)


def memory_bytes(text: str) -> int:
    """A Kubernetes quantity (128Mi, 1G) or a schema size (64M, powers of 1024)."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|K|M|G)?", text)
    assert match, f"{text!r} is not a memory size"
    scale = {"Ki": 1, "Mi": 2, "Gi": 3, "K": 1, "M": 2, "G": 3}.get(match.group(2) or "", 0)
    return int(match.group(1)) << (10 * scale)


def kubernetes() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, str]]:
    job = parse_yaml(KUBERNETES_JOB.read_text())
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    return job, pod, container, env


def compose() -> tuple[dict[str, Any], dict[str, Any]]:
    services = parse_yaml(COMPOSE_FILE.read_text())["services"]
    return services, services["backup"]


# --- the bound itself, against a real stop ----------------------------------------------------


def test_the_bound_covers_a_real_stop_with_the_bus_down(
    job_env: dict[str, str], jobs: list[Any]
) -> None:
    """A child that ignores SIGTERM and a bus that never answers: the worst stop there is."""
    env = dict(
        job_env,
        BAQUP_BUS_URL=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        BAQUP_BUS_GRACE_PERIOD="2",
        BAQUP_BUS_TIMEOUT="0.5",
    )
    code = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', file=sys.stderr, flush=True); time.sleep(60)"
    )
    args = ["--grace", "1", "--", *python_child(code)]
    job = start_job(args, env)
    jobs.append(job)
    wait_for(
        lambda: any(r.get("message") == "ready" for r in job.logs()), 15, what="the child running"
    )
    job.signal(signal.SIGTERM)
    stopped = time.monotonic()
    bound = stop_seconds(env, args)
    assert job.wait(bound + 30) == 75, job.stderr()[-3000:]
    elapsed = time.monotonic() - stopped
    assert elapsed <= bound, f"the stop took {elapsed:.1f} s, more than the {bound:.1f} s derived"
    # the two long terms are real: a platform allowing less than them loses the status
    assert elapsed >= grace_option(args) + float(env["BAQUP_BUS_GRACE_PERIOD"])
    status = json.loads((job_dir(env) / ".baqup-status.json").read_text())
    assert status["status"] == "failed"
    assert status["error"]["code"] == "ABORTED"


def test_the_defaults_need_more_than_the_old_30_seconds() -> None:
    """What the examples had: 30 s for a stop that may take --grace 10 plus 60 s."""
    assert stop_seconds({}, ["snapshot"]) > 30
    assert grace_option(["--grace=3", "snapshot"]) == 3
    assert grace_option(["--", "cmd", "--grace", "3"]) == 10
    assert go_duration("1m30s") == 90
    assert go_duration("90s") == 90


# --- Kubernetes ---------------------------------------------------------------------------------


def test_kubernetes_grace_covers_the_stop() -> None:
    job, pod, container, env = kubernetes()
    needed = stop_seconds(env, container.get("args", []))
    assert pod["terminationGracePeriodSeconds"] >= needed, (
        f"terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} < {needed:g} s"
    )
    # baqup's own job timeout (then its report) comes before the Job's deadline
    job_timeout = float(env.get("BAQUP_JOB_TIMEOUT", contract_default("BAQUP_JOB_TIMEOUT")))
    assert job["spec"]["activeDeadlineSeconds"] >= job_timeout + needed


def test_kubernetes_job_hardening() -> None:
    job, pod, container, _ = kubernetes()
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ttl = job["spec"]["ttlSecondsAfterFinished"]
    assert isinstance(ttl, int)
    assert ttl >= DAY  # the pod's log stays as long as the job's status in Redis
    resources = container["resources"]
    requests, limits = resources["requests"], resources["limits"]
    assert {"cpu", "memory"} <= set(requests)
    assert re.fullmatch(r"\d+m|\d+(\.\d+)?", str(requests["cpu"]))
    needs = agent_schema("agent-fs")["x-baqup-agent"]["requirements"]
    assert memory_bytes(requests["memory"]) >= memory_bytes(needs["recommended_memory"])
    assert memory_bytes(requests["memory"]) <= memory_bytes(limits["memory"])
    assert memory_bytes(limits["memory"]) >= memory_bytes(needs["min_memory"])


# --- compose --------------------------------------------------------------------------------------


def test_compose_grace_covers_the_stop() -> None:
    _, backup = compose()
    environment = {k: str(v) for k, v in backup["environment"].items()}
    command = backup["command"]
    needed = stop_seconds(environment, command if isinstance(command, list) else [command])
    assert "stop_grace_period" in backup, "compose's default stop is 10 s"
    assert go_duration(backup["stop_grace_period"]) >= needed


def test_compose_waits_for_a_healthy_database() -> None:
    services, backup = compose()
    environment = backup["environment"]
    service = environment["BAQUP_SOURCE_HOST"]
    assert backup["depends_on"][service] == {"condition": "service_healthy"}
    assert backup["depends_on"]["redis"]["condition"] in ("service_started", "service_healthy")
    check = services[service]["healthcheck"]
    test = check["test"]
    assert test[0] == "CMD"
    assert test[1] == "pg_isready"
    options = dict(zip(test[2::2], test[3::2], strict=True))
    assert options["--username"] == environment["BAQUP_SOURCE_USER"]
    assert options["--dbname"] == environment["BAQUP_SOURCE_DATABASE"]
    assert services[service]["environment"]["POSTGRES_DB"] == options["--dbname"]
    assert go_duration(check["interval"]) > 0
    assert check["retries"] >= 1
    # the whole wait is bounded: a database that never comes up fails the run
    assert go_duration(check["interval"]) * check["retries"] <= 300


def test_timing_comments_match_the_numbers() -> None:
    """The files explain their numbers; the explanation names the values the test uses."""
    _, _, container, env = kubernetes()
    text = KUBERNETES_JOB.read_text()
    grace = grace_option(container.get("args", []))
    bus_grace = contract_default("BAQUP_BUS_GRACE_PERIOD")
    for document in (text, COMPOSE_FILE.read_text()):
        assert f"--grace {grace:g}" in document
        assert f"{bus_grace:g}" in document
    assert Path(__file__).name in text
    assert "BAQUP_BUS_GRACE_PERIOD" not in env  # the default is what the comment states
