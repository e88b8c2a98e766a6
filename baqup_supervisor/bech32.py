"""Bech32 (BIP 173) without its 90-character limit, as age encodes its keys.

Pure and without I/O: the age recipients (`age1...`) and identities
(`AGE-SECRET-KEY-1...`) are Bech32 strings whose data is the 32-byte key.
"""

from __future__ import annotations

from collections.abc import Iterable

_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def _polymod(values: Iterable[int]) -> int:
    checksum = 1
    for value in values:
        top = checksum >> 25
        checksum = (checksum & 0x1FFFFFF) << 5 ^ value
        for i, generator in enumerate(_GENERATOR):
            if top >> i & 1:
                checksum ^= generator
    return checksum


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convert_bits(data: Iterable[int], from_bits: int, to_bits: int, pad: bool) -> list[int]:
    acc = bits = 0
    out = []
    top = (1 << to_bits) - 1
    for value in data:
        acc = acc << from_bits | value
        bits += from_bits
        while bits >= to_bits:
            bits -= to_bits
            out.append(acc >> bits & top)
    if pad:
        if bits:
            out.append(acc << (to_bits - bits) & top)
    elif bits >= from_bits or acc << (to_bits - bits) & top:
        raise ValueError("bad padding")
    return out


def bech32_encode(hrp: str, data: bytes) -> str:
    values = _convert_bits(data, 8, 5, pad=True)
    lower = hrp.lower()
    polymod = _polymod([*_hrp_expand(lower), *values, 0, 0, 0, 0, 0, 0]) ^ 1
    checksum = [polymod >> 5 * (5 - i) & 31 for i in range(6)]
    text = lower + "1" + "".join(_CHARSET[v] for v in values + checksum)
    return text.upper() if hrp.isupper() else text


def bech32_decode(text: str) -> tuple[str, bytes]:
    """(human-readable part as written, data); ValueError naming what is wrong."""
    if text.lower() != text and text.upper() != text:
        raise ValueError("mixed case")
    position = text.rfind("1")
    if position < 1 or position + 7 > len(text):
        raise ValueError("no separator")
    hrp = text[:position]
    if any(not 33 <= ord(c) <= 126 for c in hrp):
        raise ValueError("bad character")
    try:
        values = [_CHARSET.index(c) for c in text[position + 1 :].lower()]
    except ValueError:
        raise ValueError("bad character") from None
    if _polymod([*_hrp_expand(hrp.lower()), *values]) != 1:
        raise ValueError("bad checksum")
    return hrp, bytes(_convert_bits(values[:-6], 5, 8, pad=False))
