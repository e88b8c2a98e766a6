"""agent-postgres end to end, against a real PostgreSQL server.

`baqup-run --schema docker/agent-postgres/agent-schema.json snapshot` runs pg_dump as
the schema says (its stdout captured as `db.dump`, compressed and checksummed on the
fly), `baqup verify` accepts the job dir, the database is dropped, and `baqup-run ...
restore`, a job of its own (its own job id, reading the snapshot from
BAQUP_RESTORE_FROM), creates it again from the verified artifact with pg_restore or psql.
Every table is compared with the original, for both dump formats and both buses, and
the snapshot's keys and files are compared before and after. The server only accepts TCP
connections with the password (scram-sha-256) and the jobs get no PGPASSWORD and no
pgpass file, so a passing round trip proves BAQUP_SECRET_DB_PASSWORD -> PGPASSWORD;
the password must then appear in no output and no bus message.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests import jobs
from tests.conftest import PYTHON, REPO, RedisServer, free_port, run_baqup
from tests.jobs import (
    NotifyListener,
    job_dir,
    log_records,
    prefix,
    read_hash,
    redis_env,
    restore_env,
)
from tests.postgres import PostgresServer, pg_env, psql

SCHEMA = REPO / "docker" / "agent-postgres" / "agent-schema.json"
VENV_BIN = Path(PYTHON).parent
KEY_HEX = "00112233445566778899aabbccddeeff" * 2  # 64 hex chars: a 32-byte key

UNICODE = "Zoë Ñandú — 東京 🐘 naïve café"

SEED = f"""
CREATE TABLE customers (
    id integer PRIMARY KEY,
    name text NOT NULL,
    email text,
    note text,
    created timestamptz
);
INSERT INTO customers
SELECT g,
       'Kunde ' || g || ' {UNICODE}',
       CASE WHEN g % 7 = 0 THEN NULL ELSE 'user' || g || '@example.org' END,
       CASE WHEN g % 3 = 0 THEN NULL ELSE repeat('ß', g % 50) || E'\\ttab\\nnewline' END,
       timestamptz '2024-01-01 00:00:00+00' + g * interval '1 minute'
FROM generate_series(1, 3000) g;

CREATE TABLE blobs (id integer PRIMARY KEY, data bytea, label text);
INSERT INTO blobs
SELECT g,
       CASE WHEN g % 11 = 0 THEN NULL
            ELSE decode(md5(g::text) || md5((g * 7)::text), 'hex') || '\\x00ff00'::bytea END,
       CASE WHEN g % 5 = 0 THEN NULL ELSE 'blob ' || g END
FROM generate_series(1, 2000) g;
INSERT INTO blobs
SELECT 100000, decode(string_agg(lpad(to_hex(b), 2, '0'), '' ORDER BY b), 'hex'), 'every byte'
FROM generate_series(0, 255) b;

CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    customer_id integer REFERENCES customers(id),
    amount numeric(12, 2),
    tags text[],
    payload jsonb,
    shipped boolean
);
INSERT INTO orders (customer_id, amount, tags, payload, shipped)
SELECT 1 + g % 3000,
       (g * 1.37)::numeric(12, 2),
       ARRAY['tag' || (g % 5), 'étiquette'],
       jsonb_build_object('n', g, 'text', '{UNICODE}'),
       CASE WHEN g % 4 = 0 THEN NULL ELSE g % 2 = 0 END
FROM generate_series(1, 4000) g;

CREATE TABLE "Ünïcode tablé" (id integer PRIMARY KEY, "välue" text);
INSERT INTO "Ünïcode tablé" SELECT g, CASE WHEN g % 2 = 0 THEN NULL ELSE '{UNICODE} ' || g END
FROM generate_series(1, 500) g;
"""

TABLES = ["blobs", "customers", "orders", "Ünïcode tablé"]


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole session, stopped by PID at the end."""
    server = PostgresServer.start()
    yield server
    server.stop()


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def tables_of(server: PostgresServer, db: str) -> list[str]:
    out = psql(
        server,
        "SELECT table_name FROM information_schema.tables "
        "WHERE table_schema = 'public' ORDER BY table_name COLLATE \"C\";",
        db,
    )
    return [line for line in out.splitlines() if line]


