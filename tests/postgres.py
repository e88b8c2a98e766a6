"""A real PostgreSQL server for tests (not a test module).

- `PostgresServer.start()`: `initdb` and `postgres` run as the `postgres` system user
  (PostgreSQL refuses root) in a fresh private directory, listening on 127.0.0.1 on a
  free port only, its unix socket inside that directory. Unix-socket connections are
  `trust` (the test's own `psql` helper uses them); TCP connections need the password
  (`scram-sha-256`), so a job that connects to 127.0.0.1 works only if the password
  really reaches libpq (BAQUP_SECRET_DB_PASSWORD -> PGPASSWORD).
- `PostgresServer.stop()`: SIGINT (fast shutdown) to the postmaster's PID, then SIGKILL.
- `psql(server, sql, db)`: run SQL through the real `psql` over the unix socket; stdout.
- `pg_bin_dir()`: the newest `/usr/lib/postgresql/*/bin` holding `postgres`.

The cluster directory is made with `tempfile.mkdtemp` directly under the system temp
dir, not in pytest's `tmp_path`: pytest's `/tmp/pytest-of-root` is mode 0700, so the
`postgres` user could not reach anything below it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port

__all__ = ["PostgresServer", "pg_bin_dir", "pg_env", "psql"]

SUPERUSER = "postgres"


def pg_bin_dir() -> Path:
    """The bin dir of the newest PostgreSQL server installed (never a hard-coded version)."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/postgres")]
    if not found:
        raise RuntimeError(
            "PostgreSQL server binaries not found: run ./tests/run (it installs them)"
        )

    def version(path: Path) -> tuple[int, ...]:
        digits = path.parent.name.split(".")
        return tuple(int(d) for d in digits if d.isdigit())

    return max(found, key=version)


def pg_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment with the server's bin dir first on PATH and no ambient libpq settings.

    Every PG* variable is dropped and PGPASSFILE points nowhere, so a connection can only
    authenticate with what the test (or the job) passes explicitly.
    """
    source = base if base is not None else dict(os.environ)
    env = {k: v for k, v in source.items() if not k.startswith("PG")}
    env["PATH"] = f"{pg_bin_dir()}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["PGPASSFILE"] = "/nonexistent/baqup-tests-no-pgpass"
    env["PGCONNECT_TIMEOUT"] = "10"
    return env


def _demote(user: str) -> tuple[int, int]:
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


@dataclass
class PostgresServer:
    """A postgres server this test session started and owns."""

    directory: Path
    port: int
    password: str
    process: subprocess.Popen[bytes]

    @property
    def socket_dir(self) -> Path:
        return self.directory / "socket"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        return self.directory / "postgres.log"

    @classmethod
    def start(cls, password: str | None = None) -> PostgresServer:
        if os.geteuid() != 0:
            raise RuntimeError(
                "the PostgreSQL fixture runs initdb as the postgres user: run as root"
            )
        bin_dir = pg_bin_dir()
        uid, gid = _demote(SUPERUSER)
        secret = password or f"pg-{secrets.token_hex(12)}"
        directory = Path(tempfile.mkdtemp(prefix="baqup-pg-"))
        try:
            os.chown(directory, uid, gid)
            (directory / "socket").mkdir()
            os.chown(directory / "socket", uid, gid)
            pwfile = directory / "pwfile"
            pwfile.write_text(secret + "\n")
            os.chown(pwfile, uid, gid)
            pwfile.chmod(0o600)
            init = subprocess.run(
                [
                    str(bin_dir / "initdb"),
                    "--pgdata",
                    str(directory / "data"),
                    "--username",
                    SUPERUSER,
                    "--pwfile",
                    str(pwfile),
                    "--auth-local",
                    "trust",
                    "--auth-host",
                    "scram-sha-256",
                    "--encoding",
                    "UTF8",
                    "--locale",
                    "C",
                    "--no-sync",
                ],
                user=uid,
                group=gid,
                extra_groups=[],
                cwd=directory,
                env=pg_env(),
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            pwfile.unlink()
            if init.returncode != 0:
                raise RuntimeError(f"initdb failed: {init.stderr[-2000:]}")
            return cls._launch(directory, secret, uid, gid, bin_dir)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    @classmethod
    def _launch(
        cls, directory: Path, secret: str, uid: int, gid: int, bin_dir: Path
    ) -> PostgresServer:
        last = ""
        for _ in range(5):
            port = free_port()
            log = directory / "postgres.log"
            with log.open("ab") as handle:
                os.chown(log, uid, gid)
                process = subprocess.Popen(
                    [
                        str(bin_dir / "postgres"),
                        "-D",
                        str(directory / "data"),
                        "-c",
                        "listen_addresses=127.0.0.1",
                        "-c",
                        f"port={port}",
                        "-c",
                        f"unix_socket_directories={directory / 'socket'}",
                        "-c",
                        "fsync=off",
                        "-c",
                        "synchronous_commit=off",
                        "-c",
                        "full_page_writes=off",
                        "-c",
                        "password_encryption=scram-sha-256",
                    ],
                    user=uid,
                    group=gid,
                    extra_groups=[],
                    cwd=directory,
                    env=pg_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=handle,
                    stderr=handle,
                )
            server = cls(directory, port, secret, process)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and process.poll() is None:
                probe = subprocess.run(
                    [
                        "psql",
                        "-h",
                        str(directory / "socket"),
                        "-p",
                        str(port),
                        "-U",
                        SUPERUSER,
                        "-d",
                        "postgres",
                        "-tAc",
                        "SELECT 1",
                    ],
                    env=pg_env(),
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                )
                if probe.returncode == 0 and probe.stdout.strip() == "1":
                    return server
                time.sleep(0.1)
            last = log.read_text(errors="replace")[-2000:]
            server.stop(remove=False)
        shutil.rmtree(directory, ignore_errors=True)
        raise RuntimeError(f"postgres did not start: {last}")

    def stop(self, *, remove: bool = True) -> None:
        """Fast shutdown by PID (SIGINT), SIGKILL if it lingers; then remove the directory."""
        process = self.process
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)

    def job_env(self, database: str) -> dict[str, str]:
        """The agent-postgres variables for a job on `database` over TCP, with the password."""
        return {
            "BAQUP_SOURCE_HOST": "127.0.0.1",
            "BAQUP_SOURCE_PORT": str(self.port),
            "BAQUP_SOURCE_DATABASE": database,
            "BAQUP_SOURCE_USER": SUPERUSER,
            "BAQUP_SECRET_DB_PASSWORD": self.password,
        }


def psql(server: PostgresServer, sql: str, db: str = "postgres", *, check: bool = True) -> str:
    """Run `sql` with the real psql over the server's unix socket (trust); its stdout.

    Unaligned, tuples only, stop on the first error; raises AssertionError on failure when
    `check` is true.
    """
    result = subprocess.run(
        [
            "psql",
            "-X",
            "-h",
            str(server.socket_dir),
            "-p",
            str(server.port),
            "-U",
            SUPERUSER,
            "-d",
            db,
            "-v",
            "ON_ERROR_STOP=1",
            "-tA",
            "-f",
            "-",
        ],
        input=sql,
        env=pg_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"psql failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout
