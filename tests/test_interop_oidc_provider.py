"""Interoperability with a real OpenID Connect provider: the oidc-provider npm package."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from ext_authz.dev.stack import Stack, StackPorts, local_sidecar_config, policy_route

from .support import decision_count, free_port, send

pytestmark = pytest.mark.interop

PROVIDER_DIR = Path(__file__).parent / "interop" / "oidc_provider"
CLIENT_ID = "interop-client"
CLIENT_SECRET = "interop-secret"


class Provider:
    def __init__(self, process: subprocess.Popen[str], url: str) -> None:
        self.process = process
        self.url = url

    def token(self, scope: str | None = None) -> str:
        form = {"grant_type": "client_credentials", **({"scope": scope} if scope else {})}
        return str(self._post("/token", form)["access_token"])

    def revoke(self, token: str) -> None:
        """Revoke a token as its owner (RFC 7009)."""
        self._post("/token/revocation", {"token": token})

    def _post(self, path: str, form: dict[str, str]) -> dict[str, Any]:
        credentials = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=urllib.parse.urlencode(form).encode(),
            headers={
                "Authorization": f"Basic {credentials}",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else {}


def start_provider(
    algorithm: str,
    port: int | None = None,
    jwks_file: Path | None = None,
    extra: tuple[str, ...] = (),
) -> Provider:
    node = shutil.which("node")
    if node is None or not (PROVIDER_DIR / "node_modules" / "oidc-provider").exists():
        pytest.fail("Node.js or the oidc-provider package is missing: run `make test-deps`")
    command = [node, "server.mjs", "--port", str(port or free_port()), "--alg", algorithm]
    if jwks_file is not None:
        command += ["--jwks-file", str(jwks_file)]
    command += extra
    process = subprocess.Popen(
        command,
        cwd=PROVIDER_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("READY "):
        process.kill()
        pytest.fail(f"oidc-provider did not start (exit code {process.wait()}), stdout: {line!r}")
    return Provider(process, line.removeprefix("READY "))


def stop_provider(provider: Provider) -> None:
    provider.process.terminate()
    provider.process.wait(timeout=10)


def start_stack(
    workdir: Path,
    provider: Provider,
    audience: str,
    policies: list[dict[str, Any]] | None = None,
    routes: list[dict[str, Any]] | None = None,
    **issuer_settings: Any,
) -> Stack:
    ports = StackPorts(
        envoy=free_port(),
        envoy_admin=free_port(),
        grpc=free_port(),
        http=free_port(),
        issuer=free_port(),
        upstream=free_port(),
    )
    sidecar: dict[str, Any] = local_sidecar_config(ports)
    sidecar["issuers"] = [
        {
            "name": "oidc-provider",
            "issuer": provider.url,
            "audiences": [audience],
            "allow_insecure_http": True,
            **issuer_settings,
        }
    ]
    sidecar["policies"] = [{"name": "default", "issuers": ["oidc-provider"]}, *(policies or [])]
    stack = Stack(
        workdir=workdir,
        ports=ports,
        sidecar_config=sidecar,
        extra_routes=routes or [],
        start_dev_issuer=False,
    )
    stack.start()
    return stack


@pytest.fixture(scope="module", params=["RS256", "ES256"])
def provider(request: pytest.FixtureRequest) -> Iterator[Provider]:
    started = start_provider(request.param)
    yield started
    stop_provider(started)


def test_provider_token_allowed(provider: Provider, tmp_path: Path):
    stack = start_stack(tmp_path, provider, audience="Amplify Central")
    try:
        status, _, body = send(
            stack.envoy_url, "GET", "/orders", [("Authorization", f"Bearer {provider.token()}")]
        )

        assert status == 200, body
        received = json.loads(body)["headers"]
        assert received["x-auth-issuer"] == provider.url
        assert received["x-auth-client-id"] == CLIENT_ID
        assert decision_count(stack, "ok") == 1
    finally:
        stack.stop()


def test_provider_token_other_audience_denied(provider: Provider, tmp_path: Path):
    stack = start_stack(tmp_path, provider, audience="Billing API")
    try:
        status, headers, _ = send(
            stack.envoy_url, "GET", "/orders", [("Authorization", f"Bearer {provider.token()}")]
        )

        assert status == 403
        assert 'error="invalid_token"' in headers["www-authenticate"]
        assert decision_count(stack, "audience_mismatch") == 1
    finally:
        stack.stop()


def private_jwk(kid: str) -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key, as_dict=True)
    return {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}


def call_with_provider_token(stack: Stack, provider: Provider) -> int:
    token = provider.token()
    status, _, _ = send(stack.envoy_url, "GET", "/", [("Authorization", f"Bearer {token}")])
    return status


def token_kid(provider: Provider) -> str:
    return str(jwt.get_unverified_header(provider.token())["kid"])


def test_rotation_without_sidecar_restart(tmp_path: Path):
    """The provider publishes a new key, then signs with it, restarting between phases."""
    old, new = private_jwk("old"), private_jwk("new")
    jwks_file = tmp_path / "jwks.json"
    port = free_port()

    jwks_file.write_text(json.dumps({"keys": [old]}))
    provider = start_provider("RS256", port, jwks_file)
    # A refetch interval of 0 lets the test see the refetch at once; the
    # default of 30 s only delays it.
    stack = start_stack(tmp_path / "stack", provider, "Amplify Central", jwks_min_refetch_seconds=0)
    try:
        assert call_with_provider_token(stack, provider) == 200

        # Phase 2: the new key is published, tokens are still signed with the old one.
        stop_provider(provider)
        jwks_file.write_text(json.dumps({"keys": [old, new]}))
        provider = start_provider("RS256", port, jwks_file)
        assert token_kid(provider) == "old"
        assert call_with_provider_token(stack, provider) == 200

        # Phase 3: the new key signs. The sidecar has not seen it and refetches.
        stop_provider(provider)
        jwks_file.write_text(json.dumps({"keys": [new, old]}))
        provider = start_provider("RS256", port, jwks_file)
        assert token_kid(provider) == "new"
        assert call_with_provider_token(stack, provider) == 200

        assert decision_count(stack, "ok") == 3
        metrics = stack.metrics_text()
        assert 'ext_authz_jwks_unknown_kid_refetches_total{issuer="oidc-provider"} 1.0' in metrics
    finally:
        stack.stop()
        stop_provider(provider)


def introspection_settings(tmp_path: Path, cache_seconds: int) -> dict[str, Any]:
    secret = tmp_path / "introspection-secret"
    secret.write_text("ext-authz-secret\n")
    return {
        "introspection": {
            "client_id": "ext-authz",
            "client_secret_file": str(secret),
            "cache_seconds": cache_seconds,
        }
    }


def call(stack: Stack, path: str, token: str) -> int:
    status, _, _ = send(stack.envoy_url, "GET", path, [("Authorization", f"Bearer {token}")])
    return status


def test_opaque_token_introspected(tmp_path: Path):
    provider = start_provider("RS256", extra=("--token-format", "opaque"))
    stack = start_stack(
        tmp_path / "stack",
        provider,
        "Amplify Central",
        policies=[{"name": "writers", "issuers": ["oidc-provider"], "required_scopes": ["write"]}],
        routes=[policy_route("/write", "writers")],
        **introspection_settings(tmp_path, cache_seconds=2),
    )
    try:
        token = provider.token(scope="read")
        assert token.count(".") != 2

        assert call(stack, "/", token) == 200
        # Same cached introspection result, evaluated against another policy.
        assert call(stack, "/write", token) == 403
        assert decision_count(stack, "scope_insufficient", policy="writers") == 1

        provider.revoke(token)
        time.sleep(2.2)

        assert call(stack, "/", token) == 403
        assert decision_count(stack, "token_inactive") == 1
    finally:
        stack.stop()
        stop_provider(provider)


def test_opaque_token_expiring_while_cached(tmp_path: Path):
    provider = start_provider("RS256", extra=("--token-format", "opaque", "--token-ttl", "2"))
    stack = start_stack(
        tmp_path / "stack",
        provider,
        "Amplify Central",
        **introspection_settings(tmp_path, cache_seconds=300),
    )
    try:
        token = provider.token()
        assert call(stack, "/", token) == 200

        time.sleep(2.5)

        # The cache entry ends at the token's exp, so the provider is asked
        # again and reports the token inactive.
        assert call(stack, "/", token) == 403
        assert decision_count(stack, "token_inactive") == 1
    finally:
        stack.stop()
        stop_provider(provider)


def test_introspection_wrong_secret_fails_closed(tmp_path: Path):
    provider = start_provider("RS256", extra=("--token-format", "opaque"))
    settings = introspection_settings(tmp_path, cache_seconds=60)
    Path(settings["introspection"]["client_secret_file"]).write_text("wrong-secret")
    stack = start_stack(tmp_path / "stack", provider, "Amplify Central", **settings)
    try:
        token = provider.token()
        assert call(stack, "/", token) == 503
        assert decision_count(stack, "introspection_failed") == 1
        log = stack.log_text("ext-authz")
        assert token not in log
        assert "wrong-secret" not in log
    finally:
        stack.stop()
        stop_provider(provider)
