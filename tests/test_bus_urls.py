"""The bus URL's forms (INTERFACE.md section 4): rediss://, unix://, a password, a bad scheme.

Each test starts its own redis-server, listening only the way the URL under test reaches
it (TLS with a CA made here by openssl, a Unix socket, a password), runs a real job, and
reads the status back through a client connected the same way. A password in the URL
must never appear on stderr, and a scheme the bus does not speak is a usage error (64).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import free_port, python_child, run_baqup, stop_pid
from tests.jobs import job_dir, log_records, prefix, read_hash, read_stream, wait_for

CHILD = r"""
import json, os
control = os.fdopen(int(os.environ["BAQUP_CONTROL_FD"]), "w", buffering=1)
control.write(json.dumps({"type": "event", "severity": "warn", "code": "URL_CHECK",
                          "message": "over the bus", "path": "/etc/hosts"}) + "\n")
control.write(json.dumps({"type": "progress", "percent_complete": 100,
                          "bytes_processed": 4096}) + "\n")
with open(os.path.join(os.environ["BAQUP_WORK_DIR"], "dump.bin"), "wb") as handle:
    handle.write(b"dump" * 1024)
"""

PASSWORD = "Pw-4r7x9Q-only-in-the-url"


class Servers:
    """redis-server processes this test started, stopped by their PIDs at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], connect: Mapping[str, Any]) -> redis.Redis:
        """Start redis-server with `args`; a client (`connect` kwargs) once it answers."""
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not installed (tests/run installs it)"
        self.directory.mkdir(parents=True, exist_ok=True)
        log = self.directory / f"redis-{len(self.processes)}.log"
        process = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                str(log),
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.processes.append(process)
        client = redis.Redis(decode_responses=True, socket_timeout=2, **connect)

        def answers() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"redis-server exited: {log.read_text()[-2000:]}")
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(answers, 10, 0.05, "redis-server to answer")
        return client

    def stop(self) -> None:
        for process in self.processes:
            stop_pid(process)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    started = Servers(tmp_path / "redis")
    try:
        yield started
    finally:
        started.stop()


def run_job(
    env: Mapping[str, str], url: str, **extra: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    job = dict(env)
    job.update(BAQUP_BUS_URL=url, BAQUP_BUS_TIMEOUT="1", BAQUP_AGENT_HEARTBEAT_INTERVAL="1")
    job.update(extra)
    result = run_baqup(["--", *python_child(CHILD)], job, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result, job


def assert_reported(client: redis.Redis, env: Mapping[str, str]) -> None:
    """The controller's view through `client`: status, progress and the event."""
    job_id = env["BAQUP_JOB_ID"]
    status = read_hash(client, f"{prefix(env)}status:{job_id}")
    assert status.get("status") == "success", status
    assert status["exit_code"] == 0
    assert [Path(f["path"]) for f in status["files"]] == [job_dir(env) / "dump.bin"]
    assert status["warnings_summary"] == {"URL_CHECK": 1}
    progress = read_hash(client, f"{prefix(env)}progress:{job_id}")
    assert progress["bytes_processed"] == 4096
    events = read_stream(client, f"{prefix(env)}events:{job_id}")
    assert [e["code"] for e in events] == ["URL_CHECK"]
    heartbeat = read_hash(client, f"{prefix(env)}heartbeat:{env['BAQUP_AGENT_ID']}")
    assert heartbeat["state"] == "terminated"
    assert not (job_dir(env) / ".baqup-status.json").exists()


# --- rediss:// ----------------------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (subjectAltName IP)."""
    directory = tmp_path / "tls"
    directory.mkdir()
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=baqup test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
        "-out", "server.csr", "-subj", "/CN=127.0.0.1",
        cwd=directory,
    )  # fmt: skip
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\n"
        "subjectKeyIdentifier=hash\n"
    )
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", "server.crt", "-extfile", "server.ext",
        cwd=directory,
    )  # fmt: skip
    return {name: directory / f"{name}" for name in ("ca.crt", "server.crt", "server.key")}


def tls_server(servers: Servers, certs: Mapping[str, Path]) -> tuple[int, redis.Redis]:
    port = free_port()
    client = servers.start(
        [
            "--port", "0",
            "--tls-port", str(port),
            "--tls-cert-file", str(certs["server.crt"]),
            "--tls-key-file", str(certs["server.key"]),
            "--tls-ca-cert-file", str(certs["ca.crt"]),
            "--tls-auth-clients", "no",
        ],
        {"host": "127.0.0.1", "port": port, "ssl": True, "ssl_ca_certs": str(certs["ca.crt"])},
    )  # fmt: skip
    return port, client


def test_rediss_with_the_ca_reports_over_tls(
    servers: Servers, certs: dict[str, Path], job_env: dict[str, str]
) -> None:
    port, client = tls_server(servers, certs)
    result, env = run_job(job_env, f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs['ca.crt']}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_reported(client, env)  # the server has no plain-text port: this came over TLS
    assert not any(r["level"] in ("warn", "error") for r in log_records(result.stderr))


