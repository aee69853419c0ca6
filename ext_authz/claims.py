"""Claim checks shared by JWTs and introspection results: time, audience, scopes, client id."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from .reasons import Reason


class ClaimError(Exception):
    """A claim failed a check; `reason` names the deny reason and the message the detail."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def check_time_and_audience(
    claims: dict[str, Any],
    audiences: Sequence[str],
    leeway_seconds: float,
    now: float,
) -> None:
    """Check `exp` (required), `nbf`, `iat` with the leeway, then `aud` against `audiences`."""
    exp = numeric_date(claims, "exp")
    if exp is None:
        raise ClaimError(Reason.TOKEN_MALFORMED, "exp is missing")
    if now >= exp + leeway_seconds:
        raise ClaimError(Reason.TOKEN_EXPIRED, "exp is in the past")
    nbf = numeric_date(claims, "nbf")
    if nbf is not None and now + leeway_seconds < nbf:
        raise ClaimError(Reason.TOKEN_NOT_YET_VALID, "nbf is in the future")
    iat = numeric_date(claims, "iat")
    if iat is not None and now + leeway_seconds < iat:
        raise ClaimError(Reason.TOKEN_NOT_YET_VALID, "iat is in the future")

    if not any(audience in audiences for audience in token_audiences(claims)):
        raise ClaimError(Reason.AUDIENCE_MISMATCH, "aud has no accepted audience")


def numeric_date(claims: dict[str, Any], name: str) -> float | None:
    """Return a NumericDate claim (RFC 7519 §2) in seconds, or None when it is absent."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ClaimError(Reason.TOKEN_MALFORMED, f"{name} is not a number")
    # Integers beyond 2**53 lose precision as floats; inf and nan are no dates.
    if isinstance(value, int) and abs(value) > 2**53:
        raise ClaimError(Reason.TOKEN_MALFORMED, f"{name} is out of range")
    if not math.isfinite(value):
        raise ClaimError(Reason.TOKEN_MALFORMED, f"{name} is not finite")
    return float(value)


def token_audiences(claims: dict[str, Any]) -> list[str]:
    """Return `aud` as a list; RFC 7519 §4.1.3 allows a string or a list of strings."""
    aud = claims.get("aud")
    if aud is None:
        return []
    if isinstance(aud, str):
        return [aud]
    if isinstance(aud, list) and all(isinstance(item, str) for item in aud):
        return aud
    raise ClaimError(Reason.TOKEN_MALFORMED, "aud is not a string or a list of strings")


def granted_scopes(claims: dict[str, Any]) -> tuple[str, ...]:
    """Return the granted scopes from `scope` or, when absent, `scp`.

    `scope` is a space-separated string (RFC 8693 §4.2, RFC 9068 §2.2.3),
    split on any run of whitespace. `scp` (Okta, Entra ID) is a list of
    strings or a single string.
    """
    if "scope" in claims:
        scope = claims["scope"]
        if not isinstance(scope, str):
            raise ClaimError(Reason.TOKEN_MALFORMED, "scope is not a string")
        return tuple(scope.split())
    if "scp" in claims:
        scp = claims["scp"]
        if isinstance(scp, str):
            return tuple(scp.split())
        if isinstance(scp, list) and all(isinstance(item, str) for item in scp):
            return tuple(scp)
        raise ClaimError(Reason.TOKEN_MALFORMED, "scp is not a string or a list of strings")
    return ()


def client_id(claims: dict[str, Any], claim_names: Sequence[str]) -> str | None:
    """Return the client id from the first present claim of `claim_names`.

    When two of those claims are present and differ, the token names two
    clients, and the request is denied rather than trusting either one.
    """
    found: str | None = None
    for name in claim_names:
        if name not in claims:
            continue
        value = claims[name]
        if not isinstance(value, str):
            raise ClaimError(Reason.TOKEN_MALFORMED, f"{name} is not a string")
        if found is None:
            found = value
        elif value != found:
            raise ClaimError(
                Reason.CLIENT_NOT_ALLOWED, f"client id claims disagree ({', '.join(claim_names)})"
            )
    return found


def claim_value(claims: dict[str, Any], path: str) -> Any:
    """Return the claim at a dotted path such as `realm_access.roles`, or None."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def header_text(value: Any) -> str | None:
    """Return a claim value as header text: strings as they are, anything else as JSON.

    Returns None when the result is not visible ASCII of at most 4096
    characters, because Envoy would reject or mangle such a header value.
    """
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    if not text.isascii() or not text.isprintable() or len(text) > 4096:
        return None
    return text
