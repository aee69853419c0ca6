"""Policies: applications, scopes, audiences, upstream identity, dry run and introspection."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf.json_format import MessageToDict

from ext_authz.api.envoy.service.auth.v3.external_auth_pb2 import CheckResponse
from ext_authz.config import ConfigError, parse_config

from .support import IssuerServer, SigningKey, claims_for
from .test_check import Harness, headers_of

SECRET = "s3cret-value"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "introspection-secret"
    path.write_text(SECRET + "\n")
    return path


def policy_config(url: str, secret_file: Path, **issuer: Any) -> dict[str, Any]:
    return {
        "issuers": [
            {
                "name": "okta",
                "issuer": url,
                "audiences": ["api://default"],
                "allow_insecure_http": True,
                "jwks_min_refetch_seconds": 0,
                "introspection": {
                    "client_id": "ext-authz",
                    "client_secret_file": str(secret_file),
                    "cache_seconds": 60,
                },
                **issuer,
            }
        ],
        "applications": [
            {"name": "billing-app", "client_ids": ["0oa-billing"]},
            {"name": "reports-app", "client_ids": ["reports"]},
        ],
        "policies": [
            {"name": "default", "issuers": ["okta"]},
            {
                "name": "billing",
                "issuers": ["okta"],
                "applications": ["billing-app"],
                "required_scopes": ["invoices.read"],
            },
            {
                "name": "custom-headers",
                "issuers": ["okta"],
                "headers": {
                    "x-user-email": "email",
                    "x-roles": "realm_access.roles",
                    "x-app": "application",
                    "x-client": "client_id",
                    "x-display-name": "name",
                },
                "forward_token": False,
            },
            {"name": "other-audience", "issuers": ["okta"], "audiences": ["billing-api"]},
            {
                "name": "shadow",
                "issuers": ["okta"],
                "mode": "dry_run",
                "required_scopes": ["admin"],
            },
        ],
    }


@pytest.fixture
def harness(issuer_server: IssuerServer, secret_file: Path) -> Harness:
    return Harness(policy_config(issuer_server.url, secret_file))


def okta_claims(url: str, **overrides: Any) -> dict[str, Any]:
    """Claims shaped like an Okta custom authorization server's access token."""
    shape: dict[str, Any] = {
        "aud": "api://default",
        "client_id": None,
        "cid": "0oa-billing",
        "scp": ["invoices.read", "openid"],
        "sub": "0oa-billing",
    }
    return claims_for(url, **{**shape, **overrides})


def keycloak_claims(url: str, **overrides: Any) -> dict[str, Any]:
    """Claims shaped like a Keycloak client-credentials access token."""
    shape: dict[str, Any] = {
        "aud": ["account", "api://default"],
        "client_id": None,
        "azp": "reports",
        "scope": "profile  email invoices.read",
        "realm_access": {"roles": ["offline_access", "reporter"]},
    }
    return claims_for(url, **{**shape, **overrides})


def metadata_of(response: CheckResponse) -> dict[str, Any]:
    return MessageToDict(response.dynamic_metadata)


def assert_reason(response: CheckResponse, reason: str, status: int) -> dict[str, str]:
    assert response.status.message == reason
    assert response.denied_response.status.code == status
    return headers_of(response)


# Applications and scopes