def contents(server: PostgresServer, db: str) -> dict[str, str]:
    """Every public table's rows in COPY text form, ordered by id, plus the sequence value."""
    found: dict[str, str] = {}
    for table in tables_of(server, db):
        found[table] = psql(
            server, f"COPY (SELECT * FROM {quote_ident(table)} ORDER BY id) TO STDOUT;", db
        )
    if "orders" in found:
        found["orders_id_seq"] = psql(server, "SELECT last_value FROM orders_id_seq;", db)
    return found


def fresh_database(server: PostgresServer) -> str:
    name = f"app_{uuid.uuid4().hex[:10]}"
    psql(server, f"CREATE DATABASE {name};")
    return name


def seeded_database(server: PostgresServer) -> tuple[str, dict[str, str]]:
    db = fresh_database(server)
    psql(server, SEED + "ANALYZE;", db)
    original = contents(server, db)
    assert sorted(t for t in original if t != "orders_id_seq") == sorted(TABLES)
    assert len(original["customers"].splitlines()) == 3000
    assert len(original["orders"].splitlines()) == 4000
    assert "\\N" in original["blobs"]  # NULLs are there
    assert "\\N" in original["customers"]
    assert UNICODE in original["customers"]
    return db, original


def drop(server: PostgresServer, db: str) -> None:
    psql(server, f"DROP DATABASE {db} WITH (FORCE);")
    assert not database_exists(server, db)


def database_exists(server: PostgresServer, db: str) -> bool:
    return psql(server, f"SELECT count(*) FROM pg_database WHERE datname = '{db}';").strip() == "1"


def snapshot_files(env: dict[str, str]) -> dict[str, bytes]:
    """Every file of the snapshot's job dir, by relative path."""
    root = job_dir(env)
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def restored_from(env: dict[str, str]) -> dict[str, str]:
    manifest = (job_dir(env) / "manifest.json").read_bytes()
    return {
        "job_id": env["BAQUP_JOB_ID"],
        "path": str(job_dir(env)),
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
    }


def recreate_empty(server: PostgresServer, db: str) -> None:
    psql(server, f"DROP DATABASE {db} WITH (FORCE);")
    psql(server, f"CREATE DATABASE {db};")
    assert tables_of(server, db) == []


def agent_env(
    base: dict[str, str], server: PostgresServer, db: str, fmt: str | None = None
) -> dict[str, str]:
    """The job's environment: the agent variables over TCP, tools on PATH, no ambient PG*."""
    env = pg_env(base)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"
    env.update(server.job_env(db))
    env["BAQUP_JOB_RETRY_MAX"] = "0"
    if fmt is not None:
        env["BAQUP_SOURCE_DUMP_FORMAT"] = fmt
    return env


def baqup_run(role: str, env: dict[str, str]) -> Any:
    return run_baqup(["--schema", str(SCHEMA), role], env, timeout=90)


def verify(path: Path, env: dict[str, str]) -> dict[str, Any]:
    result = run_baqup(["verify", str(path)], env, tool=True)
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["valid"] is True
    return report


