"""Signature checks per JWS algorithm, against tokens that PyJWT signs."""

from __future__ import annotations

from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ext_authz.config import SUPPORTED_ALGORITHMS
from ext_authz.signatures import SIGNATURE_CHECKS
from ext_authz.token import parse_token

_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_PRIVATE_KEYS: dict[str, Any] = {
    "RS256": _RSA,
    "RS384": _RSA,
    "RS512": _RSA,
    "PS256": _RSA,
    "PS384": _RSA,
    "PS512": _RSA,
    "ES256": ec.generate_private_key(ec.SECP256R1()),
    "ES384": ec.generate_private_key(ec.SECP384R1()),
    "ES512": ec.generate_private_key(ec.SECP521R1()),
    "EdDSA": ed25519.Ed25519PrivateKey.generate(),
}


def signed(algorithm: str) -> tuple[bytes, bytes, Any]:
    """Return the signing input, the signature and the public key of a fresh token."""
    private_key = _PRIVATE_KEYS[algorithm]
    token = jwt.encode({"sub": "alice"}, private_key, algorithm=algorithm)
    parsed = parse_token(token)
    return parsed.signing_input, parsed.signature, private_key.public_key()


def test_every_supported_algorithm_has_a_check():
    assert set(SIGNATURE_CHECKS) == set(SUPPORTED_ALGORITHMS)


@pytest.mark.parametrize("algorithm", SUPPORTED_ALGORITHMS)
def test_valid_signature_accepted(algorithm: str):
    signing_input, signature, key = signed(algorithm)
    assert SIGNATURE_CHECKS[algorithm](signing_input, key, signature)


@pytest.mark.parametrize("algorithm", SUPPORTED_ALGORITHMS)
def test_changed_payload_rejected(algorithm: str):
    signing_input, signature, key = signed(algorithm)
    assert not SIGNATURE_CHECKS[algorithm](signing_input + b"x", key, signature)


@pytest.mark.parametrize("algorithm", SUPPORTED_ALGORITHMS)
def test_changed_signature_rejected(algorithm: str):
    signing_input, signature, key = signed(algorithm)
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert not SIGNATURE_CHECKS[algorithm](signing_input, key, flipped)


@pytest.mark.parametrize("algorithm", SUPPORTED_ALGORITHMS)
def test_wrong_length_signature_rejected(algorithm: str):
    signing_input, signature, key = signed(algorithm)
    check = SIGNATURE_CHECKS[algorithm]
    assert not check(signing_input, key, signature[:-1])
    assert not check(signing_input, key, signature + b"\x00")
    assert not check(signing_input, key, b"")


@pytest.mark.parametrize("algorithm", ["RS256", "PS256", "ES256", "EdDSA"])
def test_other_key_rejected(algorithm: str):
    signing_input, signature, _ = signed(algorithm)
    others = {
        "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "PS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate,
    }
    other = others[algorithm]().public_key()
    assert not SIGNATURE_CHECKS[algorithm](signing_input, other, signature)


def test_ecdsa_der_signature_rejected():
    """RFC 7518 §3.4 signatures are raw R and S. A DER-encoded one is not accepted."""
    private_key = _PRIVATE_KEYS["ES256"]
    signing_input = b"header.payload"
    der = private_key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
    assert not SIGNATURE_CHECKS["ES256"](signing_input, private_key.public_key(), der)
