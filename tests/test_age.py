"""age v1 (age.py) against Debian's `age` binary, both ways, and under damage.

Our files open with `age -d -i KEY` (one recipient or several, every size around the
64 KiB chunk); files from `age -r` (binary and `-a` armor, several recipients) open
with our reader; a wrong identity, a flipped bit anywhere in the header or payload,
a cut at any chunk boundary or inside one, reordered, dropped or duplicated chunks
all fail loudly, in our reader and in age's, and our reader hands out only chunks
that authenticated. Recipients and identities parse with clear ConfigErrors (64)
that never show an identity. The spec's own example key pair anchors the Bech32 and
X25519 code.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baqup_supervisor import age
from baqup_supervisor.bech32 import bech32_decode, bech32_encode
from baqup_supervisor.contract import ExitCode
from baqup_supervisor.encryption import decrypt_stream
from baqup_supervisor.errors import ConfigError, DataError

CHUNK = age.CHUNK_SIZE
RECORD = age.RECORD_SIZE
SPEC_IDENTITY = "AGE-SECRET-KEY-1GFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPQ4EGAEX"
SPEC_RECIPIENT = "age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwj"
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 12345]


class Key:
    """A key pair made by age-keygen: the identity file and its recipient."""

    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / f"{name}.txt"
        subprocess.run(["age-keygen", "-o", str(self.path)], check=True, capture_output=True)
        self.recipient = subprocess.run(
            ["age-keygen", "-y", str(self.path)], check=True, capture_output=True, text=True
        ).stdout.strip()
        self.identities = age.parse_identities(self.path.read_text(), str(self.path))
        self.secret = next(
            line for line in self.path.read_text().splitlines() if line.startswith("AGE-")
        )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[Key]:
    directory = tmp_path_factory.mktemp("age-keys")
    return [Key(directory, f"key{i}") for i in range(3)]


def ours(plaintext: bytes, *recipients: str, pieces: int = 10000) -> bytes:
    encryptor = age.AgeEncryptor(age.parse_recipients(recipients, "test"))
    out = [encryptor.update(plaintext[i : i + pieces]) for i in range(0, len(plaintext), pieces)]
    return b"".join([*out, encryptor.finalize()])


def theirs(plaintext: bytes, *recipients: str, armor: bool = False) -> bytes:
    args = ["age", "-e", *(["-a"] if armor else [])]
    for recipient in recipients:
        args += ["-r", recipient]
    return subprocess.run(args, input=plaintext, check=True, capture_output=True).stdout


def age_decrypt(data: bytes, key: Key) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["age", "-d", "-i", str(key.path)], input=data, capture_output=True, check=False
    )


def read(data: bytes, key: Key) -> bytes:
    return b"".join(decrypt_stream(io.BytesIO(data), identities=key.identities))


def rejected(data: bytes, key: Key) -> tuple[DataError, list[bytes]]:
    """Our reader's error and the chunks it handed out before it."""
    got: list[bytes] = []
    with pytest.raises(DataError) as caught:
        got.extend(decrypt_stream(io.BytesIO(data), identities=key.identities))
    assert caught.value.exit_code == ExitCode.DATA_ERROR
    assert caught.value.code in ("DECRYPTION_FAILED", "TRUNCATED"), caught.value.message
    return caught.value, got


def payload_start(data: bytes) -> int:
    return data.index(b"\n---") + len(b"\n--- ") + 43 + 1 + age.NONCE_SIZE


def plaintext_of(size: int) -> bytes:
    return os.urandom(size)


