"""JWT verification: issuer, algorithm, key, signature, then the time and audience claims.

The signature is checked before any claim, so an expired token with a bad
signature is reported as `signature_invalid`: claims of an unverified token
are not worth reporting on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jwt.algorithms import get_default_algorithms

from .config import IssuerConfig
from .issuer_keys import IssuerKeys
from .reasons import Reason
from .token import MalformedTokenError, parse_token

_ALGORITHMS = get_default_algorithms()


@dataclass(frozen=True)
class VerifiedToken:
    """A token whose signature and claims passed every check."""

    issuer: IssuerConfig
    claims: dict[str, Any]


class VerificationError(Exception):
    """The token failed a check, named by `reason`."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        # Set once the signature has verified, so logs may name the caller.
        self.issuer: IssuerConfig | None = None
        self.claims: dict[str, Any] | None = None


class Verifier:
    """Verifies bearer JWTs against the issuers a policy trusts."""

    def __init__(
        self,
        issuer_keys: Mapping[str, IssuerKeys],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._issuer_keys = issuer_keys
        self._by_url = {keys.config.issuer: keys for keys in issuer_keys.values()}
        self._clock = clock

    def verify(self, token: str, trusted_issuers: Sequence[str]) -> VerifiedToken:
        """Return the verified token or raise VerificationError."""
        try:
            parsed = parse_token(token)
        except MalformedTokenError as error:
            raise VerificationError(Reason.TOKEN_MALFORMED, str(error)) from None

        # Choose the issuer by exact `iss`, among the ones this policy trusts.
        iss = parsed.claims.get("iss")
        keys = self._by_url.get(iss) if isinstance(iss, str) else None
        if keys is None or keys.config.name not in trusted_issuers:
            raise VerificationError(Reason.ISSUER_UNTRUSTED, "iss is not a trusted issuer")
        issuer = keys.config

        algorithm = parsed.algorithm
        if not isinstance(algorithm, str) or algorithm not in issuer.algorithms:
            raise VerificationError(
                Reason.ALGORITHM_NOT_ALLOWED, f"alg is not allowed for issuer {issuer.name}"
            )
        kid = parsed.kid
        if kid is not None and not isinstance(kid, str):
            raise VerificationError(Reason.TOKEN_MALFORMED, "kid is not a string")

        self._check_signature(keys, kid, algorithm, parsed.signing_input, parsed.signature)
        try:
            self._check_claims(issuer, parsed.claims)
        except VerificationError as error:
            error.issuer = issuer
            error.claims = parsed.claims
            raise
        return VerifiedToken(issuer=issuer, claims=parsed.claims)

    def _check_signature(
        self,
        keys: IssuerKeys,
        kid: str | None,
        algorithm: str,
        signing_input: bytes,
        signature: bytes,
    ) -> None:
        key_set = keys.keys
        if key_set is None or (kid is not None and not key_set.has_kid(kid)):
            # Unknown kid: the issuer may have rotated its keys since the last fetch.
            keys.refetch_for_unknown_kid()
            key_set = keys.keys
        if key_set is None:
            raise VerificationError(Reason.KEYS_UNAVAILABLE, "no key set loaded for the issuer")

        candidates = key_set.candidates(kid, algorithm)
        if not candidates:
            raise VerificationError(Reason.KEY_NOT_FOUND, "no key matches the kid and alg")

        verifier = _ALGORITHMS[algorithm]
        for candidate in candidates:
            if verifier.verify(signing_input, candidate.key, signature):
                return
        raise VerificationError(Reason.SIGNATURE_INVALID, "the signature does not verify")

    def _check_claims(self, issuer: IssuerConfig, claims: dict[str, Any]) -> None:
        now = self._clock()
        leeway = issuer.leeway_seconds

        exp = _numeric_date(claims, "exp", required=True)
        assert exp is not None
        if now >= exp + leeway:
            raise VerificationError(Reason.TOKEN_EXPIRED, "exp is in the past")
        nbf = _numeric_date(claims, "nbf", required=False)
        if nbf is not None and now + leeway < nbf:
            raise VerificationError(Reason.TOKEN_NOT_YET_VALID, "nbf is in the future")
        iat = _numeric_date(claims, "iat", required=False)
        if iat is not None and now + leeway < iat:
            raise VerificationError(Reason.TOKEN_NOT_YET_VALID, "iat is in the future")

        audiences = _audiences(claims)
        if not any(audience in issuer.audiences for audience in audiences):
            raise VerificationError(Reason.AUDIENCE_MISMATCH, "aud has no accepted audience")


def _numeric_date(claims: dict[str, Any], name: str, required: bool) -> float | None:
    """Return a NumericDate claim (RFC 7519 §2) as seconds, or None when absent."""
    if name not in claims:
        if required:
            raise VerificationError(Reason.TOKEN_MALFORMED, f"{name} is missing")
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise VerificationError(Reason.TOKEN_MALFORMED, f"{name} is not a number")
    # Integers beyond float range and inf/nan are no dates.
    if isinstance(value, int) and abs(value) > 2**53:
        raise VerificationError(Reason.TOKEN_MALFORMED, f"{name} is out of range")
    if not math.isfinite(value):
        raise VerificationError(Reason.TOKEN_MALFORMED, f"{name} is not finite")
    return float(value)


def _audiences(claims: dict[str, Any]) -> list[str]:
    """Return `aud` as a list (RFC 7519 §4.1.3 allows a string or a list of strings)."""
    aud = claims.get("aud")
    if aud is None:
        return []
    if isinstance(aud, str):
        return [aud]
    if isinstance(aud, list) and all(isinstance(item, str) for item in aud):
        return aud
    raise VerificationError(Reason.TOKEN_MALFORMED, "aud is not a string or a list of strings")
