"""`baqup-stream-v2` (encryption.py): the per-artifact key, old artifacts, the one door.

The header is checked byte by byte against the module docstring and a chunk is opened
with `cryptography` alone from that description; each artifact gets a fresh salt and
so a fresh key; every kind of damage fails with DataError (65) and no plaintext of a
chunk that failed to authenticate is handed out; v1 artifacts written by the v1
writer before v2 existed (tests/data/encryption-v1) still decrypt; `new_encryptor`
picks v2 or age from the settings values and `decrypt_stream` tells v1, v2 and age
apart by their first bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baqup_supervisor import age
from baqup_supervisor.contract import ExitCode
from baqup_supervisor.encryption import (
    ALGORITHM_IDS,
    FORMAT,
    MAGIC,
    TAG_SIZE,
    V2_HEADER_SIZE,
    StreamEncryptor,
    decrypt_stream,
    new_encryptor,
)
from baqup_supervisor.errors import ConfigError, DataError

CHUNK = 1024
HEADER = V2_HEADER_SIZE
RECORD = CHUNK + TAG_SIZE
ALGORITHMS = sorted(ALGORITHM_IDS)
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
PLAINTEXT = bytes((i * 37 + 11) % 251 for i in range(3 * CHUNK + 100))  # 3 full + 100
V1_DATA = Path(__file__).parent / "data" / "encryption-v1"
# the identity of the age spec's example (C2SP age.md), and its recipient
SPEC_IDENTITY = "AGE-SECRET-KEY-1GFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPQ4EGAEX"
SPEC_RECIPIENT = "age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwj"


def encrypt(
    plaintext: bytes,
    algorithm: str = "aes-256-gcm",
    *,
    key: bytes = KEY,
    chunk_size: int = CHUNK,
    pieces: list[int] | None = None,
) -> bytes:
    encryptor = StreamEncryptor(key, algorithm, chunk_size=chunk_size)
    out = []
    offset = 0
    for size in pieces or []:
        out.append(encryptor.update(plaintext[offset : offset + size]))
        offset += size
    out.append(encryptor.update(plaintext[offset:]))
    out.append(encryptor.finalize())
    return b"".join(out)


def decrypt(ciphertext: bytes, key: bytes | None = KEY) -> bytes:
    return b"".join(decrypt_stream(io.BytesIO(ciphertext), key))


def rejected(ciphertext: bytes, key: bytes = KEY) -> DataError:
    with pytest.raises(DataError) as caught:
        decrypt(ciphertext, key)
    assert caught.value.exit_code == ExitCode.DATA_ERROR
    assert caught.value.code in ("DECRYPTION_FAILED", "TRUNCATED"), caught.value.message
    return caught.value


def records(ciphertext: bytes) -> tuple[bytes, list[bytes]]:
    body = ciphertext[HEADER:]
    return ciphertext[:HEADER], [body[i : i + RECORD] for i in range(0, len(body), RECORD)]


def hkdf(salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(SHA256(), length, salt, info).derive(KEY)


# --- the format, as documented ----------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_header_byte_by_byte(algorithm: str) -> None:
    ciphertext = encrypt(PLAINTEXT, algorithm)
    header = ciphertext[:HEADER]
    assert header[0:8] == MAGIC == b"BAQUPENC"
    assert header[8] == 2
    assert header[9] == {"aes-256-gcm": 1, "chacha20-poly1305": 2}[algorithm]
    assert struct.unpack(">I", header[10:14]) == (CHUNK,)
    salt = header[14:46]
    assert header[46:62] == hkdf(salt, b"baqup-stream-v2 key check", 16)
    assert len(ciphertext) == HEADER + 4 * TAG_SIZE + len(PLAINTEXT)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_chunks_open_with_the_documented_key_and_nonces(algorithm: str) -> None:
    # decrypted here from the docstring's description alone, not through the module
    ciphertext = encrypt(PLAINTEXT, algorithm)
    header, sealed = records(ciphertext)
    payload_key = hkdf(header[14:46], b"baqup-stream-v2 payload key", 32)
    aead: Any = AESGCM(payload_key) if algorithm == "aes-256-gcm" else ChaCha20Poly1305(payload_key)
    plain = b""
    for index, record in enumerate(sealed):
        final = index == len(sealed) - 1
        nonce = index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")
        plain += aead.decrypt(nonce, record, header)
    assert plain == PLAINTEXT


def test_format_and_manifest() -> None:
    assert FORMAT == "baqup-stream-v2"
    encryptor = StreamEncryptor(KEY, "chacha20-poly1305")
    assert encryptor.format == FORMAT
    assert encryptor.suffix == ".enc"
    assert encryptor.manifest == {"format": "baqup-stream-v2", "algorithm": "chacha20-poly1305"}


def test_each_artifact_gets_its_own_salt_and_key() -> None:
    first, second = encrypt(PLAINTEXT), encrypt(PLAINTEXT)
    assert first[14:46] != second[14:46]
    assert first[46:62] != second[46:62]  # the key check differs with the key
    # same key, same plaintext, same nonces: different ciphertext only under another key
    assert records(first)[1][0] != records(second)[1][0]
    assert decrypt(first) == decrypt(second) == PLAINTEXT


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    "size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK], ids=lambda n: f"{n}B"
)
@pytest.mark.parametrize("feeding", ["whole", "bytewise", "odd-pieces"])
def test_round_trip(algorithm: str, size: int, feeding: str) -> None:
    plaintext = os.urandom(size)
    pieces = {"whole": None, "bytewise": [1] * size, "odd-pieces": [7, 1000, 1, CHUNK, 333] * 2}
    ciphertext = encrypt(plaintext, algorithm, pieces=pieces[feeding])
    assert decrypt(ciphertext) == plaintext
    assert len(ciphertext) == HEADER + (size // CHUNK + 1) * TAG_SIZE + size


def test_the_default_chunk_size_round_trips() -> None:
    plaintext = os.urandom(1024 * 1024 + 5)
    encryptor = StreamEncryptor(KEY, "aes-256-gcm")
    ciphertext = encryptor.update(plaintext) + encryptor.finalize()
    assert struct.unpack(">I", ciphertext[10:14]) == (1024 * 1024,)
    assert decrypt(ciphertext) == plaintext


# --- damage -------------------------------------------------------------------------------------


def test_a_wrong_key_fails_on_the_key_check_and_says_so() -> None:
    error = rejected(encrypt(PLAINTEXT), key=OTHER_KEY)
    assert error.code == "DECRYPTION_FAILED"
    assert "wrong key" in error.message
    assert "BAQUP_SECRET_ENCRYPTION_KEY" in error.message
    assert OTHER_KEY.hex() not in error.message


def test_a_flipped_bit_anywhere_is_detected() -> None:
    ciphertext = encrypt(PLAINTEXT[: 2 * CHUNK + 10], "chacha20-poly1305")
    for position in range(len(ciphertext)):
        tampered = bytearray(ciphertext)
        tampered[position] ^= 1 << (position % 8)
        rejected(bytes(tampered))


def test_truncation_anywhere_is_detected_and_named() -> None:
    ciphertext = encrypt(PLAINTEXT)
    for length in range(len(ciphertext)):
        error = rejected(ciphertext[:length])
        if length < HEADER or (length - HEADER) % RECORD < TAG_SIZE:
            assert error.code == "TRUNCATED", (length, error.message)


@pytest.mark.parametrize("index", range(4))
def test_a_dropped_chunk_is_detected(index: int) -> None:
    header, sealed = records(encrypt(PLAINTEXT))
    rejected(header + b"".join(sealed[:index] + sealed[index + 1 :]))


@pytest.mark.parametrize(("a", "b"), [(0, 1), (1, 2), (2, 3)])
def test_swapped_chunks_are_detected(a: int, b: int) -> None:
    header, sealed = records(encrypt(PLAINTEXT))
    sealed[a], sealed[b] = sealed[b], sealed[a]
    rejected(header + b"".join(sealed))


def test_a_chunk_from_another_artifact_under_the_same_key_is_detected() -> None:
    header, sealed = records(encrypt(PLAINTEXT))
    _, foreign = records(encrypt(PLAINTEXT))
    rejected(header + sealed[0] + foreign[1] + sealed[2] + sealed[3])


@pytest.mark.parametrize("garbage", [b"\x00", b"x" * TAG_SIZE, b"y" * RECORD])
def test_appended_garbage_is_detected(garbage: bytes) -> None:
    rejected(encrypt(PLAINTEXT) + garbage)


def test_no_plaintext_of_a_failed_chunk_is_handed_out() -> None:
    header, sealed = records(encrypt(PLAINTEXT))
    damaged = bytearray(sealed[2])
    damaged[5] ^= 1
    chunks = decrypt_stream(io.BytesIO(header + sealed[0] + sealed[1] + damaged + sealed[3]), KEY)
    got: list[bytes] = []
    with pytest.raises(DataError) as caught:
        got.extend(chunks)
    assert caught.value.code == "DECRYPTION_FAILED"
    assert "chunk 2" in caught.value.message
    assert got == [PLAINTEXT[:CHUNK], PLAINTEXT[CHUNK : 2 * CHUNK]]


@pytest.mark.parametrize(("where", "value"), [(8, 3), (8, 0), (9, 0), (9, 3), (10, 0xFF)])
def test_unsupported_header_fields_are_refused(where: int, value: int) -> None:
    tampered = bytearray(encrypt(PLAINTEXT))
    tampered[where] = value
    assert rejected(bytes(tampered)).code == "DECRYPTION_FAILED"


# --- v1 artifacts written before v2 --------------------------------------------------------------

V1_CASES = json.loads((V1_DATA / "cases.json").read_text())


@pytest.mark.parametrize("case", V1_CASES["cases"], ids=lambda c: c["file"])
def test_v1_artifacts_still_decrypt(case: dict[str, Any]) -> None:
    key = bytes.fromhex(V1_CASES["key_hex"])
    data = (V1_DATA / case["file"]).read_bytes()
    assert data[8] == 1  # really v1
    plain = decrypt(data, key)
    expected = bytes((i * 37 + 11) % 251 for i in range(case["plaintext_size"]))
    assert plain == expected
    assert hashlib.sha256(plain).hexdigest() == case["plaintext_sha256"]
    tampered = bytearray(data)
    tampered[-1] ^= 1
    rejected(bytes(tampered), key)
    rejected(data, OTHER_KEY)


# --- new_encryptor and decrypt_stream: the one door ---------------------------------------------


def test_new_encryptor_with_a_key_writes_v2() -> None:
    default = new_encryptor(KEY, None, [])
    assert isinstance(default, StreamEncryptor)
    assert default.manifest == {"format": "baqup-stream-v2", "algorithm": "aes-256-gcm"}
    chacha = new_encryptor(KEY, "chacha20-poly1305", [])
    assert chacha.manifest == {"format": "baqup-stream-v2", "algorithm": "chacha20-poly1305"}
    ciphertext = chacha.update(PLAINTEXT) + chacha.finalize()
    assert decrypt(ciphertext) == PLAINTEXT


@pytest.mark.parametrize("algorithm", [None, "chacha20-poly1305"])
def test_new_encryptor_with_recipients_writes_age(algorithm: str | None) -> None:
    encryptor = new_encryptor(None, algorithm, [SPEC_RECIPIENT, f" {SPEC_RECIPIENT} "])
    assert isinstance(encryptor, age.AgeEncryptor)
    assert encryptor.manifest == {"format": "age-encryption.org/v1", "recipients": [SPEC_RECIPIENT]}
    assert encryptor.algorithm == "chacha20-poly1305"
    assert encryptor.suffix == ".age"
    ciphertext = encryptor.update(PLAINTEXT) + encryptor.finalize()
    identities = age.parse_identities(SPEC_IDENTITY, "BAQUP_SECRET_AGE_IDENTITY")
    assert b"".join(decrypt_stream(io.BytesIO(ciphertext), identities=identities)) == PLAINTEXT


@pytest.mark.parametrize(
    ("key", "algorithm", "recipients", "named"),
    [
        (None, "aes-256-gcm", [SPEC_RECIPIENT], "BAQUP_ARTIFACT_ENCRYPT_ALGORITHM"),
        (KEY, None, [SPEC_RECIPIENT], "BAQUP_SECRET_ENCRYPTION_KEY"),
        (None, None, [], "BAQUP_SECRET_ENCRYPTION_KEY"),
        (None, None, ["", " "], "BAQUP_SECRET_ENCRYPTION_KEY"),
        (None, None, ["age1notarecipient"], "BAQUP_ARTIFACT_ENCRYPT_RECIPIENTS"),
        (KEY, "rot13", [], "BAQUP_ARTIFACT_ENCRYPT_ALGORITHM"),
    ],
    ids=[
        "recipients-with-aes",
        "recipients-and-key",
        "nothing",
        "blank-recipients",
        "bad-recipient",
        "bad-algorithm",
    ],
)
def test_new_encryptor_refuses_bad_settings(
    key: bytes | None, algorithm: str | None, recipients: list[str], named: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        new_encryptor(key, algorithm, recipients)
    assert caught.value.exit_code == ExitCode.USAGE_CONFIG_ERROR
    assert named in caught.value.message


def test_decrypt_stream_tells_the_formats_apart() -> None:
    v1_case = V1_CASES["cases"][2]
    v1 = (V1_DATA / v1_case["file"]).read_bytes()
    v1_plain = decrypt(v1, bytes.fromhex(V1_CASES["key_hex"]))
    assert len(v1_plain) == v1_case["plaintext_size"]
    assert decrypt(encrypt(PLAINTEXT)) == PLAINTEXT
    identities = age.parse_identities(SPEC_IDENTITY, "id")
    sealed = age.AgeEncryptor(age.parse_recipients([SPEC_RECIPIENT], "r"))
    aged = sealed.update(PLAINTEXT) + sealed.finalize()
    both = decrypt_stream(io.BytesIO(aged), KEY, identities)
    assert b"".join(both) == PLAINTEXT


@pytest.mark.parametrize(
    ("data", "code", "says"),
    [
        (b"", "TRUNCATED", "empty"),
        (b"BAQUPE", "TRUNCATED", "truncated"),
        (b"BAQUPENC\x02\x01", "TRUNCATED", "truncated"),
        (b"\x28\xb5\x2f\xfd" + bytes(60), "DECRYPTION_FAILED", "not an encrypted artifact"),
        (b"plain text" * 10, "DECRYPTION_FAILED", "not an encrypted artifact"),
    ],
    ids=["empty", "short-magic", "short-header", "zstd", "text"],
)
def test_decrypt_stream_refuses_what_is_not_an_artifact(data: bytes, code: str, says: str) -> None:
    with pytest.raises(DataError) as caught:
        decrypt(data)
    assert caught.value.code == code
    assert says in caught.value.message


def test_a_missing_key_or_identity_names_the_variable() -> None:
    with pytest.raises(DataError) as caught:
        decrypt(encrypt(PLAINTEXT), key=None)
    assert "BAQUP_SECRET_ENCRYPTION_KEY" in caught.value.message
    sealed = age.AgeEncryptor(age.parse_recipients([SPEC_RECIPIENT], "r"))
    with pytest.raises(DataError) as caught:
        decrypt(sealed.update(b"x") + sealed.finalize(), key=KEY)
    assert "BAQUP_SECRET_AGE_IDENTITY" in caught.value.message


# --- a property ----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plaintext=st.binary(max_size=4 * 97 + 3),
    algorithm=st.sampled_from(ALGORITHMS),
    chunk_size=st.sampled_from([1, 16, 97, 1024]),
    data=st.data(),
)
def test_any_plaintext_round_trips_and_any_byte_change_is_detected(
    plaintext: bytes, algorithm: str, chunk_size: int, data: st.DataObject
) -> None:
    pieces = data.draw(st.lists(st.integers(0, 200), max_size=8), label="pieces")
    ciphertext = encrypt(plaintext, algorithm, chunk_size=chunk_size, pieces=pieces)
    assert decrypt(ciphertext) == plaintext
    position = data.draw(st.integers(0, len(ciphertext) - 1), label="position")
    tampered = bytearray(ciphertext)
    tampered[position] ^= data.draw(st.integers(1, 255), label="xor")
    rejected(bytes(tampered))