def manifest_of(env: dict[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((job_dir(env) / "manifest.json").read_text())
    return data


def redis_dump(client: redis.Redis, key_prefix: str) -> str:
    """Every value under the prefix (hashes, streams, strings), as one text."""
    parts: list[str] = []
    for key in client.scan_iter(match=f"{key_prefix}*"):
        kind = client.type(key)
        parts.append(str(key))
        if kind == "hash":
            parts.append(json.dumps(client.hgetall(key), ensure_ascii=False))
        elif kind == "stream":
            parts.append(json.dumps(client.xrange(key), ensure_ascii=False))
        elif kind == "string":
            parts.append(repr(client.get(key)))
        else:
            parts.append(f"<{kind!r}>")
    return "\n".join(parts)


def job_keys(client: redis.Redis, env: dict[str, str]) -> dict[str, Any]:
    """Every key of the job `env` names, with its value; the job wrote some."""
    found = jobs.job_keys(client, env)
    assert found, "the job wrote no key"
    return found


def file_bus_dump(env: dict[str, str]) -> str:
    directory = Path(env["BAQUP_BUS_URL"].removeprefix("file://"))
    return "\n".join(
        p.read_text(errors="replace") for p in sorted(directory.rglob("*")) if p.is_file()
    )


def file_bus_lines(env: dict[str, str], key: str) -> list[dict[str, Any]]:
    directory = Path(env["BAQUP_BUS_URL"].removeprefix("file://"))
    path = directory / f"{key}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def status_from_file(env: dict[str, str]) -> dict[str, Any]:
    lines = file_bus_lines(env, f"{prefix(env)}status:{env['BAQUP_JOB_ID']}")
    assert lines, "no status on the file bus"
    return lines[-1]


def assert_snapshot_status(status: dict[str, Any], env: dict[str, str]) -> None:
    manifest = manifest_of(env)
    assert status["role"] == "snapshot"
    assert status["status"] == "success"
    assert status["exit_code"] == 0
    assert status["error"] is None
    assert status["agent"] == "agent-postgres"
    (entry,) = manifest["artifacts"]
    (listed,) = status["files"]
    assert listed["path"] == str(job_dir(env) / entry["filename"])
    assert listed["size_bytes"] == entry["size_bytes"]
    assert listed["checksum_sha256"] == entry["checksum"]["value"]


# --- the round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("bus", ["redis", "file"])
@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_round_trip(
    fmt: str,
    bus: str,
    postgres_server: PostgresServer,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    job_env: dict[str, str],
) -> None:
    server = postgres_server
    db, original = seeded_database(server)
    base = redis_env(job_env, redis_server) if bus == "redis" else dict(job_env)
    env = agent_env(base, server, db, fmt)
    assert "PGPASSWORD" not in env
    listener = NotifyListener(redis_client, f"{prefix(env)}notify") if bus == "redis" else None
    try:
        snap = baqup_run("snapshot", env)
        assert snap.returncode == 0, snap.stderr[-3000:]
        manifest = manifest_of(env)
        assert manifest["role"] == "snapshot"
        assert manifest["agent"] == "agent-postgres"
        (entry,) = manifest["artifacts"]
        assert entry["filename"] == "db.dump.zst"
        assert entry["compression"] == "zstd"
        assert entry["size_bytes"] > 1000
        report = verify(job_dir(env), env)
        assert [a["filename"] for a in report["artifacts"]] == ["db.dump.zst"]
        if bus == "redis":
            snapshot_status = read_hash(redis_client, f"{prefix(env)}status:{env['BAQUP_JOB_ID']}")
        else:
            snapshot_status = status_from_file(env)
        assert_snapshot_status(snapshot_status, env)

        metadata = manifest["source_metadata"]
        assert metadata["type"] == "postgresql"
        assert (metadata["host"], metadata["port"]) == ("127.0.0.1", server.port)
        assert (metadata["database"], metadata["dump_format"]) == (db, fmt)
        assert metadata["server_version"]
        assert metadata["encoding"] == "UTF8"
        assert metadata["row_counts"] == {
            "public.blobs": 2001,
            "public.customers": 3000,
            "public.orders": 4000,
            "public.Ünïcode tablé": 500,
        }
        if bus == "redis":
            progress = read_hash(redis_client, f"{prefix(env)}progress:{env['BAQUP_JOB_ID']}")
        else:
            progress = file_bus_lines(env, f"{prefix(env)}progress:{env['BAQUP_JOB_ID']}")[-1]
        assert progress.get("current_file") in {f"public.{t}" for t in TABLES}, progress
        assert progress["bytes_processed"] > 0
        before = snapshot_files(env), job_keys(redis_client, env) if bus == "redis" else {}

        drop(server, db)
        renv = restore_env(env)
        restore = baqup_run("restore", renv)
        assert restore.returncode == 0, restore.stderr[-3000:]
        assert contents(server, db) == original
        # the restore wrote no file and no key of the snapshot
        assert snapshot_files(env) == before[0]
        verify(job_dir(env), env)
        assert not (job_dir(renv) / "manifest.json").exists()
        if bus == "redis":
            status = read_hash(redis_client, f"{prefix(env)}status:{renv['BAQUP_JOB_ID']}")
            assert job_keys(redis_client, env) == before[1]
            assert listener is not None
            notified = listener.collect(
                lambda msgs: sum(m.get("type") == "status" for m in msgs) >= 2, timeout=10
            )
            bus_text = redis_dump(redis_client, prefix(env)) + json.dumps(notified)
        else:
            status = status_from_file(renv)
            bus_text = file_bus_dump(env)
        assert snapshot_status == (
            read_hash(redis_client, f"{prefix(env)}status:{env['BAQUP_JOB_ID']}")
            if bus == "redis"
            else status_from_file(env)
        )
        assert status["restored_from"] == restored_from(env)
        assert status["role"] == "restore"
        assert status["status"] == "success"
        assert status["exit_code"] == 0
        assert status["metrics"]["bytes_restored"] > 0
        # the password reached libpq (scram over TCP) and nothing else
        assert server.password not in bus_text
        assert env["BAQUP_JOB_ID"] in bus_text  # the dump really holds the job's messages
        for result in (snap, restore):
            assert server.password not in result.stdout
            assert server.password not in result.stderr
        assert server.password not in (job_dir(env) / "manifest.json").read_text()
    finally:
        if listener is not None:
            listener.close()


def test_wrong_password_fails_the_snapshot(
    postgres_server: PostgresServer, job_env: dict[str, str]
) -> None:
    server = postgres_server
    db = fresh_database(server)
    psql(server, "CREATE TABLE t (id integer PRIMARY KEY); INSERT INTO t VALUES (1);", db)
    env = agent_env(job_env, server, db)
    wrong = f"wrong-{secrets.token_hex(8)}"
    env["BAQUP_SECRET_DB_PASSWORD"] = wrong
    result = baqup_run("snapshot", env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert not (job_dir(env) / "manifest.json").exists()
    status = status_from_file(env)
    assert status["status"] == "failed"
    assert status["error"]["code"] == "CHILD_FAILED"
    assert status["exit_code"] == 1
    assert status["files"] == []
    # pg_dump's own complaint was logged (as a child record), the password never
    child_lines = [
        r["message"] for r in log_records(result.stderr) if r.get("component") == "child"
    ]
    assert any("password authentication failed" in line for line in child_lines), child_lines
    for text in (result.stdout, result.stderr, file_bus_dump(env)):
        assert wrong not in text
        assert server.password not in text


def test_encrypted_round_trip(postgres_server: PostgresServer, job_env: dict[str, str]) -> None:
    server = postgres_server
    db, original = seeded_database(server)
    env = agent_env(job_env, server, db, "custom")
    env["BAQUP_ARTIFACT_ENCRYPT"] = "true"
    env["BAQUP_SECRET_ENCRYPTION_KEY"] = KEY_HEX
    snap = baqup_run("snapshot", env)
    assert snap.returncode == 0, snap.stderr[-3000:]
    (entry,) = manifest_of(env)["artifacts"]
    assert entry["filename"] == "db.dump.zst.enc"
    assert entry["encrypted"] is True
    verify(job_dir(env), env)
    stored = (job_dir(env) / entry["filename"]).read_bytes()
    assert stored.startswith(b"BAQUPENC")
    assert b"customers" not in stored  # not even the table names are readable

    drop(server, db)
    renv = restore_env(env)
    # BAQUP_ARTIFACT_ENCRYPT=true without its key is a configuration error (64) ...
    keyless = {k: v for k, v in renv.items() if k != "BAQUP_SECRET_ENCRYPTION_KEY"}
    misconfigured = baqup_run("restore", keyless)
    assert misconfigured.returncode == 64, misconfigured.stderr[-3000:]
    assert "BAQUP_SECRET_ENCRYPTION_KEY" in misconfigured.stderr
    # ... and an encrypted artifact restored with no key at all is refused (65): nothing
    # decrypted reaches the database
    del keyless["BAQUP_ARTIFACT_ENCRYPT"]
    refused = baqup_run("restore", keyless)
    assert refused.returncode == 65, refused.stderr[-3000:]
    assert status_from_file(renv)["error"]["code"] == "DECRYPTION_FAILED"
    assert not database_exists(server, db)  # nothing decrypted, nothing created

    restore = baqup_run("restore", renv)
    assert restore.returncode == 0, restore.stderr[-3000:]
    assert contents(server, db) == original
    for result in (snap, misconfigured, refused, restore):
        assert KEY_HEX not in result.stdout + result.stderr
        assert server.password not in result.stdout + result.stderr
    assert KEY_HEX not in file_bus_dump(env)


def test_tampered_artifact_is_never_restored(
    postgres_server: PostgresServer, job_env: dict[str, str]
) -> None:
    server = postgres_server
    db, _ = seeded_database(server)
    env = agent_env(job_env, server, db, "custom")
    snap = baqup_run("snapshot", env)
    assert snap.returncode == 0, snap.stderr[-3000:]
    artifact = job_dir(env) / "db.dump.zst"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))
    check = run_baqup(["verify", str(job_dir(env))], env, tool=True)
    assert check.returncode == 65

    drop(server, db)
    renv = restore_env(env)
    restore = baqup_run("restore", renv)
    assert restore.returncode == 65, restore.stderr[-3000:]
    records = log_records(restore.stderr)
    assert records, restore.stderr[-2000:]
    assert not any(r.get("message") == "child started" for r in records)
    assert not database_exists(server, db)
    status = status_from_file(renv)
    assert status["role"] == "restore"
    assert status["status"] == "failed"
    assert status["exit_code"] == 65
    assert status["error"]["code"] == "CHECKSUM_MISMATCH"


# --- restore targets: existing, renamed, read-only source, refused, failing -------------------


@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_restore_into_an_existing_database_replaces_its_objects(
    fmt: str, postgres_server: PostgresServer, job_env: dict[str, str]
) -> None:
    server = postgres_server
    db, original = seeded_database(server)
    env = agent_env(job_env, server, db, fmt)
    assert baqup_run("snapshot", env).returncode == 0
    psql(server, "DELETE FROM orders WHERE id % 2 = 0; UPDATE customers SET name = 'x';", db)
    psql(server, "CREATE TABLE unrelated (id integer); INSERT INTO unrelated VALUES (7);", db)
    restore = baqup_run("restore", restore_env(env))
    assert restore.returncode == 0, restore.stderr[-3000:]
    after = contents(server, db)
    assert after.pop("unrelated") == "7\n"  # objects not in the dump are left alone
    assert after == original


@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_restore_under_another_name_from_a_read_only_copy(
    fmt: str, postgres_server: PostgresServer, job_env: dict[str, str], tmp_path: Path
) -> None:
    server = postgres_server
    db, original = seeded_database(server)
    env = agent_env(job_env, server, db, fmt)
    assert baqup_run("snapshot", env).returncode == 0
    copy = tmp_path / "elsewhere" / "snapshot"
    shutil.copytree(job_dir(env), copy)
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    subprocess.run(["mount", "--bind", str(copy), str(read_only)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(read_only)], check=True)
        with pytest.raises(OSError):
            (read_only / "probe").write_text("x")  # root too: the mount is read-only
        before = {p.name: p.read_bytes() for p in read_only.iterdir() if p.is_file()}
        verify(read_only, env)
        target = f"{db}_copy"
        renv = restore_env(env, BAQUP_RESTORE_FROM=str(read_only), BAQUP_TARGET_DATABASE=target)
        restore = baqup_run("restore", renv)
        assert restore.returncode == 0, restore.stderr[-3000:]
        assert contents(server, target) == original
        assert contents(server, db) == original
        assert {p.name: p.read_bytes() for p in read_only.iterdir() if p.is_file()} == before
        status = status_from_file(renv)
        assert status["restored_from"]["path"] == str(read_only)
        assert status["restored_from"]["job_id"] == env["BAQUP_JOB_ID"]
    finally:
        subprocess.run(["umount", str(read_only)], check=True)


def test_a_target_server_that_refuses_the_connection_is_exit_69(
    postgres_server: PostgresServer, job_env: dict[str, str]
) -> None:
    server = postgres_server
    db, _ = seeded_database(server)
    env = agent_env(job_env, server, db, "custom")
    assert baqup_run("snapshot", env).returncode == 0
    renv = restore_env(env, BAQUP_TARGET_HOST="127.0.0.1", BAQUP_TARGET_PORT=str(free_port()))
    restore = baqup_run("restore", renv)
    assert restore.returncode == 69, restore.stderr[-3000:]
    child = [r["message"] for r in log_records(restore.stderr) if r.get("component") == "child"]
    assert any("does not answer (connection refused" in m for m in child), child
    assert status_from_file(renv)["exit_code"] == 69


def test_a_failing_plain_restore_leaves_nothing_behind(
    postgres_server: PostgresServer, job_env: dict[str, str]
) -> None:
    """One transaction: a restore failing midway leaves an existing database as it was,
    and drops a database it created."""
    server = postgres_server
    db, original = seeded_database(server)
    env = agent_env(job_env, server, db, "plain")
    assert baqup_run("snapshot", env).returncode == 0
    # a view on `orders` makes the dump's DROP TABLE orders fail (ON_ERROR_STOP) midway
    psql(server, "CREATE VIEW keep_me AS SELECT id FROM orders;", db)
    failed = baqup_run("restore", restore_env(env))
    assert failed.returncode == 1, failed.stderr[-3000:]
    after = contents(server, db)
    assert after.pop("keep_me")
    assert after == original  # nothing replaced, nothing partial


def test_a_restore_failing_into_a_missing_database_drops_it(
    postgres_server: PostgresServer, job_env: dict[str, str]
) -> None:
    server = postgres_server
    db, _ = seeded_database(server)
    # only a superuser may create a function in language internal: the restore fails
    psql(server, "CREATE FUNCTION my_abs(int) RETURNS int LANGUAGE internal AS 'int4abs';", db)
    role = f"restorer_{uuid.uuid4().hex[:8]}"
    psql(server, f"CREATE ROLE {role} LOGIN CREATEDB PASSWORD '{server.password}';")
    env = agent_env(job_env, server, db, "custom")
    assert baqup_run("snapshot", env).returncode == 0
    target = f"{db}_new"
    renv = restore_env(env, BAQUP_TARGET_DATABASE=target, BAQUP_SOURCE_USER=role)
    failed = baqup_run("restore", renv)
    assert failed.returncode == 1, failed.stderr[-3000:]
    child = [r["message"] for r in log_records(failed.stderr) if r.get("component") == "child"]
    assert any(f"dropping the database {target}" in m for m in child), child
    assert not database_exists(server, target)


ALTER_IN_PLACE = """python3 - <<'PY'
import os
path = os.path.join(os.environ["BAQUP_RESTORE_FROM"], "db.dump.zst")
with open(path, "r+b") as handle:  # same inode: the verified, open file changes
    handle.seek(-10, 2)
    last = handle.read(1)
    handle.seek(-10, 2)
    handle.write(bytes([last[0] ^ 0xFF]))
PY
"""


@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_an_artifact_changed_while_streaming_creates_no_database(
    fmt: str, postgres_server: PostgresServer, job_env: dict[str, str], tmp_path: Path
) -> None:
    """Changed after verification, before its end is fed: the end (and EOF) never reach
    psql or pg_restore, the child is stopped, and the database it created is dropped."""
    server = postgres_server
    db, _ = seeded_database(server)
    # some MiB stored, so the feeder is still reading the file when it changes
    hexes = " || ".join(f"md5(g::text || '{n}')" for n in range(4))
    psql(
        server, f"CREATE TABLE big AS SELECT g, {hexes} AS t FROM generate_series(1, 60000) g;", db
    )
    env = agent_env(job_env, server, db, fmt)
    assert baqup_run("snapshot", env).returncode == 0
    assert manifest_of(env)["artifacts"][0]["size_bytes"] > 4 << 20
    schema = json.loads(SCHEMA.read_text())
    restore_cmd = schema["x-baqup-agent"]["commands"]["restore"]
    restore_cmd["argv"][-1] = ALTER_IN_PLACE + restore_cmd["argv"][-1]
    altered = tmp_path / "agent-schema.json"
    altered.write_text(json.dumps(schema))
    copy = tmp_path / "copy"
    shutil.copytree(job_dir(env), copy)
    target = f"{db}_changed"
    renv = restore_env(env, BAQUP_RESTORE_FROM=str(copy), BAQUP_TARGET_DATABASE=target)
    result = run_baqup(["--schema", str(altered), "--grace", "5", "restore"], renv, timeout=90)
    assert result.returncode == 65, result.stderr[-3000:]
    assert status_from_file(renv)["error"]["code"] == "CHECKSUM_MISMATCH"
    assert not database_exists(server, target), result.stderr[-3000:]
