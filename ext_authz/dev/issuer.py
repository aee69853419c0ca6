"""A small OAuth 2.0 issuer for local development only.

It publishes discovery metadata and a JWKS, and signs JWT access tokens
(RFC 9068) for the client-credentials grant. Its signing key is generated at
start unless a key file is given, and it never authenticates users. Do not
point a production sidecar at it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

log = logging.getLogger(__name__)

DEFAULT_CLIENTS = {"demo-app": "demo-secret"}
DEFAULT_AUDIENCE = "Amplify Central"
MAX_FORM_BYTES = 16 * 1024


@dataclass
class DevIssuerSettings:
    host: str = "127.0.0.1"
    port: int = 9000
    issuer_url: str | None = None  # default: http://HOST:PORT
    audience: str = DEFAULT_AUDIENCE
    token_ttl_seconds: int = 3600
    clients: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_CLIENTS))
    key_file: Path | None = None


class DevIssuer:
    """The development issuer: signing key, token minting and its HTTP server."""

    def __init__(self, settings: DevIssuerSettings) -> None:
        self.settings = settings
        self._private_key = _load_or_generate_key(settings.key_file)
        public_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._private_key.public_key()))
        self.kid = _thumbprint(public_jwk)
        self.jwks = {"keys": [{**public_jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}]}
        self._server = ThreadingHTTPServer((settings.host, settings.port), _make_handler(self))
        self._server.daemon_threads = True
        self.issuer_url = settings.issuer_url or f"http://{settings.host}:{self.port}"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def metadata(self) -> dict[str, Any]:
        base = self.issuer_url.rstrip("/")
        return {
            "issuer": self.issuer_url,
            "jwks_uri": f"{base}/jwks.json",
            "token_endpoint": f"{base}/token",
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def mint(
        self,
        client_id: str,
        audience: str | None = None,
        scope: str | None = None,
        lifetime_seconds: int | None = None,
    ) -> str:
        """Sign an access token for `client_id`."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer_url,
            "sub": client_id,
            "aud": audience or self.settings.audience,
            "client_id": client_id,
            "iat": now,
            "nbf": now,
            "exp": now + (lifetime_seconds or self.settings.token_ttl_seconds),
            "jti": secrets.token_hex(12),
        }
        if scope:
            claims["scope"] = scope
        return jwt.encode(
            claims, self._private_key, algorithm="RS256", headers={"kid": self.kid, "typ": "at+jwt"}
        )

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def start(self) -> None:
        threading.Thread(target=self.serve_forever, name="dev-issuer", daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def authenticate(self, authorization: str | None, form: dict[str, str]) -> str | None:
        """Return the client id when the client secret matches (Basic or form post)."""
        client_id, secret = form.get("client_id"), form.get("client_secret")
        if authorization and authorization.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                return None
            client_id, _, secret = decoded.partition(":")
            # RFC 6749 §2.3.1: both parts are form-urlencoded inside Basic.
            client_id, secret = unquote(client_id), unquote(secret)
        if not client_id or secret is None:
            return None
        expected = self.settings.clients.get(client_id)
        if expected is None or not hmac.compare_digest(expected.encode(), secret.encode()):
            return None
        return client_id


def _make_handler(issuer: DevIssuer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "ext-authz-dev-issuer"
        sys_version = ""

        def version_string(self) -> str:
            return self.server_version

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in (
                "/.well-known/openid-configuration",
                "/.well-known/oauth-authorization-server",
            ):
                self._json(200, issuer.metadata())
            elif path == "/jwks.json":
                self._json(200, issuer.jwks)
            else:
                self._json(404, {"error": "not_found"})

        def do_POST(self) -> None:
            if self.path.split("?", 1)[0] != "/token":
                self._json(404, {"error": "not_found"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_FORM_BYTES:
                self._json(413, {"error": "invalid_request"})
                return
            raw = self.rfile.read(length).decode("utf-8", "replace")
            form = {key: values[0] for key, values in parse_qs(raw).items()}

            if form.get("grant_type") != "client_credentials":
                self._json(400, {"error": "unsupported_grant_type"})
                return
            client_id = issuer.authenticate(self.headers.get("Authorization"), form)
            if client_id is None:
                self._json(
                    401,
                    {"error": "invalid_client"},
                    {"WWW-Authenticate": 'Basic realm="dev-issuer"'},
                )
                return
            token = issuer.mint(client_id, audience=form.get("audience"), scope=form.get("scope"))
            body = {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": issuer.settings.token_ttl_seconds,
            }
            if form.get("scope"):
                body["scope"] = form["scope"]
            self._json(200, body, {"Cache-Control": "no-store"})

        def _json(
            self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
        ) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("dev-issuer: " + format, *args)

    return Handler


def _load_or_generate_key(path: Path | None) -> rsa.RSAPrivateKey:
    if path is None:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path}: expected an RSA private key in PEM form")
        return key
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return key


def _thumbprint(jwk: dict[str, str]) -> str:
    """Return the RFC 7638 JWK thumbprint of an RSA public key, used as its kid."""
    canonical = json.dumps({"e": jwk["e"], "kty": "RSA", "n": jwk["n"]}, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
