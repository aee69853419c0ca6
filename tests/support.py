"""Test helpers: signing keys, token minting and a local issuer HTTP server."""

from __future__ import annotations

import base64
import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives import serialization
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


handed_out_ports: set[int] = set()


def free_port() -> int:
    """Return a free port on 127.0.0.1 that no earlier call of this run returned."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in handed_out_ports:
            handed_out_ports.add(port)
            return port


@dataclass
class IssuerServer:
    """A local issuer that a test controls: metadata, JWKS and failure modes, with a request log.

    `jwks_mode` is one of: ok, status (returns `jwks_status`), html, empty (`{}`),
    hang (replies after `hang_seconds`), huge (a 5 MiB body), redirect_other_host,
    redirect_same_host.
    """

    keys: list[SigningKey] = field(default_factory=list)
    issuer_path: str = ""  # the issuer identifier is base_url + issuer_path
    metadata_issuer: str | None = None  # None: publish the issuer identifier
    metadata_paths: list[str] | None = None  # None: the OIDC discovery path
    jwks_mode: str = "ok"
    jwks_status: int = 200
    hang_seconds: float = 5.0
    cache_control: str | None = None
    # Introspection: token -> reply, checked against HTTP Basic credentials.
    introspection_results: dict[str, dict[str, Any]] = field(default_factory=dict)
    introspection_credentials: tuple[str, str] = ("ext-authz", "s3cret-value")
    introspection_mode: str = "ok"  # ok, status (HTTP 500) or html
    requests: list[str] = field(default_factory=list)
    # When set, JWKS and introspection replies wait until the event is set (at most 10 s).
    hold: threading.Event | None = None
    # When set, introspection replies alone wait until the event is set (at most 10 s).
    hold_introspection: threading.Event | None = None
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The issuer identifier."""
        return self.base_url + self.issuer_path

    def jwks_fetches(self) -> int:
        return sum(1 for path in self.requests if path.startswith("/jwks"))

    def introspections(self) -> int:
        return self.requests.count("POST /introspect")

    def introspect(self, authorization: str, form: dict[str, str]) -> tuple[int, bytes]:
        """Return status and body of an RFC 7662 introspection reply."""
        user, secret = self.introspection_credentials
        expected = "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()
        if authorization != expected:
            return 401, b'{"error": "invalid_client"}'
        if self.introspection_mode == "status":
            return 500, b"{}"
        if self.introspection_mode == "html":
            return 200, b"<html>maintenance</html>"
        reply = self.introspection_results.get(form.get("token", ""), {"active": False})
        return 200, json.dumps(reply).encode()

    def respond(self, path: str) -> tuple[int, dict[str, str], bytes, float]:
        """Return status, headers, body and a delay in seconds for a GET of `path`."""
        metadata_paths = self.metadata_paths or [
            self.issuer_path.rstrip("/") + "/.well-known/openid-configuration"
        ]
        if path in metadata_paths:
            metadata = {
                "issuer": self.metadata_issuer or self.url,
                "jwks_uri": f"{self.base_url}/jwks.json",
                "introspection_endpoint": f"{self.base_url}/introspect",
            }
            return 200, {}, json.dumps(metadata).encode(), 0.0
        if path == "/jwks.json":
            return self._jwks()
        if path == "/jwks-moved.json":
            return 200, {}, json.dumps(self._jwks_document()).encode(), 0.0
        return 404, {}, b'{"error": "not found"}', 0.0

    def _jwks_document(self) -> dict[str, Any]:
        return {"keys": [key.public_jwk() for key in self.keys]}

    def _jwks(self) -> tuple[int, dict[str, str], bytes, float]:
        headers = {"Cache-Control": self.cache_control} if self.cache_control else {}
        body = json.dumps(self._jwks_document()).encode()
        mode = self.jwks_mode
        if mode == "ok":
            return 200, headers, body, 0.0
        if mode == "status":
            return self.jwks_status, {}, b"{}", 0.0
        if mode == "html":
            return 200, {"Content-Type": "text/html"}, b"<html><body>Sign in</body></html>", 0.0
        if mode == "empty":
            return 200, {}, b"{}", 0.0
        if mode == "hang":
            return 200, headers, body, self.hang_seconds
        if mode == "huge":
            return 200, {}, b'{"keys": [' + b" " * (5 * 1024 * 1024) + b"]}", 0.0
        if mode == "redirect_other_host":
            return 302, {"Location": f"http://localhost:{self.port}/jwks-moved.json"}, b"", 0.0
        if mode == "redirect_same_host":
            return 302, {"Location": "/jwks-moved.json"}, b"", 0.0
        raise ValueError(f"unknown jwks_mode {mode!r}")


@contextmanager
def running_issuer(server: IssuerServer) -> Iterator[IssuerServer]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server.requests.append(self.path)
            status, headers, body, delay = server.respond(self.path)
            if server.hold is not None and self.path.startswith("/jwks"):
                server.hold.wait(10)
            if delay:
                time.sleep(delay)
            try:
                self.send_response(status)
                self.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # The client gave up, as a timeout test expects.

        def do_POST(self) -> None:
            server.requests.append(f"POST {self.path}")
            length = int(self.headers.get("Content-Length") or 0)
            form = {
                key: values[0] for key, values in parse_qs(self.rfile.read(length).decode()).items()
            }
            status, body = server.introspect(self.headers.get("Authorization", ""), form)
            for hold in (server.hold, server.hold_introspection):
                if hold is not None:
                    hold.wait(10)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

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


def write_rsa_key_pem(path: Path) -> rsa.RSAPrivateKey:
    """Create an RSA signing key and write it as unencrypted PKCS#8 PEM for the dev issuer."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key


class Sidecar:
    """A sidecar process started by a test, with its gRPC target and HTTP base URL."""

    def __init__(self, process: subprocess.Popen[str], grpc_port: int, http_port: int) -> None:
        self.process = process
        self.grpc_target = f"127.0.0.1:{grpc_port}"
        self.http_url = f"http://127.0.0.1:{http_port}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"{self.http_url}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def listening(self) -> bool:
        try:
            return self.get("/healthz")[0] == 200
        except (urllib.error.URLError, ConnectionError):
            return False


def start_sidecar(
    config_path: Path, grpc_port: int, http_port: int, timeout: float = 20
) -> Sidecar:
    """Start `ext-authz serve` with a config file and wait until /healthz returns 200."""
    process = subprocess.Popen(
        [sys.executable, "-m", "ext_authz.cli", "serve", "--config", str(config_path)],
        stderr=subprocess.PIPE,
        text=True,
    )
    sidecar = Sidecar(process, grpc_port, http_port)
    deadline = time.monotonic() + timeout
    while not sidecar.listening():
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise RuntimeError(f"the sidecar did not start: {process.communicate()[1]}")
        time.sleep(0.1)
    return sidecar
