"""Self-description: `--info`, `baqup labels`, and the agent's identity.

Owns what the controller reads without running a job (spec section 8): the agent's
`x-baqup-agent` block merged with what this baqup-run supports, the `io.baqup.*`
image labels, and the agent id rule of INTERFACE.md section 2.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from importlib.util import find_spec
from typing import Any

from . import CONTRACT_VERSION, __version__

DEFAULT_AGENT = "baqup-agent"
_CONTAINER_HOSTNAME = re.compile(r"[0-9a-f]{12,64}")


def agent_name(meta: Mapping[str, Any]) -> str:
    name = meta.get("agent")
    return name if isinstance(name, str) and name else DEFAULT_AGENT


def agent_version(meta: Mapping[str, Any]) -> str:
    version = meta.get("version")
    return version if isinstance(version, str) and version else __version__


def agent_id(agent: str, environ: Mapping[str, str], hostname: str | None = None) -> str:
    """`$BAQUP_AGENT_ID`, else `{agent}-{6 hex}`: from a container hostname, else random."""
    explicit = environ.get("BAQUP_AGENT_ID")
    if explicit:
        return explicit
    host = socket.gethostname() if hostname is None else hostname
    if _CONTAINER_HOSTNAME.fullmatch(host):
        return f"{agent}-{host[:6]}"
    return f"{agent}-{os.urandom(3).hex()}"


def supported_compression() -> list[str]:
    algorithms = ["zstd", "gzip"]
    if find_spec("lz4") is not None:
        algorithms.append("lz4")
    return [*algorithms, "none"]


def supported_encryption() -> list[str]:
    from .encryption_settings import crypto_available

    if not crypto_available():
        return []
    # the two baqup-stream-v2 algorithms, and age v1 files to X25519 recipients
    return ["aes-256-gcm", "chacha20-poly1305", "age"]


def roles(meta: Mapping[str, Any]) -> list[str]:
    declared = meta.get("roles")
    if isinstance(declared, list) and declared:
        return [str(r) for r in declared]
    commands = meta.get("commands")
    if isinstance(commands, Mapping) and commands:
        return [str(r) for r in commands]
    return ["snapshot"]


def describe(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The `--info` document: the schema's x-baqup-agent merged with our capabilities."""
    capabilities: dict[str, Any] = {
        "compression": supported_compression(),
        "checksums": ["sha256", "sha512", "blake3"],
        "encryption": supported_encryption(),
        "parallel": True,
        "bus": ["redis", "rediss", "unix", "redis+sentinel", "file"],
    }
    declared_caps = meta.get("capabilities")
    if isinstance(declared_caps, Mapping):
        capabilities.update(declared_caps)
    info: dict[str, Any] = {
        "agent": agent_name(meta),
        "version": agent_version(meta),
        "contract_version": CONTRACT_VERSION,
        "roles": roles(meta),
        "capabilities": capabilities,
        "requirements": dict(meta.get("requirements") or {}),
        "supervisor": {"name": "baqup-supervisor", "version": __version__},
    }
    if "restore" in info["roles"]:
        # INTERFACE.md section 11: a restore is a job of its own reading this snapshot dir
        info["restore"] = {"source": "BAQUP_RESTORE_FROM", "default": "$BAQUP_JOB_DIR"}
    if isinstance(meta.get("build"), Mapping):
        info["build"] = dict(meta["build"])
    commands = meta.get("commands")
    if isinstance(commands, Mapping):
        info["commands"] = {str(role): _argv(spec) for role, spec in commands.items()}
    return info


def _argv(spec: Any) -> list[str]:
    if isinstance(spec, Mapping):
        return [str(a) for a in spec.get("argv", [])]
    return [str(a) for a in spec]


def image_labels(schema: Mapping[str, Any]) -> dict[str, str]:
    """The `io.baqup.*` labels of spec section 8, the schema compacted into one of them."""
    from .logs import dumps

    meta = schema.get("x-baqup-agent", {})
    meta = meta if isinstance(meta, Mapping) else {}
    name = agent_name(meta)
    return {
        "io.baqup.agent": "true",
        "io.baqup.type": name.removeprefix("agent-"),
        "io.baqup.version": agent_version(meta),
        "io.baqup.roles": ",".join(roles(meta)),
        "io.baqup.schema": dumps(schema).decode(),
    }
