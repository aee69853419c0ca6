"""Interoperability with a real OpenID Connect provider: the oidc-provider npm package."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from ext_authz.dev.stack import Stack, StackPorts, local_sidecar_config

from .support import decision_count, free_port, send

pytestmark = pytest.mark.interop

PROVIDER_DIR = Path(__file__).parent / "interop" / "oidc_provider"
CLIENT_ID = "interop-client"
CLIENT_SECRET = "interop-secret"


class Provider:
    def __init__(self, process: subprocess.Popen[str], url: str) -> None:
        self.process = process
        self.url = url

    def token(self) -> str:
        credentials = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        request = urllib.request.Request(
            f"{self.url}/token",
            data=b"grant_type=client_credentials",
            headers={
                "Authorization": f"Basic {credentials}",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(json.load(response)["access_token"])


def start_provider(
    algorithm: str, port: int | None = None, jwks_file: Path | None = None
) -> Provider:
    node = shutil.which("node")
    if node is None or not (PROVIDER_DIR / "node_modules" / "oidc-provider").exists():
        pytest.fail("Node.js or the oidc-provider package is missing: run `make test-deps`")
    command = [node, "server.mjs", "--port", str(port or free_port()), "--alg", algorithm]
    if jwks_file is not None:
        command += ["--jwks-file", str(jwks_file)]
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


def start_stack(workdir: Path, provider: Provider, audience: str, **issuer_settings: Any) -> Stack:
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
    sidecar["policies"] = [{"name": "default", "issuers": ["oidc-provider"]}]
    stack = Stack(workdir=workdir, ports=ports, sidecar_config=sidecar, start_dev_issuer=False)
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
