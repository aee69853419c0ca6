"""JWS signature checks (RFC 7518 §3, RFC 8037 §3.1) with `cryptography`, built once per algorithm.

Each check returns False for a bad or malformed signature instead of raising. The
key was chosen for the algorithm by jwks.py (`VerificationKey.fits`), so an
EC key's curve matches its ES algorithm here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

# (signing input, public key, signature) -> whether the signature verifies
SignatureCheck = Callable[[bytes, Any, bytes], bool]


def _rsa(scheme: padding.AsymmetricPadding, hash_algorithm: hashes.HashAlgorithm) -> SignatureCheck:
    def check(signing_input: bytes, key: Any, signature: bytes) -> bool:
        try:
            key.verify(signature, signing_input, scheme, hash_algorithm)
        except (InvalidSignature, ValueError):
            return False
        return True

    return check


def _rsa_pss(hash_algorithm: hashes.HashAlgorithm) -> SignatureCheck:
    # RFC 7518 §3.5: MGF1 with the same hash, and a salt as long as the hash.
    scheme = padding.PSS(mgf=padding.MGF1(hash_algorithm), salt_length=hash_algorithm.digest_size)
    return _rsa(scheme, hash_algorithm)


def _ecdsa(hash_algorithm: hashes.HashAlgorithm, coordinate_bytes: int) -> SignatureCheck:
    scheme = ec.ECDSA(hash_algorithm)

    def check(signing_input: bytes, key: Any, signature: bytes) -> bool:
        # RFC 7518 §3.4: the signature is R and S, each a fixed-length
        # big-endian integer; cryptography expects them DER-encoded.
        if len(signature) != 2 * coordinate_bytes:
            return False
        r = int.from_bytes(signature[:coordinate_bytes], "big")
        s = int.from_bytes(signature[coordinate_bytes:], "big")
        try:
            key.verify(encode_dss_signature(r, s), signing_input, scheme)
        except (InvalidSignature, ValueError):
            return False
        return True

    return check


def _eddsa(signing_input: bytes, key: Any, signature: bytes) -> bool:
    try:
        key.verify(signature, signing_input)
    except (InvalidSignature, ValueError):
        return False
    return True


SIGNATURE_CHECKS: dict[str, SignatureCheck] = {
    "RS256": _rsa(padding.PKCS1v15(), hashes.SHA256()),
    "RS384": _rsa(padding.PKCS1v15(), hashes.SHA384()),
    "RS512": _rsa(padding.PKCS1v15(), hashes.SHA512()),
    "PS256": _rsa_pss(hashes.SHA256()),
    "PS384": _rsa_pss(hashes.SHA384()),
    "PS512": _rsa_pss(hashes.SHA512()),
    "ES256": _ecdsa(hashes.SHA256(), 32),
    "ES384": _ecdsa(hashes.SHA384(), 48),
    # P-521 coordinates take 66 bytes: 521 bits rounded up to whole bytes.
    "ES512": _ecdsa(hashes.SHA512(), 66),
    "EdDSA": _eddsa,
}
