"""The servers under test: the floor servicer, the sidecar and Envoy, each started and checked."""

from __future__ import annotations

import dataclasses
import re
import signal
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

from bench.issuer import BenchIssuer, check_request
from bench.processes import LOOPBACK, ProcessGroup, free_port, free_ports, http_get
from ext_authz.api.envoy.service.auth.v3 import external_auth_pb2_grpc
from ext_authz.config import ServerConfig
from ext_authz.dev.stack import envoy_binary

REPOSITORY = Path(__file__).resolve().parents[1]
BENCH = REPOSITORY / "bench"
CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
ENVOY_CONCURRENCY = 2
# Envoy listeners and the status each returns for a request without a token.
ENVOY_LISTENERS = {"no_auth": 200, "jwt_authn": 401, "ours_grpc": 403, "floor_grpc": 200}


def sidecar_has_setting(name: str) -> bool:
    """Return whether this version of the sidecar accepts the key `server.<name>`."""
    return name in {field.name for field in dataclasses.fields(ServerConfig)}


def sidecar_config(
    issuer: BenchIssuer, grpc_port: int, http_port: int, cache_size: int
) -> dict[str, Any]:
    """Return bench/sidecar.yaml filled in: the benchmark issuer, these ports and cache size."""
    return _fill(
        "sidecar.yaml",
        grpc_port=grpc_port,
        http_port=http_port,
        verified_token_cache_size=cache_size,
        issuer=issuer.url,
        jwks_uri=issuer.jwks_uri,
    )


@dataclass(frozen=True)
class Server:
    """A gRPC Authorization server the benchmark started.

    `grpc_ports` has one port per worker process. `http_port` (operations:
    /metrics) and `http_authz_port` (the HTTP ext_authz front end) are 0
    where the server has none.
    """

    name: str
    grpc_ports: tuple[int, ...]
    pid: int
    http_port: int = 0
    http_authz_port: int = 0

    @property
    def check_urls(self) -> list[str]:
        return [f"http://{LOOPBACK}:{port}{CHECK_PATH}" for port in self.grpc_ports]

    def decision_counts(self) -> tuple[float, float]:
        """Return (allow, every other decision) from the sidecar's ext_authz_decisions_total."""
        status, body = http_get(f"http://{LOOPBACK}:{self.http_port}/metrics")
        if status != 200:
            raise RuntimeError(f"{self.name}: /metrics returned HTTP {status}")
        allowed = other = 0.0
        for match in re.finditer(
            r"^ext_authz_decisions_total\{([^}]*)\} (\S+)$", body.decode(), re.MULTILINE
        ):
            if 'decision="allow"' in match.group(1):
                allowed += float(match.group(2))
            else:
                other += float(match.group(2))
        return allowed, other


