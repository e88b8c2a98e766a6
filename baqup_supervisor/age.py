"""age v1 files (age-encryption.org/v1, C2SP age.md) with X25519 recipients.

Owns the parsing of recipients (`age1...`) and identities (`AGE-SECRET-KEY-1...`,
Bech32), the streaming encryptor (`update`/`finalize`, like encryption.py's) and the
streaming reader (binary or ASCII-armored). Built on `cryptography` (X25519, HKDF,
HMAC, ChaCha20-Poly1305) rather than `pyrage`: the capture path pushes compressed
bytes through `update`, which pyrage's whole-buffer and file-pulling calls cannot take
without a thread, and this keeps the one native dependency the crypto extra has.

What it must never do: print or log an identity (error messages name the variable
and the line, not the text), or hand out a byte of a chunk that failed to
authenticate. Every stream fault is a DataError (65): `TRUNCATED` when the file
ends before its final chunk (or inside its header), `DECRYPTION_FAILED` otherwise
(wrong identity, bad header MAC, a flipped bit, reordered, dropped or extra chunks).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from .bech32 import bech32_decode, bech32_encode
from .errors import ConfigError, DataError
from .sealer import ChunkSealer
from .secret import Secret

FORMAT = "age-encryption.org/v1"
INTRO = b"age-encryption.org/v1\n"
CHUNK_SIZE = 64 * 1024
TAG_SIZE = 16
RECORD_SIZE = CHUNK_SIZE + TAG_SIZE
FILE_KEY_SIZE = 16
NONCE_SIZE = 16
MAX_HEADER = 1024 * 1024  # the largest real header (many pq stanzas) is far smaller
X25519_LABEL = b"age-encryption.org/v1/X25519"
ARMOR_BEGIN = b"-----BEGIN AGE ENCRYPTED FILE-----"
ARMOR_END = b"-----END AGE ENCRYPTED FILE-----"

# --- keys -----------------------------------------------------------------------------------


def _x25519() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import x25519
    except ImportError:  # pragma: no cover - depends on the install
        raise ConfigError(
            "age encryption needs the crypto extra: pip install 'baqup-supervisor[crypto]'"
        ) from None
    return x25519


def _hkdf(ikm: bytes, salt: bytes | None, info: bytes) -> bytes:
    from cryptography.hazmat.primitives.hashes import SHA256
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(SHA256(), 32, salt, info).derive(ikm)


def _chacha(key: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    return ChaCha20Poly1305(key)


class X25519Recipient:
    """A public key (`age1...`) files are encrypted to."""

    def __init__(self, public: bytes) -> None:
        self.public = public

    def __str__(self) -> str:
        return bech32_encode("age", self.public)

    def __repr__(self) -> str:
        return f"X25519Recipient({self})"


class X25519Identity:
    """A private key (`AGE-SECRET-KEY-1...`); its repr never shows the key."""

    def __init__(self, secret: bytes) -> None:
        self._key = _x25519().X25519PrivateKey.from_private_bytes(secret)
        self.recipient = X25519Recipient(self._key.public_key().public_bytes_raw())

    def __repr__(self) -> str:
        return f"X25519Identity(for {self.recipient})"

    def exchange(self, share: bytes) -> bytes:
        peer = _x25519().X25519PublicKey.from_public_bytes(share)
        shared: bytes = self._key.exchange(peer)
        return shared


def parse_recipient(text: str) -> X25519Recipient:
    """One `age1...` recipient; ValueError saying why not (never quoting the text)."""
    text = text.strip()
    if text.upper().startswith(("AGE-SECRET-KEY-", "AGE-PLUGIN-")):
        raise ValueError(
            "this is an age identity (a private key), not a recipient: give its public "
            "key (age-keygen -y FILE) and keep the identity out of the agent"
        )
    if text.startswith(("ssh-", "ecdsa-")):
        raise ValueError("SSH keys are not supported, only age X25519 recipients (age1...)")
    if text.startswith("age1pq1"):
        raise ValueError("post-quantum recipients are not supported, only X25519 (age1...)")
    try:
        hrp, data = bech32_decode(text)
    except ValueError as exc:
        raise ValueError(f"not an age recipient (age1...): {exc}") from None
    if hrp != "age":
        if hrp.lower().startswith("age1"):
            raise ValueError("plugin recipients are not supported, only X25519 (age1...)")
        raise ValueError("not an age recipient (age1...)")
    if len(data) != 32:
        raise ValueError("not an age recipient: the key is not 32 bytes")
    x25519 = _x25519()
    try:  # reject a low-order point now rather than at the first capture
        x25519.X25519PrivateKey.generate().exchange(x25519.X25519PublicKey.from_public_bytes(data))
    except ValueError:
        raise ValueError("not a usable X25519 public key") from None
    return X25519Recipient(data)


def parse_recipients(values: Iterable[str], variable: str) -> list[X25519Recipient]:
    """Every recipient of a multi-value setting (duplicates once); ConfigError naming it.

    A value is quoted only when it looks like a recipient (`age1...`, public by nature):
    whatever else was put there by mistake may be a secret.
    """
    recipients: list[X25519Recipient] = []
    seen: set[bytes] = set()
    for number, value in enumerate(values, start=1):
        if not value.strip():
            continue
        try:
            recipient = parse_recipient(value)
        except ValueError as exc:
            text = value.strip()
            shown = repr(text) if text.startswith("age1") and len(text) < 200 else f"value {number}"
            raise ConfigError(f"{variable}: {shown}: {exc}") from None
        if recipient.public not in seen:
            seen.add(recipient.public)
            recipients.append(recipient)
    if not recipients:
        raise ConfigError(f"{variable}: no age recipient given")
    return recipients


def parse_identities(source: Secret | str, name: str) -> list[X25519Identity]:
    """Identities of an identity file's text (`#` comments, blank lines), never echoed.

    `name` (a variable or a file) is what error messages show, with the line number.
    """
    text = source.reveal() if isinstance(source, Secret) else source
    identities = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{name}: line {number}"
        if line.startswith("AGE-SECRET-KEY-PQ-1"):
            raise ConfigError(f"{where}: post-quantum identities are not supported, only X25519")
        if line.startswith("AGE-PLUGIN-"):
            raise ConfigError(f"{where}: plugin identities are not supported, only X25519")
        try:
            hrp, data = bech32_decode(line)
        except ValueError as exc:
            raise ConfigError(
                f"{where} is not an age identity (AGE-SECRET-KEY-1...): {exc}"
            ) from None
        if hrp != "AGE-SECRET-KEY-" or len(data) != 32:
            raise ConfigError(f"{where} is not an age X25519 identity (AGE-SECRET-KEY-1...)")
        identities.append(X25519Identity(data))
    if not identities:
        raise ConfigError(f"{name}: no age identity (AGE-SECRET-KEY-1...) found")
    return identities


def read_identity_file(path: str | os.PathLike[str]) -> list[X25519Identity]:
    """The identities of an identity file (`-i FILE`, as age-keygen writes it)."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle:
            raw = handle.read(16 * 1024 * 1024 + 1)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read the identity file: {exc.strerror}") from None
    if len(raw) > 16 * 1024 * 1024:
        raise ConfigError(f"{name}: too large for an identity file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: an identity file is UTF-8 text") from None
    return parse_identities(text, name)


