"""The verified-token cache: hits skip the signature check, never the time or policy checks."""

from __future__ import annotations

import time
from typing import Any

import pytest

from ext_authz.config import parse_config
from ext_authz.signatures import SIGNATURE_CHECKS

from .support import IssuerServer, SigningKey, claims_for
from .test_check import Harness, headers_of


def cache_config(url: str, size: int = 100, **issuer: Any) -> dict[str, Any]:
    return {
        "server": {"verified_token_cache_size": size},
        "issuers": [
            {
                "name": "local",
                "issuer": url,
                "audiences": ["Amplify Central", "other"],
                "allow_insecure_http": True,
                "jwks_min_refetch_seconds": 30,
                **issuer,
            },
            {"name": "elsewhere", "issuer": "https://elsewhere.example", "audiences": ["x"]},
        ],
        "policies": [
            {"name": "default", "issuers": ["local"]},
            {"name": "scoped", "issuers": ["local"], "required_scopes": ["write"]},
            {"name": "elsewhere-only", "issuers": ["elsewhere"]},
        ],
    }


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count RS256 signature verifications."""
    calls: list[int] = []
    original = SIGNATURE_CHECKS["RS256"]

    def counting(signing_input: bytes, key: Any, signature: bytes) -> bool:
        calls.append(1)
        return original(signing_input, key, signature)

    monkeypatch.setitem(SIGNATURE_CHECKS, "RS256", counting)
    return calls


def reason(harness: Harness, token: str, policy: str | None = None) -> str:
    response = harness.check(f"Bearer {token}", policy=policy)
    return "ok" if response.status.code == 0 else response.status.message


def test_hit_skips_signature_check(
    issuer_server: IssuerServer, rsa_key: SigningKey, verifications: list[int]
):
    harness = Harness(cache_config(issuer_server.url))
    token = rsa_key.sign(claims_for(issuer_server.url))

    assert reason(harness, token) == "ok"
    assert reason(harness, token) == "ok"

    assert len(verifications) == 1


def test_disabled_cache_verifies_each_time(
    issuer_server: IssuerServer, rsa_key: SigningKey, verifications: list[int]
):
    harness = Harness(cache_config(issuer_server.url, size=0))
    token = rsa_key.sign(claims_for(issuer_server.url))

    for _ in range(3):
        assert reason(harness, token) == "ok"

    assert len(verifications) == 3


def test_hit_still_checks_expiry(issuer_server: IssuerServer, rsa_key: SigningKey):
    harness = Harness(cache_config(issuer_server.url, leeway_seconds=0))
    token = rsa_key.sign(claims_for(issuer_server.url, exp=int(time.time()) + 2))
    assert reason(harness, token) == "ok"

    time.sleep(2.2)

    assert reason(harness, token) == "token_expired"


def test_hit_still_applies_policy(issuer_server: IssuerServer, rsa_key: SigningKey):
    harness = Harness(cache_config(issuer_server.url))
    token = rsa_key.sign(claims_for(issuer_server.url, scope="read"))
    assert reason(harness, token) == "ok"

    assert reason(harness, token, policy="scoped") == "scope_insufficient"
    assert reason(harness, token, policy="elsewhere-only") == "issuer_untrusted"


def test_removed_key_invalidates_entry(
    issuer_server: IssuerServer, rsa_key: SigningKey, verifications: list[int]
):
    harness = Harness(cache_config(issuer_server.url))
    token = rsa_key.sign(claims_for(issuer_server.url))
    assert reason(harness, token) == "ok"

    issuer_server.keys.remove(rsa_key)
    assert harness.keys["local"].refresh()

    assert reason(harness, token) == "key_not_found"


def test_unchanged_refresh_keeps_entry(
    issuer_server: IssuerServer, rsa_key: SigningKey, verifications: list[int]
):
    harness = Harness(cache_config(issuer_server.url))
    token = rsa_key.sign(claims_for(issuer_server.url))
    assert reason(harness, token) == "ok"

    assert harness.keys["local"].refresh()

    assert reason(harness, token) == "ok"
    assert len(verifications) == 1


def test_stale_keys_end_cached_entries(issuer_server: IssuerServer, rsa_key: SigningKey):
    clock = [1000.0]
    harness = Harness(
        cache_config(issuer_server.url, jwks_max_stale_seconds=600), clock=lambda: clock[0]
    )
    token = rsa_key.sign(claims_for(issuer_server.url))
    assert reason(harness, token) == "ok"

    issuer_server.jwks_mode = "status"
    issuer_server.jwks_status = 503
    clock[0] += 601

    assert reason(harness, token) == "keys_unavailable"


def test_cache_size_bounded(issuer_server: IssuerServer, rsa_key: SigningKey):
    harness = Harness(cache_config(issuer_server.url, size=5))

    for index in range(20):
        token = rsa_key.sign(claims_for(issuer_server.url, jti=f"token-{index}"))
        assert reason(harness, token) == "ok"

    cache = harness.service.engine._verifier.cache
    assert cache is not None
    assert len(cache) == 5


def test_invalid_tokens_not_cached(issuer_server: IssuerServer, rsa_key: SigningKey):
    harness = Harness(cache_config(issuer_server.url, size=5))
    stranger = SigningKey.rsa("k1")

    for index in range(10):
        forged = stranger.sign(claims_for(issuer_server.url, jti=f"forged-{index}"))
        assert reason(harness, forged) == "signature_invalid"

    cache = harness.service.engine._verifier.cache
    assert cache is not None
    assert len(cache) == 0


# The allow response of a cached verification is rendered once per policy.


def test_allow_response_rendered_per_policy(issuer_server: IssuerServer, rsa_key: SigningKey):
    document = cache_config(issuer_server.url)
    document["policies"][0]["headers"] = {"x-caller": "sub"}
    document["policies"][1] = {"name": "named", "issuers": ["local"], "headers": {"x-who": "sub"}}
    harness = Harness(document)
    token = rsa_key.sign(claims_for(issuer_server.url, sub="alice"))

    first = harness.check(f"Bearer {token}")
    again = harness.check(f"Bearer {token}")
    other = harness.check(f"Bearer {token}", policy="named")

    assert headers_of(first)["x-caller"] == "alice"
    assert again == first
    assert headers_of(other)["x-who"] == "alice"
    assert "x-caller" not in headers_of(other)


def test_reload_renders_allow_response_again(issuer_server: IssuerServer, rsa_key: SigningKey):
    document = cache_config(issuer_server.url)
    harness = Harness(document)
    token = rsa_key.sign(claims_for(issuer_server.url, sub="alice"))
    assert "x-caller" not in headers_of(harness.check(f"Bearer {token}"))

    document["policies"][0]["headers"] = {"x-caller": "sub"}
    harness.service.replace_config(parse_config(document), harness.keys)

    assert headers_of(harness.check(f"Bearer {token}"))["x-caller"] == "alice"
    assert harness.count("ok", decision="allow") == 2
