"""Hot reload (SIGHUP, file change, ConfigMap symlink swap) and draining on SIGTERM."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ext_authz.api.envoy.service.auth.v3 import external_auth_pb2_grpc
from ext_authz.api.envoy.service.auth.v3.external_auth_pb2 import CheckRequest

from .support import IssuerServer, Sidecar, SigningKey, claims_for, free_port, start_sidecar


def sidecar_document(issuer_url: str, grpc_port: int, http_port: int, **server: Any) -> dict:
    return {
        "server": {
            "grpc_address": f"127.0.0.1:{grpc_port}",
            "http_address": f"127.0.0.1:{http_port}",
            "config_watch_seconds": 0.2,
            "drain_seconds": 0,
            "shutdown_grace_seconds": 2,
            **server,
        },
        "logging": {"level": "info", "format": "text"},
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


def check(sidecar: Sidecar, token: str, policy: str | None = None) -> str:
    """Return the decision's reason label, or 'ok'."""
    request = CheckRequest()
    request.attributes.request.http.headers["authorization"] = f"Bearer {token}"
    if policy is not None:
        request.attributes.context_extensions["policy"] = policy
    with grpc.insecure_channel(sidecar.grpc_target) as channel:
        response = external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=5)
    return "ok" if response.status.code == 0 else response.status.message


def metric(sidecar: Sidecar, line_start: str) -> float:
    for row in sidecar.get("/metrics")[1].splitlines():
        if row.startswith(line_start):
            return float(row.split()[-1])
    return 0.0


def wait_until(condition: Callable[[], bool], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture
def ports() -> tuple[int, int]:
    return free_port(), free_port()


@pytest.fixture
def running(
    tmp_path: Path, issuer_server: IssuerServer, ports: tuple[int, int]
) -> Iterator[tuple[Sidecar, Path]]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(sidecar_document(issuer_server.url, *ports)))
    sidecar = start_sidecar(path, *ports)
    yield sidecar, path
    if sidecar.process.poll() is None:
        sidecar.process.kill()
        sidecar.process.wait()


OK_RELOADS = 'ext_authz_config_reloads_total{result="ok"}'
INVALID_RELOADS = 'ext_authz_config_reloads_total{result="invalid"}'


def with_policy(document: dict, name: str) -> dict:
    document["policies"].append({"name": name, "issuers": ["local"], "required_scopes": ["x"]})
    return document


def test_sighup_reloads_and_keeps_keys(
    running: tuple[Sidecar, Path],
    issuer_server: IssuerServer,
    rsa_key: SigningKey,
    ports: tuple[int, int],
):
    sidecar, path = running
    token = rsa_key.sign(claims_for(issuer_server.url))
    assert check(sidecar, token) == "ok"
    assert check(sidecar, token, policy="strict") == "policy_unknown"
    fetches = issuer_server.jwks_fetches()

    document = with_policy(sidecar_document(issuer_server.url, *ports), "strict")
    document["server"]["config_watch_seconds"] = 0  # only SIGHUP reloads now
    path.write_text(yaml.safe_dump(document))
    sidecar.process.send_signal(signal.SIGHUP)

    assert wait_until(lambda: metric(sidecar, OK_RELOADS) == 1)
    assert check(sidecar, token, policy="strict") == "scope_insufficient"
    assert check(sidecar, token) == "ok"
    assert issuer_server.jwks_fetches() == fetches


def test_file_change_reloads(
    running: tuple[Sidecar, Path], issuer_server: IssuerServer, ports: tuple[int, int]
):
    sidecar, path = running

    path.write_text(yaml.safe_dump(with_policy(sidecar_document(issuer_server.url, *ports), "b")))

    assert wait_until(lambda: metric(sidecar, OK_RELOADS) == 1)
    assert check(sidecar, "x.y.z", policy="b") != "policy_unknown"


def test_invalid_file_keeps_old_config(
    running: tuple[Sidecar, Path],
    issuer_server: IssuerServer,
    rsa_key: SigningKey,
):
    sidecar, path = running
    token = rsa_key.sign(claims_for(issuer_server.url))

    path.write_text("issuers: [\n")

    assert wait_until(lambda: metric(sidecar, INVALID_RELOADS) == 1)
    assert check(sidecar, token) == "ok"
    assert metric(sidecar, OK_RELOADS) == 0
    sidecar.process.send_signal(signal.SIGTERM)
    log = sidecar.process.communicate(timeout=20)[1]
    assert "reload rejected:" in log
    assert "not valid YAML" in log


def test_configmap_symlink_swap_reloads(
    tmp_path: Path, issuer_server: IssuerServer, ports: tuple[int, int]
):
    # The layout Kubernetes uses for a ConfigMap volume:
    # config.yaml -> ..data/config.yaml, ..data -> ..2026_12_04_v1
    mount = tmp_path / "mount"
    first = mount / "..v1"
    first.mkdir(parents=True)
    (first / "config.yaml").write_text(yaml.safe_dump(sidecar_document(issuer_server.url, *ports)))
    (mount / "..data").symlink_to("..v1")
    (mount / "config.yaml").symlink_to("..data/config.yaml")
    sidecar = start_sidecar(mount / "config.yaml", *ports)
    try:
        second = mount / "..v2"
        second.mkdir()
        document = with_policy(sidecar_document(issuer_server.url, *ports), "swapped")
        (second / "config.yaml").write_text(yaml.safe_dump(document))
        (mount / "..data_tmp").symlink_to("..v2")
        os.replace(mount / "..data_tmp", mount / "..data")

        assert wait_until(lambda: metric(sidecar, OK_RELOADS) == 1)
        assert check(sidecar, "x.y.z", policy="swapped") != "policy_unknown"
    finally:
        sidecar.process.kill()
        sidecar.process.wait()


def test_drain_answers_until_stopped(
    tmp_path: Path, issuer_server: IssuerServer, rsa_key: SigningKey, ports: tuple[int, int]
):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(sidecar_document(issuer_server.url, *ports, drain_seconds=2)))
    sidecar = start_sidecar(path, *ports)
    token = rsa_key.sign(claims_for(issuer_server.url))
    try:
        started = time.monotonic()
        sidecar.process.send_signal(signal.SIGTERM)

        def not_serving() -> bool:
            with grpc.insecure_channel(sidecar.grpc_target) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=5
                )
            return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

        assert wait_until(not_serving, timeout=5)
        assert sidecar.get("/readyz")[0] == 503
        # Check calls are still served during the drain.
        assert check(sidecar, token) == "ok"
        assert time.monotonic() - started < 2

        assert sidecar.process.wait(timeout=20) == 0
        assert time.monotonic() - started >= 2
    finally:
        if sidecar.process.poll() is None:
            sidecar.process.kill()
            sidecar.process.wait()
