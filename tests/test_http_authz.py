"""The HTTP ext_authz front end, spoken to directly over a socket."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ext_authz.config import parse_config
from ext_authz.server import SidecarServer

from .support import IssuerServer, SigningKey, claims_for, free_port


@pytest.fixture
def server(issuer_server: IssuerServer, tmp_path: Path) -> Iterator[SidecarServer]:
    secret = tmp_path / "secret"
    secret.write_text("s3cret-value")
    config = parse_config(
        {
            "server": {
                "grpc_address": f"127.0.0.1:{free_port()}",
                "http_address": f"127.0.0.1:{free_port()}",
                "http_authz_address": f"127.0.0.1:{free_port()}",
                "drain_seconds": 0,
            },
            "issuers": [
                {
                    "name": "local",
                    "issuer": issuer_server.url,
                    "audiences": ["Amplify Central"],
                    "allow_insecure_http": True,
                    "introspection": {"client_id": "ext-authz", "client_secret_file": str(secret)},
                }
            ],
            "policies": [
                {"name": "default", "issuers": ["local"]},
                {"name": "strict", "issuers": ["local"], "required_scopes": ["admin"]},
            ],
        }
    )
    started = SidecarServer(config)
    started.start()
    assert started.issuer_keys["local"].wait_loaded(10)
    yield started
    started.stop(drain=False)


def exchange(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(raw)
        chunks = []
        while True:
            chunk = connection.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                break
        return b"".join(chunks)


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return True


def request(token: str | None = None, policy: str | None = None, close: bool = True) -> bytes:
    lines = ["GET /orders?id=1 HTTP/1.1", "host: api.example"]
    if token is not None:
        lines.append(f"authorization: Bearer {token}")
    if policy is not None:
        lines.append(f"x-ext-authz-policy: {policy}")
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_valid_token_allowed_with_headers(
    server: SidecarServer, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(claims_for(issuer_server.url, sub="alice"))

    reply = exchange(server.http_authz_port, request(token)).decode()

    assert reply.startswith("HTTP/1.1 200 OK")
    assert "x-auth-subject: alice" in reply
    assert "x-envoy-auth-headers-to-remove: x-auth-application" in reply


def test_missing_token_denied_with_challenge(server: SidecarServer):
    reply = exchange(server.http_authz_port, request()).decode()

    assert reply.startswith("HTTP/1.1 403 Forbidden")
    assert 'www-authenticate: Bearer realm="default"' in reply
    assert reply.endswith('"error_description": "The request carries no bearer token."}')


def test_policy_header_selects_policy(
    server: SidecarServer, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(claims_for(issuer_server.url))
    reply = exchange(server.http_authz_port, request(token, policy="strict")).decode()
    assert 'error="insufficient_scope"' in reply


def test_keep_alive_serves_several_requests(
    server: SidecarServer, issuer_server: IssuerServer, rsa_key: SigningKey
):
    token = rsa_key.sign(claims_for(issuer_server.url))
    with socket.create_connection(("127.0.0.1", server.http_authz_port), timeout=5) as connection:
        for _ in range(3):
            connection.sendall(request(token, close=False))
            reply = connection.recv(65536)
            assert reply.startswith(b"HTTP/1.1 200 OK")


def test_unavailable_keys_denied_not_5xx(server: SidecarServer, issuer_server: IssuerServer):
    # An opaque token whose introspection fails: 503 over gRPC, 403 here.
    issuer_server.introspection_mode = "status"

    reply = exchange(server.http_authz_port, request("opaque-token")).decode()

    assert reply.startswith("HTTP/1.1 403 Forbidden")
    assert "temporarily_unavailable" in reply


def test_opaque_token_introspected(server: SidecarServer, issuer_server: IssuerServer):
    issuer_server.introspection_results["opaque-ok"] = {
        "active": True,
        "aud": "Amplify Central",
        "exp": 4_000_000_000,
        "client_id": "app-9",
    }

    reply = exchange(server.http_authz_port, request("opaque-ok")).decode()

    assert reply.startswith("HTTP/1.1 200 OK")
    assert "x-auth-client-id: app-9" in reply


def test_garbage_request_gets_400(server: SidecarServer):
    reply = exchange(server.http_authz_port, b"NOT HTTP AT ALL\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400")
