"""Issuer discovery, JWKS fetches, refetch on an unknown kid, and JWK parsing."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from ext_authz.config import IssuerConfig
from ext_authz.issuer_keys import IssuerKeys, metadata_urls
from ext_authz.jwks import parse_jwk, parse_jwks
from ext_authz.metrics import Metrics

from .support import IssuerServer, SigningKey


def issuer_config(url: str, **overrides: Any) -> IssuerConfig:
    settings: dict[str, Any] = {
        "name": "local",
        "issuer": url,
        "audiences": ("Amplify Central",),
        "allow_insecure_http": True,
        "fetch_timeout_seconds": 2.0,
        **overrides,
    }
    return IssuerConfig(**settings)


def test_oidc_metadata_url_appended():
    assert metadata_urls("https://tenant.auth0.com/", "/.well-known/openid-configuration") == [
        "https://tenant.auth0.com/.well-known/openid-configuration"
    ]


def test_rfc8414_metadata_url_inserted_then_appended():
    urls = metadata_urls(
        "https://example.okta.com/oauth2/default", "/.well-known/oauth-authorization-server"
    )
    assert urls == [
        "https://example.okta.com/.well-known/oauth-authorization-server/oauth2/default",
        "https://example.okta.com/oauth2/default/.well-known/oauth-authorization-server",
    ]


def test_rfc8414_metadata_url_for_host_only_issuer():
    urls = metadata_urls("https://idp.example", "/.well-known/oauth-authorization-server")
    assert urls == ["https://idp.example/.well-known/oauth-authorization-server"]


def test_discovery_loads_keys(issuer_server: IssuerServer):
    metrics = Metrics()
    keys = IssuerKeys(issuer_config(issuer_server.url), metrics)

    assert keys.refresh()

    assert keys.keys is not None
    assert len(keys.keys) == 2
    assert keys.state().jwks_uri == f"{issuer_server.url}/jwks.json"
    assert metrics.registry.get_sample_value("ext_authz_jwks_keys", {"issuer": "local"}) == 2
    assert (
        metrics.registry.get_sample_value(
            "ext_authz_jwks_fetches_total", {"issuer": "local", "result": "success"}
        )
        == 1
    )


def test_metadata_issuer_mismatch_refused(
    issuer_server: IssuerServer, caplog: pytest.LogCaptureFixture
):
    issuer_server.metadata_issuer = issuer_server.url + "/"
    keys = IssuerKeys(issuer_config(issuer_server.url), Metrics())

    assert not keys.refresh()

    assert keys.keys is None
    assert issuer_server.jwks_fetches() == 0
    assert f"'{issuer_server.url}/'" in caplog.text
    assert f"'{issuer_server.url}'" in caplog.text
    assert "configure the exact string" in caplog.text


def test_explicit_jwks_uri_skips_discovery(issuer_server: IssuerServer):
    config = issuer_config(issuer_server.url, jwks_uri=f"{issuer_server.url}/jwks.json")
    keys = IssuerKeys(config, Metrics())

    assert keys.refresh()

    assert issuer_server.requests == ["/jwks.json"]


def test_failed_fetch_keeps_keys(issuer_server: IssuerServer):
    keys = IssuerKeys(issuer_config(issuer_server.url), Metrics())
    keys.refresh()

    issuer_server.jwks_status = 503
    assert not keys.refresh()

    assert keys.keys is not None
    assert len(keys.keys) == 2
    assert keys.state().last_error is not None


def test_unknown_kid_refetch_rate_limited(issuer_server: IssuerServer):
    keys = IssuerKeys(issuer_config(issuer_server.url, jwks_min_refetch_seconds=30), Metrics())
    keys.refresh()
    rotated = SigningKey.ec("rotated")

    # The first refresh counts as the last attempt, so the rate limit applies now.
    issuer_server.keys.append(rotated)
    keys.refetch_for_unknown_kid()
    assert issuer_server.jwks_fetches() == 1
    assert keys.keys is not None
    assert not keys.keys.has_kid("rotated")


def test_unknown_kid_refetch_single_flight(issuer_server: IssuerServer):
    keys = IssuerKeys(issuer_config(issuer_server.url, jwks_min_refetch_seconds=30), Metrics())

    callers = [threading.Thread(target=keys.refetch_for_unknown_kid) for _ in range(8)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()

    assert keys.keys is not None
    assert len(keys.keys) == 2
    assert issuer_server.jwks_fetches() == 1


def test_removed_key_no_longer_accepted(issuer_server: IssuerServer, rsa_key: SigningKey):
    keys = IssuerKeys(issuer_config(issuer_server.url), Metrics())
    keys.refresh()

    issuer_server.keys.remove(rsa_key)
    keys.refresh()

    assert keys.keys is not None
    assert not keys.keys.has_kid(rsa_key.kid)


def test_bad_jwk_skipped_rest_usable(rsa_key: SigningKey, caplog: pytest.LogCaptureFixture):
    document = {
        "keys": [
            {"kty": "RSA", "kid": "no-modulus", "e": "AQAB"},
            {**rsa_key.public_jwk(), "kid": "encryption", "use": "enc"},
            {"kty": "oct", "kid": "secret", "k": "c2VjcmV0"},
            {"kty": "EC", "kid": "off-curve", "crv": "P-256", "x": "AAAA", "y": "AAAA"},
            "not an object",
            rsa_key.public_jwk(),
        ]
    }

    key_set = parse_jwks(document, "local", ("RS256", "ES256"))

    assert [key.kid for key in key_set.keys] == [rsa_key.kid]
    assert caplog.text.count("skipping JWK") == 5


def test_jwk_alg_restricts_algorithms(rsa_key: SigningKey):
    key = parse_jwk(rsa_key.public_jwk(), ("RS256", "PS256"))
    assert key.algorithms == frozenset({"RS256"})

    without_alg = {name: value for name, value in rsa_key.public_jwk().items() if name != "alg"}
    assert parse_jwk(without_alg, ("RS256", "PS256", "ES256")).algorithms == frozenset(
        {"RS256", "PS256"}
    )


def test_token_without_kid_needs_single_key(rsa_key: SigningKey, ec_key: SigningKey):
    second_rsa = SigningKey.rsa("k2")
    one = parse_jwks({"keys": [rsa_key.public_jwk(), ec_key.public_jwk()]}, "x", ("RS256", "ES256"))
    two = parse_jwks({"keys": [rsa_key.public_jwk(), second_rsa.public_jwk()]}, "x", ("RS256",))

    assert len(one.candidates(None, "RS256")) == 1
    assert two.candidates(None, "RS256") == []
