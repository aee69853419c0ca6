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

import pytest

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


def start_provider(algorithm: str) -> Provider:
    node = shutil.which("node")
    if node is None or not (PROVIDER_DIR / "node_modules" / "oidc-provider").exists():
        pytest.fail("Node.js or the oidc-provider package is missing: run `make test-deps`")
    process = subprocess.Popen(
        [node, "server.mjs", "--port", str(free_port()), "--alg", algorithm],
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


def start_stack(workdir: Path, provider: Provider, audience: str) -> Stack:
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
