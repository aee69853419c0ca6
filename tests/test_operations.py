"""The sidecar process: gRPC health, operations endpoints, start-up log and SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ext_authz.api.envoy.service.auth.v3 import external_auth_pb2_grpc
from ext_authz.api.envoy.service.auth.v3.external_auth_pb2 import CheckRequest
from ext_authz.config import load_config, parse_config
from ext_authz.server import SidecarServer

from .support import (
    IssuerServer,
    Sidecar,
    SigningKey,
    claims_for,
    free_port,
    running_issuer,
    start_sidecar,
)


@pytest.fixture
def sidecar(tmp_path: Path, issuer_server: IssuerServer) -> Iterator[Sidecar]:
    grpc_port, http_port = free_port(), free_port()
    config: dict[str, Any] = {
        "server": {
            "grpc_address": f"127.0.0.1:{grpc_port}",
            "http_address": f"127.0.0.1:{http_port}",
            "shutdown_grace_seconds": 5,
        },
        "logging": {"level": "info", "format": "json"},
        "issuers": [
            {
                "name": "local",
                "issuer": issuer_server.url,
                "audiences": ["Amplify Central"],
                "allow_insecure_http": True,
            }
        ],
        "policies": [{"name": "default", "issuers": ["local"]}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    started = start_sidecar(path, grpc_port, http_port)
    process = started.process
    yield started
    if process.poll() is None:
        process.kill()
        process.wait()


def test_grpc_health_serving(sidecar: Sidecar):
    with grpc.insecure_channel(sidecar.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "envoy.service.auth.v3.Authorization"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_readyz_lists_issuer_keys(sidecar: Sidecar):
    deadline = time.monotonic() + 10
    while True:
        status, body = sidecar.get("/readyz")
        issuers = json.loads(body)["issuers"]
        if issuers[0]["keys"] == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    assert status == 200
    assert json.loads(body)["status"] == "ready"
    assert issuers[0]["issuer"] == "local"
    assert issuers[0]["keys"] == 2
    assert issuers[0]["last_error"] is None


def test_metrics_exported(sidecar: Sidecar, issuer_server: IssuerServer, rsa_key: SigningKey):
    with grpc.insecure_channel(sidecar.grpc_target) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        request = CheckRequest()
        token = rsa_key.sign(claims_for(issuer_server.url))
        request.attributes.request.http.headers["authorization"] = f"Bearer {token}"
        assert stub.Check(request, timeout=5).status.code == 0

    status, text = sidecar.get("/metrics")

    assert status == 200
    for name in (
        "ext_authz_decisions_total",
        "ext_authz_check_duration_seconds_bucket",
        "ext_authz_jwks_fetches_total",
        "ext_authz_jwks_keys",
        "ext_authz_jwks_age_seconds",
    ):
        assert name in text, name
    assert token.split(".")[2] not in text


def test_unknown_path_is_404(sidecar: Sidecar):
    assert sidecar.get("/nope")[0] == 404


def test_sigterm_exits_zero(sidecar: Sidecar):
    sidecar.process.send_signal(signal.SIGTERM)

    returncode = sidecar.process.wait(timeout=20)
    log = sidecar.process.stderr.read() if sidecar.process.stderr else ""

    assert returncode == 0
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    messages = [line["message"] for line in lines]
    assert any(message.startswith("serving Check on 127.0.0.1:") for message in messages)
    assert any("loaded 2 signing keys" in message for message in messages)
    assert any(message.startswith("received SIGTERM") for message in messages)
    assert messages[-1] == "stopped"


def test_sigterm_skips_held_network_call(tmp_path: Path, issuer_server: IssuerServer):
    """A wait-pool thread still inside an introspection request does not keep the process up."""
    secret = tmp_path / "secret"
    secret.write_text("s3cret-value")
    grpc_port, http_port = free_port(), free_port()
    config: dict[str, Any] = {
        "server": {
            "grpc_address": f"127.0.0.1:{grpc_port}",
            "http_address": f"127.0.0.1:{http_port}",
            "shutdown_grace_seconds": 0,
            "drain_seconds": 0,
        },
        "issuers": [
            {
                "name": "local",
                "issuer": issuer_server.url,
                "audiences": ["Amplify Central"],
                "allow_insecure_http": True,
                "fetch_timeout_seconds": 10,
                "introspection": {"client_id": "ext-authz", "client_secret_file": str(secret)},
            }
        ],
        "policies": [{"name": "default", "issuers": ["local"]}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    issuer_server.hold_introspection = threading.Event()
    sidecar = start_sidecar(path, grpc_port, http_port)
    request = CheckRequest()
    request.attributes.request.http.headers["authorization"] = "Bearer opaque-held"
    try:
        with grpc.insecure_channel(sidecar.grpc_target) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            pending_call = stub.Check.future(request, timeout=20)
            deadline = time.monotonic() + 10
            while issuer_server.introspections() == 0:
                assert time.monotonic() < deadline, "the introspection request never arrived"
                time.sleep(0.01)

            sidecar.process.send_signal(signal.SIGTERM)

            # The issuer still delays its reply, for up to 10 s, while the process ends.
            assert sidecar.process.wait(timeout=8) == 0
            assert not issuer_server.hold_introspection.is_set()
            pending_call.cancel()
    finally:
        issuer_server.hold_introspection.set()
        if sidecar.process.poll() is None:
            sidecar.process.kill()
            sidecar.process.wait()


def test_serve_with_invalid_config_exits_2(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("issuers: []\npolicies: []\n")

    result = subprocess.run(
        [sys.executable, "-m", "ext_authz.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 2
    assert "issuers: needs at least 1 entry" in result.stderr


@pytest.mark.parametrize("key", ["grpc_address", "http_address"])
def test_taken_port_exits_with_message(tmp_path: Path, key: str):
    with socket.socket() as taken:
        # The listener sets SO_REUSEPORT, as a gRPC server does; the sidecar must still fail.
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = {
            "grpc_address": f"127.0.0.1:{free_port()}",
            "http_address": f"127.0.0.1:{free_port()}",
            key: f"127.0.0.1:{port}",
        }
        path = tmp_path / "config.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "server": server,
                    "logging": {"format": "text"},
                    "issuers": [{"name": "a", "issuer": "https://a.example", "audiences": ["x"]}],
                    "policies": [{"name": "p", "issuers": ["a"]}],
                }
            )
        )

        result = subprocess.run(
            [sys.executable, "-m", "ext_authz.cli", "serve", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )

    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (server.{key})" in result.stderr
    assert "Traceback" not in result.stderr


def test_readiness_waits_for_keys_when_required(issuer_server: IssuerServer):
    issuer_server.jwks_mode = "status"
    server = SidecarServer(parse_config(keys_required_document(issuer_server.url)))
    server.start()
    try:
        sidecar = Sidecar(None, server.grpc_port, server.http_port)  # type: ignore[arg-type]
        status, body = sidecar.get("/readyz")
        assert status == 503
        assert json.loads(body)["issuers"][0]["loaded"] is False
        with grpc.insecure_channel(sidecar.grpc_target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

        issuer_server.jwks_mode = "ok"
        deadline = time.monotonic() + 30
        while sidecar.get("/readyz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)

        assert sidecar.get("/readyz")[0] == 200
        # The gRPC health status follows within a poll interval of the readiness thread.
        serving = health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(sidecar.grpc_target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="")
            deadline = time.monotonic() + 5
            while stub.Check(request, timeout=5).status != serving:
                assert time.monotonic() < deadline, "gRPC health did not become SERVING"
                time.sleep(0.05)
    finally:
        server.stop(drain=False)


def test_reload_adding_issuer_waits_for_its_keys(issuer_server: IssuerServer, tmp_path: Path):
    """With require_keys_for_ready, an issuer added by a reload is awaited as at start-up."""
    document = keys_required_document(issuer_server.url)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    server = SidecarServer(load_config(path), config_path=path)
    server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    try:
        with running_issuer(IssuerServer(keys=[SigningKey.rsa("second")])) as second:
            wait_for_health(server, serving)
            second.jwks_mode = "status"
            document["issuers"].append(
                {
                    "name": "second",
                    "issuer": second.url,
                    "audiences": ["Amplify Central"],
                    "allow_insecure_http": True,
                }
            )
            path.write_text(yaml.safe_dump(document))

            assert server.reload()
            wait_for_health(server, health_pb2.HealthCheckResponse.NOT_SERVING)

            second.jwks_mode = "ok"
            wait_for_health(server, serving)
    finally:
        server.stop(drain=False)


def keys_required_document(issuer_url: str) -> dict[str, Any]:
    """Return a config document with require_keys_for_ready and one issuer, "local"."""
    return {
        "server": {
            "grpc_address": f"127.0.0.1:{free_port()}",
            "http_address": f"127.0.0.1:{free_port()}",
            "require_keys_for_ready": True,
            "shutdown_grace_seconds": 1,
        },
        "issuers": [
            {
                "name": "local",
                "issuer": issuer_url,
                "audiences": ["Amplify Central"],
                "allow_insecure_http": True,
            }
        ],
        "policies": [{"name": "default", "issuers": ["local"]}],
    }


def wait_for_health(server: SidecarServer, expected: int) -> None:
    """Poll the gRPC health service of `server` until it reports `expected`, for up to 30 s."""
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        deadline = time.monotonic() + 30
        while stub.Check(request, timeout=5).status != expected:
            assert time.monotonic() < deadline, f"gRPC health never reported {expected}"
            time.sleep(0.05)
