"""Issuer keys: discovery, fetch limits, refresh, unknown-kid refetches, staleness, JWKs."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from ext_authz.config import IssuerConfig
from ext_authz.issuer_fetch import metadata_urls
from ext_authz.issuer_keys import IssuerKeys, _refresh_interval
from ext_authz.jwks import parse_jwk, parse_jwks
from ext_authz.metrics import Metrics

from .support import IssuerServer, SigningKey, running_issuer


def issuer_config(url: str, **overrides: Any) -> IssuerConfig:
    settings: dict[str, Any] = {
        "name": "local",
        "issuer": url,
        "audiences": ("Amplify Central",),
        "allow_insecure_http": True,
        "fetch_timeout_seconds": 1.0,
        **overrides,
    }
    return IssuerConfig(**settings)


def fetch_count(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "ext_authz_jwks_fetches_total", {"issuer": "local", "result": result}
    )
    return value or 0.0


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# Discovery URLs


def test_oidc_metadata_url_appended():
    config = issuer_config("https://tenant.auth0.com/")
    assert metadata_urls(config) == ["https://tenant.auth0.com/.well-known/openid-configuration"]


def test_rfc8414_metadata_url_inserted_then_appended():
    config = issuer_config(
        "https://example.okta.com/oauth2/default",
        metadata_path="/.well-known/oauth-authorization-server",
    )
    assert metadata_urls(config) == [
        "https://example.okta.com/.well-known/oauth-authorization-server/oauth2/default",
        "https://example.okta.com/oauth2/default/.well-known/oauth-authorization-server",
    ]


def test_rfc8414_metadata_url_for_host_only_issuer():
    config = issuer_config(
        "https://idp.example", metadata_path="/.well-known/oauth-authorization-server"
    )
    assert metadata_urls(config) == ["https://idp.example/.well-known/oauth-authorization-server"]


def test_metadata_url_overrides_path():
    config = issuer_config("https://idp.example", metadata_url="https://meta.example/doc.json")
    assert metadata_urls(config) == ["https://meta.example/doc.json"]


# Discovery against a local issuer


def test_discovery_loads_keys(issuer_server: IssuerServer):
    metrics = Metrics()
    keys = IssuerKeys(issuer_config(issuer_server.url), metrics)

    assert keys.refresh()

    assert keys.keys is not None
    assert len(keys.keys) == 2
    assert keys.state().jwks_uri == f"{issuer_server.base_url}/jwks.json"
    assert metrics.registry.get_sample_value("ext_authz_jwks_keys", {"issuer": "local"}) == 2
    assert fetch_count(metrics, "ok") == 1


def test_issuer_with_trailing_slash(rsa_key: SigningKey):
    with running_issuer(IssuerServer(keys=[rsa_key], issuer_path="/")) as server:
        keys = IssuerKeys(issuer_config(server.url), Metrics())

        assert server.url.endswith("/")
        assert keys.refresh()
        assert server.requests[0] == "/.well-known/openid-configuration"


def test_rfc8414_inserted_form_fetched(rsa_key: SigningKey):
    path = "/.well-known/oauth-authorization-server/oauth2/default"
    server = IssuerServer(keys=[rsa_key], issuer_path="/oauth2/default", metadata_paths=[path])
    with running_issuer(server):
        config = issuer_config(server.url, metadata_path="/.well-known/oauth-authorization-server")
        keys = IssuerKeys(config, Metrics())

        assert keys.refresh()
        assert server.requests[0] == path


def test_rfc8414_appended_fallback_on_404(rsa_key: SigningKey):
    appended = "/oauth2/default/.well-known/oauth-authorization-server"
    server = IssuerServer(keys=[rsa_key], issuer_path="/oauth2/default", metadata_paths=[appended])
    with running_issuer(server):
        config = issuer_config(server.url, metadata_path="/.well-known/oauth-authorization-server")
        keys = IssuerKeys(config, Metrics())

        assert keys.refresh()
        assert server.requests[:2] == [
            "/.well-known/oauth-authorization-server/oauth2/default",
            appended,
        ]


def test_metadata_issuer_mismatch_refused(
    issuer_server: IssuerServer, caplog: pytest.LogCaptureFixture
):
    issuer_server.metadata_issuer = issuer_server.url + "/"
    metrics = Metrics()
    keys = IssuerKeys(issuer_config(issuer_server.url), metrics)

    assert not keys.refresh()

    assert keys.keys is None
    assert issuer_server.jwks_fetches() == 0
    assert f"'{issuer_server.url}/'" in caplog.text
    assert f"'{issuer_server.url}'" in caplog.text
    assert "configure the exact string" in caplog.text
    assert fetch_count(metrics, "invalid") == 1


def test_explicit_jwks_uri_skips_discovery(issuer_server: IssuerServer):
    config = issuer_config(issuer_server.url, jwks_uri=f"{issuer_server.base_url}/jwks.json")
    keys = IssuerKeys(config, Metrics())

    assert keys.refresh()

    assert issuer_server.requests == ["/jwks.json"]


# Fetch limits


@pytest.mark.parametrize(
    ("mode", "result", "logged"),
    [
        ("status", "http_error", "returned HTTP 500"),
        ("html", "invalid", "did not return JSON (body starts with '<html>"),
        ("empty", "invalid", "not a JSON object with a 'keys' list"),
        ("hang", "timeout", "timed out after 0.5 s"),
        ("huge", "invalid", "is larger than 1048576 bytes"),
        ("redirect_other_host", "invalid", "another scheme or host"),
    ],
)
def test_bad_jwks_response_is_failed_fetch(
    issuer_server: IssuerServer,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    result: str,
    logged: str,
):
    issuer_server.jwks_mode = mode
    issuer_server.jwks_status = 500
    issuer_server.hang_seconds = 2.0
    metrics = Metrics()
    keys = IssuerKeys(issuer_config(issuer_server.url, fetch_timeout_seconds=0.5), metrics)

    started = time.monotonic()
    assert not keys.refresh()

    assert time.monotonic() - started < 1.9
    assert keys.keys is None
    assert fetch_count(metrics, result) == 1
    assert logged in caplog.text
    assert "/jwks.json" in caplog.text


def test_same_host_redirect_followed(issuer_server: IssuerServer):
    issuer_server.jwks_mode = "redirect_same_host"
    keys = IssuerKeys(issuer_config(issuer_server.url), Metrics())

    assert keys.refresh()

    assert issuer_server.requests[-1] == "/jwks-moved.json"


def test_plain_http_refused_without_opt_in(issuer_server: IssuerServer):
    config = issuer_config("https://idp.example", jwks_uri=f"{issuer_server.base_url}/jwks.json")
    keys = IssuerKeys(IssuerConfig(**{**config.__dict__, "allow_insecure_http": False}), Metrics())

    assert not keys.refresh()

    assert issuer_server.requests == []
    assert "plain http" in (keys.state().last_error or "")


# Cache, refresh and refetch


def test_failed_fetch_keeps_keys(issuer_server: IssuerServer):
    keys = IssuerKeys(issuer_config(issuer_server.url), Metrics())
    keys.refresh()

    issuer_server.jwks_mode = "status"
    issuer_server.jwks_status = 503
    assert not keys.refresh()

    assert keys.keys is not None
    assert len(keys.keys) == 2
    assert keys.state().last_error is not None


def test_stale_keys_expire_after_max_stale(issuer_server: IssuerServer):
    clock = ManualClock()
    keys = IssuerKeys(
        issuer_config(issuer_server.url, jwks_max_stale_seconds=3600), Metrics(), clock=clock
    )
    keys.refresh()
    issuer_server.jwks_mode = "status"

    clock.now += 3599
    assert not keys.refresh()
    assert keys.keys is not None

    clock.now += 2
    assert keys.keys is None
    assert keys.state().stale


def test_removed_key_no_longer_accepted(issuer_server: IssuerServer, rsa_key: SigningKey):
    keys = IssuerKeys(issuer_config(issuer_server.url), Metrics())
    keys.refresh()

    issuer_server.keys.remove(rsa_key)
    keys.refresh()

    assert keys.keys is not None
    assert not keys.keys.has_kid(rsa_key.kid)


def test_rotation_logged(issuer_server: IssuerServer, caplog: pytest.LogCaptureFixture):
    caplog.set_level("INFO", logger="ext_authz")
    keys = IssuerKeys(issuer_config(issuer_server.url), Metrics())
    keys.refresh()

    issuer_server.keys = [issuer_server.keys[0], SigningKey.ec("e2")]
    keys.refresh()

    assert "key set changed: added ['e2'], removed ['e1']" in caplog.text


def test_unknown_kid_refetch_single_flight(issuer_server: IssuerServer):
    metrics = Metrics()
    keys = IssuerKeys(issuer_config(issuer_server.url, jwks_min_refetch_seconds=30), metrics)

    callers = [threading.Thread(target=keys.refetch_for_unknown_kid) for _ in range(8)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()

    assert keys.keys is not None
    assert len(keys.keys) == 2
    assert issuer_server.jwks_fetches() == 1
    refetches = metrics.registry.get_sample_value(
        "ext_authz_jwks_unknown_kid_refetches_total", {"issuer": "local"}
    )
    assert refetches == 1


def test_unknown_kid_refetch_rate_limited(issuer_server: IssuerServer):
    metrics = Metrics()
    keys = IssuerKeys(issuer_config(issuer_server.url, jwks_min_refetch_seconds=30), metrics)
    keys.refresh()

    issuer_server.keys.append(SigningKey.ec("rotated"))
    keys.refetch_for_unknown_kid()

    assert issuer_server.jwks_fetches() == 1
    assert keys.keys is not None
    assert not keys.keys.has_kid("rotated")
    assert fetch_count(metrics, "rate_limited") == 1


def test_unknown_kid_refetch_after_interval(issuer_server: IssuerServer):
    clock = ManualClock()
    keys = IssuerKeys(
        issuer_config(issuer_server.url, jwks_min_refetch_seconds=30), Metrics(), clock=clock
    )
    keys.refresh()
    issuer_server.keys.append(SigningKey.ec("rotated"))

    clock.now += 31
    keys.refetch_for_unknown_kid()

    assert issuer_server.jwks_fetches() == 2
    assert keys.keys is not None
    assert keys.keys.has_kid("rotated")


def test_slow_refetch_bounded_wait(issuer_server: IssuerServer):
    issuer_server.jwks_mode = "hang"
    issuer_server.hang_seconds = 1.0
    keys = IssuerKeys(
        issuer_config(issuer_server.url, refetch_wait_seconds=0.1, fetch_timeout_seconds=3),
        Metrics(),
    )

    started = time.monotonic()
    keys.refetch_for_unknown_kid()
    waited = time.monotonic() - started

    assert waited < 0.9
    assert keys.wait_loaded(5)


def test_cache_control_max_age_shortens_refresh(issuer_server: IssuerServer):
    config = issuer_config(issuer_server.url, jwks_refresh_seconds=300)

    assert _refresh_interval(config, None) == 300
    assert _refresh_interval(config, 120) == 120
    assert _refresh_interval(config, 5) == 30
    assert _refresh_interval(config, 3600) == 300


def test_background_thread_recovers_after_outage(issuer_server: IssuerServer):
    issuer_server.jwks_mode = "status"
    keys = IssuerKeys(issuer_config(issuer_server.url), Metrics())
    keys.start()
    try:
        time.sleep(0.3)
        assert keys.keys is None

        issuer_server.jwks_mode = "ok"

        assert keys.wait_loaded(5)
    finally:
        keys.stop()


# JWK parsing


def bad_jwk_cases(rsa_key: SigningKey, ec_key: SigningKey) -> dict[str, Any]:
    ec_jwk = ec_key.public_jwk()
    return {
        "not an object": "not an object",
        "RSA without n": {"kty": "RSA", "kid": "no-n", "e": "AQAB"},
        "RSA without e": {
            "kty": "RSA",
            "kid": "no-e",
            "n": rsa_key.public_jwk()["n"],
        },
        "encryption key": {**rsa_key.public_jwk(), "kid": "enc", "use": "enc"},
        "symmetric key": {"kty": "oct", "kid": "secret", "k": "c2VjcmV0"},
        "unsupported kty": {"kty": "XYZ", "kid": "xyz"},
        "EC point off curve": {**ec_jwk, "kid": "off-curve", "y": ec_jwk["x"]},
        "EC short coordinate": {**ec_jwk, "kid": "short", "x": ec_jwk["x"][:-4]},
        "EC unknown curve": {**ec_jwk, "kid": "curve", "crv": "P-192"},
        "private key": {**rsa_key.public_jwk(), "kid": "private", "d": "AAAA"},
        "alg not allowed": {**rsa_key.public_jwk(), "kid": "hs", "alg": "HS256"},
    }


def test_bad_jwks_skipped_rest_usable(
    rsa_key: SigningKey, ec_key: SigningKey, caplog: pytest.LogCaptureFixture
):
    cases = bad_jwk_cases(rsa_key, ec_key)
    for name, entry in cases.items():
        caplog.clear()

        key_set = parse_jwks({"keys": [entry, rsa_key.public_jwk()]}, "local", ("RS256", "ES256"))

        assert [key.kid for key in key_set.keys] == [rsa_key.kid], name
        assert "skipping JWK 0" in caplog.text, name


def test_jwk_alg_restricts_algorithms(rsa_key: SigningKey):
    key = parse_jwk(rsa_key.public_jwk(), ("RS256", "PS256"))
    assert key.algorithms == frozenset({"RS256"})

    without_alg = {name: value for name, value in rsa_key.public_jwk().items() if name != "alg"}
    assert parse_jwk(without_alg, ("RS256", "PS256", "ES256")).algorithms == frozenset(
        {"RS256", "PS256"}
    )


def test_same_kid_keys_all_candidates(rsa_key: SigningKey):
    twin = SigningKey.rsa(rsa_key.kid)
    key_set = parse_jwks({"keys": [rsa_key.public_jwk(), twin.public_jwk()]}, "x", ("RS256",))
    assert len(key_set.candidates(rsa_key.kid, "RS256")) == 2


def test_token_without_kid_needs_single_key(rsa_key: SigningKey, ec_key: SigningKey):
    second_rsa = SigningKey.rsa("k2")
    one = parse_jwks({"keys": [rsa_key.public_jwk(), ec_key.public_jwk()]}, "x", ("RS256", "ES256"))
    two = parse_jwks({"keys": [rsa_key.public_jwk(), second_rsa.public_jwk()]}, "x", ("RS256",))

    assert len(one.candidates(None, "RS256")) == 1
    assert two.candidates(None, "RS256") == []
