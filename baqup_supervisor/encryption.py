"""Streaming authenticated encryption of artifacts (the `crypto` extra: `cryptography`).

This module owns the symmetric formats and the one door the callers use:
`new_encryptor` picks what a new artifact gets from the settings (`baqup-stream-v2`
with a configured key, age v1 with recipients: age.py), `decrypt_stream` opens any
encrypted artifact by its first bytes (v1, v2 or age). It never logs or returns key
material, and never hands out plaintext that has not been authenticated.

Format `baqup-stream-v2` (what new artifacts get), a STREAM construction (Hoang,
Reyhanitabar, Rogaway, Vizár) under a key derived per artifact, as Tink's streaming
AEAD and age do. The header, 62 bytes:

    offset  size  field
         0     8  magic, b"BAQUPENC"
         8     1  version, 2
         9     1  algorithm: 1 aes-256-gcm, 2 chacha20-poly1305
        10     4  chunk size: plaintext bytes per chunk, uint32 big-endian
                  (1 MiB as written; a reader takes 1 byte to 8 MiB)
        14    32  salt: random, fresh for every artifact
        46    16  key check (below)

    PRK         = HKDF-Extract-SHA-256(salt, configured 32-byte key)
    payload key = HKDF-Expand(PRK, info = b"baqup-stream-v2 payload key", 32 bytes)
    key check   = HKDF-Expand(PRK, info = b"baqup-stream-v2 key check", 16 bytes)

Chunks follow the header: chunk i is AEAD(payload key, nonce_i, plaintext, aad =
the 62 header bytes) of `chunk size` plaintext bytes, except the last, which is
shorter (empty when the plaintext is a multiple of the chunk size, so every stream
has one) and is the only one sealed with the final flag:

    nonce_i = i as 11 bytes big-endian || 0x01 for the last chunk, else 0x00

A wrong key fails on the key check before any chunk; a flipped bit anywhere, a
dropped, repeated or reordered chunk, bytes after the last chunk and a cut at any
point (at a chunk boundary too) all fail authentication. The key check also commits
the stream to one key, which neither AEAD does by itself.

Format `baqup-stream-v1` (read only since v2): a 32-byte header (b"BAQUPENC",
version 1, algorithm, chunk size uint32 BE, a 7-byte random nonce prefix, 11 zero
bytes), the same chunks under the configured key itself, nonce = prefix || counter
(uint32 BE) || final flag. `StreamEncryptor(..., version=1)` still writes it, for
the tests that prove old artifacts decrypt.

The symmetric key is 32 bytes, given as 64 hex characters or base64 in the secret
the schema names (by default `BAQUP_SECRET_ENCRYPTION_KEY`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import struct
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ConfigError, DataError
from .sealer import ChunkSealer
from .secret import Secret

if TYPE_CHECKING:
    from .age import AgeEncryptor, X25519Identity

MAGIC = b"BAQUPENC"
TAG_SIZE = 16
CHUNK_SIZE = 1024 * 1024
# A header names its chunk size; reading holds about three chunks, so the cap keeps
# decryption inside the memory bound (INTERFACE §11) whatever a header says.
MAX_CHUNK_SIZE = 8 * 1024 * 1024
ALGORITHM_IDS = {"aes-256-gcm": 1, "chacha20-poly1305": 2}
KEY_VARIABLE = "BAQUP_SECRET_ENCRYPTION_KEY"
IDENTITY_VARIABLE = "BAQUP_SECRET_AGE_IDENTITY"
RECIPIENTS_VARIABLE = "BAQUP_ARTIFACT_ENCRYPT_RECIPIENTS"
ALGORITHM_VARIABLE = "BAQUP_ARTIFACT_ENCRYPT_ALGORITHM"

FORMAT_V1 = "baqup-stream-v1"
FORMAT_V2 = "baqup-stream-v2"
FORMAT = FORMAT_V2  # what new symmetric artifacts get
V1_HEADER_SIZE = 32
V2_HEADER_SIZE = 62
SALT_SIZE = 32
KEY_CHECK_SIZE = 16
AGE_MAGIC = b"age-encryption.org/"
_PAYLOAD_INFO = b"baqup-stream-v2 payload key"
_CHECK_INFO = b"baqup-stream-v2 key check"


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
    raise ConfigError(f"{ALGORITHM_VARIABLE}: unknown algorithm {algorithm!r}")


def _derive(key: bytes, salt: bytes) -> tuple[bytes, bytes]:
    """(payload key, key check) of a v2 header's salt."""
    from cryptography.hazmat.primitives.hashes import SHA256
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    prk = hmac.digest(salt, key, "sha256")  # HKDF-Extract
    payload = HKDFExpand(SHA256(), 32, _PAYLOAD_INFO).derive(prk)
    check = HKDFExpand(SHA256(), KEY_CHECK_SIZE, _CHECK_INFO).derive(prk)
    return payload, check


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def _v1_nonce(prefix: bytes, counter: int, final: bool) -> bytes:
    if counter >= 2**32:
        raise DataError("artifact too large for one encrypted stream (2^32 chunks)")
    return prefix + struct.pack(">IB", counter, 1 if final else 0)


