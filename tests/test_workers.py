"""Several worker processes: each serves Check on its own port, one endpoint reports for all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from ext_authz.api.envoy.service.auth.v3 import external_auth_pb2_grpc
from ext_authz.api.envoy.service.auth.v3.external_auth_pb2 import CheckRequest
from ext_authz.workers import merge_metrics

from . import support
from .support import IssuerServer, Sidecar, SigningKey, claims_for, free_port


def consecutive_free_ports(count: int) -> int:
    """Return a port P such that P .. P+count-1 are free on 127.0.0.1 right now."""
    for _ in range(50):
        base = free_port()
        sockets = []
        try:
            for offset in range(count):
                probe = socket.socket()
                sockets.append(probe)
                probe.bind(("127.0.0.1", base + offset))
            # Keep later free_port() calls of this run off these ports.
            support.handed_out_ports.update(range(base, base + count))
            return base
        except OSError:
            continue
        finally:
            for probe in sockets:
                probe.close()
    raise RuntimeError("no consecutive free ports found")


@pytest.fixture
def workers(tmp_path: Path, issuer_server: IssuerServer) -> Iterator[tuple[Sidecar, int]]:
    base, http_port = consecutive_free_ports(2), free_port()
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "server": {
                    "grpc_address": f"127.0.0.1:{base}",
                    "http_address": f"127.0.0.1:{http_port}",
                    "workers": 2,
                    "drain_seconds": 0.5,
                    "config_watch_seconds": 0,
                },
                "logging": {"format": "json"},
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
        )
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "ext_authz.cli", "serve", "--config", str(path)],
        stderr=subprocess.PIPE,
        text=True,
    )
    supervisor = Sidecar(process, base, http_port)
    deadline = time.monotonic() + 30
    while not (supervisor.listening() and supervisor.get("/readyz")[0] == 200):
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            pytest.fail(f"the workers did not start: {process.communicate()[1]}")
        time.sleep(0.1)
    yield supervisor, base
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def check_on(port: int, token: str) -> int:
    request = CheckRequest()
    request.attributes.request.http.headers["authorization"] = f"Bearer {token}"
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return (
            external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=5).status.code
        )


def metric_value(supervisor: Sidecar, prefix: str) -> float:
    for row in supervisor.get("/metrics")[1].splitlines():
        if row.startswith(prefix):
            return float(row.split()[-1])
    return 0.0


ALLOWED = 'ext_authz_decisions_total{decision="allow",policy="default",reason="ok"}'


def test_each_worker_answers_on_its_port(
    workers: tuple[Sidecar, int], issuer_server: IssuerServer, rsa_key: SigningKey
):
    supervisor, base = workers
    token = rsa_key.sign(claims_for(issuer_server.url))

    assert check_on(base, token) == 0
    assert check_on(base + 1, token) == 0
    assert check_on(base + 1, token) == 0

    assert metric_value(supervisor, ALLOWED) == 3
    status, body = supervisor.get("/readyz")
    assert status == 200
    assert '"worker": 1' in body


def test_crashed_worker_restarted(
    workers: tuple[Sidecar, int], issuer_server: IssuerServer, rsa_key: SigningKey
):
    supervisor, base = workers
    token = rsa_key.sign(claims_for(issuer_server.url))
    children = subprocess.run(
        ["pgrep", "-P", str(supervisor.process.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(children) == 2

    os.kill(int(children[1]), signal.SIGKILL)

    deadline = time.monotonic() + 20
    answered = False
    while time.monotonic() < deadline and not answered:
        try:
            answered = check_on(base + 1, token) == 0 and check_on(base, token) == 0
        except grpc.RpcError:
            time.sleep(0.2)
    assert answered


def test_sigterm_stops_all_workers(workers: tuple[Sidecar, int]):
    supervisor, _ = workers
    supervisor.process.send_signal(signal.SIGTERM)

    assert supervisor.process.wait(timeout=30) == 0
    log = supervisor.process.stderr.read() if supervisor.process.stderr else ""
    assert '"worker": 0' in log
    assert '"worker": 1' in log


def test_merge_sums_counters_and_takes_worst_gauge():
    first = (
        "# HELP ext_authz_decisions_total Check decisions.\n"
        "# TYPE ext_authz_decisions_total counter\n"
        'ext_authz_decisions_total{decision="allow",policy="p",reason="ok"} 2.0\n'
        "# HELP ext_authz_jwks_age_seconds Age.\n"
        "# TYPE ext_authz_jwks_age_seconds gauge\n"
        'ext_authz_jwks_age_seconds{issuer="a"} 10.0\n'
        "# HELP ext_authz_jwks_keys Keys.\n"
        "# TYPE ext_authz_jwks_keys gauge\n"
        'ext_authz_jwks_keys{issuer="a"} 2.0\n'
    )
    second = (
        first.replace("} 2.0\n", "} 3.0\n", 1)
        .replace("} 10.0", "} 40.0")
        .replace('ext_authz_jwks_keys{issuer="a"} 2.0', 'ext_authz_jwks_keys{issuer="a"} 1.0')
    )

    merged = merge_metrics([first, second])

    assert 'ext_authz_decisions_total{decision="allow",policy="p",reason="ok"} 5.0' in merged
    assert 'ext_authz_jwks_age_seconds{issuer="a"} 40.0' in merged
    assert 'ext_authz_jwks_keys{issuer="a"} 1.0' in merged
    assert "# TYPE ext_authz_decisions_total counter" in merged