# --- both ways with the age binary ----------------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=lambda n: f"{n}B")
def test_our_files_open_with_age(keys: list[Key], size: int) -> None:
    plaintext = plaintext_of(size)
    data = ours(plaintext, keys[0].recipient)
    assert data.startswith(b"age-encryption.org/v1\n-> X25519 ")
    done = age_decrypt(data, keys[0])
    assert done.returncode == 0, done.stderr
    assert done.stdout == plaintext
    body = len(data) - payload_start(data)
    assert body == size + max(1, -(-size // CHUNK)) * age.TAG_SIZE  # no empty last chunk


@pytest.mark.parametrize("size", SIZES, ids=lambda n: f"{n}B")
@pytest.mark.parametrize("armor", [False, True], ids=["binary", "armor"])
def test_age_files_open_with_our_reader(keys: list[Key], size: int, armor: bool) -> None:
    plaintext = plaintext_of(size)
    data = theirs(plaintext, keys[1].recipient, armor=armor)
    assert data.startswith(b"-----BEGIN AGE" if armor else b"age-encryption.org/v1\n")
    assert read(data, keys[1]) == plaintext


def test_several_recipients_both_ways(keys: list[Key]) -> None:
    plaintext = plaintext_of(2 * CHUNK + 7)
    recipients = [k.recipient for k in keys]
    mine = ours(plaintext, *recipients)
    assert mine.count(b"\n-> X25519 ") == 3
    their = theirs(plaintext, *recipients)
    for key in keys:
        done = age_decrypt(mine, key)
        assert done.returncode == 0, done.stderr
        assert done.stdout == plaintext
        assert read(their, key) == plaintext
        assert read(mine, key) == plaintext


def test_the_spec_example_key_pair() -> None:
    (identity,) = age.parse_identities(SPEC_IDENTITY, "id")
    assert str(identity.recipient) == SPEC_RECIPIENT
    assert SPEC_IDENTITY not in repr(identity)
    (recipient,) = age.parse_recipients([SPEC_RECIPIENT], "r")
    assert recipient.public == identity.recipient.public
    assert bech32_encode("AGE-SECRET-KEY-", bytes(range(32))).startswith("AGE-SECRET-KEY-1")


def test_identities_read_like_an_identity_file(keys: list[Key]) -> None:
    # age-keygen's file has comment lines; several identities, blank lines, CRLF
    text = "\r\n".join([keys[0].path.read_text(), "", f"  {keys[2].secret}  ", "# end"])
    identities = age.parse_identities(text, "file")
    assert [str(i.recipient) for i in identities] == [keys[0].recipient, keys[2].recipient]
    data = theirs(b"hello", keys[2].recipient)
    assert b"".join(decrypt_stream(io.BytesIO(data), identities=identities)) == b"hello"


# --- failing loudly ----------------------------------------------------------------------------


def test_a_wrong_identity_fails_both_ways(keys: list[Key]) -> None:
    plaintext = plaintext_of(1000)
    mine = ours(plaintext, keys[0].recipient)
    assert age_decrypt(mine, keys[1]).returncode != 0
    error, got = rejected(theirs(plaintext, keys[0].recipient), keys[1])
    assert got == []
    assert error.code == "DECRYPTION_FAILED"
    assert "no identity matches" in error.message
    assert keys[1].recipient in error.message  # the public side only
    assert keys[1].secret not in error.message


def test_a_flipped_bit_anywhere_fails_both_ways(keys: list[Key]) -> None:
    plaintext = plaintext_of(CHUNK + 100)
    data = ours(plaintext, keys[0].recipient)
    start = payload_start(data)
    every_header_byte = range(start)
    payload = [start, start + 1, start + CHUNK, start + RECORD - 1, start + RECORD, len(data) - 1]
    for position in [*every_header_byte, *payload]:
        tampered = bytearray(data)
        tampered[position] ^= 1 << (position % 8)
        _, got = rejected(bytes(tampered), keys[0])
        assert got in ([], [plaintext[:CHUNK]]), position
        if position < start + RECORD:
            assert got == [], position
    for position in (5, start - 3, start + 10, len(data) - 1):  # age agrees
        tampered = bytearray(data)
        tampered[position] ^= 0x40
        assert age_decrypt(bytes(tampered), keys[0]).returncode != 0


def test_truncation_anywhere_fails_and_is_named(keys: list[Key]) -> None:
    plaintext = plaintext_of(2 * CHUNK + 500)
    data = ours(plaintext, keys[0].recipient)
    start = payload_start(data)
    boundaries = [start, start + RECORD, start + 2 * RECORD]
    cuts = [*range(start + 1), *boundaries, start + 100, start + RECORD + 5, len(data) - 1]
    for length in cuts:
        error, got = rejected(data[:length], keys[0])
        assert b"".join(got) == plaintext[: len(b"".join(got))]
        assert len(b"".join(got)) % CHUNK == 0
        if length in boundaries or length < start:
            assert error.code == "TRUNCATED", (length, error.message)
        assert age_decrypt(data[:length], keys[0]).returncode != 0


def test_a_file_cut_after_a_full_chunk_is_truncated(keys: list[Key]) -> None:
    # a full-size chunk at the end that only authenticates as a middle chunk: it is
    # authentic, so it is handed out (as age does), and the missing end is the error
    plaintext = plaintext_of(2 * CHUNK + 1)
    data = ours(plaintext, keys[0].recipient)
    cut = payload_start(data) + 2 * RECORD
    error, got = rejected(data[:cut], keys[0])
    assert error.code == "TRUNCATED"
    assert "no final chunk" in error.message
    assert got == [plaintext[:CHUNK], plaintext[CHUNK : 2 * CHUNK]]


@pytest.mark.parametrize("garbage", [b"x", b"y" * 100, b"z" * RECORD])
def test_data_after_a_full_final_chunk_fails(keys: list[Key], garbage: bytes) -> None:
    # a full-size last chunk authenticates as the last only: what follows it is refused
    plaintext = plaintext_of(2 * CHUNK)
    data = ours(plaintext, keys[0].recipient)
    assert len(data) == payload_start(data) + 2 * RECORD  # no empty chunk after it
    error, got = rejected(data + garbage, keys[0])
    assert error.code == "DECRYPTION_FAILED"
    assert "data after the final chunk" in error.message
    assert got == [plaintext[:CHUNK], plaintext[CHUNK:]]


@pytest.mark.parametrize(
    "change", ["swap-0-1", "swap-1-2", "drop-0", "drop-1", "drop-last", "duplicate-1", "append"]
)
def test_reordered_dropped_or_extra_chunks_fail(keys: list[Key], change: str) -> None:
    plaintext = plaintext_of(3 * CHUNK + 10)
    data = theirs(plaintext, keys[0].recipient)  # age's own file, damaged
    start = payload_start(data)
    head = data[:start]
    chunks = [data[i : i + RECORD] for i in range(start, len(data), RECORD)]
    assert len(chunks) == 4
    match change.split("-"):
        case ["swap", a, b]:
            chunks[int(a)], chunks[int(b)] = chunks[int(b)], chunks[int(a)]
        case ["drop", "last"]:
            chunks.pop()
        case ["drop", index]:
            chunks.pop(int(index))
        case ["duplicate", index]:
            chunks.insert(int(index), chunks[int(index)])
        case ["append"]:
            chunks.append(chunks[-1])
    damaged = head + b"".join(chunks)
    _, got = rejected(damaged, keys[0])
    assert b"".join(got) == plaintext[: len(b"".join(got))]  # only what authenticated
    assert age_decrypt(damaged, keys[0]).returncode != 0


@pytest.mark.parametrize(
    "edit",
    [
        (b"age-encryption.org/v1\n", b"age-encryption.org/v2\n"),
        (b"-> X25519 ", b"-> X25519  "),
        (b"\n---", b"\n--- extra\n---"),
    ],
    ids=["version", "double-space", "bad-closing"],
)
def test_malformed_headers_are_refused(keys: list[Key], edit: tuple[bytes, bytes]) -> None:
    data = ours(b"secret", keys[0].recipient).replace(*edit, 1)
    error, _ = rejected(data, keys[0])
    assert error.code == "DECRYPTION_FAILED"
    assert "not a valid age file" in error.message


def test_armor_accepts_only_whitespace_around_it_and_crlf(keys: list[Key]) -> None:
    data = theirs(b"secret", keys[0].recipient, armor=True)
    assert read(b"\n  \n" + data + b"\n \n", keys[0]) == b"secret"
    assert read(data.replace(b"\n", b"\r\n"), keys[0]) == b"secret"
    assert read(data.rstrip(b"\n"), keys[0]) == b"secret"  # no end of line after END
    error, _ = rejected(data + b"junk\n", keys[0])
    assert "after the armor" in error.message


@pytest.mark.parametrize(
    ("damage", "code"),
    [
        ("cut-before-end", "TRUNCATED"),
        ("long-line", "DECRYPTION_FAILED"),
        ("joined-lines", "DECRYPTION_FAILED"),
        ("bad-label", "DECRYPTION_FAILED"),
        ("empty-line", "DECRYPTION_FAILED"),
    ],
)
def test_damaged_armor_is_refused(keys: list[Key], damage: str, code: str) -> None:
    data = theirs(plaintext_of(5000), keys[0].recipient, armor=True)
    lines = data.split(b"\n")
    assert lines[0] == age.ARMOR_BEGIN
    if damage == "cut-before-end":
        damaged = b"\n".join(lines[:5]) + b"\n"
    elif damage == "long-line":
        damaged = b"\n".join([lines[0], lines[1] + b"AAAA", *lines[2:]])
    elif damage == "joined-lines":
        damaged = b"\n".join([lines[0], lines[1] + lines[2], *lines[3:]])
    elif damage == "bad-label":
        damaged = data.replace(b"AGE ENCRYPTED FILE", b"AGE ENCRYPTED DATA", 1)
    else:
        damaged = b"\n".join([lines[0], lines[1], b"", *lines[2:]])
    error, got = rejected(damaged, keys[0])
    assert error.code == code, error.message
    assert got == []
    assert age_decrypt(damaged, keys[0]).returncode != 0


# --- parsing recipients and identities ---------------------------------------------------------

BAD_RECIPIENTS = {
    "checksum": (SPEC_RECIPIENT[:-1] + "q", "checksum"),
    "upper": (SPEC_RECIPIENT.upper(), "not an age recipient"),
    "ssh": ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB", "SSH keys are not supported"),
    "pq": ("age1pq1" + "q" * 60, "post-quantum"),
    "plugin": (bech32_encode("age1yubikey", bytes(33)), "plugin recipients"),
    "short": (bech32_encode("age", bytes(31)), "not 32 bytes"),
    "low-order": (bech32_encode("age", bytes(32)), "not a usable X25519"),
    "identity": (SPEC_IDENTITY, "this is an age identity"),
    "identity-lower": (SPEC_IDENTITY.lower(), "this is an age identity"),
    "symmetric-key": ("8f" * 32, "not an age recipient"),
}


@pytest.mark.parametrize(("text", "says"), BAD_RECIPIENTS.values(), ids=BAD_RECIPIENTS.keys())
def test_bad_recipients_are_config_errors(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        age.parse_recipients(["", text], "BAQUP_ARTIFACT_ENCRYPT_RECIPIENTS")
    assert caught.value.exit_code == ExitCode.USAGE_CONFIG_ERROR
    message = caught.value.message
    assert message.startswith("BAQUP_ARTIFACT_ENCRYPT_RECIPIENTS: ")
    assert says in message
    if text.startswith("age1"):
        assert repr(text) in message  # public: quoted, so the operator sees which
    else:
        assert "value 2" in message
        for fragment in re.findall(r"[A-Za-z0-9]{8,}", text):
            assert fragment not in message  # an identity put there by mistake stays secret


def test_no_recipient_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no age recipient"):
        age.parse_recipients(["", "  "], "BAQUP_ARTIFACT_ENCRYPT_RECIPIENTS")


BAD_IDENTITIES = {
    "checksum": SPEC_IDENTITY[:-1] + ("Q" if SPEC_IDENTITY[-1] != "Q" else "P"),
    "lower": SPEC_IDENTITY.lower(),
    "recipient": SPEC_RECIPIENT,
    "pq": "AGE-SECRET-KEY-PQ-1" + "Q" * 60,
    "plugin": "AGE-PLUGIN-YUBIKEY-1" + "Q" * 40,
    "short": bech32_encode("AGE-SECRET-KEY-", bytes(31)),
    "garbage": "hunter2-is-my-password",
}


@pytest.mark.parametrize("text", BAD_IDENTITIES.values(), ids=BAD_IDENTITIES.keys())
def test_bad_identities_are_config_errors_that_never_echo(text: str) -> None:
    source = f"# a comment\n\n{text}\n"
    with pytest.raises(ConfigError) as caught:
        age.parse_identities(source, "BAQUP_SECRET_AGE_IDENTITY")
    message = caught.value.message
    assert caught.value.exit_code == ExitCode.USAGE_CONFIG_ERROR
    assert message.startswith("BAQUP_SECRET_AGE_IDENTITY: line 3")
    for fragment in re.findall(r"[A-Za-z0-9]{8,}", text):
        assert fragment not in message


def test_no_identity_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no age identity"):
        age.parse_identities("# only a comment\n", "BAQUP_SECRET_AGE_IDENTITY")


# --- Bech32 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "hrp", "data"),
    [
        ("A12UEL5L", "A", b""),
        (
            "abcdef1qpzry9x8gf2tvdw0s3jn54khce6mua7lmqqqxw",
            "abcdef",
            bytes.fromhex("00443214c74254b635cf84653a56d7c675be77df"),
        ),
    ],
)
def test_bech32_vectors_of_bip173(text: str, hrp: str, data: bytes) -> None:
    assert bech32_decode(text) == (hrp, data)
    assert bech32_encode(hrp, data) == text


@pytest.mark.parametrize(
    "text", ["A12UEL5l", "a12uel5m", "pzry9x0s0muk", "1pzry9x0s0muk", "a1", "a12ue\u00e9l5l"]
)
def test_bech32_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        bech32_decode(text)


def test_bech32_round_trips_long_data() -> None:
    data = os.urandom(200)  # past BIP 173's 90 characters, as age's pq keys are
    assert bech32_decode(bech32_encode("age", data)) == ("age", data)


def test_identity_files(keys: list[Key], tmp_path: Path) -> None:
    (identity,) = age.read_identity_file(keys[0].path)
    assert str(identity.recipient) == keys[0].recipient
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe" + keys[0].secret.encode())
    missing = tmp_path / "missing"
    for path, says in [(binary, "UTF-8"), (missing, "cannot read"), (tmp_path, "cannot read")]:
        with pytest.raises(ConfigError) as caught:
            age.read_identity_file(path)
        assert caught.value.exit_code == ExitCode.USAGE_CONFIG_ERROR
        assert says in caught.value.message
        assert str(path) in caught.value.message
        assert keys[0].secret not in caught.value.message


# --- hostile bytes -------------------------------------------------------------------------------

FUZZ_IDENTITY = age.parse_identities(SPEC_IDENTITY, "id")
FUZZ_FILE = ours(bytes(range(256)) * 300, SPEC_RECIPIENT, SPEC_RECIPIENT)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_damage_to_a_file_is_a_data_error(data: st.DataObject) -> None:
    # never another exception (no 70 for hostile input), never unauthenticated bytes
    damaged = bytearray(FUZZ_FILE)
    header_end = payload_start(FUZZ_FILE)
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        where = data.draw(st.integers(0, header_end + 40), label="where")
        match data.draw(st.sampled_from(["flip", "insert", "delete"]), label="edit"):
            case "flip":
                damaged[where] ^= data.draw(st.integers(1, 255), label="xor")
            case "insert":
                damaged[where:where] = data.draw(st.binary(min_size=1, max_size=3), label="b")
            case "delete":
                del damaged[where : where + data.draw(st.integers(1, 3), label="n")]
    if bytes(damaged) == FUZZ_FILE:
        return
    got: list[bytes] = []
    with pytest.raises(DataError):
        got.extend(decrypt_stream(io.BytesIO(bytes(damaged)), identities=FUZZ_IDENTITY))
    assert got == []


@pytest.mark.parametrize("shape", ["one-long-line", "many-stanzas", "endless-body"])
def test_a_huge_header_is_refused_quickly(keys: list[Key], shape: str) -> None:
    filler = {
        "one-long-line": b"-> " + b"x" * (2 * age.MAX_HEADER) + b"\n",
        "many-stanzas": b"-> a\n\n" * (age.MAX_HEADER // 5),
        "endless-body": b"-> a\n" + (b"A" * 64 + b"\n") * (age.MAX_HEADER // 64),
    }[shape]
    error, _ = rejected(b"age-encryption.org/v1\n" + filler + b"--- x\n", keys[0])
    assert "too long" in error.message