class Servers:
    """Starts the servers as children of `processes` and checks that each decides correctly."""

    def __init__(self, processes: ProcessGroup, issuer: BenchIssuer, token: str) -> None:
        self.processes = processes
        self.issuer = issuer
        self.token = token
        self.workdir = processes.workdir
        self.envoy = envoy_binary()

    def start_floor(self) -> Server:
        port = free_port()
        process = self.processes.spawn(
            "floor",
            [sys.executable, "-m", "bench.floor_server", "--address", f"{LOOPBACK}:{port}"],
            cwd=REPOSITORY,
        )
        server = Server("floor", (port,), process.pid)
        self.processes.wait_until(
            "floor", lambda: _answers_allow(port, self.token), "no OK reply to a Check call"
        )
        return server

    def start_sidecar(
        self,
        name: str,
        cache_size: int,
        workers: int = 1,
        http_front_end: bool = False,
        variant: str | None = None,
    ) -> Server:
        """Start `ext-authz serve`. With several workers, worker i listens on the gRPC port + i.

        `variant` names a handler of bench/sidecar_variant.py to run instead
        of the real one; such a sidecar allows every call.
        """
        grpc_port, http_port = free_ports(workers), free_port()
        config = sidecar_config(self.issuer, grpc_port, http_port, cache_size)
        if workers != 1:
            config["server"]["workers"] = workers
        http_authz_port = free_port() if http_front_end else 0
        if http_front_end:
            config["server"]["http_authz_address"] = f"{LOOPBACK}:{http_authz_port}"
        config_file = self.workdir / f"{name}.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))

        command = [sys.executable, "-m", "ext_authz.cli", "serve"]
        if variant is not None:
            command = [sys.executable, "-m", "bench.sidecar_variant", variant]
        process = self.processes.spawn(
            name,
            [*command, "--config", str(config_file)],
            # The second SIGTERM ends the drain period at once.
            stop_signals=(signal.SIGTERM, signal.SIGTERM),
            cwd=REPOSITORY,
        )
        server = Server(
            name,
            tuple(range(grpc_port, grpc_port + workers)),
            process.pid,
            http_port=http_port,
            http_authz_port=http_authz_port,
        )
        keys = len(self.issuer.keys)
        self.processes.wait_until(
            name,
            lambda: (
                f'ext_authz_jwks_keys{{issuer="bench"}} {keys:.1f}'
                in http_get(f"http://{LOOPBACK}:{http_port}/metrics")[1].decode()
            ),
            f"/metrics never showed {keys} keys for issuer bench",
        )
        for port in server.grpc_ports:
            if not _answers_allow(port, self.token):
                raise RuntimeError(
                    f"{name} on port {port} did not allow a valid token; see {name}.log"
                )
            if variant is None and _answers_allow(port, None):
                raise RuntimeError(
                    f"{name} on port {port} allowed a request without a token; see {name}.log"
                )
        return server

    def start_envoy(self, floor: Server, ours: Server) -> dict[str, int]:
        """Start Envoy with a listener per front end, and return the listener ports by name."""
        listeners = dict(ENVOY_LISTENERS)
        if ours.http_authz_port:
            listeners["ours_http"] = 403
        ports = {name: free_port() for name in ("admin", *listeners)}
        config = _fill(
            "envoy.yaml",
            admin_port=ports["admin"],
            no_auth_port=ports["no_auth"],
            jwt_authn_port=ports["jwt_authn"],
            ours_grpc_port=ports["ours_grpc"],
            floor_grpc_port=ports["floor_grpc"],
            ours_port=ours.grpc_ports[0],
            floor_port=floor.grpc_ports[0],
            issuer=self.issuer.url,
            jwks_file=self.workdir / "jwks.json",
        )
        if ours.http_authz_port:
            extra = _fill(
                "envoy-http-authz.yaml",
                ours_http_port=ports["ours_http"],
                sidecar_http_authz_port=ours.http_authz_port,
            )
            config["static_resources"]["listeners"].append(extra["listener"])
            config["static_resources"]["clusters"].append(extra["cluster"])
        config_file = self.workdir / "envoy.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))

        self.processes.spawn(
            "envoy",
            [
                self.envoy,
                "--config-path",
                str(config_file),
                "--concurrency",
                str(ENVOY_CONCURRENCY),
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ],
        )
        self.processes.wait_until(
            "envoy",
            lambda: http_get(f"http://{LOOPBACK}:{ports['admin']}/ready")[0] == 200,
            "the admin /ready endpoint never returned 200",
        )

        bearer = {"Authorization": f"Bearer {self.token}"}
        for listener, expected in listeners.items():
            url = f"http://{LOOPBACK}:{ports[listener]}/"
            with_token, without_token = http_get(url, bearer)[0], http_get(url)[0]
            if with_token != 200 or without_token != expected:
                raise RuntimeError(
                    f"Envoy listener {listener}: HTTP {with_token} with the token (expected 200) "
                    f"and {without_token} without it (expected {expected}); see envoy.log"
                )
        return ports


def _fill(template_name: str, **values: Any) -> dict[str, Any]:
    """Return a YAML template of bench/ with its $name placeholders filled in, parsed.

    PyYAML resolves the template's anchors, so Envoy gets plain YAML.
    """
    template = string.Template((BENCH / template_name).read_text())
    parsed: dict[str, Any] = yaml.safe_load(template.substitute(values))
    return parsed


def _answers_allow(port: int, token: str | None) -> bool:
    """Send one Check call with grpcio, and return whether the server allowed it.

    Return False also while nothing listens on `port` yet.
    """
    request = check_request(token or "unused")
    if token is None:
        del request.attributes.request.http.headers["authorization"]
    try:
        with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            response = stub.Check(request, timeout=5)
    except grpc.RpcError:
        return False
    return response.status.code == 0 and response.HasField("ok_response")