def test_rediss_without_the_ca_is_refused_and_the_job_exits_75(
    servers: Servers, certs: dict[str, Path], job_env: dict[str, str]
) -> None:
    # The certificate is checked: a server the client cannot verify is no bus at all.
    port, client = tls_server(servers, certs)
    result, env = run_job(job_env, f"rediss://127.0.0.1:{port}/0", BAQUP_BUS_GRACE_PERIOD="1")
    assert result.returncode == 75, result.stderr[-3000:]
    assert client.keys(f"{prefix(env)}*") == []
    document = (job_dir(env) / ".baqup-status.json").read_text()
    assert '"status": "success"' in document
    reasons = [str(r.get("context", {}).get("reason")) for r in log_records(result.stderr)]
    assert any("CERTIFICATE_VERIFY_FAILED" in reason for reason in reasons), reasons


# --- unix:// ----------------------------------------------------------------------------


def test_unix_socket_url(servers: Servers, job_env: dict[str, str], tmp_path: Path) -> None:
    socket_path = tmp_path / "sock" / "redis.sock"
    socket_path.parent.mkdir()
    client = servers.start(
        ["--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700"],
        {"unix_socket_path": str(socket_path)},
    )
    result, env = run_job(job_env, f"unix://{socket_path}?db=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert client.keys(f"{prefix(env)}*") == []  # db 0 holds nothing: the URL's db counts
    db3 = redis.Redis(unix_socket_path=str(socket_path), db=3, decode_responses=True)
    try:
        assert_reported(db3, env)
    finally:
        db3.close()


# --- a password in the URL ------------------------------------------------------------------


def password_server(servers: Servers) -> tuple[int, redis.Redis]:
    port = free_port()
    client = servers.start(
        ["--port", str(port), "--requirepass", PASSWORD],
        {"host": "127.0.0.1", "port": port, "password": PASSWORD},
    )
    return port, client


def test_password_in_the_url_works_and_is_never_shown(
    servers: Servers, job_env: dict[str, str]
) -> None:
    port, client = password_server(servers)
    result, env = run_job(
        job_env, f"redis://:{PASSWORD}@127.0.0.1:{port}/0", BAQUP_AGENT_LOG_LEVEL="debug"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_reported(client, env)
    assert PASSWORD not in result.stderr
    assert PASSWORD not in result.stdout
    for key in client.keys(f"{prefix(env)}*"):
        kind = client.type(key)
        if kind == "hash":
            assert PASSWORD not in str(client.hgetall(key))
        elif kind == "stream":
            assert PASSWORD not in str(client.xrange(key))


def test_wrong_password_is_never_shown_either(servers: Servers, job_env: dict[str, str]) -> None:
    port, client = password_server(servers)
    wrong = "Wrong-" + PASSWORD[::-1]
    result, env = run_job(
        job_env,
        f"redis://default:{wrong}@127.0.0.1:{port}/0",
        BAQUP_BUS_GRACE_PERIOD="1",
        BAQUP_AGENT_LOG_LEVEL="debug",
    )
    assert result.returncode == 75, result.stderr[-3000:]
    assert client.keys(f"{prefix(env)}*") == []
    assert wrong not in result.stderr
    assert wrong not in (job_dir(env) / ".baqup-status.json").read_text()
    warnings = [r for r in log_records(result.stderr) if r["level"] == "warn"]
    assert any("bus unreachable" in str(r["message"]) for r in warnings)


# --- an unsupported scheme ----------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://x", "amqp://127.0.0.1:5672/"])
def test_unsupported_scheme_is_a_usage_error(
    job_env: dict[str, str], tmp_path: Path, url: str
) -> None:
    marker = tmp_path / "child-ran"
    env = dict(job_env, BAQUP_BUS_URL=url)
    code = f"open({str(marker)!r}, 'w').close()"
    result = run_baqup(["--", *python_child(code)], env, timeout=60)
    assert result.returncode == 64, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [r for r in log_records(result.stderr) if r["level"] in ("error", "fatal")]
    assert any("BAQUP_BUS_URL" in str(r["message"]) for r in errors), result.stderr[-3000:]
    assert "scheme" in result.stderr
    assert not marker.exists()  # refused before anything ran
    assert not (job_dir(env) / "manifest.json").exists()
    assert not Path(env["BAQUP_BUS_FALLBACK_DIR"]).exists()


def test_validate_rejects_an_unsupported_scheme(job_env: dict[str, str]) -> None:
    # `--validate` is the environment check: a URL the job would refuse is not valid.
    env = dict(job_env, BAQUP_BUS_URL="http://x")
    result = run_baqup(["--validate"], env, timeout=60)
    assert result.returncode == 64, result.stdout
    report = json.loads(result.stdout)
    assert report["valid"] is False
    assert [e["variable"] for e in report["errors"]] == ["BAQUP_BUS_URL"]