# --- the header -----------------------------------------------------------------------------


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _unb64(text: bytes) -> bytes:
    """Canonical unpadded base64, as the spec requires (no `=`, no stray bits)."""
    if b"=" in text or len(text) % 4 == 1:
        raise ValueError("not unpadded base64")
    try:
        data = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise ValueError("not base64") from None
    if _b64(data) != text:
        raise ValueError("non-canonical base64")
    return data


def _stanza(kind: bytes, args: Sequence[bytes], body: bytes) -> bytes:
    encoded = _b64(body)
    lines = [encoded[i : i + 64] for i in range(0, len(encoded), 64)]
    if not lines or len(lines[-1]) == 64:
        lines.append(b"")  # a body always ends with a line shorter than 64 columns
    return b" ".join([b"->", kind, *args]) + b"\n" + b"".join(line + b"\n" for line in lines)


class _Stanza:
    def __init__(self, args: list[bytes], body: bytes) -> None:
        self.args = args
        self.body = body


def _malformed(what: str) -> DataError:
    return DataError(f"not a valid age file: {what}", code="DECRYPTION_FAILED")


class _Input:
    """A Readable with the line reads the header needs and a look-ahead for the end."""

    def __init__(self, source: Any) -> None:
        self._source = source
        self._buffer = bytearray()

    def _fill(self) -> bool:
        data = self._source.read(CHUNK_SIZE)
        self._buffer += data
        return bool(data)

    def line(self, limit: int = MAX_HEADER, *, last: bool = False) -> bytes:
        """The next line with its LF; TRUNCATED at the end of the file, unless `last`
        lets the file's last line go without one (the armor's end line may)."""
        start = 0
        while (end := self._buffer.find(b"\n", start)) < 0:
            start = len(self._buffer)
            if start > limit:
                raise _malformed("a header line is too long")
            if not self._fill():
                if last and self._buffer:
                    end = len(self._buffer) - 1
                    break
                raise DataError("the age file is truncated in its header", code="TRUNCATED")
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        return line

    def peek(self, size: int) -> bytes:
        while len(self._buffer) < size and self._fill():
            pass
        return bytes(self._buffer[:size])

    def read(self, size: int) -> bytes:
        data = self.peek(size)
        del self._buffer[:size]
        return data

    def at_end(self) -> bool:
        return not self._buffer and not self._fill()


