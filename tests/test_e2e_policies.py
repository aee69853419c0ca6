"""Policies end to end through the real Envoy binary, selected per route."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from ext_authz.dev.stack import Stack, StackPorts, local_sidecar_config, policy_route

from .support import SigningKey, claims_for, decision_count, free_port, send, write_rsa_key_pem

pytestmark = pytest.mark.e2e

# The dev issuer's signing key of each running stack, by Envoy URL.
signers: dict[str, SigningKey] = {}


@pytest.fixture(scope="module", params=["grpc", "http"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The stack, once with Envoy calling the gRPC front end and once the HTTP one."""
    key_file = tmp_path_factory.mktemp("issuer") / "signing-key.pem"
    key = write_rsa_key_pem(key_file)
    ports = StackPorts(*(free_port() for _ in range(7)))
    sidecar: dict[str, Any] = local_sidecar_config(ports)
    sidecar["applications"] = [
        {"name": "billing-app", "client_ids": ["0oa-billing"]},
        {"name": "reports-app", "client_ids": ["reports"]},
    ]
    sidecar["policies"] += [
        {
            "name": "billing",
            "issuers": ["dev"],
            "applications": ["billing-app"],
            "required_scopes": ["invoices.read"],
        },
        {
            "name": "custom",
            "issuers": ["dev"],
            "headers": {"x-user-email": "email", "x-app": "application"},
            "forward_token": False,
        },
        {"name": "shadow", "issuers": ["dev"], "mode": "dry_run", "required_scopes": ["admin"]},
    ]
    started = Stack(
        workdir=tmp_path_factory.mktemp("stack"),
        ports=ports,
        sidecar_config=sidecar,
        extra_routes=[
            policy_route("/billing", "billing"),
            policy_route("/custom", "custom"),
            policy_route("/shadow", "shadow"),
        ],
        issuer_key_file=key_file,
        front_end=request.param,
        upstream_headers=("x-user-email", "x-app"),
    )
    started.start()
    signers[started.envoy_url] = SigningKey(_dev_kid(started), "RS256", key)
    yield started
    started.stop()


def _dev_kid(stack: Stack) -> str:
    status, _, body = send(stack.issuer_url, "GET", "/jwks.json", [])
    assert status == 200
    return str(json.loads(body)["keys"][0]["kid"])


def token_for(stack: Stack, **claims: Any) -> str:
    return signers[stack.envoy_url].sign(claims_for(stack.issuer_url, **claims))


def get(stack: Stack, path: str, token: str, *extra: tuple[str, str]) -> tuple[int, Any, bytes]:
    return send(stack.envoy_url, "GET", path, [("Authorization", f"Bearer {token}"), *extra])


def okta_shaped(stack: Stack, **overrides: Any) -> str:
    shape: dict[str, Any] = {
        "client_id": None,
        "cid": "0oa-billing",
        "scp": ["invoices.read", "openid"],
    }
    return token_for(stack, **{**shape, **overrides})


def test_okta_shaped_token_allowed(stack: Stack):
    status, _, body = get(stack, "/billing/invoices", okta_shaped(stack))

    assert status == 200
    received = json.loads(body)["headers"]
    assert received["x-auth-application"] == "billing-app"
    assert received["x-auth-client-id"] == "0oa-billing"


def test_keycloak_shaped_token_allowed(stack: Stack):
    token = token_for(stack, client_id=None, azp="reports", scope="profile  invoices.read")

    status, _, body = get(stack, "/reports", token)

    assert status == 200
    assert json.loads(body)["headers"]["x-auth-application"] == "reports-app"


def test_conflicting_client_ids_denied(stack: Stack):
    token = token_for(stack, client_id="0oa-billing", azp="reports")
    before = decision_count(stack, "client_not_allowed")

    status, _, _ = get(stack, "/", token)

    assert status == 403
    assert decision_count(stack, "client_not_allowed") == before + 1


def test_missing_scope_denied_with_challenge(stack: Stack):
    before = decision_count(stack, "scope_insufficient", policy="billing")

    status, headers, _ = get(stack, "/billing", okta_shaped(stack, scp=["openid"]))

    assert status == 403
    assert 'error="insufficient_scope"' in headers["www-authenticate"]
    assert 'scope="invoices.read"' in headers["www-authenticate"]
    assert decision_count(stack, "scope_insufficient", policy="billing") == before + 1


def test_unregistered_client_denied(stack: Stack):
    before = decision_count(stack, "client_not_allowed", policy="billing")

    status, _, _ = get(stack, "/billing", okta_shaped(stack, cid="0oa-stranger"))

    assert status == 403
    assert decision_count(stack, "client_not_allowed", policy="billing") == before + 1


def test_custom_headers_and_no_token_upstream(stack: Stack):
    token = token_for(stack, email="ana@example.com", client_id="reports")

    status, _, body = get(
        stack, "/custom", token, ("x-user-email", "forged@example.com"), ("x-auth-subject", "x")
    )

    assert status == 200
    received = json.loads(body)["headers"]
    assert received["x-user-email"] == "ana@example.com"
    assert received["x-app"] == "reports-app"
    assert "authorization" not in received
    assert "x-auth-subject" not in received


def test_dry_run_allows_and_counts(stack: Stack):
    before = decision_count(stack, "scope_insufficient", policy="shadow")
    dry_before = _dry_run_count(stack)

    status, _, body = get(stack, "/shadow", okta_shaped(stack), ("x-auth-subject", "forged"))

    assert status == 200
    assert "x-auth-subject" not in json.loads(body)["headers"]
    assert decision_count(stack, "scope_insufficient", policy="shadow") == before
    assert _dry_run_count(stack) == dry_before + 1


def _dry_run_count(stack: Stack) -> float:
    line = (
        'ext_authz_decisions_total{decision="dry_run_deny",policy="shadow",'
        'reason="scope_insufficient"}'
    )
    for row in stack.metrics_text().splitlines():
        if row.startswith(line):
            return float(row.split()[-1])
    return 0.0


def test_policy_per_route(stack: Stack):
    token = token_for(stack, client_id="reports", scope="profile")
    assert get(stack, "/", token)[0] == 200
    assert get(stack, "/billing", token)[0] == 403
