"""Compact JWS parsing: split, strict base64url, JSON header and payload.

Nothing here trusts the token. The signature is checked later, against a key
chosen by configuration; the header only names which configured key to use.
"""

from __future__ import annotations

import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

# RFC 7515 §2: base64url without padding. Python's decoder accepts padding,
# '+', '/' and stray characters, so the alphabet is checked first.
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_SIXTET = {character: value for value, character in enumerate(_ALPHABET)}
_TO_STANDARD_ALPHABET = bytes.maketrans(b"-_", b"+/")
# Low bits of the last character that carry no data, by segment length
# modulo 4 (RFC 4648 §4): 2 characters hold 1 byte, 3 characters hold 2.
_SPARE_BITS = {0: 0, 2: 0b1111, 3: 0b11}


class MalformedTokenError(ValueError):
    """The token is not a well-formed compact JWS. The message contains no token text."""


@dataclass(frozen=True)
class ParsedToken:
    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes

    @property
    def algorithm(self) -> Any:
        return self.header.get("alg")

    @property
    def kid(self) -> Any:
        return self.header.get("kid")


def parse_token(token: str) -> ParsedToken:
    """Split and decode a compact JWS; raise MalformedTokenError when it is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        raise MalformedTokenError(f"expected 3 dot-separated parts, got {len(parts)}")
    header_part, payload_part, signature_part = parts

    header = _decode_json(header_part, "header")
    claims = _decode_json(payload_part, "payload")
    if "crit" in header:
        # RFC 7515 §4.1.11: unknown critical extensions must be rejected, and
        # this service implements none.
        raise MalformedTokenError("the header has a 'crit' parameter")
    if "b64" in header:
        # RFC 7797: an unencoded payload changes what is signed.
        raise MalformedTokenError("the header has a 'b64' parameter")
    if isinstance(header.get("cty"), str) and header["cty"].upper() == "JWT":
        # RFC 7519 §5.2: a nested token; its inner claims were never verified here.
        raise MalformedTokenError("the token is a nested JWT (cty JWT)")
    return ParsedToken(
        header=header,
        claims=claims,
        signing_input=f"{header_part}.{payload_part}".encode("ascii"),
        signature=_decode_segment(signature_part, "signature"),
    )


def _decode_json(segment: str, name: str) -> dict[str, Any]:
    raw = _decode_segment(segment, name)
    try:
        # RFC 7515 §2 and RFC 8259 §8.1: the JSON is UTF-8.
        value = _JSON.decode(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise MalformedTokenError(f"the {name} is not valid JSON") from None
    if not isinstance(value, dict):
        raise MalformedTokenError(f"the {name} is not a JSON object")
    return value


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # RFC 7515 §5.2 and RFC 7519 §7.2: a JOSE header or claims set with a
    # duplicate member name is rejected, so two parsers never disagree on it.
    members = dict(pairs)
    if len(members) != len(pairs):
        raise ValueError("duplicate member name")
    return members


def _no_constant(name: str) -> Any:
    # NaN and Infinity are not JSON (RFC 8259 §6); Python's parser accepts them.
    raise ValueError(f"{name} is not a JSON number")


# One decoder for every token: json.loads would build a new one per call
# because of the hooks.
_JSON = json.JSONDecoder(object_pairs_hook=_unique_members, parse_constant=_no_constant)


def _decode_segment(segment: str, name: str) -> bytes:
    if not segment and name != "signature":
        raise MalformedTokenError(f"the {name} is empty")
    remainder = len(segment) % 4
    if remainder == 1 or not _BASE64URL.fullmatch(segment):
        raise MalformedTokenError(f"the {name} is not unpadded base64url")
    # The decoder ignores the spare low bits of the last character, so several
    # strings decode to the same bytes. Only the canonical one, with those
    # bits zero, is accepted.
    if remainder and _SIXTET[segment[-1]] & _SPARE_BITS[remainder]:
        raise MalformedTokenError(f"the {name} is not canonical base64url")
    try:
        standard = segment.encode("ascii").translate(_TO_STANDARD_ALPHABET)
        return binascii.a2b_base64(standard + b"=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise MalformedTokenError(f"the {name} is not unpadded base64url") from None