def _v2_nonce(counter: int, final: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


class StreamEncryptor(ChunkSealer):
    """Encrypts a stream chunk by chunk; `update` and `finalize` return ciphertext.

    Writes `baqup-stream-v2` (`version=1` writes the old format, for tests only).
    """

    def __init__(
        self, key: bytes, algorithm: str, chunk_size: int = CHUNK_SIZE, *, version: int = 2
    ) -> None:
        if algorithm not in ALGORITHM_IDS:
            raise ConfigError(f"{ALGORITHM_VARIABLE}: unknown algorithm {algorithm!r}")
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size {chunk_size} out of range")
        self.algorithm = algorithm
        self.chunk_size = chunk_size
        fields = struct.pack(">BBI", version, ALGORITHM_IDS[algorithm], chunk_size)
        if version == 1:
            self.format = FORMAT_V1
            self._prefix = os.urandom(7)
            self.header = MAGIC + fields + self._prefix + bytes(11)
            self._aead = _aead(algorithm, key)
        elif version == 2:
            self.format = FORMAT_V2
            salt = os.urandom(SALT_SIZE)
            payload_key, check = _derive(key, salt)
            self.header = MAGIC + fields + salt + check
            self._aead = _aead(algorithm, payload_key)
        else:
            raise ValueError(f"no stream format version {version}")
        self.suffix = ".enc"  # after the compression suffix: db.sql.zst.enc
        self._version = version
        super().__init__()

    @property
    def manifest(self) -> dict[str, object]:
        """The manifest's `encryption` object (capture adds the key id)."""
        return {"format": self.format, "algorithm": self.algorithm}

    def _seal(self, chunk: bytes | memoryview, final: bool) -> bytes:
        if self._version == 1:
            nonce = _v1_nonce(self._prefix, self._counter, final)
        else:
            nonce = _v2_nonce(self._counter, final)
        sealed: bytes = self._aead.encrypt(nonce, chunk, self.header)
        self._counter += 1
        return sealed

    def finalize(self) -> bytes:
        head = self._take_header()
        if len(self._pending) == self.chunk_size:
            body = self._seal(bytes(self._pending), final=False) + self._seal(b"", final=True)
        else:
            body = self._seal(bytes(self._pending), final=True)
        self._pending.clear()
        return head + body


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


class _Prefixed:
    """A reader that first gives back the bytes already read to detect the format."""

    def __init__(self, head: bytes, source: Readable) -> None:
        self._head = head
        self._source = source

    def read(self, size: int = -1, /) -> bytes:
        if self._head:
            if size < 0:
                data, self._head = self._head + self._source.read(), b""
                return data
            data, self._head = self._head[:size], self._head[size:]
            return data
        return self._source.read(size)


def _symmetric(source: Readable, key: bytes, magic: bytes) -> Iterator[bytes]:
    """Plaintext chunks of a v1 or v2 stream whose first 8 bytes (`magic`) were read."""
    version_byte = _read_full(source, 1)
    version = version_byte[0] if version_byte else None
    size = {1: V1_HEADER_SIZE, 2: V2_HEADER_SIZE}.get(version or 0)
    if size is None:
        if version is None:
            raise DataError("the encrypted stream is truncated in its header", code="TRUNCATED")
        raise DataError(
            f"unsupported encrypted stream version {version} (this baqup reads 1 and 2)",
            code="DECRYPTION_FAILED",
        )
    rest = _read_full(source, size - 9)
    header = magic + version_byte + rest
    if len(header) != size:
        raise DataError("the encrypted stream is truncated in its header", code="TRUNCATED")
    algorithm_id, chunk_size = struct.unpack(">BI", header[9:14])
    names = {v: k for k, v in ALGORITHM_IDS.items()}
    if algorithm_id not in names:
        raise DataError("unknown encryption algorithm in header", code="DECRYPTION_FAILED")
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise DataError("unsupported encrypted stream header", code="DECRYPTION_FAILED")
    if version == 1:
        if header[21:] != bytes(11):
            raise DataError("unsupported encrypted stream header", code="DECRYPTION_FAILED")
        prefix = header[14:21]
        aead = _aead(names[algorithm_id], key)

        def nonce(counter: int, final: bool) -> bytes:
            return _v1_nonce(prefix, counter, final)

    else:
        payload_key, check = _derive(key, header[14:46])
        if not hmac.compare_digest(check, header[46:62]):
            raise DataError(
                f"wrong key: {KEY_VARIABLE} is not the key this artifact was encrypted "
                "with (or its header is damaged)",
                code="DECRYPTION_FAILED",
            )
        aead = _aead(names[algorithm_id], payload_key)
        nonce = _v2_nonce
    return _chunks(source, aead, nonce, header, chunk_size)


def _chunks(
    source: Readable, aead: Any, nonce: Any, header: bytes, chunk_size: int
) -> Iterator[bytes]:
    from cryptography.exceptions import InvalidTag

    record = chunk_size + TAG_SIZE
    counter = 0
    while True:
        sealed = _read_full(source, record)
        final = len(sealed) < record
        if len(sealed) < TAG_SIZE:
            where = "at a chunk boundary" if not sealed else "inside a chunk"
            raise DataError(
                f"the encrypted stream is truncated {where} after chunk {counter} "
                "(a missing part or an interrupted copy)",
                code="TRUNCATED",
            )
        try:
            plain: bytes = aead.decrypt(nonce(counter, final), sealed, header)
        except InvalidTag:
            raise DataError(
                f"decryption failed at chunk {counter}: the stream is truncated or tampered "
                "with (or the key is wrong)",
                code="DECRYPTION_FAILED",
            ) from None
        counter += 1
        if plain:
            yield plain
        if final:
            if source.read(1):
                raise DataError("data after the final chunk", code="DECRYPTION_FAILED")
            return


def decrypt_stream(
    source: Readable,
    key: bytes | None = None,
    identities: Sequence[X25519Identity] = (),
) -> Iterator[bytes]:
    """Plaintext chunks of an encrypted artifact, v1, v2 or age, told by its first bytes.

    DataError (65) on any tampering, truncation, wrong or missing key; a chunk is
    handed out only once it has been authenticated.
    """
    magic = _read_full(source, len(MAGIC))
    if not magic:
        raise DataError("not an encrypted artifact: it is empty", code="TRUNCATED")
    if magic == MAGIC:
        if key is None:
            raise DataError(
                f"the artifact is encrypted with a symmetric key: set {KEY_VARIABLE}",
                code="DECRYPTION_FAILED",
            )
        return _symmetric(source, key, magic)
    if MAGIC.startswith(magic):
        raise DataError("the encrypted stream is truncated in its header", code="TRUNCATED")
    if AGE_MAGIC.startswith(magic) or magic.lstrip(b" \t\r\n")[:1] in (b"-", b""):
        from . import age

        if not identities:
            raise DataError(
                f"the artifact is an age file: set {IDENTITY_VARIABLE} (or give -i FILE)",
                code="DECRYPTION_FAILED",
            )
        return age.decrypt(_Prefixed(magic, source), identities)
    raise DataError(
        "not an encrypted artifact (neither a baqup stream nor an age file)",
        code="DECRYPTION_FAILED",
    )


def new_encryptor(
    key: bytes | None, algorithm: str | None, recipients: Sequence[str]
) -> StreamEncryptor | AgeEncryptor:
    """The encryptor a new artifact gets from the settings values.

    `algorithm` is None when BAQUP_ARTIFACT_ENCRYPT_ALGORITHM was not given. With
    recipients, age (payload ChaCha20-Poly1305, so an explicit aes-256-gcm is a
    ConfigError, and so is a symmetric key beside them: the agent must hold nothing
    that decrypts); else `baqup-stream-v2` under the key (aes-256-gcm by default).
    """
    if any(r.strip() for r in recipients):
        if algorithm is not None and algorithm != "chacha20-poly1305":
            raise ConfigError(
                f"{ALGORITHM_VARIABLE}={algorithm}: age recipients ({RECIPIENTS_VARIABLE}) "
                "encrypt with chacha20-poly1305 only; unset the algorithm or set "
                "chacha20-poly1305"
            )
        if key is not None:
            raise ConfigError(
                f"{RECIPIENTS_VARIABLE} and {KEY_VARIABLE} are both set: with recipients "
                f"the agent must hold no key that decrypts; unset {KEY_VARIABLE}"
            )
        from .age import AgeEncryptor, parse_recipients

        return AgeEncryptor(parse_recipients(recipients, RECIPIENTS_VARIABLE))
    if key is None:
        raise ConfigError(
            f"{KEY_VARIABLE}: BAQUP_ARTIFACT_ENCRYPT=true needs a 32-byte key here "
            f"(or age recipients in {RECIPIENTS_VARIABLE})"
        )
    return StreamEncryptor(key, algorithm or "aes-256-gcm")
