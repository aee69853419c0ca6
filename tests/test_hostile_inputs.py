"""Hostile tokens and requests: each case gets a normal deny with the stated reason."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import utils

from ext_authz.api.envoy.service.auth.v3.external_auth_pb2 import CheckRequest
from ext_authz.jwks import parse_jwk
from ext_authz.token import MalformedTokenError, parse_token

from .support import IssuerServer, SigningKey, claims_for
from .test_check import Harness

AUDIENCE = "Amplify Central"
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: str | dict[str, Any], payload: str | dict[str, Any], signature: bytes) -> str:
    """Build a compact JWS from raw JSON text or objects, signing nothing."""
    header_text = header if isinstance(header, str) else json.dumps(header)
    payload_text = payload if isinstance(payload, str) else json.dumps(payload)
    return f"{b64(header_text.encode())}.{b64(payload_text.encode())}.{b64(signature)}"


def signed_with(key: SigningKey, header: dict[str, Any], payload: str) -> str:
    """Sign raw payload text with `key`, with the given extra header members."""
    full_header = {"alg": key.algorithm, "kid": key.kid, **header}
    signing_input = f"{b64(json.dumps(full_header).encode())}.{b64(payload.encode())}"
    algorithm = jwt.get_algorithm_by_name(key.algorithm)
    signature = algorithm.sign(signing_input.encode(), key.private_key)
    return f"{signing_input}.{b64(signature)}"


@pytest.fixture
def harness(issuer_server: IssuerServer) -> Iterator[Harness]:
    yield Harness(
        {
            "issuers": [
                {
                    "name": "local",
                    "issuer": issuer_server.url,
                    "audiences": [AUDIENCE],
                    "allow_insecure_http": True,
                    "jwks_min_refetch_seconds": 30,
                }
            ],
            "policies": [{"name": "default", "issuers": ["local"]}],
        }
    )


def reason_of(harness: Harness, token: str) -> str:
    response = harness.check(f"Bearer {token}")
    return "ok" if response.status.code == 0 else response.status.message


# Algorithms


@pytest.mark.parametrize("algorithm", ["none", "None", "NONE"])
@pytest.mark.parametrize("signature", [b"", b"random-signature"])
def test_alg_none_rejected(
    harness: Harness, issuer_server: IssuerServer, algorithm: str, signature: bytes
):
    token = raw_token({"alg": algorithm, "kid": "k1"}, claims_for(issuer_server.url), signature)
    assert reason_of(harness, token) == "algorithm_not_allowed"


def rsa_public_key_forms(key: SigningKey) -> dict[str, bytes]:
    public = key.private_key.public_key()
    return {
        "pem": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "der": public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "jwk": json.dumps(key.public_jwk()).encode(),
    }


@pytest.mark.parametrize("form", ["pem", "der", "jwk"])
def test_hmac_with_public_key_rejected(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey, form: str
):
    secret = rsa_public_key_forms(rsa_key)[form]
    header = {"alg": "HS256", "kid": rsa_key.kid, "typ": "JWT"}
    payload = claims_for(issuer_server.url)
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()

    assert reason_of(harness, f"{signing_input}.{b64(mac)}") == "algorithm_not_allowed"


# ES256 signatures


def es256_variants(ec_key: SigningKey, url: str) -> dict[str, str]:
    valid = ec_key.sign(claims_for(url))
    signing_input, _, signature_part = valid.rpartition(".")
    raw = base64.urlsafe_b64decode(signature_part + "==")
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    order = P256_ORDER.to_bytes(32, "big")
    return {
        "zeros": f"{signing_input}.{b64(bytes(64))}",
        "r=s=order": f"{signing_input}.{b64(order + order)}",
        "der": f"{signing_input}.{b64(utils.encode_dss_signature(r, s))}",
        "63 bytes": f"{signing_input}.{b64(raw[:63])}",
        "65 bytes": f"{signing_input}.{b64(raw + bytes(1))}",
    }


def test_bad_es256_signatures(harness: Harness, issuer_server: IssuerServer, ec_key: SigningKey):
    for name, token in es256_variants(ec_key, issuer_server.url).items():
        assert reason_of(harness, token) == "signature_invalid", name


def test_valid_es256_control(harness: Harness, issuer_server: IssuerServer, ec_key: SigningKey):
    assert reason_of(harness, ec_key.sign(claims_for(issuer_server.url))) == "ok"


# Header parameters and structure


@pytest.mark.parametrize(
    "extra",
    [
        {"crit": ["x-custom"], "x-custom": 1},
        {"crit": []},
        {"crit": "x-custom"},
        {"b64": False},
        {"cty": "JWT"},
        {"cty": "jwt"},
    ],
)
def test_unsupported_header_parameters(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey, extra: dict[str, Any]
):
    token = signed_with(rsa_key, extra, json.dumps(claims_for(issuer_server.url)))
    assert reason_of(harness, token) == "token_malformed"


def test_five_part_jwe_rejected(harness: Harness):
    header = b64(json.dumps({"alg": "RSA-OAEP", "enc": "A256GCM"}).encode())
    assert reason_of(harness, f"{header}.a2V5.aXY.Y2lwaGVy.dGFn") == "token_malformed"


def test_base64_variants_rejected(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey
):
    valid = rsa_key.sign(claims_for(issuer_server.url))
    header, payload, signature = valid.split(".")
    variants = {
        "padding": f"{header}==.{payload}.{signature}",
        "plus and slash": f"{header}.{payload}.{signature.replace('-', '+').replace('_', '/')}",
        "trailing junk": f"{valid}!!",
        "space inside": f"{header}.{payload[:10]} {payload[10:]}.{signature}",
        "newline inside": f"{header}.{payload[:10]}\n{payload[10:]}.{signature}",
        "envoy replacement character": f"{header}.{payload}.{signature[:-2]}!!",
    }
    # Guard: the variant must really contain '+' or '/'.
    assert "+" in variants["plus and slash"] or "/" in variants["plus and slash"]

    for name, token in variants.items():
        response = harness.check(f"Bearer {token}")
        assert response.status.code != 0, name
        assert response.status.message == "token_malformed", name


# JSON


@pytest.mark.parametrize(
    ("header", "payload_template"),
    [
        ('{"alg": "RS256", "alg": "none", "kid": "k1"}', None),
        (None, '{{"iss": "{url}", "sub": "a", "sub": "b", "aud": "{aud}", "exp": {exp}}}'),
        (None, '{{"iss": "{url}", "aud": "{aud}", "exp": NaN}}'),
        (None, '{{"iss": "{url}", "aud": "{aud}", "exp": Infinity}}'),
    ],
)
def test_json_edge_cases_rejected(
    harness: Harness,
    issuer_server: IssuerServer,
    rsa_key: SigningKey,
    header: str | None,
    payload_template: str | None,
):
    exp = int(time.time()) + 300
    template = payload_template or '{{"iss": "{url}", "aud": "{aud}", "exp": {exp}}}'
    payload = template.format(url=issuer_server.url, aud=AUDIENCE, exp=exp)
    if header is None:
        token = signed_with(rsa_key, {}, payload)
    else:
        token = f"{b64(header.encode())}.{b64(payload.encode())}.{b64(b'sig')}"
    assert reason_of(harness, token) == "token_malformed"


def test_deeply_nested_payload_no_recursion_error():
    payload = "[" * 100_000 + "]" * 100_000
    token = f"{b64(b'{}')}.{b64(payload.encode())}.{b64(b'sig')}"
    with pytest.raises(MalformedTokenError):
        parse_token(token)


# Time claims


@pytest.mark.parametrize("exp", ['"2030-01-01"', "true", "null", "1e400", str(10**50)])
def test_bad_exp_types(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey, exp: str
):
    payload = f'{{"iss": "{issuer_server.url}", "aud": "{AUDIENCE}", "exp": {exp}}}'
    assert reason_of(harness, signed_with(rsa_key, {}, payload)) == "token_malformed"


def test_future_float_exp_allowed(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(claims_for(issuer_server.url, exp=time.time() + 300.5))
    assert reason_of(harness, token) == "ok"


def test_iat_slightly_future_allowed(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(claims_for(issuer_server.url, iat=time.time() + 0.4))
    assert reason_of(harness, token) == "ok"


def test_iat_ten_minutes_future_denied(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(claims_for(issuer_server.url, iat=int(time.time()) + 600))
    assert reason_of(harness, token) == "token_not_yet_valid"


def test_expired_and_badly_signed(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(claims_for(issuer_server.url, exp=1_000_000, iat=999_000))
    header, payload, signature = token.split(".")
    flipped = signature[:-3] + ("AAA" if signature[-3:] != "AAA" else "BBB")
    assert reason_of(harness, f"{header}.{payload}.{flipped}") == "signature_invalid"


# Issuer and audience


def test_issuer_variants_untrusted(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey
):
    url = issuer_server.url
    for iss in ["http", "", [url], url + "/", url.upper()]:
        # Signed by hand: PyJWT refuses to encode a non-string iss.
        token = signed_with(rsa_key, {}, json.dumps(claims_for(url, iss=iss)))
        assert reason_of(harness, token) == "issuer_untrusted", iss


@pytest.mark.parametrize(
    ("aud", "reason"),
    [
        ([], "audience_mismatch"),
        ([123], "token_malformed"),
        ({"aud": AUDIENCE}, "token_malformed"),
        (AUDIENCE.lower(), "audience_mismatch"),
        (AUDIENCE + " Extra", "audience_mismatch"),
        ("Amplify", "audience_mismatch"),
    ],
)
def test_audience_variants(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey, aud: Any, reason: str
):
    token = rsa_key.sign(claims_for(issuer_server.url, aud=aud))
    assert reason_of(harness, token) == reason


# Size


def test_million_dots_denied_fast(harness: Harness):
    started = time.perf_counter()
    assert reason_of(harness, "." * 1_000_000) == "token_malformed"
    # A generous bound that still catches parsing the whole value: it is no timing test.
    assert time.perf_counter() - started < 2


def test_ten_mebibyte_token_denied_fast(harness: Harness):
    token = "a" * (10 * 1024 * 1024)
    started = time.perf_counter()
    assert reason_of(harness, token) == "token_malformed"
    assert time.perf_counter() - started < 2


# Requests


def test_authorization_forms(harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey):
    token = rsa_key.sign(claims_for(issuer_server.url))
    expected = {
        f"Bearer{token}": "token_malformed",
        f"Bearer {token} extra": "token_malformed",
        "Basic dXNlcjpwYXNz": "token_missing",
        f"Bearer {token},Bearer {token}": "token_malformed",
        f"  Bearer   {token}  ": "ok",
    }
    for authorization, reason in expected.items():
        response = harness.check(authorization)
        actual = "ok" if response.status.code == 0 else response.status.message
        assert actual == reason, authorization[:30]


def test_query_token_only_is_missing(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(claims_for(issuer_server.url))
    request = CheckRequest()
    request.attributes.request.http.path = f"/orders?access_token={token}"
    assert harness.service.Check(request, None).status.message == "token_missing"  # type: ignore[arg-type]


def test_structurally_empty_requests(harness: Harness):
    no_attributes = CheckRequest()
    no_http = CheckRequest()
    no_http.attributes.source.address.socket_address.address = "10.1.2.3"
    empty_headers = CheckRequest()
    empty_headers.attributes.request.http.path = "/"
    for request in (no_attributes, no_http, empty_headers):
        response = harness.service.Check(request, None)  # type: ignore[arg-type]
        assert response.status.message == "token_missing"


def test_huge_and_non_ascii_header_maps(harness: Harness):
    request = CheckRequest()
    headers = request.attributes.request.http.headers
    for index in range(10_000):
        headers[f"x-filler-{index}"] = "v" * 20
    headers["x-ünïcode-näme"] = "wert"
    headers["authorization"] = "Bearer not.a.jwt"

    response = harness.service.Check(request, None)  # type: ignore[arg-type]

    assert response.status.message == "token_malformed"


def test_asymmetric_keys_never_back_hmac(rsa_key: SigningKey, ec_key: SigningKey):
    for key in (rsa_key, ec_key):
        with pytest.raises(ValueError, match="fits none of the issuer's allowed algorithms"):
            parse_jwk({**key.public_jwk(), "alg": "HS256"}, ("RS256", "ES256"))
        with pytest.raises(ValueError):
            parse_jwk({**key.public_jwk(), "alg": None}, ("HS256",))
