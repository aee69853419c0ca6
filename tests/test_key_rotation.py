"""Key rotation and issuer outages through the Check servicer, with a controllable issuer."""

from __future__ import annotations

import random
import string
import time
from typing import Any

from .support import IssuerServer, SigningKey, claims_for
from .test_check import Harness


def rotation_config(url: str, **issuer: Any) -> dict[str, Any]:
    return {
        "issuers": [
            {
                "name": "local",
                "issuer": url,
                "audiences": ["Amplify Central"],
                "allow_insecure_http": True,
                "fetch_timeout_seconds": 2,
                "refetch_wait_seconds": 2,
                **issuer,
            }
        ],
        "policies": [{"name": "default", "issuers": ["local"]}],
    }


def test_new_kid_allowed_after_one_refetch(issuer_server: IssuerServer):
    harness = Harness(rotation_config(issuer_server.url, jwks_min_refetch_seconds=0))
    rotated = SigningKey.rsa("rotated")
    issuer_server.keys.append(rotated)
    fetches_before = issuer_server.jwks_fetches()

    response = harness.check(f"Bearer {rotated.sign(claims_for(issuer_server.url))}")

    assert response.status.code == 0
    assert issuer_server.jwks_fetches() == fetches_before + 1


def test_unknown_kid_flood_one_fetch(issuer_server: IssuerServer, rsa_key: SigningKey):
    # The harness's first fetch is the last attempt, so the refetch interval holds.
    harness = Harness(rotation_config(issuer_server.url, jwks_min_refetch_seconds=30))
    legitimate = rsa_key.sign(claims_for(issuer_server.url))
    fetches_before = issuer_server.jwks_fetches()
    impostor = SigningKey.rsa("impostor")

    for index in range(1000):
        kid = "".join(random.choices(string.ascii_letters, k=12))
        forged = impostor.sign(claims_for(issuer_server.url), headers={"kid": kid})

        assert harness.check(f"Bearer {forged}").status.message == "key_not_found"
        if index % 100 == 0:
            assert harness.check(f"Bearer {legitimate}").status.code == 0

    assert issuer_server.jwks_fetches() - fetches_before <= 1
    assert harness.count("key_not_found") == 1000
    assert harness.count("ok", decision="allow") == 10


def test_token_key_headers_never_fetched(issuer_server: IssuerServer, rsa_key: SigningKey):
    harness = Harness(rotation_config(issuer_server.url))
    stranger = SigningKey.rsa("k1")
    jku = f"{issuer_server.base_url}/attacker-jwks.json"
    headers = {
        "jku": jku,
        "x5u": f"{issuer_server.base_url}/cert.pem",
        "jwk": stranger.public_jwk(),
        "x5c": ["MIIB"],
    }

    token = stranger.sign(claims_for(issuer_server.url), headers=headers)
    response = harness.check(f"Bearer {token}")

    assert response.status.message == "signature_invalid"
    assert not any("attacker" in path or "cert" in path for path in issuer_server.requests)


def test_outage_keeps_keys_until_max_stale(issuer_server: IssuerServer, rsa_key: SigningKey):
    clock = [1000.0]
    harness = Harness(
        rotation_config(issuer_server.url, jwks_max_stale_seconds=600), clock=lambda: clock[0]
    )
    token = rsa_key.sign(claims_for(issuer_server.url, exp=int(time.time()) + 3600))

    issuer_server.jwks_mode = "status"
    clock[0] += 590
    assert not harness.keys["local"].refresh()
    assert harness.check(f"Bearer {token}").status.code == 0

    clock[0] += 20
    response = harness.check(f"Bearer {token}")

    assert response.status.message == "keys_unavailable"
    assert response.denied_response.status.code == 503


def test_issuer_down_at_start_then_up(issuer_server: IssuerServer, rsa_key: SigningKey):
    issuer_server.jwks_mode = "status"
    harness = Harness(rotation_config(issuer_server.url, jwks_min_refetch_seconds=0), load=False)
    keys = harness.keys["local"]
    keys.start()
    try:
        token = rsa_key.sign(claims_for(issuer_server.url))
        assert harness.check(f"Bearer {token}").status.message == "keys_unavailable"

        issuer_server.jwks_mode = "ok"

        assert keys.wait_loaded(10)
        assert harness.check(f"Bearer {token}").status.code == 0
    finally:
        keys.stop()


def test_removed_key_denied_after_refresh(issuer_server: IssuerServer, rsa_key: SigningKey):
    harness = Harness(rotation_config(issuer_server.url, jwks_min_refetch_seconds=30))
    token = rsa_key.sign(claims_for(issuer_server.url))
    assert harness.check(f"Bearer {token}").status.code == 0

    issuer_server.keys.remove(rsa_key)
    assert harness.keys["local"].refresh()

    assert harness.check(f"Bearer {token}").status.message == "key_not_found"
