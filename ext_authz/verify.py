"""JWT verification: issuer, algorithm, key and signature.

The claims of a verified token are checked afterwards, in claims.py, with the
audiences of the route's policy. The signature is checked first, so an
expired token with a bad signature is reported as `signature_invalid`:
claims of an unverified token are not worth reporting on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    """A token whose issuer is trusted and whose signature, or introspection, vouches for it."""

    issuer: IssuerConfig
    claims: dict[str, Any]


class VerificationError(Exception):
    """The token failed a check, named by `reason`."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Verifier:
    """Verifies bearer JWTs against the issuers a policy trusts."""

    def __init__(self, issuer_keys: Mapping[str, IssuerKeys]) -> None:
        self._by_url = {keys.config.issuer: keys for keys in issuer_keys.values()}

    def verify(self, token: str, trusted_issuers: Sequence[str]) -> VerifiedToken:
        """Return the token's issuer and claims once its signature verifies."""
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
            raise VerificationError(Reason.KEYS_UNAVAILABLE, "no usable key set for the issuer")

        candidates = key_set.candidates(kid, algorithm)
        if not candidates:
            raise VerificationError(Reason.KEY_NOT_FOUND, "no key matches the kid and alg")

        verifier = _ALGORITHMS[algorithm]
        for candidate in candidates:
            if verifier.verify(signing_input, candidate.key, signature):
                return
        raise VerificationError(Reason.SIGNATURE_INVALID, "the signature does not verify")
