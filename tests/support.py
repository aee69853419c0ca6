"""Test helpers: signing keys, token minting and a local issuer HTTP server."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

if TYPE_CHECKING:
    from ext_authz.dev.stack import Stack

AUDIENCE = "Amplify Central"


@dataclass
class SigningKey:
    """A private key with the kid and algorithm its public JWK is published under."""

    kid: str
    algorithm: str
    private_key: Any

    @classmethod
    def rsa(cls, kid: str = "k1") -> SigningKey:
        return cls(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def ec(cls, kid: str = "e1") -> SigningKey:
        return cls(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))

    def public_jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.algorithm)
        jwk = algorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": self.algorithm}

    def sign(self, claims: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
        return jwt.encode(
            claims,
            self.private_key,
            algorithm=self.algorithm,
            headers={"kid": self.kid, **(headers or {})},
        )


def claims_for(issuer: str, **overrides: Any) -> dict[str, Any]:
    """Return valid access-token claims for `issuer`; a value of None removes the claim."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": "user-1",
        "aud": AUDIENCE,
        "client_id": "app-1",
        "iat": now,
        "exp": now + 300,
    }
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class IssuerServer:
    """A local issuer: serves metadata and a JWKS that a test can change, and counts fetches."""

    keys: list[SigningKey] = field(default_factory=list)
    metadata_issuer: str | None = None  # None: publish the server's own URL
    jwks_status: int = 200
    requests: list[str] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def jwks_fetches(self) -> int:
        return self.requests.count("/jwks.json")

    def document(self, path: str) -> tuple[int, Any]:
        if path == "/.well-known/openid-configuration":
            issuer = self.metadata_issuer or self.url
            return 200, {"issuer": issuer, "jwks_uri": f"{self.url}/jwks.json"}
        if path == "/jwks.json":
            return self.jwks_status, {"keys": [key.public_jwk() for key in self.keys]}
        return 404, {"error": "not found"}


@contextmanager
def running_issuer(server: IssuerServer) -> Iterator[IssuerServer]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server.requests.append(self.path)
            status, body = server.document(self.path)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    http.daemon_threads = True
    server.port = int(http.server_address[1])
    thread = threading.Thread(target=http.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        http.shutdown()
        http.server_close()


def send(
    base_url: str, method: str, path: str, headers: list[tuple[str, str]]
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """Send one request with http.client, which can repeat a header name."""
    host, port = base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest(method, path)
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def decision_count(stack: Stack, reason: str, policy: str = "default") -> float:
    decision = "allow" if reason == "ok" else "deny"
    pattern = (
        rf'^ext_authz_decisions_total\{{decision="{decision}",policy="{policy}",'
        rf'reason="{reason}"\}} (\S+)$'
    )
    match = re.search(pattern, stack.metrics_text(), re.MULTILINE)
    return float(match.group(1)) if match else 0.0