def test_okta_token_allowed_with_application(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(okta_claims(issuer_server.url))

    response = harness.check(f"Bearer {token}", policy="billing")

    assert response.status.code == 0
    headers = headers_of(response)
    assert headers["x-auth-client-id"] == "0oa-billing"
    assert headers["x-auth-application"] == "billing-app"
    assert metadata_of(response) == {
        "policy": "billing",
        "issuer": "okta",
        "subject": "0oa-billing",
        "client_id": "0oa-billing",
        "application": "billing-app",
        "scopes": ["invoices.read", "openid"],
    }


def test_keycloak_token_scope_string_split(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(keycloak_claims(issuer_server.url))

    response = harness.check(f"Bearer {token}")

    assert response.status.code == 0
    assert metadata_of(response)["scopes"] == ["profile", "email", "invoices.read"]
    assert headers_of(response)["x-auth-application"] == "reports-app"


def test_scp_string_accepted(harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey):
    token = rsa_key.sign(okta_claims(issuer_server.url, scp="invoices.read  profile"))
    assert harness.check(f"Bearer {token}", policy="billing").status.code == 0


def test_conflicting_client_ids_denied(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(claims_for(issuer_server.url, aud="api://default", azp="other"))

    response = harness.check(f"Bearer {token}")

    headers = assert_reason(response, "client_not_allowed", 403)
    assert 'error="access_denied"' in headers["www-authenticate"]


def test_unregistered_client_denied(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(okta_claims(issuer_server.url, cid="0oa-unknown"))
    assert_reason(harness.check(f"Bearer {token}", policy="billing"), "client_not_allowed", 403)


def test_other_application_denied(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(keycloak_claims(issuer_server.url))
    assert_reason(harness.check(f"Bearer {token}", policy="billing"), "client_not_allowed", 403)


def test_missing_client_id_denied_when_applications_set(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(okta_claims(issuer_server.url, cid=None))
    assert_reason(harness.check(f"Bearer {token}", policy="billing"), "client_not_allowed", 403)


def test_missing_scope_insufficient(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(okta_claims(issuer_server.url, scp=["openid"]))

    response = harness.check(f"Bearer {token}", policy="billing")

    headers = assert_reason(response, "scope_insufficient", 403)
    challenge = headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge
    assert challenge.endswith('scope="invoices.read"')
    assert json.loads(response.denied_response.body)["error"] == "insufficient_scope"
    assert harness.count("scope_insufficient", policy="billing") == 1


def test_no_scope_claim_insufficient(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(okta_claims(issuer_server.url, scp=None))
    assert_reason(harness.check(f"Bearer {token}", policy="billing"), "scope_insufficient", 403)


@pytest.mark.parametrize(
    "overrides", [{"scope": 123}, {"scp": [1, 2]}, {"scp": {"a": 1}}, {"cid": 42}]
)
def test_malformed_scope_or_client_claim(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey, overrides: dict[str, Any]
):
    token = rsa_key.sign(okta_claims(issuer_server.url, **overrides))
    assert_reason(harness.check(f"Bearer {token}", policy="billing"), "token_malformed", 403)


# Audiences


def test_policy_audience_overrides_issuer(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(okta_claims(issuer_server.url, aud="billing-api"))

    assert harness.check(f"Bearer {token}", policy="other-audience").status.code == 0
    assert_reason(harness.check(f"Bearer {token}"), "audience_mismatch", 403)


# Upstream identity


def test_custom_headers_and_token_removal(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(
        keycloak_claims(issuer_server.url, email="ana@example.com", name="Ana Müller")
    )

    response = harness.check(f"Bearer {token}", policy="custom-headers", x_roles="admin")

    assert response.status.code == 0
    assert headers_of(response) == {
        "x-user-email": "ana@example.com",
        "x-roles": '["offline_access","reporter"]',
        "x-app": "reports-app",
        "x-client": "reports",
    }
    removed = set(response.ok_response.headers_to_remove)
    assert "authorization" in removed
    assert "x-display-name" in removed  # not visible ASCII, so it is not forwarded
    assert {"x-auth-issuer", "x-auth-subject", "x-auth-client-id"} <= removed


def test_token_forwarded_by_default(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(okta_claims(issuer_server.url))
    response = harness.check(f"Bearer {token}")
    assert "authorization" not in response.ok_response.headers_to_remove


# Dry run


def test_dry_run_allows_and_counts(
    harness: Harness,
    issuer_server: IssuerServer,
    rsa_key: SigningKey,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level("INFO", logger="ext_authz")
    token = rsa_key.sign(okta_claims(issuer_server.url))

    response = harness.check(f"Bearer {token}", policy="shadow", x_auth_subject="forged")

    assert response.status.code == 0
    assert headers_of(response) == {}
    assert "x-auth-subject" in response.ok_response.headers_to_remove
    assert harness.count("scope_insufficient", decision="dry_run_deny", policy="shadow") == 1
    assert harness.count("scope_insufficient", policy="shadow") == 0
    assert "dry run, would deny request: policy=shadow reason=scope_insufficient" in caplog.text


def test_dry_run_missing_token_allowed(harness: Harness):
    response = harness.check(policy="shadow")
    assert response.status.code == 0
    assert harness.count("token_missing", decision="dry_run_deny", policy="shadow") == 1


# Introspection


def active_reply(url: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    reply = {
        "active": True,
        "iss": url,
        "aud": "api://default",
        "client_id": "0oa-billing",
        "scope": "invoices.read",
        "sub": "0oa-billing",
        "exp": now + 300,
        "iat": now,
        "token_type": "Bearer",
    }
    reply.update(overrides)
    return {name: value for name, value in reply.items() if value is not None}


def test_opaque_token_introspected(harness: Harness, issuer_server: IssuerServer):
    issuer_server.introspection_results["opaque-1"] = active_reply(issuer_server.url)

    response = harness.check("Bearer opaque-1", policy="billing")

    assert response.status.code == 0
    assert headers_of(response)["x-auth-application"] == "billing-app"
    assert issuer_server.introspections() == 1


def test_introspection_result_cached_policy_rechecked(
    harness: Harness, issuer_server: IssuerServer
):
    issuer_server.introspection_results["opaque-2"] = active_reply(
        issuer_server.url, scope="profile"
    )

    assert harness.check("Bearer opaque-2").status.code == 0
    second = harness.check("Bearer opaque-2", policy="billing")

    assert second.status.message == "scope_insufficient"
    assert issuer_server.introspections() == 1


def test_inactive_token_denied(harness: Harness, issuer_server: IssuerServer):
    issuer_server.introspection_results["opaque-3"] = {"active": "true"}
    assert_reason(harness.check("Bearer opaque-3"), "token_inactive", 403)
    assert_reason(harness.check("Bearer never-issued"), "token_inactive", 403)


def test_revoked_token_denied_after_cache_ttl(issuer_server: IssuerServer, secret_file: Path):
    config = policy_config(issuer_server.url, secret_file)
    config["issuers"][0]["introspection"]["cache_seconds"] = 1
    harness = Harness(config)
    issuer_server.introspection_results["opaque-4"] = active_reply(issuer_server.url)
    assert harness.check("Bearer opaque-4").status.code == 0

    issuer_server.introspection_results["opaque-4"] = {"active": False}
    assert harness.check("Bearer opaque-4").status.code == 0  # still cached
    time.sleep(1.1)

    assert_reason(harness.check("Bearer opaque-4"), "token_inactive", 403)


def test_cached_token_denied_once_expired(issuer_server: IssuerServer, secret_file: Path):
    harness = Harness(policy_config(issuer_server.url, secret_file, leeway_seconds=0))
    issuer_server.introspection_results["opaque-5"] = active_reply(
        issuer_server.url, exp=int(time.time()) + 2
    )
    assert harness.check("Bearer opaque-5").status.code == 0

    time.sleep(2.2)

    assert_reason(harness.check("Bearer opaque-5"), "token_expired", 403)


@pytest.mark.parametrize("mode", ["status", "html"])
def test_introspection_failure_fails_closed(
    harness: Harness, issuer_server: IssuerServer, mode: str
):
    issuer_server.introspection_mode = mode
    issuer_server.introspection_results["opaque-6"] = active_reply(issuer_server.url)
    headers = assert_reason(harness.check("Bearer opaque-6"), "introspection_failed", 503)
    assert 'error="temporarily_unavailable"' in headers["www-authenticate"]


def test_wrong_introspection_secret_fails_closed(
    issuer_server: IssuerServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    wrong = tmp_path / "wrong-secret"
    wrong.write_text("not-the-secret")
    harness = Harness(policy_config(issuer_server.url, wrong))
    issuer_server.introspection_results["opaque-7"] = active_reply(issuer_server.url)

    assert_reason(harness.check("Bearer opaque-7"), "introspection_failed", 503)
    assert "returned HTTP 401" in caplog.text
    assert "not-the-secret" not in caplog.text
    assert "opaque-7" not in caplog.text


def test_introspection_other_issuer_untrusted(harness: Harness, issuer_server: IssuerServer):
    issuer_server.introspection_results["opaque-8"] = active_reply("https://evil.example")
    assert_reason(harness.check("Bearer opaque-8"), "issuer_untrusted", 403)


def test_introspection_audience_checked(harness: Harness, issuer_server: IssuerServer):
    issuer_server.introspection_results["opaque-9"] = active_reply(
        issuer_server.url, aud="someone-else"
    )
    assert_reason(harness.check("Bearer opaque-9"), "audience_mismatch", 403)


def test_jwt_not_introspected(harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey):
    token = rsa_key.sign(okta_claims(issuer_server.url))
    assert harness.check(f"Bearer {token}").status.code == 0
    assert issuer_server.introspections() == 0


# Configuration of the new keys


def base_document(tmp_path: Path) -> dict[str, Any]:
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    return policy_config("https://idp.example", secret)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda d: d["issuers"][0]["introspection"].update(client_secret="x"),
            "introspection.client_secret: secrets are not accepted inline",
        ),
        (
            lambda d: d["issuers"][0]["introspection"].update(client_secret_file="/nonexistent"),
            "client_secret_file: cannot read '/nonexistent'",
        ),
        (
            lambda d: d["issuers"][0]["introspection"].update(client_secret_env="X"),
            "needs exactly one of client_secret_file and client_secret_env",
        ),
        (
            lambda d: d["policies"][1].update(applications=["payroll-app"]),
            "policies[1].applications[0]: names application 'payroll-app'",
        ),
        (
            lambda d: d["applications"][1]["client_ids"].append("0oa-billing"),
            "client id '0oa-billing' is already registered by application 'billing-app'",
        ),
        (
            lambda d: d["policies"][2]["headers"].update({"Authorization": "sub"}),
            "invalid header name 'Authorization'",
        ),
        (
            lambda d: d["policies"][2]["headers"].update({"host": "sub"}),
            "header 'host' cannot carry identity",
        ),
        (
            lambda d: d["policies"][2]["headers"].update({"x-a": "realm_access..roles"}),
            "invalid claim path",
        ),
        (lambda d: d["policies"][0].update(mode="audit"), "policies[0].mode: invalid value"),
        (
            lambda d: d["policies"][1].update(required_scopes=["a b"]),
            "required_scopes[0]: invalid scope",
        ),
    ],
)
def test_policy_config_errors(tmp_path: Path, change: Any, expected: str):
    document = base_document(tmp_path)
    change(document)

    with pytest.raises(ConfigError) as raised:
        parse_config(document, source="f.yaml")

    assert expected in str(raised.value)
    assert SECRET not in str(raised.value)


def test_two_introspecting_issuers_in_policy_rejected(tmp_path: Path):
    document = base_document(tmp_path)
    second = {**document["issuers"][0], "name": "keycloak", "issuer": "https://kc.example"}
    document["issuers"].append(second)
    document["policies"][0]["issuers"] = ["okta", "keycloak"]

    with pytest.raises(ConfigError, match="at most one issuer with introspection"):
        parse_config(document)


def test_secret_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    document = base_document(tmp_path)
    introspection = document["issuers"][0]["introspection"]
    del introspection["client_secret_file"]
    introspection["client_secret_env"] = "OKTA_INTROSPECTION_SECRET"
    monkeypatch.setenv("OKTA_INTROSPECTION_SECRET", SECRET)

    config = parse_config(document)

    assert config.issuers[0].introspection is not None
    assert config.issuers[0].introspection.client_secret == SECRET
    assert SECRET not in repr(config)


# Explain


@pytest.fixture
def config_file(issuer_server: IssuerServer, secret_file: Path, tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(policy_config(issuer_server.url, secret_file)))
    yield path


def run_explain(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ext_authz.cli", "explain", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_explain_allowed_token(
    config_file: Path, issuer_server: IssuerServer, rsa_key: SigningKey, tmp_path: Path
):
    token_file = tmp_path / "token"
    token = rsa_key.sign(okta_claims(issuer_server.url))
    token_file.write_text(f"Bearer {token}\n")

    result = run_explain(
        "--config", str(config_file), "--policy", "billing", "--token-file", str(token_file)
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "policy:  billing" in result.stdout
    assert "[pass] verification: vouched for by issuer 'okta'" in result.stdout
    assert "result:  allow" in result.stdout
    assert "client:  0oa-billing (application billing-app)" in result.stdout
    assert '"cid": "0oa-billing"' in result.stdout
    assert token not in result.stdout
    assert token.split(".")[2] not in result.stdout


def test_explain_denied_token(config_file: Path, issuer_server: IssuerServer, rsa_key: SigningKey):
    token = rsa_key.sign(okta_claims(issuer_server.url, scp=["openid"]))

    result = run_explain("--config", str(config_file), "--policy", "billing", "--token", token)

    assert result.returncode == 1
    assert "[FAIL] policy checks: missing scopes: invoices.read" in result.stdout
    assert "result:  deny, reason scope_insufficient, HTTP 403" in result.stdout
    assert token not in result.stdout


def test_explain_usage_errors(config_file: Path):
    assert run_explain("--config", str(config_file)).returncode == 2
    unknown = run_explain("--config", str(config_file), "--policy", "nope", "--token", "x")
    assert unknown.returncode == 2
    assert "no policy named 'nope'" in unknown.stderr
