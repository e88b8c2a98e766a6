"""The examples, run the way their READMEs say, outside Docker.

- `examples/quickstart` (QUICKSTART_DIR pointed into tmp_path): it pip-installs the
  package into the existing .venv (a few seconds here, so the script itself runs),
  validates, describes and runs the demo snapshot; the job dir it leaves is valid.
- `examples/shell-agent/agent.sh` under `baqup-run --`: `baqup emit` intent, progress,
  artifact, metadata and log reach the bus and the manifest.
- `examples/python-agent/agent.py` run directly with python: the SDK does the same.

Each job dir is checked with `baqup verify`. As root every file is readable, so the
shell agent's PERMISSION_DENIED branch is not reached here.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PYTHON, REPO, run_baqup
from tests.jobs import job_dir, log_records, prefix

VENV_BIN = Path(PYTHON).parent


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAQUP_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def readme_env(tmp_path: Path, source: Path) -> dict[str, str]:
    """The variables the example READMEs export (file bus, staging in tmp_path), with the
    staging dir made as the READMEs make it (`mkdir -p`): baqup-run never creates it."""
    (tmp_path / "staging").mkdir(exist_ok=True)
    return clean_env(
        BAQUP_JOB_ID=str(uuid.uuid4()),
        BAQUP_STAGING_DIR=str(tmp_path / "staging"),
        BAQUP_BUS_URL=f"file://{tmp_path / 'bus'}",
        BAQUP_BUS_FALLBACK_DIR=str(tmp_path / "fallback"),
        BAQUP_SOURCE_PATH=str(source),
    )


def bus_lines(bus_dir: Path, key: str) -> list[dict[str, Any]]:
    path = bus_dir / f"{key}.jsonl"
    assert path.exists(), f"nothing on the bus under {key}: {sorted(os.listdir(bus_dir))}"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def verify(path: Path, env: dict[str, str]) -> dict[str, Any]:
    result = run_baqup(["verify", str(path)], env, tool=True)
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["valid"] is True
    return report


def small_tree(root: Path) -> dict[str, bytes]:
    """A small source tree; its files (relative path -> content)."""
    files = {
        "a.txt": b"alpha\n",
        "empty": b"",
        "sub dir/b.bin": bytes(range(256)),
        "sub dir/deeper/ü n i.txt": "ünïcødé\n".encode(),
        "c.log": b"x" * 5000,
    }
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return files


# --- quickstart -------------------------------------------------------------------------------


def test_quickstart(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    env = clean_env(QUICKSTART_DIR=str(demo))
    result = subprocess.run(
        [str(REPO / "examples" / "quickstart")],
        env=env,
        cwd=tmp_path,  # the script changes to the repository itself
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert not (tmp_path / ".baqup-demo").exists()
    (jdir,) = [p for p in (demo / "staging").iterdir() if p.is_dir()]
    uuid.UUID(jdir.name)
    report = verify(jdir, env)
    assert report["role"] == "snapshot"
    manifest = json.loads((jdir / "manifest.json").read_text())
    assert manifest["agent"] == "agent-demo"
    (artifact,) = manifest["artifacts"]
    assert artifact["filename"] == "source.tar"
    with tarfile.open(jdir / "source.tar") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert {"quickstart", "agent-schema.json", "shell-agent/agent.sh"} <= names
    # what it printed: --validate, --info and the manifest, in that order
    out = result.stdout
    assert '{"valid":true,"errors":[]}' in out
    info_line = next(ln for ln in out.splitlines() if ln.startswith('{"agent":'))
    assert json.loads(info_line)["agent"] == "agent-demo"
    assert f'"job_id": "{jdir.name}"' in out
    assert out.index("--validate") < out.index("--info") < out.index("manifest.json")
    status = bus_lines(demo / "bus", f"baqup:status:{jdir.name}")[-1]
    assert status["status"] == "success"
    assert status["files"][0]["path"] == str(jdir / "source.tar")


# --- the shell agent ----------------------------------------------------------------------------


def run_shell_agent(tmp_path: Path, source: Path) -> tuple[dict[str, str], Any]:
    env = readme_env(tmp_path, source)
    env["BAQUP_BUS_KEY_PREFIX"] = "shell:"
    env["BAQUP_AGENT_ID"] = f"agent-shell-{uuid.uuid4().hex[:6]}"
    result = run_baqup(["--", "./examples/shell-agent/agent.sh"], env, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    verify(job_dir(env), env)
    return env, result


def listing_of(jdir: Path) -> dict[str, int]:
    """listing.jsonl as path -> size; every line must be a JSON object (it is JSON lines)."""
    listing: dict[str, int] = {}
    for line in (jdir / "listing.jsonl").read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"listing.jsonl holds a line that is not JSON: {line!r}") from None
        listing[entry["path"]] = entry["size"]
    return listing


def test_shell_agent(tmp_path: Path) -> None:
    source = tmp_path / "data"
    files = small_tree(source)
    env, result = run_shell_agent(tmp_path, source)
    jdir = job_dir(env)
    manifest = json.loads((jdir / "manifest.json").read_text())
    assert [a["filename"] for a in manifest["artifacts"]] == ["listing.jsonl"]
    assert manifest["source_metadata"] == {
        "type": "listing",
        "path": str(source),
        "files_included": len(files),
    }
    assert listing_of(jdir) == {str(source / k): len(v) for k, v in files.items()}

    bus = tmp_path / "bus"
    jid = env["BAQUP_JOB_ID"]
    progress = bus_lines(bus, f"{prefix(env)}progress:{jid}")[-1]
    assert progress["files_processed"] == len(files)
    assert progress["percent_complete"] == 100
    assert progress["current_file"].startswith(str(source))
    beats = bus_lines(bus, f"{prefix(env)}heartbeat:{env['BAQUP_AGENT_ID']}")
    intents = [b["intent"] for b in beats if b.get("intent")]
    assert intents, "no heartbeat carried the intent"
    assert intents[0]["operation"] == "list_files"
    assert intents[0]["expected_duration_seconds"] == 30
    assert intents[0]["detail"] == str(source)
    assert beats[-1].get("intent") is None  # cleared by `baqup emit intent --clear`
    status = bus_lines(bus, f"{prefix(env)}status:{jid}")[-1]
    assert status["status"] == "success"
    assert status["metrics"]["files_processed"] == len(files)
    assert status["warnings_summary"] == {} or not any(status["warnings_summary"].values())
    logged = [r for r in log_records(result.stderr) if r.get("message") == "listing written"]
    assert len(logged) == 1
    assert logged[0]["component"] == "child"
    assert logged[0]["context"] == {"files": len(files)}


def test_shell_agent_listing_is_json_whatever_the_names(tmp_path: Path) -> None:
    """File names with a double quote or a backslash must not break the JSON lines."""
    source = tmp_path / "data"
    names = {'quote"d name.txt': b"q\n", "back\\slash.txt": b"b\n", "plain.txt": b"p\n"}
    source.mkdir()
    for name, content in names.items():
        (source / name).write_bytes(content)
    env, _ = run_shell_agent(tmp_path, source)
    assert listing_of(job_dir(env)) == {str(source / k): len(v) for k, v in names.items()}


# --- the Python agent ----------------------------------------------------------------------------


def test_python_agent(tmp_path: Path) -> None:
    source = tmp_path / "data"
    files = small_tree(source)
    outside = tmp_path / "outside.txt"
    outside.write_text("not in the source\n")
    (source / "escape").symlink_to(outside)
    (source / "inner-link").symlink_to("a.txt")
    env = readme_env(tmp_path, source)
    env["BAQUP_BUS_KEY_PREFIX"] = "py:"
    env["BAQUP_AGENT_ID"] = f"agent-inventory-{uuid.uuid4().hex[:6]}"
    env["BAQUP_SOURCE_EXCLUDE"] = "*.log"
    result = subprocess.run(
        [PYTHON, "examples/python-agent/agent.py"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jdir = job_dir(env)
    verify(jdir, env)
    manifest = json.loads((jdir / "manifest.json").read_text())
    assert manifest["agent"] == "agent-inventory"
    assert [a["filename"] for a in manifest["artifacts"]] == ["inventory.jsonl"]
    included = {k: v for k, v in files.items() if not k.endswith(".log")}
    assert manifest["source_metadata"] == {
        "type": "inventory",
        "path": str(source),
        "files_included": len(included),
        "files_excluded": 1,
    }
    entries = [json.loads(line) for line in (jdir / "inventory.jsonl").read_text().splitlines()]
    by_path = {e["path"]: e for e in entries}
    for relative, content in included.items():
        assert by_path[relative] == {"path": relative, "kind": "file", "size": len(content)}
    assert by_path["inner-link"]["kind"] == "symlink"
    assert "escape" not in by_path
    assert "c.log" not in by_path

    bus = tmp_path / "bus"
    jid = env["BAQUP_JOB_ID"]
    progress = bus_lines(bus, f"{prefix(env)}progress:{jid}")[-1]
    assert progress["percent_complete"] == 100
    assert progress["files_processed"] == len(included)
    assert progress["bytes_processed"] == sum(len(v) for v in included.values())
    events = bus_lines(bus, f"{prefix(env)}events:{jid}")
    external = [e for e in events if e["code"] == "SYMLINK_EXTERNAL"]
    assert external
    assert external[-1]["sample_paths"] == ["escape"]
    # (the intent lasts microseconds here, too short to be sure a heartbeat carries it;
    # test_sdk.py checks intents in heartbeats)
    beats = bus_lines(bus, f"{prefix(env)}heartbeat:{env['BAQUP_AGENT_ID']}")
    assert beats[-1]["intent"] is None
    assert beats[-1]["state"] == "terminated"
    status = bus_lines(bus, f"{prefix(env)}status:{jid}")[-1]
    assert status["status"] == "success"
    assert status["agent"] == "agent-inventory"
    assert status["warnings_summary"]
    states = [
        m.get("state") for m in bus_lines(bus, f"{prefix(env)}notify") if m["type"] == "state"
    ]
    assert states[-1] == "terminated"
    assert "running" in states
    logged = [r for r in log_records(result.stderr) if r.get("message") == "inventory written"]
    assert len(logged) == 1
    assert logged[0]["context"] == {"files": len(included)}


@pytest.mark.parametrize("readme", ["shell-agent", "python-agent"])
def test_example_readme_commands_are_the_ones_tested(readme: str) -> None:
    text = (REPO / "examples" / readme / "README.md").read_text()
    if readme == "shell-agent":
        assert "baqup-run -- ./examples/shell-agent/agent.sh" in text
    else:
        assert "python examples/python-agent/agent.py" in text
    assert 'baqup verify "$BAQUP_STAGING_DIR/$BAQUP_JOB_ID"' in text
    assert "BAQUP_BUS_URL=file://" in text
