"""The Check pipeline through the servicer, with keys from a local issuer server."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest

from ext_authz.api.envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
from ext_authz.config import parse_config
from ext_authz.issuer_keys import IssuerKeys
from ext_authz.metrics import Metrics
from ext_authz.service import AuthorizationService

from .support import IssuerServer, SigningKey, claims_for


def make_config(issuer_url: str, **deny: Any) -> dict[str, Any]:
    return {
        "issuers": [
            {
                "name": "local",
                "issuer": issuer_url,
                "audiences": ["Amplify Central", "other-api"],
                "allow_insecure_http": True,
                "jwks_min_refetch_seconds": 0,
                "fetch_timeout_seconds": 2,
            },
            {
                "name": "elsewhere",
                "issuer": "https://elsewhere.example/",
                "audiences": ["Amplify Central"],
            },
        ],
        "policies": [
            {"name": "default", "issuers": ["local"]},
            {"name": "elsewhere-only", "issuers": ["elsewhere"]},
        ],
        "deny": deny or {"authentication_status": 403},
    }


class Harness:
    """The servicer with its issuer key stores; `load` fetches the "local" issuer's keys once."""

    def __init__(
        self,
        config_document: dict[str, Any],
        load: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        config = parse_config(config_document)
        self.metrics = Metrics()
        self.keys = {
            issuer.name: IssuerKeys(issuer, self.metrics, clock=clock) for issuer in config.issuers
        }
        if load:
            self.keys[config.issuers[0].name].refresh()
        self.service = AuthorizationService(config, self.keys, self.metrics)

    def check(
        self, authorization: str | None = None, policy: str | None = None, **headers: str
    ) -> CheckResponse:
        request = CheckRequest()
        http = request.attributes.request.http
        if authorization is not None:
            http.headers["authorization"] = authorization
        for name, value in headers.items():
            http.headers[name.replace("_", "-")] = value
        if policy is not None:
            request.attributes.context_extensions["policy"] = policy
        return self.service.Check(request, None)  # type: ignore[arg-type]

    def count(self, reason: str, decision: str = "deny", policy: str = "default") -> float:
        value = self.metrics.registry.get_sample_value(
            "ext_authz_decisions_total", {"policy": policy, "decision": decision, "reason": reason}
        )
        return value or 0.0


@pytest.fixture
def harness(issuer_server: IssuerServer) -> Iterator[Harness]:
    yield Harness(make_config(issuer_server.url))


def headers_of(response: CheckResponse) -> dict[str, str]:
    options = response.denied_response.headers or response.ok_response.headers
    return {option.header.key: option.header.value for option in options}


def assert_denied(response: CheckResponse, status: int, error: str | None) -> dict[str, str]:
    assert response.status.code != 0
    assert response.WhichOneof("http_response") == "denied_response"
    assert response.denied_response.status.code == status
    headers = headers_of(response)
    assert headers["content-type"] == "application/json"
    body = json.loads(response.denied_response.body)
    assert set(body) == {"error", "error_description"}
    if error is not None:
        assert f'error="{error}"' in headers["www-authenticate"]
    return headers


def test_valid_token_allowed(harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey):
    token = rsa_key.sign(claims_for(issuer_server.url))

    response = harness.check(f"Bearer {token}")

    assert response.status.code == 0
    assert response.WhichOneof("http_response") == "ok_response"
    assert headers_of(response) == {
        "x-auth-issuer": issuer_server.url,
        "x-auth-subject": "user-1",
        "x-auth-client-id": "app-1",
    }
    assert all(option.append.value is False for option in response.ok_response.headers)
    assert all(option.HasField("append") for option in response.ok_response.headers)
    assert list(response.ok_response.headers_to_remove) == ["x-auth-application"]
    assert harness.count("ok", decision="allow") == 1


def test_es256_token_allowed(harness: Harness, issuer_server: IssuerServer, ec_key: SigningKey):
    token = ec_key.sign(claims_for(issuer_server.url, aud=["x", "other-api"]))
    assert harness.check(f"Bearer {token}").status.code == 0


@pytest.mark.parametrize(("claim", "header"), [("cid", "okta-app"), ("azp", "keycloak-app")])
def test_client_id_fallback_claims(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey, claim: str, header: str
):
    token = rsa_key.sign(claims_for(issuer_server.url, client_id=None, **{claim: header}))
    assert headers_of(harness.check(f"Bearer {token}"))["x-auth-client-id"] == header


def test_missing_identity_claims_removed(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(claims_for(issuer_server.url, client_id=None, sub=None))

    response = harness.check(f"Bearer {token}", x_auth_subject="forged")

    assert response.status.code == 0
    assert set(response.ok_response.headers_to_remove) == {
        "x-auth-subject",
        "x-auth-client-id",
        "x-auth-application",
    }
    assert "x-auth-subject" not in headers_of(response)


def test_no_token_denied_without_error_attribute(harness: Harness):
    response = harness.check()

    headers = assert_denied(response, 403, None)
    assert headers["www-authenticate"] == 'Bearer realm="default"'
    assert json.loads(response.denied_response.body)["error"] == "invalid_request"
    assert harness.count("token_missing") == 1


def test_status_401_when_configured(issuer_server: IssuerServer):
    harness = Harness(make_config(issuer_server.url, authentication_status=401))
    assert_denied(harness.check(), 401, None)
    assert harness.count("token_missing") == 1


def deny_cases(url: str, rsa_key: SigningKey, other_key: SigningKey) -> list[tuple[str, str]]:
    valid = rsa_key.sign(claims_for(url))
    header, payload, signature = valid.split(".")
    tampered_signature = signature[:-4] + ("AAAA" if signature[-4:] != "AAAA" else "BBBB")
    return [
        ("token_expired", rsa_key.sign(claims_for(url, exp=1_000_000, iat=999_000))),
        ("token_not_yet_valid", rsa_key.sign(claims_for(url, nbf=4_000_000_000))),
        ("token_not_yet_valid", rsa_key.sign(claims_for(url, iat=4_000_000_000))),
        ("token_malformed", rsa_key.sign(claims_for(url, exp=None))),
        ("token_malformed", rsa_key.sign(claims_for(url, exp="tomorrow"))),
        ("token_malformed", rsa_key.sign(claims_for(url, aud=[123]))),
        ("token_malformed", "not-a-jwt"),
        ("token_malformed", f"{header}.{payload}"),
        ("token_malformed", f"{header}=.{payload}.{signature}"),
        ("signature_invalid", f"{header}.{payload}.{tampered_signature}"),
        ("signature_invalid", rsa_key.sign(claims_for(url, exp=1_000_000)) + "AA"),
        ("audience_mismatch", rsa_key.sign(claims_for(url, aud="Amplify"))),
        ("audience_mismatch", rsa_key.sign(claims_for(url, aud=None))),
        ("issuer_untrusted", rsa_key.sign(claims_for("https://evil.example"))),
        ("issuer_untrusted", rsa_key.sign(claims_for(url + "/"))),
        ("issuer_untrusted", rsa_key.sign(claims_for("https://elsewhere.example/"))),
        ("key_not_found", other_key.sign(claims_for(url))),
        ("algorithm_not_allowed", jwt_with_algorithm("HS256", url)),
        ("algorithm_not_allowed", jwt_with_algorithm("none", url)),
    ]


def jwt_with_algorithm(algorithm: str, issuer: str) -> str:
    if algorithm == "none":
        return jwt.encode(claims_for(issuer), None, algorithm="none", headers={"kid": "k1"})
    return jwt.encode(claims_for(issuer), "secret" * 6, algorithm=algorithm, headers={"kid": "k1"})


def test_each_deny_reason(harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey):
    other_key = SigningKey.rsa("unknown-kid")
    for reason, token in deny_cases(issuer_server.url, rsa_key, other_key):
        before = harness.count(reason)

        response = harness.check(f"Bearer {token}")

        assert response.status.message == reason, reason
        assert_denied(response, 403, "invalid_token")
        assert harness.count(reason) == before + 1, reason


def test_description_never_echoes_token(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(claims_for(issuer_server.url, aud="secret-audience-value"))

    response = harness.check(f"Bearer {token}")

    assert token not in response.denied_response.body
    assert "secret-audience-value" not in response.denied_response.body
    assert "secret-audience-value" not in headers_of(response)["www-authenticate"]


@pytest.mark.parametrize(
    "authorization",
    ["Bearer a.b.c,Bearer d.e.f", "Bearer a.b.c extra", "Bearer", "Bearer  ", "Bearera.b.c"],
)
def test_malformed_authorization_denied(harness: Harness, authorization: str):
    response = harness.check(authorization)
    assert response.status.message == "token_malformed"
    assert_denied(response, 403, "invalid_token")


def test_lowercase_scheme_and_spaces_allowed(
    harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(claims_for(issuer_server.url))
    assert harness.check(f"  bearer    {token}  ").status.code == 0


def test_basic_scheme_is_missing_token(harness: Harness):
    response = harness.check("Basic dXNlcjpwYXNz")
    assert response.status.message == "token_missing"


def test_query_token_ignored(harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey):
    token = rsa_key.sign(claims_for(issuer_server.url))
    request = CheckRequest()
    request.attributes.request.http.path = f"/?access_token={token}"
    response = harness.service.Check(request, None)  # type: ignore[arg-type]
    assert response.status.message == "token_missing"


def test_unknown_policy_denied(harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey):
    token = rsa_key.sign(claims_for(issuer_server.url))

    response = harness.check(f"Bearer {token}", policy="no-such-policy")

    assert response.status.message == "policy_unknown"
    assert_denied(response, 403, "access_denied")
    assert "no-such-policy" not in response.denied_response.body
    assert harness.count("policy_unknown", policy="_unknown") == 1


def test_unknown_policy_log_names_it(harness: Harness, caplog: pytest.LogCaptureFixture):
    caplog.set_level("INFO", logger="ext_authz")

    harness.check("Bearer a.b.c", policy="ordrs-api")

    line = next(record for record in caplog.records if record.getMessage().startswith("denied"))
    assert "no policy named 'ordrs-api' is configured" in line.__dict__["detail"]


def test_named_policy_selected(harness: Harness, issuer_server: IssuerServer, rsa_key: SigningKey):
    token = rsa_key.sign(claims_for(issuer_server.url))

    response = harness.check(f"Bearer {token}", policy="elsewhere-only")

    assert response.status.message == "issuer_untrusted"
    assert harness.count("issuer_untrusted", policy="elsewhere-only") == 1


def test_keys_unavailable_is_503(issuer_server: IssuerServer, rsa_key: SigningKey):
    issuer_server.jwks_mode = "status"
    issuer_server.jwks_status = 500
    harness = Harness(make_config(issuer_server.url))
    token = rsa_key.sign(claims_for(issuer_server.url))

    response = harness.check(f"Bearer {token}")

    assert response.status.message == "keys_unavailable"
    assert_denied(response, 503, "temporarily_unavailable")


def test_empty_request_denied():
    harness = Harness(make_config("http://127.0.0.1:9"))
    response = harness.service.Check(CheckRequest(), None)  # type: ignore[arg-type]
    assert response.status.message == "token_missing"


def test_exception_becomes_internal_error(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    def explode(view: object, **options: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(harness.service.engine, "decide", explode)

    response = harness.check("Bearer a.b.c")

    assert response.status.message == "internal_error"
    assert_denied(response, 500, "server_error")
    assert "RuntimeError: boom" in caplog.text
    assert harness.count("internal_error", policy="_unknown") == 1


def test_deny_log_line_has_ids_not_token(
    harness: Harness,
    issuer_server: IssuerServer,
    rsa_key: SigningKey,
    caplog: pytest.LogCaptureFixture,
):
    token = rsa_key.sign(claims_for(issuer_server.url, aud="wrong"))
    caplog.set_level("INFO", logger="ext_authz")

    harness.check(f"Bearer {token}", x_request_id="req-42")

    line = next(record for record in caplog.records if record.getMessage().startswith("denied"))
    assert line.__dict__["reason"] == "audience_mismatch"
    assert line.__dict__["request_id"] == "req-42"
    assert line.__dict__["client_id"] == "app-1"
    assert line.__dict__["issuer"] == "local"
    assert token not in caplog.text
    assert token.split(".")[2] not in caplog.text
