"""End to end through the real Envoy binary: Envoy, the sidecar, the dev issuer, an upstream."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from ext_authz.dev.stack import Stack, StackPorts, local_sidecar_config, policy_route

from .support import SigningKey, claims_for, decision_count, free_port, send, write_rsa_key_pem

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def dev_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    path = tmp_path_factory.mktemp("issuer") / "signing-key.pem"
    return path, write_rsa_key_pem(path)


@pytest.fixture(scope="module", params=["grpc", "http"])
def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    dev_key: tuple[Path, Any],
) -> Iterator[Stack]:
    """The stack, once with Envoy calling the gRPC front end and once the HTTP one."""
    ports = StackPorts(*(free_port() for _ in range(7)))
    sidecar = local_sidecar_config(ports)
    # An issuer whose JWKS endpoint refuses connections, behind its own policy.
    sidecar["issuers"].append(
        {
            "name": "down",
            "issuer": "http://127.0.0.1:9/down",
            "jwks_uri": f"http://127.0.0.1:{free_port()}/jwks.json",
            "audiences": ["Amplify Central"],
            "allow_insecure_http": True,
            "fetch_timeout_seconds": 0.5,
        }
    )
    sidecar["policies"].append({"name": "down-policy", "issuers": ["down"]})
    stack = Stack(
        workdir=tmp_path_factory.mktemp("stack"),
        ports=ports,
        sidecar_config=sidecar,
        extra_routes=[
            policy_route("/down", "down-policy"),
            policy_route("/unknown-policy", "no-such-policy"),
        ],
        issuer_key_file=dev_key[0],
        front_end=request.param,
    )
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def dev_signer(stack: Stack, dev_key: tuple[Path, Any]) -> SigningKey:
    status, _, body = send(stack.issuer_url, "GET", "/jwks.json", [])
    assert status == 200
    kid = json.loads(body)["keys"][0]["kid"]
    return SigningKey(kid, "RS256", dev_key[1])


def call(
    stack: Stack, headers: list[tuple[str, str]], path: str = "/"
) -> tuple[int, http.client.HTTPMessage, bytes]:
    return send(stack.envoy_url, "GET", path, headers)


def assert_denied_with(
    stack: Stack,
    headers: list[tuple[str, str]],
    reason: str,
    status: int = 403,
    path: str = "/",
    policy: str = "default",
) -> http.client.HTTPMessage:
    before = decision_count(stack, reason, policy)

    code, response_headers, body = call(stack, headers, path)

    assert code == status, body
    assert decision_count(stack, reason, policy) == before + 1
    assert response_headers["content-type"] == "application/json"
    assert "error_description" in json.loads(body)
    return response_headers


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


def test_valid_token_reaches_upstream(stack: Stack, dev_signer: SigningKey):
    token = dev_signer.sign(claims_for(stack.issuer_url, sub="alice", client_id="app-7"))
    forged = [("x-auth-subject", "mallory"), ("x-auth-client-id", "forged")]
    before = decision_count(stack, "ok")

    status, _, body = call(stack, bearer(token) + forged)

    assert status == 200
    received = json.loads(body)["headers"]
    assert received["x-auth-subject"] == "alice"
    assert received["x-auth-client-id"] == "app-7"
    assert received["x-auth-issuer"] == stack.issuer_url
    assert decision_count(stack, "ok") == before + 1


def test_client_header_removed_when_claim_absent(stack: Stack, dev_signer: SigningKey):
    token = dev_signer.sign(claims_for(stack.issuer_url, client_id=None))

    status, _, body = call(stack, [*bearer(token), ("x-auth-client-id", "forged")])

    assert status == 200
    assert "x-auth-client-id" not in json.loads(body)["headers"]


def test_dev_issuer_token_allowed(stack: Stack):
    form = "grant_type=client_credentials"
    headers = [
        ("Authorization", "Basic ZGVtby1hcHA6ZGVtby1zZWNyZXQ="),  # demo-app:demo-secret
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Content-Length", str(len(form))),
    ]
    connection = http.client.HTTPConnection("127.0.0.1", stack.ports.issuer, timeout=10)
    connection.request("POST", "/token", body=form, headers=dict(headers))
    token = json.loads(connection.getresponse().read())["access_token"]
    connection.close()

    status, _, _ = call(stack, bearer(token))

    assert status == 200


def test_missing_token_denied(stack: Stack):
    headers = assert_denied_with(stack, [], "token_missing")
    assert headers["www-authenticate"] == 'Bearer realm="default"'


def test_expired_token_denied(stack: Stack, dev_signer: SigningKey):
    token = dev_signer.sign(claims_for(stack.issuer_url, iat=1_700_000_000, exp=1_700_000_600))
    headers = assert_denied_with(stack, bearer(token), "token_expired")
    assert 'error="invalid_token"' in headers["www-authenticate"]


def test_wrong_audience_denied(stack: Stack, dev_signer: SigningKey):
    token = dev_signer.sign(claims_for(stack.issuer_url, aud="Another API"))
    assert_denied_with(stack, bearer(token), "audience_mismatch")


def test_tampered_signature_denied(stack: Stack, dev_signer: SigningKey):
    header, _, signature = dev_signer.sign(claims_for(stack.issuer_url)).split(".")
    forged_payload = jwt.utils.base64url_encode(
        json.dumps(claims_for(stack.issuer_url, sub="admin")).encode()
    ).decode()
    assert_denied_with(stack, bearer(f"{header}.{forged_payload}.{signature}"), "signature_invalid")


def test_unknown_issuer_denied(stack: Stack):
    stranger = SigningKey.rsa("stranger")
    token = stranger.sign(claims_for("https://login.example.com/"))
    assert_denied_with(stack, bearer(token), "issuer_untrusted")


def test_lowercase_bearer_allowed(stack: Stack, dev_signer: SigningKey):
    token = dev_signer.sign(claims_for(stack.issuer_url))
    status, _, _ = call(stack, [("Authorization", f"bearer {token}")])
    assert status == 200


def test_two_authorization_headers_denied(stack: Stack, dev_signer: SigningKey):
    token = dev_signer.sign(claims_for(stack.issuer_url))
    headers = [("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")]
    assert_denied_with(stack, headers, "token_malformed")


def test_unknown_policy_route_denied(stack: Stack, dev_signer: SigningKey):
    token = dev_signer.sign(claims_for(stack.issuer_url))
    assert_denied_with(
        stack, bearer(token), "policy_unknown", path="/unknown-policy", policy="_unknown"
    )


def test_issuer_keys_unavailable_is_503(stack: Stack):
    down = SigningKey.rsa("down-key")
    token = down.sign(claims_for("http://127.0.0.1:9/down"))
    # Over HTTP, the front end returns 403, because Envoy would take a 5xx for its own error.
    status = 503 if stack.front_end == "grpc" else 403
    assert_denied_with(
        stack, bearer(token), "keys_unavailable", status=status, path="/down", policy="down-policy"
    )


def test_sidecar_log_has_no_token(stack: Stack, dev_signer: SigningKey):
    token = dev_signer.sign(claims_for(stack.issuer_url, aud="Another API"))
    call(stack, [*bearer(token), ("x-request-id", "e2e-log-check")])

    log = stack.log_text("ext-authz")

    assert "e2e-log-check" in log
    assert token.split(".")[1] not in log
    assert token.split(".")[2] not in log