def _valid_arg(arg: bytes) -> bool:
    return bool(arg) and all(33 <= c <= 126 for c in arg)


def _read_header(source: _Input) -> tuple[list[_Stanza], bytes, bytes]:
    """(stanzas, the header bytes the MAC covers, the MAC)."""
    covered: list[bytes] = []
    size = 0

    def line() -> bytes:
        # the whole header is bounded, not only each line: a hostile file gets no memory
        nonlocal size
        text = source.line()
        size += len(text)
        if size > MAX_HEADER:
            raise _malformed("the header is too long")
        return text

    first = line()
    if first != INTRO:
        if first.startswith(b"age-encryption.org/"):
            raise _malformed(f"unsupported version {first[19:-1].decode('ascii', 'replace')!r}")
        raise _malformed("no age-encryption.org/v1 line")
    covered.append(first)
    stanzas: list[_Stanza] = []
    while True:
        text = line()
        if text.startswith(b"---"):
            parts = text[:-1].split(b" ")
            if parts[0] != b"---" or len(parts) != 2:
                raise _malformed("bad closing line")
            try:
                mac = _unb64(parts[1])
            except ValueError:
                mac = b""
            if len(mac) != 32:
                raise _malformed("bad header MAC encoding")
            covered.append(b"---")
            break
        parts = text[:-1].split(b" ")
        if parts[0] != b"->" or len(parts) < 2 or not all(_valid_arg(a) for a in parts[1:]):
            raise _malformed("bad recipient stanza line")
        covered.append(text)
        body = bytearray()
        while True:
            text = line()
            try:
                chunk = _unb64(text[:-1])
            except ValueError:
                raise _malformed("bad stanza body (a stanza must end with a short line)") from None
            if len(text) > 65:
                raise _malformed("a stanza body line is longer than 64 columns")
            covered.append(text)
            body += chunk
            if len(text) < 65:
                break
        stanzas.append(_Stanza(parts[1:], bytes(body)))
    if not stanzas:
        raise _malformed("no recipient stanza")
    return stanzas, b"".join(covered), mac


def _header_mac(file_key: bytes, covered: bytes) -> bytes:
    return hmac.digest(_hkdf(file_key, None, b"header"), covered, "sha256")


