"""JSON Web Key sets: parse each key on its own and find the keys that fit a token.

A key that cannot be used (malformed, meant for encryption, unsupported type)
is skipped with a log line, so one bad entry never takes the whole set down.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

log = logging.getLogger(__name__)

# JWS algorithms that each key type can verify (RFC 7518 §3, RFC 8037 §3.1).
_EC_CURVE_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})


@dataclass(frozen=True)
class VerificationKey:
    """One usable public key from a JWK set."""

    kid: str | None
    algorithms: frozenset[str]  # algorithms this key may verify
    key: Any  # a cryptography public key object

    def fits(self, algorithm: str) -> bool:
        return algorithm in self.algorithms


@dataclass(frozen=True)
class KeySet:
    """The usable keys of one issuer, as fetched at one moment."""

    keys: tuple[VerificationKey, ...]
    kids: frozenset[str | None] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "kids", frozenset(key.kid for key in self.keys))

    def __len__(self) -> int:
        return len(self.keys)

    def has_kid(self, kid: str) -> bool:
        return kid in self.kids

    def candidates(self, kid: str | None, algorithm: str) -> list[VerificationKey]:
        """Return the keys that may have signed a token with this `kid` and `alg`.

        A token without `kid` is matched only when exactly one key fits, because
        guessing among several keys would turn one bad key into a valid one.
        """
        if kid is None:
            fitting = [key for key in self.keys if key.fits(algorithm)]
            return fitting if len(fitting) == 1 else []
        return [key for key in self.keys if key.kid == kid and key.fits(algorithm)]


def parse_jwks(document: Any, issuer_name: str, allowed_algorithms: tuple[str, ...]) -> KeySet:
    """Build a KeySet from a JWKS document; raise ValueError when it is not a JWK set."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("the JWKS document is not a JSON object with a 'keys' list")

    keys = []
    for index, entry in enumerate(document["keys"]):
        try:
            keys.append(parse_jwk(entry, allowed_algorithms))
        except ValueError as error:
            kid = entry.get("kid") if isinstance(entry, dict) else None
            log.warning("skipping JWK %d (kid %r) of issuer %s: %s", index, kid, issuer_name, error)
    return KeySet(tuple(keys))


def parse_jwk(entry: Any, allowed_algorithms: tuple[str, ...]) -> VerificationKey:
    """Parse one JWK into a VerificationKey; raise ValueError when it is unusable."""
    if not isinstance(entry, dict):
        raise ValueError("the key is not a JSON object")
    if entry.get("use", "sig") != "sig":
        raise ValueError(f"the key is for use {entry.get('use')!r}, not 'sig'")
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("'kid' is not a string")
    declared = entry.get("alg")
    if declared is not None and not isinstance(declared, str):
        raise ValueError("'alg' is not a string")

    if "d" in entry:
        raise ValueError("the key contains private material")

    # PyJWK needs an algorithm to pick the key parser. The declared one is
    # checked below, so any algorithm of the key type will do here.
    parser_algorithm = _parser_algorithm(entry)
    try:
        parsed = jwt.PyJWK(entry, algorithm=parser_algorithm)
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"the key cannot be parsed ({type(error).__name__})") from None

    usable = _algorithms_for(parsed.key) & frozenset(allowed_algorithms)
    if declared is not None:
        usable &= {declared}
    if not usable:
        raise ValueError("the key fits none of the issuer's allowed algorithms")
    return VerificationKey(kid=kid, algorithms=frozenset(usable), key=parsed.key)


def _parser_algorithm(entry: dict[str, Any]) -> str:
    kty = entry.get("kty")
    if kty == "RSA":
        if "n" not in entry or "e" not in entry:
            raise ValueError("the RSA key has no 'n' or 'e'")
        return "RS256"
    if kty == "EC":
        curves = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
        if entry.get("crv") not in curves:
            raise ValueError(f"unsupported EC curve {entry.get('crv')!r}")
        return curves[entry["crv"]]
    if kty == "OKP":
        if entry.get("crv") not in ("Ed25519", "Ed448"):
            raise ValueError(f"unsupported OKP curve {entry.get('crv')!r}")
        return "EdDSA"
    raise ValueError(f"unsupported key type {kty!r}")


def _algorithms_for(key: Any) -> frozenset[str]:
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = _EC_CURVE_ALGORITHMS.get(key.curve.name)
        return frozenset({algorithm}) if algorithm else frozenset()
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    # Private keys or symmetric secrets never verify tokens.
    return frozenset()
