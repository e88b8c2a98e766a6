"""Settings: the typed, frozen view of a valid configuration that the supervisor reads.

Built once from a `Config` (config.py), whose defaults live in the shipped contract
schema (`data/contract-schema.json`): there is no second table of defaults here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .coerce import parse_size
from .config import Config
from .contract import ROLES
from .encryption import ALGORITHM_VARIABLE
from .encryption_settings import recipients_of
from .info import agent_id as resolve_agent_id
from .info import agent_name, agent_version
from .secret import Secret


@dataclass(frozen=True)
class Settings:
    """Everything a job needs to know, typed. Secrets stay `Secret`."""

    job_id: str
    agent: str
    agent_version: str
    agent_id: str
    role: str
    staging_dir: Path
    job_timeout: float
    retry_max: int
    retry_backoff: str
    trace_parent: str | None
    heartbeat_interval: float
    stall_timeout: float
    log_level: str
    log_format: str
    log_sanitize: str
    partial_failure_mode: str
    memory_limit: str
    parallelism: int
    compress: bool
    compress_algorithm: str
    compress_level: int
    checksum_algorithm: str
    encrypt: bool
    encrypt_algorithm: str
    encrypt_key_id: str | None
    split_size: int
    retain_on_failure: bool
    bus_url: Secret
    key_prefix: str
    fallback_dir: Path
    reconnect_max_attempts: int
    reconnect_backoff: str
    bus_grace_period: float
    bus_timeout: float
    control_fd: int
    meta: Mapping[str, Any] = field(default_factory=dict, repr=False)
    agent_properties: tuple[str, ...] = ()  # the variables the agent's own schema declares
    values: Mapping[str, Any] = field(default_factory=dict, repr=False)
    encrypt_recipients: tuple[str, ...] = ()  # age recipients: public, shown and logged
    # None when BAQUP_ARTIFACT_ENCRYPT_ALGORITHM was not set: recipients then imply
    # chacha20-poly1305, and only an explicit aes-256-gcm beside them is an error
    encrypt_algorithm_given: str | None = None

    @property
    def job_dir(self) -> Path:
        return self.staging_dir / self.job_id

    @property
    def work_dir(self) -> Path:
        return self.job_dir / ".staging"

    @property
    def retriable_exit_codes(self) -> frozenset[int]:
        extra = self.meta.get("retriable_exit_codes") or []
        return frozenset({69, 73, 74, *(int(c) for c in extra)})

    def command_spec(self, role: str) -> Mapping[str, Any] | None:
        """The schema's `commands[role]`, normalised to a mapping with `argv`."""
        commands = self.meta.get("commands")
        if not isinstance(commands, Mapping) or role not in commands:
            return None
        spec = commands[role]
        return spec if isinstance(spec, Mapping) else {"argv": list(spec)}

    @classmethod
    def from_config(
        cls, config: Config, *, role: str | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        config.raise_for_problems()
        v = config.values
        meta = config.agent_meta
        name = agent_name(meta)
        declared_roles = meta.get("roles") or list(meta.get("commands") or [])
        chosen_role = role or next((r for r in declared_roles if r in ROLES), "snapshot")
        env = environ if environ is not None else {}
        bus_url = v["BAQUP_BUS_URL"]
        return cls(
            job_id=v["BAQUP_JOB_ID"],
            agent=name,
            agent_version=agent_version(meta),
            agent_id=resolve_agent_id(name, env),
            role=chosen_role,
            staging_dir=Path(v["BAQUP_STAGING_DIR"]),
            job_timeout=float(v["BAQUP_JOB_TIMEOUT"]),
            retry_max=int(v["BAQUP_JOB_RETRY_MAX"]),
            retry_backoff=v["BAQUP_JOB_RETRY_BACKOFF"],
            trace_parent=v.get("BAQUP_JOB_TRACE_PARENT"),
            heartbeat_interval=float(v["BAQUP_AGENT_HEARTBEAT_INTERVAL"]),
            stall_timeout=float(v["BAQUP_AGENT_STALL_TIMEOUT"]),
            log_level=v["BAQUP_AGENT_LOG_LEVEL"],
            log_format=v["BAQUP_AGENT_LOG_FORMAT"],
            log_sanitize=v["BAQUP_AGENT_LOG_SANITIZE"],
            partial_failure_mode=v["BAQUP_AGENT_PARTIAL_FAILURE_MODE"],
            memory_limit=v["BAQUP_AGENT_MEMORY_LIMIT"],
            parallelism=int(v["BAQUP_AGENT_PARALLELISM"]),
            compress=bool(v["BAQUP_ARTIFACT_COMPRESS"]),
            compress_algorithm=v["BAQUP_ARTIFACT_COMPRESS_ALGORITHM"],
            compress_level=int(v["BAQUP_ARTIFACT_COMPRESS_LEVEL"]),
            checksum_algorithm=v["BAQUP_ARTIFACT_CHECKSUM_ALGORITHM"],
            encrypt=bool(v["BAQUP_ARTIFACT_ENCRYPT"]),
            encrypt_algorithm=v["BAQUP_ARTIFACT_ENCRYPT_ALGORITHM"],
            encrypt_key_id=v.get("BAQUP_ARTIFACT_ENCRYPT_KEY_ID"),
            split_size=parse_size(str(v["BAQUP_ARTIFACT_SPLIT_SIZE"])),
            retain_on_failure=bool(v["BAQUP_ARTIFACT_RETAIN_ON_FAILURE"]),
            bus_url=bus_url if isinstance(bus_url, Secret) else Secret(str(bus_url)),
            key_prefix=v["BAQUP_BUS_KEY_PREFIX"],
            fallback_dir=Path(v["BAQUP_BUS_FALLBACK_DIR"]),
            reconnect_max_attempts=int(v["BAQUP_BUS_RECONNECT_MAX_ATTEMPTS"]),
            reconnect_backoff=v["BAQUP_BUS_RECONNECT_BACKOFF"],
            bus_grace_period=float(v["BAQUP_BUS_GRACE_PERIOD"]),
            bus_timeout=float(v["BAQUP_BUS_TIMEOUT"]),
            control_fd=int(v["BAQUP_CONTROL_FD"]),
            meta=meta,
            values=v,
            agent_properties=config.agent_properties,
            encrypt_recipients=tuple(recipients_of(v)),
            encrypt_algorithm_given=(
                v[ALGORITHM_VARIABLE] if config.given(ALGORITHM_VARIABLE) else None
            ),
        )
