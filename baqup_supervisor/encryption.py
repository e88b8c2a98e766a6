"""Streaming authenticated encryption of artifacts (the `crypto` extra: `cryptography`).

Format `baqup-stream-v1`, a STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár):

    header  32 bytes: b"BAQUPENC", version 1, algorithm (1 aes-256-gcm,
            2 chacha20-poly1305), chunk size (uint32 BE), 7-byte random nonce
            prefix, 11 zero bytes
    chunks  AEAD(key, nonce, plaintext chunk, aad=header); every chunk but the last
            holds exactly `chunk size` bytes of plaintext; the last is shorter (maybe
            empty) and is the only one sealed with the final flag
    nonce   prefix (7) || chunk counter (uint32 BE) || final flag (1 byte)

So a flipped bit, a dropped, repeated or reordered chunk, and a truncation at any
point (including at a chunk boundary) all fail authentication. The key is 32 bytes,
given as 64 hex characters or base64 in the secret the schema names (by default
`BAQUP_SECRET_ENCRYPTION_KEY`). Nothing here logs or returns key material.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from collections.abc import Iterator
from typing import Any, Protocol

from .errors import ConfigError, DataError
from .secret import Secret

MAGIC = b"BAQUPENC"
VERSION = 1
HEADER_SIZE = 32
TAG_SIZE = 16
CHUNK_SIZE = 1024 * 1024
FORMAT = "baqup-stream-v1"
ALGORITHM_IDS = {"aes-256-gcm": 1, "chacha20-poly1305": 2}
KEY_VARIABLE = "BAQUP_SECRET_ENCRYPTION_KEY"


def parse_key(secret: Secret | None, variable: str = KEY_VARIABLE) -> bytes:
    """32 key bytes from hex or base64 text; a ConfigError (never the key) otherwise."""
    if secret is None or not secret.reveal().strip():
        raise ConfigError(f"{variable}: BAQUP_ARTIFACT_ENCRYPT=true needs a 32-byte key here")
    text = secret.reveal().strip()
    key: bytes | None = None
    if len(text) == 64:
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = None
    if key is None:
        try:
            padded = text + "=" * (-len(text) % 4)
            key = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(
                f"{variable}: expected a 32-byte key as 64 hex characters or base64"
            ) from None
    if len(key) != 32:
        raise ConfigError(f"{variable}: expected a 32-byte key (256 bits), got {len(key)} bytes")
    return key


def _aead(algorithm: str, key: bytes) -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
    except ImportError:  # pragma: no cover - depends on the install
        raise ConfigError(
            "BAQUP_ARTIFACT_ENCRYPT=true needs the crypto extra: "
            "pip install 'baqup-supervisor[crypto]'"
        ) from None
    if algorithm == "aes-256-gcm":
        return AESGCM(key)
    if algorithm == "chacha20-poly1305":
        return ChaCha20Poly1305(key)
    raise ConfigError(f"BAQUP_ARTIFACT_ENCRYPT_ALGORITHM: unknown algorithm {algorithm!r}")


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def _nonce(prefix: bytes, counter: int, final: bool) -> bytes:
    if counter >= 2**32:
        raise DataError("artifact too large for one encrypted stream (2^32 chunks)")
    return prefix + struct.pack(">IB", counter, 1 if final else 0)


class StreamEncryptor:
    """Encrypts a stream chunk by chunk; `update` and `finalize` return ciphertext."""

    def __init__(self, key: bytes, algorithm: str, chunk_size: int = CHUNK_SIZE) -> None:
        self._aead = _aead(algorithm, key)
        self.algorithm = algorithm
        self.chunk_size = chunk_size
        prefix = os.urandom(7)
        self.header = (
            MAGIC
            + struct.pack(">BBI", VERSION, ALGORITHM_IDS[algorithm], chunk_size)
            + prefix
            + bytes(11)
        )
        self._prefix = prefix
        self._counter = 0
        self._pending = bytearray()
        self._started = False

    def _seal(self, chunk: bytes, final: bool) -> bytes:
        sealed: bytes = self._aead.encrypt(
            _nonce(self._prefix, self._counter, final), chunk, self.header
        )
        self._counter += 1
        return sealed

    def update(self, data: bytes) -> bytes:
        out = []
        if not self._started:
            out.append(self.header)
            self._started = True
        self._pending += data
        size = self.chunk_size
        # keep at least one byte back: only `finalize` may seal the last chunk
        while len(self._pending) > size:
            out.append(self._seal(bytes(self._pending[:size]), final=False))
            del self._pending[:size]
        return b"".join(out)

    def finalize(self) -> bytes:
        head = b"" if self._started else self.header
        self._started = True
        if len(self._pending) == self.chunk_size:
            body = self._seal(bytes(self._pending), final=False) + self._seal(b"", final=True)
        else:
            body = self._seal(bytes(self._pending), final=True)
        self._pending.clear()
        return head + body


def decrypt_stream(source: Readable, key: bytes) -> Iterator[bytes]:
    """Plaintext chunks of an encrypted stream; DataError on any tampering or truncation."""
    header = source.read(HEADER_SIZE)
    if len(header) != HEADER_SIZE or not header.startswith(MAGIC):
        raise DataError("not a baqup encrypted stream (bad header)", code="DECRYPTION_FAILED")
    version, algorithm_id, chunk_size = struct.unpack(">BBI", header[8:14])
    if version != VERSION or chunk_size <= 0 or chunk_size > 64 * 1024 * 1024:
        raise DataError("unsupported encrypted stream header", code="DECRYPTION_FAILED")
    names = {v: k for k, v in ALGORITHM_IDS.items()}
    if algorithm_id not in names:
        raise DataError("unknown encryption algorithm in header", code="DECRYPTION_FAILED")
    aead = _aead(names[algorithm_id], key)
    prefix = header[14:21]
    record = chunk_size + TAG_SIZE
    counter = 0
    from cryptography.exceptions import InvalidTag

    while True:
        sealed = _read_full(source, record)
        final = len(sealed) < record
        try:
            plain: bytes = aead.decrypt(_nonce(prefix, counter, final), sealed, header)
        except InvalidTag:
            what = "truncated or tampered" if not final or len(sealed) >= TAG_SIZE else "truncated"
            raise DataError(
                f"decryption failed at chunk {counter}: the stream is {what} (or the key is wrong)",
                code="DECRYPTION_FAILED",
            ) from None
        counter += 1
        if plain:
            yield plain
        if final:
            if source.read(1):
                raise DataError("data after the final chunk", code="DECRYPTION_FAILED")
            return


def _read_full(source: Readable, size: int) -> bytes:
    parts = []
    remaining = size
    while remaining:
        data = source.read(remaining)
        if not data:
            break
        parts.append(data)
        remaining -= len(data)
    return b"".join(parts)
