"""The `baqup-stream-v1` encryption format (encryption.py), pure.

Round trips at the sizes around the chunk boundaries; every kind of tampering (a
flipped bit anywhere, truncation anywhere, a dropped, swapped, duplicated or foreign
chunk, appended bytes, a wrong key, a wrong algorithm id) fails with DataError
DECRYPTION_FAILED; `parse_key` takes 32 bytes as hex or base64 and never echoes a key;
a hypothesis property for any plaintext and any single-byte change.
"""

from __future__ import annotations

import base64
import io
import os
import struct
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baqup_supervisor.contract import ExitCode
from baqup_supervisor.encryption import (
    ALGORITHM_IDS,
    FORMAT_V1,
    MAGIC,
    TAG_SIZE,
    V1_HEADER_SIZE,
    StreamEncryptor,
    decrypt_stream,
    parse_key,
)
from baqup_supervisor.errors import ConfigError, DataError
from baqup_supervisor.secret import Secret

CHUNK = 1024
HEADER_SIZE = V1_HEADER_SIZE  # v1 is written here only to prove the reader (v2: test_encryption_v2)
ALGORITHMS = sorted(ALGORITHM_IDS)
KEY = bytes.fromhex("8f" * 8 + "00112233445566778899aabbccddeeff" + "a5" * 8)
OTHER_KEY = bytes(reversed(KEY))


def encrypt(
    plaintext: bytes,
    algorithm: str = "aes-256-gcm",
    *,
    key: bytes = KEY,
    chunk_size: int = CHUNK,
    pieces: Iterable[int] | None = None,
) -> bytes:
    """Encrypt, feeding `update` the plaintext in pieces of the given sizes (else whole)."""
    encryptor = StreamEncryptor(key, algorithm, chunk_size=chunk_size, version=1)
    out = []
    offset = 0
    for size in pieces or [len(plaintext)]:
        out.append(encryptor.update(plaintext[offset : offset + size]))
        offset += size
    out.append(encryptor.update(plaintext[offset:]))
    out.append(encryptor.finalize())
    return b"".join(out)


def decrypt(ciphertext: bytes, key: bytes = KEY) -> bytes:
    return b"".join(decrypt_stream(io.BytesIO(ciphertext), key))


def assert_rejected(ciphertext: bytes, key: bytes = KEY) -> DataError:
    with pytest.raises(DataError) as caught:
        decrypt(ciphertext, key)
    # TRUNCATED where the data visibly stops early (no room left for a tag)
    assert caught.value.code in ("DECRYPTION_FAILED", "TRUNCATED"), caught.value.message
    assert caught.value.exit_code == ExitCode.DATA_ERROR
    return caught.value


def records(ciphertext: bytes, chunk_size: int = CHUNK) -> tuple[bytes, list[bytes]]:
    """(header, sealed chunks) of a ciphertext."""
    size = chunk_size + TAG_SIZE
    body = ciphertext[HEADER_SIZE:]
    return ciphertext[:HEADER_SIZE], [body[i : i + size] for i in range(0, len(body), size)]


def chunk_count(length: int, chunk_size: int = CHUNK) -> int:
    """Full chunks, then always one final chunk (empty when the length is a multiple)."""
    return length // chunk_size + 1


PLAINTEXT = bytes((i * 37 + 11) % 251 for i in range(3 * CHUNK + 100))  # 3 full + 100


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    "size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK], ids=lambda n: f"{n}B"
)
@pytest.mark.parametrize("feeding", ["whole", "bytewise", "odd-pieces"])
def test_round_trip(algorithm: str, size: int, feeding: str) -> None:
    plaintext = os.urandom(size)
    pieces: list[int] | None = None
    if feeding == "bytewise":
        pieces = [1] * size
    elif feeding == "odd-pieces":
        pieces = [7, 1000, 1, CHUNK, 333] * 2
    ciphertext = encrypt(plaintext, algorithm, pieces=pieces)
    assert decrypt(ciphertext) == plaintext
    assert len(ciphertext) == HEADER_SIZE + chunk_count(size) * TAG_SIZE + size
    header = ciphertext[:HEADER_SIZE]
    assert header.startswith(MAGIC)
    version, algorithm_id, chunk_size = struct.unpack(">BBI", header[8:14])
    assert (version, algorithm_id, chunk_size) == (1, ALGORITHM_IDS[algorithm], CHUNK)
    assert header[21:] == bytes(11)
    if size >= 16:
        assert plaintext not in ciphertext


def test_format_name_and_fresh_nonces() -> None:
    assert FORMAT_V1 == "baqup-stream-v1"
    first, second = encrypt(PLAINTEXT), encrypt(PLAINTEXT)
    assert first != second  # a random nonce prefix per stream
    assert first[14:21] != second[14:21]
    assert decrypt(first) == decrypt(second) == PLAINTEXT


def test_default_chunk_size_round_trips() -> None:
    plaintext = os.urandom(1024 * 1024 + 5)
    encryptor = StreamEncryptor(KEY, "chacha20-poly1305", version=1)
    ciphertext = encryptor.update(plaintext) + encryptor.finalize()
    assert decrypt(ciphertext) == plaintext


