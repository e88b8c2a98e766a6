"""The encryption settings checked as a whole, before anything runs (INTERFACE §14).

The schema says which variables must be present; this says whether what is there
can work: recipients and identities parse, a key is a key, the crypto extra is
installed, and the combinations make sense. Recipients while BAQUP_ARTIFACT_ENCRYPT
is off are an error, not a warning: the operator meant to encrypt, and a plaintext
backup is the worst outcome. `load_config` (config.py) turns each finding into a
problem, so `--validate` and a job's start report the same ones.

Never quotes a secret: the messages come from parsers that name the variable and
the line, not the text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .encryption import (
    ALGORITHM_VARIABLE,
    IDENTITY_VARIABLE,
    KEY_VARIABLE,
    RECIPIENTS_VARIABLE,
    new_encryptor,
    parse_key,
)
from .errors import ConfigError
from .secret import Secret

ENCRYPT_VARIABLE = "BAQUP_ARTIFACT_ENCRYPT"
VARIABLES = frozenset({ENCRYPT_VARIABLE, ALGORITHM_VARIABLE, RECIPIENTS_VARIABLE})


def crypto_available() -> bool:
    """Whether the crypto extra imports (installed is not enough: a broken or
    mismatched native wheel is found but fails at the first artifact)."""
    try:
        from cryptography.hazmat.primitives.asymmetric import x25519  # noqa: F401
        from cryptography.hazmat.primitives.ciphers import aead  # noqa: F401
    except ImportError:
        return False
    return True


def recipients_of(values: Mapping[str, Any]) -> list[str]:
    """The configured recipients, blanks dropped (an empty variable is none)."""
    return [str(r).strip() for r in values.get(RECIPIENTS_VARIABLE) or () if str(r).strip()]


def identity_lines(identity: Secret | None) -> list[str]:
    """The key lines of an identity secret (not its comments, which name public keys)."""
    if identity is None:
        return []
    lines = (line.strip() for line in identity.reveal().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _secret(values: Mapping[str, Any], name: str) -> Secret | None:
    value = values.get(name)
    if isinstance(value, Secret) and value.reveal().strip():
        return value
    return None


def encryption_problems(
    values: Mapping[str, Any], given: Sequence[str] | frozenset[str]
) -> list[tuple[str, str]]:
    """(variable, message) for each thing wrong with the encryption settings."""
    recipients = recipients_of(values)
    encrypt = values.get(ENCRYPT_VARIABLE) is True
    key_secret = _secret(values, KEY_VARIABLE)
    identity = _secret(values, IDENTITY_VARIABLE)
    problems: list[tuple[str, str]] = []
    if recipients and not encrypt:
        problems.append(
            (
                RECIPIENTS_VARIABLE,
                f"age recipients are set but {ENCRYPT_VARIABLE} is not true: the artifacts "
                f"would be stored in plaintext; set {ENCRYPT_VARIABLE}=true (or unset the "
                "recipients)",
            )
        )
    if not (encrypt or identity or recipients):
        return problems
    if not crypto_available():
        return [
            *problems,
            (
                ENCRYPT_VARIABLE,
                "encryption needs the crypto extra: pip install 'baqup-supervisor[crypto]'",
            ),
        ]
    if key_secret is not None:
        try:
            parse_key(key_secret)
        except ConfigError as exc:
            problems.append((KEY_VARIABLE, _text(exc, KEY_VARIABLE)))
    if identity is not None:
        from .age import parse_identities

        try:
            parse_identities(identity, IDENTITY_VARIABLE)
        except ConfigError as exc:
            problems.append((IDENTITY_VARIABLE, _text(exc, IDENTITY_VARIABLE)))
    if recipients:
        algorithm = values.get(ALGORITHM_VARIABLE) if ALGORITHM_VARIABLE in given else None
        present = b"" if key_secret is not None else None  # only whether a key is there
        try:  # the door a capture goes through, so the two cannot drift apart
            new_encryptor(present, algorithm, recipients)
        except ConfigError as exc:
            variable = _variable(str(exc))
            problems.append((variable, _text(exc, variable)))
    return problems


def _variable(message: str) -> str:
    head = message.split(":", 1)[0].split("=", 1)[0].strip()
    known = (RECIPIENTS_VARIABLE, ALGORITHM_VARIABLE, KEY_VARIABLE)
    return head if head in known else RECIPIENTS_VARIABLE


def _text(exc: ConfigError, variable: str) -> str:
    """The message without its leading `VARIABLE: ` (the problem names the variable)."""
    return str(exc).removeprefix(f"{variable}: ")
