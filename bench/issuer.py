"""The benchmark's token issuer: signing keys, tokens, a JWKS server and Check request bodies."""

from __future__ import annotations

import base64
import json
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ext_authz.api.envoy.service.auth.v3.external_auth_pb2 import CheckRequest

AUDIENCE = "Amplify Central"
CLIENT_ID = "bench-client"
# Longer than any benchmark run, so no token expires while it is measured.
TOKEN_LIFETIME_SECONDS = 3600
ALGORITHMS = ("RS256", "ES256")


@dataclass
class BenchIssuer:
    """An RSA 2048 and an EC P-256 signing key, published as a JWKS on 127.0.0.1.

    The issuer identifier is the JWKS server's own URL, so the sidecar, given
    `jwks_uri`, never contacts anything but loopback.
    """

    keys: dict[str, Any] = field(default_factory=dict)
    url: str = ""
    _server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        self.keys = {
            "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ES256": ec.generate_private_key(ec.SECP256R1()),
        }
        body = json.dumps(self.jwks()).encode()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _jwks_handler(body))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, name="jwks", daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def jwks_uri(self) -> str:
        return f"{self.url}/jwks.json"

    def jwks(self) -> dict[str, Any]:
        published = []
        for algorithm, private_key in self.keys.items():
            jwk = jwt.get_algorithm_by_name(algorithm).to_jwk(
                private_key.public_key(), as_dict=True
            )
            published.append({**jwk, "kid": _kid(algorithm), "use": "sig", "alg": algorithm})
        return {"keys": published}

    def write_jwks(self, path: Path) -> None:
        path.write_text(json.dumps(self.jwks()))

    def token(self, algorithm: str) -> str:
        """Sign a valid access token for the sidecar's default policy and Envoy's jwt_authn."""
        now = int(time.time())
        claims = {
            "iss": self.url,
            "sub": "bench-user",
            "aud": AUDIENCE,
            "client_id": CLIENT_ID,
            "scope": "bench.read",
            "iat": now,
            "exp": now + TOKEN_LIFETIME_SECONDS,
        }
        return jwt.encode(
            claims, self.keys[algorithm], algorithm=algorithm, headers={"kid": _kid(algorithm)}
        )


def check_request(token: str) -> CheckRequest:
    """Build a CheckRequest like the one Envoy 1.40 sends for wrk's `GET /` with a bearer token.

    It has the fields and headers of such a request as Envoy sent it to a
    capturing servicer, so parsing it costs what parsing a real one costs.
    """
    request = CheckRequest()
    attributes = request.attributes
    attributes.source.address.socket_address.address = "127.0.0.1"
    attributes.source.address.socket_address.port_value = 46104
    attributes.destination.address.socket_address.address = "127.0.0.1"
    attributes.destination.address.socket_address.port_value = 8080
    attributes.request.time.GetCurrentTime()
    http = attributes.request.http
    http.id = "17932825138929021903"
    http.method = "GET"
    http.path = "/"
    http.host = "127.0.0.1:8080"
    http.scheme = "http"
    http.protocol = "HTTP/1.1"
    http.headers.update(
        {
            ":authority": "127.0.0.1:8080",
            ":method": "GET",
            ":path": "/",
            ":scheme": "http",
            "x-forwarded-proto": "http",
            "x-request-id": "5b2d7a7e-2f7c-4b8e-9a43-0a9a2d9c1f10",
            "authorization": f"Bearer {token}",
        }
    )
    attributes.context_extensions["policy"] = "default"
    return request


def grpc_frame(message: bytes) -> bytes:
    """Prefix a serialized message with the 5-byte gRPC frame header: not compressed, length."""
    return struct.pack(">BI", 0, len(message)) + message


def _kid(algorithm: str) -> str:
    return f"bench-{algorithm.lower()}"


def _jwks_handler(body: bytes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = self.path == "/jwks.json"
            payload = body if found else b'{"error": "not found"}'
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def bare_verify_seconds(issuer: BenchIssuer, algorithm: str, min_seconds: float = 1.0) -> float:
    """Return the CPU time of one signature verify by `cryptography` alone, in seconds.

    It verifies a token of `issuer` in a loop, in this process, for at least
    `min_seconds` of CPU time: no JWT parsing, no JWK lookup, and for ES256
    the raw r||s signature is converted to DER once, outside the loop.
    """
    token = issuer.token(algorithm)
    header, payload, signature = token.split(".")
    signing_input = f"{header}.{payload}".encode("ascii")
    raw_signature = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    public_key = issuer.keys[algorithm].public_key()

    def verify_once() -> None:
        if algorithm == "ES256":
            public_key.verify(der_signature, signing_input, ec.ECDSA(hashes.SHA256()))
        else:
            public_key.verify(raw_signature, signing_input, padding.PKCS1v15(), hashes.SHA256())

    if algorithm == "ES256":
        half = len(raw_signature) // 2
        der_signature = encode_dss_signature(
            int.from_bytes(raw_signature[:half], "big"), int.from_bytes(raw_signature[half:], "big")
        )
    elif algorithm != "RS256":
        raise ValueError(f"no bare verify for {algorithm}; use RS256 or ES256")

    verify_once()  # Raises InvalidSignature when the set-up above is wrong.
    iterations = 0
    started = time.process_time()
    while time.process_time() - started < min_seconds:
        for _ in range(100):
            verify_once()
        iterations += 100
    return (time.process_time() - started) / iterations