def _unwrap(identity: X25519Identity, stanza: _Stanza) -> bytes | None:
    """The file key if the stanza is this identity's, None if it is not."""
    from cryptography.exceptions import InvalidTag

    if stanza.args[0] != b"X25519":
        return None
    try:
        share = _unb64(stanza.args[1]) if len(stanza.args) == 2 else b""
    except ValueError:
        share = b""
    if len(share) != 32 or len(stanza.body) != FILE_KEY_SIZE + TAG_SIZE:
        raise _malformed("bad X25519 recipient stanza")
    try:
        shared = identity.exchange(share)
    except ValueError:  # an all-zero shared secret (a low-order point): must abort
        raise _malformed("bad X25519 ephemeral share") from None
    salt = share + identity.recipient.public
    wrap = _chacha(_hkdf(shared, salt, X25519_LABEL))
    try:
        file_key: bytes = wrap.decrypt(bytes(12), stanza.body, None)
    except InvalidTag:
        return None
    return file_key


# --- encryption -----------------------------------------------------------------------------


def _nonce(counter: int, final: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


class AgeEncryptor(ChunkSealer):
    """Encrypts a stream to age recipients; `update` and `finalize` return the file's bytes."""

    algorithm = "chacha20-poly1305"
    format = FORMAT
    suffix = ".age"  # after the compression suffix: db.sql.zst.age

    def __init__(self, recipients: Sequence[X25519Recipient]) -> None:
        if not recipients:
            raise ConfigError("age encryption needs at least one recipient")
        self.recipients = [str(r) for r in recipients]
        x25519 = _x25519()
        file_key = os.urandom(FILE_KEY_SIZE)
        parts = [INTRO]
        for recipient in recipients:
            ephemeral = x25519.X25519PrivateKey.generate()
            share = ephemeral.public_key().public_bytes_raw()
            shared = ephemeral.exchange(x25519.X25519PublicKey.from_public_bytes(recipient.public))
            wrap = _chacha(_hkdf(shared, share + recipient.public, X25519_LABEL))
            body = wrap.encrypt(bytes(12), file_key, None)
            parts.append(_stanza(b"X25519", [_b64(share)], body))
        parts.append(b"---")
        covered = b"".join(parts)
        nonce = os.urandom(NONCE_SIZE)
        self.header = covered + b" " + _b64(_header_mac(file_key, covered)) + b"\n" + nonce
        self._aead = _chacha(_hkdf(file_key, nonce, b"payload"))
        self.chunk_size = CHUNK_SIZE
        super().__init__()

    @property
    def manifest(self) -> dict[str, object]:
        """The manifest's `encryption` object."""
        return {"format": self.format, "recipients": list(self.recipients)}

    def _seal(self, chunk: bytes | memoryview, final: bool) -> bytes:
        sealed: bytes = self._aead.encrypt(_nonce(self._counter, final), chunk, None)
        self._counter += 1
        return sealed

    def finalize(self) -> bytes:
        # the spec forbids an empty last chunk unless the whole payload is empty, and
        # `update` always keeps a byte back, so what is pending is the final chunk
        head = self._take_header()
        body = self._seal(bytes(self._pending), final=True)
        self._pending.clear()
        return head + body


# --- decryption -----------------------------------------------------------------------------


class _Armored:
    """The binary file inside strict ASCII armor (RFC 7468, as age writes it)."""

    def __init__(self, source: _Input) -> None:
        self._source = source
        self._ended = False

    def _line(self) -> bytes:
        try:
            line = self._source.line(limit=1024, last=True)
        except DataError as exc:
            if exc.code != "TRUNCATED":
                raise
            raise DataError("the armored age file is truncated", code="TRUNCATED") from None
        return line.removesuffix(b"\n").removesuffix(b"\r")

    def start(self) -> None:
        line = self._line()
        skipped = 0
        while not line.strip():
            skipped += len(line) + 1
            if skipped > 1024:
                raise _malformed("too much whitespace before the armor")
            line = self._line()
        if line != ARMOR_BEGIN:
            raise _malformed("bad armor first line")

    def _end(self) -> None:
        self._ended = True
        rest = self._source.read(1025)
        if rest.strip() or len(rest) > 1024:
            raise _malformed("data after the armor")

    def read(self, size: int = -1, /) -> bytes:
        if self._ended:
            return b""
        line = self._line()
        if line == ARMOR_END:
            self._end()
            return b""
        if not line or len(line) > 64:
            raise _malformed("bad armor line")
        try:
            data = base64.b64decode(line, validate=True)
        except binascii.Error:
            raise _malformed("bad armor line") from None
        if base64.b64encode(data) != line:
            raise _malformed("non-canonical armor")
        if len(data) < 48:
            if self._line() != ARMOR_END:
                raise _malformed("bad armor closing line")
            self._end()
        return data


def decrypt(source: Any, identities: Sequence[X25519Identity]) -> Iterator[bytes]:
    """Plaintext chunks of an age file; the header is checked before this returns."""
    if not identities:
        raise DataError(
            "the artifact is an age file: an identity is needed", code="DECRYPTION_FAILED"
        )
    data = _Input(source)
    head = data.peek(len(INTRO))
    if not (head.startswith(INTRO[:8]) or INTRO.startswith(head)):  # else binary, maybe cut
        armored = _Armored(data)
        armored.start()
        data = _Input(armored)
    stanzas, covered, mac = _read_header(data)
    if any(s.args[0] == b"scrypt" for s in stanzas):
        raise _malformed("passphrase-encrypted age files are not supported")
    file_key = None
    for identity in identities:
        for stanza in stanzas:
            file_key = _unwrap(identity, stanza)
            if file_key is not None:
                break
        if file_key is not None:
            break
    if file_key is None:
        mine = ", ".join(str(i.recipient) for i in identities)
        raise DataError(
            f"no identity matches any of the {len(stanzas)} recipients of this age file "
            f"(the identities given are those of {mine})",
            code="DECRYPTION_FAILED",
        )
    if not hmac.compare_digest(_header_mac(file_key, covered), mac):
        raise DataError(
            "the age header's MAC does not verify: it was tampered with", code="DECRYPTION_FAILED"
        )
    nonce = data.read(NONCE_SIZE)
    if len(nonce) != NONCE_SIZE:
        raise DataError("the age file is truncated before its payload", code="TRUNCATED")
    return _payload(data, _chacha(_hkdf(file_key, nonce, b"payload")))


def _payload(data: _Input, aead: Any) -> Iterator[bytes]:
    """The chunks, each handed out once authenticated; the faults after them then raise.

    A full-size chunk may be the last one, so it is opened as the last when the file
    ends after it and as a middle one otherwise, then the other way round: a chunk that
    authenticates in the wrong place is still authentic (the reference implementation
    hands it out too), and the misplacement is the error that follows it.
    """
    from cryptography.exceptions import InvalidTag

    counter = 0
    while True:
        sealed = data.read(RECORD_SIZE)
        at_end = len(sealed) < RECORD_SIZE or data.at_end()
        if len(sealed) < TAG_SIZE:
            what = "no final chunk" if not sealed else "inside a chunk"
            raise DataError(
                f"the age file is truncated after chunk {counter} ({what})", code="TRUNCATED"
            )
        if at_end and counter and len(sealed) == TAG_SIZE:
            raise DataError("the age file ends with an empty chunk", code="DECRYPTION_FAILED")
        flags = [at_end, not at_end] if len(sealed) == RECORD_SIZE else [True]
        plain: bytes | None = None
        for final in flags:
            try:
                plain = aead.decrypt(_nonce(counter, final), sealed, None)
                break
            except InvalidTag:
                continue
        if plain is None:
            raise DataError(
                f"decryption failed at chunk {counter}: the age file is damaged or tampered with",
                code="DECRYPTION_FAILED",
            )
        counter += 1
        if plain:
            yield plain
        if final and not at_end:
            raise DataError(
                f"data after the final chunk (chunk {counter - 1})", code="DECRYPTION_FAILED"
            )
        if at_end and not final:
            raise DataError(
                f"the age file is truncated after chunk {counter - 1} (no final chunk)",
                code="TRUNCATED",
            )
        if final:
            return