# --- tampering ----------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_flipped_bit_anywhere_is_detected(algorithm: str) -> None:
    ciphertext = encrypt(PLAINTEXT, algorithm)
    _, sealed = records(ciphertext)
    assert len(sealed) == 4
    for position in range(len(ciphertext)):
        tampered = bytearray(ciphertext)
        tampered[position] ^= 1 << (position % 8)
        assert_rejected(bytes(tampered))


@pytest.mark.parametrize(
    "where",
    [
        "magic",
        "version",
        "algorithm",
        "chunk-size",
        "nonce-prefix",
        "reserved",
        "chunk0-body",
        "chunk0-tag",
        "chunk2-body",
        "final-body",
        "final-tag",
    ],
)
def test_a_flipped_bit_in_each_part_is_detected(where: str) -> None:
    ciphertext = encrypt(PLAINTEXT)
    record = CHUNK + TAG_SIZE
    final = HEADER_SIZE + 3 * record
    position = {
        "magic": 0,
        "version": 8,
        "algorithm": 9,
        "chunk-size": 13,
        "nonce-prefix": 17,
        "reserved": 31,
        "chunk0-body": HEADER_SIZE + 10,
        "chunk0-tag": HEADER_SIZE + CHUNK + 3,
        "chunk2-body": HEADER_SIZE + 2 * record + 500,
        "final-body": final + 50,
        "final-tag": len(ciphertext) - 1,
    }[where]
    tampered = bytearray(ciphertext)
    tampered[position] ^= 0x80
    assert_rejected(bytes(tampered))


def test_truncation_anywhere_is_detected() -> None:
    ciphertext = encrypt(PLAINTEXT)
    for length in range(len(ciphertext)):
        assert_rejected(ciphertext[:length])


@pytest.mark.parametrize(
    "length",
    [
        0,
        HEADER_SIZE,  # header only
        HEADER_SIZE + (CHUNK + TAG_SIZE),  # after chunk 0
        HEADER_SIZE + 2 * (CHUNK + TAG_SIZE),  # after chunk 1
        HEADER_SIZE + 3 * (CHUNK + TAG_SIZE),  # after the last full chunk
        HEADER_SIZE + 3 * (CHUNK + TAG_SIZE) + TAG_SIZE,  # mid final chunk
        HEADER_SIZE + 500,  # mid chunk 0
        HEADER_SIZE + CHUNK,  # chunk 0 without its tag
    ],
    ids=lambda n: f"{n}B",
)
def test_truncation_at_chunk_boundaries_and_mid_chunk(length: int) -> None:
    ciphertext = encrypt(PLAINTEXT)
    assert_rejected(ciphertext[:length])


def test_truncation_of_a_stream_ending_on_a_chunk_boundary() -> None:
    # 2 full chunks + an empty final one: cutting the empty final chunk must fail
    ciphertext = encrypt(PLAINTEXT[: 2 * CHUNK])
    header, sealed = records(ciphertext)
    assert [len(r) for r in sealed] == [CHUNK + TAG_SIZE, CHUNK + TAG_SIZE, TAG_SIZE]
    assert_rejected(header + sealed[0] + sealed[1])
    assert_rejected(header + sealed[0])


@pytest.mark.parametrize("index", range(4))
def test_a_dropped_chunk_is_detected(index: int) -> None:
    header, sealed = records(encrypt(PLAINTEXT))
    assert_rejected(header + b"".join(sealed[:index] + sealed[index + 1 :]))


@pytest.mark.parametrize(("a", "b"), [(0, 1), (1, 2), (0, 2), (2, 3)])
def test_swapped_chunks_are_detected(a: int, b: int) -> None:
    header, sealed = records(encrypt(PLAINTEXT))
    sealed[a], sealed[b] = sealed[b], sealed[a]
    assert_rejected(header + b"".join(sealed))


@pytest.mark.parametrize("index", range(4))
def test_a_duplicated_chunk_is_detected(index: int) -> None:
    header, sealed = records(encrypt(PLAINTEXT))
    assert_rejected(header + b"".join(sealed[: index + 1] + sealed[index:]))


def test_a_chunk_from_another_stream_is_detected() -> None:
    header, sealed = records(encrypt(PLAINTEXT))
    _, foreign = records(encrypt(PLAINTEXT))  # same key, same plaintext, other nonces
    assert_rejected(header + sealed[0] + foreign[1] + sealed[2] + sealed[3])
    assert_rejected(header + b"".join(foreign))


@pytest.mark.parametrize(
    "garbage", [b"\x00", b"x" * TAG_SIZE, b"y" * (CHUNK + TAG_SIZE)], ids=["1B", "tag", "record"]
)
def test_appended_garbage_is_detected(garbage: bytes) -> None:
    assert_rejected(encrypt(PLAINTEXT) + garbage)


def test_an_appended_copy_of_the_final_chunk_is_detected() -> None:
    header, sealed = records(encrypt(PLAINTEXT))
    assert_rejected(header + b"".join(sealed) + sealed[-1])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("size", [0, 10, 3 * CHUNK + 100])
def test_a_wrong_key_is_detected(algorithm: str, size: int) -> None:
    assert_rejected(encrypt(PLAINTEXT[:size], algorithm), key=OTHER_KEY)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("algorithm_id", [0, 1, 2, 3, 255])
def test_a_wrong_algorithm_id_is_detected(algorithm: str, algorithm_id: int) -> None:
    ciphertext = bytearray(encrypt(PLAINTEXT, algorithm))
    if algorithm_id == ALGORITHM_IDS[algorithm]:
        assert decrypt(bytes(ciphertext)) == PLAINTEXT
        return
    ciphertext[9] = algorithm_id
    assert_rejected(bytes(ciphertext))


def test_not_an_encrypted_stream() -> None:
    assert_rejected(b"")
    assert_rejected(b"plain text, never encrypted" * 10)
    assert_rejected(b"\x28\xb5\x2f\xfd" + bytes(60))  # a zstd frame's magic


def test_plaintext_before_the_tampering_is_never_the_whole_stream() -> None:
    # streaming decryption may hand out verified chunks before it finds a later fault,
    # but it must always end in an error, never in a clean end of stream
    header, sealed = records(encrypt(PLAINTEXT))
    chunks = decrypt_stream(io.BytesIO(header + b"".join(sealed[:3])), KEY)
    got: list[bytes] = []
    with pytest.raises(DataError) as caught:
        got.extend(chunks)
    assert caught.value.code == "TRUNCATED"
    assert b"".join(got) == PLAINTEXT[: len(b"".join(got))]


# --- parse_key ----------------------------------------------------------------------------

# a key whose standard base64 has both '+' and '/', so std and urlsafe differ
B64_KEY = bytes.fromhex("fbeffbeffbeffbeffbeffbeffbeffbeffbeffbeffbeffbeffbeffbeffbeffbef")


def test_the_base64_key_exercises_both_alphabets() -> None:
    std = base64.b64encode(B64_KEY).decode()
    assert "+" in std
    assert "/" in std
    assert std.endswith("=")


@pytest.mark.parametrize(
    "text",
    [
        B64_KEY.hex(),
        B64_KEY.hex().upper(),
        f"  {B64_KEY.hex()}\n",
        base64.b64encode(B64_KEY).decode(),
        base64.b64encode(B64_KEY).decode().rstrip("="),
        base64.urlsafe_b64encode(B64_KEY).decode(),
        base64.urlsafe_b64encode(B64_KEY).decode().rstrip("="),
    ],
    ids=["hex", "HEX", "hex-whitespace", "b64", "b64-nopad", "urlsafe", "urlsafe-nopad"],
)
def test_parse_key_accepts(text: str) -> None:
    assert parse_key(Secret(text)) == B64_KEY


def test_parse_key_accepts_a_key_that_is_all_hex_digits() -> None:
    key = bytes(range(32))
    assert parse_key(Secret(key.hex())) == key


REJECTED = {
    "hex-31-bytes": bytes(range(1, 32)).hex(),
    "hex-33-bytes": bytes(range(1, 34)).hex(),
    "hex-63-chars": B64_KEY.hex()[:63],
    "hex-65-chars": B64_KEY.hex() + "a",
    "b64-16-bytes": base64.b64encode(b"0123456789abcdef").decode(),
    "b64-33-bytes": base64.b64encode(B64_KEY + b"!").decode(),
    "b64-31-bytes": base64.urlsafe_b64encode(B64_KEY[:31]).decode(),
    "not-encoded": "correct horse battery staple, obviously",
    "bad-hex-64": "zz" + B64_KEY.hex()[2:],
    "passphrase": "hunter2",
}


@pytest.mark.parametrize("text", REJECTED.values(), ids=REJECTED.keys())
def test_parse_key_rejects_without_echoing_the_key(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_key(Secret(text))
    message = str(caught.value)
    assert caught.value.exit_code == ExitCode.USAGE_CONFIG_ERROR
    assert "BAQUP_SECRET_ENCRYPTION_KEY" in message
    assert text not in message
    assert text[:8] not in message
    assert text[-8:] not in message


@pytest.mark.parametrize(
    "secret", [None, Secret(""), Secret("   ")], ids=["none", "empty", "blank"]
)
def test_parse_key_rejects_a_missing_key(secret: Secret | None) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_key(secret)
    assert "BAQUP_SECRET_ENCRYPTION_KEY" in str(caught.value)


def test_parse_key_names_the_variable_it_was_given() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_key(Secret("short"), "BAQUP_SECRET_OTHER_KEY")
    assert "BAQUP_SECRET_OTHER_KEY" in str(caught.value)
    assert "short" not in str(caught.value)


# --- properties -----------------------------------------------------------------------------


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
    assert len(ciphertext) == (
        HEADER_SIZE + chunk_count(len(plaintext), chunk_size) * TAG_SIZE + len(plaintext)
    )
    position = data.draw(st.integers(0, len(ciphertext) - 1), label="position")
    delta = data.draw(st.integers(1, 255), label="xor")
    tampered = bytearray(ciphertext)
    tampered[position] ^= delta
    assert_rejected(bytes(tampered))
